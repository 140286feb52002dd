"""WSOL localization (explainer/wsol.py) against the port of wsolevaluation's evaluation.py (tests/_anchor_wsol.py):
the same counts on maps made to be hard (many contours, holes, ties, empty maps, maps that never reach 1, boxes on the
border), and the same table through the evaluator's path (frame, box scaling, normalisation, pixel histograms)."""

from __future__ import annotations

import math

import _anchor_wsol as ref
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from explainer import metrics as M
from explainer import wsol as W

pytestmark = pytest.mark.usefixtures("one_thread")

THRESHOLDS = W.cam_thresholds(0.01)


def hard_maps(rng: np.random.Generator, size: int = 224) -> list[np.ndarray]:
    """Maps of every kind the issue names, already in [0, 1]."""
    up = lambda s: F.interpolate(torch.from_numpy(rng.random((1, 1, s, s))), size=(size, size), mode="bilinear",  # noqa: E731
                                 align_corners=False)[0, 0].numpy()
    yy, xx = np.mgrid[:size, :size]
    r = np.hypot(yy - size / 2, xx - size / 3)
    ring = ((r > size / 8) & (r < size / 4)).astype(np.float64)  # a hole: RETR_TREE gives an inner contour too
    return [
        W.normalize_map(up(16)),  # many blobs
        W.normalize_map(up(40)),  # many more
        np.round(W.normalize_map(up(8)) * 3) / 3,  # four levels: ties at every threshold
        np.zeros((size, size)),  # empty: the reference's all-zero box at every threshold
        0.6 * W.normalize_map(up(6)),  # never reaches 1
        ring, 0.5 * ring + 0.5 * W.normalize_map(up(5)) * (r < size / 8),  # a ring, and something inside its hole
        np.pad(np.ones((size // 4, size // 4)), ((0, size - size // 4), (size - size // 4, 0))),  # a corner block
    ]


def gt_boxes(rng: np.random.Generator, size: int = 224) -> np.ndarray:
    boxes = [[0, 0, 0, 0], [0, 0, size - 1, size - 1], [size - 60, 0, size - 1, 40]]  # border boxes
    for _ in range(2):
        x0, y0 = rng.integers(0, size - 10, 2)
        boxes.append([x0, y0, rng.integers(x0, size), rng.integers(y0, size)])
    return np.array(boxes)


@pytest.mark.numerics
def test_box_counts_equal_the_reference_on_hard_maps():
    rng = np.random.default_rng(0)
    maps = hard_maps(rng)
    all_boxes = gt_boxes(rng)
    v2 = ref.BoxEvaluator(THRESHOLDS, (30, 50, 70), multi_contour_eval=True)
    v1 = ref.BoxEvaluator(THRESHOLDS, (50,), multi_contour_eval=False)
    ours_v2, ours_v1 = np.zeros((3, len(THRESHOLDS))), np.zeros(len(THRESHOLDS))
    for m in maps:
        for gt in (all_boxes[:1], all_boxes[1:2], all_boxes[2:3], all_boxes[3:], all_boxes):  # one box and several
            v2.accumulate(m, gt)
            v1.accumulate(m, gt)
            every, largest = W.best_ious(m, gt, THRESHOLDS)
            ours_v2 += np.stack([every >= t / 100 for t in (30, 50, 70)])
            ours_v1 += largest >= 0.5
    for j, t in enumerate((30, 50, 70)):
        assert np.array_equal(ours_v2[j], v2.num_correct[t]), t
    assert np.array_equal(ours_v1, v1.num_correct[50])
    assert 0 < v2.compute()[0] < 100 and v1.compute()[0] <= v2.compute()[1]  # not trivially all or nothing
    # the empty map: no contour at any threshold, the all-zero box, which matches the 1-pixel box at the origin
    every, largest = W.best_ious(np.zeros((224, 224)), all_boxes[:1], THRESHOLDS)
    assert (every == 1).all() and (largest == 1).all()


def test_iou_convention_and_box_scaling_are_the_references():
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, 50, (7, 4)), rng.integers(0, 50, (5, 4))
    a[:, 2:] += a[:, :2]
    b[:, 2:] += b[:, :2]
    a[0] = [5, 5, 4, 4]  # degenerate: union <= 0 somewhere
    assert np.array_equal(W.iou_matrix(a, b), ref.multiple_iou(a, b))
    for _ in range(200):
        w, h = (int(v) for v in rng.integers(20, 900, 2))
        x0, y0 = (int(v) for v in rng.integers(1, [w, h]))
        box = [x0, y0, int(rng.integers(x0, w + 1)), int(rng.integers(y0, h + 1))]  # 1-based, inclusive (VOC)
        ours = W.frame_boxes(np.array([box]), (w, h), 224, "squash", int(rng.choice([32, 224, 300])))
        assert ours.tolist() == [list(ref.resize_bbox([v - 1 for v in box], (w, h), (224, 224)))]
    # center_crop: a box outside the shown square is dropped, one across its edge clipped to it
    assert W.frame_boxes(np.array([[1, 1, 50, 100], [180, 1, 300, 100]]), (400, 200), 224, "center_crop", 32
                         ).tolist() == [[88, 0, 222, 110]]  # (179 - 100) * 224 / 200 = 88.5


def _batch(rng: np.random.Generator, n: int = 6, size: int = 32, classes: int = 3):
    """Evaluator-shaped batch: maps at size, 1-based boxes in originals of random size, segmentation with void."""
    g = torch.Generator().manual_seed(int(rng.integers(1 << 30)))
    maps = F.interpolate(torch.rand(n, classes, 6, 6, generator=g, dtype=torch.float64), size=(size, size),
                         mode="bilinear")
    labels = torch.zeros(n, classes)
    objects, sizes = [], []
    seg = torch.zeros(n, size, size, dtype=torch.uint8)
    for i in range(n):
        w, h = (int(v) for v in rng.integers(60, 500, 2))
        sizes.append([w, h])
        rows = []
        for k in rng.choice(classes, size=int(rng.integers(1, classes + 1)), replace=False).tolist():
            labels[i, k] = 1
            for _ in range(int(rng.integers(1, 3))):
                x0, y0 = (int(v) for v in rng.integers(1, [w, h]))
                rows.append([k, x0, y0, int(rng.integers(x0, w + 1)), int(rng.integers(y0, h + 1)), 0])
            r, c = (int(v) for v in rng.integers(0, size - 8, 2))
            seg[i, r : r + 8, c : c + 8] = k + 1
            seg[i, r, c : c + 8] = 255
        objects.append(torch.tensor(rows).reshape(-1, 6))
    return {"image": torch.zeros(n, 3, size, size), "objects": objects, "orig_size": torch.tensor(sizes),
            "seg_classes": seg, "has_seg": torch.tensor([i % 3 != 0 for i in range(n)])}, maps, labels


@pytest.mark.numerics
def test_the_evaluator_path_gives_the_references_table():
    """Maps at the model's 32 px, boxes in originals of other sizes: our scorer (bilinear to 224, min-max, boxes
    scaled) equals the reference fed the same 224 maps and its own resize_bbox, for MaxBoxAccV2, V1 and PxAP."""
    rng = np.random.default_rng(2)
    scorer = W.WsolScorer(num_classes=3)
    totals = M.Totals()
    v2 = ref.BoxEvaluator(THRESHOLDS, (30, 50, 70), multi_contour_eval=True)
    v1 = ref.BoxEvaluator(THRESHOLDS, (50,), multi_contour_eval=False)
    px = ref.MaskEvaluator(THRESHOLDS)
    for _ in range(2):
        batch, maps, labels = _batch(rng)
        scorer.update(totals, "m", maps, labels, batch, torch.zeros(len(maps), dtype=torch.long))
        pairs = (labels > 0).nonzero()
        # float64 and laid out as ours (one channel per pair): float32 SIMD paths round differently per layout
        big = F.interpolate(maps[pairs[:, 0], pairs[:, 1]][:, None], size=(224, 224), mode="bilinear",
                            align_corners=False)[:, 0].numpy()
        seg = F.interpolate(batch["seg_classes"][:, None].float(), size=(224, 224), mode="nearest")[:, 0].numpy()
        for p, (i, k) in enumerate(pairs.tolist()):
            cam = ref.normalize_scoremap(big[p])
            objs = batch["objects"][i]
            gt = [ref.resize_bbox([v - 1 for v in row[1:5]], batch["orig_size"][i].tolist(), (224, 224))
                  for row in objs[objs[:, 0] == k].tolist()]
            v2.accumulate(cam, np.array(gt))
            v1.accumulate(cam, np.array(gt))
            if batch["has_seg"][i]:
                px.accumulate(cam, np.where(seg[i] == 255, 255, (seg[i] == k + 1).astype(np.uint8)))
    row = scorer.finish(totals, ["m"], ["a", "b", "c"])["methods"]["m"]
    assert row["box_pairs"] == v2.cnt > 10 and row["pixel_pairs"] > 5
    assert [row["maxboxacc_v2_iou"][t] for t in ("30", "50", "70")] == v2.compute()
    assert row["maxboxacc_v2"] == pytest.approx(float(np.mean(v2.compute())), abs=1e-12)
    assert row["maxboxacc_v1"] == v1.compute()[0] == row["gt_known_loc"]
    assert row["pxap"] == pytest.approx(px.compute(), abs=1e-9)
    assert row["top1_loc"] is not None and math.isnan(row["top1_loc"])  # multi-label batches: not reported


def test_pixel_ap_edges_and_settings():
    edges = W.bin_edges(THRESHOLDS)
    hist = W.score_histograms(torch.tensor([0.0, 0.5, 1.0, 0.999]), torch.tensor([False, True, True, False]),
                              torch.tensor([True, False, False, True]), edges)
    assert hist[0, 50] == 1 and hist[0, 100] == 1 and hist[1, 0] == 1 and hist[1, 99] == 1  # 1.0 in [1, 2)
    perfect = W.score_histograms(torch.tensor([1.0, 0.0]), torch.tensor([True, False]), torch.tensor([False, True]),
                                 edges)
    assert W.pixel_ap(perfect) == pytest.approx(100.0)
    assert math.isnan(W.pixel_ap(torch.zeros(2, len(edges) - 1)))  # no positive pixel
    with pytest.raises(ValueError, match="wsol_frame"):
        W.WsolScorer(3, frame="original")
    with pytest.raises(ValueError, match="wsol_curve_interval"):
        W.WsolScorer(3, interval=0.0)


@pytest.mark.numerics
def test_the_image_frame_is_the_reference_protocol_at_the_model_size():
    """eval.wsol_frame=image: no resize of the maps, boxes scaled to S x S with the reference's rule; said in the
    settings. The reference, given 32 px maps and its resize_bbox to 32, counts the same."""
    rng = np.random.default_rng(5)
    batch, maps, labels = _batch(rng, n=8)
    scorer, totals = W.WsolScorer(num_classes=3, frame="image"), M.Totals()
    scorer.update(totals, "m", maps, labels, batch, torch.zeros(len(maps), dtype=torch.long))
    v2 = ref.BoxEvaluator(THRESHOLDS, (30, 50, 70), multi_contour_eval=True)
    for i, k in (labels > 0).nonzero().tolist():
        objs = batch["objects"][i]
        gt = [ref.resize_bbox([v - 1 for v in row[1:5]], batch["orig_size"][i].tolist(), (32, 32))
              for row in objs[objs[:, 0] == k].tolist()]
        v2.accumulate(ref.normalize_scoremap(maps[i, k].numpy()), np.array(gt))
    res = scorer.finish(totals, ["m"], ["a", "b", "c"])
    assert res["settings"]["frame"] == "image" and "S x S" in res["settings"]["frame_description"]
    assert [res["methods"]["m"]["maxboxacc_v2_iou"][t] for t in ("30", "50", "70")] == v2.compute()
