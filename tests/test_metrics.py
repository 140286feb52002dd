"""Metrics of docs/method.md#evaluation against hand-computed values and the sanity rows' known properties."""

from __future__ import annotations

import math

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from explainer import metrics as M


def _toy_seg() -> tuple[torch.Tensor, torch.Tensor]:
    seg = torch.tensor([[[1, 0], [255, 1]]], dtype=torch.uint8)
    mask = torch.tensor([[[0.5, 0.2], [0.9, 1.0]]])
    return mask, seg


@pytest.mark.numerics
def test_segmentation_scores_hand_computed_with_void_excluded():
    mask, seg = _toy_seg()
    s = M.segmentation_scores(mask, seg)
    # valid pixels: (0,0) g=1 m=.5, (0,1) g=0 m=.2, (1,1) g=1 m=1; the void pixel (1,0) is ignored
    assert s["acc"].item() == pytest.approx((0.5 + 0.8 + 1.0) / 3)
    assert s["iou"].item() == pytest.approx((0.5 + 0.0 + 1.0) / (1.0 + 0.2 + 1.0))
    assert s["mae"].item() == pytest.approx((0.5 + 0.2 + 0.0) / 3)


@pytest.mark.numerics
def test_void_as_foreground_reproduces_reference_convention_and_differs():
    mask, seg = _toy_seg()
    ref = M.segmentation_scores(mask, (seg > 0).to(torch.uint8))  # the reference: void counted as foreground
    assert ref["acc"].item() == pytest.approx((0.5 + 0.8 + 0.9 + 1.0) / 4)
    assert ref["iou"].item() == pytest.approx(2.4 / 3.2)
    assert ref["mae"].item() == pytest.approx(0.8 / 4)
    ours = M.segmentation_scores(mask, seg)
    # the void pixel carries m=.9, a near-hit when void counts as foreground: excluding it lowers IoU, raises MAE
    assert ours["iou"].item() < ref["iou"].item()
    assert ours["mae"].item() > ref["mae"].item()


@pytest.mark.numerics
def test_sanity_rows_known_properties():
    g = torch.Generator().manual_seed(0)
    seg = (torch.rand(5, 16, 16, generator=g) < 0.3).to(torch.uint8)
    seg[:, 0, :] = 255  # a void band
    seg[:, 8, 8] = 1  # at least one foreground pixel per image
    valid = (seg != 255).double()
    fg = ((seg == 1).double().sum((1, 2)) / valid.sum((1, 2)))
    rows = {k: M.segmentation_scores(v, seg) for k, v in M.sanity_masks(seg).items()}
    assert torch.allclose(rows["G.T."]["iou"], torch.ones(5, dtype=torch.float64))
    assert torch.allclose(rows["G.T."]["acc"], torch.ones(5, dtype=torch.float64))
    assert torch.allclose(rows["G.T."]["mae"], torch.zeros(5, dtype=torch.float64))
    assert torch.allclose(rows["0"]["mae"], fg)
    assert torch.allclose(rows["0"]["acc"], 1 - fg)
    assert torch.allclose(rows["0"]["iou"], torch.zeros(5, dtype=torch.float64))
    assert torch.allclose(rows["1"]["mae"], 1 - fg)
    assert torch.allclose(rows["1"]["iou"], fg)
    assert torch.allclose(rows["0.5"]["mae"], torch.full((5,), 0.5, dtype=torch.float64))
    assert torch.allclose(rows["0.5"]["acc"], torch.full((5,), 0.5, dtype=torch.float64))


@pytest.mark.numerics
def test_segmentation_scores_edge_cases_and_bad_input():
    seg = torch.zeros(1, 3, 3, dtype=torch.uint8)
    assert M.segmentation_scores(torch.zeros(1, 3, 3), seg)["iou"].item() == 1.0  # both empty: perfect agreement
    with pytest.raises(ValueError, match="only void"):
        M.segmentation_scores(torch.zeros(1, 2, 2), torch.full((1, 2, 2), 255, dtype=torch.uint8))
    with pytest.raises(ValueError, match="must hold 0, 1 or 255"):
        M.segmentation_scores(torch.zeros(1, 2, 2), torch.full((1, 2, 2), 7, dtype=torch.uint8))
    with pytest.raises(ValueError, match="differ"):
        M.segmentation_scores(torch.zeros(1, 2, 2), torch.zeros(1, 3, 3, dtype=torch.uint8))


