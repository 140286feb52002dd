"""Baselines on tiny models: shapes, [0,1] range, and the right region on a toy whose answer is known."""

from __future__ import annotations

import pytest
import torch
from _helpers import colour_classifier
from torch import nn

from explainer.baselines import build_baseline, minmax
from explainer.baselines.gradcam import GradCAM, gradcam_layer
from explainer.config import EvalConfig
from explainer.models import build_classifier, freeze

pytestmark = pytest.mark.usefixtures("one_thread")


S = 32


def two_squares(seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A red 10x10 square in the top half and a green one in the bottom half, on black; returns image and the two
    region masks. seed=None: red top-left, green bottom-right; a seed places each square at a random column/row of its
    half, so an outcome test can check its margin on more than one layout."""
    side = 10
    if seed is None:
        corners = [(2, 2), (20, 20)]
    else:
        g = torch.Generator().manual_seed(seed)
        def pick(lo: int, hi: int) -> int:
            return int(torch.randint(lo, hi + 1, (1,), generator=g))

        corners = [(pick(lo, hi), pick(1, S - side - 1)) for lo, hi in ((1, S // 2 - side), (S // 2, S - side - 1))]
    x = torch.zeros(1, 3, S, S)
    regions = []
    for channel, (r, c) in enumerate(corners):
        region = torch.zeros(S, S, dtype=torch.bool)
        region[r : r + side, c : c + side] = True
        x[0, channel][region] = 1.0
        regions.append(region)
    return x, regions[0], regions[1]


def _inside_outside(m: torch.Tensor, region: torch.Tensor) -> tuple[float, float]:
    return float(m[region].mean()), float(m[~region].mean())


@pytest.mark.numerics
def test_minmax_per_map():
    maps = torch.tensor([[[[1.0, 3.0]], [[2.0, 2.0]]]])
    out = minmax(maps)
    assert out.tolist() == [[[[0.0, 1.0]], [[0.0, 0.0]]]]


@pytest.mark.numerics
def test_gradcam_highlights_the_object_of_each_class():
    model = colour_classifier(gain=20)
    x, red, green = two_squares()
    maps = GradCAM(model)(x, torch.ones(1, 2, dtype=torch.bool))
    assert maps.shape == (1, 2, S, S) and maps.min() >= 0 and maps.max() <= 1
    inside, outside = _inside_outside(maps[0, 0], red)
    assert inside > 0.5 > outside + 0.4
    inside, outside = _inside_outside(maps[0, 1], green)
    assert inside > 0.5 > outside + 0.4
    only_first = GradCAM(model)(x, torch.tensor([[True, False]]))
    assert only_first[0, 1].abs().sum() == 0  # classes not wanted are not computed


def test_gradcam_on_project_classifiers_uses_the_reference_layers():
    tiny = freeze(build_classifier("tiny_cnn", 3))
    layer = gradcam_layer(tiny)  # the last block's output: the ReLU after the last conv
    modules = list(tiny.modules())
    last_conv = max(i for i, m in enumerate(modules) if isinstance(m, nn.Conv2d))
    assert isinstance(layer, nn.ReLU) and modules.index(layer) > last_conv
    resnet = build_classifier("resnet18", 3)
    assert gradcam_layer(resnet) is resnet.net.layer4[-1]
    x = torch.randn(2, 3, S, S)
    maps = GradCAM(tiny)(x, torch.tensor([[True, False, True], [False, True, False]]))
    assert maps.shape == (2, 3, S, S) and maps.min() >= 0 and maps.max() <= 1


@pytest.mark.numerics
def test_rise_highlights_the_object_and_is_seeded():
    cfg = EvalConfig(rise_masks=400, rise_cells=4, rise_p=0.5, rise_batch=200)
    rise = build_baseline("rise", colour_classifier(gain=20), cfg)
    x, red, green = two_squares()
    maps = rise(x, torch.ones(1, 2, dtype=torch.bool))
    assert maps.shape == (1, 2, S, S) and maps.min() >= 0 and maps.max() <= 1
    inside, outside = _inside_outside(maps[0, 0], red)
    assert inside > outside + 0.2
    inside, outside = _inside_outside(maps[0, 1], green)
    assert inside > outside + 0.2
    assert torch.equal(maps, rise(x, torch.ones(1, 2, dtype=torch.bool)))


@pytest.mark.numerics
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_extremal_perturbation_shapes_range_and_region(seed):
    """EP keeps the target's square and not the other class's square, on three layouts.

    gain=200, not 20: TorchRay's area term (weight 300, tuned for 224 px networks) gives each pixel a gradient of
    about 0.6 while a gain-20 toy gives the logit's pixels about 0.02, so at gain 20 the mask follows the area term
    and which pixels stay on is decided by rounding (inside-outside margin 0.17-0.25 depending on the BLAS path).
    At gain 200 the object wins on every path: inside ~0.98, outside and the other square ~0.36-0.46 (3 seeds,
    MKL_CBWR=AVX2 and COMPATIBLE), so the 0.3 margin below has ~0.25 to spare. 150 iterations leave the background
    half-way down (TorchRay's schedule is for 800), which is why the rest is compared with a margin, not with 0.
    """
    cfg = EvalConfig(ep_areas=[0.1, 0.3], ep_iterations=150)
    ep = build_baseline("ep", colour_classifier(gain=200), cfg)
    x, red, green = two_squares(seed)
    maps = ep(x, torch.tensor([[True, False]]))
    assert maps.shape == (1, 2, S, S) and maps.min() >= 0 and maps.max() <= 1
    assert maps[0, 1].abs().sum() == 0  # classes not wanted are not computed
    inside, outside = _inside_outside(maps[0, 0], red)
    assert inside > outside + 0.3
    assert inside > float(maps[0, 0][green].mean()) + 0.3  # the other class's object is not kept
    assert len(ep.chosen_areas) == 1 and ep.chosen_areas[0] in (0.1, 0.3)  # one choice per map computed


def test_unknown_baseline_and_bad_settings():
    with pytest.raises(ValueError, match="unknown baseline"):
        build_baseline("igos", colour_classifier(gain=20), EvalConfig())
    with pytest.raises(ValueError, match="RISE"):
        build_baseline("rise", colour_classifier(gain=20), EvalConfig(rise_p=0.0))
    with pytest.raises(ValueError, match="areas"):
        build_baseline("ep", colour_classifier(gain=20), EvalConfig(ep_areas=[1.5]))
