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


class _ToyViT(nn.Module):
    """colour_classifier as a Vision Transformer: 4 x 4 patches embedded as (mean red, mean green) tokens behind a
    class token, one encoder block (torchvision's attribute names), mean-pooled patch tokens into the colour head."""

    def __init__(self, gain: float = 20.0, patch: int = 4) -> None:
        super().__init__()
        self.conv_proj = nn.Conv2d(3, 2, patch, stride=patch)
        self.class_token = nn.Parameter(torch.zeros(1, 1, 2))
        self.encoder = nn.Module()
        block = nn.Module()
        block.ln_1 = nn.Identity()
        self.encoder.layers = nn.Sequential(block)
        self.head = nn.Linear(2, 2)
        with torch.no_grad():
            self.conv_proj.weight.zero_()
            self.conv_proj.bias.fill_(-0.1)
            self.conv_proj.weight[0, 0] = 1.0 / patch**2
            self.conv_proj.weight[1, 1] = 1.0 / patch**2
            self.head.weight.copy_(gain * torch.eye(2))
            self.head.bias.fill_(-2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.conv_proj(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.class_token.expand(len(x), -1, -1), tokens], dim=1)
        tokens = torch.relu(self.encoder.layers[0].ln_1(tokens))
        return self.head(tokens[:, 1:].mean(dim=1))


@pytest.mark.numerics
def test_gradcam_on_a_vit_reshapes_the_token_grid_and_finds_each_object():
    """The automatic layer of a ViT is the last block's ln_1 (not the patch embedding, the only 4-D output), its
    tokens become the 8 x 8 grid, and each class's map lights its own square, as on the convolutional toy."""
    vit = freeze(_ToyViT())
    assert gradcam_layer(vit) is vit.encoder.layers[-1].ln_1
    x, red, green = two_squares()
    maps = GradCAM(vit)(x, torch.ones(1, 2, dtype=torch.bool))
    assert maps.shape == (1, 2, S, S) and maps.min() >= 0 and maps.max() <= 1
    for k, region in ((0, red), (1, green)):
        inside, outside = _inside_outside(maps[0, k], region)
        assert inside > 0.5 > outside + 0.3
    import torchvision

    tv = torchvision.models.VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=1, hidden_dim=8,
                                              mlp_dim=8, num_classes=3)  # torchvision's own class (vit_b_16's)
    assert gradcam_layer(tv) is tv.encoder.layers[-1].ln_1
    maps = GradCAM(freeze(tv))(torch.randn(2, 3, S, S), torch.ones(2, 3, dtype=torch.bool))
    assert maps.shape == (2, 3, S, S) and torch.isfinite(maps).all() and maps.amax() <= 1


def test_gradcam_refuses_tokens_that_are_no_grid_and_names_rise():
    class Tokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 4)
            self.head = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.lin(x.flatten(2)[:, :, :35].transpose(1, 2)).mean(dim=1))  # 35 tokens: 25 + 10

    with pytest.raises(ValueError, match=r"not a feature map .* RISE"):
        GradCAM(freeze(Tokens()), "lin")(torch.randn(1, 3, S, S), torch.ones(1, 2, dtype=torch.bool))
