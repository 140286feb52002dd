"""COCO-2014 layout -> shards: id mapping, seeded splits, union masks (crowd included), missing files, no labels."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from _data_helpers import make_coco_tree, make_shards, samples_of
from PIL import Image

from explainer.config import DataConfig
from explainer.data import make_eval_loader, read_manifest


@pytest.fixture(scope="module")
def coco_shards(tmp_path_factory):
    root = make_coco_tree(tmp_path_factory.mktemp("coco"))
    out = root / "shards"
    assert make_shards("coco", "--root", str(root), "--out", str(out), "--seg-subset", "3", "--seed", "7",
                       "--workers", "2", "--shard-maxcount", "5") == 0
    return root, out, json.loads((out / "manifest.json").read_text())


def test_categories_map_to_contiguous_indices_by_ascending_id(coco_shards):
    _, out, manifest = coco_shards
    assert manifest["classes"] == ["person", "car", "dog", "toothbrush"]  # ids 1, 3, 18, 90
    assert manifest["category_ids"] == [1, 3, 18, 90]
    train = samples_of(out, "train") | samples_of(out, "val")
    # image i of train2014 (id 1000 + i) has one annotation of category [1, 3, 18, 90][i % 4]
    for key, members in train.items():
        i = int(key.rsplit("_", 1)[1]) - 1000
        meta = json.loads(members["json"])
        expected = [0, 0, 0, 0]
        if i != 0:
            expected[i % 4] = 1
        assert meta["labels"] == expected, key
        assert meta["orig_size"] == [40, 30] and meta["source_id"] == key


def test_seeded_train_val_split_and_test_from_val2014(coco_shards, tmp_path):
    root, out, manifest = coco_shards
    train, val, test = (set(samples_of(out, s)) for s in ("train", "val", "test"))
    # 20 train2014 images, one of them missing on disk -> 19 usable; 2 of 20 go to val
    assert len(train) + len(val) == 19 and len(val) in (1, 2) and not train & val
    assert all("train2014" in k for k in train | val) and len(test) == 6 and all("val2014" in k for k in test)
    assert list(samples_of(out, "train")) == sorted(train)  # stable order by image id
    # same seed -> same split; another seed -> another split
    again = tmp_path / "again"
    assert make_shards("coco", "--root", str(root), "--out", str(again), "--seg-subset", "3", "--seed", "7") == 0
    assert set(samples_of(again, "val")) == val
    other = tmp_path / "other"
    assert make_shards("coco", "--root", str(root), "--out", str(other), "--seg-subset", "3", "--seed", "8") == 0
    assert set(samples_of(other, "val")) != val


def test_unannotated_and_missing_images_are_reported(coco_shards):
    root, out, manifest = coco_shards
    skipped = manifest["skipped"]
    assert len(skipped) == 1 and skipped[0]["file"].endswith("COCO_train2014_000000001001.jpg")
    assert "missing" in skipped[0]["reason"]
    warnings = [w for w in manifest["warnings"] if "no annotations" in w["reason"]]
    assert [w["key"] for w in warnings] == ["COCO_train2014_000000001000"]
    split = "train" if "COCO_train2014_000000001000" in samples_of(out, "train") else "val"
    assert manifest["splits"][split]["unlabelled"] == 1


def test_union_mask_with_crowd_for_a_seeded_subset(coco_shards, tmp_path):
    root, out, manifest = coco_shards
    test = samples_of(out, "test")
    with_seg = sorted(k for k, m in test.items() if "seg.png" in m)
    assert len(with_seg) == 3  # --seg-subset 3, seeded
    assert manifest["options"]["seg_subset"] == 3
    again = tmp_path / "again"
    assert make_shards("coco", "--root", str(root), "--out", str(again), "--seg-subset", "3", "--seed", "7") == 0
    assert sorted(k for k, m in samples_of(again, "test").items() if "seg.png" in m) == with_seg
    full = tmp_path / "full"
    assert make_shards("coco", "--root", str(root), "--out", str(full), "--seg-subset", "1000") == 0
    mask = np.asarray(Image.open(io.BytesIO(samples_of(full, "test")["COCO_val2014_000000005000"]["seg.png"])))
    assert mask.shape == (30, 40) and mask.dtype == np.uint8
    assert mask[5, 5] == 1  # person polygon (category index 0 -> 1)
    assert mask[12, 15] == 2  # car polygon, smaller, drawn over the person
    assert (mask[:, 30:35] == 1).all()  # crowd RLE of people included
    assert mask[25, 25] == 0


def test_union_mask_values_directly():
    import pycocotools.mask as mask_utils

    from explainer.data.coco import union_mask

    big = np.zeros((10, 10), np.uint8, order="F")
    big[1:9, 1:9] = 1
    small = np.zeros((10, 10), np.uint8, order="F")
    small[4:6, 4:6] = 1
    seg = [(2, 4.0, 2, mask_utils.encode(small)), (0, 64.0, 1, mask_utils.encode(big))]
    out = union_mask(seg, 10, 10)
    assert out[2, 2] == 1 and out[4, 4] == 3 and out[0, 0] == 0


def test_eval_loader_decodes_coco_seg_to_binary(coco_shards):
    _, out, _ = coco_shards
    cfg = DataConfig(image_size=16, batch_size=4, num_workers=0)
    batches = list(make_eval_loader(cfg, read_manifest(out / "manifest.json"), "test", rank=0, world_size=1))
    has_seg = np.concatenate([b["has_seg"].numpy() for b in batches])
    assert has_seg.sum() == 3
    for b in batches:
        assert set(np.unique(b["seg"].numpy())) <= {0, 1}  # no void in COCO
        assert ((b["seg"] > 0) == (b["seg_classes"] > 0)).all()


def test_every_instance_box_is_carried_in_the_voc_convention(coco_shards):
    """The COCO bbox of every instance (train, val and test) as objects rows: 1-based inclusive pixels, crowd marked
    difficult; the localization metrics and the loader read them like VOC's."""
    from explainer.data.coco import box_row

    _, out, _ = coco_shards
    test = samples_of(out, "test")
    special = json.loads(test["COCO_val2014_000000005000"]["json"])
    # person [2, 2, 10, 10], car [8, 8, 12, 6], a crowd of people [30, 0, 5, 30] (x, y, w, h, 0-based, continuous)
    assert special["objects"] == [[0, 3, 3, 12, 12, 0], [1, 9, 9, 20, 14, 0], [0, 31, 1, 35, 30, 1]]
    for members in [*samples_of(out, "train").values(), *test.values()]:
        meta = json.loads(members["json"])
        assert {row[0] for row in meta["objects"]} == {k for k, v in enumerate(meta["labels"]) if v}
    assert box_row({"bbox": [0.5, 1.2, 3.0, 0.0]}, 2, (40, 30)) == (2, 1, 2, 4, 2, 0)  # touched pixels, >= 1 wide
    assert box_row({"bbox": [38.5, 29.0, 9.0, 9.0], "iscrowd": 1}, 0, (40, 30)) == (0, 39, 30, 40, 30, 1)  # clipped
    with pytest.raises(ValueError, match="invalid bbox"):
        box_row({"id": 7, "bbox": [1, 1, -2, 3]}, 0, (40, 30))
    cfg = DataConfig(image_size=16, batch_size=8, num_workers=0)
    batch = next(iter(make_eval_loader(cfg, read_manifest(out / "manifest.json"), "test", rank=0, world_size=1)))
    assert all(o is not None and o.shape[1] == 6 for o in batch["objects"])
