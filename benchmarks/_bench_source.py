"""A VOC-layout folder of photo-sized JPEGs for the data benchmarks (generated once, cached under .bench/)."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from explainer.data.voc import VOC_CLASSES, voc_palette


def _photo_like(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """Smooth gradients + blurred blobs + sensor noise: JPEG sizes like real photos (~60-120 KB at 500x375)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    arr = np.stack([
        128 + 60 * np.sin(xx / rng.uniform(20, 80) + rng.uniform(0, 6)) + 40 * np.cos(yy / rng.uniform(20, 80)),
        128 + 50 * np.cos((xx + yy) / rng.uniform(30, 90)),
        128 + 60 * np.sin(yy / rng.uniform(15, 70) + rng.uniform(0, 6)),
    ], axis=-1)
    im = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(2))
    arr = np.asarray(im).astype(np.float32) + rng.normal(0, 9, (h, w, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def make_source(root: Path, n: int, w: int = 500, h: int = 375, seed: int = 0, unique: int = 100) -> Path:
    """root/VOC2007 with n train images (XML labels; 1 in 20 with a SegmentationClass PNG, about VOC-2007's 4%).

    Only `unique` distinct photos are rendered (slow); the others are byte copies under other names.
    """
    voc = root / "VOC2007"
    stamp = voc / f".complete-v3-{n}-{w}x{h}-{seed}-{unique}"
    if stamp.exists():
        return voc
    rng = np.random.default_rng(seed)
    if voc.exists():
        shutil.rmtree(voc)
    for sub in ("Annotations", "JPEGImages", "SegmentationClass", "ImageSets/Main"):
        (voc / sub).mkdir(parents=True, exist_ok=True)
    ids = [f"{i:06d}" for i in range(n)]
    palette = voc_palette()
    photos: list[bytes] = []
    for i, image_id in enumerate(ids):
        if len(photos) < unique:
            buf = io.BytesIO()
            _photo_like(rng, w, h).save(buf, "JPEG", quality=90)
            photos.append(buf.getvalue())
        (voc / "JPEGImages" / f"{image_id}.jpg").write_bytes(photos[i % len(photos)])
        names = rng.choice(VOC_CLASSES, size=int(rng.integers(1, 4)), replace=False)
        objs = "".join(f"<object><name>{c}</name><difficult>0</difficult><bndbox><xmin>1</xmin><ymin>1</ymin>"
                       f"<xmax>9</xmax><ymax>9</ymax></bndbox></object>" for c in names)
        (voc / "Annotations" / f"{image_id}.xml").write_text(
            f"<annotation><filename>{image_id}.jpg</filename><size><width>{w}</width><height>{h}</height>"
            f"<depth>3</depth></size>{objs}</annotation>")
        if i % 20 == 0:
            seg = np.zeros((h, w), np.uint8)
            seg[h // 4: h // 2, w // 4: w // 2] = VOC_CLASSES.index(str(names[0])) + 1
            seg[h // 4 - 2: h // 4, w // 4: w // 2] = 255
            im = Image.fromarray(seg, "P")
            im.putpalette(palette)
            im.save(voc / "SegmentationClass" / f"{image_id}.png")
    (voc / "ImageSets" / "Main" / "train.txt").write_text("".join(f"{i}\n" for i in ids))
    stamp.touch()
    return voc


def source_bytes(voc: Path) -> int:
    return sum(p.stat().st_size for sub in ("JPEGImages", "Annotations", "SegmentationClass")
               for p in (voc / sub).iterdir())


def bench_dir() -> Path:
    root = Path(os.environ.get("EXPLAINER_BENCH_DIR", Path(__file__).resolve().parents[1] / ".bench"))
    root.mkdir(parents=True, exist_ok=True)
    return root
