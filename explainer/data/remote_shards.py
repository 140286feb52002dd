"""`explainer make-shards ... --out s3://bucket/prefix`: shards written locally, uploaded whole, manifest last.

Each shard is written into a local staging folder exactly as for a local --out (same bytes, same fingerprints), then
uploaded in one atomic PUT by a thread of the main process while the workers write the next shards (so the staging
folder holds only the shards in flight), then its record `.progress/<name>.json` (fingerprint, count, size, sha256,
and the version the store gave the uploaded object: S3's ETag, GCS's generation) is written next to it in the bucket.
A reader never sees half a shard, and a record only exists for a complete one. `--resume` keeps the shards whose
record matches the plan and whose object has the recorded size and version (an object written again since, by
anyone, is uploaded again: its bytes may no longer be those the sha256 describes). The manifest, with
every shard's size and sha256, is written last, after every upload succeeded; an older manifest is removed first, so
nobody pairs it with new shards. A shard that cannot be uploaded after the retries stops the run (exit 1, the others
stay in the bucket: rerun with --resume); without --strict the other shards are written and uploaded first.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_all
from dataclasses import asdict
from pathlib import Path
from typing import Any

from explainer.data import remote
from explainer.data.shards import MANIFEST_NAME, PROGRESS_DIR, Problem, ShardJob, ShardResult
from explainer.logs import get_logger

log = get_logger(__name__)


class UploadError(RuntimeError):
    """Shards that could not be uploaded after the retries; the message names each and the way on."""


def check_out_url(url: str, policy: remote.RemotePolicy) -> None:
    """A usable --out URL: no credentials in it, a protocol whose fsspec backend is installed. Raises ValueError."""
    secret = remote.credentials_in(url)
    if secret:
        raise ValueError(f"--out {url} carries {secret}; credentials come from the environment or the storage tool's "
                         "config (e.g. AWS_ACCESS_KEY_ID, ~/.aws), never from the command line")
    proto = remote.protocols(url)[0]
    if proto in remote.HTTP or not remote.known_protocol(proto):
        raise ValueError(f"--out {url}: cannot write to {proto!r} URLs (object stores such as s3://, gs://, az://, "
                         "or another fsspec protocol that can write)")
    try:
        remote.filesystem(url, policy)
    except remote.RemoteError as exc:
        raise ValueError(f"--out {exc}") from None


class BucketSink:
    """The `ShardOptions.sink` of a run whose --out is a URL (see the module docstring)."""

    def __init__(self, url: str, staging: Path, policy: remote.RemotePolicy, *, strict: bool = False,
                 uploads: int = 4):
        self.url = url.rstrip("/")
        self.staging = staging
        self.policy = policy
        self.strict = strict
        self._pool = ThreadPoolExecutor(uploads, thread_name_prefix="shard-upload")
        self._uploads: dict[str, Future] = {}
        self._sha256: dict[str, str] = {}
        self.lock: Any = None  # the staging folder's lock file (bucket_sink), released by close()

    def _at(self, name: str) -> str:
        return f"{self.url}/{name}"

    def completed(self, jobs: list[ShardJob]) -> dict[str, ShardResult]:
        """Shards of this plan already complete in the bucket: a matching record, and the object of its size and,
        where the record and the listing both have one, of its version."""
        found = remote.listing_details(self.url, self.policy) or {}
        names = [job.name for job in jobs if f"{PROGRESS_DIR}/{job.name}.json" in found]
        raw = dict(zip(names, self._pool.map(
            lambda n: remote.fetch(self._at(f"{PROGRESS_DIR}/{n}.json"), self.policy), names)))
        done: dict[str, ShardResult] = {}
        for job in jobs:
            record = _record(raw.get(job.name))
            if record is None or record[0].fingerprint != job.fingerprint:
                continue
            result, sha, version = record
            if result.count == 0 and job.name not in found:
                done[job.name] = result
            elif _same_object(found.get(job.name), result.size, version):
                done[job.name] = result
                self._sha256[job.name] = sha
        return done

    def add(self, result: ShardResult) -> None:
        """A shard finished in the staging folder: upload it in the background. With --strict, an earlier failed
        upload stops the run here."""
        if self.strict:
            failed = [name for name, fut in self._uploads.items() if fut.done() and fut.exception() is not None]
            if failed:
                self._raise(failed)
        self._uploads[result.name] = self._pool.submit(self._publish, result)

    def _publish(self, result: ShardResult) -> None:
        local = self.staging / result.name
        record = asdict(result)
        if result.count:
            record["sha256"] = remote.sha256_of(local)
            remote.upload_file(local, self._at(result.name), self.policy)
            record["version"] = remote.object_version(self._at(result.name), self.policy)
            local.unlink()
            self._sha256[result.name] = record["sha256"]
        else:  # every input of this shard was bad: no object (one from an earlier run goes)
            remote.delete(self._at(result.name), self.policy)
        remote.write_bytes(self._at(f"{PROGRESS_DIR}/{result.name}.json"), json.dumps(record).encode(), self.policy)

    def _raise(self, failed: list[str]) -> None:
        lines = "\n".join(f"  {name}: {self._uploads[name].exception()}" for name in failed)
        raise UploadError(f"{len(failed)} shard(s) could not be uploaded to {self.url}:\n{lines}\nthe complete ones "
                          "are in the bucket: rerun the same command with --resume to upload the rest")

    def begin(self) -> None:
        """Before anything is written: the old manifest goes, so no reader pairs it with the new shards."""
        remote.delete(self._at(MANIFEST_NAME), self.policy)

    def finish(self, manifest: dict[str, Any]) -> None:
        """After the local manifest: wait for the uploads, remove shards of an earlier bigger run, add each shard's
        size and sha256 to the manifest, upload it."""
        wait_all(list(self._uploads.values()))
        failed = [name for name, fut in self._uploads.items() if fut.exception() is not None]
        if failed:
            self._raise(failed)
        self._pool.shutdown()
        listed = {entry["path"] for info in manifest["splits"].values() for entry in info["shards"]}
        found = remote.listing(self.url, self.policy) or {}
        for split in manifest["splits"]:
            for name in found:
                if name.startswith(f"{split}-") and name.endswith(".tar") and "/" not in name and name not in listed:
                    remote.delete(self._at(name), self.policy)
                    remote.delete(self._at(f"{PROGRESS_DIR}/{name}.json"), self.policy)
        for info in manifest["splits"].values():
            for entry in info["shards"]:
                entry["size"] = found.get(entry["path"])
                entry["sha256"] = self._sha256.get(entry["path"])
        remote.write_bytes(self._at(MANIFEST_NAME), (json.dumps(manifest, indent=1) + "\n").encode(), self.policy)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        shutil.rmtree(self.staging, ignore_errors=True)
        if self.lock is not None:
            self.lock.close()  # releases the staging folder's lock


def _same_object(info: dict[str, Any] | None, size: int, version: str | None) -> bool:
    """The listed object is the one a record describes: its size, and its version where both sides know it."""
    if info is None or size <= 0 or int(info.get("size") or 0) != size:
        return False
    listed = remote.version_tag(info)
    return version is None or listed is None or listed == version


def _record(data: bytes | None) -> tuple[ShardResult, str | None, str | None] | None:
    if data is None:
        return None
    try:
        raw = json.loads(data)
        sha, version = raw.pop("sha256", None), raw.pop("version", None)
        result = ShardResult(**{**raw, "skipped": [Problem(**p) for p in raw["skipped"]],
                                "warnings": [Problem(**p) for p in raw["warnings"]]})
    except (ValueError, TypeError, KeyError):
        return None
    return result, sha, version


def bucket_sink(url: str, policy: remote.RemotePolicy, strict: bool) -> BucketSink:
    """A sink with an empty staging folder under TMPDIR, named after the URL: the same for a rerun, so that inputs
    made in it (the synthetic source images) have the same paths and the --resume fingerprints match; `close()`
    removes it."""
    name = hashlib.sha1(url.rstrip("/").encode()).hexdigest()[:16]
    staging = Path(tempfile.gettempdir()) / f"explainer-make-shards-{name}"
    lock = open(staging.with_suffix(".lock"), "a+b")  # noqa: SIM115 - held until close()
    try:  # a second make-shards into the same URL would empty this one's staging folder under it
        fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        raise ValueError(f"--out {url}: another make-shards on this machine is writing there (staging folder "
                         f"{staging}); wait for it, or write elsewhere") from None
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    sink = BucketSink(url, staging, policy, strict=strict)
    sink.lock = lock
    return sink
