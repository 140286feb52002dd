"""Your own labelled images -> shards: a labels file (CSV or JSONL) or the ImageFolder layout.

Labels file, one row per image (CSV with a header, or one JSON object per line):
    path    image path relative to --root (required)
    labels  class names, separated by `|` or as a JSON list; empty = no class (all-zero label, warned)
    mask    optional: segmentation PNG relative to --root, single channel, 0 background, k+1 for the k-th class of
            the class list, 255 void (the VOC convention)
    split   optional: the row's split; rows without one get a seeded split with the given fractions
    boxes   optional: the objects' boxes for localization (explainer/wsol.py), a JSON list of
            [class, xmin, ymin, xmax, ymax] (a 6th value 1 marks it difficult) in pixels as VOC's XML gives them
            (1-based, inclusive); each box's class must be one of the row's labels
ImageFolder: ROOT/<class>/<image> (single-label), or ROOT/<split>/<class>/<image> when every folder in ROOT is a
split name (train, val, test).

The shard writer is shared with VOC/COCO (`shards.write_dataset`), so the same guarantees hold: original bytes,
parallel, atomic, resumable, deterministic, `--strict`. Bad rows (malformed, unknown class, duplicate path, path
outside the root, missing image) are skipped and reported in the manifest with the labels file's line number. "Inside
the root" is decided on the resolved path: a symbolic link under the root that points outside it is a bad row too (in
the ImageFolder layout as well), so no file from elsewhere ends up in the shards.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

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
from explainer.data.voc import check_seg

COLUMNS = ("path", "labels", "mask", "split", "boxes")
SPLIT_NAMES = ("train", "val", "test")
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
DEFAULT_FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}
_SPLIT_RE = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass
class FolderTask:
    """One row (or one ImageFolder file): paths, the class indices, and the row's problem if it has one."""

    key: str
    source_id: str  # the path relative to the root, with forward slashes
    image_path: str
    seg_path: str | None
    classes: tuple[str, ...]
    present: tuple[int, ...]
    boxes: tuple[tuple[int, ...], ...] | None  # objects rows (class index, xmin, ymin, xmax, ymax, difficult)
    where: str  # "labels.csv line 7" or "ImageFolder": how problems name the row ("line 7" for a bad row)
    error: str | None  # a bad row (image_path is then the labels file): reported by line and skipped
    verify: bool
    est_bytes: int


@dataclass
class Row:
    line: int
    path: str
    labels: list[str]
    mask: str | None
    split: str | None
    boxes: list[tuple[str, int, int, int, int, int]] | None = None


def build_folder_sample(task: FolderTask) -> Built:
    if task.error is not None:  # a bad row: image_path holds the labels file, `where` its line
        raise BadInput(task.image_path, f"{task.where}: {task.error}")
    try:
        img = read_image(task.image_path, verify=task.verify)
    except BadInput as exc:
        raise BadInput(exc.file, f"{exc.reason} ({task.where})") from None
    warnings = [(task.image_path, note) for note in img.notes]
    labels = [0] * len(task.classes)
    for c in task.present:
        labels[c] = 1
    if task.boxes is not None:
        outside = [b for b in task.boxes if b[3] > img.size[0] or b[4] > img.size[1]]
        if outside:
            raise BadInput(task.image_path, f"box {list(outside[0][1:5])} lies outside the {img.size[0]} x "
                                            f"{img.size[1]} image ({task.where})")
    members = {img.ext: img.data, "json": sample_json(labels, task.classes, task.source_id, img.size,
                                                      None if task.boxes is None else [list(b) for b in task.boxes])}
    if task.seg_path is not None:
        seg, reason = check_seg(task.seg_path, img.size, len(task.classes), verify=task.verify)
        if seg is not None:
            members["seg.png"] = seg
        else:
            warnings.append((task.seg_path, f"{reason} ({task.where})"))
    if not task.present:
        warnings.append((task.image_path, f"no class: all-zero label ({task.where})"))
    return Built(key=task.key, members=members, labelled=bool(task.present), warnings=warnings)


# ----------------------------------------------------------------------------------------------------------------------
# Reading the labels file
# ----------------------------------------------------------------------------------------------------------------------


class BadRow(ValueError):
    """One row that cannot be used; the message says why (the line number is added by the caller)."""


