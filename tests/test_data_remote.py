"""Shards in object storage (explainer/data/remote.py and its hooks in the loader), against a real S3-compatible
server on 127.0.0.1 (moto, tests/_s3.py) with a fault-injecting proxy in front: the manifest rules for URLs, reading
with retries and timeouts, each injected fault's documented outcome, and end to end: make-shards to the bucket, two
processes training from it with a resume, evaluation, the same numbers as from local disk, and no secret anywhere."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch
from _helpers import PYTHON, TINY_SHARDS, free_port, run_cmd, tiny_overrides
from _s3 import PLANTED_SECRET, Fault, make_bucket, s3_session

from explainer.config import DataConfig
from explainer.data import remote
from explainer.data.loader import ManifestError, iter_samples, make_eval_loader, make_train_loader, read_manifest

# Per process: each xdist worker that runs tests of this module builds the bucket in its own moto server, and two
# make-shards into one URL at once are refused (the staging folder is per URL), so the URL differs by process.
BUCKET = f"shards-{os.getpid()}"
SHARDS = [*TINY_SHARDS, "--shard-maxcount", "16", "--workers", "1", "--no-progress"]

@pytest.fixture(scope="module")
def s3():
    """moto + proxy, the environment pointing at them, and the tiny synthetic shards made into the bucket by
    make-shards itself (in this process)."""
    from explainer.make_shards import main

    with s3_session() as proxy:
        make_bucket(BUCKET)
        assert main(["synthetic", "--out", f"s3://{BUCKET}/syn", *SHARDS]) == 0
        yield proxy


def fast(**kw) -> DataConfig:
    """Small batches, in-process loading, short timeouts and waits (a fault costs well under a second)."""
    base = {"image_size": 32, "batch_size": 8, "num_workers": 0, "shuffle_buffer": 16, "remote_timeout_s": 0.5,
            "remote_retries": 2}
    return DataConfig(**{**base, **kw})


def epoch_keys(manifest, dcfg: DataConfig) -> tuple[list[list[str]], object]:
    stream = make_train_loader(dcfg, manifest, "train", rank=0, world_size=1, seed=0, drop_unlabelled=True)
    return [list(b["key"]) for b in stream], stream


def test_manifest_in_the_bucket_reads_like_the_local_one(s3, tmp_path):
    url = f"s3://{BUCKET}/syn/manifest.json"
    m = read_manifest(url)  # a URL manifest's own relative shards need no allow_url_schemes
    assert m.path == url and m.splits["train"].shards[0] == f"s3://{BUCKET}/syn/train-000000.tar"
    assert len(m.splits["train"].shards) == 6 and all(m.splits["train"].sizes)
    import s3fs

    local = tmp_path / "local"
    s3fs.S3FileSystem().get(f"{BUCKET}/syn/", str(local), recursive=True)
    for entry in m.raw["splits"]["train"]["shards"]:  # the manifest's checksums are those of the bytes in the bucket
        assert remote.sha256_of(local / entry["path"]) == entry["sha256"]
    lm = read_manifest(local / "manifest.json")
    assert [s["__key__"] for s in iter_samples(m, "test")] == [s["__key__"] for s in iter_samples(lm, "test")]
    dcfg = fast(num_workers=2)  # read-ahead threads in DataLoader workers
    assert epoch_keys(url, dcfg)[0] == epoch_keys(lm, dcfg)[0]


def _bucket_manifest(name: str, edit) -> str:
    """A copy of the bucket's manifest with `edit` applied to its first train entry, uploaded under syn/name."""
    raw = json.loads(remote.fetch(f"s3://{BUCKET}/syn/manifest.json", remote.RemotePolicy()))
    edit(raw["splits"]["train"]["shards"][0])
    url = f"s3://{BUCKET}/syn/{name}"
    remote.write_bytes(url, json.dumps(raw).encode(), remote.RemotePolicy())
    return url


