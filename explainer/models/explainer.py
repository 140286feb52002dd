"""The Explainer: a dense network mapping an image to one logit map per class (docs/method.md#roles).

It returns the logits at its head's own resolution (DeepLabV3: 1/8 of the input; LR-ASPP: 1/8; tiny U-Net: the
input's) with the input size, as `ClassLogits`: at 1000 classes, upsampling every map to the input size was most of a
training step's time and memory (docs/method.md#head-resolution). Whoever needs a full-resolution map upsamples it,
with the same bilinear call torchvision's models make in their forward, so a class's mask is the same numbers as when
the model upsampled all of them. The paper uses torchvision's DeepLabV3-ResNet50 trained from scratch; lighter
torchvision heads and a tiny U-Net are selectable by name for CPU work and tests. Masks are sigmoid(logits) - applied
by the loss/step, not here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

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


def upsample(logits: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """[N,K,h,w] -> [N,K,*size]: the bilinear call torchvision's segmentation models end their forward with
    (align_corners=False), so upsampling a few classes gives the numbers upsampling all of them gave. A map already at
    `size` is returned as it is (tiny U-Net: no call, the same numbers as before)."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


class ClassLogits(NamedTuple):
    """What an Explainer returns: the class logits at its head's resolution and the size full-resolution maps have
    (the input's). `full()` upsamples all or some classes; only what is used should be upsampled."""

    logits: torch.Tensor  # [B,C,h,w] at the head's resolution
    size: tuple[int, int]  # (H, W) of the input

    def full(self, classes: torch.Tensor | None = None) -> torch.Tensor:
        """Full-resolution logits of every class ([B,C,H,W]), or of `classes`: [K] indices (the same for every
        image) or [B,K] (per image) -> [B,K,H,W]."""
        logits = self.logits
        if classes is not None:
            if classes.dim() == 1:
                logits = logits.index_select(1, classes.to(logits.device))
            else:
                h, w = logits.shape[-2:]
                logits = logits.gather(1, classes.to(logits.device)[:, :, None, None].expand(-1, -1, h, w))
        return upsample(logits, self.size)


def class_logits(out: ClassLogits | torch.Tensor, size: tuple[int, int] | torch.Size) -> ClassLogits:
    """An Explainer's output as ClassLogits; a plain tensor (a model of one's own returning [B,C,H,W], or an exported
    TorchScript model of before) is taken as logits at the resolution it has."""
    if isinstance(out, ClassLogits):
        return out
    if isinstance(out, tuple):  # a ClassLogits that went through a wrapper that rebuilds tuples (e.g. a tracer)
        return ClassLogits(out[0], (int(out[1][0]), int(out[1][1])))
    return ClassLogits(out, (int(size[0]), int(size[1])))


class SegmentationExplainer(nn.Module):
    """A torchvision segmentation model returning ClassLogits: its head's logits, before torchvision's upsampling."""

    def __init__(self, net: nn.Module, arch: str, num_classes: int) -> None:
        super().__init__()
        self.net = net
        self.arch = arch
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> ClassLogits:
        # torchvision's DeepLabV3 / LR-ASPP forward without its last line (the bilinear upsampling to x's size);
        # DeepLabV3's classifier takes the backbone's "out" feature map, LR-ASPP's the dict ("low" and "high")
        features = self.net.backbone(x)
        if isinstance(self.net, segmentation.LRASPP):
            out = self.net.classifier(features)
        else:
            out = self.net.classifier(features["out"])
        return ClassLogits(out, (int(x.shape[-2]), int(x.shape[-1])))


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

    def forward(self, x: torch.Tensor) -> ClassLogits:
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        b = self.bottom(F.max_pool2d(e2, 2))
        d2 = self.dec2(torch.cat([F.interpolate(b, size=e2.shape[-2:], mode="bilinear", align_corners=False), e2], 1))
        d1 = self.dec1(torch.cat([F.interpolate(d2, size=e1.shape[-2:], mode="bilinear", align_corners=False), e1], 1))
        return ClassLogits(self.head(d1), (int(x.shape[-2]), int(x.shape[-1])))  # the head is at full resolution


HEAD_INITS = ("random", "zero")


def _mask_head_convs(net: nn.Module) -> list[nn.Conv2d]:
    """The last convolution(s) producing the class logits of a torchvision segmentation model."""
    head = net.classifier
    if hasattr(head, "low_classifier"):  # LR-ASPP adds a low-level and a high-level 1x1 classifier
        return [head.low_classifier, head.high_classifier]
    return [head[-1]]


def build_explainer(arch: str, num_classes: int, backbone_weights: str | None = None,
                    head_init: str = "random") -> nn.Module:
    """x [B,3,H,W] -> ClassLogits (logits [B,C,h,w] at the head's resolution, (H, W)). From scratch unless
    `backbone_weights` names a local ImageNet file.

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
