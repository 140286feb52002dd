"""The per-class audit on the colour toy with a known answer (an oracle mask and one that avoids the object), object
regions from boxes and from segmentations, and its W&B table (a real offline run). The ranking on a real biased
classifier is tested with the bias study (tests/test_bias.py)."""

from __future__ import annotations

import json

import pytest
import torch
from _helpers import colour_classifier
from test_evaluate import CLASSES, ORIG, S, _with_boxes, toy_batch
from torch import nn

from explainer.audit import Audit, log_audit_to_wandb, object_regions, write_audit

pytestmark = pytest.mark.usefixtures("one_thread")


class Avoider(nn.Module):
    """Class 0 ("red"): a mask everywhere but the object; class 1: the oracle."""

    def forward(self, x):
        out = 40 * (x[:, :2] - 0.5)
        out[:, 0] = -out[:, 0]
        return out


def test_object_regions_from_boxes_else_segmentation():
    batch = _with_boxes(toy_batch(0))
    pairs = (batch["labels"] > 0).nonzero()
    from_boxes = object_regions(batch, pairs, S, "squash")
    from_seg = object_regions({k: v for k, v in batch.items() if k != "objects"}, pairs, S, "squash")
    for (i, k), box, seg in zip(pairs.tolist(), from_boxes, from_seg):
        assert torch.equal(seg, batch["seg_classes"][i] == k + 1)
        # the helper draws the 8 x 8 object's box at 9 px per cell in a 224 px original (216 used), so mapped back to
        # 24 px it is the same square up to a pixel or two of drift toward the top left
        iou = float((box & seg).sum() / (box | seg).sum())
        assert iou > 0.5 and box.sum() >= 49, (i, k, iou)
    assert ORIG != S  # (the boxes do go through a resize)


@pytest.mark.numerics
def test_audit_ranks_the_class_whose_mask_avoids_the_object_first(tmp_path, monkeypatch):
    clf = colour_classifier(gain=40)
    audit = Audit(clf, Avoider(), CLASSES)
    for seed in range(3):
        audit.update(_with_boxes(toy_batch(seed)))
    res = audit.finish()
    red, green = res["classes"]
    assert [red["class"], green["class"], red["rank"]] == ["red", "green", 1]
    # (boxes mapped from 224 px back to 24 px are a pixel off the objects: "within a few percent")
    assert red["energy_inside"] < 0.05 and green["energy_inside"] > 0.95  # the oracle's energy is on the object
    assert red["excess_outside"] == pytest.approx(red["object_area"], abs=0.05)  # all outside: 1 - (1 - area)
    assert green["excess_outside"] == pytest.approx(green["object_area"] - 1, abs=0.05)
    # the colour classifier sees only the object: removing it drops the class, removing the background does not
    assert red["evidence_outside"] == green["evidence_outside"] == 0.0
    assert red["p_object_removed"] < 0.5 < red["p_background_removed"]
    assert res["n_images"] == 12 and red["pairs"] + green["pairs"] == sum(
        int(toy_batch(s)["labels"].sum()) for s in range(3))

    res["settings"] = {"checkpoint": str(tmp_path / "run" / "explainer.pt")}
    write_audit(res, audit, tmp_path / "audit", top=1)
    assert json.loads((tmp_path / "audit" / "audit.json").read_text())["figures"] == ["figures/audit_1_red.png"]
    assert "| 1 | red |" in (tmp_path / "audit" / "report.md").read_text()

    from explainer.config import TrackingConfig

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    assert log_audit_to_wandb(res, tmp_path / "audit", TrackingConfig(wandb_mode="disabled"), "x.pt") is None
    folder = log_audit_to_wandb(res, tmp_path / "audit", TrackingConfig(wandb_mode="auto", project="test"),
                                res["settings"]["checkpoint"])
    table = json.loads(next(folder.glob("files/media/table/audit/classes_*.table.json")).read_text())
    assert [row[1] for row in table["data"]] == ["red", "green"] and "excess_outside" in table["columns"]
    assert len(list(folder.glob("files/media/images/audit/figures/*.png"))) == 1


def test_audit_command_errors_exit_2(tmp_path, capsys):
    from explainer.audit import main
    from explainer.models import build_explainer, save_model_file

    with pytest.raises(SystemExit) as exc:
        main(["--checkpoint", str(tmp_path / "nowhere")])
    assert exc.value.code == 2
    path = save_model_file(tmp_path / "run" / "explainer.pt", build_explainer("tiny_unet", 2), kind="explainer",
                           arch="tiny_unet", num_classes=2, classes=CLASSES, image_size=S)
    with pytest.raises(SystemExit) as exc:
        main(["--checkpoint", str(path.parent)])  # a run folder without its config.yaml
    assert exc.value.code == 2
    assert "config.yaml does not exist (pass --config)" in capsys.readouterr().err
