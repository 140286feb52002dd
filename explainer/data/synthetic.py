"""The embedded default dataset: deterministic multi-label scenes with exact class masks, in the VOC layout.

Each class has its own shape, colour and texture (learnable in minutes by tiny CPU models at 64 px); the background is
cluttered with class-neutral (grey, low-saturation) strokes and noise, so a classifier has to find the objects.
Masks mark a VOC-like void band (255) of `void_width` px on both sides of every object boundary.

Optional background cue for a bias experiment: with `cue_class=K, cue_prob=p`, train/val images that contain class K
get a "rail tracks" pattern in a fixed band near the bottom with probability p (images without K never do); in the
test split the cue is drawn with probability p independently of the classes, so a cue-reliant classifier shows up
(false positives for K on cued images, explanations for K on the band). `render_scene` returns the cue mask.
"""

from __future__ import annotations

import io
import json
import os
import xml.etree.ElementTree as ET
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = (
    "circle", "square", "triangle", "star", "cross", "ring", "diamond", "hexagon", "crescent", "arrow", "heart",
    "pentagon",
)
# Saturated, well separated colours; the first six are the most distinct (default num_classes = 6).
COLOURS: tuple[tuple[int, int, int], ...] = (
    (230, 30, 30), (30, 70, 235), (30, 190, 50), (245, 215, 20), (215, 40, 215), (20, 210, 225),
    (250, 130, 0), (120, 40, 190), (150, 245, 60), (255, 140, 185), (0, 125, 120), (140, 70, 20),
)
TEXTURES: tuple[str, ...] = ("solid", "stripes", "dots", "checker")


@dataclass
class SyntheticSpec:
    """Everything that determines the dataset; scenes are a pure function of (spec, split, index)."""

    num_classes: int = 6
    image_size: int = 64
    seed: int = 0
    counts: dict[str, int] = field(default_factory=lambda: {"train": 600, "val": 150, "test": 150})
    min_objects: int = 1
    max_objects: int = 3
    void_width: int = 1  # px of void on each side of an object boundary
    cue_class: int | None = None  # bias experiment: class whose train/val images may carry the background cue
    cue_prob: float = 0.0

    def __post_init__(self) -> None:
        if not 1 <= self.num_classes <= len(SHAPES):
            raise ValueError(f"num_classes must be in 1..{len(SHAPES)}, got {self.num_classes}")
        if self.image_size < 16:
            raise ValueError(f"image_size must be >= 16, got {self.image_size}")
        if not 1 <= self.min_objects <= self.max_objects <= self.num_classes:
            raise ValueError(f"need 1 <= min_objects <= max_objects <= num_classes, got "
                             f"{self.min_objects}, {self.max_objects}, {self.num_classes}")
        if self.cue_class is not None and not 0 <= self.cue_class < self.num_classes:
            raise ValueError(f"cue_class must be in 0..{self.num_classes - 1}, got {self.cue_class}")
        if not 0.0 <= self.cue_prob <= 1.0:
            raise ValueError(f"cue_prob must be in [0, 1], got {self.cue_prob}")
        if any(n < 0 for n in self.counts.values()):
            raise ValueError(f"split counts must be >= 0, got {self.counts}")

    @property
    def class_names(self) -> list[str]:
        return list(SHAPES[: self.num_classes])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> SyntheticSpec:
        return cls(**raw)


def scene_id(split: str, index: int) -> str:
    return f"{split}_{index:06d}"


def parse_scene_id(source_id: str) -> tuple[str, int]:
    """Inverse of scene_id: 'test_000012' -> ('test', 12)."""
    split, _, index = source_id.rpartition("_")
    if not split or not index.isdigit():
        raise ValueError(f"{source_id!r} is not a synthetic scene id like 'test_000012'")
    return split, int(index)


