"""Evaluation metrics (docs/method.md#evaluation): segmentation scores, class-specific masking, classification P/R/F1,
and faithfulness (deletion / insertion AUC, pointing game) beyond the paper.

Everything here works on whole batches and returns per-image (or per-class) values; `Totals` adds them up as sums and
counts so that any number of processes can evaluate disjoint parts of the test set and combine them with one
all-reduce (every sample counted exactly once, no averaging of averages).

Difference from the reference code: VOC void pixels (label 255, the boundary band around objects) are EXCLUDED from
Acc, IoU and MAE here; the reference binarised the ground truth with `> 0` and so counted void as foreground. Void
excluded, a mask is neither rewarded nor penalised on the uncertain boundary band, so scores are not comparable
digit-for-digit with the paper's Table 2 (see tests/test_metrics.py for the size of the effect on a toy example).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

VOID = 255
SAL_MIN_AREA = 0.05  # Sal clamps the mask area from below (Dabkowski and Gal 2017)
SANITY_ROWS = ("0", "0.5", "1", "G.T.")
CLEAN_THRESHOLD = 0.0  # logit threshold on clean images (paper Table 4)
MASKED_THRESHOLD = -1.0  # logit threshold on explainer-masked images (paper Table 4)


# ----------------------------------------------------------------------------------------------------------------------
# Masks
# ----------------------------------------------------------------------------------------------------------------------


def aggregate(maps: Tensor, labels: Tensor) -> Tensor:
    """Pixel-wise max of the per-class maps [B,C,H,W] over each image's ground-truth classes -> [B,H,W].

    Maps are in [0, 1], so multiplying by the multi-hot labels and taking the max gives 0 for an image without classes.
    """
    if maps.dim() != 4 or labels.shape != maps.shape[:2]:
        raise ValueError(f"aggregate: maps {tuple(maps.shape)} and labels {tuple(labels.shape)} do not match")
    return (maps * (labels > 0).to(maps.dtype)[:, :, None, None]).amax(dim=1)


def sanity_masks(seg: Tensor) -> dict[str, Tensor]:
    """The paper's sanity rows: constant masks 0, 0.5, 1 and the ground truth itself (void pixels set to 0)."""
    fg = (seg == 1).float()
    return {
        "0": torch.zeros_like(fg),
        "0.5": torch.full_like(fg, 0.5),
        "1": torch.ones_like(fg),
        "G.T.": fg,
    }


# ----------------------------------------------------------------------------------------------------------------------
# Segmentation scores (paper Table 2)
# ----------------------------------------------------------------------------------------------------------------------


def segmentation_scores(mask: Tensor, seg: Tensor) -> dict[str, Tensor]:
    """Per-image Acc, soft IoU and MAE of a soft mask [B,H,W] against a binary ground truth [B,H,W] in {0,1,255}.

    Void pixels (255) are left out of every sum and of Z. An image whose mask and ground truth are both empty on the
    valid pixels has IoU 1 (perfect agreement) instead of 0/0. An image with no valid pixel at all is an error.
    """
    if mask.shape != seg.shape:
        raise ValueError(f"segmentation_scores: mask {tuple(mask.shape)} and seg {tuple(seg.shape)} differ")
    bad = ~((seg == 0) | (seg == 1) | (seg == VOID))
    if bool(bad.any()):
        raise ValueError(f"segmentation_scores: seg must hold 0, 1 or {VOID}; found {seg[bad].unique().tolist()}")
    m = mask.double().flatten(1)
    valid = (seg != VOID).flatten(1).double()
    g = (seg == 1).flatten(1).double()
    z = valid.sum(1)
    if bool((z == 0).any()):
        raise ValueError("segmentation_scores: an image has only void pixels")
    acc = ((m * g + (1 - m) * (1 - g)) * valid).sum(1) / z
    inter = (torch.minimum(m, g) * valid).sum(1)
    union = (torch.maximum(m, g) * valid).sum(1)
    iou = torch.where(union > 0, inter / union.clamp_min(1e-300), torch.ones_like(union))
    mae = ((m - g).abs() * valid).sum(1) / z
    return {"acc": acc, "iou": iou, "mae": mae}