def test_url_manifest_rules(s3):
    """The folder rule holds for URLs as for paths; missing or resized shards fail at start; credentials and
    unknown or refused protocols are refused with the key to change."""
    def setter(key, value):
        return lambda e: e.__setitem__(key, value)

    escape = _bucket_manifest("escape.json", setter("path", "../other/train-000000.tar"))
    with pytest.raises(ManifestError, match=f"outside the manifest's folder s3://{BUCKET}/syn"):
        read_manifest(escape)
    other = _bucket_manifest("other.json", setter("path", "s3://elsewhere/train-000000.tar"))
    with pytest.raises(ManifestError, match=r"data.allow_url_schemes=\[s3\]"):
        read_manifest(other)
    with pytest.raises(ManifestError, match="outside the manifest's folder"):
        read_manifest(other, allow_url_schemes=["s3"])
    with pytest.raises(ManifestError, match="does not exist"):
        read_manifest(_bucket_manifest("missing.json", setter("path", "train-000099.tar")))
    with pytest.raises(ManifestError, match="is 81920 bytes, the manifest says 5"):
        read_manifest(_bucket_manifest("resized.json", setter("size", 5)))
    with pytest.raises(ManifestError, match="a user or password"):
        read_manifest(_bucket_manifest("creds.json", setter("path", "s3://key:secret@shards/syn/train-000000.tar")),
                      allow_url_schemes=["s3"])
    with pytest.raises(ManifestError, match="a user or password"):
        read_manifest("s3://key:secret@shards/syn/manifest.json")
    with pytest.raises(ManifestError, match="pipe cannot be allowed"):
        read_manifest(f"s3://{BUCKET}/syn/manifest.json", allow_url_schemes=["pipe"])
    with pytest.raises(ManifestError, match="nosuch cannot be allowed: not a protocol fsspec knows"):
        read_manifest(f"s3://{BUCKET}/syn/manifest.json", allow_url_schemes=["nosuch"])
    with pytest.raises(ManifestError, match="does not exist"):
        read_manifest(f"s3://{BUCKET}/nothing/manifest.json")


# (fault, how many requests get it) -> the outcome: "same" = the epoch equals a clean one; "bad" = that shard is a
# reported bad shard (its samples counted as corrupt, the batch count unchanged, a note naming it)
FAULTS = {"503 burst": ("503", 2, "same"), "reset mid-shard": ("reset", 1, "same"), "hang once": ("hang", 1, "same"),
          "404": ("404", 99, "bad"), "hang past every retry": ("hang", 99, "bad"),
          "503 past every retry": ("503", 99, "bad")}


@pytest.mark.parametrize("name", list(FAULTS))
def test_injected_faults_give_the_documented_outcome(s3, name):
    kind, times, outcome = FAULTS[name]
    url = f"s3://{BUCKET}/syn/manifest.json"
    dcfg = fast(remote_retries=2 if outcome == "same" else 1)
    clean, _ = epoch_keys(url, dcfg)
    s3.seen.clear()
    s3.faults[:] = [Fault(kind, "/syn/train-000003.tar", times)]
    start = time.monotonic()
    got, stream = epoch_keys(url, dcfg)
    took = time.monotonic() - start
    hits = [what for method, path, what in s3.seen if path.endswith("train-000003.tar") and method == "GET"]
    s3.faults.clear()
    assert took < 10, f"{name}: the epoch took {took:.1f} s"  # bounded: timeout x tries + backoff, never a hang
    assert len(got) == len(clean)  # the batch count never changes (DDP ranks stay in step)
    if outcome == "same":
        assert got == clean and stream.corrupt_samples == 0 and stream.bad_shards == []
        assert hits[:times] == [kind] * times and hits[times] == "ok"
        return
    assert stream.corrupt_samples >= 16  # the shard's 16 samples (and the read error itself)
    assert any("train-000003.tar" in note for note in stream.problems), stream.problems
    assert {url for url, _ in stream.bad_shards} == {f"s3://{BUCKET}/syn/train-000003.tar"}  # what stop would name
    assert not {k for b in got for k in b} & {s["__key__"] for s in iter_samples(
        read_manifest(url), "train") if s["__url__"].endswith("train-000003.tar")}
    assert len(hits) == (1 if kind == "404" else 2)  # 404 is not retried; the rest 1 + data.remote_retries times


def _tampered(name: str, split: str = "train", entry: int = 0) -> str:
    """A manifest under syn/name whose `split` shard `entry` is a copy of the bucket's with its last byte (tar
    padding, which the reader skips) changed: same size, same samples, another sha256 than the manifest's."""
    policy = remote.RemotePolicy()
    raw = json.loads(remote.fetch(f"s3://{BUCKET}/syn/manifest.json", policy))
    shard = raw["splits"][split]["shards"][entry]
    data = bytearray(remote.fetch(f"s3://{BUCKET}/syn/{shard['path']}", policy))
    data[-1] ^= 0xFF
    shard["path"] = f"{name}.tar"
    remote.write_bytes(f"s3://{BUCKET}/syn/{name}.tar", bytes(data), policy)
    url = f"s3://{BUCKET}/syn/{name}.json"
    remote.write_bytes(url, json.dumps(raw).encode(), policy)
    return url


