"""ImageNet-1k (ILSVRC-2012) -> shards, from the layouts people have (docs/imagenet.md).

Layouts, detected from the tree: `ilsvrc` (Kaggle's ILSVRC/Data/CLS-LOC + LOC_synset_mapping.txt +
LOC_val_solution.csv), `archives` (the official tars unpacked: train/<wnid>/, a flat val/, the devkit, the box XMLs)
and `torchvision` (train/<wnid>/, val/<wnid>/, optionally meta.bin or the devkit). Class index = the wnids sorted, as
torchvision's ImageNet classifiers order their logits. Splits: train minus a seeded per-class hold-out (val), and the
official validation images as test. Boxes (VOC-format XML in original pixels) are carried exactly as VOC's, as
[class, xmin, ymin, xmax, ymax, difficult] rows, clipped to the image and counted.
"""

from __future__ import annotations

import functools
import json
import os
import random
import re
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from explainer.data.shards import Built, ShardOptions, member_bytes, read_image, safe_key, write_dataset

_json_string = json.encoder.encode_basestring_ascii  # what json.dumps (and shards.sample_json) uses for str

WNID = re.compile(r"^n\d{8}$")
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
VAL_NAME = re.compile(r"^ILSVRC2012_val_(\d{8})$")
DEVKIT_NAMES = ("ILSVRC2012_devkit_t12", "devkit", ".")
VAL_BOX_DIRS = ("ILSVRC2012_bbox_val_v3/val", "ILSVRC2012_bbox_val_v3", "bbox_val")
TRAIN_BOX_DIRS = ("ILSVRC2012_bbox_train_v2", "bbox_train")
SYNSET_FILES = ("LOC_synset_mapping.txt", "synset_words.txt")


@dataclass
class ImagenetSource:
    """Where the parts of one ImageNet copy are; `layout` is what the summary reports."""

    layout: str
    root: Path
    train_dir: Path | None
    val_dir: Path | None
    val_flat: bool  # val/*.JPEG (ilsvrc, archives) rather than val/<wnid>/*.JPEG (torchvision)
    train_boxes: Path | None = None  # <wnid>/<stem>.xml
    val_boxes: Path | None = None  # <stem>.xml
    synsets: Path | None = None  # "wnid name, other name" lines
    val_csv: Path | None = None  # LOC_val_solution.csv
    devkit: Path | None = None  # folder holding data/meta.mat
    meta_bin: Path | None = None  # torchvision's meta.bin


def _has_wnid_dirs(folder: Path) -> bool:
    return folder.is_dir() and any(e.is_dir() and WNID.match(e.name) for e in os.scandir(folder))


def _first_dir(root: Path, names: Sequence[str]) -> Path | None:
    return next((root / n for n in names if (root / n).is_dir()), None)


def _ilsvrc_source(base: Path) -> ImagenetSource:
    data, ann = base / "ILSVRC" / "Data" / "CLS-LOC", base / "ILSVRC" / "Annotations" / "CLS-LOC"
    val = _first_dir(data, ["val"])
    return ImagenetSource(  # val/<wnid>/ when the usual val-prep script was run on it
        layout="ilsvrc", root=base, train_dir=_first_dir(data, ["train"]), val_dir=val,
        val_flat=val is None or not _has_wnid_dirs(val), train_boxes=_first_dir(ann, ["train"]),
        val_boxes=_first_dir(ann, ["val"]),
        synsets=next((base / n for n in SYNSET_FILES if (base / n).is_file()), None),
        val_csv=base / "LOC_val_solution.csv" if (base / "LOC_val_solution.csv").is_file() else None)


