"""Streaming loader: exact rank/worker splits, equal batch counts, determinism, skip, eval coverage, corruption."""

from __future__ import annotations

import collections
import io
import json
import logging
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from _data_helpers import make_shards, make_voc_tree, read_tar
from PIL import Image

from explainer.config import DataConfig
from explainer.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ManifestError,
    denormalize,
    make_eval_loader,
    make_train_loader,
    manifest_from_urls,
    read_manifest,
)
from explainer.data.loader import iter_samples

N_TRAIN, N_TEST = 96, 23


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    """Uneven shards: train = 7 x 13 + 5 samples."""
    out = tmp_path_factory.mktemp("loader") / "syn"
    assert make_shards("synthetic", "--out", str(out), "--image-size", "32", "--num-classes", "4",
                       "--counts", f"train={N_TRAIN},val=8,test={N_TEST}", "--shard-maxcount", "13") == 0
    m = read_manifest(out / "manifest.json")
    assert m.splits["train"].counts == [13] * 7 + [5]
    return m


def cfg(**kw) -> DataConfig:
    base = {"image_size": 32, "batch_size": 4, "num_workers": 0, "shuffle_buffer": 16}
    return DataConfig(**{**base, **kw})


def epoch_keys(stream, epoch: int) -> list[list[str]]:
    stream.set_epoch(epoch)
    return [b["key"] for b in stream]


