"""The Explainer's training objective (docs/method.md#objective) and the RTIS baseline objective
(docs/method.md#rtis-objective), vectorised.

Every term is a pure function returning one value per image ([B]) so tests can pin it by hand; the combined losses
average over the batch. No Python loops over images, and shapes that depend on the batch's labels only through K,
the largest number of ground-truth classes of an image: the class-wise work (the area bound's sort, m) runs on the K
gathered ground-truth masks per image, not on all C classes (docs/method.md#class-sparse).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from explainer.config import LossConfig
from explainer.models.explainer import upsample

ENTROPY_MIN_PROB = 1e-16  # reference clamp before the log


def full_precision(t: Tensor) -> Tensor:
    """fp16/bf16 (autocast outputs) -> fp32; fp32/fp64 unchanged, so tests can run the loss in float64."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _as_bool(labels: Tensor) -> Tensor:
    return labels > 0.5 if labels.dtype != torch.bool else labels


def aggregate_masks(masks: Tensor, labels: Tensor, max_classes: int | None = None) -> tuple[Tensor, Tensor]:
    """m = pixel-wise max of s_c over the image's classes, n = max over the others; 0 where the set is empty.

    masks: S = sigmoid(E(x)) [B,C,H,W]; labels: multi-hot [B,C]. Returns m, n of shape [B,1,H,W].
    """
    split = split_classes(masks, labels, max_classes)
    return split.m, split.n


CLASS_CHUNK = 64  # classes per slice in the absent-class max: bounds its temporaries to B x 64 x H x W


def present_classes(labels: Tensor, max_classes: int | None = None) -> tuple[Tensor, Tensor]:
    """Each image's ground-truth classes as fixed-shape [B,K] indices (ascending) and a [B,K] validity mask.

    K = `max_classes` (loss.max_classes_per_image) or, when None, the batch's largest class count: reading it is
    the one host read of the class-sparse loss (free for CPU labels; a small device-to-host copy otherwise).
    Padding slots (an image with fewer than K classes) point at absent classes and are invalid.
    """
    present = _as_bool(labels)
    batch, classes = present.shape
    count = present.sum(dim=1)
    if max_classes is None:
        k = int(count.max()) if batch else 0
    else:
        if max_classes < 1:
            raise ValueError(f"loss.max_classes_per_image must be >= 1 or null, got {max_classes}")
        over = (count > max_classes).nonzero().flatten().tolist()
        if over:
            raise ValueError(
                f"loss.max_classes_per_image is {max_classes}, but image(s) {over} of this batch have "
                f"{count[over].tolist()} ground-truth classes: raise the cap or set it to null (the batch's maximum)"
            )
        k = max_classes
    k = min(k, classes)
    # distinct positive keys for present classes, decreasing with the index; 0 for absent ones
    key = present.to(torch.int64) * torch.arange(classes, 0, -1, device=present.device)
    values, index = key.topk(k, dim=1)
    return index, values > 0


@dataclass
class ClassSplit:
    """The ground-truth classes' masks of each image, gathered with a fixed shape, and the aggregates m and n."""

    present: Tensor  # [B,K,H,W] masks s_c of the image's classes (padding slots hold an absent class: see valid)
    valid: Tensor  # [B,K] bool
    index: Tensor  # [B,K] class indices
    m: Tensor  # [B,1,H,W]
    n: Tensor  # [B,1,H,W]

    def select(self, one_hot: Tensor) -> Tensor:
        """sum_c one_hot[:, c] s_c over the image's classes ([B,1,H,W]): s_k of a drawn class k."""
        weights = torch.where(self.valid, one_hot.gather(1, self.index).to(self.present.dtype), 0.0)
        return (self.present * weights[:, :, None, None]).sum(dim=1, keepdim=True)


