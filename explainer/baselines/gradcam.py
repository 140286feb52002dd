"""Grad-CAM (Selvaraju et al. 2017) through captum's LayerGradCam, on the layer the reference used
(docs/method.md#baselines) or a named one (eval.gradcam_layer), for any hookable classifier.

captum works on a frozen classifier as is (pytorch-grad-cam would need an input with requires_grad) and gives the same
maps after min-max normalisation (docs/dependencies.md#captum). One backward pass per class, batched over the images.

A Vision Transformer has no feature map: its blocks output tokens [B, N, D]. There Grad-CAM runs on the last block's
first LayerNorm (torchvision's `encoder.layers[-1].ln_1`, the layer pytorch-grad-cam's ViT example uses) with the
patch tokens reshaped to their g x g grid (the class token dropped), the same weighting (mean gradient per channel)
and ReLU; token outputs that are not a square grid are refused with a pointer to RISE.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from captum.attr import LayerAttribution, LayerGradCam
from torch import Tensor, nn

from explainer.baselines.common import minmax
from explainer.run_errors import InputError


def _check_hookable(classifier: nn.Module) -> None:
    if isinstance(classifier, torch.jit.ScriptModule):
        raise InputError(
            "Grad-CAM needs the activations of an inner layer, and a TorchScript classifier does not run Python "
            "hooks inside its compiled forward. Evaluate it with the black-box baselines (rise, ep), or load the "
            "same weights through classifier.torchvision / classifier.factory to run Grad-CAM"
        )


MAX_PREFIX_TOKENS = 8  # class / distillation / register tokens in front of the patch tokens


def token_grid(shape: tuple[int, ...]) -> tuple[int, int] | None:
    """(prefix tokens, grid side g) when a [B, N, D] output holds a square g x g grid of patch tokens after at most
    MAX_PREFIX_TOKENS others (ViT-B/16 at 224 px: 1 + 14 x 14); None otherwise."""
    if len(shape) != 3 or shape[1] < 4:
        return None
    side = math.isqrt(shape[1])
    prefix = shape[1] - side * side
    return (prefix, side) if prefix <= MAX_PREFIX_TOKENS else None


def vit_layer(classifier: nn.Module) -> nn.Module | None:
    """The last encoder block's first LayerNorm of a torchvision VisionTransformer inside `classifier`, else None
    (a ViT's only 4-D output is the patch embedding, which the automatic search would otherwise pick)."""
    for module in classifier.modules():
        layers = getattr(getattr(module, "encoder", None), "layers", None)
        if hasattr(module, "class_token") and isinstance(layers, nn.Sequential) and len(layers):
            return getattr(layers[-1], "ln_1", None) or layers[-1]
    return None


def token_gradcam(classifier: nn.Module, layer: nn.Module, images: Tensor, target: int) -> Tensor:
    """Grad-CAM of class `target` on a token layer: activations and gradients as [B, D, g, g] grids ->
    ReLU(sum_d mean_grad_d * A_d), [B, 1, g, g]."""
    seen: list[Tensor] = []
    handle = layer.register_forward_hook(lambda _m, _i, out: seen.append(out))
    try:
        with torch.enable_grad():
            x = images.detach().requires_grad_(True)  # a frozen classifier: gradients flow through the input only
            logits = classifier(x)
            acts = seen[-1]
            grads = torch.autograd.grad(logits[:, target].sum(), acts)[0]
    finally:
        handle.remove()
    grid = token_grid(tuple(acts.shape))
    if grid is None:
        raise ValueError(f"Grad-CAM: the layer outputs {tuple(acts.shape)}, not a square grid of tokens; evaluate "
                         "this classifier with RISE (eval.methods: [rise]) instead")
    prefix, side = grid

    def as_grid(t: Tensor) -> Tensor:
        return t[:, prefix:].reshape(t.shape[0], side, side, t.shape[2]).permute(0, 3, 1, 2)

    a, g = as_grid(acts.detach()), as_grid(grads)
    return torch.relu((g.mean(dim=(2, 3), keepdim=True) * a).sum(dim=1, keepdim=True))


def candidate_layers(classifier: nn.Module, limit: int = 12) -> list[str]:
    """Names of the modules that hold a Conv2d (blocks and convs), last ones first: what a Grad-CAM layer can be."""
    names = [name for name, module in classifier.named_modules()
             if name and any(isinstance(m, nn.Conv2d) for m in module.modules())]
    return names[::-1][:limit]


def named_layer(classifier: nn.Module, name: str) -> nn.Module:
    """The module called `name` (eval.gradcam_layer, torchvision-style names such as "features.28" or "layer4.1";
    our fine-tuned classifiers also accept them without their "net." prefix); a clear error lists candidates."""
    _check_hookable(classifier)
    modules = dict(classifier.named_modules())
    for candidate in (name, f"net.{name}"):
        if candidate in modules and candidate:
            return modules[candidate]
    raise InputError(f"eval.gradcam_layer: the classifier has no layer {name!r}; candidate layers (last first): "
                     f"{', '.join(candidate_layers(classifier)) or 'none (no Conv2d)'}")


def last_spatial_layer(classifier: nn.Module, images: Tensor) -> nn.Module:
    """The module that produces the last feature map with spatial extent (> 1x1) in one forward pass: the output of
    the last conv block (for VGG the whole `features` stack, for a ResNet `layer4`, for tiny_cnn its last ReLU)."""
    _check_hookable(classifier)
    finished: list[nn.Module] = []

    def record(module: nn.Module, _inputs: Any, output: Any) -> None:
        if isinstance(output, Tensor) and output.dim() == 4 and output.shape[-1] * output.shape[-2] > 1:
            finished.append(module)

    handles = [m.register_forward_hook(record) for name, m in classifier.named_modules() if name]
    try:
        with torch.no_grad():
            classifier(images[:1])
    finally:
        for handle in handles:
            handle.remove()
    if not finished:
        raise InputError(f"Grad-CAM: classifier {type(classifier).__name__} has no layer with a spatial output "
                         f"(> 1x1) at {tuple(images.shape[-2:])} px; set eval.gradcam_layer")
    return finished[-1]


def gradcam_layer(classifier: nn.Module, images: Tensor | None = None) -> nn.Module:
    """The automatic layer: the reference's for our fine-tuned VGG-16 / ResNets (VGG `features[-1]`, ResNet
    `layer4[-1]`, the classifier's own `gradcam_layer()`), otherwise the last spatial layer found by a forward pass
    on `images` (any torchvision or user model), without images the first ReLU after the last Conv2d. For tiny_cnn
    both give its last conv block's ReLU, whose Grad-CAM IoU on the synthetic test set beats the raw conv output
    (0.46 vs 0.41), so the baseline is not handicapped by our choice.
    """
    _check_hookable(classifier)
    vit = vit_layer(classifier)
    if vit is not None:
        return vit
    arch = getattr(classifier, "arch", None)
    if arch != "tiny_cnn" and hasattr(classifier, "gradcam_layer"):
        layer = classifier.gradcam_layer()
        if layer is not None:
            return layer
    if images is not None:
        return last_spatial_layer(classifier, images)
    # without images: by registration order, the first ReLU after the last Conv2d (else that Conv2d)
    modules = list(classifier.modules())
    convs = [i for i, m in enumerate(modules) if isinstance(m, nn.Conv2d)]
    if not convs:
        raise InputError(f"Grad-CAM: classifier {type(classifier).__name__} has no Conv2d layer to attribute to")
    relus = [m for m in modules[convs[-1]:] if isinstance(m, nn.ReLU)]
    return relus[0] if relus else modules[convs[-1]]


class GradCAM:
    """Per-class Grad-CAM maps upsampled bilinearly to the input size and min-max normalised to [0,1]."""

    name = "gradcam"
    needs_grad = True

    def __init__(self, classifier: nn.Module, layer: nn.Module | str | None = None) -> None:
        """`layer`: a module, a module name (eval.gradcam_layer; checked here, at start-up) or None (automatic,
        resolved on the first batch when the model needs a forward pass to find it)."""
        _check_hookable(classifier)
        self.classifier = classifier
        self.layer_name = layer if isinstance(layer, str) else None
        self.layer: nn.Module | None = named_layer(classifier, layer) if isinstance(layer, str) else layer
        self.cam: LayerGradCam | None = None
        self.tokens = False  # the layer outputs ViT tokens: token_gradcam instead of captum

    def _check_spatial(self, images: Tensor) -> None:
        """The layer must output a feature map [B, K, h, w] or a square grid of tokens [B, N, D]; said once, on the
        first batch."""
        shapes: list[tuple[int, ...]] = []
        assert self.layer is not None
        handle = self.layer.register_forward_hook(lambda _m, _i, out: shapes.append(
            tuple(out.shape) if isinstance(out, Tensor) else ()))
        try:
            with torch.no_grad():
                self.classifier(images[:1])
        finally:
            handle.remove()
        self.tokens = bool(shapes) and token_grid(shapes[0]) is not None
        if not shapes or (len(shapes[0]) != 4 and not self.tokens):
            raise ValueError(f"eval.gradcam_layer: {self.layer_name or 'the automatic layer'!r} outputs shape "
                             f"{shapes[0] if shapes else None}, not a feature map [B, K, h, w] or a square grid "
                             f"of ViT tokens [B, 1 + g*g, D]; candidate layers (last first): "
                             f"{', '.join(candidate_layers(self.classifier))}; or evaluate with RISE (eval.methods: "
                             "[rise]), which needs no layer")

    def __call__(self, images: Tensor, wanted: Tensor) -> Tensor:
        if self.cam is None:
            if self.layer is None:
                self.layer = gradcam_layer(self.classifier, images)
            self._check_spatial(images)
            self.cam = LayerGradCam(self.classifier, self.layer)
        b, c = wanted.shape
        maps = torch.zeros(b, c, *images.shape[-2:], device=images.device)
        with torch.enable_grad():
            for k in wanted.any(0).nonzero().flatten().tolist():
                if self.tokens:
                    attr = token_gradcam(self.classifier, self.layer, images, k)
                else:
                    attr = self.cam.attribute(images, target=k, relu_attributions=True)
                attr = LayerAttribution.interpolate(attr, tuple(images.shape[-2:]), interpolate_mode="bilinear")
                maps[:, k] = attr[:, 0].detach()
        return minmax(maps)