@pytest.mark.numerics
def test_batches_have_the_contract_shapes_and_values(syn):
    stream = make_train_loader(cfg(), syn, "train", rank=0, world_size=1, seed=0, drop_unlabelled=True)
    assert len(stream) == N_TRAIN // 4
    batch = next(iter(stream))
    assert batch["image"].dtype == torch.float32 and batch["image"].shape == (4, 3, 32, 32)
    assert batch["labels"].dtype == torch.float32 and batch["labels"].shape == (4, 4)
    assert isinstance(batch["key"], list) and len(batch["key"]) == 4
    raw = {s["__key__"]: s for s in iter_samples(syn, "train")}
    key = batch["key"][0]
    assert batch["labels"][0].tolist() == json.loads(raw[key]["json"])["labels"]
    # ImageNet normalisation of the bilinear-resized RGB image (32 px source: no resize)
    ref = np.asarray(Image.open(io.BytesIO(raw[key]["jpg"])).convert("RGB"), np.float32) / 255.0
    ref = (ref - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
    assert np.allclose(batch["image"][0].permute(1, 2, 0).numpy(), ref, atol=1e-5)
    assert torch.allclose(denormalize(batch["image"][0]), torch.from_numpy(ref * np.array(
        IMAGENET_STD, np.float32) + np.array(IMAGENET_MEAN, np.float32)).permute(2, 0, 1), atol=1e-5)


@pytest.mark.numerics
def test_worker_batches_equal_in_process_batches(syn):
    """Workers send uint8 images that the main process normalises: same batches, bit for bit, as with 0 workers."""
    batches = []
    for workers in (0, 1):
        stream = make_train_loader(cfg(num_workers=workers, augment=True), syn, "train", rank=0, world_size=1, seed=5,
                                   drop_unlabelled=True)
        stream.set_epoch(1)
        batches.append(list(stream))
    for ours, ref in zip(*batches, strict=True):
        assert list(ours) == list(ref) and ours["key"] == ref["key"]
        assert ours["image"].dtype == torch.float32 and ours["image"].is_contiguous()
        assert torch.equal(ours["image"], ref["image"]) and torch.equal(ours["labels"], ref["labels"])


@pytest.mark.parametrize(("world_size", "batch_size", "exact"), [(2, 4, True), (3, 5, False)])
def test_ranks_disjoint_equal_lengths_and_exact_cover(syn, world_size, batch_size, exact):
    """Ranks computed in one process (the split depends only on rank arguments), 2 DataLoader workers each. One case
    where world_size x batch_size divides the 96 samples (every sample every epoch) and one where it does not (a
    tail of 6 is dropped, and which 6 follows the per-epoch shard order)."""
    assert (N_TRAIN % (world_size * batch_size) == 0) == exact  # each case takes the branch it is there for
    streams = [make_train_loader(cfg(num_workers=2, batch_size=batch_size), syn, "train", rank=r,
                                 world_size=world_size, seed=1, drop_unlabelled=True) for r in range(world_size)]
    per_rank = N_TRAIN // (world_size * batch_size)
    assert [len(s) for s in streams] == [per_rank] * world_size
    seen_by_epoch = []
    for epoch in (0, 1):
        seen = collections.Counter()
        for s in streams:
            batches = epoch_keys(s, epoch)
            assert len(batches) == per_rank and all(len(b) == batch_size for b in batches)
            seen.update(k for b in batches for k in b)
        assert max(seen.values()) == 1 and sum(seen.values()) == per_rank * world_size * batch_size
        seen_by_epoch.append(set(seen))
    if exact:
        assert seen_by_epoch[0] == seen_by_epoch[1] and len(seen_by_epoch[0]) == N_TRAIN
    else:  # the dropped tail follows the per-epoch shard order
        assert len(seen_by_epoch[0]) == N_TRAIN - N_TRAIN % (world_size * batch_size)
        assert seen_by_epoch[0] != seen_by_epoch[1]


def test_order_is_deterministic_per_epoch_and_changes_between_epochs(syn):
    def run(epoch, workers):
        s = make_train_loader(cfg(num_workers=workers), syn, "train", rank=1, world_size=2, seed=5,
                              drop_unlabelled=True)
        return epoch_keys(s, epoch)

    first = run(0, 2)
    assert run(0, 2) == first
    assert run(1, 2) != first
    # the rank's share of an epoch does not depend on the number of DataLoader workers
    assert sorted(k for b in run(0, 0) for k in b) == sorted(k for b in first for k in b)
    other_seed = make_train_loader(cfg(num_workers=2), syn, "train", rank=1, world_size=2, seed=6,
                                   drop_unlabelled=True)
    assert epoch_keys(other_seed, 0) != first


def test_class_draws_are_a_function_of_seed_epoch_and_sample(syn):
    """batch["draw"] picks the class of the class-specific loss term: the same sample gets the same number on one
    rank or two, with or without workers, and in a validation stream every time; another epoch or seed redraws."""
    def draws(world_size, epoch, seed=1, workers=2):
        out = {}
        for rank in range(world_size):
            s = make_train_loader(cfg(num_workers=workers), syn, "train", rank=rank, world_size=world_size,
                                  seed=seed, drop_unlabelled=True)
            s.set_epoch(epoch)
            for batch in s:
                assert batch["draw"].shape == (len(batch["key"]),) and batch["draw"].dtype == torch.float32
                out.update(zip(batch["key"], batch["draw"].tolist()))
        return out

    one = draws(1, 0)  # with loader workers; the rest in-process (a worker start costs seconds, draws nothing)
    assert all(0 <= u < 1 for u in one.values()) and len(set(one.values())) == len(one)
    assert draws(2, 0, workers=0) == one and draws(1, 0, workers=0) == one
    next_epoch = draws(1, 1, workers=0)
    assert next_epoch.keys() == one.keys() and all(next_epoch[k] != one[k] for k in one)
    assert all(draws(1, 0, seed=2, workers=0)[k] != one[k] for k in one)
    val = [torch.cat([b["draw"] for b in make_eval_loader(cfg(), syn, "test", rank=0, world_size=1)])
           for _ in range(2)]
    assert torch.equal(val[0], val[1]) and len(val[0]) == N_TEST


@pytest.mark.numerics
def test_skip_resumes_mid_epoch_with_the_same_batches(syn):
    stream = make_train_loader(cfg(num_workers=2, augment=True), syn, "train", rank=0, world_size=2, seed=2,
                               drop_unlabelled=True)
    stream.set_epoch(4)
    full = list(stream)
    stream.skip(5)
    rest = list(stream)
    assert len(rest) == len(full) - 5
    for a, b in zip(full[5:], rest):
        assert a["key"] == b["key"] and torch.equal(a["image"], b["image"])
    assert len(list(stream)) == len(full)  # skip applies to one iteration only
    with pytest.raises(ValueError, match="cannot skip"):
        stream.skip(len(full) + 1)


@pytest.mark.numerics
def test_augment_flips_some_images(syn):
    plain = make_train_loader(cfg(), syn, "train", rank=0, world_size=1, seed=0, drop_unlabelled=True)
    aug = make_train_loader(cfg(augment=True), syn, "train", rank=0, world_size=1, seed=0, drop_unlabelled=True)
    a, b = next(iter(plain)), next(iter(aug))
    assert a["key"] == b["key"]
    flipped = [torch.equal(a["image"][i].flip(-1), b["image"][i]) for i in range(4)]
    same = [torch.equal(a["image"][i], b["image"][i]) for i in range(4)]
    assert all(f or s for f, s in zip(flipped, same))


def test_eval_every_sample_once_stable_order_with_seg(syn):
    all_keys = [s["__key__"] for s in iter_samples(syn, "test")]
    for world_size, workers in ((1, 0), (3, 2)):
        seen, order = [], []
        for rank in range(world_size):
            stream = make_eval_loader(cfg(num_workers=workers), syn, "test", rank=rank, world_size=world_size)
            batches = list(stream)
            assert len(batches) == len(stream)
            keys = [k for b in batches for k in b["key"]]
            seen += keys
            again = [k for b in make_eval_loader(cfg(num_workers=workers), syn, "test", rank=rank,
                                                 world_size=world_size) for k in b["key"]]
            order.append(keys == again)
            for b in batches:
                assert b["seg"].dtype == torch.uint8 and b["seg"].shape == (len(b["key"]), 32, 32)
                assert set(b["seg"].unique().tolist()) <= {0, 1, 255}
                assert set(b["seg_classes"].unique().tolist()) <= {0, 1, 2, 3, 4, 255}
                cls = b["seg_classes"]
                assert torch.equal(b["seg"] == 255, cls == 255) and torch.equal(b["seg"] == 1, (cls > 0) & (cls < 255))
                assert b["has_seg"].all()
        assert sorted(seen) == sorted(all_keys) and len(seen) == len(set(seen)) == N_TEST
        assert all(order)
    first10 = [k for b in make_eval_loader(cfg(), syn, "test", rank=0, world_size=1, max_images=10) for k in b["key"]]
    assert first10 == all_keys[:10]


def test_eval_seg_matches_the_stored_mask(syn):
    raw = {s["__key__"]: s for s in iter_samples(syn, "test")}
    batch = next(iter(make_eval_loader(cfg(), syn, "test", rank=0, world_size=1)))
    key = batch["key"][0]
    mask = np.asarray(Image.open(io.BytesIO(raw[key]["seg.png"])))
    assert np.array_equal(batch["seg_classes"][0].numpy(), mask)  # 32 px: nearest resize is the identity
    assert batch["orig_size"][0].tolist() == [32, 32]


def test_drop_unlabelled_is_exact_across_ranks(tmp_path):
    make_voc_tree(tmp_path, bad=True)
    out = tmp_path / "out"
    assert make_shards("voc", "--root", str(tmp_path), "--out", str(out), "--shard-maxcount", "3",
                       "--exclude-difficult") == 0
    m = read_manifest(out / "manifest.json")
    labelled = [s["__key__"] for s in iter_samples(m, "train") if any(json.loads(s["json"])["labels"])]
    assert len(labelled) == m.splits["train"].total - 1 == 8  # 000003 keeps its tvmonitor
    streams = [make_train_loader(cfg(batch_size=2, num_workers=2), m, "train", rank=r, world_size=2, seed=0,
                                 drop_unlabelled=True) for r in range(2)]
    keys = [k for s in streams for b in s for k in b["key"]]
    assert sorted(keys) == sorted(labelled)
    keep_all = [make_train_loader(cfg(batch_size=2), m, "train", rank=r, world_size=2, seed=0,
                                  drop_unlabelled=False) for r in range(2)]
    assert len(keep_all[0]) == m.splits["train"].total // 4


def _rewrite_shard(path, corrupt_key=None, truncate=None):
    members = read_tar(path)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            if corrupt_key is not None and name == f"{corrupt_key}.jpg":
                data = b"\xff\xd8 not really a jpeg"
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    if truncate is not None:
        raw = path.read_bytes()
        path.write_bytes(raw[: int(len(raw) * truncate)])


def test_corrupt_members_are_skipped_with_a_count(syn, tmp_path, caplog):
    out = tmp_path / "copy"
    shutil.copytree(syn.path.parent, out, ignore=shutil.ignore_patterns("source"))
    m = read_manifest(out / "manifest.json")
    first = m.splits["train"].shards[0]
    _rewrite_shard(Path(first), corrupt_key="train_000002")
    _rewrite_shard(Path(m.splits["train"].shards[3]), truncate=0.5)
    caplog.set_level(logging.WARNING)
    streams = [make_train_loader(cfg(), m, "train", rank=r, world_size=2, seed=0, drop_unlabelled=True)
               for r in range(2)]
    lengths = [len(list(s)) for s in streams]
    assert lengths == [len(s) for s in streams] == [N_TRAIN // 8] * 2  # batch counts stay exact
    assert sum(s.corrupt_samples for s in streams) >= 2
    assert "train_000002" in caplog.text
    # eval: the corrupt sample is skipped, everything readable is still there exactly once
    test_shard = Path(m.splits["test"].shards[0])
    _rewrite_shard(test_shard, corrupt_key="test_000001")
    stream = make_eval_loader(cfg(num_workers=2), m, "test", rank=0, world_size=1)
    keys = [k for b in stream for k in b["key"]]
    assert "test_000001" not in keys and len(keys) == len(set(keys)) == N_TEST - 1 and stream.corrupt_samples == 1
    assert len(stream.problems) == 1 and "corrupt sample test_000001" in stream.problems[0]  # for results.json


def test_a_shard_holding_more_than_the_manifest_lists_is_noted(syn, tmp_path, caplog):
    out = tmp_path / "copy"
    shutil.copytree(syn.path.parent, out, ignore=shutil.ignore_patterns("source"))
    raw = json.loads((out / "manifest.json").read_text())
    first = raw["splits"]["test"]["shards"][0]
    first["count"] -= 1
    raw["splits"]["test"]["total"] -= 1
    (out / "manifest.json").write_text(json.dumps(raw))
    caplog.set_level(logging.WARNING)
    for workers in (0, 2):
        stream = make_eval_loader(cfg(num_workers=workers), read_manifest(out / "manifest.json"), "test", rank=0,
                                  world_size=1)
        keys = [k for b in stream for k in b["key"]]
        assert len(keys) == N_TEST - 1 and stream.corrupt_samples == 0
        assert len(stream.problems) == 1 and "holds more samples than the manifest's" in stream.problems[0]
    assert "holds more samples" in caplog.text
    # the full manifest: nothing noted
    clean = make_eval_loader(cfg(), syn, "test", rank=0, world_size=1)
    assert len([k for b in clean for k in b["key"]]) == N_TEST and clean.problems == []


def test_images_over_the_pixel_cap_are_skipped_by_name(tmp_path, huge_png, capfd):
    """data.max_image_pixels: a stored 12000 x 12000 PNG (written with --max-image-pixels none) is skipped unread by
    the loader, in a DataLoader worker, like a corrupt sample; the others all arrive."""
    rng = np.random.default_rng(1)
    root = tmp_path / "root"
    (root / "cat").mkdir(parents=True)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(root / "cat" / f"{i}.png")
    (root / "cat" / "huge.png").write_bytes(huge_png.read_bytes())
    out = tmp_path / "shards"
    assert make_shards("folder", "--root", str(root), "--out", str(out), "--split-fractions", "test=1",
                       "--max-image-pixels", "none", "--workers", "1") == 0
    m = read_manifest(out / "manifest.json")
    assert m.splits["test"].total == 4
    capfd.readouterr()
    for workers in (1, 0):
        stream = make_eval_loader(cfg(num_workers=workers, batch_size=2), m, "test", rank=0, world_size=1)
        keys = [k for b in stream for k in b["key"]]
        assert keys == ["cat_0_png", "cat_1_png", "cat_2_png"] and stream.corrupt_samples == 1
        logged = capfd.readouterr()  # the [explainer] log (stdout), from the worker process too
        assert "skipping corrupt sample cat_huge_png" in logged.out + logged.err
        assert "ImageTooLarge: image is 12000 x 12000" in logged.out + logged.err
    assert DataConfig().max_image_pixels == 89_478_485


def test_manifest_errors_name_the_file(tmp_path, syn):
    with pytest.raises(ManifestError, match="does not exist"):
        read_manifest(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ManifestError, match="bad.json"):
        read_manifest(bad)
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"classes": ["a"], "splits": {"train": {"shards": [{"path": "x.tar",
                                                                                     "count": 3}]}}}))
    with pytest.raises(ManifestError, match="x.tar"):
        read_manifest(broken)
    with pytest.raises(ManifestError, match="no split 'nosuch'"):
        make_train_loader(cfg(), syn, "nosuch", rank=0, world_size=1, seed=0, drop_unlabelled=True)
    with pytest.raises(ValueError, match="not enough for one batch"):
        make_train_loader(cfg(batch_size=64), syn, "train", rank=0, world_size=2, seed=0, drop_unlabelled=True)


