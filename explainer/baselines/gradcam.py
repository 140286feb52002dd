"""Grad-CAM (Selvaraju et al. 2017) through captum's LayerGradCam, on the layer the reference used (SPEC 7).

captum works on a frozen classifier as is (pytorch-grad-cam would need an input with requires_grad) and gives the same
maps after min-max normalisation (LIBRARIES.md). One backward pass per class, batched over the images.
"""

from __future__ import annotations

import torch
from captum.attr import LayerAttribution, LayerGradCam
from torch import Tensor, nn

from explainer.baselines.common import minmax


def gradcam_layer(classifier: nn.Module) -> nn.Module:
    """VGG-16: the last feature layer; ResNets: layer4[-1]; tiny_cnn and unknown models: their last Conv2d.

    The classifier's own `gradcam_layer()` (METHOD's MultiLabelClassifier) is used where it names a spatial layer; for
    tiny_cnn it names the whole pooled feature stack, which has no spatial extent left, hence the last Conv2d.
    """
    arch = getattr(classifier, "arch", None)
    if arch != "tiny_cnn" and hasattr(classifier, "gradcam_layer"):
        return classifier.gradcam_layer()
    convs = [m for m in classifier.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError(f"Grad-CAM: classifier {type(classifier).__name__} has no Conv2d layer to attribute to")
    return convs[-1]


class GradCAM:
    """Per-class Grad-CAM maps upsampled bilinearly to the input size and min-max normalised to [0,1]."""

    name = "gradcam"
    needs_grad = True

    def __init__(self, classifier: nn.Module, layer: nn.Module | None = None) -> None:
        self.classifier = classifier
        self.layer = layer if layer is not None else gradcam_layer(classifier)
        self.cam = LayerGradCam(classifier, self.layer)

    def __call__(self, images: Tensor, wanted: Tensor) -> Tensor:
        b, c = wanted.shape
        maps = torch.zeros(b, c, *images.shape[-2:], device=images.device)
        with torch.enable_grad():
            for k in wanted.any(0).nonzero().flatten().tolist():
                attr = self.cam.attribute(images, target=k, relu_attributions=True)
                attr = LayerAttribution.interpolate(attr, tuple(images.shape[-2:]), interpolate_mode="bilinear")
                maps[:, k] = attr[:, 0].detach()
        return minmax(maps)
