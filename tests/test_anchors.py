"""Our deletion / insertion and pointing game against ports of the anchors' own code (tests/_anchor_rise.py,
tests/_anchor_torchray.py) on the fixed toy of benchmarks/bench_anchors.py, and the ports against the originals where
they are installed (TorchRay is: the `baselines` extra)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import _anchor_rise as rise
import _anchor_torchray as tr
import numpy as np
import pytest
import torch

from explainer import metrics as M

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_anchors", ROOT / "benchmarks" / "bench_anchors.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.numerics
def test_ours_agrees_with_the_anchors_code_on_the_toy(bench, one_thread):
    rows = bench.compare(seed=0, images=2, size=16)
    assert len(rows) == 13
    for row in rows:
        if row.get("group") == "wsol":  # counts per threshold (and pixel histogram bins) identical
            agree, total = (int(v) for v in row["agree"].split("/"))
            assert agree == total >= 100 and row["pairs"] > 0 and row["max_abs_diff"] < 1e-9, row
        elif row.get("group") == "tied":
            assert row["max_abs_diff"] < 1e-3, row  # the tie order alone differs (see the next-but-one test)
        elif row["check"].startswith("deletion"):
            assert row["max_abs_diff"] < 1e-12, row  # the same arithmetic, float64
        elif row["check"].startswith("insertion"):
            assert row["max_abs_diff"] < 1e-8, row  # RISE stores gkern in float32; we keep it in float64
        else:
            agree, total = (int(v) for v in row["agree"].split("/"))
            assert agree == total > row["pairs"] > 0 and row["max_abs_diff"] == 0, row
    assert "| deletion AUC, RISE protocol" in bench.markdown(rows)


@pytest.mark.numerics
def test_rise_port_gkern_is_ours_in_float32():
    theirs = rise.gkern(11, 5)
    assert theirs.shape == (3, 3, 11, 11) and theirs[0, 1].abs().max() == 0  # channels blurred on their own
    assert torch.equal(theirs[1, 1], M.reflect_gaussian_kernel(11, 5.0).float())
    assert float(theirs[0, 0, 5, 5]) == pytest.approx(0.0088, abs=5e-5)


@pytest.mark.numerics
def test_tie_order_is_a_convention_that_differs_from_rises():
    """A constant map: ours takes pixels in row-major order (stable sort), RISE's flipped argsort the last first."""
    regions = torch.zeros(2, 4, 4, dtype=torch.float64)
    regions[0, 0] = 1  # class 0 lives in the top row
    regions[1, 3] = 1

    def probs(x):
        lit = torch.einsum("bhw,chw->bc", x[:, 0], regions) / regions.sum((1, 2))
        return torch.stack([lit[:, 0], 1 - lit[:, 0]], dim=1)

    class Logits(torch.nn.Module):
        def forward(self, x):
            return torch.log(probs(x).clamp_min(1e-300))

    image = torch.zeros(1, 3, 4, 4, dtype=torch.float64)
    image[0, 0] = regions.amax(0)
    flat = torch.zeros(1, 2, 4, 4, dtype=torch.float64)
    ours, _, _ = M.deletion_insertion_auc(Logits(), image, flat, torch.tensor([[1.0, 0.0]]), steps=4,
                                          prob="softmax", start=torch.zeros_like(image))
    theirs, _ = rise.AnchorCausalMetric(probs, "del", 4, torch.zeros_like).single_run(image, np.zeros((4, 4)), 0)
    assert float(ours[0]) == pytest.approx(0.125)  # the top row goes first: 1, 0, 0, 0, 0
    assert theirs == pytest.approx(0.875)  # the bottom row goes first: 1, 1, 1, 1, 0


def test_torchray_port_matches_torchray():
    from torchray.benchmark.datasets import voc_as_mask
    from torchray.benchmark.pointing_game import PointingGame

    g = torch.Generator().manual_seed(0)
    for tolerance in (1, 3, 15):
        game, port = PointingGame(2, tolerance=tolerance), tr.AnchorPointingGame(2, tolerance)
        for _ in range(20):
            mask = torch.rand(30, 40, generator=g) < 0.02
            point = (int(torch.randint(0, 40, (1,), generator=g)), int(torch.randint(0, 30, (1,), generator=g)))
            cls = int(torch.randint(0, 2, (1,), generator=g))
            outcome = port.test(mask, point)
            assert outcome == game.evaluate(mask, point)
            game.aggregate(outcome, cls)
            port.record(outcome, cls)
        assert port.accuracy == pytest.approx(float(game.accuracy))
    label = tr.voc_label(40, 30, [("cat", 3, 4, 10, 12, 0), ("dog", 1, 1, 40, 30, 1), ("cat", 20, 20, 25, 30, 1)])
    assert torch.equal(tr.boxes_mask(label, "cat"), voc_as_mask(label, 7))  # VOC class 7 = cat
    assert tr.benchmark_outcome(tr.AnchorPointingGame(20), label, "dog", (0, 0)) == tr.SKIP  # all difficult