def test_brace_expanded_urls(syn):
    folder = syn.path.parent
    m = manifest_from_urls(str(folder / "train-{000000..000007}.tar"), classes=syn.classes)
    assert m.splits["train"].counts == syn.splits["train"].counts
    keys = [k for b in make_train_loader(cfg(), m, "train", rank=0, world_size=1, seed=0, drop_unlabelled=True)
            for k in b["key"]]
    assert len(keys) == len(set(keys)) == N_TRAIN


def test_real_two_process_gloo_run(syn, tmp_path):
    """torchrun world of 2 gloo processes, 2 DataLoader workers each: every training sample exactly once per epoch
    across ranks, equal batch counts (a collective per step would hang otherwise), eval exactly once."""
    import os
    import subprocess
    import sys

    from _data_helpers import REPO

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(REPO / "tests" / "_data_helpers.py"), str(syn.path), str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = json.loads((tmp_path / "result.json").read_text())
    all_train = {s["__key__"] for s in iter_samples(syn, "train")}
    for epoch in range(2):
        per_rank = [r["epochs"][epoch] for r in ranks]
        assert [p["steps"] for p in per_rank] == [p["len"] for p in per_rank] == [N_TRAIN // 8] * 2
        keys = [k for p in per_rank for k in p["keys"]]
        assert len(keys) == len(set(keys)) == N_TRAIN and set(keys) == all_train
    assert ranks[0]["epochs"][0]["keys"] != ranks[0]["epochs"][1]["keys"]
    evaluated = [k for r in ranks for k in r["eval"]]
    assert len(evaluated) == len(set(evaluated)) == N_TEST


def test_abandoned_epochs_do_not_disturb_the_next(syn):
    """Like the trainer: a partly consumed epoch is dropped, then set_epoch/skip/iter for the next one."""
    stream = make_train_loader(cfg(num_workers=2), syn, "train", rank=0, world_size=1, seed=0, drop_unlabelled=True)
    stream.set_epoch(1)
    full = [b["key"] for b in stream]
    stream.set_epoch(0)
    batches = iter(stream)
    next(batches)  # abandoned after one batch
    stream.set_epoch(1)
    stream.skip(3)
    batches = iter(stream)  # the old generator is collected here
    assert [b["key"] for b in batches] == full[3:]


# ----------------------------------------------------------------------------------------------------------------------
# uint8 batches normalised on the device (data.normalize_on_device)
# ----------------------------------------------------------------------------------------------------------------------

# float32 path (both): x * fl(scale) then + fl(shift), with |x * scale| <= 255 / (255 * 0.224) and |shift| <= 2.12:
# two rounded constants and two rounded operations, each <= 2^-24 relative, so |error| <= 4 * 2^-24 * (4.47 + 2.12).
NORMALISE_TOL = 4 * 2.0**-24 * (4.47 + 2.12)


def _exact_normalisation(u8: np.ndarray) -> np.ndarray:
    x = u8.astype(np.float64).transpose(0, 3, 1, 2) / 255.0
    return (x - np.asarray(IMAGENET_MEAN, np.float64).reshape(3, 1, 1)) / np.asarray(IMAGENET_STD).reshape(3, 1, 1)


@pytest.mark.numerics
def test_device_normalisation_equals_the_loader_normalisation():
    from explainer.data.transforms import normalize_batch, normalize_on_device

    u8 = np.random.default_rng(0).integers(0, 256, (3, 5, 7, 3), dtype=np.uint8)
    u8[0, 0, 0] = (0, 255, 128)  # the extremes of every channel
    u8[0, 0, 1] = (255, 0, 0)
    exact = _exact_normalisation(u8)
    on_host = normalize_batch(u8).double().numpy()
    plain = normalize_on_device(torch.from_numpy(u8))
    cl = normalize_on_device(torch.from_numpy(u8), channels_last=True)
    assert plain.dtype == torch.float32 and plain.shape == (3, 3, 5, 7) and plain.is_contiguous()
    assert cl.is_contiguous(memory_format=torch.channels_last) and torch.equal(cl, plain)
    assert np.abs(on_host - exact).max() <= NORMALISE_TOL
    assert np.abs(plain.double().numpy() - exact).max() <= NORMALISE_TOL
    assert np.abs(plain.double().numpy() - on_host).max() <= 2 * NORMALISE_TOL
    with pytest.raises(ValueError, match="uint8 \\[B, H, W, 3\\]"):
        normalize_on_device(torch.zeros(1, 3, 4, 4))


@pytest.mark.numerics
@pytest.mark.parametrize("workers", [0, 1])
def test_uint8_batches_become_the_float_batches_on_the_device(syn, workers):
    """Same stream as uint8 NHWC: the trainer's device hook turns each batch into the float batch of the default
    loader (same images, same order)."""
    from explainer.training_loop import _to_device

    def stream(image_format):
        s = make_train_loader(cfg(num_workers=workers), syn, "train", rank=0, world_size=1, seed=0,
                              drop_unlabelled=True, image_format=image_format)
        s.set_epoch(1)
        return list(s)

    floats, bytes_ = stream("float"), stream("uint8")
    assert len(floats) == len(bytes_) == N_TRAIN // 4
    for f, b in zip(floats, bytes_):
        assert b["image"].dtype == torch.uint8 and b["image"].shape == (4, 32, 32, 3)
        assert b["key"] == f["key"] and torch.equal(b["labels"], f["labels"])
        moved = _to_device(b, torch.device("cpu"), channels_last=True)
        assert moved["image"].is_contiguous(memory_format=torch.channels_last)
        assert (moved["image"].double() - f["image"].double()).abs().max() <= 2 * NORMALISE_TOL
    evaluated = next(iter(make_eval_loader(cfg(num_workers=workers), syn, "test", rank=0, world_size=1,
                                           image_format="uint8")))
    assert evaluated["image"].dtype == torch.uint8 and "seg" in evaluated


def test_batch_format_follows_the_device_unless_configured(syn):
    from explainer.data.loader import batch_image_format

    assert batch_image_format(cfg(), "cuda:3") == "uint8" and batch_image_format(cfg(), "cpu") == "float"
    assert batch_image_format(cfg(normalize_on_device="on"), "cpu") == "uint8"
    assert batch_image_format(cfg(normalize_on_device="off"), torch.device("cuda", 0)) == "float"
    with pytest.raises(ValueError, match="image_format"):
        make_train_loader(cfg(), syn, "train", rank=0, world_size=1, seed=0, drop_unlabelled=True,
                          image_format="fp16")


# ----------------------------------------------------------------------------------------------------------------------
# Hostile manifests: a downloaded shard set is data; its manifest must not run commands or reach other folders
# ----------------------------------------------------------------------------------------------------------------------

HOSTILE = {"pipe": "is a shell command", "escape": "outside the manifest's folder", "absolute": "is an absolute path",
           "https": "is an https URL"}


def hostile_manifest(syn, tmp_path: Path, kind: str) -> tuple[Path, Path]:
    """A copy of the syn shards whose manifest lists its first train and test shards the hostile way `kind`; returns
    the manifest and the file that a 'pipe:' shard would `touch` if it were run."""
    folder, elsewhere = tmp_path / "download", tmp_path / "elsewhere"
    shutil.copytree(syn.path.parent, folder)
    elsewhere.mkdir(exist_ok=True)
    touched = tmp_path / "touched"
    raw = json.loads((folder / "manifest.json").read_text())
    for split in ("train", "test"):
        entry = raw["splits"][split]["shards"][0]
        real = folder / entry["path"]
        if kind == "pipe":
            entry["path"] = f"pipe:touch {touched}; cat {real}"
        elif kind in ("escape", "absolute"):  # a real shard, so only the location rule can refuse it
            shutil.move(real, elsewhere / real.name)
            entry["path"] = f"../elsewhere/{real.name}" if kind == "escape" else str(elsewhere / real.name)
        else:
            entry["path"] = f"https://example.invalid/{real.name}"
    (folder / "manifest.json").write_text(json.dumps(raw))
    return folder / "manifest.json", touched


def _open_both_loaders(manifest: Path, data: DataConfig) -> tuple[int, int]:
    train = make_train_loader(data, manifest, "train", rank=0, world_size=1, seed=0, drop_unlabelled=True)
    test = make_eval_loader(data, manifest, "test", rank=0, world_size=1)
    return sum(len(b["key"]) for b in train), sum(len(b["key"]) for b in test)


@pytest.mark.parametrize("kind", list(HOSTILE))
def test_hostile_manifests_are_refused_by_both_loaders(syn, tmp_path, kind):
    manifest, touched = hostile_manifest(syn, tmp_path, kind)
    for split in ("train", "test"):
        with pytest.raises(ManifestError) as err:
            if split == "train":
                make_train_loader(cfg(), manifest, split, rank=0, world_size=1, seed=0, drop_unlabelled=True)
            else:
                make_eval_loader(cfg(), manifest, split, rank=0, world_size=1)
        message = str(err.value)  # names the manifest, the shard and what is wrong with it
        assert str(manifest) in message and "train-000000.tar" in message and HOSTILE[kind] in message, message
    assert not touched.exists()


def test_external_shards_and_urls_only_when_allowed(syn, tmp_path):
    full = (N_TRAIN, N_TEST)
    for kind in ("escape", "absolute"):
        manifest, _ = hostile_manifest(syn, tmp_path / kind, kind)
        assert _open_both_loaders(manifest, cfg(allow_external_shards=True)) == full
        with pytest.raises(ManifestError, match="allow_external_shards"):
            read_manifest(manifest)
    manifest, _ = hostile_manifest(syn, tmp_path / "https", "https")
    with pytest.raises(ManifestError, match=r"data.allow_url_schemes=\[https\]"):
        read_manifest(manifest, allow_external_shards=True)
    shards = read_manifest(manifest, allow_url_schemes=["https"]).splits["train"].shards
    assert shards[0] == "https://example.invalid/train-000000.tar" and Path(shards[1]).is_file()


def test_pipe_shards_are_never_run_whatever_is_allowed(syn, tmp_path):
    manifest, touched = hostile_manifest(syn, tmp_path, "pipe")
    with pytest.raises(ManifestError, match="is a shell command"):
        read_manifest(manifest, allow_external_shards=True, allow_url_schemes=["http", "https"])
    with pytest.raises(ManifestError, match="pipe cannot be allowed"):
        read_manifest(manifest, allow_url_schemes=["pipe"])
    with pytest.raises(ManifestError, match="scheme 'pipe' is not allowed"):
        manifest_from_urls(f"pipe:touch {touched}; cat {syn.splits['train'].shards[0]}")
    with pytest.raises(ManifestError, match="scheme 's3' is not allowed"):
        manifest_from_urls("s3://bucket/train-000000.tar")
    assert not touched.exists()


def test_evaluate_refuses_a_hostile_manifest_before_running_it(syn, tmp_path):
    """The entry point users type, end to end: the error names the manifest and the shard; nothing ran."""
    from _helpers import PYTHON, run_cmd

    manifest, touched = hostile_manifest(syn, tmp_path, "pipe")
    proc = run_cmd([PYTHON, "-m", "explainer.evaluate", "--config", "configs/synthetic.yaml", "--checkpoint",
                    str(tmp_path / "explainer.pt"), "--classifier", str(tmp_path / "classifier.pt"), "--methods",
                    "explainer", "--out", str(tmp_path / "eval"), "--no-progress", f"data.manifest={manifest}",
                    "data.image_size=32", "data.num_workers=0", "data.allow_external_shards=true"], check=False)
    assert proc.returncode != 0 and f"manifest {manifest}" in proc.stderr and "is a shell command" in proc.stderr, \
        proc.stderr[-3000:]
    assert not touched.exists() and not (tmp_path / "eval").exists()


def test_resize_modes_fit_wide_images_the_same_way_in_both_loaders(tmp_path):
    """A wide image (48 x 24) in real shards: squash stretches it, center_crop keeps the centred square, letterbox
    pads top and bottom with the classifier's mean colour (0 once normalised); train and eval loaders agree."""
    from explainer.data.transforms import decode_rgb

    root = tmp_path / "imgs"
    (root / "a").mkdir(parents=True)
    wide = np.zeros((24, 48, 3), np.uint8)
    wide[:, :12] = (255, 0, 0)  # a red left quarter: outside the centred square
    wide[:, 12:] = (0, 0, 255)
    for i in range(4):
        Image.fromarray(wide).save(root / "a" / f"{i}.png")
    out = tmp_path / "shards"
    assert make_shards("folder", "--root", str(root), "--out", str(out), "--split-fractions", "train=0.5,test=0.5") == 0
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.2, 0.2)
    got = {}
    for mode in ("squash", "center_crop", "letterbox"):
        cfg = DataConfig(image_size=16, batch_size=2, num_workers=0, resize=mode)
        ev = next(iter(make_eval_loader(cfg, out / "manifest.json", "test", rank=0, world_size=1, mean=mean, std=std)))
        tr = next(iter(make_train_loader(cfg, out / "manifest.json", "train", rank=0, world_size=1, seed=0,
                                         drop_unlabelled=False, mean=mean, std=std)))
        assert torch.equal(ev["image"][0], tr["image"][0])
        got[mode] = denormalize(ev["image"][0], mean, std)
        expected = decode_rgb(_png_of(wide), 16, mode, tuple(round(255 * m) for m in mean))
        assert torch.allclose(got[mode] * 255, torch.from_numpy(expected.copy()).permute(2, 0, 1).float(), atol=0.01)
    red = lambda x: (x[0] > 0.9) & (x[2] < 0.1)  # noqa: E731
    assert red(got["squash"])[:, :3].all() and not red(got["center_crop"]).any()
    assert torch.allclose(got["letterbox"][:, :4], torch.tensor(mean).view(3, 1, 1).expand(3, 4, 16), atol=0.005)
    assert red(got["letterbox"])[4:12, :3].all()  # the image sits in rows 4..11, aspect ratio kept