def detect_layout(root: str | os.PathLike) -> ImagenetSource:
    """Which of the three layouts `root` holds (or the folder above ILSVRC/); FileNotFoundError says what was looked
    for when none fits."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"--root {root} is not a folder")
    for base in (root, root.parent):
        if (base / "ILSVRC" / "Data" / "CLS-LOC").is_dir():
            return _ilsvrc_source(base)
    train = root / "train" if _has_wnid_dirs(root / "train") else None
    val = root / "val" if (root / "val").is_dir() else None
    if train is None and val is None:
        raise FileNotFoundError(
            f"{root} holds no ImageNet layout: expected ILSVRC/Data/CLS-LOC/ (the ILSVRC / Kaggle layout), or "
            "train/<wnid>/ and val/ (the official archives unpacked, or torchvision's layout)")
    nested = val is not None and _has_wnid_dirs(val)
    devkit = next((root / n for n in DEVKIT_NAMES if (root / n / "data" / "meta.mat").is_file()), None)
    val_boxes = _first_dir(root, VAL_BOX_DIRS)
    if val_boxes is None and val is not None and not nested and any(n.endswith(".xml") for n in os.listdir(val)):
        val_boxes = val  # ILSVRC2012_bbox_val_v3 unpacked over the images: its val/ is theirs
    return ImagenetSource(
        layout="torchvision" if nested or train is not None and val is None else "archives", root=root,
        train_dir=train, val_dir=val, val_flat=not nested, train_boxes=_first_dir(root, TRAIN_BOX_DIRS),
        val_boxes=val_boxes, synsets=next((root / n for n in SYNSET_FILES if (root / n).is_file()), None),
        val_csv=root / "LOC_val_solution.csv" if (root / "LOC_val_solution.csv").is_file() else None,
        devkit=devkit, meta_bin=root / "meta.bin" if (root / "meta.bin").is_file() else None)


# ----------------------------------------------------------------------------------------------------------------------
# Class list and names
# ----------------------------------------------------------------------------------------------------------------------


def read_synset_mapping(path: Path) -> dict[str, str]:
    """`n01440764 tench, Tinca tinca` lines -> {wnid: "tench, Tinca tinca"}; a bad line is an error naming it."""
    out: dict[str, str] = {}
    for line_no, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        wnid, _, names = line.strip().partition(" ")
        if not WNID.match(wnid):
            raise ValueError(f"synset mapping {path}, line {line_no}: {wnid!r} is not a wnid (expected lines like "
                             "'n01440764 tench, Tinca tinca')")
        out[wnid] = names.strip() or wnid
    return out


def read_meta_mat(path: Path) -> tuple[dict[int, str], dict[str, str]]:
    """The devkit's meta.mat -> ({ILSVRC2012_ID: wnid}, {wnid: words}) for the 1000 leaf synsets (the IDs are the
    devkit's own order, not the sorted wnids). Needs scipy (`pip install .[imagenet]`)."""
    try:
        from scipy.io import loadmat
    except ImportError:
        raise ValueError(f"reading the devkit's {path} needs scipy: pip install '.[imagenet]' (or give "
                         "--synset-mapping and the val box XMLs instead)") from None
    try:
        synsets = loadmat(str(path), squeeze_me=True)["synsets"]
        rows = [(int(s["ILSVRC2012_ID"]), str(s["WNID"]), str(s["words"]), int(s["num_children"])) for s in synsets]
    except Exception as exc:  # noqa: BLE001 - any failure means "not the devkit's meta.mat"
        raise ValueError(f"{path} is not the ILSVRC-2012 devkit's meta.mat ({type(exc).__name__}: {exc})") from None
    leaves = [r for r in rows if r[3] == 0]
    return {r[0]: r[1] for r in leaves}, {r[1]: r[2] for r in leaves}


def read_meta_bin(path: Path) -> tuple[dict[str, str], list[str]]:
    """torchvision's meta.bin (wnid -> class names, val wnids in file order), read without pickle code."""
    import torch

    wnid_to_names, val_wnids = torch.load(path, weights_only=True)
    return {w: ", ".join(n) for w, n in wnid_to_names.items()}, list(val_wnids)


