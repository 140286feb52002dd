"""Your own data -> shards: labels file (CSV / JSONL) and ImageFolder; bad rows by line; the usual guarantees."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from _data_helpers import jpeg_bytes, make_shards, png_bytes, samples_of, seg_png, tree_bytes
from _helpers import PYTHON, ROOT, run_cmd

from explainer.config import DataConfig
from explainer.data import make_eval_loader, read_manifest
from explainer.data.folder import parse_fractions, seeded_split

CLASSES = ["cat", "dog", "bird"]  # index order of the classes file (not alphabetical on purpose)


def make_csv_tree(root):
    """Images, masks and a labels.csv with good rows and one bad row of every kind. Returns the expected samples."""
    rng = np.random.default_rng(0)
    (root / "img" / "sub").mkdir(parents=True)
    (root / "masks").mkdir()
    good = {  # path -> (labels, mask classes or None, split)
        "img/a.jpg": (["cat"], [1], "train"),
        "img/b.jpg": (["dog", "cat"], [2, 1], "train"),
        "img/sub/c.png": (["bird"], None, "train"),
        "img/d.jpg": ([], None, "val"),
        "img/e.jpg": (["dog"], [2], "test"),
        "img/f.jpg": (["cat", "bird"], None, "test"),
    }
    for path, (_, mask, _) in good.items():
        data = png_bytes(rng) if path.endswith(".png") else jpeg_bytes(rng)
        (root / path).write_bytes(data)
        if mask:
            (root / "masks" / (path.rsplit("/", 1)[1].split(".")[0] + ".png")).write_bytes(seg_png(mask))
    (root / "img" / "g.jpg").write_bytes(jpeg_bytes(rng))
    lines = [
        "path,labels,mask,split",  # line 1
        "img/a.jpg,cat,masks/a.png,train",  # 2
        'img/b.jpg,"[""dog"", ""cat""]",masks/b.png,train',  # 3: a JSON list
        "img/sub/c.png,bird,,train",  # 4
        "img/d.jpg,,,val",  # 5: no class (kept, warned)
        "img/e.jpg,dog,masks/e.png,test",  # 6
        "img/f.jpg,cat|bird,,test",  # 7
        "img/missing.jpg,cat,,train",  # 8: missing file
        "img/g.jpg,horse,,train",  # 9: unknown class
        "img/a.jpg,dog,,train",  # 10: duplicate path
        "img/g.jpg,cat,train",  # 11: malformed (3 fields)
        "img/g.jpg,[cat,,train",  # 12: malformed JSON list
        "../outside.jpg,cat,,train",  # 13: outside the root
        "img/g.jpg,cat,,no/split",  # 14: malformed split name
    ]
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    return good


@pytest.fixture(scope="module")
def csv_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("mine")
    good = make_csv_tree(root)
    out = root / "shards"
    assert make_shards("folder", "--root", str(root), "--labels", str(root / "labels.csv"), "--classes-file",
                       str(root / "classes.txt"), "--out", str(out), "--workers", "2", "--shard-maxcount", "2") == 0
    return root, good, out


def test_labels_file_rows_become_samples_with_original_bytes(csv_shards):
    root, good, out = csv_shards
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["classes"] == CLASSES and manifest["dataset"] == "folder"
    assert {s: v["total"] for s, v in manifest["splits"].items()} == {"train": 3, "val": 1, "test": 2}
    for split in ("train", "val", "test"):
        samples = samples_of(out, split)
        expected = [p for p, (_, _, s) in good.items() if s == split]
        assert [json.loads(v["json"])["source_id"] for v in samples.values()] == expected  # file order
        for sample in samples.values():
            path = json.loads(sample["json"])["source_id"]
            labels, mask, _ = good[path]
            meta = json.loads(sample["json"])
            assert meta["labels"] == [int(c in labels) for c in CLASSES] and meta["orig_size"] == [48, 40]
            ext = "png" if path.endswith(".png") else "jpg"
            assert sample[ext] == (root / path).read_bytes()  # original bytes, never re-encoded
            if mask:
                assert sample["seg.png"] == (root / "masks" / (path.rsplit("/", 1)[1][:-4] + ".png")).read_bytes()
            else:
                assert "seg.png" not in sample
    assert manifest["splits"]["val"]["unlabelled"] == 1
    assert [w["reason"] for w in manifest["warnings"]] == ["no class: all-zero label (labels.csv line 5)"]


def test_bad_rows_are_reported_by_line_and_skipped(csv_shards):
    root, _, out = csv_shards
    skipped = {p["reason"].split(":")[0] if p["file"].endswith("labels.csv") else p["reason"]: p
               for p in json.loads((out / "manifest.json").read_text())["skipped"]}
    labels = str(root / "labels.csv")
    assert skipped["image file is missing (labels.csv line 8)"]["file"] == str(root / "img" / "missing.jpg")
    by_line = {k: v["reason"] for k, v in skipped.items() if v["file"] == labels}
    assert set(by_line) == {"line 9", "line 10", "line 11", "line 12", "line 13", "line 14"}
    assert "unknown class 'horse' (the classes are cat, dog, bird)" in by_line["line 9"]
    assert "duplicate path 'img/a.jpg' (first on line 2)" in by_line["line 10"]
    assert "malformed row: 3 fields, the header has 4" in by_line["line 11"]
    assert "look like a JSON list but are not valid JSON" in by_line["line 12"]
    assert "must be relative to the root and stay inside it" in by_line["line 13"]
    assert "split 'no/split'" in by_line["line 14"]
    assert len(skipped) == 7


def test_strict_refuses_and_writes_nothing(csv_shards, tmp_path):
    root, _, _ = csv_shards
    out = tmp_path / "strict"
    assert make_shards("folder", "--root", str(root), "--labels", str(root / "labels.csv"), "--classes-file",
                       str(root / "classes.txt"), "--out", str(out), "--workers", "1", "--strict") == 1
    assert not out.exists()


def test_resume_and_identical_reruns(csv_shards, tmp_path):
    root, _, out = csv_shards
    args = ["folder", "--root", str(root), "--labels", str(root / "labels.csv"), "--classes-file",
            str(root / "classes.txt"), "--shard-maxcount", "2"]
    other = tmp_path / "again"
    assert make_shards(*args, "--out", str(other), "--workers", "1") == 0
    reference = tree_bytes(out)
    assert tree_bytes(other).keys() == reference.keys()
    assert all(tree_bytes(other)[k] == v for k, v in reference.items() if k != "manifest.json")  # any worker count
    kept = other / "train-000000.tar"
    stamp = kept.stat().st_mtime_ns
    (other / "train-000001.tar").unlink()  # as if the run had been killed before writing it
    assert make_shards(*args, "--out", str(other), "--workers", "1", "--resume") == 0
    assert kept.stat().st_mtime_ns == stamp  # a complete shard is not rewritten
    assert (other / "train-000001.tar").read_bytes() == (out / "train-000001.tar").read_bytes()


def test_jsonl_seeded_split_is_deterministic(tmp_path):
    rng = np.random.default_rng(1)
    (tmp_path / "im").mkdir()
    rows = []
    for i in range(40):
        (tmp_path / "im" / f"{i:02d}.jpg").write_bytes(jpeg_bytes(rng, 20, 16))
        rows.append(json.dumps({"path": f"im/{i:02d}.jpg", "labels": ["x", "y"][: 1 + i % 2]}))
    rows.insert(3, "{not json")
    rows.insert(5, json.dumps({"path": "im/00.jpg"}))  # no labels field
    (tmp_path / "labels.jsonl").write_text("\n".join(rows) + "\n")
    common = ["folder", "--root", str(tmp_path), "--labels", str(tmp_path / "labels.jsonl"), "--workers", "1",
              "--split-fractions", "train=0.5,val=0.25,test=0.25"]
    assert make_shards(*common, "--out", str(tmp_path / "a")) == 0
    assert make_shards(*common, "--out", str(tmp_path / "b")) == 0
    assert make_shards(*common, "--seed", "1", "--out", str(tmp_path / "c")) == 0
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["classes"] == ["x", "y"]
    assert {s: v["total"] for s, v in manifest["splits"].items()} == {"train": 20, "val": 10, "test": 10}
    assert [p["reason"].split(":")[0] for p in manifest["skipped"]] == ["line 4", "line 6"]  # malformed lines
    assert 'needs the fields "path" and "labels"' in manifest["skipped"][1]["reason"]
    a, b = (tree_bytes(tmp_path / d) for d in "ab")
    assert {k: v for k, v in a.items() if k != "manifest.json"} == {k: v for k, v in b.items() if k != "manifest.json"}
    assert set(samples_of(tmp_path / "a", "val")) != set(samples_of(tmp_path / "c", "val"))  # the seed matters


def test_seeded_split_and_fractions():
    fractions = parse_fractions("train=0.8,val=0.1,test=0.1")
    out = seeded_split(101, fractions, 0)
    assert (out.count("train"), out.count("val"), out.count("test")) == (81, 10, 10)
    assert out == seeded_split(101, fractions, 0) and out != seeded_split(101, fractions, 1)
    with pytest.raises(ValueError, match="sum to 1"):
        parse_fractions("train=0.8,val=0.1")
    with pytest.raises(ValueError, match="name=fraction"):
        parse_fractions("train:0.8")


def test_imagefolder_layouts(tmp_path):
    rng = np.random.default_rng(2)
    flat = tmp_path / "flat"
    for cls, n in (("zebra", 6), ("ant", 4)):
        (flat / cls).mkdir(parents=True)
        for i in range(n):
            (flat / cls / f"{i}.jpg").write_bytes(jpeg_bytes(rng, 16, 16))
    (flat / "ant" / "notes.txt").write_text("not an image: ignored")
    (flat / "ant" / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    assert make_shards("folder", "--root", str(flat), "--out", str(tmp_path / "s1"), "--workers", "1",
                       "--split-fractions", "train=0.5,test=0.5") == 0
    manifest = json.loads((tmp_path / "s1" / "manifest.json").read_text())
    assert manifest["classes"] == ["ant", "zebra"] and manifest["options"]["layout"] == "imagefolder"
    assert sum(v["total"] for v in manifest["splits"].values()) == 10
    assert [p["file"] for p in manifest["skipped"]] == [str(flat / "ant" / "broken.jpg")]
    for split in manifest["splits"]:
        for sample in samples_of(tmp_path / "s1", split).values():
            meta = json.loads(sample["json"])
            assert meta["labels"] == [int(meta["source_id"].startswith(c + "/")) for c in ("ant", "zebra")]

    nested = tmp_path / "nested"
    for split, n in (("train", 3), ("val", 2)):
        for cls in ("a", "b"):
            (nested / split / cls).mkdir(parents=True)
            for i in range(n):
                (nested / split / cls / f"{i}.png").write_bytes(png_bytes(rng, 16, 16))
    assert make_shards("folder", "--root", str(nested), "--out", str(tmp_path / "s2"), "--workers", "1") == 0
    manifest = json.loads((tmp_path / "s2" / "manifest.json").read_text())
    assert {s: v["total"] for s, v in manifest["splits"].items()} == {"train": 6, "val": 4}
    assert list(samples_of(tmp_path / "s2", "val")) == ["val_a_0_png", "val_a_1_png", "val_b_0_png", "val_b_1_png"]


def test_symbolic_links_out_of_the_root_are_bad_rows(tmp_path):
    """Real symbolic links: to a file outside the root, through a linked folder, as a mask; a link that stays inside
    the root is kept. The outside file's bytes never reach a shard, in both layouts."""
    rng = np.random.default_rng(5)
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = jpeg_bytes(rng, 20, 20)
    (outside / "secret.jpg").write_bytes(secret)
    root = tmp_path / "root"
    (root / "img").mkdir(parents=True)
    (root / "img" / "ok.jpg").write_bytes(jpeg_bytes(rng))
    (root / "img" / "m.jpg").write_bytes(jpeg_bytes(rng))
    (root / "img" / "inside.jpg").symlink_to(root / "img" / "ok.jpg")
    (root / "img" / "link.jpg").symlink_to(outside / "secret.jpg")
    (root / "linked").symlink_to(outside, target_is_directory=True)
    (root / "mask.png").symlink_to(outside / "secret.jpg")
    (root / "labels.csv").write_text("path,labels,mask\nimg/ok.jpg,cat,\nimg/inside.jpg,cat,\nimg/link.jpg,cat,\n"
                                     "linked/secret.jpg,cat,\nimg/m.jpg,dog,mask.png\n")
    out = tmp_path / "s"
    assert make_shards("folder", "--root", str(root), "--labels", str(root / "labels.csv"), "--out", str(out),
                       "--workers", "1", "--split-fractions", "train=1") == 0
    manifest = json.loads((out / "manifest.json").read_text())
    reasons = {p["reason"].split(":")[0]: p["reason"] for p in manifest["skipped"]}
    assert set(reasons) == {"line 4", "line 5", "line 6"}, manifest["skipped"]
    for line in ("line 4", "line 5", "line 6"):
        assert "leads outside the root, to " + str(outside.resolve()) in reasons[line]
    assert manifest["splits"]["train"]["total"] == 2  # ok.jpg, and inside.jpg (a link within the root)
    assert all(secret not in data for data in tree_bytes(out).values())

    folder = tmp_path / "imagefolder"
    (folder / "cat").mkdir(parents=True)
    (folder / "cat" / "a.jpg").write_bytes(jpeg_bytes(rng))
    (folder / "cat" / "b.jpg").symlink_to(outside / "secret.jpg")
    out = tmp_path / "s2"
    assert make_shards("folder", "--root", str(folder), "--out", str(out), "--workers", "1",
                       "--split-fractions", "train=1") == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert [p["file"] for p in manifest["skipped"]] == [str(folder / "cat" / "b.jpg")]
    assert "leads outside the root" in manifest["skipped"][0]["reason"]
    assert manifest["splits"]["train"]["total"] == 1
    assert all(secret not in data for data in tree_bytes(out).values())


