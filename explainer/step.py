"""One training step of the method (docs/method.md#training-step): explainer -> masks -> ONE frozen-classifier pass ->
loss.

`explainer_forward_loss` is what the trainer calls. `reference_forward_loss` rebuilds the paper code's slow structure
(fp32, two classifier passes, per-image Python loops) with the same maths; it exists only for the benchmark and for
the test proving both give the same loss and gradients.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from explainer.config import LossConfig
from explainer.losses import area_counts, combine_terms, full_precision, present_classes, split_classes
from explainer.models.explainer import class_logits, upsample
from explainer.models.model_files import unwrap
from explainer.objectives import MASKED, Objective, build_objective


@dataclass
class StepOutput:
    loss: Tensor  # scalar with graph (fp32)
    terms: dict[str, Tensor]  # detached scalars, "loss" included
    mask_logits: Tensor  # E(x) [B,C,h,w] at the head's resolution, detached (its own dtype: bf16 under autocast)
    m: Tensor  # target mask [B,1,H,W], with graph
    # F(x_m) [B,C], detached fp32 (masked-image metrics, docs/method.md#classification-thresholds)
    logits_masked: Tensor
    size: tuple[int, int] = (0, 0)  # (H, W): the full resolution (the images'); (0, 0): that of mask_logits

    @property
    def masks(self) -> Tensor:
        """S = sigmoid(E(x)) [B,C,H,W], fp32, detached: made on demand, since the loss never needs all C masks."""
        return self.first_masks(self.mask_logits.shape[0])

    def first_masks(self, count: int) -> Tensor:
        """S of the first `count` images only, upsampled to full resolution (image logging: no [B,C,H,W] copy of
        the batch for a few images)."""
        size = self.size if self.size != (0, 0) else tuple(self.mask_logits.shape[-2:])
        return torch.sigmoid(full_precision(upsample(self.mask_logits[:count], size)))


def _check_frozen(classifier: nn.Module) -> None:
    inner = unwrap(classifier)
    if inner.training or any(p.requires_grad for p in inner.parameters()):
        raise RuntimeError(
            "the classifier must be frozen during explainer training (eval mode, no parameter gradients): "
            "call explainer.models.freeze(classifier) or load it with load_classifier()"
        )


def explainer_forward_loss(
    explainer: nn.Module,
    classifier: nn.Module,
    images: Tensor,
    labels: Tensor,
    loss_cfg: LossConfig,
    autocast_ctx: Any = None,
    draws: Tensor | None = None,
    *,
    objective: Objective | None = None,
    host_labels: Tensor | None = None,
) -> StepOutput:
    """Forward pass and loss of one batch. `autocast_ctx` (e.g. torch.autocast / accelerator.autocast()) is entered
    once around both networks; every loss term is computed in fp32. channels_last images stay channels_last.
    `objective`: default build_objective(loss_cfg) (loss.kind); the step builds the classifier inputs it declares
    and never asks which objective it is. `draws` ([B], uniform in [0, 1)) is passed on to the objective (WYSIWYC's
    L_s picks its class per image with it: the trainer passes the loader's batch["draw"]; default: torch's RNG).
    `host_labels`: the same labels on the CPU (the loader's, before the copy to the device): the class-sparse loss
    reads its shape K from them, so a step on a GPU never waits for the device to read it."""
    _check_frozen(classifier)
    objective = build_objective(loss_cfg) if objective is None else objective
    channels_last = images.dim() == 4 and images.is_contiguous(memory_format=torch.channels_last)
    host = labels if host_labels is None and labels.device.type == "cpu" else host_labels
    index = None if host is None else _pinned(present_classes(host, loss_cfg.max_classes_per_image), images.device)
    labels = labels.to(device=images.device)
    with autocast_ctx if autocast_ctx is not None else contextlib.nullcontext():
        out = class_logits(explainer(images), images.shape[-2:])
        # class-sparse (docs/method.md#class-sparse): the K ground-truth masks per image and n, never all C masks;
        # at the head's resolution, only the K masks and n are upsampled (docs/method.md#head-resolution)
        split = split_classes(out.logits, labels, loss_cfg.max_classes_per_image, logits=True, size=out.size,
                              non_target=loss_cfg.non_target_max, index=index)
        inputs = objective.classifier_inputs(images, labels, split, draws)
        logits = _classifier_logits(classifier, inputs.batches, channels_last)
        loss, terms = objective.loss(labels, split, logits, inputs)
    _check_terms(objective, terms)
    return StepOutput(loss=loss, terms=terms, mask_logits=out.logits.detach(), m=split.m,
                      logits_masked=logits[MASKED].detach(), size=out.size)


def _pinned(tensors: tuple[Tensor, Tensor], device: torch.device) -> tuple[Tensor, Tensor]:
    """CPU tensors ready for a copy to `device` that does not wait for the device (pinned memory on CUDA)."""
    if device.type == "cuda":
        return tuple(t.pin_memory() for t in tensors)  # type: ignore[return-value]
    return tensors


def _classifier_logits(classifier: nn.Module, batches: dict[str, Tensor], channels_last: bool) -> dict[str, Tensor]:
    """F's fp32 logits on every declared batch from ONE call on their concatenation (one batched pass: gradients
    reach the masks, not F's weights), sliced back by name."""
    if MASKED not in batches:
        raise ValueError(f"an objective must declare the {MASKED!r} classifier input (F(x_m): the step's "
                         f"logits_masked and the metrics); it declared {list(batches)}")
    fused = torch.cat(list(batches.values()))
    if channels_last:
        fused = fused.contiguous(memory_format=torch.channels_last)
    logits = full_precision(classifier(fused))
    sliced, start = {}, 0
    for name, batch in batches.items():
        sliced[name] = logits[start:start + batch.shape[0]]
        start += batch.shape[0]
    return sliced


def _check_terms(objective: Objective, terms: dict[str, Tensor]) -> None:
    """The logged keys must be the declared ones: every rank reduces the same keys, and validation sums them."""
    if set(terms) != {"loss", *objective.terms}:
        raise ValueError(f"{type(objective).__name__} returned the terms {sorted(terms)} but declares "
                         f"{list(objective.terms)} (plus 'loss')")


# ----------------------------------------------------------------------------------------------------------------------
# The paper code's structure, same maths (benchmark baseline and equivalence test only)
# ----------------------------------------------------------------------------------------------------------------------

_RIGHT = torch.tensor([[0.0, 0.0, 0.0], [0.0, 1.0, -1.0], [0.0, 0.0, 0.0]]).view(1, 1, 3, 3)
_DOWN = torch.tensor([[0.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, -1.0, 0.0]]).view(1, 1, 3, 3)


_FILTERS: dict[tuple[torch.device, torch.dtype], tuple[Tensor, Tensor]] = {}


def _reference_tv(mask: Tensor) -> Tensor:
    """Two 3x3 difference convolutions on the reflection-padded mask, as the reference's TotalVariationConv (whose
    filters lived on the device as module weights: cached here likewise)."""
    key = (mask.device, mask.dtype)
    if key not in _FILTERS:
        _FILTERS[key] = (_RIGHT.to(mask), _DOWN.to(mask))
    right_filter, down_filter = _FILTERS[key]
    padded = F.pad(mask.unsqueeze(1), (1, 1, 1, 1), mode="reflect")
    right = F.conv2d(padded, right_filter).abs()
    down = F.conv2d(padded, down_filter).abs()
    return (right + down).mean()


def _reference_masks(segmentations: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Per-image loop: max of the class logits, then sigmoid (an image without classes gets 0, not a crash)."""
    batch, _, h, w = segmentations.shape
    target_masks, non_target_masks = [], []
    for i in range(batch):
        present = segmentations[i][targets[i].eq(1.0)]
        absent = segmentations[i][targets[i].eq(0.0)]
        zero = segmentations.new_zeros(h, w)
        target_masks.append(present.amax(dim=0).sigmoid() if present.shape[0] else zero)
        non_target_masks.append(absent.amax(dim=0).sigmoid() if absent.shape[0] else zero)
    return torch.stack(target_masks), torch.stack(non_target_masks)


def _reference_bound(segmentations: Tensor, targets: Tensor, cfg: LossConfig) -> Tensor:
    """Per-image, per-class loop with one sort per mask, as the reference's ClassMaskAreaLoss."""
    masks = segmentations.sigmoid()
    batch, _, h, w = masks.shape
    z = h * w
    k_min, k_max = area_counts(z, cfg.area_min, cfg.area_max)
    ones_min = torch.cat([masks.new_ones(k_min), masks.new_zeros(z - k_min)])
    ones_max = torch.cat([masks.new_ones(k_max), masks.new_zeros(z - k_max)])
    losses = []
    for i in range(batch):
        class_masks = masks[i][targets[i].eq(1.0)]
        loss_i = masks.new_zeros(())
        for j in range(class_masks.shape[0]):
            q = class_masks[j].flatten().sort(descending=True).values
            loss_i = loss_i + (F.relu(ones_min - q) + F.relu(q - ones_max)).mean()
        if cfg.bound_reduction == "mean" and class_masks.shape[0] > 0:
            loss_i = loss_i / class_masks.shape[0]
        losses.append(loss_i)
    return torch.stack(losses).mean()


def reference_forward_loss(
    explainer: nn.Module, classifier: nn.Module, images: Tensor, labels: Tensor, loss_cfg: LossConfig
) -> StepOutput:
    """The paper code's step with its structure (fp32, two classifier passes, Python loops) and our fixes (frozen
    eval classifier, images without classes allowed). Only the WYSIWYC loss."""
    if loss_cfg.kind != "wysiwyc" or loss_cfg.w_class_specific > 0:
        raise ValueError("reference_forward_loss reproduces the reference WYSIWYC loss only (w_class_specific = 0)")
    _check_frozen(classifier)
    targets = labels.to(device=images.device, dtype=images.dtype)
    segmentations = class_logits(explainer(images), images.shape[-2:]).full()  # every class at full resolution
    target_mask, non_target_mask = _reference_masks(segmentations, targets)
    masked_image = target_mask.unsqueeze(1) * images
    inversed_masked_image = (1 - target_mask).unsqueeze(1) * images
    logits_mask = classifier(masked_image)
    logits_inversed_mask = classifier(inversed_masked_image)

    l_c = F.binary_cross_entropy_with_logits(logits_mask, targets)
    probs = F.softmax(logits_inversed_mask, dim=-1).clamp(min=1e-16)
    l_e = -(-probs * probs.log()).mean()
    tv_m, tv_n = _reference_tv(target_mask), _reference_tv(non_target_mask)
    bound = _reference_bound(segmentations, targets, loss_cfg)
    area_m, area_n = target_mask.mean(), non_target_mask.mean()
    loss, terms = combine_terms(loss_cfg, classification=l_c, entropy=l_e, tv_m=tv_m, tv_n=tv_n, bound=bound,
                                area_m=area_m, area_n=area_n)
    return StepOutput(
        loss=loss,
        terms=terms,
        mask_logits=segmentations.detach(),
        m=target_mask.unsqueeze(1),
        logits_masked=logits_mask.detach(),
    )


__all__ = ["StepOutput", "explainer_forward_loss", "reference_forward_loss"]
