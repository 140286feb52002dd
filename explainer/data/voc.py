"""PASCAL VOC layout -> shards (docs/method.md#data-voc): labels from the Annotations XML, splits from ImageSets/Main.

The same code path shards the synthetic dataset (written in this layout with its own class list), so the demo
exercises exactly what a VOC user runs.
"""

from __future__ import annotations

import functools
import os
import stat
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
from explainer.data.transforms import open_image

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable", "dog",
    "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
VOC_SPLITS: tuple[str, ...] = ("train", "val", "test")


def voc_palette() -> list[int]:
    """The standard VOC colour map (index -> RGB), flattened for PIL's putpalette."""
    palette = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


def find_voc_root(root: str | os.PathLike) -> Path:
    """Accept `VOCdevkit/VOC2007`, `VOCdevkit` or the folder holding `VOCdevkit`; return the year folder."""
    root = Path(root)
    candidates = [root, root / "VOC2007", root / "VOCdevkit" / "VOC2007"]
    for cand in candidates:
        if (cand / "Annotations").is_dir() and (cand / "ImageSets" / "Main").is_dir():
            return cand
    raise FileNotFoundError(
        f"{root} is not a VOC folder: expected Annotations/ and ImageSets/Main/ in it "
        f"(or in {root / 'VOC2007'} / {root / 'VOCdevkit' / 'VOC2007'})"
    )


def read_split_ids(voc_root: Path, split: str) -> list[str]:
    path = voc_root / "ImageSets" / "Main" / f"{split}.txt"
    ids = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            ids.append(line.split()[0])
    return ids


@dataclass
class VocTask:
    """Everything a worker needs to build one VOC sample (paths and options only)."""

    key: str
    source_id: str
    image_path: str
    xml_path: str
    seg_path: str | None
    classes: tuple[str, ...]
    exclude_difficult: bool
    verify: bool
    est_bytes: int


@functools.lru_cache(maxsize=8)
def _class_index(classes: tuple[str, ...]) -> dict[str, int]:
    return {name: i for i, name in enumerate(classes)}


def parse_labels(xml_path: str, classes: Sequence[str],
                 exclude_difficult: bool) -> tuple[list[int], int, list[list[int]] | None]:
    """(multi-hot labels, number of objects, objects) from a VOC annotation file; objects are [class, xmin, ymin,
    xmax, ymax, difficult] rows, difficult ones included (TorchRay's pointing game draws every box of a class and
    skips a class whose boxes are all difficult), None when some object has no readable box.

    BadInput on missing/malformed XML or unknown class names (a label we cannot map makes the whole label unreliable).
    """
    try:
        with open(xml_path, "rb") as f:
            root = ET.fromstring(f.read())  # a third of ET.parse's cost on small files, same parser and errors
    except FileNotFoundError:
        raise BadInput(xml_path, "annotation XML is missing") from None
    except ET.ParseError as exc:
        raise BadInput(xml_path, f"malformed annotation XML ({exc})") from None
    except OSError as exc:
        raise BadInput(xml_path, f"annotation XML cannot be read ({exc})") from None
    index = _class_index(tuple(classes))
    labels = [0] * len(classes)
    objects = 0
    boxes: list[list[int]] | None = []
    for obj in root.iter("object"):
        objects += 1
        name = (obj.findtext("name") or "").strip()
        if name not in index:
            shown = ", ".join(classes[:6]) + (", ..." if len(classes) > 6 else "")
            raise BadInput(xml_path, f"unknown class name {name!r} (expected one of {shown})")
        difficult = (obj.findtext("difficult") or "0").strip()
        box = _box(obj)
        if boxes is not None and box is not None:
            boxes.append([index[name], *box, int(difficult not in ("", "0"))])
        else:
            boxes = None
        if exclude_difficult and difficult not in ("", "0"):
            continue
        labels[index[name]] = 1
    return labels, objects, boxes


def _box(obj: ET.Element) -> list[int] | None:
    """xmin, ymin, xmax, ymax of an object's bndbox as integers (TorchRay reads them with int()), None if absent."""
    try:
        return [int(float(obj.findtext(f"bndbox/{tag}") or "")) for tag in ("xmin", "ymin", "xmax", "ymax")]
    except ValueError:
        return None