def display_names(wnids: Sequence[str], words: dict[str, str]) -> list[str]:
    """First name of each synset; a name two synsets share ('crane', 'maillot') gets its wnid appended."""
    first = [words.get(w, w).split(",")[0].strip() or w for w in wnids]
    count: dict[str, int] = {}
    for name in first:
        count[name] = count.get(name, 0) + 1
    return [f"{name} ({w})" if count[name] > 1 else name for name, w in zip(first, wnids)]


def read_words(source: ImagenetSource, synset_mapping: Path | None) -> tuple[dict[str, str], str]:
    """{wnid: all names} and where they came from: --synset-mapping, the layout's mapping file, the devkit,
    torchvision's meta.bin, or nothing (then the classes are the wnids of the folders)."""
    path = synset_mapping or source.synsets
    if path is not None:
        if not path.is_file():
            raise FileNotFoundError(f"--synset-mapping {path} does not exist")
        return read_synset_mapping(path), str(path)
    if source.devkit is not None:
        meta = source.devkit / "data" / "meta.mat"
        return read_meta_mat(meta)[1], str(meta)
    if source.meta_bin is not None:
        return read_meta_bin(source.meta_bin)[0], str(source.meta_bin)
    return {}, "none (class names are the wnids)"


# ----------------------------------------------------------------------------------------------------------------------
# Listing images and labels
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)  # 1.33 M of them at ImageNet scale
class ImageFile:
    stem: str
    path: str
    size: int


def list_images(folder: Path) -> list[ImageFile]:
    """The image files of a folder (by suffix, any case), sorted by name; one scandir, no per-file stat calls
    beyond the size the plan needs."""
    out = []
    with os.scandir(folder) as entries:
        for e in entries:
            stem, suffix = os.path.splitext(e.name)
            if suffix.lower() in IMAGE_SUFFIXES and e.is_file():
                out.append(ImageFile(stem, e.path, e.stat().st_size))
    return sorted(out, key=lambda f: f.stem)


def list_class_dirs(folder: Path, known: set[str] | None) -> dict[str, list[ImageFile]]:
    """{wnid: images} of a folder of class folders; a folder that is not a known wnid is an error naming it."""
    out = {}
    for e in sorted(os.scandir(folder), key=lambda e: e.name):
        if not e.is_dir():
            continue
        if not WNID.match(e.name) or (known and e.name not in known):
            raise ValueError(f"{e.path}: class folder {e.name!r} is not a wnid of the synset mapping (expected "
                             "folders like n01440764)")
        out[e.name] = list_images(Path(e.path))
    return out


def val_number(stem: str) -> int | None:
    """1-based number of an official validation image (ILSVRC2012_val_00000001 -> 1)."""
    match = VAL_NAME.match(stem)
    return int(match.group(1)) if match else None


def read_val_csv(path: Path) -> tuple[dict[str, list[str]], dict[str, list[list[Any]]]]:
    """LOC_val_solution.csv -> ({stem: wnids}, {stem: [[wnid, x0, y0, x1, y1], ...]})."""
    labels: dict[str, list[str]] = {}
    boxes: dict[str, list[list[Any]]] = {}
    lines = path.read_text().splitlines()
    for line_no, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        stem, _, pred = line.partition(",")
        parts = pred.split()
        if len(parts) % 5 or not parts:
            raise ValueError(f"{path}, line {line_no}: PredictionString {pred!r} is not 'wnid x0 y0 x1 y1 ...'")
        rows = [[parts[i], *(int(float(v)) for v in parts[i + 1:i + 5])] for i in range(0, len(parts), 5)]
        boxes[stem] = rows
        labels[stem] = sorted({r[0] for r in rows})
    return labels, boxes


def xml_object_names(path: str) -> list[str]:
    try:
        root = ET.fromstring(Path(path).read_bytes())
    except (OSError, ET.ParseError) as exc:
        raise ValueError(f"{path}: box XML cannot be read ({exc}); it is what labels this validation image") from None
    return sorted({(o.findtext("name") or "").strip() for o in root.iter("object")})


