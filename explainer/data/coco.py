"""COCO-2014 -> shards (docs/method.md#data-coco): pycocotools annotations, categories mapped to 0..C-1 by ascending id.

Splits: a seeded 90/10 split of train2014 into train/val, val2014 as test. Every instance's `bbox` is carried in the
sample JSON's `objects` rows in the VOC convention the other sources use ([class, xmin, ymin, xmax, ymax, difficult],
1-based inclusive pixels: the pixels the box touches; crowd regions marked difficult, as COCO's own evaluation ignores
them); localization (explainer/wsol.py) scores them. Segmentation ground truth (union of the
instance masks, crowd regions included, category index + 1 per pixel; smaller instances drawn over larger ones) is
stored for a seeded subset of the test images. Images without annotations get an all-zero label (and a warning).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from explainer.data.shards import (
    BadInput,
    Built,
    ShardOptions,
    file_size,
    member_bytes,
    read_image,
    safe_key,
    sample_json,
    write_dataset,
)


@dataclass
class CocoTask:
    key: str
    source_id: str
    image_path: str
    classes: tuple[str, ...]
    present: tuple[int, ...]  # category indices with at least one annotation (crowd included)
    annotated: bool
    ann_size: tuple[int, int]  # (W, H) in the annotation file
    seg: tuple[tuple[int, float, int, dict], ...] | None  # (category index, area, ann id, RLE) for the seg subset
    boxes: tuple[tuple[int, ...], ...]  # objects rows (class, xmin, ymin, xmax, ymax, crowd), see box_row
    error: str | None  # annotation problem found while indexing (reported by the worker as a bad input)
    annotation_file: str
    verify: bool
    est_bytes: int


def load_coco(path: str | os.PathLike) -> Any:
    """pycocotools COCO index; clear errors for a missing or malformed annotation file."""
    from pycocotools.coco import COCO

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"COCO annotation file {path} does not exist")
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return COCO(str(path))
    except json.JSONDecodeError as exc:
        raise ValueError(f"COCO annotation file {path} is not valid JSON ({exc})") from None
    except (KeyError, TypeError) as exc:
        raise ValueError(f"COCO annotation file {path} lacks the expected structure ({exc!r})") from None


def category_index(coco: Any) -> tuple[list[int], list[str]]:
    """Category ids in ascending order and their names: index i <-> ids[i] (0..79 for COCO-2014)."""
    ids = sorted(coco.getCatIds())
    names = [coco.loadCats(i)[0]["name"] for i in ids]
    return ids, names


def union_mask(seg: Sequence[tuple[int, float, int, dict]], height: int, width: int) -> np.ndarray:
    """uint8 [H, W]: 0 background, category index + 1 where any instance is (smaller instances on top)."""
    import pycocotools.mask as mask_utils

    out = np.zeros((height, width), np.uint8)
    for cat, _area, _ann_id, rle in sorted(seg, key=lambda s: (-s[1], s[2])):
        m = mask_utils.decode(rle)
        if m.ndim == 3:
            m = m.any(axis=2)
        out[m.astype(bool)] = cat + 1
    return out


def build_coco_sample(task: CocoTask) -> Built:
    if task.error is not None:
        raise BadInput(task.annotation_file, task.error)
    img = read_image(task.image_path, verify=task.verify)
    warnings = [(task.image_path, note) for note in img.notes]
    labels = [0] * len(task.classes)
    for c in task.present:
        labels[c] = 1
    if not task.annotated:
        warnings.append((task.image_path, "no annotations: all-zero label"))
    fits = img.size == task.ann_size  # boxes and masks are in the annotation's pixels
    if not fits and task.boxes:
        warnings.append((task.image_path, f"image size {img.size} differs from the annotation's {task.ann_size}; "
                                          "sample kept without boxes"))
    members = {img.ext: img.data, "json": sample_json(labels, task.classes, task.source_id, img.size,
                                                      [list(b) for b in task.boxes] if fits else None)}
    if task.seg is not None:
        if not fits:
            warnings.append((task.image_path, f"image size {img.size} differs from the annotation's "
                                              f"{task.ann_size}; sample kept without segmentation"))
        else:
            mask = union_mask(task.seg, img.size[1], img.size[0])
            buf = io.BytesIO()
            Image.fromarray(mask, "L").save(buf, "PNG")
            members["seg.png"] = buf.getvalue()
    return Built(key=task.key, members=members, labelled=bool(task.present), warnings=warnings)


def box_row(ann: dict, index: int, size: tuple[int, int]) -> tuple[int, ...]:
    """A COCO `bbox` [x, y, w, h] (continuous, 0-based) -> (class, xmin, ymin, xmax, ymax, crowd): the 1-based
    inclusive pixels it touches, inside the W x H image. ValueError on a malformed or negative box."""
    try:
        x, y, w, h = (float(v) for v in ann["bbox"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"annotation {ann.get('id')} has no bbox [x, y, w, h] (got {ann.get('bbox')!r})") from None
    if not all(math.isfinite(v) for v in (x, y, w, h)) or w < 0 or h < 0:
        raise ValueError(f"annotation {ann.get('id')} has an invalid bbox {ann['bbox']!r}")
    width, height = size
    x0, y0 = min(max(math.floor(x) + 1, 1), width), min(max(math.floor(y) + 1, 1), height)
    x1, y1 = min(max(math.ceil(x + w), x0), width), min(max(math.ceil(y + h), y0), height)
    return (index, x0, y0, x1, y1, int(bool(ann.get("iscrowd", 0))))


def coco_tasks(coco: Any, image_dir: Path, image_ids: Sequence[int], annotation_file: str, classes: Sequence[str],
               cat_ids: Sequence[int], seg_ids: set[int], verify: bool) -> list[CocoTask]:
    cat_to_index = {cid: i for i, cid in enumerate(cat_ids)}
    classes = tuple(classes)
    tasks = []
    for image_id in image_ids:
        info = coco.imgs[image_id]
        anns = coco.imgToAnns.get(image_id, [])
        error = None
        present: set[int] = set()
        boxes = []
        size = (int(info.get("width", 0)), int(info.get("height", 0)))
        for ann in anns:
            index = cat_to_index.get(ann.get("category_id"))
            if index is None:
                error = (f"image {image_id}: annotation {ann.get('id')} has unknown category_id "
                         f"{ann.get('category_id')!r}")
                break
            present.add(index)
            try:
                boxes.append(box_row(ann, index, size))
            except ValueError as exc:
                error = f"image {image_id}: {exc}"
                break
        seg = None
        if image_id in seg_ids and error is None:
            try:
                seg = tuple((cat_to_index[a["category_id"]], float(a.get("area", 0.0)), int(a.get("id", 0)),
                             coco.annToRLE(a)) for a in anns)
            except Exception as exc:
                error = f"image {image_id}: malformed segmentation ({type(exc).__name__}: {exc})"
                seg = None
        file_name = str(info.get("file_name", ""))
        image_path = image_dir / file_name
        source_id = Path(file_name).stem or str(image_id)
        est = member_bytes(file_size(image_path), 700 + 30 * len(boxes)) + (
            member_bytes(size[0] * size[1] // 20) if seg is not None else 0)
        tasks.append(CocoTask(
            key=safe_key(source_id), source_id=source_id, image_path=str(image_path), classes=classes,
            present=tuple(sorted(present)), annotated=bool(anns), ann_size=size, seg=seg, boxes=tuple(boxes),
            error=error, annotation_file=annotation_file, verify=verify, est_bytes=est,
        ))
    return tasks


def split_train_val(image_ids: Sequence[int], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded split of train2014 ids; both halves sorted (stable shard order)."""
    ids = np.array(sorted(image_ids), dtype=np.int64)
    perm = np.random.default_rng([seed, 0]).permutation(len(ids))
    n_val = int(round(val_fraction * len(ids)))
    val = sorted(int(i) for i in ids[perm[:n_val]])
    train = sorted(int(i) for i in ids[perm[n_val:]])
    return train, val


