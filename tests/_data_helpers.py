"""Tiny source trees in the official VOC and COCO layouts, built by the data tests themselves."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from explainer.data.voc import voc_palette


def jpeg_bytes(rng: np.random.Generator, w: int = 48, h: int = 40, mode: str = "RGB") -> bytes:
    arr = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    im = Image.fromarray(arr, "RGB")
    if mode != "RGB":
        im = im.convert(mode)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=85)
    return buf.getvalue()


def png_bytes(rng: np.random.Generator, w: int = 48, h: int = 40, mode: str = "RGB") -> bytes:
    arr = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    im = Image.fromarray(arr, "RGB")
    if mode == "P":
        im = im.quantize(16)
    elif mode != "RGB":
        im = im.convert(mode)
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def voc_xml(objects: list[tuple[str, int]], w: int = 48, h: int = 40) -> str:
    objs = "".join(
        f"<object><name>{name}</name><pose>Left</pose><truncated>0</truncated><difficult>{d}</difficult>"
        f"<bndbox><xmin>1</xmin><ymin>1</ymin><xmax>10</xmax><ymax>10</ymax></bndbox></object>"
        for name, d in objects
    )
    return (f"<annotation><folder>VOC2007</folder><filename>x.jpg</filename><size><width>{w}</width>"
            f"<height>{h}</height><depth>3</depth></size>{objs}</annotation>")


def seg_png(classes: list[int], w: int = 48, h: int = 40) -> bytes:
    """Palette PNG: class index stripes with a void (255) border, like VOC SegmentationClass."""
    arr = np.zeros((h, w), np.uint8)
    for i, c in enumerate(classes):
        arr[5 + i * 8: 11 + i * 8, 5:30] = c
    arr[4, 4:31] = 255
    im = Image.fromarray(arr, "P")
    im.putpalette(voc_palette())
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


# id -> (objects [(name, difficult)], segmentation classes or None)
GOOD_VOC = {
    "000001": ([("dog", 0), ("person", 0)], [12, 15]),
    "000002": ([("aeroplane", 0)], None),
    "000003": ([("tvmonitor", 0), ("cat", 1)], None),  # a difficult cat
    "000004": ([("bicycle", 0), ("bicycle", 0)], [2]),
    "000005": ([("sheep", 0)], None),
    "000006": ([("car", 1)], None),  # only a difficult object
    "000007": ([("bird", 0), ("chair", 0)], [3, 9]),
    "000008": ([("horse", 0)], None),
    "000009": ([("bottle", 0)], [5]),
    "000010": ([("sofa", 0), ("train", 0)], None),
}
VOC_SPLITS = {"train": ["000001", "000002", "000003", "000004"], "val": ["000005", "000006"],
              "test": ["000007", "000008", "000009", "000010"]}


def make_voc_tree(root: Path, *, bad: bool = False, seed: int = 0) -> Path:
    """VOCdevkit/VOC2007 with GOOD_VOC; with bad=True the train split also holds one sample per bad-input case."""
    rng = np.random.default_rng(seed)
    voc = root / "VOCdevkit" / "VOC2007"
    for sub in ("Annotations", "JPEGImages", "SegmentationClass", "ImageSets/Main", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True, exist_ok=True)
    for image_id, (objects, seg) in GOOD_VOC.items():
        (voc / "JPEGImages" / f"{image_id}.jpg").write_bytes(jpeg_bytes(rng))
        (voc / "Annotations" / f"{image_id}.xml").write_text(voc_xml(objects))
        if seg is not None:
            (voc / "SegmentationClass" / f"{image_id}.png").write_bytes(seg_png(seg))
    splits = {k: list(v) for k, v in VOC_SPLITS.items()}
    if bad:
        cases = bad_voc_cases(rng)
        for image_id, (image, xml) in cases.items():
            if image is not None:
                (voc / "JPEGImages" / f"{image_id}.jpg").write_bytes(image)
            if xml is not None:
                (voc / "Annotations" / f"{image_id}.xml").write_text(xml)
        splits["train"] += list(cases)
    for split, ids in splits.items():
        (voc / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    seg_ids = [i for i, (_, s) in GOOD_VOC.items() if s is not None]
    (voc / "ImageSets" / "Segmentation" / "test.txt").write_text("".join(f"{i}\n" for i in seg_ids))
    return voc


def bad_voc_cases(rng: np.random.Generator) -> dict[str, tuple[bytes | None, str | None]]:
    """id -> (image bytes or None for a missing file, XML text or None for a missing file)."""
    good_xml = voc_xml([("person", 0)])
    full = jpeg_bytes(rng)
    return {
        "bad_truncated": (full[: len(full) // 2], good_xml),
        "bad_empty": (b"", good_xml),
        "bad_garbage": (b"this is not an image" * 10, good_xml),
        "bad_missing_image": (None, good_xml),
        "bad_missing_xml": (jpeg_bytes(rng), None),
        "bad_malformed_xml": (jpeg_bytes(rng), "<annotation><object><name>dog</name></annot"),
        "bad_unknown_class": (jpeg_bytes(rng), voc_xml([("dog", 0), ("unicorn", 0)])),
        # kept, with a warning:
        "odd_png_as_jpg": (png_bytes(rng), voc_xml([("cat", 0)])),
        "odd_grayscale": (jpeg_bytes(rng, mode="L"), voc_xml([("cow", 0)])),
        "odd_cmyk": (jpeg_bytes(rng, mode="CMYK"), voc_xml([("boat", 0)])),
        "odd_palette": (png_bytes(rng, mode="P"), voc_xml([("bus", 0)])),
        "odd_no_objects": (jpeg_bytes(rng), voc_xml([])),
    }


BAD_SKIPPED = {
    "bad_truncated": "truncated",
    "bad_empty": "empty",
    "bad_garbage": "not a readable image",
    "bad_missing_image": "missing",
    "bad_missing_xml": "XML is missing",
    "bad_malformed_xml": "malformed annotation XML",
    "bad_unknown_class": "unknown class name 'unicorn'",
}
ODD_WARNED = {
    "odd_png_as_jpg": "PNG data under a .jpg name",
    "odd_grayscale": "L image",
    "odd_cmyk": "CMYK image",
    "odd_palette": "P image",
    "odd_no_objects": "no objects annotated",
}


# ----------------------------------------------------------------------------------------------------------------------
# COCO
# ----------------------------------------------------------------------------------------------------------------------

COCO_CATEGORIES = [  # deliberately not contiguous and not in id order in the file
    {"id": 90, "name": "toothbrush", "supercategory": "indoor"},
    {"id": 1, "name": "person", "supercategory": "person"},
    {"id": 3, "name": "car", "supercategory": "vehicle"},
    {"id": 18, "name": "dog", "supercategory": "animal"},
]


def _poly(x0: float, y0: float, x1: float, y1: float) -> list[list[float]]:
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def make_coco_tree(root: Path, *, n_train: int = 20, n_test: int = 6, seed: int = 0) -> Path:
    """train2014/ val2014/ annotations/instances_{train,val}2014.json with polygons and an uncompressed crowd RLE.

    train image 0 has no annotations; train image 1 is listed but its file is missing; test image 0 has a person
    polygon, a car polygon overlapping it and a crowd RLE of people.
    """
    rng = np.random.default_rng(seed)
    w, h = 40, 30
    for sub in ("train2014", "val2014", "annotations"):
        (root / sub).mkdir(parents=True, exist_ok=True)

    def write(split_dir: str, prefix: str, n: int, start_id: int, ann_id: int, special: bool):
        images, anns = [], []
        for i in range(n):
            image_id = start_id + i
            name = f"COCO_{prefix}_{image_id:012d}.jpg"
            images.append({"id": image_id, "file_name": name, "width": w, "height": h})
            if not (special and prefix == "train2014" and i == 1):
                (root / split_dir / name).write_bytes(jpeg_bytes(rng, w, h))
            if special and prefix == "train2014" and i == 0:
                continue  # no annotations
            cats = [1, 3, 18, 90]
            cat = cats[i % 4]
            anns.append({"id": ann_id, "image_id": image_id, "category_id": cat, "iscrowd": 0,
                         "segmentation": _poly(2, 2, 12, 12), "area": 100.0, "bbox": [2, 2, 10, 10]})
            ann_id += 1
            if special and prefix == "val2014" and i == 0:
                anns.append({"id": ann_id, "image_id": image_id, "category_id": 3, "iscrowd": 0,
                             "segmentation": _poly(8, 8, 20, 14), "area": 72.0, "bbox": [8, 8, 12, 6]})
                ann_id += 1
                # uncompressed RLE (column-major runs): background 30*30, then 30*5 crowd pixels (columns 30..34)
                counts = [h * 30, h * 5, h * (w - 35)]
                anns.append({"id": ann_id, "image_id": image_id, "category_id": 1, "iscrowd": 1,
                             "segmentation": {"counts": counts, "size": [h, w]}, "area": float(h * 5),
                             "bbox": [30, 0, 5, h]})
                ann_id += 1
        return {"images": images, "annotations": anns, "categories": COCO_CATEGORIES}

    train = write("train2014", "train2014", n_train, 1000, 1, True)
    test = write("val2014", "val2014", n_test, 5000, 10000, True)
    (root / "annotations" / "instances_train2014.json").write_text(json.dumps(train))
    (root / "annotations" / "instances_val2014.json").write_text(json.dumps(test))
    return root


# ----------------------------------------------------------------------------------------------------------------------
# Running make_shards and reading shards back
# ----------------------------------------------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]
MAKE_SHARDS = REPO / "launch" / "make_shards.py"


def make_shards(*args: str) -> int:
    """launch/make_shards.py main(), in this process (no interpreter start-up per call)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_shards_cli", MAKE_SHARDS)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module.main([*args, "--no-progress"])


