"""The Explainer's training objective (docs/method.md#objective) and the RTIS baseline objective
(docs/method.md#rtis-objective), vectorised.

Every term is a pure function returning one value per image ([B]) so tests can pin it by hand; the combined losses
average over the batch. No Python loops over images or classes, and no data-dependent shapes: the per-class area
bound sorts every class mask of the batch at once and lets the labels pick the ground-truth ones.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from explainer.config import LossConfig

ENTROPY_MIN_PROB = 1e-16  # reference clamp before the log


def full_precision(t: Tensor) -> Tensor:
    """fp16/bf16 (autocast outputs) -> fp32; fp32/fp64 unchanged, so tests can run the loss in float64."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _as_bool(labels: Tensor) -> Tensor:
    return labels > 0.5 if labels.dtype != torch.bool else labels


def aggregate_masks(masks: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """m = pixel-wise max of s_c over the image's classes, n = max over the others; 0 where the set is empty.

    masks: S = sigmoid(E(x)) [B,C,H,W]; labels: multi-hot [B,C]. Returns m, n of shape [B,1,H,W].
    """
    target = _as_bool(labels)[:, :, None, None]
    # -1 is below any sigmoid value, so it never wins where a class is present (Python scalars: no host->device copy)
    m = torch.where(target, masks, -1.0).amax(dim=1, keepdim=True)
    n = torch.where(target, -1.0, masks).amax(dim=1, keepdim=True)
    has_t = target.any(dim=1, keepdim=True)
    has_n = (~target).any(dim=1, keepdim=True)
    return torch.where(has_t, m, 0.0), torch.where(has_n, n, 0.0)


def draw_class(labels: Tensor, draws: Tensor) -> Tensor:
    """One ground-truth class per image as a one-hot [B,C] (all-zero: an image without classes).

    draws: one uniform number in [0, 1) per image ([B]); the image's classes in index order, the
    floor(u * count)-th is drawn. Fixed shapes, no RNG of its own: the loader supplies u per sample
    (batch["draw"]), so the draw does not depend on how the batch is split over processes.
    """
    present = _as_bool(labels)
    count = present.sum(dim=1, keepdim=True)
    position = (draws.reshape(-1, 1) * count).floor().clamp(max=count - 1)  # 0-based rank among the classes
    chosen = present & (present.cumsum(dim=1) == position + 1)
    return chosen.to(draws.dtype if draws.is_floating_point() else torch.float32)


def drawn_class_mask(masks: Tensor, drawn: Tensor) -> Tensor:
    """s_k of each image's drawn class k ([B,1,H,W]; 0 for an image without classes): what F sees in L_s."""
    return (masks * drawn[:, :, None, None].to(masks.dtype)).sum(dim=1, keepdim=True)


def class_specific_loss(logits: Tensor, drawn: Tensor) -> Tensor:
    """L_s per image (ours, docs/method.md#class-specific-term): BCE-with-logits between F(x * s_k) and the one-hot
    label of the drawn class k, mean over the C classes; 0 for an image without classes. -> [B]"""
    logits = full_precision(logits)
    drawn = drawn.to(logits.dtype)
    per_image = F.binary_cross_entropy_with_logits(logits, drawn, reduction="none").mean(dim=1)
    return per_image * drawn.sum(dim=1)


def classification_loss(logits: Tensor, labels: Tensor, kind: Literal["bce", "ce"] = "bce") -> Tensor:
    """L_c per image. -> [B]

    bce (reference, paper eq. 2): BCE-with-logits against the multi-hot labels, mean over the C classes.
    ce (our extension, for single-label softmax classifiers): cross entropy of softmax(logits) with the image's
    class, -log p_y; an image with several classes gets the cross entropy with the uniform distribution over them,
    an image with none gets 0.
    """
    logits = full_precision(logits)
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction="none").mean(dim=1)
    if kind == "ce":
        target = labels.to(logits.dtype)
        target = target / target.sum(dim=1, keepdim=True).clamp(min=1)
        return -(target * F.log_softmax(logits, dim=1)).sum(dim=1)
    raise ValueError(f"loss.classification must be 'bce' or 'ce', got {kind!r}")


def negative_entropy(logits: Tensor) -> Tensor:
    """L_e per image: (1/C) sum_c p_c log p_c, p = softmax over classes clamped >= 1e-16. -> [B]"""
    p = F.softmax(full_precision(logits), dim=-1).clamp(min=ENTROPY_MIN_PROB)
    return (p * p.log()).mean(dim=-1)


def area(mask: Tensor) -> Tensor:
    """A(mask) = mean over the pixels of each image. -> [B]"""
    return mask.flatten(1).mean(dim=1)