@pytest.mark.numerics
def test_aggregate_is_max_over_ground_truth_classes():
    maps = torch.tensor([[[[0.1, 0.9]], [[0.7, 0.2]], [[1.0, 1.0]]]])  # [1, 3, 1, 2]
    labels = torch.tensor([[1.0, 1.0, 0.0]])
    assert torch.allclose(M.aggregate(maps, labels), torch.tensor([[[0.7, 0.9]]]))
    assert torch.equal(M.aggregate(maps, torch.zeros(1, 3)), torch.zeros(1, 1, 2))


class ConstantLogits(nn.Module):
    def __init__(self, logits: list[float]):
        super().__init__()
        self.register_buffer("logits", torch.tensor(logits))

    def forward(self, x):
        return self.logits.expand(x.shape[0], -1)


@pytest.mark.numerics
def test_saliency_hand_computed():
    clf = ConstantLogits([0.0, math.log(3.0)])  # softmax = [.25, .75]
    images = torch.ones(3, 3, 4, 4)
    mask = torch.zeros(3, 4, 4)
    mask[1] = 0.5
    mask[2, :2] = 1.0
    labels = torch.tensor([[0.0, 1.0], [1.0, 1.0], [1.0, 0.0]])
    sal = M.saliency_scores(clf, images, mask, labels)
    expected = [math.log(0.05) - math.log(0.75), math.log(0.5) - math.log(1.0), math.log(0.5) - math.log(0.25)]
    assert sal.tolist() == pytest.approx(expected)


class HalfMeans(nn.Module):
    """logit_c = ln(3) * mean of channel 0 over the left (c=0) or right (c=1) half of the image."""

    def forward(self, x):
        w = x.shape[-1] // 2
        left = x[:, 0, :, :w].mean((1, 2))
        right = x[:, 0, :, w:].mean((1, 2))
        return math.log(3.0) * torch.stack([left, right], 1)


@pytest.mark.numerics
def test_class_specific_hand_computed():
    images = torch.ones(2, 3, 4, 4)
    maps = torch.zeros(2, 2, 4, 4)
    maps[:, 0, :, :2] = 1.0  # class 0 mask: left half, kept at every threshold
    maps[:, 1, :, 2:] = 0.55  # class 1 mask: right half, kept for thresholds 0.1..0.5 only
    labels = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    thresholds = [round(0.1 * i, 1) for i in range(1, 10)]
    sums, counts = M.class_specific_sums(HalfMeans(), images, maps, labels, [0, 1], [0, 1], thresholds, chunk=5)
    assert counts.tolist() == [2.0, 1.0]
    table = sums / counts[:, None]
    # keep left only -> softmax [.75, .25]; keep right only -> [.25, .75]; keep nothing / everything -> [.5, .5]
    expected = [[0.75, (5 * 0.25 + 4 * 0.5) / 9, 0.5], [0.25, (5 * 0.75 + 4 * 0.5) / 9, 0.5]]
    assert table.tolist() == [pytest.approx(r) for r in expected]


def test_class_specific_no_target_present():
    sums, counts = M.class_specific_sums(HalfMeans(), torch.ones(1, 3, 4, 4), torch.zeros(1, 2, 4, 4),
                                         torch.tensor([[0.0, 1.0]]), [0], [0, 1], [0.5])
    assert counts.tolist() == [0.0] and sums.abs().sum() == 0


class RegionFraction(nn.Module):
    """sigmoid(logit_c) = share of region c's pixels still lit in channel 0 (clamped away from 0 and 1)."""

    def __init__(self, regions: torch.Tensor) -> None:
        super().__init__()
        self.regions = regions.double()  # [C,H,W] in {0,1}

    def forward(self, x):
        lit = torch.einsum("bhw,chw->bc", x[:, 0].double(), self.regions) / self.regions.sum((1, 2))
        p = lit.clamp(1e-9, 1 - 1e-9)
        return torch.log(p / (1 - p))


def _top_row_toy() -> tuple[torch.Tensor, RegionFraction]:
    regions = torch.zeros(2, 4, 4)
    regions[0, 0] = 1  # class 0: the top row (4 of 16 pixels)
    regions[1, 3] = 1  # class 1: the bottom row
    image = torch.zeros(1, 3, 4, 4)
    image[0, 0] = regions.amax(0)
    return image, RegionFraction(regions)


