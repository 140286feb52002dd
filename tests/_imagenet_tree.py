"""Tiny ILSVRC-2012 trees in each layout people have, with every quirk of the real data, for the ImageNet tests.

1000 wnids in the synset mapping (two sharing the name 'crane', as in the real list), images for three classes only.
Train: 4 images per class, box XMLs for the first two only (most real train images have none). Quirks: a PNG named
.JPEG (as n02105855_2933), a CMYK and two grayscale JPEGs, a box crossing the border (clipped), a box wholly outside
(dropped). Val: 6 images ILSVRC2012_val_0000000{1..6} with box XMLs and LOC_val_solution.csv rows; the devkit's
ILSVRC2012_IDs are a shuffled order, not the sorted wnids, so a reader that confused them would mislabel.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from _data_helpers import jpeg_bytes, png_bytes

W, H = 40, 32
WNIDS = sorted(f"n{1440764 + 7919 * i:08d}" for i in range(1000))
NAMES = {w: f"thing {i}, Thing{i} synonym" for i, w in enumerate(WNIDS)}
NAMES[WNIDS[5]] = NAMES[WNIDS[700]] = "crane"  # the real list has 'crane' (bird, machine) and 'maillot' twice
USED = [WNIDS[0], WNIDS[5], WNIDS[999]]  # classes with images: first, a 'crane', last
TRAIN_PER_CLASS = 4
VAL_LABELS = [USED[0], USED[1], USED[2], USED[0], USED[2], USED[1]]  # ILSVRC2012_val_00000001 .. 6
REAL = [[0], [5, 700], [], [0, 999], [999], [5]]  # ReaL: several labels, one empty (no correct label)
LAYOUTS = ("ilsvrc", "archives", "torchvision")


@dataclass
class Expected:
    """What the shards must hold for one source image."""

    wnids: list[str]
    image: bytes
    ext: str
    objects: list[list[int]] | None  # after clipping, sorted-wnid class index
    mode: str = "RGB"
    xml_boxes: list[list[int]] = field(default_factory=list)  # as written (for the CSV)


def _xml(wnid_boxes: list[tuple[str, list[int]]], stem: str, w: int = W, h: int = H) -> str:
    objs = "".join(f"<object><name>{wnid}</name><pose>Unspecified</pose><truncated>0</truncated><difficult>0"
                   f"</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax>"
                   "</bndbox></object>" for wnid, b in wnid_boxes)
    return (f"<annotation><folder>x</folder><filename>{stem}</filename><source><database>ILSVRC_2012</database>"
            f"</source><size><width>{w}</width><height>{h}</height><depth>3</depth></size><segmented>0</segmented>"
            f"{objs}</annotation>")


def _image(rng: np.random.Generator, quirk: str | None) -> tuple[bytes, str, str]:
    if quirk == "png":
        return png_bytes(rng, W, H), "png", "RGB"
    if quirk == "cmyk":
        return jpeg_bytes(rng, W, H, mode="CMYK"), "jpg", "CMYK"
    if quirk == "gray":
        return jpeg_bytes(rng, W, H, mode="L"), "jpg", "L"
    return jpeg_bytes(rng, W, H), "jpg", "RGB"


TRAIN_QUIRKS = {(0, 2): "png", (1, 1): "cmyk", (2, 3): "gray"}  # (class, image) -> quirk
TRAIN_BOXES = {  # (class, image) -> boxes as written; images 2 and 3 of each class have no XML
    (0, 0): [[2, 3, W + 9, 20]],  # crosses the right border: clipped to W
    (0, 1): [[1, 1, 10, 10], [5, 5, 30, 25]],
    (1, 0): [[W + 5, 2, W + 20, 9], [4, 4, 12, 12]],  # the first is wholly outside: dropped
    (1, 1): [[0, 0, W, H]],
    (2, 0): [[3, 3, 9, 9]],
    (2, 1): [[-4, 2, 8, H + 3]],  # crosses two borders
}
VAL_BOXES = {1: [[2, 2, 20, 20]], 2: [[1, 1, 30, 30], [0, 5, W + 1, 12]], 3: [[4, 4, 9, 9]], 4: [[5, 6, 7, 8]],
             5: [[10, 10, 30, 30]], 6: [[1, 2, 3, 4]]}
VAL_QUIRKS = {5: "gray"}


def _clip(boxes: list[list[int]], cls: int) -> list[list[int]]:
    out = []
    for b in boxes:
        c = [min(max(b[0], 0), W), min(max(b[1], 0), H), min(max(b[2], 0), W), min(max(b[3], 0), H)]
        if c[0] >= c[2] or c[1] >= c[3]:
            continue
        out.append([cls, *c, 0])
    return out


def expected_samples() -> dict[str, dict[str, Expected]]:
    """{"train": {stem: Expected}, "test": {...}}: train holds the val hold-out too (which images go there is the
    seeded draw's business; the tests check the draw separately)."""
    rng = np.random.default_rng(0)
    train: dict[str, Expected] = {}
    for c, wnid in enumerate(USED):
        for k in range(TRAIN_PER_CLASS):
            data, ext, mode = _image(rng, TRAIN_QUIRKS.get((c, k)))
            boxes = TRAIN_BOXES.get((c, k))
            objects = _clip(boxes, WNIDS.index(wnid)) if boxes is not None else None
            train[f"{wnid}_{k}"] = Expected([wnid], data, ext, objects, mode, boxes or [])
    test: dict[str, Expected] = {}
    for n, wnid in enumerate(VAL_LABELS, start=1):
        data, ext, mode = _image(rng, VAL_QUIRKS.get(n))
        test[f"ILSVRC2012_val_{n:08d}"] = Expected([wnid], data, ext, _clip(VAL_BOXES[n], WNIDS.index(wnid)), mode,
                                                   VAL_BOXES[n])
    return {"train": train, "test": test}


def _write(path: Path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        path.write_text(data)
    else:
        path.write_bytes(data)


def _mapping() -> str:
    return "".join(f"{w} {NAMES[w]}\n" for w in WNIDS)


def _devkit(root: Path) -> None:
    """data/meta.mat (1000 leaves in a shuffled ID order plus two inner synsets) and the val ground truth."""
    from scipy.io import savemat

    order = WNIDS[:]
    random.Random(7).shuffle(order)
    ids = {w: i + 1 for i, w in enumerate(order)}
    rows = [(ids[w], w, NAMES[w], 0) for w in WNIDS] + [(1001, "n00001740", "entity", 3), (1002, "n00002137",
                                                                                           "abstraction", 2)]
    synsets = np.zeros((len(rows), 1), dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"),
                                              ("num_children", "O")])
    for i, (sid, wnid, words, children) in enumerate(rows):
        synsets[i, 0] = (np.array([[sid]]), wnid, words, np.array([[children]]))
    (root / "data").mkdir(parents=True)
    savemat(root / "data" / "meta.mat", {"synsets": synsets})
    _write(root / "data" / "ILSVRC2012_validation_ground_truth.txt", "".join(f"{ids[w]}\n" for w in VAL_LABELS))


def make_imagenet_tree(root: Path, layout: str, *, devkit: bool = True, meta_bin: bool = False) -> Path:
    """The tree in `layout` under root; returns the folder to pass as --root.

    ilsvrc: Kaggle's ILSVRC/Data/CLS-LOC + Annotations + LOC_synset_mapping.txt + LOC_val_solution.csv.
    archives: train/<wnid>/, flat val/, ILSVRC2012_devkit_t12/ (if devkit), ILSVRC2012_bbox_{val_v3/val,train_v2}.
    torchvision: train/<wnid>/, val/<wnid>/, optionally meta.bin (torchvision's) and the box XMLs.
    """
    exp = expected_samples()
    if layout == "ilsvrc":
        data, ann = root / "ILSVRC" / "Data" / "CLS-LOC", root / "ILSVRC" / "Annotations" / "CLS-LOC"
        train_dir, val_dir, train_xml, val_xml = data / "train", data / "val", ann / "train", ann / "val"
        _write(root / "LOC_synset_mapping.txt", _mapping())
        lines = ["ImageId,PredictionString"] + [
            f"{stem}," + " ".join(f"{e.wnids[0]} {' '.join(map(str, b))}" for b in e.xml_boxes)
            for stem, e in exp["test"].items()]
        _write(root / "LOC_val_solution.csv", "\n".join(lines) + "\n")
    elif layout in ("archives", "torchvision"):
        train_dir, val_dir = root / "train", root / "val"
        train_xml, val_xml = root / "ILSVRC2012_bbox_train_v2", root / "ILSVRC2012_bbox_val_v3" / "val"
        if devkit and layout == "archives":
            _devkit(root / "ILSVRC2012_devkit_t12")
    else:
        raise ValueError(layout)
    for stem, e in exp["train"].items():
        wnid = e.wnids[0]
        _write(train_dir / wnid / f"{stem}.JPEG", e.image)
        if e.xml_boxes:
            _write(train_xml / wnid / f"{stem}.xml", _xml([(wnid, b) for b in e.xml_boxes], stem))
    for stem, e in exp["test"].items():
        folder = val_dir / e.wnids[0] if layout == "torchvision" else val_dir
        _write(folder / f"{stem}.JPEG", e.image)
        _write(val_xml / f"{stem}.xml", _xml([(e.wnids[0], b) for b in e.xml_boxes], stem))
    if meta_bin:
        import torch

        torch.save(({w: tuple(n.strip() for n in NAMES[w].split(",")) for w in WNIDS}, VAL_LABELS), root / "meta.bin")
    return root


def write_real(path: Path) -> Path:
    path.write_text(json.dumps(REAL))
    return path
