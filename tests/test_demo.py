"""The demo's claims, guarded on a smaller version: a trained Explainer finds the objects, beats Grad-CAM and RISE
on data with known ground truth, and its masks are class-specific (the full version is `make demo`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _helpers import PYTHON, run_cmd, tiny_overrides

from explainer.experiments.demo import quality_checks, seed_row, seeds_markdown, worst_cells


@pytest.fixture(scope="module")
def learned_explainer(synthetic_manifest, tiny_classifier, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("learned")
    run_cmd([PYTHON, "explainer/train.py", "--config", "configs/synthetic.yaml",
             *tiny_overrides(synthetic_manifest, out), f"classifier.checkpoint={tiny_classifier}",
             # 400 steps: the equal-start mask head (explainer.head_init=zero) needs ~250 of them on 96 tiny scenes
             # before its class channels part ways (200 were enough for the old random head)
             "train.max_steps=400", "train.epochs=40", "train.val_every_steps=50", "optim.lr=3e-3",
             "tracking.wandb_mode=disabled"],
            timeout=900)
    return out


@pytest.mark.numerics
@pytest.mark.slow
def test_explainer_learns_to_find_the_objects(learned_explainer):
    """Validation soft IoU of the target mask with the ground truth rises from the ~0.2 of an untrained (all ~0.5)
    mask to well above it, and the mask shrinks from everywhere onto the objects."""
    history = json.loads((learned_explainer / "summary.json").read_text())["history"]
    first, last = history[0], history[-1]
    assert last["mask_iou"] > 0.45, history  # seen: 0.20 at step 25 -> ~0.7 at step 150
    assert last["mask_iou"] > first["mask_iou"] + 0.2, history
    assert last["area_m"] < first["area_m"], history


@pytest.mark.numerics
@pytest.mark.slow
def test_demo_claims_hold_on_tiny_data(synthetic_manifest, tiny_classifier, learned_explainer, tmp_path):
    out = tmp_path / "eval"
    run_cmd([PYTHON, "-m", "explainer.evaluate", "--config", "configs/synthetic.yaml",
             f"data.manifest={synthetic_manifest}", "data.image_size=32", "data.num_workers=0",
             f"classifier.checkpoint={tiny_classifier}", "eval.rise_masks=400",
             "--checkpoint", str(learned_explainer / "explainer.pt"), "--methods", "explainer,gradcam,rise",
             "--out", str(out), "--no-progress"], timeout=600)
    results = json.loads((out / "results.json").read_text())
    checks = quality_checks(results)
    assert len(checks) == 6  # F1, IoU and MAE vs Grad-CAM and RISE, class-specific
    # the worst-cell bar (80 / 25) is for the full demo; 200 steps on 32 px scenes only show the direction
    failed = [sentence for passed, sentence in checks[:-1] if not passed]
    assert not failed, failed
    cs = results["class_specific"]["explainer"]
    assert cs["mean_diagonal"] > 2 * cs["mean_off_diagonal"], cs
    # The guard against a dark class channel, or one that also covers another class's objects. train.seed 0, 1, 2
    # give a lowest diagonal of 99.98 and a highest off-diagonal of 33.8 here (a blanked image: ~25 with 4 classes);
    # the same runs without the preset's loss.w_class_specific: 44-69 and 72-92, failing both bars at every seed.
    worst, names = worst_cells(cs)
    assert worst["min_diagonal"] >= 0.9 and worst["max_off_diagonal"] <= 0.5, (worst, names)
    assert set(results["faithfulness"]["methods"]) == {"explainer", "gradcam", "rise"}


# the demo's seed-0 table before the head fix (docs/results.md#class-specific-term): the square channel is dark
DEAD_SQUARE = [[0.9034, 0.2176, 0.0981, 0.0944, 0.1149, 0.0870, 0.3894],
               [0.7079, 0.1787, 0.7653, 0.7896, 0.7759, 0.7721, 0.4001],
               [0.0900, 0.1809, 0.8848, 0.0930, 0.0958, 0.0826, 0.4778],
               [0.0939, 0.1706, 0.0953, 0.8925, 0.1009, 0.0806, 0.4652],
               [0.0695, 0.1125, 0.0651, 0.0652, 0.9039, 0.0661, 0.5767],
               [0.0739, 0.1401, 0.0750, 0.0693, 0.0856, 0.9181, 0.6042]]
CLASSES = ["circle", "square", "triangle", "star", "cross", "ring"]


def _results(table: list[list[float]], iou: float = 0.8) -> dict:
    n = len(table)
    diag = [table[i][i] for i in range(n)]
    off = [table[i][j] for i in range(n) for j in range(n) if i != j]
    cs = {"targets": CLASSES, "columns": CLASSES + ["none"], "table": table, "mean_diagonal": sum(diag) / n,
          "mean_off_diagonal": sum(off) / len(off), "max_off_diagonal": max(off)}
    return {"classification": {"clean": {"f1": 1.0}}, "class_specific": {"explainer": cs},
            "segmentation": {"explainer": {"iou": iou, "mae": 0.03}}}


def test_demo_check_fails_on_one_dark_class_channel():
    """The old mean-based check passed this table (mean diagonal 78.0 > 3 x 21.1); the worst cells fail it."""
    dead = _results(DEAD_SQUARE)
    passed, sentence = quality_checks(dead)[-1]
    assert not passed and "lowest 17.9, square" in sentence and "highest 79.0, square row, star mask" in sentence
    clean = [[0.95 if i == j else 0.10 for j in range(6)] + [0.5] for i in range(6)]
    assert quality_checks(_results(clean))[-1][0]
    worst, names = worst_cells(dead["class_specific"]["explainer"])
    assert worst == {"min_diagonal": 0.1787, "max_off_diagonal": 0.7896}
    rows = [seed_row(0, dead), seed_row(1, _results(clean)), seed_row(2, _results(clean, iou=0.7))]
    assert [r["passed"] for r in rows] == [False, True, False]  # seed 2: IoU below 0.75
    table = seeds_markdown(rows)
    assert "| 0 | 17.9 (square) | 79.0 (square row, star mask) | 0.800 | FAILED |" in table
    assert "| 1 | 95.0 (circle) | 10.0 (circle row, square mask) | 0.800 | ok |" in table