@pytest.mark.numerics
def test_deletion_insertion_auc_hand_computed():
    image, clf = _top_row_toy()
    rank = torch.arange(16.0).flip(0).reshape(4, 4)  # row-major order: the top row first
    maps = torch.stack([rank, rank])[None]  # top row first: class 0's row goes first, class 1's (bottom) last
    labels = torch.tensor([[1.0, 1.0]])
    deletion, insertion, cls = M.deletion_insertion_auc(clf, image, maps, labels, steps=4,
                                                        start=torch.zeros_like(image))
    assert cls.tolist() == [0, 1]
    # class 0: deletion curve 1,0,0,0,0 -> trapezoid 0.125; insertion from black 0,1,1,1,1 -> 0.875
    # class 1 (its row ranked last): deletion 1,1,1,1,0 -> 0.875; insertion 0,0,0,0,1 -> 0.125
    assert deletion.tolist() == pytest.approx([0.125, 0.875], abs=1e-8)
    assert insertion.tolist() == pytest.approx([0.125 + 0.75, 0.125], abs=1e-8)
    # a single step: trapezoid of the end points only; chunking does not change anything
    d1, i1, _ = M.deletion_insertion_auc(clf, image, maps, labels, steps=1, start=torch.zeros_like(image), chunk=3)
    assert d1.tolist() == pytest.approx([0.5, 0.5], abs=1e-8) and i1.tolist() == pytest.approx([0.5, 0.5], abs=1e-8)
    # a constant map keeps row-major order (stable sort): class 0's row goes first, like the perfect map
    d0, _, _ = M.deletion_insertion_auc(clf, image, torch.zeros_like(maps), labels, steps=4,
                                        start=torch.zeros_like(image))
    assert d0.tolist() == pytest.approx([0.125, 0.875], abs=1e-8)


