"""Shard writing: identical re-runs, shard limits, resume after a killed run, stale shards, fingerprints."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from _data_helpers import MAKE_SHARDS, jpeg_bytes, make_shards, make_voc_tree, read_tar, samples_of, tree_bytes, voc_xml

SYN = ("synthetic", "--image-size", "32", "--counts", "train=40,val=10,test=10", "--num-classes", "4")


@pytest.fixture(scope="module")
def syn_source(tmp_path_factory):
    """Rendered once; runs below pass --source-dir so they only shard it."""
    return tmp_path_factory.mktemp("synsrc") / "source"


def test_identical_reruns_any_worker_count(tmp_path, syn_source):
    a, b = tmp_path / "a", tmp_path / "b"
    common = [*SYN, "--source-dir", str(syn_source), "--shard-maxcount", "7"]
    assert make_shards(*common, "--out", str(a), "--workers", "1") == 0
    assert make_shards(*common, "--out", str(b), "--workers", "2") == 0
    shards_a = {k: v for k, v in tree_bytes(a).items() if k.endswith(".tar")}
    shards_b = {k: v for k, v in tree_bytes(b).items() if k.endswith(".tar")}
    assert shards_a == shards_b and len(shards_a) == 6 + 2 + 2
    ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (a, b))
    for m in (ma, mb):
        m.pop("command")
    assert ma == mb
    # same folder, same arguments, no --resume: rewritten with identical bytes
    before = tree_bytes(a)
    assert make_shards(*common, "--out", str(a), "--workers", "1") == 0
    assert tree_bytes(a) == before
    # fixed tar metadata: no timestamps or user names from this machine
    for name, _ in read_tar(a / "train-000000.tar")[:3]:
        assert name.startswith("train_000000.")
    import tarfile

    with tarfile.open(a / "train-000000.tar") as tar:
        assert {(m.mtime, m.uname, m.mode) for m in tar.getmembers()} == {(946684800, "explainer", 0o444)}


def test_shard_size_limit_by_bytes(tmp_path, syn_source):
    out = tmp_path / "out"
    assert make_shards(*SYN, "--source-dir", str(syn_source), "--out", str(out), "--shard-maxsize", "12k") == 0
    manifest = json.loads((out / "manifest.json").read_text())
    shards = manifest["splits"]["train"]["shards"]
    assert len(shards) > 3 and sum(s["count"] for s in shards) == 40
    for s in shards:
        assert (out / s["path"]).stat().st_size <= 12 * 1024, s


def test_stale_shards_of_a_bigger_earlier_run_are_removed(tmp_path, syn_source):
    out = tmp_path / "out"
    assert make_shards(*SYN, "--source-dir", str(syn_source), "--out", str(out), "--shard-maxcount", "4") == 0
    assert len(list(out.glob("train-*.tar"))) == 10
    assert make_shards(*SYN, "--source-dir", str(syn_source), "--out", str(out), "--shard-maxcount", "100") == 0
    assert sorted(p.name for p in out.glob("*.tar")) == ["test-000000.tar", "train-000000.tar", "val-000000.tar"]
    assert len(list((out / ".progress").glob("*.json"))) == 3


def test_resume_after_leftover_temp_and_missing_shard(tmp_path, syn_source):
    clean, out = tmp_path / "clean", tmp_path / "out"
    common = [*SYN, "--source-dir", str(syn_source), "--shard-maxcount", "5"]
    assert make_shards(*common, "--out", str(clean)) == 0
    assert make_shards(*common, "--out", str(out)) == 0
    expected = tree_bytes(clean)
    # simulate a run killed while writing train-000003 (temp file left, shard and record missing) and one killed
    # between the rename of train-000005 and its record
    partial = (out / "train-000003.tar").read_bytes()[:3000]
    (out / "train-000003.tar").unlink()
    (out / ".progress" / "train-000003.tar.json").unlink()
    (out / ".train-000003.tar.4242.tmp").write_bytes(partial)
    (out / ".progress" / "train-000005.tar.json").unlink()
    (out / "manifest.json").unlink()
    untouched = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar") if p.name not in ("train-000005.tar",)}
    time.sleep(0.01)
    assert make_shards(*common, "--out", str(out), "--resume") == 0
    assert not list(out.glob(".*.tmp"))
    assert tree_bytes(out) == {k: v for k, v in expected.items() if k != "manifest.json"} | {
        "manifest.json": tree_bytes(out)["manifest.json"]}
    m_out, m_clean = (json.loads((d / "manifest.json").read_text()) for d in (out, clean))
    for m in (m_out, m_clean):
        m.pop("command")
    assert m_out == m_clean
    # only the missing shards were written again
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar") if p.name in untouched} == untouched


def test_resume_rewrites_shards_made_with_other_arguments(tmp_path):
    make_voc_tree(tmp_path)
    out = tmp_path / "out"
    assert make_shards("voc", "--root", str(tmp_path), "--out", str(out), "--splits", "train") == 0
    assert make_shards("voc", "--root", str(tmp_path), "--out", str(out), "--splits", "train", "--resume",
                       "--exclude-difficult") == 0
    meta = json.loads(samples_of(out, "train")["000003"]["json"])
    assert meta["classes"] == ["tvmonitor"]  # not the stale shard with the difficult cat


def _many_sample_voc(root, n):
    rng = np.random.default_rng(0)
    voc = root / "VOC2007"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (voc / sub).mkdir(parents=True)
    image, xml = jpeg_bytes(rng, 24, 24), voc_xml([("dog", 0)], 24, 24)
    ids = [f"{i:06d}" for i in range(n)]
    for i in ids:
        (voc / "JPEGImages" / f"{i}.jpg").write_bytes(image)
        (voc / "Annotations" / f"{i}.xml").write_text(xml)
    (voc / "ImageSets" / "Main" / "train.txt").write_text("\n".join(ids))
    return voc


def test_resume_after_a_really_killed_run(tmp_path):
    voc = _many_sample_voc(tmp_path, 2000)
    out, clean = tmp_path / "out", tmp_path / "clean"
    args = ["voc", "--root", str(voc), "--shard-maxcount", "40", "--workers", "1"]
    proc = subprocess.Popen([sys.executable, str(MAKE_SHARDS), *args, "--out", str(out), "--no-progress"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (out.is_dir() and any(out.glob("train-*.tar"))):
            assert proc.poll() is None and time.monotonic() < deadline, "make_shards ended before writing a shard"
            time.sleep(0.001)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert not (out / "manifest.json").exists(), "the run finished before it was killed"
    written = len(list(out.glob("train-*.tar")))
    print("shards complete when killed:", written)
    assert 0 < written < 50, written
    assert make_shards(*args, "--out", str(out), "--resume") == 0
    assert make_shards(*args, "--out", str(clean)) == 0
    assert not list(out.glob(".*.tmp"))
    assert {k: v for k, v in tree_bytes(out).items() if k != "manifest.json"} == {
        k: v for k, v in tree_bytes(clean).items() if k != "manifest.json"}
    assert json.loads((out / "manifest.json").read_text())["splits"]["train"]["total"] == 2000


def _children(pid: int) -> set[int]:
    """Live child processes of `pid` (from /proc: the workers of a make_shards run)."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.add(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_sigterm_stops_the_workers_and_the_folder_stays_resumable(tmp_path):
    """SIGTERM to the main make_shards process (what a scheduler sends): its 2 worker processes end with it (before,
    they stayed blocked on their pipe forever), exit 143, and --resume completes the same shards as a clean run."""
    voc = _many_sample_voc(tmp_path, 2000)
    out, clean = tmp_path / "out", tmp_path / "clean"
    args = ["voc", "--root", str(voc), "--shard-maxcount", "20", "--workers", "2"]
    log = tmp_path / "stderr.txt"
    workers: set[int] = set()
    with open(log, "w") as stderr:  # a file, not a pipe: surviving workers would hold a pipe open
        proc = subprocess.Popen([sys.executable, str(MAKE_SHARDS), *args, "--out", str(out), "--no-progress"],
                                stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        deadline = time.monotonic() + 120
        while not (out.is_dir() and any(out.glob("train-*.tar")) and len(_children(proc.pid)) >= 2):
            assert proc.poll() is None and time.monotonic() < deadline, "make_shards ended before writing a shard"
            time.sleep(0.001)
        workers = _children(proc.pid)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        survivors = [pid for pid in workers if _alive(pid)]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in workers:  # never leave orphans behind, also when the test fails
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    err = log.read_text()
    assert not survivors, f"worker processes {survivors} survived the main process"
    assert proc.returncode == 143, err[-3000:]
    assert "stopped by SIGTERM" in err and "--resume" in err and "Traceback" not in err
    assert not (out / "manifest.json").exists(), "the run finished before the signal"
    assert 0 < len(list(out.glob("train-*.tar"))) < 100
    assert make_shards(*args, "--out", str(out), "--resume") == 0
    assert make_shards(*args, "--out", str(clean)) == 0
    assert not list(out.glob(".*.tmp"))
    assert {k: v for k, v in tree_bytes(out).items() if k != "manifest.json"} == {
        k: v for k, v in tree_bytes(clean).items() if k != "manifest.json"}


def test_tar_bytes_match_webdataset_tarwriter(tmp_path):
    """Our direct writer is a faster path to exactly what webdataset's TarWriter writes."""
    import io

    from webdataset import TarWriter

    from explainer.data.shards import TAR_MTIME, ShardTarWriter

    rng = np.random.default_rng(1)
    samples = [(f"k{i:03d}", {"jpg": jpeg_bytes(rng, 20 + i, 20), "json": b'{"labels":[1]}', "seg.png": bytes(i)})
               for i in range(1, 30)]
    ours, theirs = io.BytesIO(), io.BytesIO()
    writer = ShardTarWriter(ours)
    for key, members in samples:
        writer.write(key, members)
    writer.close()
    ref = TarWriter(theirs, encoder=False, mtime=TAR_MTIME, user="explainer", group="explainer", mode=0o444)
    for key, members in samples:
        ref.write({"__key__": key, **members})
    ref.close()
    assert ours.getvalue() == theirs.getvalue()


def test_stock_webdataset_reads_our_shards(tmp_path, syn_source):
    """Interoperability, not only byte equality with TarWriter: plain `webdataset.WebDataset(...).decode("pil")` reads
    every sample of every split with its image, labels and segmentation, in manifest order."""
    import io

    import webdataset as wds
    from PIL import Image

    out = tmp_path / "shards"
    assert make_shards(*SYN, "--source-dir", str(syn_source), "--out", str(out), "--shard-maxcount", "7",
                       "--workers", "1") == 0
    manifest = json.loads((out / "manifest.json").read_text())
    with_seg = 0
    for split, entry in manifest["splits"].items():
        urls = [str(out / shard["path"]) for shard in entry["shards"]]
        assert len(urls) > 1, split  # several shards, so the reader crosses shard boundaries
        samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("pil"))
        assert [s["__key__"] for s in samples] == list(samples_of(out, split)), split
        assert len(samples) == entry["total"], split
        for sample in samples:
            image, meta = sample["jpg"], sample["json"]
            assert isinstance(image, Image.Image) and image.mode == "RGB", sample["__key__"]
            assert list(image.size) == meta["orig_size"] and len(meta["labels"]) == len(manifest["classes"])
            assert meta["classes"] == [c for c, on in zip(manifest["classes"], meta["labels"]) if on]
            if "seg.png" in sample:  # "pil" converts to RGB: class indices need the raw PNG (docs/dependencies.md)
                with_seg += 1
                assert sample["seg.png"].size == image.size, sample["__key__"]
    assert with_seg > 0
    # The class indices of a mask survive when it is read raw, as docs/dependencies.md shows.
    raw_png = wds.handle_extension("seg.png", lambda data: Image.open(io.BytesIO(data)))
    test_urls = [str(out / shard["path"]) for shard in manifest["splits"]["test"]["shards"]]
    for sample in wds.WebDataset(test_urls, shardshuffle=False, empty_check=False).decode(raw_png, "pil"):
        if "seg.png" in sample:
            values = set(np.unique(np.asarray(sample["seg.png"])).tolist())
            assert sample["seg.png"].mode in ("P", "L") and values <= {*range(len(manifest["classes"]) + 1), 255}