@dataclass
class ValImages:
    """The official validation images with their wnids (several for ReaL-like sources) and CSV boxes if any."""

    images: list[ImageFile]
    labels: dict[str, list[str]]  # stem -> wnids
    source: str
    csv_boxes: dict[str, list[list[Any]]] = field(default_factory=dict)


def _devkit_val_labels(source: ImagenetSource, images: list[ImageFile]) -> dict[str, list[str]] | None:
    """ILSVRC2012_validation_ground_truth.txt: line i is the devkit ID (meta.mat order) of val image i."""
    if source.devkit is None:
        return None
    gt = source.devkit / "data" / "ILSVRC2012_validation_ground_truth.txt"
    if not gt.is_file():
        return None
    id_to_wnid = read_meta_mat(source.devkit / "data" / "meta.mat")[0]
    ids = [int(v) for v in gt.read_text().split()]
    out = {}
    for img in images:
        n = val_number(img.stem)
        if n is None or n > len(ids) or ids[n - 1] not in id_to_wnid:
            raise ValueError(f"{img.path}: no ground truth for it in {gt} ({len(ids)} lines, ILSVRC2012_IDs of "
                             f"{source.devkit / 'data' / 'meta.mat'})")
        out[img.stem] = [id_to_wnid[ids[n - 1]]]
    return out


def _numbered_labels(images: list[ImageFile], wnids: list[str], where: str) -> dict[str, list[str]]:
    out = {}
    for img in images:
        n = val_number(img.stem)
        if n is None or n > len(wnids):
            raise ValueError(f"{img.path}: no label for it in {where} ({len(wnids)} entries)")
        out[img.stem] = [wnids[n - 1]]
    return out


def read_val_images(source: ImagenetSource) -> ValImages | None:
    """The official val images and their labels: from class folders (torchvision), LOC_val_solution.csv, the
    devkit's ground truth, torchvision's meta.bin or the box XMLs' object names, the first that exists."""
    if source.val_dir is None:
        return None
    if not source.val_flat:
        by_class = list_class_dirs(source.val_dir, None)
        images = sorted((img for imgs in by_class.values() for img in imgs), key=lambda f: f.stem)
        return ValImages(images, {img.stem: [w] for w, imgs in by_class.items() for img in imgs},
                         f"class folders {source.val_dir}/<wnid>")
    images = list_images(source.val_dir)
    if source.val_csv is not None:
        labels, boxes = read_val_csv(source.val_csv)
        missing = [img.path for img in images if img.stem not in labels]
        if missing:
            raise ValueError(f"{missing[0]}: not in {source.val_csv} ({len(missing)} val image(s) without a row)")
        return ValImages(images, labels, str(source.val_csv), boxes)
    devkit = _devkit_val_labels(source, images)
    if devkit is not None:
        return ValImages(images, devkit, f"{source.devkit}/data/ILSVRC2012_validation_ground_truth.txt")
    if source.meta_bin is not None:
        return ValImages(images, _numbered_labels(images, read_meta_bin(source.meta_bin)[1], str(source.meta_bin)),
                         str(source.meta_bin))
    if source.val_boxes is not None:
        labels = {}
        for img in images:
            xml = source.val_boxes / f"{img.stem}.xml"
            if not xml.is_file():
                raise ValueError(f"{img.path}: no box XML {xml}, which is what labels it here")
            labels[img.stem] = xml_object_names(str(xml))
        return ValImages(images, labels, f"object names of {source.val_boxes}/*.xml")
    raise FileNotFoundError(
        f"{source.val_dir} is a flat folder of validation images but nothing labels them: expected the devkit "
        f"({source.root}/ILSVRC2012_devkit_t12/data/), LOC_val_solution.csv, torchvision's meta.bin or the box XMLs "
        f"({source.root}/ILSVRC2012_bbox_val_v3/val/)")