def _neighbour_differences(mask: Tensor) -> tuple[Tensor, Tensor]:
    """x[i,j]-x[i,j+1] and x[i,j]-x[i+1,j] on a reflection-padded image (the last column/row meets the one before).

    Returns the (H x (W-1)) / ((H-1) x W) interior differences plus the duplicated last column / row, so callers can
    sum them without materialising the padded image.
    """
    if mask.shape[-1] < 2 or mask.shape[-2] < 2:
        raise ValueError(f"total variation needs masks of at least 2x2 pixels, got {tuple(mask.shape[-2:])}")
    right = mask[..., :, :-1] - mask[..., :, 1:]
    down = mask[..., :-1, :] - mask[..., 1:, :]
    return right, down


def total_variation(mask: Tensor, power: int = 1) -> Tensor:
    """TV = (1/Z) sum_ij |x[i,j]-x[i+1,j]|^p + |x[i,j]-x[i,j+1]|^p with reflection padding (p=1:
    docs/method.md#total-variation). -> [B]

    With reflection the padded column W equals column W-2, so the last column contributes |x[:,W-1]-x[:,W-2]| once
    more; the same holds for the last row.
    """
    right, down = _neighbour_differences(mask)
    right = right.abs() if power == 1 else right.abs().pow(power)
    down = down.abs() if power == 1 else down.abs().pow(power)
    z = mask.shape[-1] * mask.shape[-2]
    total = right.flatten(1).sum(1) + right[..., -1].flatten(1).sum(1) + down.flatten(1).sum(1)
    total = total + down[..., -1, :].flatten(1).sum(1)
    return total / z


def area_counts(z: int, a: float, b: float) -> tuple[int, int]:
    """floor(Z*a), floor(Z*b): how many of the sorted pixels the bounds want on (robust to 0.29*100 = 28.99..)."""
    if not 0.0 <= a <= b <= 1.0:
        raise ValueError(f"area bounds must satisfy 0 <= a <= b <= 1, got a={a}, b={b}")
    return math.floor(z * a + 1e-9), math.floor(z * b + 1e-9)