def test_images_over_the_pixel_cap_are_bad_rows(tmp_path, huge_png):
    """A real 12000 x 12000 PNG (small on disk) is skipped by name under the default cap, by the shard workers too;
    --max-image-pixels lowers or raises the cap (a 3000 x 1000 PNG keeps the test small)."""
    from PIL import Image

    rng = np.random.default_rng(6)
    root = tmp_path / "root"
    (root / "cat").mkdir(parents=True)
    (root / "cat" / "a.jpg").write_bytes(jpeg_bytes(rng))
    (root / "cat" / "huge.png").write_bytes(huge_png.read_bytes())
    Image.new("1", (3000, 1000), 1).save(root / "cat" / "wide.png")
    base = ["folder", "--root", str(root), "--split-fractions", "train=1", "--workers", "2", "--shard-maxcount", "1"]

    def skipped(out, *extra):
        assert make_shards(*base, "--out", str(tmp_path / out), *extra) == 0
        manifest = json.loads((tmp_path / out / "manifest.json").read_text())
        return {p["file"]: p["reason"] for p in manifest["skipped"]}, manifest["splits"]["train"]["total"]

    huge, wide = str(root / "cat" / "huge.png"), str(root / "cat" / "wide.png")
    reasons, total = skipped("default")
    assert total == 2 and list(reasons) == [huge]
    assert "12000 x 12000 = 144,000,000 pixels, more than the cap of 89,478,485" in reasons[huge]
    reasons, total = skipped("lowered", "--max-image-pixels", "2999999")
    assert total == 1 and set(reasons) == {huge, wide}
    reasons, total = skipped("raised", "--max-image-pixels", "none")
    assert total == 3 and not reasons


