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


def two_squares() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A red square top-left and a green square bottom-right on black; returns image and the two region masks."""
    x = torch.zeros(1, 3, S, S)
    red = torch.zeros(S, S, dtype=torch.bool)
    green = torch.zeros(S, S, dtype=torch.bool)
    red[2:12, 2:12] = True
    green[20:30, 20:30] = True
    x[0, 0][red] = 1.0
    x[0, 1][green] = 1.0
    return x, red, green


def _inside_outside(m: torch.Tensor, region: torch.Tensor) -> tuple[float, float]:
    return float(m[region].mean()), float(m[~region].mean())


def test_minmax_per_map():
    maps = torch.tensor([[[[1.0, 3.0]], [[2.0, 2.0]]]])
    out = minmax(maps)
    assert out.tolist() == [[[[0.0, 1.0]], [[0.0, 0.0]]]]


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


def test_extremal_perturbation_shapes_range_and_region():
    cfg = EvalConfig(ep_areas=[0.1, 0.3], ep_iterations=150)
    ep = build_baseline("ep", colour_classifier(gain=20), cfg)
    x, red, _ = two_squares()
    maps = ep(x, torch.tensor([[True, False]]))
    assert maps.shape == (1, 2, S, S) and maps.min() >= 0 and maps.max() <= 1
    assert maps[0, 1].abs().sum() == 0
    inside, outside = _inside_outside(maps[0, 0], red)
    assert inside > outside + 0.2
    assert ep.chosen_areas and ep.chosen_areas[0] in (0.1, 0.3)


def test_unknown_baseline_and_bad_settings():
    with pytest.raises(ValueError, match="unknown baseline"):
        build_baseline("igos", colour_classifier(gain=20), EvalConfig())
    with pytest.raises(ValueError, match="RISE"):
        build_baseline("rise", colour_classifier(gain=20), EvalConfig(rise_p=0.0))
    with pytest.raises(ValueError, match="areas"):
        build_baseline("ep", colour_classifier(gain=20), EvalConfig(ep_areas=[1.5]))