@torch.no_grad()
def saliency_scores(classifier: nn.Module, images: Tensor, mask: Tensor, labels: Tensor) -> Tensor:
    """Per-image Sal = log(max(mean(m), 0.05)) - log(sum over the image's distinct GT classes of softmax(F(x*m))[c]).

    `images` are the normalised inputs (a removed pixel becomes the dataset-mean colour); the area is the mean of the
    mask over all pixels (void does not matter here: no ground truth enters Sal). Each class counts once however many
    instances it has (the reference counted VOC instances twice). Lower is better. Images without classes give +inf
    and must be filtered out by the caller.
    """
    area = mask.double().flatten(1).mean(1).clamp_min(SAL_MIN_AREA)
    probs = F.softmax(classifier(images * mask[:, None].to(images.dtype)).double(), dim=1)
    kept = (probs * (labels > 0).double()).sum(1)
    return torch.log(area) - torch.log(kept.clamp_min(1e-300))


# ----------------------------------------------------------------------------------------------------------------------
# Class-specific masking (paper Table 1)
# ----------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def class_specific_sums(
    classifier: nn.Module,
    images: Tensor,
    maps: Tensor,
    labels: Tensor,
    targets: Sequence[int],
    mask_classes: Sequence[int],
    thresholds: Sequence[float],
    chunk: int = 64,
) -> tuple[Tensor, Tensor]:
    """Sums for the class-specific masking table.

    For every image containing target class t and every mask class k, the image (normalised) is multiplied by
    (s_k > thr) for each threshold, and softmax-over-classes(F(.))[t] is averaged over the thresholds. Column
    len(mask_classes) is "none" (the unmasked image). Returns (sums [T, K+1], counts [T]); the table is sums/counts.
    """
    b, c = labels.shape
    t_idx = torch.as_tensor(list(targets), dtype=torch.long)
    k_idx = torch.as_tensor(list(mask_classes), dtype=torch.long)
    thr = torch.as_tensor(list(thresholds), dtype=maps.dtype, device=maps.device)
    sums = torch.zeros(len(t_idx), len(k_idx) + 1, dtype=torch.float64)
    counts = torch.zeros(len(t_idx), dtype=torch.float64)
    present = labels[:, t_idx].cpu() > 0  # [B, T]
    rows = present.any(1).nonzero().flatten()
    if len(rows) == 0 or len(t_idx) == 0:
        return sums, counts
    counts += present.double().sum(0)
    x = images[rows]
    kmaps = maps[rows][:, k_idx.to(maps.device)]  # [b, K, H, W]
    nb, nk, nt = len(rows), len(k_idx), len(thr)
    # (image, mask class, threshold) triples, classified `chunk` at a time so memory stays flat whatever C and T are
    ii, kk, tt = (g.flatten() for g in torch.meshgrid(
        torch.arange(nb), torch.arange(nk), torch.arange(nt), indexing="ij"))
    probs = torch.empty(nb * nk * nt, c, dtype=torch.float64)
    for start in range(0, len(ii), chunk):
        i, k, t = ii[start : start + chunk], kk[start : start + chunk], tt[start : start + chunk]
        keep = (kmaps[i, k] > thr[t.to(thr.device)][:, None, None]).to(x.dtype)
        probs[start : start + chunk] = F.softmax(classifier(x[i] * keep[:, None]).double(), dim=1).cpu()
    probs = probs.reshape(nb, nk, nt, c).mean(2)  # average over thresholds -> [b, K, C]
    clean = F.softmax(classifier(x).double(), dim=1).cpu()  # [b, C]
    sel = present[rows].double()  # [b, T]
    target_probs = probs[:, :, t_idx]  # [b, K, T]
    sums[:, : len(k_idx)] += torch.einsum("bkt,bt->tk", target_probs, sel)
    sums[:, len(k_idx)] += (clean[:, t_idx] * sel).sum(0)
    return sums, counts