def test_bad_sources_exit_2(tmp_path):
    assert make_shards("folder", "--root", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")) == 2
    (tmp_path / "labels.csv").write_text("file,classes\nx.jpg,a\n")
    assert make_shards("folder", "--root", str(tmp_path), "--labels", str(tmp_path / "labels.csv"),
                       "--out", str(tmp_path / "o")) == 2


def test_classes_file_with_a_duplicate_name_is_refused_naming_both_lines(tmp_path, capsys):
    """A name given twice used to map to its last index; now nothing is written and the error names both lines."""
    root = tmp_path / "mine"
    make_csv_tree(root)
    (root / "classes.txt").write_text("cat\ndog\n\nbird\n dog \n")
    out = tmp_path / "o"
    assert make_shards("folder", "--root", str(root), "--labels", str(root / "labels.csv"), "--classes-file",
                       str(root / "classes.txt"), "--out", str(out)) == 2
    err = capsys.readouterr().err
    assert "classes.txt" in err and "'dog' on line 5 is already on line 2" in err
    assert not (out / "manifest.json").exists()
    assert make_shards("voc", "--root", str(root), "--classes-file", str(root / "classes.txt"), "--out",
                       str(tmp_path / "v")) == 2
    assert "'dog' on line 5 is already on line 2" in capsys.readouterr().err


def test_loader_gives_segmentation_only_where_masks_exist(csv_shards):
    _, good, out = csv_shards
    manifest = read_manifest(out / "manifest.json")
    batch = next(iter(make_eval_loader(DataConfig(image_size=32, batch_size=8, num_workers=0), manifest, "train",
                                       rank=0, world_size=1)))
    assert batch["has_seg"].tolist() == [True, True, False]
    assert set(torch.unique(batch["seg_classes"][1]).tolist()) <= {0, 1, 2, 255}


def test_evaluation_runs_on_folder_data(csv_shards, tmp_path):
    """Segmentation scores on the images with masks only; classification and class-specific tables on all."""
    from _byo_factory import build

    from explainer.models import build_explainer, save_model_file

    _, good, out = csv_shards
    torch.manual_seed(0)
    torch.save(build(num_classes=3).state_dict(), tmp_path / "user.pt")
    save_model_file(tmp_path / "explainer.pt", build_explainer("tiny_unet", 3), kind="explainer", arch="tiny_unet",
                    num_classes=3, classes=CLASSES, image_size=32)
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    run_cmd([PYTHON, "-m", "explainer.evaluate", "--config", "configs/synthetic.yaml",
             f"data.manifest={out / 'manifest.json'}", "data.image_size=32", "data.batch_size=4", "data.num_workers=0",
             "data.test_split=train", "classifier.checkpoint=" + str(tmp_path / "user.pt"),
             "classifier.factory=_byo_factory:build", "classifier.factory_kwargs={num_classes: 3}",
             "--checkpoint", str(tmp_path / "explainer.pt"), "--methods", "explainer,gradcam",
             "--out", str(tmp_path / "eval"), "--no-progress"], env=env)
    res = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert res["n_images"] == 3 and res["n_seg_images"] == 2  # c.png has no mask
    assert res["segmentation"]["explainer"]["n"] == 2 and res["segmentation"]["gradcam"]["n"] == 2
    assert res["class_specific"]["explainer"]["images_per_target"] == [2.0, 1.0, 1.0]
    assert res["classification"]["clean"]["precision"] is not None
    assert (tmp_path / "eval" / "report.md").is_file()


def test_boxes_column_carries_objects_and_bad_boxes_are_bad_rows(tmp_path):
    """The optional boxes column (CSV, a JSON list) becomes the sample's objects rows, as VOC's; a malformed box, a
    box of a class the row does not list and a box outside the image are reported by line and skipped."""
    rng = np.random.default_rng(3)
    (tmp_path / "im").mkdir()
    for name in "abcde":
        (tmp_path / "im" / f"{name}.jpg").write_bytes(jpeg_bytes(rng, 48, 40))
    lines = ["path,labels,split,boxes",
             'im/a.jpg,cat|dog,test,"[[""cat"", 1, 2, 30, 40], [""dog"", 5, 5, 48, 10, 1]]"',  # 2
             "im/b.jpg,cat,test,",  # 3: no boxes
             'im/c.jpg,cat,test,"[[""cat"", 0, 2, 30, 40]]"',  # 4: 0 is not a 1-based pixel
             'im/d.jpg,cat,test,"[[""dog"", 1, 2, 30, 40]]"',  # 5: dog is not among the labels
             'im/e.jpg,cat,test,"[[""cat"", 1, 2, 49, 40]]"']  # 6: beyond the 48 px wide image
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    (tmp_path / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    out = tmp_path / "out"
    assert make_shards("folder", "--root", str(tmp_path), "--labels", str(tmp_path / "labels.csv"), "--classes-file",
                       str(tmp_path / "classes.txt"), "--out", str(out), "--workers", "1") == 0
    samples = {json.loads(v["json"])["source_id"]: json.loads(v["json"]) for v in samples_of(out, "test").values()}
    assert set(samples) == {"im/a.jpg", "im/b.jpg"}
    assert samples["im/a.jpg"]["objects"] == [[0, 1, 2, 30, 40, 0], [1, 5, 5, 48, 10, 1]]
    assert "objects" not in samples["im/b.jpg"]
    reasons = " | ".join(p["reason"] for p in json.loads((out / "manifest.json").read_text())["skipped"])
    assert "line 4: malformed row: box ['cat', 0, 2, 30, 40] must be" in reasons
    assert "line 5: box of class 'dog', which is not among the row's labels ['cat']" in reasons
    assert "box [1, 2, 49, 40] lies outside the 48 x 40 image (labels.csv line 6)" in reasons


def test_a_huge_csv_field_is_a_bad_row_and_a_non_utf8_file_names_its_line(tmp_path, capsys):
    """Issue 26: a labels.csv field over the csv module's 131,072-byte limit ended in a bare _csv.Error traceback with
    nothing written; it is a bad row with its line number and the other rows are written. A file that is not UTF-8
    names itself and the line (Python's UnicodeDecodeError names neither), exit 2, nothing written."""
    rng = np.random.default_rng(2)
    (tmp_path / "im").mkdir()
    for i in range(4):
        (tmp_path / "im" / f"{i}.jpg").write_bytes(jpeg_bytes(rng, 20, 16))
    lines = ["path,labels", "im/0.jpg,cat", f"im/1.jpg,{'x' * 140_000}", "im/2.jpg,dog", "im/3.jpg,cat|dog"]
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    common = ["folder", "--root", str(tmp_path), "--workers", "1", "--split-fractions", "train=1"]
    assert make_shards(*common, "--labels", str(tmp_path / "labels.csv"), "--out", str(tmp_path / "a")) == 0
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["total"] == 3 and manifest["classes"] == ["cat", "dog"]
    assert [p["reason"] for p in manifest["skipped"]] == ["line 3: malformed row: field larger than field limit "
                                                          "(131072)"]
    latin = tmp_path / "latin.csv"
    latin.write_bytes("path,labels\nim/0.jpg,cat\nim/1.jpg,caf\u00e9\n".encode("latin-1"))
    capsys.readouterr()
    assert make_shards(*common, "--labels", str(latin), "--out", str(tmp_path / "b")) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: labels file {latin}: line 3 is not UTF-8 text (byte 0xe9 at column 13); save the file "
                   "as UTF-8"), err
    assert not (tmp_path / "b" / "manifest.json").exists()
