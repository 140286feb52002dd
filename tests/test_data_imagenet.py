"""ImageNet-1k -> shards: the three layouts, the devkit's ID order, sorted-wnid classes, boxes clipped and counted,
the ILSVRC quirks, the seeded hold-out, ImageNet-ReaL, parts + merge == one process, --resume per part, and a 2-step
training run + evaluation with boxes on the generated tree (tests/_imagenet_tree.py)."""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from _data_helpers import make_shards, samples_of
from _imagenet_tree import (
    NAMES,
    REAL,
    USED,
    WNIDS,
    expected_samples,
    make_imagenet_tree,
    write_real,
)
from PIL import Image

from explainer.data import read_manifest
from explainer.data.imagenet import hold_out
from explainer.data.transforms import decode_rgb

ROOT = Path(__file__).resolve().parents[1]
EXPECTED = expected_samples()
COUNTS = {"png_named_jpeg": 1, "cmyk": 1, "grayscale": 2, "boxes_clipped": 3, "boxes_dropped": 1,
          "other_warnings": 0, "train_without_boxes": 6}


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    base = tmp_path_factory.mktemp("imagenet")
    roots = {layout: make_imagenet_tree(base / layout, layout, meta_bin=layout == "torchvision")
             for layout in ("ilsvrc", "archives", "torchvision")}
    # the other ways people have them: the archives without the devkit (val labelled by its box XMLs' object
    # names), torchvision's layout with neither meta.bin nor devkit (both: names from --synset-mapping)
    roots["archives_no_devkit"] = make_imagenet_tree(base / "archives_no_devkit", "archives", devkit=False)
    roots["torchvision_bare"] = make_imagenet_tree(base / "torchvision_bare", "torchvision")
    # the val box XMLs unpacked over the val images, the train boxes somewhere else (--train-boxes)
    moved = make_imagenet_tree(base / "archives_moved_boxes", "archives")
    for xml in (moved / "ILSVRC2012_bbox_val_v3" / "val").iterdir():
        xml.rename(moved / "val" / xml.name)
    shutil.rmtree(moved / "ILSVRC2012_bbox_val_v3")
    (moved / "ILSVRC2012_bbox_train_v2").rename(base / "my_train_boxes")
    roots["archives_moved_boxes"] = moved
    return base, roots


def _shard(root, out, *extra: str) -> None:
    assert make_shards("imagenet", "--root", str(root), "--out", str(out), "--val-per-class", "1", "--workers", "1",
                       "--shard-maxcount", "4", *extra) == 0


def _check_samples(out, layout: str) -> None:
    """Every split holds exactly the generated images, with sorted-wnid labels, original bytes, clipped boxes."""
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["classes"][0] == "thing 0" and len(manifest["classes"]) == 1000
    assert manifest["classes"][5] == f"crane ({WNIDS[5]})" and manifest["classes"][700] == f"crane ({WNIDS[700]})"
    assert manifest["imagenet"]["wnids"] == WNIDS and manifest["imagenet"]["layout"] == layout
    assert manifest["imagenet"]["names"][1] == NAMES[WNIDS[1]]
    assert manifest["imagenet"]["counts"] == COUNTS
    train, val, test = (samples_of(out, s) for s in ("train", "val", "test"))
    assert set(train) | set(val) == set(EXPECTED["train"]) and not set(train) & set(val)
    assert list(test) == list(EXPECTED["test"])  # file order
    for split, samples in (("train", {**train, **val}), ("test", test)):
        for key, members in samples.items():
            exp = EXPECTED[split][key]
            meta = json.loads(members["json"])
            assert meta["labels"] == [int(w in exp.wnids) for w in WNIDS], (layout, key)
            assert members[exp.ext] == exp.image and meta["orig_size"] == [40, 32]
            assert meta.get("objects") == exp.objects, (layout, key)


@pytest.mark.parametrize(("tree", "layout", "labels_from"), [
    ("ilsvrc", "ilsvrc", "LOC_val_solution.csv"),
    ("archives", "archives", "ILSVRC2012_validation_ground_truth.txt"),
    ("archives_no_devkit", "archives", "object names of"),
    ("archives_moved_boxes", "archives", "ILSVRC2012_validation_ground_truth.txt"),
    ("torchvision", "torchvision", "class folders"),
    ("torchvision_bare", "torchvision", "class folders"),
])
def test_each_layout_gives_the_same_samples(trees, tree, layout, labels_from, tmp_path, capsys):
    base, roots = trees
    mapping = str(roots["ilsvrc"] / "LOC_synset_mapping.txt")
    extra = ["--synset-mapping", mapping] if tree.endswith(("_bare", "_devkit")) else []
    if tree == "archives_moved_boxes":
        extra = ["--train-boxes", str(base / "my_train_boxes")]
    _shard(roots[tree], tmp_path / "out", *extra)
    printed = capsys.readouterr().out
    assert f"imagenet layout: {layout};" in printed and "png named jpeg 1" in printed and labels_from in printed
    _check_samples(tmp_path / "out", layout)