def test_tar_header_template_matches_tarfile():
    """The template header equals tarfile's for short, 100-byte, non-ASCII and over-long names and odd sizes."""
    import tarfile

    from explainer.data.shards import TAR_MTIME, tar_header

    names = ["a.jpg", "k" * 96 + ".png", "k" * 100, "k" * 101, "ü" * 50 + ".x", "ü" * 51, "d/" * 60 + "x.json",
             "\udcff.jpg"]
    for name in names:
        for size in (0, 1, 511, 512, 513, 123456789, 8**11 - 1, 8**11):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = size, TAR_MTIME, 0o444
            info.uname = info.gname = "explainer"
            try:
                expected: bytes | str = info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
            except ValueError as exc:  # too long to split, or too big for USTAR: we must refuse the same way
                expected = str(exc)
            try:
                got: bytes | str = tar_header(name, size)
            except ValueError as exc:
                got = str(exc)
            assert got == expected, (name, size)


def _jpeg_variants() -> dict[str, bytes]:
    import io

    from PIL import Image

    rng = np.random.default_rng(5)
    base = Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0128], exif[0x011A] = 2, 300.0
    saves = {"plain": (base, {}), "progressive": (base, {"progressive": True}), "gray": (base.convert("L"), {}),
             "cmyk": (base.convert("CMYK"), {}), "exif": (base, {"exif": exif.tobytes()}),
             "icc": (base, {"icc_profile": b"p" * 300}), "comment": (base, {"comment": b"hi"}),
             "restart": (base, {"restart_marker_blocks": 1}), "dpi": (base, {"dpi": (300, 300)}),
             "mpo": (base, {"format": "MPO", "save_all": True, "append_images": [base.rotate(90)]})}
    out = {}
    for name, (im, kw) in saves.items():
        buf = io.BytesIO()
        im.save(buf, kw.pop("format", "JPEG"), **kw)
        out[name] = buf.getvalue()
    return out