def read_tar(path: Path) -> list[tuple[str, bytes]]:
    """(member name, bytes) in archive order."""
    import tarfile

    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def samples_of(out: Path, split: str) -> dict[str, dict[str, bytes]]:
    """key -> {ext: bytes} over all shards of a split, in manifest order."""
    manifest = json.loads((out / "manifest.json").read_text())
    result: dict[str, dict[str, bytes]] = {}
    for shard in manifest["splits"][split]["shards"]:
        for name, data in read_tar(out / shard["path"]):
            key, _, ext = name.partition(".")
            result.setdefault(key, {})[ext] = data
    return result


def tree_bytes(out: Path) -> dict[str, bytes]:
    """Every shard and the manifest of an output folder (what must be identical between re-runs)."""
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))} | {
        "manifest.json": (out / "manifest.json").read_bytes()}


def ddp_loader_worker(rank: int, world_size: int, manifest: str, result_dir: str) -> None:
    """One rank of a real gloo world: iterate 2 epochs (2 DataLoader workers), one collective per step like DDP."""
    import datetime

    import torch
    import torch.distributed as dist

    from explainer.config import DataConfig
    from explainer.data import make_eval_loader, make_train_loader, read_manifest

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{result_dir}/pg", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))
    try:
        cfg = DataConfig(manifest=manifest, image_size=32, batch_size=4, num_workers=2, shuffle_buffer=16)
        m = read_manifest(manifest)
        stream = make_train_loader(cfg, m, "train", rank=rank, world_size=world_size, seed=3, drop_unlabelled=True)
        epochs = []
        for epoch in range(2):
            stream.set_epoch(epoch)
            keys, steps = [], 0
            for batch in stream:
                assert batch["image"].shape == (4, 3, 32, 32) and batch["labels"].shape == (4, len(m.classes))
                keys += batch["key"]
                steps += 1
                flag = torch.ones(1)
                dist.all_reduce(flag)  # a rank with fewer batches would leave the others waiting here
            epochs.append({"keys": keys, "steps": steps, "len": len(stream)})
        evaluated = [k for b in make_eval_loader(cfg, m, "test", rank=rank, world_size=world_size) for k in b["key"]]
        gathered: list = [None] * world_size
        dist.all_gather_object(gathered, {"epochs": epochs, "eval": evaluated})
        if rank == 0:
            Path(result_dir, "result.json").write_text(json.dumps(gathered))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":  # entry point of the torchrun-launched 2-process loader test
    import os
    import sys

    ddp_loader_worker(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), sys.argv[1], sys.argv[2])
