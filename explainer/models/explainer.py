"""The Explainer: a dense network mapping an image to one logit map per class, at the input resolution
(docs/method.md#roles).

The paper uses torchvision's DeepLabV3-ResNet50 trained from scratch; lighter torchvision heads and a tiny U-Net are
selectable by name for CPU work and tests. Masks are sigmoid(logits) - applied by the loss/step, not here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import segmentation

from explainer.models.weights import load_into, load_state_dict_file

EXPLAINER_ARCHS = (
    "deeplabv3_resnet50",
    "deeplabv3_resnet101",
    "deeplabv3_mobilenet_v3_large",
    "lraspp_mobilenet_v3_large",
    "tiny_unet",
)

# arch -> (torchvision builder, ImageNet network its backbone comes from, prefix of that network's keys to keep)
_TORCHVISION: dict[str, tuple[Callable[..., nn.Module], str, str]] = {
    "deeplabv3_resnet50": (segmentation.deeplabv3_resnet50, "resnet50", ""),
    "deeplabv3_resnet101": (segmentation.deeplabv3_resnet101, "resnet101", ""),
    "deeplabv3_mobilenet_v3_large": (segmentation.deeplabv3_mobilenet_v3_large, "mobilenet_v3_large", "features."),
    "lraspp_mobilenet_v3_large": (segmentation.lraspp_mobilenet_v3_large, "mobilenet_v3_large", "features."),
}


class SegmentationExplainer(nn.Module):
    """A torchvision segmentation model returning its "out" logits as a plain tensor at input resolution."""

    def __init__(self, net: nn.Module, arch: str, num_classes: int) -> None:
        super().__init__()
        self.net = net
        self.arch = arch
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)["out"]  # torchvision already upsamples bilinearly to x's size
        if out.shape[-2:] != x.shape[-2:]:
            out = F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return out


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    # GroupNorm, not BatchNorm: the output of an image must not depend on the rest of its batch, so a 2-process run
    # (2 x B images) and a 1-process run (2B images) compute the same gradients.
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.GroupNorm(4, c_out), nn.ReLU(inplace=True)
    )


class TinyUNet(nn.Module):
    """Two-level U-Net with a few thousand parameters: fast enough for CPU tests and the synthetic demo.

    `zero_head`: see `build_explainer(head_init="zero")`.
    """

    def __init__(self, num_classes: int, width: int = 16, zero_head: bool = False) -> None:
        super().__init__()
        self.arch = "tiny_unet"
        self.num_classes = num_classes
        self.enc1 = _conv_block(3, width)
        self.enc2 = _conv_block(width, 2 * width)
        self.bottom = _conv_block(2 * width, 4 * width)
        self.dec2 = _conv_block(6 * width, 2 * width)
        self.dec1 = _conv_block(3 * width, width)
        self.head = nn.Conv2d(width, num_classes, 1)
        if zero_head:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        b = self.bottom(F.max_pool2d(e2, 2))
        d2 = self.dec2(torch.cat([F.interpolate(b, size=e2.shape[-2:], mode="bilinear", align_corners=False), e2], 1))
        d1 = self.dec1(torch.cat([F.interpolate(d2, size=e1.shape[-2:], mode="bilinear", align_corners=False), e1], 1))
        return self.head(d1)


HEAD_INITS = ("random", "zero")


def _mask_head_convs(net: nn.Module) -> list[nn.Conv2d]:
    """The last convolution(s) producing the class logits of a torchvision segmentation model."""
    head = net.classifier
    if hasattr(head, "low_classifier"):  # LR-ASPP adds a low-level and a high-level 1x1 classifier
        return [head.low_classifier, head.high_classifier]
    return [head[-1]]


def build_explainer(arch: str, num_classes: int, backbone_weights: str | None = None,
                    head_init: str = "random") -> nn.Module:
    """x [B,3,H,W] -> logits [B,C,H,W]. From scratch unless `backbone_weights` names a local ImageNet file.

    head_init="zero" starts the mask head's last convolution at zero: every class mask is 0.5 everywhere at step 0.
    Why: with a random head one channel starts a little higher on another class's objects; the loss's max over an
    image's classes then sends the whole classification gradient on those pixels to that channel, the other one gets
    none there, is pushed down by the area terms, and its mask can stay dark for good (a class channel "dies":
    docs/results.md#class-specific-term). Equal channels split that gradient evenly (autograd's rule for ties in a max),
    so every channel first learns from the images of its own class. "random" is PyTorch's default (the reference).
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if head_init not in HEAD_INITS:
        raise ValueError(f"explainer.head_init must be one of {', '.join(HEAD_INITS)}, got {head_init!r}")
    if arch == "tiny_unet":
        if backbone_weights is not None:
            raise ValueError("explainer.backbone_weights: tiny_unet has no ImageNet backbone; set it to null")
        return TinyUNet(num_classes, zero_head=head_init == "zero")
    if arch not in _TORCHVISION:
        raise ValueError(f"unknown explainer arch {arch!r}; choose one of {', '.join(EXPLAINER_ARCHS)}")
    builder, network, prefix = _TORCHVISION[arch]
    kwargs = {"weights": None, "weights_backbone": None, "num_classes": num_classes}
    if arch.startswith("deeplabv3"):
        kwargs["aux_loss"] = False
    net = builder(**kwargs)
    if backbone_weights is not None:
        state = load_state_dict_file(backbone_weights, network, "explainer.backbone_weights")
        # The backbone is an IntermediateLayerGetter over the ImageNet network's children: same key names, without
        # the classification head (ResNet "fc."; MobileNet keeps only "features.*", renumbered from the root).
        load_into(
            net.backbone, state, path=backbone_weights, network=network, strip_prefix=prefix, drop_prefixes=("fc.",)
        )
    if head_init == "zero":
        for conv in _mask_head_convs(net):
            nn.init.zeros_(conv.weight)
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)
    return SegmentationExplainer(net, arch, num_classes)