def _rng(spec: SyntheticSpec, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([spec.seed, zlib.crc32(split.encode()), index])


def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    def ring(n: int, radius: float, phase: float) -> list[tuple[float, float]]:
        ang = phase + 2 * np.pi * np.arange(n) / n
        return [(cx + radius * np.cos(a), cy + radius * np.sin(a)) for a in ang]

    if shape == "triangle":
        return ring(3, r, -np.pi / 2)
    if shape == "diamond":
        return ring(4, r, 0.0)
    if shape == "hexagon":
        return ring(6, r, 0.0)
    if shape == "pentagon":
        return ring(5, r, -np.pi / 2)
    if shape == "star":
        outer, inner = ring(5, r, -np.pi / 2), ring(5, r * 0.45, -np.pi / 2 + np.pi / 5)
        return [p for pair in zip(outer, inner) for p in pair]
    if shape == "arrow":
        w = r * 0.35
        return [(cx - r, cy - w), (cx + 0.1 * r, cy - w), (cx + 0.1 * r, cy - r), (cx + r, cy),
                (cx + 0.1 * r, cy + r), (cx + 0.1 * r, cy + w), (cx - r, cy + w)]
    if shape == "heart":
        t = np.linspace(0, 2 * np.pi, 40, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        return [(cx + r * xi / 17, cy + r * yi / 17) for xi, yi in zip(x, y)]
    return None


def _shape_mask(shape: str, size: int, cx: float, cy: float, r: float) -> np.ndarray:
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    box = [cx - r, cy - r, cx + r, cy + r]
    poly = _shape_polygon(shape, cx, cy, r)
    if poly is not None:
        draw.polygon(poly, fill=255)
    elif shape == "circle":
        draw.ellipse(box, fill=255)
    elif shape == "square":
        s = r * 0.85
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=255)
    elif shape == "cross":
        w = r * 0.38
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=255)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=255)
    elif shape == "ring":
        draw.ellipse(box, fill=255)
        q = r * 0.5
        draw.ellipse([cx - q, cy - q, cx + q, cy + q], fill=0)
    elif shape == "crescent":
        draw.ellipse(box, fill=255)
        d = r * 0.55
        draw.ellipse([cx - r + d, cy - r - d * 0.3, cx + r + d, cy + r - d * 0.3], fill=0)
    else:  # pragma: no cover - SHAPES and this function are kept in sync
        raise ValueError(f"unknown shape {shape}")
    return np.asarray(canvas) > 127