def _parse_labels(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, list):
        if not all(isinstance(v, str) for v in value):
            raise BadRow(f"labels must be class names (strings), got {value!r}")
        names = value
    elif isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                parsed = json.loads(text)
            except ValueError as exc:
                raise BadRow(f"labels {text!r} look like a JSON list but are not valid JSON ({exc})") from None
            return _parse_labels(parsed)
        names = text.split("|") if text else []
    else:
        raise BadRow(f"labels must be a `|`-separated string or a list of names, got {type(value).__name__}")
    names = [n.strip() for n in names]
    if any(not n for n in names):
        raise BadRow(f"empty class name in labels {value!r}")
    return list(dict.fromkeys(names))


def _parse_boxes(value: Any) -> list[tuple[str, int, int, int, int, int]] | None:
    """The boxes column: None when absent or empty, else checked [class, xmin, ymin, xmax, ymax(, difficult)] rows."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise BadRow(f"boxes {value!r} are not a JSON list ({exc})") from None
    if not isinstance(value, list):
        raise BadRow(f"boxes must be a list of [class, xmin, ymin, xmax, ymax], got {value!r}")
    out = []
    for box in value:
        ok = isinstance(box, list) and len(box) in (5, 6) and isinstance(box[0], str) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in box[1:])
        if not ok or not (1 <= box[1] <= box[3] and 1 <= box[2] <= box[4]) or (len(box) == 6 and box[5] not in (0, 1)):
            raise BadRow(f"box {box!r} must be [class, xmin, ymin, xmax, ymax(, difficult 0/1)] with integer pixels, "
                         "1 <= xmin <= xmax, 1 <= ymin <= ymax")
        out.append((box[0], *box[1:5], box[5] if len(box) == 6 else 0))
    return out


def _optional_str(value: Any, column: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadRow(f"{column} must be a string, got {type(value).__name__} {value!r}")
    return value.strip() or None


def _row(line: int, record: dict[str, Any]) -> Row:
    path = _optional_str(record.get("path"), "path")
    if path is None:
        raise BadRow("empty path")
    split = _optional_str(record.get("split"), "split")
    if split is not None and not _SPLIT_RE.match(split):
        raise BadRow(f"split {split!r} must be letters, digits, '_' or '-' (it names shard files)")
    return Row(line=line, path=path, labels=_parse_labels(record.get("labels")),
               mask=_optional_str(record.get("mask"), "mask"), split=split, boxes=_parse_boxes(record.get("boxes")))


def read_labels_file(path: Path) -> tuple[list[Row], list[tuple[int, str]]]:
    """(good rows, [(line, reason)] of malformed rows). A file that cannot be read at all raises ValueError."""
    if not path.is_file():
        raise FileNotFoundError(f"labels file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return _read_jsonl(path)
    if suffix not in (".csv", ".tsv"):
        raise ValueError(f"labels file {path}: expected a .csv, .tsv or .jsonl file")
    return _read_csv(path, "\t" if suffix == ".tsv" else ",")


def utf8_lines(path: Path, what: str) -> Iterator[str]:
    """The lines of a text file we read; one that is not UTF-8 stops the read with an error naming the file and
    the line (Python's own names neither)."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(f"{what} {path}: line {number} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at "
                                 f"column {exc.start + 1}); save the file as UTF-8") from None


def _read_jsonl(path: Path) -> tuple[list[Row], list[tuple[int, str]]]:
    rows: list[Row] = []
    bad: list[tuple[int, str]] = []
    for line, text in enumerate(utf8_lines(path, "labels file"), start=1):
        if not text.strip():
            continue
        try:
            record = json.loads(text)
            if not isinstance(record, dict):
                raise BadRow(f"expected a JSON object, got {type(record).__name__}")
            unknown = sorted(set(record) - set(COLUMNS))
            if unknown:
                raise BadRow(f"unknown field(s) {unknown}; expected {', '.join(COLUMNS)}")
            if "path" not in record or "labels" not in record:
                raise BadRow('needs the fields "path" and "labels" (an empty list for no class)')
            rows.append(_row(line, record))
        except ValueError as exc:  # BadRow and json's JSONDecodeError
            bad.append((line, f"malformed row: {exc}"))
    return rows, bad


def _csv_records(reader: Any) -> Iterator[tuple[int, list[str] | str]]:
    """(line, fields) per record, or (line, why) for one the csv module refuses (a field over its 131,072-byte
    limit): a bad row like the others, and the next records are still read."""
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield reader.line_num, f"malformed row: {exc}"
            continue
        yield reader.line_num, fields


