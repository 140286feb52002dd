"""A port, in our own words, of the WSOL evaluation of Choe et al. (clovaai/wsolevaluation, evaluation.py:
calculate_multiple_iou, resize_bbox, compute_bboxes_from_scoremaps, BoxEvaluator.accumulate / compute,
MaskEvaluator.accumulate / compute, and inference.py's normalize_scoremap).

It is the anchor explainer/wsol.py is checked against (tests/test_wsol.py, benchmarks/bench_anchors.py), so it keeps
the original's structure where ours differs: cv2.threshold on the uint8 map at every threshold (ours: a numpy
comparison, one contour search per distinct integer cut), the tiled [n, m, 4] IoU arrays (ours: broadcasting),
`max(contours, key=cv2.contourArea)` for the largest contour, the boxes of all thresholds concatenated and sliced back
per threshold, and np.histogram for the pixel histograms (ours: torch.bucketize). Only the file loading and metadata
handling of the original are left out: boxes, sizes and masks are passed in.
"""

from __future__ import annotations

import cv2
import numpy as np

FRAME = 224


def normalize_scoremap(cam: np.ndarray) -> np.ndarray:
    cam = np.array(cam, dtype=np.float64)
    if np.isnan(cam).any() or cam.min() == cam.max():
        return np.zeros_like(cam)
    cam -= cam.min()
    cam /= cam.max()
    return cam


def multiple_iou(box_a: np.ndarray, box_b: np.ndarray) -> np.ndarray:
    """[num_a, num_b] IoU, the +1 pixel convention, tiled the way the original tiles them."""
    num_a, num_b = box_a.shape[0], box_b.shape[0]
    a = np.tile(box_a, num_b).reshape(num_a, num_b, 4)
    b = np.transpose(np.tile(box_b, num_a).reshape(num_b, num_a, 4), (1, 0, 2))
    min_x = np.maximum(a[:, :, 0], b[:, :, 0])
    min_y = np.maximum(a[:, :, 1], b[:, :, 1])
    max_x = np.minimum(a[:, :, 2], b[:, :, 2])
    max_y = np.minimum(a[:, :, 3], b[:, :, 3])
    inter = np.maximum(0, max_x - min_x + 1) * np.maximum(0, max_y - min_y + 1)
    area_a = (a[:, :, 2] - a[:, :, 0] + 1) * (a[:, :, 3] - a[:, :, 1] + 1)
    area_b = (b[:, :, 2] - b[:, :, 0] + 1) * (b[:, :, 3] - b[:, :, 1] + 1)
    denominator = area_a + area_b - inter
    bad = np.where(denominator <= 0)
    denominator[bad] = 1
    ious = inter / denominator
    ious[bad] = 0
    return ious


def resize_bbox(box, image_size, resize_size):
    x0, y0, x1, y1 = map(float, box)
    w, h = map(float, image_size)
    new_w, new_h = map(float, resize_size)
    return int(x0 * new_w / w), int(y0 * new_h / h), int(x1 * new_w / w), int(y1 * new_h / h)


def boxes_from_scoremap(scoremap: np.ndarray, thresholds, multi_contour_eval: bool):
    """(boxes at each threshold, number of boxes at each threshold)."""
    height, width = scoremap.shape
    image = np.expand_dims((scoremap * 255).astype(np.uint8), 2)
    all_boxes, counts = [], []
    for threshold in thresholds:
        _, binary = cv2.threshold(src=image, thresh=int(threshold * np.max(image)), maxval=255,
                                  type=cv2.THRESH_BINARY)
        contours = cv2.findContours(image=binary, mode=cv2.RETR_TREE, method=cv2.CHAIN_APPROX_SIMPLE)[0]
        if len(contours) == 0:
            all_boxes.append(np.asarray([[0, 0, 0, 0]]))
            counts.append(1)
            continue
        if not multi_contour_eval:
            contours = [max(contours, key=cv2.contourArea)]
        boxes = []
        for contour in contours:
            x, y, w, h = cv2.boundingRect(contour)
            boxes.append([x, y, min(x + w, width - 1), min(y + h, height - 1)])
        all_boxes.append(np.asarray(boxes))
        counts.append(len(contours))
    return all_boxes, counts


class BoxEvaluator:
    """Counts per IoU threshold and map threshold; `compute` gives the best threshold's accuracy (percent) per IoU."""

    def __init__(self, thresholds, iou_thresholds=(30, 50, 70), multi_contour_eval=True):
        self.thresholds = list(thresholds)
        self.iou_thresholds = list(iou_thresholds)
        self.multi_contour_eval = multi_contour_eval
        self.num_correct = {t: np.zeros(len(self.thresholds)) for t in self.iou_thresholds}
        self.cnt = 0

    def accumulate(self, scoremap: np.ndarray, gt_boxes: np.ndarray) -> None:
        boxes, counts = boxes_from_scoremap(scoremap, self.thresholds, self.multi_contour_eval)
        ious = multiple_iou(np.concatenate(boxes, axis=0), np.array(gt_boxes))
        per_threshold, idx = [], 0
        for n in counts:
            per_threshold.append(max(ious.max(1)[idx : idx + n]))
            idx += n
        for t in self.iou_thresholds:
            self.num_correct[t][np.where(np.asarray(per_threshold) >= t / 100)[0]] += 1
        self.cnt += 1

    def compute(self) -> list[float]:
        return [(self.num_correct[t] * 100.0 / float(self.cnt)).max() for t in self.iou_thresholds]


class MaskEvaluator:
    """Pixel histograms of the map over the ground-truth positive (1) and negative (0) pixels; 255 ignored."""

    def __init__(self, thresholds):
        self.edges = np.append(thresholds, [1.0, 2.0, 3.0])
        self.pos = np.zeros(len(thresholds) + 2, dtype=np.float64)
        self.neg = np.zeros(len(thresholds) + 2, dtype=np.float64)

    def accumulate(self, scoremap: np.ndarray, gt_mask: np.ndarray) -> None:
        self.pos += np.histogram(scoremap[gt_mask == 1], bins=self.edges)[0].astype(np.float64)
        self.neg += np.histogram(scoremap[gt_mask == 0], bins=self.edges)[0].astype(np.float64)

    def compute(self) -> float:
        tp = self.pos[::-1].cumsum()
        fn = self.pos.sum() - tp
        fp = self.neg[::-1].cumsum()
        if ((tp + fn) <= 0).all() or ((tp + fp) <= 0).all():
            raise RuntimeError("no positive ground truth or no positive prediction")
        nonzero = (tp + fp) != 0
        with np.errstate(invalid="ignore", divide="ignore"):
            precision = tp / (tp + fp)
        recall = tp / (tp + fn)
        return float((precision[1:] * np.diff(recall))[nonzero[1:]].sum() * 100)