def test_checksum_mismatch_is_a_bad_shard_and_good_shards_pass(s3):
    """The reader hashes a URL shard as its chunks arrive and compares with the manifest's sha256 at the last one:
    the shard changed in the bucket is a bad shard naming both checksums; the others (and the clean manifest) pass.
    Chunks of 30000 bytes: the digest runs over several requests, hashed in order by the fetch threads."""
    url = _tampered("tampered")
    expected = read_manifest(url).splits["train"].sha256[0]
    dcfg = fast()
    for workers in (0, 2):  # in the main process and in DataLoader workers
        stream = make_train_loader(fast(num_workers=workers), url, "train", rank=0, world_size=1, seed=0,
                                   drop_unlabelled=True)
        stream.dataset.remote = remote.RemotePolicy(timeout=0.5, retries=1, chunk=30000)
        assert len(list(stream)) == len(stream)
        (shard, why), *_ = stream.bad_shards
        assert shard == f"s3://{BUCKET}/syn/tampered.tar" and {u for u, _ in stream.bad_shards} == {shard}
        assert why.startswith("ChecksumError: ") and f"the manifest says {expected[:12]}..." in why, why
        got = hashlib.sha256(remote.fetch(shard, remote.RemotePolicy())).hexdigest()
        assert f"hash to sha256 {got[:12]}..." in why
    _, stream = epoch_keys(f"s3://{BUCKET}/syn/manifest.json", dcfg)
    assert stream.bad_shards == [] and stream.corrupt_samples == 0 and stream.problems == []


def _two_ranks(script: str, *args: str) -> tuple[object, float]:
    """`script` under torchrun with 2 CPU processes (gloo), time-bounded; (completed process, seconds). torchrun
    looks at its processes every second: a rank that exits first does not get the other killed before it says why."""
    start = time.monotonic()
    proc = run_cmd([PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
                    "--monitor-interval", "1", *script.split(), *args], env={"ACCELERATE_USE_CPU": "1"}, check=False,
                   timeout=120)
    return proc, time.monotonic() - start


def _stop_lines(proc) -> list[str]:
    """Each rank's error message (the two processes share stderr: a progress bar or the other rank's message may
    share its line)."""
    key = "error: data.on_bad_shard=stop"
    return [key + part.split("\n")[0] for part in proc.stderr.split(key)[1:]]


@pytest.mark.slow
def test_stop_on_bad_shard_in_training_every_rank_after_the_same_step(s3, tmp_path):
    """data.on_bad_shard=stop, 2 gloo processes, a train shard answering 404 that rank 0 reaches in its third batch:
    both ranks stop after the same step with the same error naming the shard, well before any process-group
    timeout, and the checkpoints already written stay loadable."""
    import numpy as np

    target = f"train-{np.random.default_rng([0, 0]).permutation(6)[2]:06d}.tar"  # rank 0's third shard in epoch 0
    s3.faults[:] = [Fault("404", f"/syn/{target}", 99)]
    out = tmp_path / "run"
    proc, took = _two_ranks("explainer/train_classifier.py", "--config", "configs/classifier/synthetic.yaml",
                            *tiny_overrides(f"s3://{BUCKET}/syn/manifest.json", out), "train.max_steps=6",
                            "train.checkpoint_every_steps=1", "train.val_every_steps=1000", "data.on_bad_shard=stop",
                            "data.remote_retries=1", "tracking.wandb_mode=disabled")
    s3.faults.clear()
    assert proc.returncode != 0 and took < 60, (proc.returncode, took)
    lines = _stop_lines(proc)
    assert len(lines) == 2 and len({line.split("; stopped")[0] for line in lines}) == 1, proc.stderr[-3000:]
    step = int(lines[0].split("by step ")[1].split(":")[0])
    assert f"s3://{BUCKET}/syn/{target}: FileNotFoundError" in lines[0] and "NoSuchKey" in lines[0]
    saved = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert step >= 2 and saved == [f"step_{k:08d}" for k in range(1, step)], (step, saved)
    assert f"the last checkpoint is {out / 'checkpoints' / saved[-1]}" in proc.stderr