def test_without_any_synset_mapping_the_classes_are_the_folders_wnids(trees, tmp_path, capsys):
    _, roots = trees
    _shard(roots["torchvision_bare"], tmp_path / "out")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["classes"] == manifest["imagenet"]["wnids"] == USED
    assert "class names from none" in capsys.readouterr().out


def test_a_damaged_image_is_skipped_by_file(trees, tmp_path):
    _, roots = trees
    root = tmp_path / "copy"
    shutil.copytree(roots["ilsvrc"], root)
    victim = root / "ILSVRC" / "Data" / "CLS-LOC" / "train" / USED[2] / f"{USED[2]}_0.JPEG"
    victim.write_bytes(victim.read_bytes()[:200])
    _shard(root, tmp_path / "out")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [(p["file"], p["key"]) for p in manifest["skipped"]] == [(str(victim), f"{USED[2]}_0")]
    assert "not a readable image" in manifest["skipped"][0]["reason"]
    assert sum(manifest["splits"][s]["total"] for s in ("train", "val")) == 11


def test_devkit_ids_are_not_the_sorted_order_and_are_mapped(trees):
    """The archives tree labels val through meta.mat's ILSVRC2012_IDs, which are shuffled: reading an ID as a
    sorted-wnid index would mislabel (checked), and the layout test above found the right labels."""
    _, roots = trees
    ids = [int(v) for v in (roots["archives"] / "ILSVRC2012_devkit_t12" / "data" /
                            "ILSVRC2012_validation_ground_truth.txt").read_text().split()]
    assert [WNIDS[i - 1] for i in ids] != [EXPECTED["test"][k].wnids[0] for k in EXPECTED["test"]]


def test_hold_out_is_seeded_per_class_and_independent_of_the_other_classes(trees, tmp_path):
    _, roots = trees
    _shard(roots["ilsvrc"], tmp_path / "a", "--seed", "3")
    val = samples_of(tmp_path / "a", "val")
    assert sorted(val) == sorted(k for w in USED for k in hold_out(
        [type("F", (), {"stem": s})() for s in EXPECTED["train"] if s.startswith(w)], w, 1, 3))
    assert len(val) == 3 and {k.split("_")[0] for k in val} == set(USED)
    draws = {seed: hold_out([type("F", (), {"stem": f"x_{i}"})() for i in range(50)], USED[0], 10, seed)
             for seed in range(3)}
    assert len(draws[0]) == 10 and draws[0] != draws[1] != draws[2]
    train_order = list(samples_of(tmp_path / "a", "train"))
    assert train_order != sorted(train_order)  # shuffled, so shards mix classes


def test_real_labels_make_the_test_split_multi_label(trees, tmp_path):
    _, roots = trees
    real = write_real(tmp_path / "real.json")
    _shard(roots["ilsvrc"], tmp_path / "out", "--real-labels", str(real))
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["splits"]["test"]["unlabelled"] == 1 and manifest["splits"]["test"]["total"] == 6
    test = samples_of(tmp_path / "out", "test")
    for key, want in zip(EXPECTED["test"], REAL):
        meta = json.loads(test[key]["json"])
        assert [i for i, v in enumerate(meta["labels"]) if v] == want
        assert meta["objects"] == EXPECTED["test"][key].objects  # the boxes stay