class _GatherAndAbsentMax(torch.autograd.Function):
    """(maps of the listed classes [B,K,H,W], max over the absent classes [B,1,H,W]) with ONE dense gradient.

    Nothing of shape [B,C,H,W] is made in forward, and backward makes only the gradient itself: the max runs over
    slices of CLASS_CHUNK classes, and its gradient goes, as torch.amax's does, in equal shares to every absent class
    that attains the max (the tie rule the zero-head start relies on, docs/method.md#class-sparse).
    """

    @staticmethod
    def forward(ctx, maps: Tensor, index: Tensor, valid: Tensor, absent: Tensor) -> tuple[Tensor, Tensor]:
        h, w = maps.shape[-2:]
        gathered = maps.gather(1, index[:, :, None, None].expand(-1, -1, h, w))
        out, buffer = None, None
        lowest = torch.full((), -math.inf, dtype=maps.dtype, device=maps.device)
        for start in range(0, maps.shape[1], CLASS_CHUNK):
            part = maps[:, start:start + CLASS_CHUNK]
            # one reused buffer: a fresh tensor per slice costs more in page faults than the max itself
            buffer = torch.empty_like(part) if buffer is None else buffer[:, :part.shape[1]]
            torch.where(absent[:, start:start + CLASS_CHUNK, None, None], part, lowest, out=buffer)
            part = buffer.amax(dim=1, keepdim=True)
            out = part if out is None else torch.maximum(out, part)
        ctx.save_for_backward(maps, index, valid, out)
        return gathered, out

    @staticmethod
    def backward(ctx, grad_gathered: Tensor, grad_out: Tensor):
        maps, index, valid, out = ctx.saved_tensors
        h, w = maps.shape[-2:]
        chunks = [slice(start, start + CLASS_CHUNK) for start in range(0, maps.shape[1], CLASS_CHUNK)]
        idx = index[:, :, None, None].expand(-1, -1, h, w)
        # 1 where a class attains the max, written straight into the gradient's storage; counted over all classes
        # (no [B,C,H,W] mask of the absent ones), less the present classes that tie with it
        grad = torch.empty_like(maps)
        count = -((maps.gather(1, idx) == out) & valid[:, :, None, None]).sum(dim=1, keepdim=True, dtype=torch.float32)
        for part in chunks:
            torch.eq(maps[:, part], out, out=grad[:, part])
            count += grad[:, part].sum(dim=1, keepdim=True)  # <= CLASS_CHUNK: exact in bf16/fp16 too
        # the indicator is 0 or 1: rounding the share to the gradient's dtype first rounds each product the same way
        grad.mul_((grad_out / count.clamp(min=1)).to(grad.dtype))
        # a present class gets none of n's gradient, only its own: overwrite it (padding slots keep what they hold)
        own = torch.where(valid[:, :, None, None], grad_gathered.to(grad.dtype), grad.gather(1, idx))
        if grad.element_size() == 2:  # CPU scatter_ converts a whole bf16/fp16 tensor: move the same bits as int16
            grad.view(torch.int16).scatter_(1, idx, own.view(torch.int16))
        else:
            grad.scatter_(1, idx, own)
        return grad, None, None, None


class _UpsampledAbsentMax(torch.autograd.Function):
    """max over the absent classes of the UPSAMPLED logits ([B,1,H,W]) from head-resolution logits [B,C,h,w], exact,
    without ever holding C full-resolution maps (docs/method.md#head-resolution).

    Forward upsamples CLASS_CHUNK classes at a time and keeps the running max and how many classes attain it;
    backward upsamples each slice again, sends grad / count to every absent class attaining the max (torch.amax's tie
    rule, as the dense form) and brings it back to the head's resolution with the upsampling's adjoint. Upsampling
    keeps the logits' dtype, as torchvision's own upsampling under autocast does: the dense form's numbers."""

    @staticmethod
    def forward(ctx, maps: Tensor, absent: Tensor, size: tuple[int, int]) -> Tensor:
        out = count = None
        lowest = torch.full((), -math.inf, dtype=maps.dtype, device=maps.device)
        for start in range(0, maps.shape[1], CLASS_CHUNK):  # (autocast leaves interpolate's dtype as it is)
            up = _upsample_slice(maps, start, size)
            up = torch.where(absent[:, start:start + CLASS_CHUNK, None, None], up, lowest)
            part = up.amax(dim=1, keepdim=True)
            ties = (up == part).sum(dim=1, keepdim=True, dtype=torch.float32)
            if out is None:
                out, count = part, ties
                continue
            new = torch.maximum(out, part)
            count = torch.where(out == new, count, 0.0) + torch.where(part == new, ties, 0.0)
            out = new
        ctx.size = size
        ctx.save_for_backward(maps, absent, out, count)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        maps, absent, out, count = ctx.saved_tensors
        share = (grad_out / count.clamp(min=1)).to(maps.dtype)
        grad = torch.empty_like(maps)
        h, w = maps.shape[-2:]
        for start in range(0, maps.shape[1], CLASS_CHUNK):
            up = _upsample_slice(maps, start, ctx.size)
            hit = (up == out) & absent[:, start:start + CLASS_CHUNK, None, None]
            grad_up = torch.where(hit, share, 0.0)
            grad[:, start:start + CLASS_CHUNK] = torch.ops.aten.upsample_bilinear2d_backward(
                grad_up, list(ctx.size), [up.shape[0], up.shape[1], h, w], False, None, None)
        return grad, None, None


