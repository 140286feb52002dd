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

from explainer.data.transforms import input_to_original

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
DELETION_SUBSTRATES = ("zero", "blur")
INSERTION_BLUR_SIGMA = 5.0  # px at 224: the RISE code's insertion start, gkern(11, 5)
INSERTION_BLUR_TAPS = 11
# The RISE notebook's batch evaluation: CausalMetric(model, 'del' / 'ins', 224 * 8, ...), eight image rows' worth of
# pixels per step for deletion AND insertion (its single-image cells use 224, one row, for both)
RISE_STEP_ROWS = 8
RISE_PROTOCOL = "RISE notebook's batch evaluation (224 x 8 px per step at 224 px for deletion and insertion)"
POINTING_TOLERANCE = 15  # px in the ORIGINAL image (TorchRay's PointingGame default)
REFERENCE_SIZE = 224
TIE_ORDER = "descending map value; ties in row-major order (stable sort: the earlier pixel first)"


def scaled(px_at_224: float, size: int) -> float:
    """A length set for 224 px inputs, at `size` px (the protocols' constants were chosen at 224)."""
    return px_at_224 * size / REFERENCE_SIZE


def reflect_gaussian_kernel(taps: int, sigma: float, truncate: float = 4.0) -> Tensor:
    """RISE's gkern(taps, sigma): a taps x taps delta smoothed by scipy.ndimage.gaussian_filter (mode "reflect",
    truncate 4), float64 [taps, taps].

    scipy's filter is longer than the delta image (41 taps for sigma 5), so its tails fold back in at the borders
    (half-sample symmetric reflection): the kernel is flatter than a truncated Gaussian (centre 0.0088, corner 0.0077
    for gkern(11, 5)) and still sums to 1. Computed here without scipy; separable, so one 1-D profile suffices.
    """
    radius = int(truncate * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    weights = torch.exp(-0.5 * offsets**2 / sigma**2)
    weights /= weights.sum()
    centre = taps // 2
    profile = torch.zeros(taps, dtype=torch.float64)
    for i in range(taps):
        m = (i + offsets.long()) % (2 * taps)  # position in the periodic, mirrored extension
        m = torch.where(m >= taps, 2 * taps - 1 - m, m)
        profile[i] = weights[m == centre].sum()
    return torch.outer(profile, profile)


def blur_taps(size: int) -> tuple[int, float]:
    """(taps, sigma) of the insertion blur at `size` px: gkern(11, 5) at 224, both scaled with the image."""
    sigma = scaled(INSERTION_BLUR_SIGMA, size)
    return 2 * max(1, round(scaled(INSERTION_BLUR_TAPS // 2, size))) + 1, sigma


def insertion_start(images: Tensor, taps: int = INSERTION_BLUR_TAPS, sigma: float = INSERTION_BLUR_SIGMA) -> Tensor:
    """The blurred copy insertion starts from, as the RISE code makes it: conv2d of every channel with
    gkern(taps, sigma), ZERO padding (so the border darkens towards 0, the normalised mean colour)."""
    if sigma <= 0:
        return images.clone()
    kernel = reflect_gaussian_kernel(taps, sigma).to(images.dtype).to(images.device)
    c = images.shape[1]
    return F.conv2d(images, kernel.expand(c, 1, taps, taps), padding=taps // 2, groups=c)


def class_probabilities(logits: Tensor, prob: str) -> Tensor:
    """sigmoid (each class on its own: a multi-label head) or softmax over classes, in float64."""
    if prob == "sigmoid":
        return torch.sigmoid(logits.double())
    if prob == "softmax":
        return F.softmax(logits.double(), dim=-1)
    raise ValueError(f"eval.faithfulness_prob must be one of {FAITHFULNESS_PROBS}, got {prob!r}")


def maps_at_image_size(maps: Tensor, images: Tensor) -> Tensor:
    """Maps at the images' resolution: a coarser map (Grad-CAM cells, a low-resolution Explainer) is upsampled
    bilinearly (align_corners=False, as TorchRay resizes saliency); a finer one is an error."""
    h, w = images.shape[-2:]
    if maps.shape[-2:] == (h, w):
        return maps
    if maps.dim() != 4 or maps.shape[-2] > h or maps.shape[-1] > w:
        raise ValueError(f"faithfulness: maps {tuple(maps.shape)} do not fit images {tuple(images.shape)} (a map "
                         "may be coarser than the image, then it is upsampled, never finer)")
    return F.interpolate(maps.to(torch.promote_types(maps.dtype, torch.float32)), size=(h, w), mode="bilinear",
                         align_corners=False)


def top1_pairs(classifier: nn.Module, images: Tensor) -> Tensor:
    """(image, class) pairs of the classifier's top-1 class on the clean image (RISE's protocol) -> [B, 2]."""
    with torch.no_grad():
        top = classifier(images).argmax(dim=1)
    return torch.stack([torch.arange(len(images), device=top.device), top], dim=1)


def step_counts(z: int, steps: int | None = None, step_pixels: int | None = None) -> Tensor:
    """Pixels switched after each step: `steps` equal steps, round(k Z / K) (ours), or `step_pixels` per step,
    min(k n, Z) for k = 0 .. ceil(Z / n) (the RISE code; its last step may be shorter)."""
    if step_pixels is not None:
        if step_pixels < 1:
            raise ValueError(f"faithfulness: step_pixels must be >= 1, got {step_pixels}")
        n = -(-z // step_pixels)
        return (torch.arange(n + 1, dtype=torch.long) * step_pixels).clamp_max(z)
    if steps is None or steps < 1:
        raise ValueError(f"eval.faithfulness_steps must be >= 1, got {steps}")
    return torch.round(torch.arange(steps + 1, dtype=torch.float64) * z / steps).long()


@torch.no_grad()
def causal_auc(classifier: nn.Module, images: Tensor, maps: Tensor, pairs: Tensor, counts: Tensor,
               substrate: Tensor, mode: str, prob: str, chunk: int = 256) -> Tensor:
    """AUC of one causal curve (Petsiuk et al. 2018) for every (image, class) pair [P, 2] -> [P] float64.

    Pixels are ranked by the pair's map (TIE_ORDER). After step k the first counts[k] of them are taken from
    `substrate` (mode "deletion": image -> substrate) or from the image (mode "insertion": substrate -> image). The
    class probability at the len(counts) points is integrated by the trapezoid rule on [0, 1].
    """
    if mode not in ("deletion", "insertion"):
        raise ValueError(f"causal_auc: mode must be 'deletion' or 'insertion', got {mode!r}")
    maps = maps_at_image_size(maps, images)
    b, c, h, w = maps.shape
    z, n = h * w, len(counts) - 1
    ranked = maps[pairs[:, 0], pairs[:, 1]].reshape(len(pairs), z)  # at least float32, never rounded down: no new ties
    order = ranked.to(torch.promote_types(ranked.dtype, torch.float32)).argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(z, device=order.device).expand_as(order))
    counts = counts.to(rank.device)
    first, last = (images, substrate) if mode == "deletion" else (substrate, images)
    curves = torch.empty(len(pairs), n + 1, dtype=torch.float64)
    jobs = torch.cartesian_prod(torch.arange(len(pairs)), torch.arange(n + 1)).to(rank.device)
    for at in range(0, len(jobs), chunk):
        p, k = jobs[at : at + chunk, 0], jobs[at : at + chunk, 1]
        switched = (rank[p] < counts[k][:, None]).reshape(-1, 1, h, w).to(images.dtype)
        i, cls = pairs[p, 0], pairs[p, 1]
        probs = class_probabilities(classifier(first[i] * (1 - switched) + last[i] * switched), prob)
        curves[p.cpu(), k.cpu()] = probs[torch.arange(len(p), device=probs.device), cls.to(probs.device)].cpu()
    return (curves.sum(1) - (curves[:, 0] + curves[:, -1]) / 2) / n  # trapezoid rule on [0, 1]


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
    deletion_substrate: str = "zero",
) -> tuple[Tensor, Tensor, Tensor]:
    """Our protocol: deletion and insertion AUC of every (image, ground-truth class) pair in `steps` equal steps.
    -> (deletion [P], insertion [P], class [P]), pairs in (image, class) row-major order.

    Deletion sets pixels to 0 (the dataset-mean colour of the normalised image; `deletion_substrate="blur"`: to the
    blurred copy), insertion copies them into `start` (default: the RISE blur at this size). Maps coarser than the
    images are upsampled. Lower deletion and higher insertion are better.
    """
    if deletion_substrate not in DELETION_SUBSTRATES:
        raise ValueError(f"eval.deletion_substrate must be one of {DELETION_SUBSTRATES}, got {deletion_substrate!r}")
    counts = step_counts(images.shape[-2] * images.shape[-1], steps=steps)
    class_probabilities(torch.zeros(1, 1), prob)  # a bad name fails before any work
    pairs = (labels > 0).nonzero()  # [P, 2]
    if len(pairs) == 0:
        empty = torch.zeros(0, dtype=torch.float64)
        return empty, empty, torch.zeros(0, dtype=torch.long)
    if start is None:
        start = insertion_start(images, *blur_taps(min(images.shape[-2:])))
    gone = start if deletion_substrate == "blur" else torch.zeros_like(images)
    deletion = causal_auc(classifier, images, maps, pairs, counts, gone, "deletion", prob, chunk)
    insertion = causal_auc(classifier, images, maps, pairs, counts, start, "insertion", prob, chunk)
    return deletion, insertion, pairs[:, 1].cpu()


@torch.no_grad()
def rise_deletion_insertion_auc(classifier: nn.Module, images: Tensor, maps: Tensor,
                                chunk: int = 256) -> tuple[Tensor, Tensor, Tensor]:
    """The RISE code's protocol (RISE_PROTOCOL): the classifier's top-1 class per image, softmax probability;
    deletion to 0 and insertion from the RISE blur, both eight image rows' worth of pixels per step (1792 px at
    224 x 224). -> (deletion [B], insertion [B], class [B])."""
    h, w = images.shape[-2:]
    pairs = top1_pairs(classifier, images)
    z = h * w
    start = insertion_start(images, *blur_taps(min(h, w)))
    counts = step_counts(z, step_pixels=RISE_STEP_ROWS * w)
    deletion = causal_auc(classifier, images, maps, pairs, counts, torch.zeros_like(images), "deletion", "softmax",
                          chunk)
    insertion = causal_auc(classifier, images, maps, pairs, counts, start, "insertion", "softmax", chunk)
    return deletion, insertion, pairs[:, 1].cpu()


def points_in_original(maps: Tensor, sizes: Tensor, resize: str = "squash") -> Tensor:
    """The pointing game's point of each map [P, S, S] in its image's ORIGINAL pixels, sizes [P, 2] as (W, H): the
    part of the map that shows the image (data.resize; input_to_original, as explain maps masks back) resized
    bilinearly onto the part of the image it shows (align_corners=False, as TorchRay's benchmark resizes to the
    image), its first maximum in row-major order (torch argmax) -> [P, 2] long (u = column, v = row). center_crop's
    unseen borders hold no point."""
    points = torch.zeros(len(maps), 2, dtype=torch.long)
    for p, (m, (w, h)) in enumerate(zip(maps, sizes.tolist())):
        if w < 1 or h < 1:
            raise ValueError(f"pointing game: original size {(w, h)} is not a size (the sample lacks orig_size)")
        (x0, y0, x1, y1), (left, top, sw, sh) = input_to_original(w, h, m.shape[-1], resize)
        part = m[y0:y1, x0:x1]
        big = part if tuple(part.shape) == (sh, sw) else F.interpolate(part[None, None].float(), size=(sh, sw),
                                                                       mode="bilinear", align_corners=False)[0, 0]
        flat = int(big.reshape(-1).argmax())
        points[p, 0], points[p, 1] = left + flat % sw, top + flat // sw
    return points


def box_hit(point: Tensor, boxes: Tensor, size: tuple[int, int], tolerance: float) -> bool:
    """TorchRay's VOC test: some pixel of the union of the boxes [n, 4] (VOC XML xmin, ymin, xmax, ymax: 1-based,
    inclusive; clipped to the W x H image) lies at distance < tolerance of the point. The nearest pixel of a box is
    the point clamped into it, so no mask is drawn."""
    w, h = size
    u, v = int(point[0]), int(point[1])
    for xmin, ymin, xmax, ymax in boxes.tolist():
        x0, y0, x1, y1 = max(int(xmin) - 1, 0), max(int(ymin) - 1, 0), min(int(xmax) - 1, w - 1), min(int(ymax) - 1,
                                                                                                       h - 1)
        if x0 > x1 or y0 > y1:
            continue
        dx, dy = max(x0 - u, 0, u - x1), max(y0 - v, 0, v - y1)
        if dx * dx + dy * dy < tolerance**2:
            return True
    return False


def _to_input(pixels: Tensor, start: int, length: int, first: int, count: int) -> tuple[Tensor, Tensor]:
    """Original pixel indices -> (input pixel indices by nearest neighbour, whether the input shows them), along one
    axis where original pixels [start, start + length) are input pixels [first, first + count)."""
    inside = (pixels >= start) & (pixels < start + length)
    index = first + ((pixels - start).clamp_min(0) * count // max(length, 1)).clamp_max(count - 1)
    return index, inside


def mask_hit(point: Tensor, seg_classes: Tensor, cls: int, size: tuple[int, int], tolerance: float,
             resize: str = "squash") -> bool:
    """The mask-based test in original pixels: the class's pixels (seg_classes == cls + 1 at the model's S x S frame,
    mapped back to W x H by nearest neighbour through data.resize's inverse, input_to_original) within distance
    < tolerance of the point. Void (255) counts for no class: VOC's void band is ~5 px wide, inside the 15 px
    tolerance of the object it outlines, while counting it would let a point on another object's outline score."""
    w, h = size
    u, v = int(point[0]), int(point[1])
    r = int(math.ceil(tolerance))
    ys = torch.arange(max(v - r, 0), min(v + r, h - 1) + 1)
    xs = torch.arange(max(u - r, 0), min(u + r, w - 1) + 1)
    near = (ys[:, None] - v) ** 2 + (xs[None, :] - u) ** 2 < tolerance**2
    (x0, y0, x1, y1), (left, top, sw, sh) = input_to_original(w, h, seg_classes.shape[-1], resize)
    rows, seen_y = _to_input(ys, top, sh, y0, y1 - y0)
    cols, seen_x = _to_input(xs, left, sw, x0, x1 - x0)
    obj = (seg_classes.cpu()[rows[:, None], cols[None, :]] == cls + 1) & seen_y[:, None] & seen_x[None, :]
    return bool((obj & near).any())


def all_difficult(objects: Tensor, cls: int) -> bool:
    """TorchRay skips a (VOC image, class) pair whose objects of that class are all marked difficult. objects:
    [n, 6] rows (class, xmin, ymin, xmax, ymax, difficult)."""
    mine = objects[objects[:, 0] == cls]
    return bool((mine[:, 5] > 0).all())


def pointing_game(maps: Tensor, labels: Tensor, sizes: Tensor, tolerance: float,
                  seg_classes: Sequence[Tensor | None] | None = None,
                  objects: Sequence[Tensor | None] | None = None, resize: str = "squash") -> dict[str, Tensor]:
    """Pointing game on every (image, ground-truth class) pair, as TorchRay's benchmark runs it.

    maps [B, C, h, w]; sizes [B, 2] original (W, H); per image optionally its segmentation [S, S] and its annotated
    objects [n, 6] (None where the sample carries none); `resize`: how the images were fitted to the model's input
    (data.resize), whose inverse maps the maps back. Tolerance in original pixels, strict "<". Returns per pair
    (image, class row-major): "cls", "skipped" (all its objects difficult: scored by neither test), "box" / "mask"
    (1 hit, 0 miss, -1 not scored: no boxes / no segmentation for that image).
    """
    pairs = (labels > 0).nonzero().cpu()
    n = len(pairs)
    out = {"cls": pairs[:, 1], "skipped": torch.zeros(n, dtype=torch.bool),
           "box": torch.full((n,), -1, dtype=torch.long), "mask": torch.full((n,), -1, dtype=torch.long)}
    if n == 0:
        return out
    points = points_in_original(maps[pairs[:, 0], pairs[:, 1]].detach().cpu(), sizes.cpu()[pairs[:, 0]], resize)
    for p, (i, k) in enumerate(pairs.tolist()):
        size = tuple(int(v) for v in sizes[i].tolist())
        objs = objects[i] if objects is not None else None
        if objs is not None:
            if all_difficult(objs, k):
                out["skipped"][p] = True
                continue
            out["box"][p] = int(box_hit(points[p], objs[objs[:, 0] == k][:, 1:5], size, tolerance))
        seg = seg_classes[i] if seg_classes is not None else None
        if seg is not None:
            out["mask"][p] = int(mask_hit(points[p], seg, k, size, tolerance, resize))
    return out


def torchray_accuracy(hits: Tensor, pairs: Tensor) -> float:
    """TorchRay's `PointingGame.accuracy`: the mean over ALL classes of hits / max(pairs, 1), so a class without
    pairs scores 0."""
    return float((hits / pairs.clamp_min(1)).mean()) if len(pairs) else math.nan


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