def _read_csv(path: Path, delimiter: str) -> tuple[list[Row], list[tuple[int, str]]]:
    rows: list[Row] = []
    bad: list[tuple[int, str]] = []
    records = _csv_records(csv.reader(utf8_lines(path, "labels file"), delimiter=delimiter))
    _, header = next(records, (0, None))
    if header is None or isinstance(header, str):
        raise ValueError(f"labels file {path}: {header or 'empty'} (expected a header with the columns "
                         f"path,labels[,mask][,split][,boxes])")
    header = [h.strip().lower() for h in header]
    unknown = [h for h in header if h not in COLUMNS]
    if "path" not in header or "labels" not in header or unknown or len(set(header)) != len(header):
        raise ValueError(f"labels file {path}: header {header} must name the columns path and labels, "
                         f"optionally mask, split and boxes, each once")
    for line, fields in records:
        if isinstance(fields, str):
            bad.append((line, fields))
            continue
        if not any(f.strip() for f in fields):
            continue
        if len(fields) != len(header):
            bad.append((line, f"malformed row: {len(fields)} fields, the header has {len(header)}"))
            continue
        try:
            rows.append(_row(line, dict(zip(header, fields))))
        except BadRow as exc:
            bad.append((line, f"malformed row: {exc}"))
    return rows, bad


def read_classes_file(path: str | os.PathLike) -> list[str]:
    """One class name a line (blank lines skipped, surrounding spaces stripped), in index order. A name given twice
    would silently map to one index: refused, naming both lines."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"classes file {path} does not exist")
    seen: dict[str, int] = {}
    names: list[str] = []
    for line, text in enumerate(utf8_lines(path, "classes file"), start=1):
        name = text.strip()
        if not name:
            continue
        if name in seen:
            raise ValueError(f"classes file {path}: class {name!r} on line {line} is already on line {seen[name]} "
                             "(each class must be named once)")
        seen[name] = line
        names.append(name)
    if not names:
        raise ValueError(f"classes file {path}: no class names")
    return names


def check_unique_classes(classes: Sequence[str], where: str) -> None:
    """A class list with a name twice is refused, naming both positions (1-based)."""
    first: dict[str, int] = {}
    for i, name in enumerate(classes, start=1):
        if name in first:
            raise ValueError(f"{where}: class {name!r} is given twice (names {first[name]} and {i})")
        first[name] = i


def _relative(root: Path, rel: str) -> tuple[str, Path]:
    """A row's path made safe: relative, inside the root, forward slashes. -> (source id, absolute path)"""
    posix = PurePosixPath(rel.replace("\\", "/"))
    if posix.is_absolute() or ".." in posix.parts or re.match(r"^[A-Za-z]:", rel):
        raise BadRow(f"path {rel!r} must be relative to the root and stay inside it")
    clean = str(posix)
    path = root / clean
    target = _escapes(root, path)
    if target is not None:
        raise BadRow(f"path {rel!r} is a symbolic link (or under one) that leads outside the root, to {target}")
    return clean, path


def _escapes(root: Path, path: Path) -> Path | None:
    """Where `path` really is (every symbolic link resolved) when that is outside the resolved root, else None."""
    target = path.resolve()
    return None if target.is_relative_to(root.resolve()) else target


# ----------------------------------------------------------------------------------------------------------------------
# Planning
# ----------------------------------------------------------------------------------------------------------------------


def parse_fractions(text: str | dict[str, float]) -> dict[str, float]:
    """"train=0.8,val=0.1,test=0.1" -> dict; fractions in [0, 1] summing to 1."""
    if isinstance(text, dict):
        fractions = dict(text)
    else:
        fractions = {}
        for part in text.split(","):
            name, _, value = part.partition("=")
            try:
                fractions[name.strip()] = float(value)
            except ValueError:
                raise ValueError(f"split fractions: expected name=fraction[,name=fraction...], got {text!r}") from None
    if not fractions or any(not _SPLIT_RE.match(n) or not 0.0 <= f <= 1.0 for n, f in fractions.items()):
        raise ValueError(f"split fractions: names must be letters/digits/_/- and fractions in [0, 1], got {text!r}")
    if abs(sum(fractions.values()) - 1.0) > 1e-6:
        raise ValueError(f"split fractions must sum to 1, got {fractions} (sum {sum(fractions.values())})")
    return fractions


