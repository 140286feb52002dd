"""make-shards --out s3://... (explainer/data/remote_shards.py) against a real S3-compatible server on 127.0.0.1
(moto behind a fault-injecting proxy, tests/_s3.py): the bucket gets the bytes a local run writes, each shard in one
PUT before its record and the manifest last; a shard that cannot be uploaded stops the run without a manifest, and
--resume uploads only what is missing."""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from pathlib import Path

import pytest
from _helpers import TINY_SHARDS
from _s3 import Fault, make_bucket, s3_session

from explainer.data import remote
from explainer.make_shards import main

ARGS = ["synthetic", *TINY_SHARDS, "--shard-maxcount", "16", "--workers", "2", "--no-progress",
        "--remote-retries", "1"]

@pytest.fixture(scope="module")
def s3():
    with s3_session() as proxy:
        make_bucket("out")
        yield proxy


@pytest.fixture(autouse=True)
def clean_proxy(s3):
    s3.faults.clear()
    s3.seen.clear()


def puts(proxy) -> list[tuple[str, str]]:
    return [(path.split("/out/", 1)[1], what) for method, path, what in proxy.seen
            if method == "PUT" and path.startswith("/out/")]


def test_bucket_gets_the_local_bytes_whole_shards_first_manifest_last(s3, tmp_path):
    s3.faults.append(Fault("503", "/train-000002.tar", 1, method="PUT"))  # a throttled upload, retried
    assert main([*ARGS, "--out", "s3://out/syn"]) == 0
    assert main([*ARGS, "--out", str(tmp_path / "local")]) == 0
    seen = puts(s3)
    assert seen[-1] == ("syn/manifest.json", "ok") and ("syn/train-000002.tar", "503") in seen
    for name, _ in seen[:-1]:  # a shard's record only after the shard itself is complete in the bucket
        if name.endswith(".json"):
            shard = name.replace(".progress/", "").removesuffix(".json")
            assert seen.index((shard, "ok")) < seen.index((name, "ok"))
    manifest = remote.fetch("s3://out/syn/manifest.json", remote.RemotePolicy())
    entries = [e for info in json.loads(manifest)["splits"].values() for e in info["shards"]]
    assert len(entries) == 10
    for entry in entries:  # same bytes as the local run, and the manifest's size and checksum are theirs
        local = tmp_path / "local" / entry["path"]
        assert remote.fetch(f"s3://out/syn/{entry['path']}", remote.RemotePolicy()) == local.read_bytes()
        assert entry["size"] == local.stat().st_size and entry["sha256"] == remote.sha256_of(local)
    staging = hashlib.sha1(b"s3://out/syn").hexdigest()[:16]
    assert not (Path(tempfile.gettempdir()) / f"explainer-make-shards-{staging}").exists()  # the staging folder went


@pytest.mark.parametrize("strict", [False, True])
def test_failed_upload_stops_without_manifest_then_resume_uploads_the_rest(s3, capsys, strict):
    """A 503 burst beyond the retries on one shard's PUT: exit 1 naming it (with --strict at the next finished shard,
    without it after the others are uploaded), no manifest, the complete shards stay in the bucket with their
    records, and --resume uploads only the missing ones, then the manifest."""
    url = f"s3://out/again-{int(strict)}"
    flags = ["--strict"] if strict else []
    s3.faults.append(Fault("503", "/train-000004.tar", 99, method="PUT"))
    assert main([*ARGS, *flags, "--out", url]) == 1
    err = capsys.readouterr().err
    assert "train-000004.tar" in err and "SlowDown" in err and "--resume" in err, err
    found = remote.listing(url, remote.RemotePolicy())
    assert found.get("manifest.json") is None and "train-000004.tar" not in found
    kept = {name for name in found if not name.startswith(".progress/")}
    assert "train-000000.tar" in kept and all(f".progress/{name}.json" in found for name in kept)
    s3.faults.clear()
    s3.seen.clear()
    assert main([*ARGS, *flags, "--out", url, "--resume"]) == 0
    uploaded = [name.split("/", 1)[1] for name, _ in puts(s3)]
    assert uploaded[-1] == "manifest.json" and "train-000004.tar" in uploaded
    assert not set(uploaded) & kept  # the shards already complete are not uploaded again
    manifest = json.loads(remote.fetch(f"{url}/manifest.json", remote.RemotePolicy()))
    assert sum(len(info["shards"]) for info in manifest["splits"].values()) == 10


def test_hung_upload_is_retried_and_fails_within_its_bound(s3, capsys):
    """An upload that never gets an answer: each try ends after --remote-timeout (plus the time the shard's size
    allows at 256 KiB/s), is retried once, then the run stops with exit 1 naming the shard; no hang."""
    s3.faults.append(Fault("hang", "/train-000002.tar", 99, method="PUT"))
    start = time.monotonic()
    assert main([*ARGS, "--strict", "--remote-timeout", "1", "--out", "s3://out/hung"]) == 1
    took = time.monotonic() - start
    err = capsys.readouterr().err
    tries = [what for method, path, what in s3.seen if method == "PUT" and path.endswith("/hung/train-000002.tar")]
    assert tries == ["hang", "hang"] and "train-000002.tar" in err and "after 2 tries" in err, (tries, err)
    assert took < 2 * (1 + 0.5) + 1 + 5, took  # 2 tries of ~1.3 s, a backoff under 1 s, the rest of the run


def test_bad_out_urls_exit_2(s3, capsys):
    assert main([*ARGS, "--out", "s3://key:secret@out/syn"]) == 2
    assert "a user or password" in capsys.readouterr().err
    assert main([*ARGS, "--out", "https://example.invalid/syn"]) == 2
    assert "cannot write to 'https' URLs" in capsys.readouterr().err


def test_resume_uploads_again_a_shard_overwritten_since(s3):
    """--resume keeps a shard only if its object is still the version the record saw after the upload: a shard
    written again since (same size, other bytes) is uploaded again, the others are not, and the bucket ends with
    bytes that match the manifest's sha256 again."""
    import s3fs

    url = "s3://out/overwritten"
    assert main([*ARGS, "--out", url]) == 0
    key = "out/overwritten/train-000001.tar"
    fs = s3fs.S3FileSystem()
    original = fs.cat_file(key)
    fs.pipe_file(key, bytes(len(original)))  # same size: the size check alone would keep it
    s3.seen.clear()
    assert main([*ARGS, "--out", url, "--resume"]) == 0
    uploaded = [name.split("/", 1)[1] for name, _ in puts(s3)]
    assert sorted(uploaded) == [".progress/train-000001.tar.json", "manifest.json", "train-000001.tar"], uploaded
    manifest = json.loads(remote.fetch(f"{url}/manifest.json", remote.RemotePolicy()))
    entry = next(e for e in manifest["splits"]["train"]["shards"] if e["path"] == "train-000001.tar")
    assert remote.fetch(f"{url}/train-000001.tar", remote.RemotePolicy()) == original
    assert entry["sha256"] == hashlib.sha256(original).hexdigest()