# ----------------------------------------------------------------------------------------------------------------------
# Faithfulness beyond the paper: deletion / insertion AUC (Petsiuk et al. 2018), pointing game (Zhang et al. 2016)
# ----------------------------------------------------------------------------------------------------------------------

FAITHFULNESS_PROBS = ("sigmoid", "softmax")
INSERTION_BLUR_SIGMA = 5.0  # px at 224 (the RISE code's insertion start: Gaussian sigma 5, 11x11 taps), scaled
POINTING_TOLERANCE = 15.0  # px at 224 (TorchRay's pointing game), scaled
REFERENCE_SIZE = 224


def scaled(px_at_224: float, size: int) -> float:
    """A length set for 224 px inputs, at `size` px (the protocols' constants were chosen at 224)."""
    return px_at_224 * size / REFERENCE_SIZE


def insertion_start(images: Tensor, sigma: float) -> Tensor:
    """The blurred copy insertion starts from, as in the RISE code: a Gaussian of `sigma` truncated to a kernel of
    2 round(sigma) + 1 taps (11 taps, sigma 5 at 224 px), torchvision's blur with reflect padding."""
    from torchvision.transforms.functional import gaussian_blur

    if sigma <= 0:
        return images.clone()
    kernel = 2 * max(1, round(sigma)) + 1
    kernel = min(kernel, 2 * ((min(images.shape[-2:]) - 1) // 2) + 1)  # reflect padding needs kernel // 2 < size
    return gaussian_blur(images, [kernel, kernel], [sigma, sigma])


def class_probabilities(logits: Tensor, prob: str) -> Tensor:
    """sigmoid (each class on its own: a multi-label head) or softmax over classes, in float64."""
    if prob == "sigmoid":
        return torch.sigmoid(logits.double())
    if prob == "softmax":
        return F.softmax(logits.double(), dim=-1)
    raise ValueError(f"eval.faithfulness_prob must be one of {FAITHFULNESS_PROBS}, got {prob!r}")


@torch.no_grad()
def deletion_insertion_auc(
    classifier: nn.Module,
    images: Tensor,
    maps: Tensor,
    labels: Tensor,
    steps: int = 32,
    prob: str = "sigmoid",
    start: Tensor | None = None,
    chunk: int = 256,
) -> tuple[Tensor, Tensor, Tensor]:
    """Deletion and insertion AUC of every (image, ground-truth class) pair. -> (deletion [P], insertion [P], class [P])

    Pixels are ranked by the class's map, highest first (ties: row-major order, a stable sort). At step k of K the
    first round(k Z / K) of them are deleted (set to 0 = the dataset-mean colour of the normalised image) or inserted
    (copied from the image into `start`, default: a blurred copy). The class probability (`prob`) at the K+1 points
    is integrated by the trapezoid rule on [0, 1]. Lower deletion and higher insertion are better. Pairs come in
    (image, class) row-major order.
    """
    if steps < 1:
        raise ValueError(f"eval.faithfulness_steps must be >= 1, got {steps}")
    b, c, h, w = maps.shape
    z = h * w
    pairs = (labels > 0).nonzero()  # [P, 2]
    if len(pairs) == 0:
        empty = torch.zeros(0, dtype=torch.float64)
        return empty, empty, torch.zeros(0, dtype=torch.long)
    if start is None:
        start = insertion_start(images, scaled(INSERTION_BLUR_SIGMA, min(h, w)))
    order = maps[pairs[:, 0], pairs[:, 1]].reshape(len(pairs), z).float().argsort(dim=1, descending=True,
                                                                                    stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(z, device=order.device).expand_as(order))
    counts = torch.round(torch.arange(steps + 1, dtype=torch.float64) * z / steps).long().to(rank.device)
    # every (pair, step) of both curves: a pixel is "switched" when its rank < counts[step]
    jobs = [(p, k) for p in range(len(pairs)) for k in range(steps + 1)]
    curves = torch.empty(2, len(pairs), steps + 1, dtype=torch.float64)
    for first in range(0, len(jobs), chunk):
        part = torch.as_tensor(jobs[first : first + chunk], device=rank.device)
        p, k = part[:, 0], part[:, 1]
        switched = (rank[p] < counts[k][:, None]).reshape(-1, 1, h, w).to(images.dtype)
        i, cls = pairs[p, 0], pairs[p, 1]
        deleted = images[i] * (1 - switched)
        inserted = start[i] * (1 - switched) + images[i] * switched
        logits = classifier(torch.cat([deleted, inserted]))
        probs = class_probabilities(logits, prob)
        rows = torch.arange(len(p), device=probs.device)
        curves[0, p.cpu(), k.cpu()] = probs[: len(p)][rows, cls.to(probs.device)].cpu()
        curves[1, p.cpu(), k.cpu()] = probs[len(p) :][rows, cls.to(probs.device)].cpu()
    auc = (curves.sum(2) - (curves[..., 0] + curves[..., -1]) / 2) / steps  # trapezoid rule on [0, 1]
    return auc[0], auc[1], pairs[:, 1].cpu()


def pointing_hits(maps: Tensor, seg_classes: Tensor, labels: Tensor, tolerance: float) -> tuple[Tensor, Tensor]:
    """Pointing game (TorchRay's protocol) on every (image, ground-truth class) pair. -> (hit [P] bool, class [P])

    The point is the map's first maximum in row-major order (numpy/torch argmax); a hit when some pixel of the class's
    object (seg_classes == class + 1, void pixels 255 counted as the object's) lies at distance < `tolerance` (strict,
    as TorchRay's `PointingGame`). Images need a segmentation; pairs come in (image, class) row-major order.
    """
    b, c, h, w = maps.shape
    if seg_classes.shape != (b, h, w):
        raise ValueError(f"pointing game: seg {tuple(seg_classes.shape)} does not match maps {tuple(maps.shape)}")
    pairs = (labels > 0).nonzero()
    if len(pairs) == 0:
        return torch.zeros(0, dtype=torch.bool), torch.zeros(0, dtype=torch.long)
    i, cls = pairs[:, 0], pairs[:, 1]
    flat = maps[i, cls].reshape(len(pairs), -1).argmax(dim=1)
    py, px = (flat // w).double(), (flat % w).double()
    obj = (seg_classes[i] == (cls + 1)[:, None, None].to(seg_classes.dtype)) | (seg_classes[i] == VOID)
    ys = torch.arange(h, device=maps.device, dtype=torch.float64)[None, :, None]
    xs = torch.arange(w, device=maps.device, dtype=torch.float64)[None, None, :]
    near = (ys - py[:, None, None]) ** 2 + (xs - px[:, None, None]) ** 2 < tolerance**2
    return (obj & near).flatten(1).any(1).cpu(), cls.cpu()


# ----------------------------------------------------------------------------------------------------------------------
# Classification (paper Table 4)
# ----------------------------------------------------------------------------------------------------------------------


def classification_counts(logits: Tensor, labels: Tensor, threshold: float) -> Tensor:
    """Per-class true positives, false positives and false negatives at `logit >= threshold` -> [3, C] (float64)."""
    pred = logits >= threshold
    true = labels > 0
    tp = (pred & true).sum(0)
    fp = (pred & ~true).sum(0)
    fn = (~pred & true).sum(0)
    return torch.stack([tp, fp, fn]).double().cpu()


def precision_recall_f1(counts: Tensor) -> dict[str, float]:
    """Micro (pooled over classes) and macro (mean over classes with any support or prediction) P/R/F1 from [3, C]."""

    def prf(tp: Tensor, fp: Tensor, fn: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        p = torch.where(tp + fp > 0, tp / (tp + fp).clamp_min(1), torch.zeros_like(tp))
        r = torch.where(tp + fn > 0, tp / (tp + fn).clamp_min(1), torch.zeros_like(tp))
        f = torch.where(p + r > 0, 2 * p * r / (p + r).clamp_min(1e-300), torch.zeros_like(tp))
        return p, r, f

    tp, fp, fn = counts
    p, r, f = prf(tp.sum(), fp.sum(), fn.sum())
    out = {"precision": float(p), "recall": float(r), "f1": float(f)}
    used = (tp + fp + fn) > 0
    if bool(used.any()):
        pc, rc, fc = prf(tp[used], fp[used], fn[used])
        out.update(macro_precision=float(pc.mean()), macro_recall=float(rc.mean()), macro_f1=float(fc.mean()))
    else:
        out.update(macro_precision=0.0, macro_recall=0.0, macro_f1=0.0)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Distributed totals
# ----------------------------------------------------------------------------------------------------------------------


class Totals:
    """Named float64 sums (any shape) that every rank fills with its own samples and all-reduces once at the end.

    Means are sums of values divided by sums of counts, so a sample counts once whatever rank saw it. Ranks may hold
    different key sets (a rank that saw no image of some kind); `all_reduce` takes the union first.
    """

    def __init__(self) -> None:
        self.data: dict[str, Tensor] = {}

    def add(self, name: str, value: Tensor | float) -> None:
        value = torch.as_tensor(value, dtype=torch.float64).detach().cpu()
        if name in self.data:
            if self.data[name].shape != value.shape:
                raise ValueError(f"Totals.add: '{name}' has shape {tuple(self.data[name].shape)}, got "
                                 f"{tuple(value.shape)}")
            self.data[name] = self.data[name] + value
        else:
            self.data[name] = value.clone()

    def add_values(self, name: str, values: Tensor) -> None:
        """Add per-sample values: their sum under `name` and their number under `name#n`."""
        values = values.detach().double().flatten()
        if not bool(torch.isfinite(values).all()):
            raise ValueError(f"Totals.add_values: non-finite values for '{name}'")
        self.add(name, values.sum())
        self.add(f"{name}#n", float(values.numel()))

    def get(self, name: str, default: Tensor | None = None) -> Tensor:
        if name in self.data:
            return self.data[name]
        if default is None:
            raise KeyError(f"Totals: no entry '{name}'")
        return default

    def mean(self, name: str) -> float:
        n = float(self.get(f"{name}#n", torch.zeros((), dtype=torch.float64)))
        return float(self.data[name]) / n if n > 0 else math.nan

    def count(self, name: str) -> int:
        return int(float(self.get(f"{name}#n", torch.zeros((), dtype=torch.float64))))

    def names(self) -> Iterable[str]:
        return (k for k in sorted(self.data) if not k.endswith("#n"))

    def all_reduce(self) -> None:
        """Sum every entry over all ranks (no-op without an initialised process group)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        shapes = {k: tuple(v.shape) for k, v in self.data.items()}
        gathered: list[dict[str, tuple[int, ...]]] = [{} for _ in range(dist.get_world_size())]
        dist.all_gather_object(gathered, shapes)
        union: dict[str, tuple[int, ...]] = {}
        for part in gathered:
            for key, shape in part.items():
                if union.setdefault(key, shape) != shape:
                    raise ValueError(f"Totals.all_reduce: '{key}' has shapes {union[key]} and {shape} on two ranks")
        keys = sorted(union)
        flat = torch.cat([self.data.get(k, torch.zeros(union[k], dtype=torch.float64)).flatten() for k in keys])
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        flat = flat.to(device)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat = flat.cpu()
        offset = 0
        for k in keys:
            n = math.prod(union[k])
            self.data[k] = flat[offset : offset + n].reshape(union[k])
            offset += n
