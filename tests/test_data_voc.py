"""VOC layout -> shards: labels and class order, difficult switch, splits, original bytes, every bad-input case."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pytest
from _data_helpers import (
    BAD_SKIPPED,
    GOOD_VOC,
    MAKE_SHARDS,
    ODD_WARNED,
    VOC_SPLITS,
    make_shards,
    make_voc_tree,
    samples_of,
)
from PIL import Image

from explainer.config import DataConfig
from explainer.data import make_eval_loader, make_train_loader, read_manifest
from explainer.data.voc import VOC_CLASSES, voc_palette


@pytest.fixture(scope="module")
def voc_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("voc")
    voc = make_voc_tree(root)
    out = root / "shards"
    assert make_shards("voc", "--root", str(root), "--out", str(out), "--workers", "2", "--shard-maxcount", "3") == 0
    return voc, out


def test_labels_class_order_and_splits(voc_shards):
    voc, out = voc_shards
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dataset"] == "voc2007"
    assert manifest["classes"] == list(VOC_CLASSES) and len(VOC_CLASSES) == 20
    assert manifest["classes"][0] == "aeroplane" and manifest["classes"][-1] == "tvmonitor"
    assert set(manifest["splits"]) == {"train", "val", "test"}
    for split, ids in VOC_SPLITS.items():
        samples = samples_of(out, split)
        assert list(samples) == ids  # ImageSets order, nothing lost or added
        assert manifest["splits"][split]["total"] == len(ids)
        for image_id in ids:
            meta = json.loads(samples[image_id]["json"])
            names = {name for name, _ in GOOD_VOC[image_id][0]}  # difficult objects included by default
            assert meta["classes"] == [c for c in VOC_CLASSES if c in names]
            assert meta["labels"] == [int(c in names) for c in VOC_CLASSES]
            assert meta["source_id"] == image_id and meta["orig_size"] == [48, 40]
            # every object's box and difficult flag, for the pointing game as TorchRay scores it
            assert meta["objects"] == [[VOC_CLASSES.index(name), 1, 1, 10, 10, d]
                                       for name, d in GOOD_VOC[image_id][0]]
    # shards of at most 3 samples; every shard listed with its count
    train = manifest["splits"]["train"]["shards"]
    assert [s["count"] for s in train] == [3, 1] and [s["path"] for s in train] == ["train-000000.tar",
                                                                                   "train-000001.tar"]
    assert manifest["skipped"] == [] and manifest["warnings"] == []
    assert "make_shards.py voc" in manifest["command"] and manifest["versions"]["webdataset"]


def test_original_bytes_and_segmentation_kept(voc_shards):
    voc, out = voc_shards
    samples = samples_of(out, "test")
    for image_id in VOC_SPLITS["test"]:
        assert samples[image_id]["jpg"] == (voc / "JPEGImages" / f"{image_id}.jpg").read_bytes()
        seg = voc / "SegmentationClass" / f"{image_id}.png"
        if seg.exists():
            assert samples[image_id]["seg.png"] == seg.read_bytes()
            assert Image.open(io.BytesIO(samples[image_id]["seg.png"])).mode == "P"
        else:
            assert "seg.png" not in samples[image_id]
        assert set(samples[image_id]) <= {"jpg", "json", "seg.png"}  # no pickles, nothing else


def test_exclude_difficult_switch(tmp_path):
    make_voc_tree(tmp_path)
    out = tmp_path / "out"
    assert make_shards("voc", "--root", str(tmp_path / "VOCdevkit"), "--out", str(out), "--workers", "1",
                       "--exclude-difficult", "--splits", "train,val") == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["splits"]) == {"train", "val"}
    train, val = samples_of(out, "train"), samples_of(out, "val")
    assert json.loads(train["000003"]["json"])["classes"] == ["tvmonitor"]  # difficult cat dropped
    assert not any(json.loads(val["000006"]["json"])["labels"])  # only a difficult car: all-zero label
    assert manifest["splits"]["val"]["shards"][0]["unlabelled"] == [1]
    assert manifest["options"]["exclude_difficult"] is True


def test_bad_inputs_are_reported_and_good_samples_kept(tmp_path, capsys):
    make_voc_tree(tmp_path, bad=True)
    out = tmp_path / "out"
    assert make_shards("voc", "--root", str(tmp_path), "--out", str(out), "--workers", "2",
                       "--shard-maxcount", "4") == 0
    printed = capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    skipped = {p["key"]: p for p in manifest["skipped"]}
    assert set(skipped) == set(BAD_SKIPPED)
    for key, reason in BAD_SKIPPED.items():
        assert reason in skipped[key]["reason"], skipped[key]
        assert key in skipped[key]["file"] and skipped[key]["split"] == "train"
        assert skipped[key]["file"] in printed  # the summary names every file
    warned = {}
    for p in manifest["warnings"]:
        warned.setdefault(p["key"], []).append(p["reason"])
    assert set(warned) == set(ODD_WARNED)
    for key, reason in ODD_WARNED.items():
        assert any(reason in r for r in warned[key]), warned[key]
    # every good and odd sample is in the shards, in ImageSets order
    train = samples_of(out, "train")
    assert list(train) == VOC_SPLITS["train"] + list(ODD_WARNED)
    assert "png" in train["odd_png_as_jpg"] and "jpg" not in train["odd_png_as_jpg"]  # real format, same bytes
    assert not any(json.loads(train["odd_no_objects"]["json"])["labels"])
    # odd images decode to 3-channel RGB in the loader
    cfg = DataConfig(image_size=32, batch_size=3, num_workers=0)
    manifest_obj = read_manifest(out / "manifest.json")
    keys, shapes = [], set()
    for batch in make_eval_loader(cfg, manifest_obj, "train", rank=0, world_size=1):
        keys += batch["key"]
        shapes.add(tuple(batch["image"].shape[1:]))
        assert torch_isfinite(batch["image"])
    assert keys == list(train) and shapes == {(3, 32, 32)}
    # training drops the unlabelled sample exactly (manifest positions)
    stream = make_train_loader(cfg, manifest_obj, "train", rank=0, world_size=1, seed=0, drop_unlabelled=True)
    seen = [k for b in stream for k in b["key"]]
    assert "odd_no_objects" not in seen and len(seen) == 3 * ((len(train) - 1) // 3)


def torch_isfinite(x) -> bool:
    return bool(np.isfinite(x.numpy()).all())


def test_strict_exits_nonzero_before_writing(tmp_path):
    make_voc_tree(tmp_path, bad=True)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(MAKE_SHARDS), "voc", "--root", str(tmp_path), "--out", str(out),
                           "--strict", "--workers", "1", "--no-progress"], capture_output=True, text=True)
    assert proc.returncode == 1, proc.stderr
    assert "bad_truncated.jpg" in proc.stderr and "unknown class name 'unicorn'" in proc.stderr
    assert not out.exists()


def test_strict_passes_on_clean_input(tmp_path):
    make_voc_tree(tmp_path)
    assert make_shards("voc", "--root", str(tmp_path), "--out", str(tmp_path / "out"), "--strict") == 0


def test_unusable_source_folder_is_a_clear_error(tmp_path, capsys):
    assert make_shards("voc", "--root", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")) == 2
    assert "is not a VOC folder" in capsys.readouterr().err


def test_bad_segmentation_keeps_the_sample(tmp_path):
    voc = make_voc_tree(tmp_path)
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(voc / "SegmentationClass" / "000007.png")  # RGB, wrong
    (voc / "SegmentationClass" / "000009.png").write_bytes(b"\x89PNG broken")
    out = tmp_path / "out"
    assert make_shards("voc", "--root", str(tmp_path), "--out", str(out), "--splits", "test") == 0
    manifest = json.loads((out / "manifest.json").read_text())
    test = samples_of(out, "test")
    assert list(test) == VOC_SPLITS["test"]
    assert "seg.png" not in test["000007"] and "seg.png" not in test["000009"]
    reasons = {p["key"]: p["reason"] for p in manifest["warnings"]}
    assert "mode RGB" in reasons["000007"] and "unreadable" in reasons["000009"]


def test_verify_decode_catches_damage_the_cheap_checks_miss(tmp_path):
    voc = make_voc_tree(tmp_path)
    jpg = voc / "JPEGImages" / "000008.jpg"
    data = jpg.read_bytes()
    jpg.write_bytes(data[:600] + bytes(800) + data[1400:])  # zeroed middle, end marker intact
    seg = np.zeros((40, 48), np.uint8)
    seg[3:9, 3:9] = 33  # no class 32
    im = Image.fromarray(seg, "P")
    im.putpalette(voc_palette())  # without a full palette PIL would renumber the indices on save
    im.save(voc / "SegmentationClass" / "000010.png")
    fast, full = tmp_path / "fast", tmp_path / "full"
    assert make_shards("voc", "--root", str(tmp_path), "--out", str(fast), "--splits", "test") == 0
    assert make_shards("voc", "--root", str(tmp_path), "--out", str(full), "--splits", "test",
                       "--verify-decode") == 0
    assert "000008" in samples_of(fast, "test") and "seg.png" in samples_of(fast, "test")["000010"]
    manifest = json.loads((full / "manifest.json").read_text())
    assert [(p["key"], "corrupt" in p["reason"]) for p in manifest["skipped"]] == [("000008", True)]
    assert "seg.png" not in samples_of(full, "test")["000010"]
    assert any("class indices [33]" in p["reason"] for p in manifest["warnings"])