def test_bad_sources_are_clear_errors(trees, tmp_path, capsys):
    base, roots = trees
    bad = tmp_path / "bad"
    shutil.copytree(roots["archives"], bad)
    shutil.rmtree(bad / "ILSVRC2012_devkit_t12")
    shutil.rmtree(bad / "ILSVRC2012_bbox_val_v3")
    assert make_shards("imagenet", "--root", str(bad), "--out", str(tmp_path / "o")) == 2
    assert "nothing labels them" in capsys.readouterr().err
    (bad / "val").rename(tmp_path / "val_away")
    (bad / "train" / "n99999999").mkdir()
    assert make_shards("imagenet", "--root", str(bad), "--out", str(tmp_path / "o"), "--synset-mapping",
                       str(roots["ilsvrc"] / "LOC_synset_mapping.txt")) == 2
    assert "n99999999" in capsys.readouterr().err
    real = tmp_path / "real.json"
    real.write_text(json.dumps([[0], [1000]]))
    assert make_shards("imagenet", "--root", str(roots["ilsvrc"]), "--out", str(tmp_path / "o"), "--real-labels",
                       str(real)) == 2
    assert "entry 1 (ILSVRC2012_val_00000002)" in capsys.readouterr().err
    assert make_shards("imagenet", "--root", str(tmp_path / "val_away"), "--out", str(tmp_path / "o")) == 2
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_parts_merged_equal_one_process_and_resume_per_part(trees, tmp_path, capsys):
    """3 parts (one killed halfway and resumed) merged == one process: same keys in the same order, same bytes."""
    _, roots = trees
    root = roots["archives"]
    _shard(root, tmp_path / "one")
    parts = [tmp_path / "merged" / f"part-{i}" for i in range(3)]
    for i, part in enumerate(parts):
        _shard(root, part, "--num-parts", "3", "--part", str(i))
    # part 1 loses a shard: --resume rewrites only that one
    victim = sorted(parts[1].glob("train-*.tar"))[0]
    kept = {p.name: p.stat().st_mtime_ns for p in parts[1].glob("*.tar") if p != victim}
    victim.unlink()
    _shard(root, parts[1], "--num-parts", "3", "--part", "1", "--resume")
    assert victim.is_file() and all(parts[1].joinpath(n).stat().st_mtime_ns == t for n, t in kept.items())
    capsys.readouterr()
    assert make_shards("merge", *map(str, reversed(parts)), "--out", str(tmp_path / "merged")) == 0
    assert "merged 3 parts" in capsys.readouterr().out
    one = json.loads((tmp_path / "one" / "manifest.json").read_text())
    merged = json.loads((tmp_path / "merged" / "manifest.json").read_text())
    for split in ("train", "val", "test"):
        a, b = samples_of(tmp_path / "one", split), samples_of(tmp_path / "merged", split)
        assert list(a) == list(b) and a == b
        assert merged["splits"][split]["total"] == one["splits"][split]["total"]
    assert merged["imagenet"]["counts"] == one["imagenet"]["counts"] == COUNTS
    assert sorted((p["file"], p["reason"]) for p in merged["warnings"]) == sorted(
        (p["file"], p["reason"]) for p in one["warnings"])
    assert all(s["path"].startswith("part-") for s in merged["splits"]["train"]["shards"])
    loaded = read_manifest(tmp_path / "merged" / "manifest.json")  # what training reads: every shard resolves
    assert sum(loaded.splits["train"].counts) == one["splits"]["train"]["total"]
    # parts outside --out are hard-linked, not copied
    outside = tmp_path / "elsewhere"
    assert make_shards("merge", *map(str, parts), "--out", str(outside)) == 0
    linked = next((outside / "parts" / "00000").glob("*.tar"))
    assert os.path.samefile(linked, parts[0] / linked.name)


def test_merge_refuses_parts_that_do_not_belong_together(trees, tmp_path, capsys):
    _, roots = trees
    a = [tmp_path / f"a{i}" for i in range(2)]
    for i, part in enumerate(a):
        _shard(roots["archives"], part, "--num-parts", "2", "--part", str(i))
    other = tmp_path / "b1"
    _shard(roots["archives"], other, "--num-parts", "2", "--part", "1", "--seed", "1")
    cases = [([a[0]], "parts 1 of 2 are missing"), ([a[0], a[0]], "part 0 of 2 given twice"),
             ([a[0], other], "differ in 'seed'"), ([a[0], tmp_path / "nothing"], "has not finished")]
    for folders, message in cases:
        assert make_shards("merge", *map(str, folders), "--out", str(tmp_path / "m")) == 2
        assert message in capsys.readouterr().err
    assert make_shards("imagenet", "--root", str(roots["archives"]), "--out", str(tmp_path / "x"), "--num-parts", "2",
                       "--part", "2") == 2


def test_cmyk_grayscale_and_png_load_as_rgb_like_pil(trees, tmp_path):
    """Stored as read, decoded for the model as torchvision's loader would: PIL's convert('RGB'), then the resize."""
    _, roots = trees
    out = tmp_path / "out"
    _shard(roots["ilsvrc"], out, "--val-per-class", "0")
    train = samples_of(out, "train")
    assert len(train) == 12
    for key in (f"{USED[0]}_2", f"{USED[1]}_1", f"{USED[2]}_3"):  # png, cmyk, gray
        exp = EXPECTED["train"][key]
        assert Image.open(io.BytesIO(exp.image)).mode == exp.mode and train[key][exp.ext] == exp.image
        rgb = np.asarray(Image.open(io.BytesIO(exp.image)).convert("RGB").resize((40, 40), Image.BILINEAR))
        assert np.array_equal(decode_rgb(train[key][exp.ext], 40, "squash"), rgb)


