"""Weakly supervised object localization scored as the field reports it (Choe et al., "Evaluating Weakly Supervised
Object Localization Methods Right", CVPR 2020; their code is clovaai/wsolevaluation, `evaluation.py`).

Per (image, ground-truth class) pair, the class's map is brought into a square frame (the reference's 224 x 224 by
default), min-max normalised, and thresholded at every `cam_curve_interval` step:
- **MaxBoxAccV2**: at each threshold the boxes of ALL contours of the thresholded map (OpenCV's findContours,
  RETR_TREE, so hole contours count too, and boundingRect) against every ground-truth box of the class; a pair is
  correct at that threshold when the best IoU reaches 30 / 50 / 70 %; per IoU the best threshold's accuracy; the mean.
- **MaxBoxAcc** (V1): the largest contour only, IoU 50. **GT-known loc** is V1 at its best threshold, **top-1 loc**
  the same with the classifier's top-1 class right too (single-label data only).
- **PxAP**: per-pixel precision / recall of the class's map against its segmentation, from histograms over the same
  thresholds (the reference's form), void pixels excluded; the area under the curve.

Everything is kept as counts and histograms in `metrics.Totals`, so N processes give the numbers of one. The
reference's conventions that a number depends on are kept exactly (uint8 quantisation of the map, `> int(t * max)`,
inclusive-pixel IoU with +1, the all-zero box when no contour is found, boxes scaled with int() truncation);
tests/_anchor_wsol.py is the reference ported into the tests, and tests/test_wsol.py compares the two.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

REFERENCE_FRAME = 224  # the reference resizes images, maps and boxes to 224 x 224
IOU_THRESHOLDS = (30, 50, 70)  # percent, the reference's default iou_threshold_list
V1_IOU = 50
FRAMES = ("reference", "image")


def cam_thresholds(interval: float) -> np.ndarray:
    """The reference's threshold list: np.arange(0, 1, cam_curve_interval)."""
    if not 0.0 < interval < 1.0:
        raise ValueError(f"eval.wsol_curve_interval must be in (0, 1), got {interval}")
    return np.arange(0, 1, interval)


def normalize_map(m: np.ndarray) -> np.ndarray:
    """Min-max to [0, 1] in float64; a constant (or NaN) map becomes zeros, as the reference's normalize_scoremap."""
    m = np.asarray(m, dtype=np.float64)
    if np.isnan(m).any():
        return np.zeros_like(m)
    lo, hi = m.min(), m.max()
    return np.zeros_like(m) if lo == hi else (m - lo) / (hi - lo)


# ----------------------------------------------------------------------------------------------------------------------
# Boxes
# ----------------------------------------------------------------------------------------------------------------------


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of boxes a [n, 4] against b [m, 4] (x0, y0, x1, y1 inclusive pixel indices: width x1 - x0 + 1); a
    non-positive union gives 0."""
    a = a.astype(np.int64)[:, None, :]
    b = b.astype(np.int64)[None, :, :]
    iw = np.maximum(0, np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]) + 1)
    ih = np.maximum(0, np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]) + 1)
    inter = iw * ih
    union = ((a[..., 2] - a[..., 0] + 1) * (a[..., 3] - a[..., 1] + 1)
             + (b[..., 2] - b[..., 0] + 1) * (b[..., 3] - b[..., 1] + 1) - inter)
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def _contour_boxes(binary: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(boxes of every contour, box of the largest contour) of a uint8 0/255 image; no contour: the all-zero box."""
    import cv2

    h, w = binary.shape
    contours = cv2.findContours(binary, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)[-2]
    if not contours:
        zero = np.zeros((1, 4), np.int64)
        return zero, zero
    rects = np.array([cv2.boundingRect(c) for c in contours], np.int64).reshape(-1, 4)
    boxes = np.stack([rects[:, 0], rects[:, 1], np.minimum(rects[:, 0] + rects[:, 2], w - 1),
                      np.minimum(rects[:, 1] + rects[:, 3], h - 1)], axis=1)
    largest = int(np.argmax([cv2.contourArea(c) for c in contours]))  # first of equal areas, as max()
    return boxes, boxes[largest : largest + 1]