def _png_of(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_segmentation_follows_the_image_geometry_and_letterbox_padding_is_void():
    from explainer.data.transforms import VOID, decode_seg

    seg = np.zeros((20, 40), np.uint8)
    seg[:, :10] = 3
    png = _png_of(seg)
    assert (decode_seg(png, 10, "squash")[:, :2] == 3).all()
    assert not (decode_seg(png, 10, "center_crop") == 3).any()  # class 3 lies outside the centred square
    boxed = decode_seg(png, 10, "letterbox")
    assert (boxed[:2] == VOID).all() and (boxed[-3:] == VOID).all() and (boxed[2:7, :2] == 3).all()
    with pytest.raises(ValueError, match="resize mode must be one of"):
        decode_seg(png, 10, "stretch")


def test_a_shard_listed_twice_is_refused_and_one_in_two_splits_is_named(syn, tmp_path, caplog):
    """Issue 26: a manifest listing a shard twice trained on it twice and evaluated 64 "images" of 32; any spelling
    of the same file counts. A shard in two splits (train and test) is allowed but warned about."""
    out = tmp_path / "copy"
    shutil.copytree(syn.path.parent, out, ignore=shutil.ignore_patterns("source"))
    raw = json.loads((out / "manifest.json").read_text())
    test = raw["splits"]["test"]["shards"]
    twice = json.loads(json.dumps(raw))
    twice["splits"]["test"]["shards"].append({**test[0], "path": f"./{test[0]['path']}"})
    (out / "twice.json").write_text(json.dumps(twice))
    with pytest.raises(ManifestError, match=rf"twice.json: split 'test' lists the shard .*{test[0]['path']} more"):
        read_manifest(out / "twice.json")
    shared = json.loads(json.dumps(raw))
    shared["splits"]["test"]["shards"].append(raw["splits"]["train"]["shards"][0])
    (out / "shared.json").write_text(json.dumps(shared))
    caplog.set_level(logging.WARNING)
    added = raw["splits"]["train"]["shards"][0]["count"]
    assert read_manifest(out / "shared.json").splits["test"].total == N_TEST + added
    assert "is in split 'train' and in split 'test'" in caplog.text