@pytest.mark.parametrize(("preset", "weights"), [("imagenet_resnet50", "weights/resnet50-11ad3fa6.pth"),
                                                 ("imagenet_vit_b_16", "weights/vit_b_16-c867db91.pth")])
def test_presets_validate_and_name_their_missing_weights(preset, weights, tmp_path, monkeypatch):
    from explainer.config import ExplainerRunConfig, load_config
    from explainer.models.explanandum import load_explanandum

    cfg = load_config(ExplainerRunConfig, ROOT / "configs" / f"{preset}.yaml")
    assert (cfg.loss.classification, cfg.data.resize, cfg.train.mixed_precision) == ("ce", "center_crop", "bf16")
    assert cfg.data.batch_size * cfg.optim.grad_accum_steps == 16 and cfg.optim.batch_policy == "reproduce"
    assert cfg.explainer.arch == "deeplabv3_resnet50" and cfg.classifier.checkpoint == weights
    monkeypatch.chdir(tmp_path)  # no weights here
    with pytest.raises(FileNotFoundError, match=weights.split("/")[-1]):
        load_explanandum(cfg.classifier, [f"c{i}" for i in range(1000)], 224)


def test_two_training_steps_and_evaluation_with_boxes_on_the_generated_tree(trees, tmp_path, capsys):
    """The ResNet-50 preset at 64 px with a tiny factory classifier standing in for torchvision's: train 2 steps on
    the shards of the archives layout, then evaluate the test split (the official val) with the pointing game on its
    boxes."""
    from _byo_factory import build as build_user_net

    from explainer.evaluate import main as evaluate_main
    from explainer.train import main as train_main

    _, roots = trees
    out = tmp_path / "shards"
    _shard(roots["archives"], out)
    torch.manual_seed(0)
    torch.save(build_user_net(num_classes=1000, width=4).state_dict(), tmp_path / "user.pt")
    run = tmp_path / "run"
    overrides = [
        f"data.manifest={out / 'manifest.json'}", "data.image_size=64", "data.batch_size=4", "data.num_workers=0",
        "data.shuffle_buffer=8", "classifier.torchvision=null", f"classifier.checkpoint={tmp_path / 'user.pt'}",
        "classifier.factory=_byo_factory:build", "classifier.factory_kwargs={num_classes: 1000, width: 4}",
        "explainer.arch=tiny_unet", "train.mixed_precision=no", "train.channels_last=false",
        "train.sync_batchnorm=false", "tracking.wandb_mode=disabled", f"train.output_dir={run}", "train.max_steps=2",
        "train.val_every_steps=2", "train.val_max_batches=1", "eval.methods=[explainer,gradcam]",
        "eval.faithfulness_steps=4", "eval.faithfulness_rise=false",
    ]
    config = str(ROOT / "configs" / "imagenet_resnet50.yaml")
    # both in this process (no interpreter start-up); the factory's module is importable from tests/
    capsys.readouterr()
    assert train_main(["--config", config, *overrides]) == 0
    assert f"wrote {run / 'explainer.pt'}" in capsys.readouterr().out
    assert evaluate_main(["--config", config, *overrides, "--checkpoint", str(run / "explainer.pt"), "--out",
                          str(tmp_path / "eval"), "--no-progress"]) == 0
    res = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert res["n_images"] == 6
    for method in ("explainer", "gradcam"):
        row = res["faithfulness"]["methods"][method]
        assert row["pointing_annotation"] == "box" and row["pointing_box"]["pairs"] == 6  # one class, boxes each
        assert 0 <= row["pointing_box"]["accuracy_pooled"] <= 1


def test_sparse_sample_json_is_the_generic_one_byte_for_byte():
    from explainer.data.imagenet import sparse_sample_json
    from explainer.data.shards import sample_json

    classes = [f"thing {i}" for i in range(998)] + ['qu"ote', "caf\u00e9"]
    rows = [[3, 1, 2, 3, 4, 0]]
    for indices in ([], [0], [999], [5, 700], [700, 5, 5], list(range(1000))):
        multi_hot = [int(i in indices) for i in range(1000)]
        for objects in (None, rows, []):
            assert sparse_sample_json(indices, classes, "n0_1", (40, 32), objects) == sample_json(
                multi_hot, classes, "n0_1", (40, 32), objects)