def best_ious(scoremap: np.ndarray, gt_boxes: np.ndarray, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per threshold the best IoU with the ground-truth boxes of (all contours' boxes, the largest contour's box).

    scoremap: [H, W] in [0, 1]. The map is quantised to uint8 (x 255, truncated) and a pixel is on when it exceeds
    int(t * its maximum); thresholds that give the same integer cut share one contour search.
    """
    gray = (scoremap * 255).astype(np.uint8)
    top = int(gray.max())
    cuts = [int(t * top) for t in thresholds]
    done: dict[int, tuple[float, float]] = {}
    for cut in set(cuts):
        boxes, largest = _contour_boxes(((gray > cut) * 255).astype(np.uint8))
        done[cut] = (float(iou_matrix(boxes, gt_boxes).max()), float(iou_matrix(largest, gt_boxes).max()))
    return np.array([done[c][0] for c in cuts]), np.array([done[c][1] for c in cuts])


def frame_boxes(objects: np.ndarray, orig: tuple[int, int], frame: int, resize: str, size: int) -> np.ndarray:
    """Boxes [n, 4] given as VOC XML does (1-based, inclusive) in the original W x H image -> inclusive 0-based pixel
    boxes in the frame x frame map. The part of the image the model saw lands on the frame as data.resize placed it
    (squash: the whole image; the reference's scaling x * frame / W, truncated); boxes are clipped to that part and
    the ones left empty dropped."""
    from explainer.data.transforms import resize_boxes

    w, h = orig
    (sl, st, sr, sb), (dl, dt, dr, db) = resize_boxes(w, h, size, resize)
    span_x, span_y = (dr - dl) * frame / size, (db - dt) * frame / size  # squash: exactly `frame`
    ox, oy = dl * frame / size, dt * frame / size

    def to_x(x: float) -> int:  # (x * new_w) / w first, as the reference's resize_bbox, then the offset
        return int(ox + (x - sl) * span_x / (sr - sl))

    def to_y(y: float) -> int:
        return int(oy + (y - st) * span_y / (sb - st))

    out = []
    for x0, y0, x1, y1 in np.asarray(objects, dtype=np.float64).reshape(-1, 4) - 1.0:
        x0, x1 = max(x0, sl), min(x1, sr - 1)
        y0, y1 = max(y0, st), min(y1, sb - 1)
        if x0 <= x1 and y0 <= y1:
            out.append([to_x(x0), to_y(y0), to_x(x1), to_y(y1)])
    return np.array(out, np.int64).reshape(-1, 4)


# ----------------------------------------------------------------------------------------------------------------------
# Pixel AP
# ----------------------------------------------------------------------------------------------------------------------


def bin_edges(thresholds: np.ndarray) -> Tensor:
    """The reference's histogram edges: the thresholds, then 1, 2, 3 (bins [t_i, t_i+1), ..., [1, 2), [2, 3])."""
    return torch.from_numpy(np.append(thresholds, [1.0, 2.0, 3.0]))


def score_histograms(scoremap: Tensor, positive: Tensor, negative: Tensor, edges: Tensor) -> Tensor:
    """[2, bins]: counts of the map's values over the positive and over the negative pixels (float64)."""
    bins = len(edges) - 1
    index = (torch.bucketize(scoremap.double().flatten(), edges, right=True) - 1).clamp(0, bins - 1)
    return torch.stack([torch.bincount(index[positive.flatten()], minlength=bins),
                        torch.bincount(index[negative.flatten()], minlength=bins)]).double()


def pixel_ap(hist: Tensor) -> float:
    """Area under the pixel precision-recall curve (percent) from [2, bins] histograms, cut from the top bin down;
    NaN without positive pixels or without any positive prediction."""
    pos, neg = hist[0].double(), hist[1].double()
    tp, fp = pos.flip(0).cumsum(0), neg.flip(0).cumsum(0)
    if pos.sum() <= 0 or bool(((tp + fp) <= 0).all()):
        return math.nan
    precision = tp / (tp + fp).clamp_min(1e-300)
    recall = tp / pos.sum()
    used = (tp + fp) != 0
    return float((precision[1:] * recall.diff())[used[1:]].sum() * 100)


# ----------------------------------------------------------------------------------------------------------------------
# Accumulation inside the evaluator
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class WsolScorer:
    """Counts for every method from the maps the evaluator already has; `finish` turns the all-reduced counts into
    the results.json table. `frame`: "reference" (224 x 224) or "image" (the model input's S x S)."""

    num_classes: int
    interval: float = 0.01
    frame: str = "reference"
    resize: str = "squash"

    def __post_init__(self) -> None:
        if self.frame not in FRAMES:
            raise ValueError(f"eval.wsol_frame must be one of {FRAMES}, got {self.frame!r}")
        self.thresholds = cam_thresholds(self.interval)
        self.edges = bin_edges(self.thresholds)

    def frame_size(self, image_size: int) -> int:
        return REFERENCE_FRAME if self.frame == "reference" else image_size

    def update(self, totals: Any, name: str, maps: Tensor, labels: Tensor, batch: dict[str, Any],
               top1: Tensor) -> None:
        """Add one method's counts for one batch: maps [B, C, h, w] (any resolution), top1 [B] classifier's top-1."""
        size = int(batch["image"].shape[-1])
        frame = self.frame_size(size)
        pairs = (labels > 0).nonzero().cpu()
        totals.add("wsol/labelled_images", float(int(((labels > 0).sum(1) > 0).sum())))
        totals.add("wsol/multi_label_images", float(int(((labels > 0).sum(1) > 1).sum())))
        if not len(pairs):
            return
        m = maps[pairs[:, 0], pairs[:, 1]].detach()
        if tuple(m.shape[-2:]) != (frame, frame):
            m = F.interpolate(m[:, None], size=(frame, frame), mode="bilinear", align_corners=False)[:, 0]
        m = m.double().cpu().numpy()
        self._boxes(totals, name, m, pairs, batch, top1.cpu(), frame, size)
        self._pixels(totals, name, m, pairs, batch, frame)

    def _boxes(self, totals: Any, name: str, m: np.ndarray, pairs: Tensor, batch: dict[str, Any], top1: Tensor,
               frame: int, size: int) -> None:
        objects, sizes = batch.get("objects"), batch.get("orig_size")
        if objects is None or sizes is None:
            return
        t = len(self.thresholds)
        v2 = np.zeros((len(IOU_THRESHOLDS), t))
        v1, top1_v1 = np.zeros(t), np.zeros(t)
        per_class, class_pairs = np.zeros((self.num_classes, t)), np.zeros(self.num_classes)
        for p, (i, k) in enumerate(pairs.tolist()):
            objs = objects[i]
            if objs is None or not len(objs):
                continue
            mine = objs[objs[:, 0] == k].numpy()
            if not len(mine) or (mine[:, 5] > 0).all():  # no box of the class, or all difficult (as the pointing game)
                continue
            gt = frame_boxes(mine[:, 1:5], tuple(int(v) for v in sizes[i].tolist()), frame, self.resize, size)
            if not len(gt):
                continue
            all_iou, largest_iou = best_ious(normalize_map(m[p]), gt, self.thresholds)
            for j, iou in enumerate(IOU_THRESHOLDS):
                v2[j] += all_iou >= iou / 100
            hit = largest_iou >= V1_IOU / 100
            v1 += hit
            top1_v1 += hit & (int(top1[i]) == k)
            per_class[k] += all_iou >= V1_IOU / 100
            class_pairs[k] += 1
        for key, value in (("v2", v2), ("v1", v1), ("top1_v1", top1_v1), ("class_v2_50", per_class),
                           ("class_pairs", class_pairs)):
            totals.add(f"wsol/{name}/{key}", torch.from_numpy(value))

    def _pixels(self, totals: Any, name: str, m: np.ndarray, pairs: Tensor, batch: dict[str, Any],
                frame: int) -> None:
        if "seg_classes" not in batch or "has_seg" not in batch:
            return
        has_seg = torch.as_tensor(batch["has_seg"]).bool().cpu()
        seg = batch["seg_classes"].cpu()
        if tuple(seg.shape[-2:]) != (frame, frame):
            seg = F.interpolate(seg[:, None].float(), size=(frame, frame), mode="nearest")[:, 0].to(seg.dtype)
        hist = torch.zeros(2, len(self.edges) - 1, dtype=torch.float64)
        n = 0
        for p, (i, k) in enumerate(pairs.tolist()):
            if not bool(has_seg[i]):
                continue
            s = seg[i].long()
            hist += score_histograms(torch.from_numpy(normalize_map(m[p])), s == k + 1, (s != k + 1) & (s != 255),
                                     self.edges)
            n += 1
        if n:
            totals.add(f"wsol/{name}/pixel_hist", hist)
            totals.add(f"wsol/{name}/pixel_pairs", float(n))

    def finish(self, totals: Any, methods: Sequence[str], classes: Sequence[str]) -> dict[str, Any]:
        """The localization table (percent) from the all-reduced counts."""
        zero = torch.zeros((), dtype=torch.float64)
        single = float(totals.get("wsol/multi_label_images", zero)) == 0
        out: dict[str, Any] = {"settings": self.settings(single), "methods": {}}
        for name in methods:
            out["methods"][name] = self._method_row(totals, name, classes, single)
        return out

    def _method_row(self, totals: Any, name: str, classes: Sequence[str], single: bool) -> dict[str, Any]:
        t = len(self.thresholds)
        pairs = totals.get(f"wsol/{name}/class_pairs", torch.zeros(len(classes), dtype=torch.float64))
        n = float(pairs.sum())
        v2 = totals.get(f"wsol/{name}/v2", torch.zeros(len(IOU_THRESHOLDS), t, dtype=torch.float64)) * 100 / max(n, 1)
        v1 = totals.get(f"wsol/{name}/v1", torch.zeros(t, dtype=torch.float64)) * 100 / max(n, 1)
        top1 = totals.get(f"wsol/{name}/top1_v1", torch.zeros(t, dtype=torch.float64)) * 100 / max(n, 1)
        best50 = int(v2[IOU_THRESHOLDS.index(V1_IOU)].argmax())
        per_class_counts = totals.get(f"wsol/{name}/class_v2_50", torch.zeros(len(classes), t, dtype=torch.float64))
        v1_best = int(v1.argmax())
        hist = totals.data.get(f"wsol/{name}/pixel_hist")
        nan = math.nan
        return {
            "box_pairs": int(n),
            "maxboxacc_v2": float(v2.max(1).values.mean()) if n else nan,
            "maxboxacc_v2_iou": {str(i): float(v2[j].max()) if n else nan for j, i in enumerate(IOU_THRESHOLDS)},
            "best_threshold_v2": {str(i): float(self.thresholds[int(v2[j].argmax())]) if n else nan
                                  for j, i in enumerate(IOU_THRESHOLDS)},
            "maxboxacc_v1": float(v1.max()) if n else nan,
            "best_threshold_v1": float(self.thresholds[v1_best]) if n else nan,
            "gt_known_loc": float(v1[v1_best]) if n else nan,
            "top1_loc": float(top1[v1_best]) if n and single else nan,
            "boxacc_50_per_class": {c: float(per_class_counts[k, best50] * 100 / pairs[k])
                                    for k, c in enumerate(classes) if pairs[k] > 0},
            "pxap": pixel_ap(hist) if hist is not None else nan,
            "pixel_pairs": int(float(totals.get(f"wsol/{name}/pixel_pairs", torch.zeros((), dtype=torch.float64)))),
        }

    def settings(self, single: bool) -> dict[str, Any]:
        frame = (f"reference: every map resized bilinearly (align_corners=False) to {REFERENCE_FRAME} x "
                 f"{REFERENCE_FRAME}, boxes scaled to it with int() truncation (wsolevaluation's resize_bbox)"
                 if self.frame == "reference" else "image: the model input's S x S, boxes scaled to it the same way")
        return {
            "reference": "Choe et al. CVPR 2020, clovaai/wsolevaluation evaluation.py",
            "frame": self.frame, "frame_description": frame, "resize": self.resize,
            "cam_curve_interval": self.interval, "iou_thresholds": list(IOU_THRESHOLDS),
            "pairs": "every (image, ground-truth class) pair whose class has a box (not all difficult) / a "
                     "segmentation; the class's own map, min-max normalised in the frame",
            "boxes": "the class's boxes (VOC XML convention: 1-based, inclusive), difficult ones included; a pair is "
                     "correct when any estimated box reaches the IoU with any of them",
            "v2": "boxes of all contours (cv2.findContours RETR_TREE, CHAIN_APPROX_SIMPLE; cv2.boundingRect)",
            "v1": "largest contour (cv2.contourArea), IoU 50",
            "gt_known_loc": "MaxBoxAcc (V1) at its best threshold",
            "top1_loc": "as gt_known_loc, counted only when the classifier's top-1 class is the ground truth"
                        + ("" if single else "; not reported: the data is multi-label"),
            "pxap": "pixel precision-recall from histograms over the thresholds (bins [t, t + interval), ..., "
                    "[1, 2)), void pixels (255) excluded, other classes' pixels negative; segmentation resized "
                    "nearest to the frame",
            "single_label": single, "units": "percent",
        }