def area_bound(
    masks: Tensor, labels: Tensor, a: float = 0.05, b: float = 0.30, reduction: Literal["sum", "mean"] = "sum"
) -> Tensor:
    """B_img per image: the bound B(s_c) combined over the image's ground-truth classes (sum or mean). -> [B]

    B(s_c) = (1/Z) sum_i relu(q_min[i] - q[i]) + relu(q[i] - q_max[i]) with q = s_c sorted descending, q_min / q_max
    = 1 on the first floor(Z*a) / floor(Z*b) entries. Images with no class give 0.
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"bound reduction must be 'sum' or 'mean', got {reduction!r}")
    batch, classes, h, w = masks.shape
    z = h * w
    k_min, k_max = area_counts(z, a, b)
    target = _as_bool(labels).to(masks.device)
    # Fixed shapes (no nonzero / boolean indexing, so no host sync and compile-friendly): every B x C mask is
    # sorted and bounded, and the labels select which ones count. torch.where, not a product, so an absent
    # class contributes an exact 0 (also to the gradient) whatever its mask holds.
    q = masks.reshape(batch, classes, z).sort(dim=2, descending=True).values
    position = torch.arange(z, device=masks.device)
    q_min = (position < k_min).to(q.dtype)
    q_max = (position < k_max).to(q.dtype)
    per_class = (F.relu(q_min - q) + F.relu(q - q_max)).sum(dim=2) / z  # [B, C]
    per_image = torch.where(target, per_class, 0.0).sum(dim=1)
    if reduction == "mean":
        per_image = per_image / target.sum(dim=1).clamp(min=1).to(per_image.dtype)
    return per_image


def wysiwyc_loss(
    masks: Tensor,
    labels: Tensor,
    logits_masked: Tensor,
    logits_inv: Tensor,
    cfg: LossConfig,
    *,
    m: Tensor | None = None,
    n: Tensor | None = None,
    logits_single: Tensor | None = None,
    drawn: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """L = L_c + l_e L_e + l_tv (TV(m)+TV(n)) + w_B B + w_m A(m) + w_n A(n) [+ w_s L_s], each averaged over the batch.

    `m`, `n` may be passed when the caller already aggregated them. L_s (cfg.w_class_specific > 0) needs
    `logits_single` = F(x * s_k) and `drawn` = the one-hot drawn class k per image (explainer/step.py). Returns the
    total and the unweighted terms (detached) for logging.
    """
    if m is None or n is None:
        m, n = aggregate_masks(masks, labels)
    l_c = classification_loss(logits_masked, labels, cfg.classification).mean()
    l_e = negative_entropy(logits_inv).mean()
    tv_m = total_variation(m).mean()
    tv_n = total_variation(n).mean()
    bound = area_bound(masks, labels, cfg.area_min, cfg.area_max, cfg.bound_reduction).mean()
    area_m = area(m).mean()
    area_n = area(n).mean()
    optional: dict[str, Tensor] = {}
    if cfg.w_class_specific > 0:
        if logits_single is None or drawn is None:
            raise ValueError("loss.w_class_specific > 0 needs F(x * s_k) and the drawn classes (logits_single, drawn)")
        optional["class_specific"] = class_specific_loss(logits_single, drawn).mean()
    return combine_terms(cfg, classification=l_c, entropy=l_e, tv_m=tv_m, tv_n=tv_n, bound=bound, area_m=area_m,
                         area_n=area_n, **optional)


WYSIWYC_TERMS = ("classification", "entropy", "tv_m", "tv_n", "bound", "area_m", "area_n")
RTIS_TERMS = ("tv", "area_m", "preserver", "destroyer")


def loss_terms(cfg: LossConfig) -> tuple[str, ...]:
    """The terms a config's objective logs (wysiwyc_loss / rtis_loss): fixed per run, so every rank reduces the same
    keys."""
    if cfg.kind == "rtis":
        return RTIS_TERMS
    return (*WYSIWYC_TERMS, "class_specific") if cfg.w_class_specific > 0 else WYSIWYC_TERMS


def combine_terms(cfg: LossConfig, **terms: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """The weighted total of the batch-averaged terms, and the terms (detached, "loss" included) for logging."""
    total = (
        terms["classification"]
        + cfg.lambda_e * terms["entropy"]
        + cfg.lambda_tv * (terms["tv_m"] + terms["tv_n"])
        + cfg.w_bound * terms["bound"]
        + cfg.w_m * terms["area_m"]
        + cfg.w_n * terms["area_n"]
    )
    if "class_specific" in terms:
        total = total + cfg.w_class_specific * terms["class_specific"]
    return total, {"loss": total.detach(), **{k: v.detach() for k, v in terms.items()}}


# ----------------------------------------------------------------------------------------------------------------------
# RTIS: Dabkowski and Gal (2017), "Real Time Image Saliency for Black Box Classifiers", multi-label as in the reference
# ----------------------------------------------------------------------------------------------------------------------

RTIS_BLUR_SIGMA = 10.0  # pixels, as in Dabkowski and Gal's code (TorchRay-style Gaussian, zero padding)


def gaussian_blur(images: Tensor, sigma: float = RTIS_BLUR_SIGMA) -> Tensor:
    """Separable Gaussian blur, kernel radius ceil(4 sigma), zero padding (= the mean colour on normalised images)."""
    radius = math.ceil(4 * sigma)
    x = torch.arange(-radius, radius + 1, device=images.device, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(images.dtype)
    channels = images.shape[1]
    vertical = kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1)
    horizontal = kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1)
    out = F.conv2d(images, vertical, padding=(radius, 0), groups=channels)
    return F.conv2d(out, horizontal, padding=(0, radius), groups=channels)


def alternative_image(
    images: Tensor, kind: Literal["blur", "noise"], generator: torch.Generator | None = None
) -> Tensor:
    """RTIS replacement for removed pixels: a blurred copy, or coloured noise (N(0.11, 1) + a uniform colour shift
    in [-0.33, 0.33] per image and channel, as in Dabkowski and Gal's code). No gradient flows into it."""
    images = images.detach()
    if kind == "blur":
        return gaussian_blur(images)
    if kind == "noise":
        noise = torch.randn(images.shape, generator=generator, device=images.device, dtype=images.dtype) + 0.11
        shift = torch.rand((images.shape[0], images.shape[1], 1, 1), generator=generator, device=images.device)
        return noise + (shift.to(images.dtype) - 0.5) * 0.66
    raise ValueError(f"loss.rtis_alternative must be 'blur' or 'noise', got {kind!r}")


def rtis_loss(
    masks: Tensor,
    labels: Tensor,
    logits_masked: Tensor,
    logits_inv: Tensor,
    cfg: LossConfig,
    *,
    m: Tensor | None = None,
    n: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """L = 10 TV2(m) + 1 A(m) + preserver + 5 destroyer^0.3 (weights from cfg.rtis_*).

    Here logits_masked = F(x m + alt (1-m)) and logits_inv = F(x (1-m) + alt m). Preserver = mean over the batch's
    (image, ground-truth class) pairs of -log sigmoid(logit); destroyer = the same mean of sigmoid(logit), raised to
    the power afterwards (the reference's multi-label adaptation). `n` is unused (accepted for a common signature).
    """
    del n
    if m is None:
        m, _ = aggregate_masks(masks, labels)
    target = _as_bool(labels)
    count = target.sum().clamp(min=1)
    tv = total_variation(m, power=2).mean()
    area_m = area(m).mean()
    preserver = -(F.logsigmoid(full_precision(logits_masked)) * target).sum() / count
    destroyer = (torch.sigmoid(full_precision(logits_inv)) * target).sum() / count
    total = (
        cfg.rtis_tv * tv
        + cfg.rtis_area * area_m
        + preserver
        + cfg.rtis_destroyer * destroyer.clamp(min=1e-12).pow(cfg.rtis_destroyer_power)
    )
    terms = {"loss": total, "tv": tv, "area_m": area_m, "preserver": preserver, "destroyer": destroyer}
    return total, {k: v.detach() for k, v in terms.items()}
