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


@pytest.mark.numerics
@pytest.mark.slow
def test_audit_two_processes_give_the_numbers_of_one(synthetic_manifest, tiny_classifier, tmp_path):
    """torchrun, 2 gloo processes, on real shards (an untrained tiny U-Net: only the bookkeeping matters): the class
    table equals the Audit class's over the same split in this process, and rank 0 draws the merged galleries."""
    from _helpers import PYTHON, free_port, run_cmd

    from explainer.config import DataConfig
    from explainer.data import make_eval_loader, read_manifest
    from explainer.models import build_explainer, load_classifier, save_model_file

    classes = read_manifest(synthetic_manifest).classes
    torch.manual_seed(0)
    net = build_explainer("tiny_unet", len(classes))
    path = save_model_file(tmp_path / "run" / "explainer.pt", net, kind="explainer", arch="tiny_unet",
                           num_classes=len(classes), classes=list(classes), image_size=32)
    run_cmd([PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
             "--master_port", str(free_port()), "-m", "explainer.audit", "--checkpoint", str(path), "--config",
             "configs/synthetic.yaml", "--classifier", str(tiny_classifier), "--out", str(tmp_path / "audit"),
             f"data.manifest={synthetic_manifest}", "data.image_size=32", "data.batch_size=8", "data.num_workers=0",
             "tracking.wandb_mode=disabled"], env={"ACCELERATE_USE_CPU": "1"})
    two = json.loads((tmp_path / "audit" / "audit.json").read_text())
    clf, _ = load_classifier(tiny_classifier)
    audit = Audit(clf.eval(), net.eval(), classes)
    for batch in make_eval_loader(DataConfig(image_size=32, batch_size=8, num_workers=0), read_manifest(
            synthetic_manifest), "test", rank=0, world_size=1):
        audit.update(batch)
    one = audit.finish()
    assert two["settings"]["world_size"] == 2 and two["n_images"] == one["n_images"] > 0
    assert [r["class"] for r in two["classes"]] == [r["class"] for r in one["classes"]]
    for a, b in zip(one["classes"], two["classes"]):
        for key in ("pairs", "energy_inside", "object_area", "mask_area", "p_object_removed", "evidence_outside"):
            assert b[key] == pytest.approx(a[key], abs=1e-6), (a["class"], key)
    assert len(two["figures"]) == 3 and all((tmp_path / "audit" / f).is_file() for f in two["figures"])