def _texture(kind: str, size: int, colour: np.ndarray, scale: int) -> np.ndarray:
    """[size, size, 3] float fill for one class: its colour and a darker tone in a class-specific pattern."""
    yy, xx = np.mgrid[0:size, 0:size]
    dark = colour * 0.55
    if kind == "stripes":
        use_dark = ((xx + yy) // scale) % 2 == 1
    elif kind == "dots":
        use_dark = ((xx // scale) % 2 == 0) & ((yy // scale) % 2 == 0)
    elif kind == "checker":
        use_dark = ((xx // scale) + (yy // scale)) % 2 == 1
    else:
        use_dark = np.zeros((size, size), bool)
    return np.where(use_dark[..., None], dark, colour)


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    """Low-saturation base with grey clutter strokes and blobs (no class colours)."""
    base = rng.uniform(70, 180)
    tint = rng.uniform(-12, 12, size=3)
    grad = np.linspace(-1, 1, size)[:, None] * rng.uniform(-25, 25) + np.linspace(-1, 1, size)[None, :] * rng.uniform(
        -25, 25)
    arr = np.clip(base + tint[None, None, :] + grad[..., None], 0, 255).astype(np.uint8)
    im = Image.fromarray(arr, "RGB")
    draw = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(6, 14))):
        g = int(rng.uniform(30, 230))
        tone = tuple(int(np.clip(g + rng.uniform(-10, 10), 0, 255)) for _ in range(3))
        x0, y0, x1, y1 = (float(v) for v in rng.uniform(-0.1 * size, 1.1 * size, size=4))
        kind = rng.integers(0, 3)
        if kind == 0:
            draw.line([x0, y0, x1, y1], fill=tone, width=int(rng.integers(1, max(2, size // 24) + 1)))
        else:
            s = rng.uniform(0.03, 0.12) * size
            box = [x0 - s, y0 - s * rng.uniform(0.4, 1.0), x0 + s, y0 + s * rng.uniform(0.4, 1.0)]
            (draw.ellipse if kind == 1 else draw.rectangle)(box, outline=tone, width=1)
    return im


def cue_region(size: int) -> tuple[int, int]:
    """Rows [y0, y1) of the band where the background cue is drawn."""
    return int(round(size * 0.80)), int(round(size * 0.95))


def _draw_cue(im: Image.Image) -> np.ndarray:
    """'Rail tracks' across a fixed band near the bottom; returns the band mask."""
    size = im.size[0]
    y0, y1 = cue_region(size)
    draw = ImageDraw.Draw(im)
    step = max(3, size // 16)
    for x in range(0, size, step):
        draw.rectangle([x, y0, x + max(1, step // 2) - 1, y1 - 1], fill=(95, 60, 30))
    rail = max(1, size // 48)
    for y in (y0 + rail, y1 - 2 * rail):
        draw.rectangle([0, y, size - 1, y + rail - 1], fill=(215, 215, 225))
    band = np.zeros((size, size), bool)
    band[y0:y1] = True
    return band


def _void_band(mask: np.ndarray, width: int) -> np.ndarray:
    """Pixels within `width` of a label change (both sides of every boundary)."""
    if width <= 0:
        return np.zeros(mask.shape, bool)
    h, w = mask.shape
    padded = np.pad(mask, width, mode="edge")
    band = np.zeros(mask.shape, bool)
    for dy in range(-width, width + 1):
        for dx in range(-width, width + 1):
            if dy or dx:
                band |= padded[width + dy: width + dy + h, width + dx: width + dx + w] != mask
    return band


def render_scene(spec: SyntheticSpec, split: str, index: int) -> tuple[Image.Image, np.ndarray, np.ndarray | None]:
    """(RGB image, uint8 class-index mask: 0 bg, k+1 class k, 255 void; bool cue mask or None). Deterministic."""
    rng = _rng(spec, split, index)
    size = spec.image_size
    im = _background(rng, size)

    n = int(rng.integers(spec.min_objects, spec.max_objects + 1))
    placed: list[tuple[int, float, float, float]] = []  # (class, cx, cy, r), objects kept apart
    for cls in (int(c) for c in rng.choice(spec.num_classes, size=n, replace=False)):
        for _ in range(40):
            r = rng.uniform(0.15, 0.25) * size
            cx, cy = rng.uniform(r * 0.8, size - r * 0.8, size=2)
            if all(np.hypot(cx - px, cy - py) >= 0.85 * (r + pr) for _, px, py, pr in placed):
                placed.append((cls, cx, cy, r))
                break  # no room after 40 tries: the object (and its label) is left out

    has_cue = False
    if spec.cue_class is not None and spec.cue_prob > 0:
        # test: independent of the classes; train/val: only images that contain the cue class
        eligible = split == "test" or any(cls == spec.cue_class for cls, *_ in placed)
        has_cue = bool(rng.random() < spec.cue_prob) and eligible
    band = _draw_cue(im) if has_cue else None

    arr = np.asarray(im, dtype=np.float32).copy()
    labels = np.zeros((size, size), np.uint8)
    for cls, cx, cy, r in placed:
        obj = _shape_mask(SHAPES[cls], size, cx, cy, r)
        colour = np.array(COLOURS[cls], np.float32) * rng.uniform(0.85, 1.1)
        fill = _texture(TEXTURES[cls % len(TEXTURES)], size, colour, scale=max(2, size // 21))
        arr[obj] = fill[obj]
        labels[obj] = cls + 1
    arr += rng.normal(0.0, 6.0, size=arr.shape)
    image = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")

    mask = labels.copy()
    mask[_void_band(labels, spec.void_width)] = 255
    cue_mask = None
    if band is not None:
        cue_mask = band & (labels == 0)
    return image, mask, cue_mask


def scene_classes(mask: np.ndarray, num_classes: int) -> list[int]:
    """Classes with visible pixels in a mask (void excluded)."""
    values = np.unique(mask)
    return [int(v) - 1 for v in values if 1 <= v <= num_classes]


def _annotation_xml(image_id: str, size: int, mask: np.ndarray, names: list[str]) -> bytes:
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = "synthetic"
    ET.SubElement(root, "filename").text = f"{image_id}.jpg"
    sz = ET.SubElement(root, "size")
    for tag, val in (("width", size), ("height", size), ("depth", 3)):
        ET.SubElement(sz, tag).text = str(val)
    ET.SubElement(root, "segmented").text = "1"
    for cls in scene_classes(mask, len(names)):
        ys, xs = np.nonzero(mask == cls + 1)
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = names[cls]
        ET.SubElement(obj, "pose").text = "Unspecified"
        ET.SubElement(obj, "truncated").text = "0"
        ET.SubElement(obj, "difficult").text = "0"
        box = ET.SubElement(obj, "bndbox")
        for tag, val in (("xmin", xs.min() + 1), ("ymin", ys.min() + 1), ("xmax", xs.max() + 1),
                         ("ymax", ys.max() + 1)):
            ET.SubElement(box, tag).text = str(int(val))
    return ET.tostring(root)


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_voc_layout(spec: SyntheticSpec, root: str | os.PathLike) -> Path:
    """Render every scene into a VOC-style folder (JPEGImages, Annotations, ImageSets, SegmentationClass).

    `root/synthetic.json` (the spec) is written last and marks a complete folder: an identical spec is not re-rendered.
    """
    from explainer.data.voc import voc_palette  # local import: voc imports nothing from here

    root = Path(root)
    marker = root / "synthetic.json"
    spec_json = json.dumps(spec.to_dict(), sort_keys=True, indent=1)
    if marker.is_file() and marker.read_text() == spec_json:
        return root
    marker.unlink(missing_ok=True)
    for sub in ("Annotations", "JPEGImages", "SegmentationClass", "ImageSets/Main", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    palette = voc_palette()
    names = spec.class_names
    for split, count in spec.counts.items():
        ids = []
        for index in range(count):
            image_id = scene_id(split, index)
            image, mask, _ = render_scene(spec, split, index)
            buf = io.BytesIO()
            image.save(buf, "JPEG", quality=95)
            _write(root / "JPEGImages" / f"{image_id}.jpg", buf.getvalue())
            seg = Image.fromarray(mask, "P")
            seg.putpalette(palette)
            buf = io.BytesIO()
            seg.save(buf, "PNG")
            _write(root / "SegmentationClass" / f"{image_id}.png", buf.getvalue())
            _write(root / "Annotations" / f"{image_id}.xml", _annotation_xml(image_id, spec.image_size, mask, names))
            ids.append(image_id)
        listing = "".join(f"{i}\n" for i in ids).encode()
        _write(root / "ImageSets" / "Main" / f"{split}.txt", listing)
        _write(root / "ImageSets" / "Segmentation" / f"{split}.txt", listing)
    _write(root / "classes.txt", "".join(f"{n}\n" for n in names).encode())
    _write(marker, spec_json.encode())
    return root


def build_synthetic_shards(spec: SyntheticSpec, options: Any, *, source_dir: str | os.PathLike | None = None,
                           command: Any = None) -> dict[str, Any]:
    """Render the scenes into a VOC-layout folder, then shard it through the VOC code path."""
    from explainer.data.voc import build_voc_shards

    source = write_voc_layout(spec, source_dir if source_dir is not None else Path(options.out) / "source")
    return build_voc_shards(source, options, splits=list(spec.counts), classes=spec.class_names, dataset="synthetic",
                            seed=spec.seed, command=command, extra={"synthetic": spec.to_dict()})
