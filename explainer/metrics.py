"""Evaluation metrics of the paper (SPEC 6): segmentation scores, class-specific masking, classification P/R/F1.

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