@pytest.mark.slow
def test_stop_on_bad_shard_in_evaluation_two_ranks_no_tables(s3, tiny_classifier, tmp_path):
    """The same key in evaluate: a test shard only rank 1 reads is changed in the bucket (checksum mismatch); both
    processes exit 1 naming it, no results are written, no hang."""
    url = _tampered("tampered-test", split="test", entry=1)
    common = ["explainer.evaluate", "--config", "configs/synthetic.yaml", f"data.manifest={url}", "--classifier",
              str(tiny_classifier), "--methods", "gradcam", "--no-progress", "data.image_size=32",
              "data.batch_size=8", "data.num_workers=0", "eval.faithfulness_steps=0"]
    proc, took = _two_ranks("-m", *common, "--out", str(tmp_path / "stop"), "data.on_bad_shard=stop")
    assert proc.returncode == 1 and took < 60, (proc.returncode, took, proc.stderr[-3000:])
    lines = _stop_lines(proc)
    assert len(lines) == 2 and f"s3://{BUCKET}/syn/tampered-test.tar: ChecksumError" in lines[0], proc.stderr[-3000:]
    assert "no results written" in lines[0] and not (tmp_path / "stop").exists()


@pytest.mark.parametrize("workers", [0, 1])
def test_next_epochs_first_shard_is_on_its_way_before_that_epoch_starts(s3, workers):
    """Training: once an epoch's shards are all fetched, each worker starts the next epoch's first shard, and that
    epoch reads it from there (no new request), with the samples and order of a stream that starts at that epoch."""
    from explainer.data.loader import _pieces

    url = f"s3://{BUCKET}/syn/manifest.json"
    stream = make_train_loader(fast(num_workers=workers), url, "train", rank=0, world_size=1, seed=0,
                               drop_unlabelled=True)
    data = stream.dataset
    start, count, _ = data._worker_block(0)
    first = data.info.shards[_pieces(data._order(1), data.kept, start, start + count)[0].shard]
    path = first.split(BUCKET, 1)[1]

    def gets() -> int:
        return sum(1 for method, seen, _ in s3.seen if method == "GET" and seen.split("?")[0].endswith(path))

    s3.seen.clear()
    list(stream)
    deadline = time.monotonic() + 10
    while gets() < 2 and time.monotonic() < deadline:  # epoch 0's read of it, then the early start for epoch 1
        time.sleep(0.05)
    assert gets() == 2, s3.seen
    stream.set_epoch(1)
    keys = [list(b["key"]) for b in stream]
    assert gets() == 2 and len(s3.seen) > 2  # the other shards were fetched again, the first one was not
    fresh = make_train_loader(fast(num_workers=workers), url, "train", rank=0, world_size=1, seed=0,
                              drop_unlabelled=True)
    fresh.set_epoch(1)
    assert keys == [list(b["key"]) for b in fresh]


def test_eval_stream_reads_each_sample_once_across_ranks_and_workers(s3):
    url = f"s3://{BUCKET}/syn/manifest.json"
    keys = []
    for rank in range(2):
        stream = make_eval_loader(fast(), url, "test", rank=rank, world_size=2)
        keys += [k for b in stream for k in b["key"]]
    assert sorted(keys) == sorted(s["__key__"] for s in iter_samples(read_manifest(url), "test"))


def _no_secret_in(folder: Path, *texts: str) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            assert PLANTED_SECRET.encode() not in path.read_bytes(), path
    for text in texts:
        assert PLANTED_SECRET not in text