@pytest.mark.numerics
def test_deletion_insertion_probability_and_errors():
    image, clf = _top_row_toy()
    maps = torch.rand(1, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([[1.0, 0.0]])
    sig = M.deletion_insertion_auc(clf, image, maps, labels, steps=8, prob="sigmoid")
    soft = M.deletion_insertion_auc(clf, image, maps, labels, steps=8, prob="softmax")
    assert sig[2].tolist() == [0] and not torch.allclose(sig[0], soft[0])  # two different probabilities
    assert all(0.0 <= float(v) <= 1.0 for v in (*sig[0], *sig[1], *soft[0], *soft[1]))
    with pytest.raises(ValueError, match="faithfulness_prob"):
        M.deletion_insertion_auc(clf, image, maps, labels, prob="probit")
    with pytest.raises(ValueError, match="faithfulness_steps"):
        M.deletion_insertion_auc(clf, image, maps, labels, steps=0)
    empty = M.deletion_insertion_auc(clf, image, maps, torch.zeros(1, 2))
    assert all(len(v) == 0 for v in empty)


@pytest.mark.numerics
def test_reflect_gaussian_kernel_is_rises_gkern_hand_worked():
    # gkern(11, 5): scipy's 41-tap Gaussian (truncate 4 -> radius 20) on an 11-tap delta, reflect mode. Folding the
    # taps back by hand: the centre collects offsets 0 and +-11, the first tap offsets 5, 6, 16 and 17.
    w = [math.exp(-0.5 * t * t / 25) for t in range(-20, 21)]
    w = [v / sum(w) for v in w]
    tap = {t: w[t + 20] for t in range(-20, 21)}
    centre, first = tap[0] + 2 * tap[11], tap[5] + tap[6] + tap[16] + tap[17]
    k = M.reflect_gaussian_kernel(11, 5.0)
    assert k.dtype == torch.float64 and k.shape == (11, 11)
    assert float(k[5, 5]) == pytest.approx(centre**2, rel=1e-12) and float(k[0, 0]) == pytest.approx(first**2,
                                                                                                     rel=1e-12)
    assert float(k[5, 5]) == pytest.approx(0.0088, abs=5e-5) and float(k[0, 0]) == pytest.approx(0.0077, abs=5e-5)
    assert float(k.sum()) == pytest.approx(1.0, abs=1e-12)  # reflection keeps every tap inside
    assert M.blur_taps(224) == (11, 5.0) and M.blur_taps(64)[0] == 3


@pytest.mark.numerics
def test_insertion_start_is_rises_zero_padded_blur():
    flat = torch.ones(1, 3, 32, 32, dtype=torch.float64)
    blurred = M.insertion_start(flat)  # gkern(11, 5), zero padding: the border darkens as in the RISE code
    k = M.reflect_gaussian_kernel(11, 5.0)
    assert float(blurred[0, 0, 0, 0]) == pytest.approx(float(k[5:, 5:].sum()), rel=1e-12)
    assert float(blurred[0, 0, 0, 0]) == pytest.approx(0.30, abs=0.01)
    assert float(blurred[0, 1, 16, 16]) == pytest.approx(1.0, abs=1e-12)  # far from the border: flat stays flat
    dot = torch.zeros(1, 3, 16, 16, dtype=torch.float64)
    dot[0, 1, 8, 8] = 1.0
    spread = M.insertion_start(dot)
    assert torch.allclose(spread[0, 1, 3:14, 3:14], k) and spread[0, 0].abs().max() == 0  # channels stay apart


def test_step_counts_ours_and_rises():
    assert M.step_counts(16, steps=4).tolist() == [0, 4, 8, 12, 16]
    assert M.step_counts(10, steps=4).tolist() == [0, 2, 5, 8, 10]  # round(k Z / K)
    assert M.step_counts(16, step_pixels=5).tolist() == [0, 5, 10, 15, 16]  # RISE: fixed steps, a short last one
    with pytest.raises(ValueError, match="step_pixels"):
        M.step_counts(16, step_pixels=0)


@pytest.mark.numerics
def test_coarse_maps_are_upsampled_and_finer_ones_refused():
    image, clf = _top_row_toy()
    image = image.double()
    coarse = torch.tensor([[[[2.0, 2.0], [1.0, 1.0]], [[1.0, 1.0], [2.0, 2.0]]]], dtype=torch.float64)  # [1,2,2,2]
    labels = torch.tensor([[1.0, 1.0]])
    got = M.deletion_insertion_auc(clf, image, coarse, labels, steps=4, start=torch.zeros_like(image))
    up = torch.nn.functional.interpolate(coarse, size=(4, 4), mode="bilinear", align_corners=False)
    want = M.deletion_insertion_auc(clf, image, up, labels, steps=4, start=torch.zeros_like(image))
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert got[0].tolist() == pytest.approx([0.125, 0.125], abs=1e-8)  # each class's own row first
    with pytest.raises(ValueError, match="never finer"):
        M.deletion_insertion_auc(clf, image, torch.rand(1, 2, 8, 8), labels, steps=4)


@pytest.mark.numerics
def test_deletion_into_the_blur_and_rises_top1_protocol():
    image, clf = _top_row_toy()
    image = image.double()
    rank = torch.arange(16.0, dtype=torch.float64).flip(0).reshape(4, 4)
    maps = torch.stack([rank, rank])[None]
    labels = torch.tensor([[1.0, 1.0]])
    # deleting into a "blur" equal to the image changes nothing: the curve stays at p = 1 - 1e-9 (clamped)
    d, _, _ = M.deletion_insertion_auc(clf, image, maps, labels, steps=4, start=image.clone(),
                                       deletion_substrate="blur")
    assert d.tolist() == pytest.approx([1.0, 1.0], abs=1e-6)
    with pytest.raises(ValueError, match="deletion_substrate"):
        M.deletion_insertion_auc(clf, image, maps, labels, deletion_substrate="noise")
    # RISE: the top-1 class only (softmax); two classes at equal logit -> argmax picks class 0, one AUC per image
    d, i, cls = M.rise_deletion_insertion_auc(clf, image, maps)
    assert cls.tolist() == [0] and len(d) == len(i) == 1
    # the notebook's batch evaluation removes eight rows' worth (here 32 px, more than the 16 there are) per step,
    # for deletion as for insertion: one step takes every pixel, both classes are equal again -> 0.5, 0.5 -> 0.5
    assert float(d[0]) == pytest.approx(0.5, abs=1e-6) and M.RISE_STEP_ROWS == 8
    assert "224 x 8 px per step" in M.RISE_PROTOCOL and "deletion and insertion" in M.RISE_PROTOCOL


def test_pointing_game_in_original_pixels_hand_computed():
    maps = torch.zeros(1, 1, 8, 8)
    maps[0, 0, 0, 0] = 1.0  # the top-left cell; resized bilinearly to 80 x 40 its maximum is pixel (0, 0)
    labels = torch.ones(1, 1)
    sizes = torch.tensor([[80, 40]])  # W, H
    seg = torch.zeros(8, 8, dtype=torch.uint8)
    seg[0, 2] = 1  # cell (row 0, col 2) = original columns 20..29, rows 0..4: nearest pixel at distance 20
    hit = M.pointing_game(maps, labels, sizes, 15.0, [seg], None)
    assert hit["mask"].tolist() == [0] and hit["box"].tolist() == [-1]  # 20 px away: a miss at 15 px
    assert M.pointing_game(maps, labels, sizes, 20.5, [seg], None)["mask"].tolist() == [1]
    # the old rule (15 px scaled to the 8 px frame = 0.54 px) missed too; in the 8 px frame the object is 2 cells
    # away, so 15 * 8 / 224 was the wrong unit; per axis: 10 px per column, 5 px per row
    seg[0, 2], seg[2, 0] = 0, 1  # now rows 10..14 at column 0..9: distance 10 < 15 -> a hit
    assert M.pointing_game(maps, labels, sizes, 15.0, [seg], None)["mask"].tolist() == [1]


@pytest.mark.parametrize("resize", ["squash", "center_crop", "letterbox"])
def test_pointing_game_maps_back_through_each_resize_mode_as_torchray_scores_the_original(resize):
    """Issue 26: the point was found as if every image had been squashed, up to 62 px off for center_crop and
    letterbox. For a 96 x 48 image fitted to 32 px by each data.resize mode (fit_image, as the loader does), a
    saliency peak and a one-pixel box / a small mask around it on the ORIGINAL image: TorchRay's protocol there
    (tests/_anchor_torchray.py: the map at the image's size, its argmax, the disc test) and ours on the fitted map
    must find the same point to within the 32 px frame's resolution and score the same hits."""
    import numpy as np
    from _anchor_torchray import HIT, AnchorPointingGame, saliency_point
    from PIL import Image

    from explainer.data.transforms import fit_image

    w, h, s = 96, 48, 32
    game = AnchorPointingGame(num_classes=1, tolerance=15)
    yy, xx = np.mgrid[0:h, 0:w]
    for u0, v0 in [(66, 40), (30, 8), (48, 24)]:  # inside center_crop's square (columns 24..71)
        saliency = np.exp(-((xx - u0) ** 2 + (yy - v0) ** 2) / (2 * 4.0**2)).astype(np.float32)
        seg = (((xx - u0) ** 2 + (yy - v0) ** 2) <= 36).astype(np.uint8)  # class 0 -> value 1
        fitted = np.asarray(fit_image(Image.fromarray(saliency, mode="F"), s, resize, fill=0))
        fitted_seg = np.asarray(fit_image(Image.fromarray(seg, mode="L"), s, resize, resample=Image.NEAREST))
        theirs = saliency_point(torch.from_numpy(saliency), w, h)
        assert theirs == (u0, v0)
        maps, sizes = torch.from_numpy(fitted.copy())[None, None], torch.tensor([[w, h]])
        ours = M.points_in_original(maps[:, 0], sizes, resize)[0].tolist()
        assert math.dist(ours, theirs) <= 3.0, (resize, ours, theirs)  # 3 px: one cell of the 32 px letterbox
        box = torch.tensor([[0, u0 + 1, v0 + 1, u0 + 1, v0 + 1, 0]])  # 1-based inclusive: the peak's pixel
        res = M.pointing_game(maps, torch.ones(1, 1), sizes, 15.0, [torch.from_numpy(fitted_seg.copy())], [box],
                              resize)
        assert game.test(torch.from_numpy(seg.astype(bool)), theirs) == HIT
        assert res["box"].tolist() == [1] and res["mask"].tolist() == [1], (resize, u0, v0, ours)
        far = torch.tensor([[0, u0 + 1, 1, u0 + 1, 1, 0]]) if v0 > 20 else torch.tensor([[0, u0 + 1, h, u0 + 1, h, 0]])
        assert M.pointing_game(maps, torch.ones(1, 1), sizes, 15.0, None, [far], resize)["box"].tolist() == [0]


def test_pointing_game_void_difficult_and_boxes():
    maps = torch.zeros(1, 2, 10, 10)
    maps[0, :, 5, 5] = 1.0
    labels = torch.ones(1, 2)
    sizes = torch.tensor([[10, 10]])
    seg = torch.zeros(10, 10, dtype=torch.uint8)
    seg[5, 5] = 255  # void right under the point (the outline of class 1's object, far away)
    seg[0, 0] = 2
    res = M.pointing_game(maps, labels, sizes, 2.0, [seg], None)
    assert res["mask"].tolist() == [0, 0]  # void counts for no class
    # boxes: class 0 at x 8..9 (VOC 1-based 9..10), one difficult box of class 1 over the point
    objects = torch.tensor([[0, 9, 1, 10, 10, 0], [1, 5, 5, 7, 7, 1]])
    res = M.pointing_game(maps, labels, sizes, 3.0, [seg], [objects])
    assert res["box"].tolist() == [0, -1] and res["skipped"].tolist() == [False, True]  # box 3 px away: strict <
    assert res["mask"].tolist() == [0, -1]  # a skipped pair is scored by neither test
    assert M.pointing_game(maps, labels, sizes, 3.01, [seg], [objects])["box"].tolist() == [1, -1]


def test_torchray_accuracy_counts_classes_without_pairs_as_zero():
    hits = torch.tensor([1.0, 3.0, 0.0])
    pairs = torch.tensor([2.0, 4.0, 0.0])
    assert M.torchray_accuracy(hits, pairs) == pytest.approx((0.5 + 0.75 + 0.0) / 3)


@pytest.mark.numerics
def test_classification_counts_and_prf():
    logits = torch.tensor([[0.5, -0.5, 2.0], [-2.0, 0.0, -0.9], [1.0, -3.0, -1.5]])
    labels = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    clean = M.classification_counts(logits, labels, 0.0)
    assert clean.tolist() == [[1, 0, 0], [1, 1, 1], [1, 1, 1]]  # tp, fp, fn per class
    s = M.precision_recall_f1(clean)
    assert s["precision"] == pytest.approx(1 / 4) and s["recall"] == pytest.approx(1 / 4)
    assert s["f1"] == pytest.approx(1 / 4)
    masked = M.precision_recall_f1(M.classification_counts(logits, labels, -1.0))
    # at -1: predictions (0,0) (0,1) (0,2) (1,1) (1,2) (2,0) -> tp 3 of 6 predicted, 3 of 4 true
    assert masked["precision"] == pytest.approx(3 / 6) and masked["recall"] == pytest.approx(3 / 4)
    assert masked["f1"] == pytest.approx(2 * 0.5 * 0.75 / 1.25)
    assert M.precision_recall_f1(torch.zeros(3, 2))["f1"] == 0.0


@pytest.mark.numerics
def test_totals_local():
    t = M.Totals()
    t.add_values("iou", torch.tensor([0.5, 1.0]))
    t.add_values("iou", torch.tensor([0.0]))
    assert t.mean("iou") == pytest.approx(0.5) and t.count("iou") == 3
    assert math.isnan(t.mean("missing"))
    with pytest.raises(ValueError, match="non-finite"):
        t.add_values("sal", torch.tensor([float("inf")]))
    t.add("m", torch.ones(2, 2))
    with pytest.raises(ValueError, match="shape"):
        t.add("m", torch.ones(3))


def _reduce_worker(rank: int, world: int, init: str, queue) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    t = M.Totals()
    if rank == 0:
        t.add_values("iou", torch.tensor([1.0, 2.0]))
        t.add("table", torch.ones(2, 3))
    else:
        t.add_values("iou", torch.tensor([6.0]))
        t.add_values("only_rank1", torch.tensor([4.0]))
    t.all_reduce()
    queue.put((rank, t.mean("iou"), t.count("iou"), t.mean("only_rank1"), t.get("table").sum().item()))
    dist.destroy_process_group()


@pytest.mark.numerics
@pytest.mark.slow
def test_totals_all_reduce_two_processes(tmp_path):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    init = f"file://{tmp_path / 'pg'}"
    procs = [ctx.Process(target=_reduce_worker, args=(r, 2, init, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    for _, mean, count, only1, table in results:
        assert mean == pytest.approx(3.0) and count == 3 and only1 == pytest.approx(4.0) and table == 6.0
