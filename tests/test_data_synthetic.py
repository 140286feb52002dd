"""Synthetic scenes: deterministic, exact masks with a void band, background cue, sharded through the VOC path."""

from __future__ import annotations

import io
import json
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from _data_helpers import make_shards, samples_of
from PIL import Image

from explainer.data.synthetic import (
    COLOURS,
    SHAPES,
    SyntheticSpec,
    cue_region,
    parse_scene_id,
    render_scene,
    scene_classes,
    scene_id,
    write_voc_layout,
)


def test_render_is_deterministic_and_seeded():
    spec = SyntheticSpec(image_size=48)
    a, b = render_scene(spec, "train", 3), render_scene(spec, "train", 3)
    assert np.array_equal(np.asarray(a[0]), np.asarray(b[0])) and np.array_equal(a[1], b[1])
    assert not np.array_equal(np.asarray(a[0]), np.asarray(render_scene(spec, "train", 4)[0]))
    assert not np.array_equal(np.asarray(a[0]), np.asarray(render_scene(spec, "val", 3)[0]))
    other = SyntheticSpec(image_size=48, seed=1)
    assert not np.array_equal(np.asarray(a[0]), np.asarray(render_scene(other, "train", 3)[0]))


def test_masks_have_objects_and_a_void_band():
    spec = SyntheticSpec(image_size=64, num_classes=6, void_width=1)
    counts = []
    for i in range(30):
        image, mask, cue = render_scene(spec, "train", i)
        assert image.size == (64, 64) and image.mode == "RGB" and cue is None
        assert mask.dtype == np.uint8 and mask.shape == (64, 64)
        assert set(np.unique(mask)) <= set(range(7)) | {255}
        classes = scene_classes(mask, 6)
        assert 1 <= len(classes) <= 3
        counts.append(len(classes))
        # void separates every object from the background: no object pixel touches a background pixel
        obj, bg = (mask >= 1) & (mask <= 6), mask == 0
        for dy, dx in ((0, 1), (1, 0), (0, -1), (-1, 0)):
            shifted = np.roll(np.roll(obj, dy, 0), dx, 1)
            assert not (shifted & bg)[1:-1, 1:-1].any()
        # objects show their class colour (before JPEG): mean colour close to the class colour (textures darken)
        arr = np.asarray(image).astype(float)
        for c in classes:
            mean = arr[mask == c + 1].mean(0)
            colour = np.array(COLOURS[c], float)
            assert np.argmax(mean) == np.argmax(colour) or np.abs(mean - colour).max() < 120
    assert len(set(counts)) == 3  # 1, 2 and 3 objects all occur


def test_background_cue_only_with_its_class_in_train_and_decoupled_in_test():
    spec = SyntheticSpec(image_size=64, cue_class=2, cue_prob=1.0)
    y0, y1 = cue_region(64)
    for i in range(20):
        _, mask, cue = render_scene(spec, "train", i)
        has_class = 2 in scene_classes(mask, spec.num_classes)
        if cue is not None:
            assert cue.dtype == np.bool_ and cue.shape == (64, 64)
            assert cue[y0:y1].any() and not cue[:y0].any() and not cue[y1:].any()
            assert not (cue & (mask != 0) & (mask != 255)).any()  # objects cover the cue, not the reverse
        assert (cue is not None) == has_class
    test_cues = [render_scene(spec, "test", i)[2] is not None for i in range(20)]
    assert all(test_cues)  # p = 1: every test image, whatever its classes
    half = SyntheticSpec(image_size=64, cue_class=2, cue_prob=0.5)
    frac = np.mean([render_scene(half, "test", i)[2] is not None for i in range(200)])
    assert 0.35 < frac < 0.65


def test_spec_validation_and_ids():
    with pytest.raises(ValueError, match="num_classes"):
        SyntheticSpec(num_classes=len(SHAPES) + 1)
    with pytest.raises(ValueError, match="cue_class"):
        SyntheticSpec(cue_class=9)
    assert parse_scene_id(scene_id("test", 12)) == ("test", 12)
    assert SyntheticSpec.from_dict(SyntheticSpec(seed=3).to_dict()) == SyntheticSpec(seed=3)


def test_voc_layout_matches_render(tmp_path):
    spec = SyntheticSpec(image_size=32, num_classes=4, counts={"train": 5, "test": 3})
    root = write_voc_layout(spec, tmp_path / "src")
    assert (root / "ImageSets" / "Main" / "test.txt").read_text().split() == [scene_id("test", i) for i in range(3)]
    for i in range(3):
        image_id = scene_id("test", i)
        _, mask, _ = render_scene(spec, "test", i)
        seg = Image.open(root / "SegmentationClass" / f"{image_id}.png")
        assert seg.mode == "P" and np.array_equal(np.asarray(seg), mask)
        names = [o.findtext("name") for o in ET.parse(root / "Annotations" / f"{image_id}.xml").iter("object")]
        assert names == [spec.class_names[c] for c in scene_classes(mask, 4)]
        assert Image.open(root / "JPEGImages" / f"{image_id}.jpg").format == "JPEG"
    stamp = (root / "JPEGImages" / "train_000000.jpg").stat().st_mtime_ns
    write_voc_layout(spec, root)  # complete folder with the same spec: not rendered again
    assert (root / "JPEGImages" / "train_000000.jpg").stat().st_mtime_ns == stamp


def test_make_shards_synthetic_goes_through_the_voc_path(tmp_path):
    out = tmp_path / "syn"
    assert make_shards("synthetic", "--out", str(out), "--image-size", "32", "--num-classes", "3",
                       "--counts", "train=12,val=4,test=4", "--cue-class", "1", "--cue-prob", "0.5",
                       "--seed", "5") == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dataset"] == "synthetic" and manifest["classes"] == ["circle", "square", "triangle"]
    assert manifest["seed"] == 5
    assert manifest["synthetic"]["cue_class"] == 1 and manifest["synthetic"]["counts"]["train"] == 12
    assert manifest["source"].endswith("source") and (out / "source" / "Annotations").is_dir()
    spec = SyntheticSpec.from_dict(manifest["synthetic"])
    test = samples_of(out, "test")
    assert list(test) == [scene_id("test", i) for i in range(4)]
    for key, members in test.items():
        meta = json.loads(members["json"])
        _, mask, _ = render_scene(spec, *parse_scene_id(meta["source_id"]))
        assert meta["labels"] == [int(c in scene_classes(mask, 3)) for c in range(3)]
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(members["seg.png"]))), mask)
        assert members["jpg"] == (out / "source" / "JPEGImages" / f"{key}.jpg").read_bytes()
