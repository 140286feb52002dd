"""What every attribution method shares: the calling convention and per-map min-max normalisation."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor


class AttributionMethod(Protocol):
    """images [B,3,H,W] (normalised) and wanted [B,C] bool -> per-class maps [B,C,H,W] in [0,1].

    `wanted` marks the (image, class) maps the caller will use (the image's ground-truth classes for the segmentation
    scores, every class for figures); a method whose cost grows with the number of classes may leave the others at 0.
    `needs_grad` says whether the method must run with autograd on (Grad-CAM, Extremal Perturbations), which the
    timing of Table 3 reports.
    """

    name: str
    needs_grad: bool

    def __call__(self, images: Tensor, wanted: Tensor) -> Tensor: ...


def minmax(maps: Tensor) -> Tensor:
    """Min-max normalise every [H,W] map of a [B,C,H,W] tensor to [0,1]; a constant map becomes all zeros."""
    flat = maps.flatten(2)
    lo = flat.amin(2, keepdim=True)
    hi = flat.amax(2, keepdim=True)
    span = hi - lo
    out = torch.where(span > 0, (flat - lo) / span.clamp_min(torch.finfo(flat.dtype).tiny), torch.zeros_like(flat))
    return out.reshape(maps.shape).clamp_(0.0, 1.0)