def test_jpeg_header_walk_agrees_with_pil_or_defers():
    """The cheap JPEG header walk answers plain files exactly as PIL would and leaves every doubtful one to PIL."""
    import io
    import random
    import warnings

    from PIL import Image

    from explainer.data.shards import _jpeg_header

    def pil(data: bytes):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                im = Image.open(io.BytesIO(data))
                return im.format, im.size, im.mode
        except Exception:
            return None

    variants = _jpeg_variants()
    for name in ("plain", "progressive", "gray", "cmyk", "icc", "comment", "restart", "dpi"):
        header = _jpeg_header(variants[name])
        assert header is not None and ("JPEG", *header) == pil(variants[name]), name
    assert _jpeg_header(variants["exif"]) is None and _jpeg_header(variants["mpo"]) is None  # PIL's call
    r = random.Random(0)
    cases = [b"", b"\xff\xd8", b"\xff\xd8\xff\xd9", b"\x89PNG\r\n\x1a\n"]
    for _ in range(600):  # damaged headers: flipped, zeroed or 0xFF bytes, truncations
        data = bytearray(r.choice(list(variants.values())))
        for _ in range(r.randint(1, 3)):
            pos = r.randrange(min(len(data), 700))
            data[pos] = r.choice([0, 0xFF, 0xD9, 0xDA, r.randrange(256), data[pos] ^ (1 << r.randrange(8))])
        cases.append(bytes(data[: r.randrange(3, len(data))] if r.random() < 0.3 else data))
    answered = 0
    for data in cases:
        header = _jpeg_header(data)
        if header is not None:
            answered += 1
            assert pil(data) == ("JPEG", *header), data[:40]
    assert answered > 100  # the walk is not just deferring everything