def seeded_split(count: int, fractions: dict[str, float], seed: int) -> list[str]:
    """The split of each of `count` items: a seeded permutation cut at the rounded cumulative fractions."""
    perm = np.random.default_rng([seed, 0]).permutation(count)
    names = list(fractions)
    bounds = np.round(np.cumsum([fractions[n] for n in names]) * count).astype(int)
    bounds[-1] = count
    out = [""] * count
    start = 0
    for name, stop in zip(names, bounds):
        for i in perm[start:stop]:
            out[int(i)] = name
        start = int(stop)
    return out


def _task(root: Path, source_id: str, image: Path, mask: Path | None, classes: tuple[str, ...],
          present: Sequence[int], where: str, verify: bool, key: str,
          boxes: Sequence[tuple[int, ...]] | None = None) -> FolderTask:
    seg_size = file_size(mask) if mask is not None else 0
    est = member_bytes(file_size(image), 400 + 30 * len(boxes or ())) + (member_bytes(seg_size) if mask is not None
                                                                         else 0)
    return FolderTask(key=key, source_id=source_id, image_path=str(image), seg_path=str(mask) if mask else None,
                      classes=classes, present=tuple(sorted(present)), where=where, error=None, verify=verify,
                      est_bytes=est, boxes=None if boxes is None else tuple(tuple(b) for b in boxes))


def _escaped_task(source_id: str, image: Path, target: Path, classes: tuple[str, ...]) -> FolderTask:
    """An ImageFolder file that is a symbolic link to outside the root: reported by its path and skipped."""
    return FolderTask(key=f"bad.{source_id}", source_id=source_id, image_path=str(image), seg_path=None,
                      classes=classes, present=(), boxes=None, where="ImageFolder",
                      error=f"a symbolic link (or under one) that leads outside the root, to {target}", verify=False,
                      est_bytes=0)


def _bad_task(labels_file: Path, line: int, error: str, classes: tuple[str, ...]) -> FolderTask:
    # the key holds a dot, which no written sample's key can (safe_key removes them): never clashes
    return FolderTask(key=f"bad.{line}", source_id="", image_path=str(labels_file), seg_path=None, classes=classes,
                      present=(), boxes=None, where=f"line {line}", error=error, verify=False, est_bytes=0)


def _unique_key(source_id: str, used: set[str]) -> str:
    key = safe_key(source_id)
    base, n = key, 1
    while key in used:  # "a_b/c.jpg" and "a/b_c.jpg" both give a_b_c_jpg
        n += 1
        key = f"{base}_{n}"
    used.add(key)
    return key


def labels_file_tasks(root: Path, labels_file: Path, classes: Sequence[str] | None, fractions: dict[str, float],
                      seed: int, verify: bool) -> tuple[list[str], dict[str, list[FolderTask]]]:
    """(class list, split -> tasks in file order) for a labels file; bad rows become tasks that report themselves."""
    rows, malformed = read_labels_file(labels_file)
    name = labels_file.name
    if classes is None:
        classes = sorted({c for r in rows for c in r.labels})
        if not classes:
            raise ValueError(f"labels file {labels_file}: no class names in any row (and no --classes-file)")
    classes = tuple(classes)
    check_unique_classes(classes, "--classes-file")
    index = {c: i for i, c in enumerate(classes)}
    good: list[tuple[Row, str, Path, Path | None]] = []
    bad: list[tuple[int, str, str | None]] = [(line, reason, None) for line, reason in malformed]
    first_line: dict[str, int] = {}
    for row in rows:
        try:
            source_id, image = _relative(root, row.path)
            mask = _relative(root, row.mask)[1] if row.mask else None
        except BadRow as exc:
            bad.append((row.line, f"malformed row: {exc}", row.split))
            continue
        unknown = [c for c in row.labels if c not in index]
        if unknown:
            shown = ", ".join(classes[:8]) + (", ..." if len(classes) > 8 else "")
            bad.append((row.line, f"unknown class {unknown[0]!r} (the classes are {shown})", row.split))
            continue
        stray = [b[0] for b in row.boxes or () if b[0] not in row.labels]
        if stray:
            bad.append((row.line, f"box of class {stray[0]!r}, which is not among the row's labels {row.labels}",
                        row.split))
            continue
        if source_id in first_line:
            bad.append((row.line, f"duplicate path {source_id!r} (first on line {first_line[source_id]})",
                        row.split))
            continue
        first_line[source_id] = row.line
        good.append((row, source_id, image, mask))

    unsplit = [i for i, (row, *_rest) in enumerate(good) if row.split is None]
    assigned = seeded_split(len(unsplit), fractions, seed)
    split_of = {i: s for i, s in zip(unsplit, assigned)}
    names = list(dict.fromkeys([*(r.split for r, *_ in good if r.split), *fractions]))
    splits: dict[str, list[FolderTask]] = {s: [] for s in names}
    used: set[str] = set()
    for i, (row, source_id, image, mask) in enumerate(good):
        split = row.split or split_of[i]
        present = [index[c] for c in row.labels]
        boxes = None if row.boxes is None else [(index[b[0]], *b[1:]) for b in row.boxes]
        splits[split].append(_task(root, source_id, image, mask, classes, present, f"{name} line {row.line}",
                                   verify, _unique_key(source_id, used), boxes))
    fallback = names[0]
    for line, reason, split in sorted(bad, key=lambda b: b[0]):
        splits[split if split in splits else fallback].append(_bad_task(labels_file, line, reason, classes))
    return list(classes), {s: t for s, t in splits.items() if t}


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _imagefolder_task(root: Path, source_id: str, image: Path, classes: tuple[str, ...], present: int, verify: bool,
                      used: set[str]) -> FolderTask:
    target = _escapes(root, image)
    if target is not None:
        return _escaped_task(source_id, image, target, classes)
    return _task(root, source_id, image, None, classes, [present], "ImageFolder", verify, _unique_key(source_id, used))