def choose_seg_subset(image_ids: Sequence[int], size: int, seed: int) -> set[int]:
    ids = np.array(sorted(image_ids), dtype=np.int64)
    if size >= len(ids):
        return {int(i) for i in ids}
    pick = np.random.default_rng([seed, 1]).choice(len(ids), size=size, replace=False)
    return {int(i) for i in ids[pick]}


def build_coco_shards(root: str | os.PathLike, options: ShardOptions, *, seed: int = 0, val_fraction: float = 0.1,
                      seg_subset: int = 1000, verify: bool = False, dataset: str = "coco2014",
                      command: Sequence[str] | None = None) -> dict[str, Any]:
    """Shard `root/{train2014,val2014}` with `root/annotations/instances_{train,val}2014.json`."""
    root = Path(root)
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    train_ann = root / "annotations" / "instances_train2014.json"
    val_ann = root / "annotations" / "instances_val2014.json"
    if not train_ann.is_file():
        raise FileNotFoundError(f"{root} is not a COCO-2014 folder: {train_ann} does not exist")
    coco_train = load_coco(train_ann)
    cat_ids, classes = category_index(coco_train)
    train_ids, val_ids = split_train_val(list(coco_train.imgs), val_fraction, seed)
    splits = {
        "train": coco_tasks(coco_train, root / "train2014", train_ids, str(train_ann), classes, cat_ids, set(),
                            verify),
        "val": coco_tasks(coco_train, root / "train2014", val_ids, str(train_ann), classes, cat_ids, set(), verify),
    }
    if val_ann.is_file():
        coco_test = load_coco(val_ann)
        test_cat_ids, _ = category_index(coco_test)
        if test_cat_ids != cat_ids:
            raise ValueError(f"categories of {val_ann} differ from those of {train_ann}")
        test_ids = sorted(coco_test.imgs)
        seg_ids = choose_seg_subset(test_ids, seg_subset, seed)
        splits["test"] = coco_tasks(coco_test, root / "val2014", test_ids, str(val_ann), classes, cat_ids, seg_ids,
                                    verify)
    return write_dataset(
        dataset=dataset, classes=classes, splits=splits, build=build_coco_sample, options=options, seed=seed,
        source=str(root), command=command,
        extra={"options": {"val_fraction": val_fraction, "seg_subset": seg_subset, "verify_decode": verify},
               "category_ids": list(cat_ids)},
    )