def _upsample_slice(maps: Tensor, start: int, size: tuple[int, int]) -> Tensor:
    return upsample(maps[:, start:start + CLASS_CHUNK], size)


NON_TARGET_MAX = ("exact", "head")


def split_classes(maps: Tensor, labels: Tensor, max_classes: int | None = None, *, logits: bool = False,
                  size: tuple[int, int] | None = None, non_target: str = "exact",
                  index: tuple[Tensor, Tensor] | None = None) -> ClassSplit:
    """m, n and the gathered ground-truth masks from masks S [B,C,H,W], or from the explainer's logits E(x) when
    `logits` (then S is never materialised: only the K gathered masks and n are, in fp32 for bf16/fp16 logits).

    From logits, n = sigmoid(max over the absent logits): the same value as the max of their masks (sigmoid is
    monotonic); ties are those of the logits (two different logits whose fp32 sigmoids round to the same value, in
    the saturated tails, would share the dense form's gradient, itself below 1e-7 there).

    `size`: the full resolution when `maps` are head-resolution logits (ClassLogits); only the K gathered classes are
    upsampled, and n is the max of the upsampled absent logits (`non_target="exact"`, streamed) or the upsampled max
    of the head-resolution ones ("head", an upper bound of it: docs/method.md#head-resolution). `index`: the
    (indices, validity) of present_classes, when the caller computed them (from CPU labels: no host sync)."""
    if non_target not in NON_TARGET_MAX:
        raise ValueError(f"loss.non_target_max must be one of {', '.join(NON_TARGET_MAX)}, got {non_target!r}")
    target = _as_bool(labels).to(maps.device)
    if index is None:
        index, valid = present_classes(target, max_classes)
    else:
        index, valid = (t.to(maps.device, non_blocking=True) for t in index)
    full = size if size is not None and tuple(size) != tuple(maps.shape[-2:]) else None
    if full is None or non_target == "head":
        gathered, n = _GatherAndAbsentMax.apply(maps, index, valid, ~target)
        if full is not None:
            gathered, n = upsample(gathered, full), upsample(n, full)
    else:
        h, w = maps.shape[-2:]
        gathered = upsample(maps.gather(1, index[:, :, None, None].expand(-1, -1, h, w)), full)
        n = _UpsampledAbsentMax.apply(maps, ~target, tuple(full))
    present = torch.sigmoid(full_precision(gathered)) if logits else gathered
    n = torch.sigmoid(full_precision(n)) if logits else n
    batch = maps.shape[0]
    h, w = present.shape[-2:]
    if present.shape[1]:
        # -1 is below any sigmoid value, so a padding slot never wins (Python scalars: no host->device copy)
        m = torch.where(valid[:, :, None, None], present, -1.0).amax(dim=1, keepdim=True)
        m = torch.where(valid.any(dim=1)[:, None, None, None], m, 0.0)
    else:  # no image of the batch has a class
        m = present.new_zeros(batch, 1, h, w)
    n = torch.where((~target).any(dim=1)[:, None, None, None], n, 0.0).to(present.dtype)
    return ClassSplit(present=present, valid=valid, index=index, m=m, n=n)


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
    masks: Tensor, labels: Tensor, a: float = 0.05, b: float = 0.30, reduction: Literal["sum", "mean"] = "sum",
    *, split: ClassSplit | None = None,
) -> Tensor:
    """B_img per image: the bound B(s_c) combined over the image's ground-truth classes (sum or mean). -> [B]

    B(s_c) = (1/Z) sum_i relu(q_min[i] - q[i]) + relu(q[i] - q_max[i]) with q = s_c sorted descending, q_min / q_max
    = 1 on the first floor(Z*a) / floor(Z*b) entries. Images with no class give 0. Only the K gathered ground-truth
    masks per image are sorted (`split`, else gathered here from `masks`), never the absent classes'.
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"bound reduction must be 'sum' or 'mean', got {reduction!r}")
    if split is None:
        target = _as_bool(labels).to(masks.device)
        index, valid = present_classes(target)
        h, w = masks.shape[-2:]
        present = masks.gather(1, index[:, :, None, None].expand(-1, -1, h, w))
    else:
        present, valid = split.present, split.valid
    batch, k, h, w = present.shape
    z = h * w
    k_min, k_max = area_counts(z, a, b)
    q = present.reshape(batch, k, z).sort(dim=2, descending=True).values
    position = torch.arange(z, device=q.device)
    q_min = (position < k_min).to(q.dtype)
    q_max = (position < k_max).to(q.dtype)
    per_class = (F.relu(q_min - q) + F.relu(q - q_max)).sum(dim=2) / z  # [B, K]
    # torch.where, not a product: a padding slot contributes an exact 0 (also to the gradient) whatever it holds
    per_image = torch.where(valid, per_class, 0.0).sum(dim=1)
    if reduction == "mean":
        per_image = per_image / valid.sum(dim=1).clamp(min=1).to(per_image.dtype)
    return per_image


def wysiwyc_loss(
    masks: Tensor | None,
    labels: Tensor,
    logits_masked: Tensor,
    logits_inv: Tensor,
    cfg: LossConfig,
    *,
    m: Tensor | None = None,
    n: Tensor | None = None,
    logits_single: Tensor | None = None,
    drawn: Tensor | None = None,
    split: ClassSplit | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """L = L_c + l_e L_e + l_tv (TV(m)+TV(n)) + w_B B + w_m A(m) + w_n A(n) [+ w_s L_s], each averaged over the batch.

    `split` (split_classes) may be passed when the caller already aggregated; then `masks` may be None. L_s
    (cfg.w_class_specific > 0) needs `logits_single` = F(x * s_k) and `drawn` = the one-hot drawn class k per image
    (WysiwycObjective, explainer/objectives.py). Returns the total and the unweighted terms (detached) for logging.
    """
    if split is None:
        if masks is None:
            raise ValueError("wysiwyc_loss needs the masks or their split_classes()")
        split = split_classes(masks, labels, cfg.max_classes_per_image)
    if m is None or n is None:
        m, n = split.m, split.n
    l_c = classification_loss(logits_masked, labels, cfg.classification).mean()
    l_e = negative_entropy(logits_inv).mean()
    tv_m = total_variation(m).mean()
    tv_n = total_variation(n).mean()
    bound = area_bound(masks, labels, cfg.area_min, cfg.area_max, cfg.bound_reduction, split=split).mean()
    area_m = area(m).mean()
    area_n = area(n).mean()
    optional: dict[str, Tensor] = {}
    if cfg.w_class_specific > 0:
        if logits_single is None or drawn is None:
            raise ValueError("loss.w_class_specific > 0 needs F(x * s_k) and the drawn classes (logits_single, drawn)")
        optional["class_specific"] = class_specific_loss(logits_single, drawn).mean()
    return combine_terms(cfg, classification=l_c, entropy=l_e, tv_m=tv_m, tv_n=tv_n, bound=bound, area_m=area_m,
                         area_n=area_n, **optional)


# Dense forms (every class of every image; before docs/method.md#class-sparse): the oracle the tests pin the
# class-sparse ones against, in float64.


def _dense_aggregate_masks(masks: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """aggregate_masks over all C classes: two [B,C,H,W] torch.where copies and torch.amax's tie rule."""
    target = _as_bool(labels)[:, :, None, None]
    m = torch.where(target, masks, -1.0).amax(dim=1, keepdim=True)
    n = torch.where(target, -1.0, masks).amax(dim=1, keepdim=True)
    return torch.where(target.any(dim=1, keepdim=True), m, 0.0), torch.where((~target).any(dim=1, keepdim=True), n, 0.0)


def _dense_area_bound(masks: Tensor, labels: Tensor, a: float, b: float, reduction: str) -> Tensor:
    """area_bound sorting all B x C masks and letting the labels pick the ground-truth ones."""
    batch, classes, h, w = masks.shape
    z = h * w
    k_min, k_max = area_counts(z, a, b)
    target = _as_bool(labels)
    q = masks.reshape(batch, classes, z).sort(dim=2, descending=True).values
    position = torch.arange(z, device=masks.device)
    per_class = (F.relu((position < k_min).to(q.dtype) - q) + F.relu(q - (position < k_max).to(q.dtype))).sum(2) / z
    per_image = torch.where(target, per_class, 0.0).sum(dim=1)
    if reduction == "mean":
        per_image = per_image / target.sum(dim=1).clamp(min=1).to(per_image.dtype)
    return per_image


WYSIWYC_TERMS = ("classification", "entropy", "tv_m", "tv_n", "bound", "area_m", "area_n")
RTIS_TERMS = ("tv", "area_m", "preserver", "destroyer")


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
    masks: Tensor | None,
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
        if masks is None:
            raise ValueError("rtis_loss needs the masks or m")
        m, _ = aggregate_masks(masks, labels, cfg.max_classes_per_image)
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