def read_real_labels(path: Path, num_classes: int) -> list[list[int]]:
    """ImageNet-ReaL's real.json: per validation image (file order) its correct class indices (sorted-wnid order);
    an empty list is an image without a correct label and is kept as such."""
    try:
        real = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"--real-labels {path} does not exist") from None
    except ValueError as exc:
        raise ValueError(f"--real-labels {path} is not JSON ({exc})") from None
    if not isinstance(real, list):
        raise ValueError(f"--real-labels {path}: expected a list of lists of class indices (ImageNet-ReaL's real.json)")
    for i, row in enumerate(real):
        if not isinstance(row, list) or any(not isinstance(c, int) or not 0 <= c < num_classes for c in row):
            raise ValueError(f"--real-labels {path}: entry {i} (ILSVRC2012_val_{i + 1:08d}) is {row!r}, not a list of "
                             f"class indices 0..{num_classes - 1}")
    return real


# ----------------------------------------------------------------------------------------------------------------------
# Samples
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(slots=True)  # 1.33 M of them at ImageNet scale
class ImagenetTask:
    """One sample to build (paths and small annotation data only: picklable and cheap to fingerprint)."""

    key: str
    source_id: str
    image_path: str
    labels: tuple[int, ...]  # class indices
    xml_path: str | None
    csv_boxes: tuple[tuple[int, ...], ...] | None  # (class, x0, y0, x1, y1) from LOC_val_solution.csv
    verify: bool
    est_bytes: int


@functools.lru_cache(maxsize=4)
def _index(wnids: tuple[str, ...]) -> dict[str, int]:
    return {w: i for i, w in enumerate(wnids)}


def clip_box(box: Sequence[int], size: tuple[int, int]) -> tuple[list[int], bool]:
    """The box limited to 0..W x 0..H (values on the border are as the XMLs write them) and whether it changed."""
    w, h = size
    out = [min(max(box[0], 0), w), min(max(box[1], 0), h), min(max(box[2], 0), w), min(max(box[3], 0), h)]
    return out, out != list(box)


def _box(obj: ET.Element) -> list[int] | None:
    try:
        return [int(float(obj.findtext(f"bndbox/{tag}") or "")) for tag in ("xmin", "ymin", "xmax", "ymax")]
    except ValueError:
        return None


def read_boxes(xml_path: str, wnids: tuple[str, ...]) -> tuple[list[list[int]] | None, list[str]]:
    """[class, xmin, ymin, xmax, ymax, difficult] rows of a box XML (not yet clipped) and notes; None when the file
    cannot be used (the image is kept without boxes: its label comes from elsewhere)."""
    try:
        root = ET.fromstring(Path(xml_path).read_bytes())
    except (OSError, ET.ParseError) as exc:
        return None, [f"box XML unreadable ({type(exc).__name__}: {exc}): image kept without boxes"]
    index = _index(wnids)
    rows, notes = [], []
    for obj in root.iter("object"):
        name = (obj.findtext("name") or "").strip()
        box = _box(obj)
        if name not in index:
            notes.append(f"object {name!r} is not a class of the synset mapping: its box is left out")
            continue
        if box is None:
            return None, ["an object without a readable bndbox: image kept without boxes"]
        difficult = (obj.findtext("difficult") or "0").strip() not in ("", "0")
        rows.append([index[name], *box, int(difficult)])
    return rows, notes


def clip_rows(rows: list[list[int]], size: tuple[int, int]) -> tuple[list[list[int]], list[str]]:
    """Rows clipped to the image; boxes left empty by the clipping are dropped; both counted in the notes."""
    out, clipped, dropped = [], 0, 0
    for row in rows:
        box, changed = clip_box(row[1:5], size)
        if box[0] > box[2] or box[1] > box[3] or (changed and (box[0] == box[2] or box[1] == box[3])):
            dropped += 1
            continue
        clipped += changed
        out.append([row[0], *box, *row[5:]])
    notes = []
    if clipped:
        notes.append(f"{clipped} box(es) clipped to the {size[0]} x {size[1]} image")
    if dropped:
        notes.append(f"{dropped} box(es) outside the {size[0]} x {size[1]} image dropped")
    return out, notes


