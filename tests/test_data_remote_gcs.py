"""gs:// shards (explainer/data/remote.py through gcsfs) against a GCS emulator on 127.0.0.1 (gcp-storage-emulator
behind the fault-injecting proxy of tests/_s3.py, tests/_gcs.py): make-shards into the bucket gives the bytes of a
local run, the loader reads from the bucket exactly the samples the local shards give, --resume uploads only what
is missing, a missing or failing shard is a reported bad shard after our retries alone (gcsfs's own are off), and
no request leaves 127.0.0.1."""

from __future__ import annotations

import json
import os

import pytest
import torch
from _gcs import gcs_session, reached_hosts
from _helpers import TINY_SHARDS
from _s3 import Fault

from explainer.config import DataConfig
from explainer.data import remote
from explainer.data.loader import iter_samples, make_eval_loader, make_train_loader, read_manifest
from explainer.make_shards import main

pytestmark = pytest.mark.xdist_group("gcs")

# Per process: each xdist worker that runs tests of this module starts its own emulator and makes its own shards
BUCKET = f"shards-{os.getpid()}"
URL = f"gs://{BUCKET}/syn"
ARGS = ["synthetic", *TINY_SHARDS, "--shard-maxcount", "16", "--workers", "1", "--no-progress",
        "--remote-retries", "1"]


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """The emulator (and proxy) with the tiny synthetic shards made into the bucket and, the same way, on disk."""
    with gcs_session(BUCKET) as proxy:
        assert main([*ARGS, "--out", URL]) == 0
        local = tmp_path_factory.mktemp("gcs-local")
        assert main([*ARGS, "--out", str(local)]) == 0
        yield proxy, local


@pytest.fixture(autouse=True)
def clean_proxy(gcs):
    gcs[0].faults.clear()
    gcs[0].seen.clear()


def fast(**kw) -> DataConfig:
    base = {"image_size": 32, "batch_size": 8, "num_workers": 0, "shuffle_buffer": 16, "remote_timeout_s": 2.0,
            "remote_retries": 1}
    return DataConfig(**{**base, **kw})


def uploads(proxy) -> list[str]:
    return [path for method, path, _ in proxy.seen if method in ("POST", "PUT") and path.startswith("/upload/")]


def test_bucket_holds_the_local_bytes_and_manifest(gcs):
    _, local = gcs
    m = read_manifest(f"{URL}/manifest.json")
    assert m.path == f"{URL}/manifest.json" and m.splits["train"].shards[0] == f"{URL}/train-000000.tar"
    entries = [e for info in m.raw["splits"].values() for e in info["shards"]]
    assert len(entries) == 10
    for entry in entries:  # same bytes as the local run; the manifest's size and checksum are theirs
        path = local / entry["path"]
        assert remote.fetch(f"{URL}/{entry['path']}", remote.RemotePolicy()) == path.read_bytes()
        assert entry["size"] == path.stat().st_size and entry["sha256"] == remote.sha256_of(path)
    listed = remote.listing(URL, remote.RemotePolicy())
    assert {e["path"] for e in entries} | {"manifest.json"} <= set(listed)


def test_a_shard_over_5_mib_goes_up_in_a_resumable_upload_and_reads_back(gcs, tmp_path):
    """Real shards are large: gcsfs uploads files of 5 MiB or more in a resumable session (published at the last
    chunk), smaller ones in one multipart POST, as the tiny shards above."""
    proxy, _ = gcs
    big = tmp_path / "big.tar"
    big.write_bytes(os.urandom(6 << 20))
    remote.upload_file(big, f"{URL}/big/big.tar", remote.RemotePolicy())
    assert [p for p in uploads(proxy) if "uploadType=resumable" in p], proxy.seen
    stream = remote.open_url(f"{URL}/big/big.tar", remote.RemotePolicy(chunk=1 << 20))  # ranged GETs
    assert stream.read() == big.read_bytes()
    remote.delete(f"{URL}/big/big.tar", remote.RemotePolicy())
    assert remote.listing(f"{URL}/big", remote.RemotePolicy()) == {}


def test_loader_reads_from_the_bucket_what_local_disk_gives(gcs):
    _, local = gcs
    url, lm = f"{URL}/manifest.json", read_manifest(local / "manifest.json")
    m = read_manifest(url)
    assert [s["__key__"] for s in iter_samples(m, "val")] == [s["__key__"] for s in iter_samples(lm, "val")]
    got = list(make_eval_loader(fast(), url, "test", rank=0, world_size=1))
    want = list(make_eval_loader(fast(), lm, "test", rank=0, world_size=1))
    assert [b["key"] for b in got] == [b["key"] for b in want] and len(got) == 3
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(got, want, strict=True))
    dcfg = fast(num_workers=2)  # forked DataLoader workers, each with its read-ahead thread and gcsfs session
    epochs = [[list(b["key"]) for b in make_train_loader(dcfg, man, "train", rank=0, world_size=1, seed=0,
                                                          drop_unlabelled=True)] for man in (url, lm)]
    assert epochs[0] == epochs[1] and len(epochs[0]) == 12


def test_resume_uploads_only_the_missing_shard(gcs):
    proxy, local = gcs
    fs, _ = remote.filesystem(URL, remote.RemotePolicy())
    names = [f"train-00000{i}.tar" for i in range(6)]
    before = {n: fs.info(f"{BUCKET}/syn/{n}")["generation"] for n in names}
    remote.delete(f"{URL}/train-000004.tar", remote.RemotePolicy())
    proxy.seen.clear()
    assert main([*ARGS, "--out", URL, "--resume"]) == 0
    fs.invalidate_cache()
    after = {n: fs.info(f"{BUCKET}/syn/{n}")["generation"] for n in names}
    assert [n for n in names if after[n] != before[n]] == ["train-000004.tar"]
    assert len(uploads(proxy)) == 3, uploads(proxy)  # the shard, its record, the manifest
    again = remote.fetch(f"{URL}/train-000004.tar", remote.RemotePolicy())
    assert again == (local / "train-000004.tar").read_bytes()


@pytest.mark.parametrize("kind,hits", [("404", 1), ("503", 2)])
def test_failing_shard_is_a_reported_bad_shard_after_our_tries_only(gcs, kind, hits):
    """404: not retried; 503 on every request: 1 + data.remote_retries tries (gcsfs alone would try 6 times)."""
    proxy, _ = gcs
    url = f"{URL}/manifest.json"
    clean = [list(b["key"]) for b in make_train_loader(fast(), url, "train", rank=0, world_size=1, seed=0,
                                                        drop_unlabelled=True)]
    proxy.seen.clear()
    proxy.faults[:] = [Fault(kind, "train-000003.tar", 99)]
    stream = make_train_loader(fast(), url, "train", rank=0, world_size=1, seed=0, drop_unlabelled=True)
    got = [list(b["key"]) for b in stream]
    tries = [what for method, path, what in proxy.seen if method == "GET" and "train-000003.tar" in path]
    assert tries == [kind] * hits
    assert len(got) == len(clean) and stream.corrupt_samples >= 16
    assert any("train-000003.tar" in note for note in stream.problems), stream.problems
    proxy.faults.clear()
    lost = {s["__key__"] for s in iter_samples(read_manifest(url), "train") if "train-000003" in s["__url__"]}
    assert lost and not lost & {k for batch in got for k in batch}


def test_no_request_left_loopback(gcs):
    json.loads(remote.fetch(f"{URL}/manifest.json", remote.RemotePolicy()))
    assert reached_hosts() == ["127.0.0.1"]
