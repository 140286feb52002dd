"""Metrics of SPEC 6 against hand-computed values and the sanity rows' known properties."""

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