def sparse_sample_json(indices: Sequence[int], classes: Sequence[str], source_id: str, orig_size: tuple[int, int],
                       objects: Sequence[Sequence[int]] | None = None) -> bytes:
    """shards.sample_json's bytes (a test checks) from the class indices instead of a multi-hot list: at 1000 classes
    the generic one spends ~1 ms a sample walking the 1000 labels twice, this one a few microseconds."""
    on = sorted(set(indices))
    pieces, prev = [], 0
    for c in on:
        pieces.append("0," * (c - prev) + "1,")
        prev = c + 1
    labels = ("".join(pieces) + "0," * (len(classes) - prev))[:-1]
    present = ",".join(_json_string(classes[c]) for c in on)
    text = (f'{{"labels":[{labels}],"classes":[{present}],"source_id":{_json_string(source_id)},'
            f'"orig_size":[{int(orig_size[0])},{int(orig_size[1])}]')
    if objects is not None:
        text += ',"objects":[' + ",".join("[" + ",".join(str(int(v)) for v in row) + "]" for row in objects) + "]"
    return (text + "}").encode()


def build_imagenet_sample(task: ImagenetTask, *, classes: tuple[str, ...], wnids: tuple[str, ...]) -> Built:
    img = read_image(task.image_path, verify=task.verify)
    warnings = [(task.image_path, note) for note in img.notes]
    rows: list[list[int]] | None = None
    if task.xml_path is not None:
        rows, notes = read_boxes(task.xml_path, wnids)
        warnings += [(task.xml_path, n) for n in notes]
    elif task.csv_boxes is not None:
        rows = [[*r, 0] for r in task.csv_boxes]
    if rows is not None:
        rows, notes = clip_rows(rows, img.size)
        warnings += [(task.xml_path or task.image_path, n) for n in notes]
    members = {img.ext: img.data, "json": sparse_sample_json(task.labels, classes, task.source_id, img.size, rows)}
    return Built(key=task.key, members=members, labelled=bool(task.labels), warnings=warnings)


# ----------------------------------------------------------------------------------------------------------------------
# Planning
# ----------------------------------------------------------------------------------------------------------------------


def hold_out(files: list[ImageFile], wnid: str, k: int, seed: int) -> set[str]:
    """The stems of class `wnid` held out as val: k of them (at least one left for train), drawn by a generator
    seeded with (seed, wnid), so a class's hold-out does not depend on the other classes or on the parts."""
    k = min(k, max(len(files) - 1, 0))
    return set(random.Random(f"{seed}/{wnid}").sample(sorted(f.stem for f in files), k))


def _xml_stems(folder: Path | None) -> set[str]:
    if folder is None or not folder.is_dir():
        return set()
    return {name[:-4] for name in os.listdir(folder) if name.endswith(".xml")}


def _task(img: ImageFile, labels: tuple[int, ...], xml_dir: Path | None, has_xml: bool, verify: bool,
          num_classes: int, csv_boxes: tuple[tuple[int, ...], ...] | None = None) -> ImagenetTask:
    xml = f"{xml_dir}/{img.stem}.xml" if has_xml else None
    json_bytes = 2 * num_classes + 300  # the multi-hot labels ("0,0,...") dominate the sample JSON
    return ImagenetTask(key=safe_key(img.stem), source_id=img.stem, image_path=img.path, labels=labels, xml_path=xml,
                        csv_boxes=None if xml else csv_boxes, verify=verify,
                        est_bytes=member_bytes(img.size, json_bytes))