def test_read_image_fast_path_same_result_as_pil_path(tmp_path):
    """Plain JPEGs skip PIL when opening; the result (bytes, ext, size, notes) is what the PIL path gives."""
    from explainer.data.shards import read_image

    for name, data in _jpeg_variants().items():
        for suffix in ("jpg", "jpeg", "png"):
            path = tmp_path / f"{name}.{suffix}"
            path.write_bytes(data)
            fast = read_image(path)
            slow = read_image(path, verify=True)  # always through PIL (and a full decode)
            assert (fast.data, fast.ext, fast.size, fast.notes) == (slow.data, slow.ext, slow.size, slow.notes)


def test_sample_json_is_exactly_json_dumps():
    import random

    from explainer.data.shards import sample_json

    r = random.Random(0)
    alphabet = ["a", "ü", '"', "\\", "\n", "\udcff", "😀", "/", " ", "<"]
    for _ in range(300):
        classes = ["".join(r.choices(alphabet, k=r.randint(0, 5))) for _ in range(r.randint(1, 12))]
        labels = [r.choice([0, 1, True, False]) for _ in classes]
        source_id = "".join(r.choices(alphabet, k=r.randint(0, 8)))
        size = (r.randint(1, 5000), r.randint(1, 5000))
        doc = {"labels": [int(v) for v in labels], "classes": [c for c, on in zip(classes, labels) if on],
               "source_id": source_id, "orig_size": list(size)}
        assert sample_json(labels, classes, source_id, size) == json.dumps(doc, separators=(",", ":")).encode()