def check_seg(seg_path: str, image_size: tuple[int, int], num_classes: int,
              verify: bool = False) -> tuple[bytes | None, str | None]:
    """Original segmentation PNG bytes if usable, else (None, reason).

    Always checked: a readable PNG header, single-channel index mode (P or L), the image's size, the PNG end marker.
    With `verify`, also decoded, and every value must be 0..C or 255.
    """
    try:
        data = Path(seg_path).read_bytes()
        with open_image(data) as im:  # the run's pixel cap (shards.run_job), before anything is decoded
            fmt, mode, size = im.format, im.mode, im.size
            colours = None
            if verify:
                im.load()
                colours = im.getcolors(256) if mode in ("P", "L") else None
    except Exception as exc:
        return None, f"segmentation PNG unreadable ({type(exc).__name__}: {exc}); sample kept without it"
    if fmt != "PNG" or b"IEND" not in data[-64:]:
        return None, f"segmentation file is not a complete PNG ({fmt}); sample kept without it"
    if mode not in ("P", "L"):
        return None, f"segmentation PNG has mode {mode}, expected a palette/grey index image; sample kept without it"
    if size != image_size:
        return None, f"segmentation size {size} differs from image size {image_size}; sample kept without it"
    bad = [int(v) for _, v in colours or [] if v > num_classes and v != 255]
    if bad:
        return None, f"segmentation has class indices {sorted(bad)[:5]} beyond {num_classes}; sample kept without it"
    return data, None


def build_voc_sample(task: VocTask) -> Built:
    labels, objects, boxes = parse_labels(task.xml_path, task.classes, task.exclude_difficult)
    img = read_image(task.image_path, verify=task.verify)
    warnings = [(task.image_path, note) for note in img.notes]
    if boxes is None:
        warnings.append((task.xml_path, "an object without a readable bndbox: no boxes stored (the pointing game "
                                        "scores this image against its segmentation only)"))
    members = {img.ext: img.data, "json": sample_json(labels, task.classes, task.source_id, img.size, boxes)}
    if task.seg_path is not None:
        seg, reason = check_seg(task.seg_path, img.size, len(task.classes), verify=task.verify)
        if seg is not None:
            members["seg.png"] = seg
        else:
            warnings.append((task.seg_path, reason or "unusable segmentation"))
    if objects == 0:
        warnings.append((task.xml_path, "no objects annotated: all-zero label"))
    return Built(key=task.key, members=members, labelled=any(labels), warnings=warnings)


def _regular_file_size(path: str) -> int | None:
    """Size of a regular file, None if there is none (one stat: `is_file` and `file_size` in one)."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else None


def voc_tasks(voc_root: Path, split: str, classes: Sequence[str], exclude_difficult: bool,
              verify: bool) -> list[VocTask]:
    classes = tuple(classes)
    jpeg_dir, seg_dir, xml_dir = (str(voc_root / sub) for sub in ("JPEGImages", "SegmentationClass", "Annotations"))
    tasks = []
    for image_id in read_split_ids(voc_root, split):
        if "/" in image_id:  # let pathlib normalise odd ids exactly as before
            image_path = str(voc_root / "JPEGImages" / f"{image_id}.jpg")
            seg_path = str(voc_root / "SegmentationClass" / f"{image_id}.png")
            xml_path = str(voc_root / "Annotations" / f"{image_id}.xml")
        else:  # the same strings without a Path per file: pathlib dominated planning
            image_path = f"{jpeg_dir}/{image_id}.jpg"
            seg_path = f"{seg_dir}/{image_id}.png"
            xml_path = f"{xml_dir}/{image_id}.xml"
        seg_size = _regular_file_size(seg_path)
        est = member_bytes(file_size(image_path), 400) + (member_bytes(seg_size) if seg_size is not None else 0)
        tasks.append(VocTask(
            key=safe_key(image_id), source_id=image_id, image_path=image_path, xml_path=xml_path,
            seg_path=seg_path if seg_size is not None else None, classes=classes,
            exclude_difficult=exclude_difficult, verify=verify, est_bytes=est,
        ))
    return tasks


def build_voc_shards(root: str | os.PathLike, options: ShardOptions, *, splits: Sequence[str] | None = None,
                     classes: Sequence[str] = VOC_CLASSES, exclude_difficult: bool = False, verify: bool = False,
                     dataset: str = "voc2007", seed: int | None = None, command: Sequence[str] | None = None,
                     extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Shard a VOC-layout folder. `splits=None`: every split of train/val/test that has an ImageSets/Main list."""
    voc_root = find_voc_root(root)
    main = voc_root / "ImageSets" / "Main"
    if splits is None:
        splits = [s for s in VOC_SPLITS if (main / f"{s}.txt").is_file()]
        if not splits:
            raise FileNotFoundError(f"no split lists in {main} (expected train.txt / val.txt / test.txt)")
    for split in splits:
        if not (main / f"{split}.txt").is_file():
            raise FileNotFoundError(f"split {split!r} requested but {main / (split + '.txt')} does not exist")
    tasks = {split: voc_tasks(voc_root, split, classes, exclude_difficult, verify) for split in splits}
    return write_dataset(
        dataset=dataset, classes=list(classes), splits=tasks, build=build_voc_sample, options=options, seed=seed,
        source=str(voc_root), command=command,
        extra={"options": {"exclude_difficult": exclude_difficult, "verify_decode": verify}, **(extra or {})},
    )