def train_tasks(source: ImagenetSource, wnids: tuple[str, ...], *, val_per_class: int, seed: int,
                verify: bool) -> tuple[list[ImagenetTask], list[ImagenetTask], int]:
    """(train, val, train images without a box XML); train is shuffled with `seed` so that every shard mixes
    classes (the loader's shuffle buffer holds a few thousand samples, a class has 1300), val is in class order."""
    if source.train_dir is None:
        return [], [], 0
    index = _index(wnids)
    train, val, no_xml = [], [], 0
    for wnid, files in list_class_dirs(source.train_dir, set(wnids)).items():
        xml_dir = source.train_boxes / wnid if source.train_boxes is not None else None
        has_xml = _xml_stems(xml_dir)
        held = hold_out(files, wnid, val_per_class, seed)
        for img in files:
            no_xml += img.stem not in has_xml
            task = _task(img, (index[wnid],), xml_dir, img.stem in has_xml, verify, len(wnids))
            (val if img.stem in held else train).append(task)
    random.Random(seed).shuffle(train)
    return train, val, no_xml


def test_tasks(source: ImagenetSource, val: ValImages, wnids: tuple[str, ...], real: list[list[int]] | None,
               verify: bool) -> list[ImagenetTask]:
    """The official val images in file order; labels from `val` or, with ReaL, from real.json."""
    index = _index(wnids)
    has_xml = _xml_stems(source.val_boxes)
    tasks = []
    for img in val.images:
        unknown = [w for w in val.labels[img.stem] if w not in index]
        if unknown:
            raise ValueError(f"{img.path}: label {unknown[0]!r} ({val.source}) is not a wnid of the synset mapping")
        labels = tuple(index[w] for w in val.labels[img.stem])
        if real is not None:
            n = val_number(img.stem)
            if n is None or n > len(real):
                raise ValueError(f"{img.path}: no entry for it in --real-labels ({len(real)} entries, one per "
                                 "ILSVRC2012_val_<number> image in number order)")
            labels = tuple(sorted(set(real[n - 1])))
        boxes = val.csv_boxes.get(img.stem)
        csv = tuple((index[r[0]], *r[1:]) for r in boxes if r[0] in index) if boxes else None
        tasks.append(_task(img, labels, source.val_boxes, img.stem in has_xml, verify, len(wnids), csv))
    return tasks


def class_list(source: ImagenetSource, words: dict[str, str], val: ValImages | None) -> tuple[str, ...]:
    """The wnids, sorted: those of the synset mapping, else those of the folders and val labels."""
    if words:
        return tuple(sorted(words))
    found: set[str] = set()
    if source.train_dir is not None:
        found |= {e.name for e in os.scandir(source.train_dir) if e.is_dir() and WNID.match(e.name)}
    if val is not None:
        found |= {w for ws in val.labels.values() for w in ws}
    if not found:
        raise FileNotFoundError(f"{source.root}: no classes found (no synset mapping, no train/<wnid>/ folders)")
    return tuple(sorted(found))


# ----------------------------------------------------------------------------------------------------------------------
# The whole run
# ----------------------------------------------------------------------------------------------------------------------

_QUIRKS = (  # (counter, pattern of a warning's reason)
    ("png_named_jpeg", re.compile(r"^PNG data under a \.jpg name")),
    ("cmyk", re.compile(r"^CMYK image")),
    ("grayscale", re.compile(r"^L image")),
    ("boxes_clipped", re.compile(r"^(\d+) box\(es\) clipped")),
    ("boxes_dropped", re.compile(r"^(\d+) box\(es\) outside")),
)


def quirk_counts(warnings: Sequence[dict[str, Any]]) -> dict[str, int]:
    """The known ILSVRC-2012 quirks among a run's warnings (boxes counted one by one, images otherwise)."""
    counts = {name: 0 for name, _ in _QUIRKS}
    counts["other_warnings"] = 0
    for w in warnings:
        for name, pattern in _QUIRKS:
            match = pattern.match(w["reason"])
            if match:
                counts[name] += int(match.group(1)) if match.groups() else 1
                break
        else:
            counts["other_warnings"] += 1
    return counts