def imagefolder_tasks(root: Path, fractions: dict[str, float], seed: int,
                      verify: bool) -> tuple[list[str], dict[str, list[FolderTask]]]:
    """(class list, split -> tasks) for ROOT/<class>/... or ROOT/<split>/<class>/... (single-label)."""
    top = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not top:
        raise ValueError(f"{root} has no class folders (ImageFolder layout: {root}/<class>/<image>)")
    split_layout = all(p.name in SPLIT_NAMES for p in top)
    parents = {p.name: p for p in top} if split_layout else {"": root}
    classes = sorted({d.name for parent in parents.values() for d in parent.iterdir()
                      if d.is_dir() and not d.name.startswith(".")})
    if not classes:
        raise ValueError(f"{root}: no class folders under {', '.join(str(p) for p in parents.values())}")
    index = {c: i for i, c in enumerate(classes)}
    found: dict[str, list[tuple[str, Path, int]]] = {}
    for split, parent in parents.items():
        items = []
        for class_dir in sorted(d for d in parent.iterdir() if d.is_dir() and not d.name.startswith(".")):
            for image in _image_files(class_dir):
                items.append((image.relative_to(root).as_posix(), image, index[class_dir.name]))
        found[split] = items
    used: set[str] = set()
    splits: dict[str, list[FolderTask]] = {}
    if split_layout:
        for split, items in found.items():
            splits[split] = [_imagefolder_task(root, sid, img, tuple(classes), c, verify, used)
                             for sid, img, c in items]
    else:
        items = found[""]
        assigned = seeded_split(len(items), fractions, seed)
        splits = {s: [] for s in fractions}
        for (sid, img, c), split in zip(items, assigned):
            splits[split].append(_imagefolder_task(root, sid, img, tuple(classes), c, verify, used))
    splits = {s: t for s, t in splits.items() if t}
    if not splits:
        raise ValueError(f"{root}: no image files in the class folders ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return classes, splits


def build_folder_shards(root: str | os.PathLike, options: ShardOptions, *, labels: str | os.PathLike | None = None,
                        classes: Sequence[str] | None = None, fractions: str | dict[str, float] | None = None,
                        seed: int = 0, verify: bool = False, dataset: str = "folder",
                        command: Sequence[str] | None = None) -> dict[str, Any]:
    """Shard a folder of images described by a labels file, or laid out as ImageFolder (labels=None)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"--root {root} is not a folder")
    fracs = parse_fractions(fractions if fractions is not None else dict(DEFAULT_FRACTIONS))
    if labels is not None:
        class_list, splits = labels_file_tasks(root, Path(labels), classes, fracs, seed, verify)
        layout = "labels"
    else:
        if classes is not None:
            raise ValueError("--classes-file is for a labels file; ImageFolder takes the class folders' names")
        class_list, splits = imagefolder_tasks(root, fracs, seed, verify)
        layout = "imagefolder"
    return write_dataset(
        dataset=dataset, classes=class_list, splits=splits, build=build_folder_sample, options=options, seed=seed,
        source=str(root), command=command,
        extra={"options": {"layout": layout, "labels": str(labels) if labels is not None else None,
                           "split_fractions": fracs, "verify_decode": verify}},
    )