@pytest.mark.slow
@pytest.mark.numerics
def test_train_two_processes_from_the_bucket_resume_evaluate_equal_local(s3, tiny_classifier, tmp_path):
    """float64, 2 gloo processes: a run reading local copies of the bucket's shards for 4 steps; a second reading the
    bucket, resumed from the first's step-2 checkpoint: the same final weights, bit for bit. Evaluation from the
    bucket gives the local numbers. The planted secret key is in no file of the run folders and no output."""
    import s3fs

    local = tmp_path / "local"
    s3fs.S3FileSystem().get(f"{BUCKET}/syn/", str(local), recursive=True)
    bucket_manifest = f"s3://{BUCKET}/syn/manifest.json"
    common = ["--config", "configs/synthetic.yaml", f"classifier.checkpoint={tiny_classifier}",
              "explainer.arch=tiny_unet", "train.dtype=float64", "optim.optimizer=sgd", "optim.lr=0.5",
              "train.max_steps=4", "train.checkpoint_every_steps=2", "train.val_every_steps=1000",
              "tracking.wandb_mode=disabled"]
    two = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_cmd([*two, "--master_port", str(free_port()), "explainer/train.py", *common,
             *tiny_overrides(local / "manifest.json", straight)], env={"ACCELERATE_USE_CPU": "1"})
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000004")
    outputs = [run_cmd([*two, "--master_port", str(free_port()), "explainer/train.py", *common,
                        *tiny_overrides(bucket_manifest, resumed), "--resume",
                        str(resumed / "checkpoints" / "step_00000002")], env={"ACCELERATE_USE_CPU": "1"})]
    assert "resumed from" in outputs[0].stdout + outputs[0].stderr
    a = torch.load(straight / "explainer_last.pt", weights_only=True)["state_dict"]
    b = torch.load(resumed / "explainer_last.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(a[k].dtype == torch.float64 and torch.equal(a[k], b[k]) for k in a)

    results = {}
    for name, manifest in (("local", local / "manifest.json"), ("bucket", bucket_manifest)):
        out = tmp_path / f"eval-{name}"
        outputs.append(run_cmd([PYTHON, "-m", "explainer.evaluate", "--config", "configs/synthetic.yaml",
                                f"data.manifest={manifest}", "--checkpoint", str(resumed / "explainer.pt"),
                                "--classifier", str(tiny_classifier), "--methods", "explainer", "--out", str(out),
                                "--no-progress", "data.image_size=32", "data.batch_size=8", "data.num_workers=0",
                                "eval.faithfulness_steps=0"]))
        results[name] = json.loads((out / "results.json").read_text())
    for key in ("n_images", "key_checksum", "segmentation", "class_specific", "classification", "scored"):
        assert results["bucket"][key] == results["local"][key], key
    assert results["bucket"]["settings"]["manifest"] == bucket_manifest

    assert s3.signed > 0  # the processes signed their requests with the environment's key
    for folder in (resumed, tmp_path / "eval-bucket"):
        _no_secret_in(folder, *(o.stdout + o.stderr for o in outputs))
    for name in ("manifest.json", ".progress/train-000000.tar.json"):
        assert PLANTED_SECRET.encode() not in remote.fetch(f"s3://{BUCKET}/syn/{name}", remote.RemotePolicy())


def test_http_shards_are_read_with_the_standard_library(s3, tmp_path):
    """A local manifest listing http URLs (allowed): read with urllib through the same chunked reader, also from a
    server that ignores byte ranges (Python's own), giving the local samples."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    import s3fs

    served, listed = tmp_path / "served", tmp_path / "listed"
    s3fs.S3FileSystem().get(f"{BUCKET}/syn/", str(served), recursive=True)
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a: None
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        raw = json.loads((served / "manifest.json").read_text())
        for info in raw["splits"].values():
            for entry in info["shards"]:
                entry["path"] = f"http://127.0.0.1:{server.server_address[1]}/{entry['path']}"
                del entry["size"]  # unknown: a HEAD gives it
        listed.mkdir()
        (listed / "manifest.json").write_text(json.dumps(raw))
        m = read_manifest(listed / "manifest.json", allow_url_schemes=["http"])
        got = [s["__key__"] for s in iter_samples(m, "train")]
        assert got == [s["__key__"] for s in iter_samples(read_manifest(served / "manifest.json"), "train")]
        shard = m.splits["train"].shards[0]  # several ranged requests, which this server answers in full
        stream = remote.open_url(shard, remote.RemotePolicy(chunk=30000))
        assert stream.read() == (served / "train-000000.tar").read_bytes()
    finally:
        server.shutdown()
        server.server_close()


def test_remote_settings_are_checked_and_reach_the_policy():
    from explainer.config import ConfigError, ExplainerRunConfig, load_config

    for bad, key in (("data.remote_timeout_s=0", "data.remote_timeout_s"), ("data.remote_retries=-1",
                                                                               "data.remote_retries"),
                     ("data.on_bad_shard=halt", "data.on_bad_shard")):
        with pytest.raises(ConfigError, match=key):
            load_config(ExplainerRunConfig, None, [bad])
    assert load_config(ExplainerRunConfig, None, []).data.on_bad_shard == "skip"  # a bad shard stops nothing unasked
    cfg = load_config(ExplainerRunConfig, None, ["data.remote_timeout_s=7.5", "data.remote_retries=2"])
    policy = remote.policy_of(cfg.data)
    assert (policy.timeout, policy.retries) == (7.5, 2)