def imagenet_splits(source: ImagenetSource, wnids: tuple[str, ...], val: ValImages | None, *, val_per_class: int,
                    seed: int, real: list[list[int]] | None, verify: bool) -> dict[str, list[ImagenetTask]]:
    splits: dict[str, list[ImagenetTask]] = {}
    if source.train_dir is not None:
        splits["train"], splits["val"], _ = train_tasks(source, wnids, val_per_class=val_per_class, seed=seed,
                                                        verify=verify)
    if val is not None:
        splits["test"] = test_tasks(source, val, wnids, real, verify)
    return splits


def build_imagenet_shards(root: str | os.PathLike, options: ShardOptions, *, val_per_class: int = 10, seed: int = 0,
                          real_labels: Path | None = None, synset_mapping: Path | None = None, num_parts: int = 1,
                          part: int = 0, verify: bool = False, command: Sequence[str] | None = None,
                          boxes: dict[str, Path | None] | None = None) -> dict[str, Any]:
    """Shard an ImageNet copy (or part `part` of `num_parts` of it: explainer/data/parts.py); returns the manifest,
    whose `imagenet` entry says the layout, where labels and names came from, and the quirks counted."""
    from explainer.atomic import write_text_atomic
    from explainer.data.parts import select_part
    from explainer.data.shards import MANIFEST_NAME

    if val_per_class < 0:
        raise ValueError(f"--val-per-class must be 0 or more, got {val_per_class}")
    source = detect_layout(root)
    for split, folder in (boxes or {}).items():  # --train-boxes / --val-boxes: box folders the detection missed
        if folder is not None:
            if not Path(folder).is_dir():
                raise FileNotFoundError(f"--{split}-boxes {folder} is not a folder")
            setattr(source, f"{split}_boxes", Path(folder))
    words, names_source = read_words(source, synset_mapping)
    val = read_val_images(source)
    wnids = class_list(source, words, val)
    classes = tuple(display_names(wnids, words))
    real = read_real_labels(real_labels, len(wnids)) if real_labels is not None else None
    splits = imagenet_splits(source, wnids, val, val_per_class=val_per_class, seed=seed, real=real, verify=verify)
    splits, parts = select_part(splits, num_parts, part)
    info = {"layout": source.layout, "names_source": names_source, "val_labels": val.source if val else None,
            "real_labels": str(real_labels) if real_labels else None, "val_per_class": val_per_class,
            "wnids": list(wnids), "names": [words.get(w, w) for w in wnids]}
    extra: dict[str, Any] = {"imagenet": info, "options": {"verify_decode": verify}}
    if parts:
        extra["parts"] = parts
    build = functools.partial(build_imagenet_sample, classes=classes, wnids=wnids)
    manifest = write_dataset(dataset="imagenet", classes=list(classes), splits=splits, build=build, options=options,
                             seed=seed, source=str(source.root), command=command, extra=extra)
    counts = quirk_counts(manifest["warnings"])
    counts["train_without_boxes"] = sum(t.xml_path is None for s in ("train", "val") for t in splits.get(s, []))
    manifest["imagenet"] = {**info, "counts": counts}
    write_text_atomic(Path(options.out) / MANIFEST_NAME, json.dumps(manifest, indent=1) + "\n")
    return manifest


def imagenet_summary(manifest: dict[str, Any]) -> str:
    """The lines `make-shards imagenet` prints above the generic summary: layout, sources, quirks."""
    info = manifest["imagenet"]
    counts = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in info["counts"].items())
    return "\n".join([f"imagenet layout: {info['layout']}; class names from {info['names_source']}; test labels from "
                      f"{info['real_labels'] or info['val_labels']}", f"  counted: {counts}"])
