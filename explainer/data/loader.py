"""Streaming batches from the shards, split exactly across ranks AND DataLoader workers.

Design (train mode, one epoch):

* The manifest gives every shard's sample count (and which positions are unlabelled, so dropping them is exact).
  Per epoch the shard order is a permutation seeded by (seed, epoch), identical on every rank without communication.
  Concatenating the shards' kept samples in that order gives one "line" of N samples.
* Every rank gets P = floor(N / (world_size * batch_size)) * batch_size samples: rank r owns [r*P, (r+1)*P) of the
  line. So ranks are disjoint, every rank yields exactly P / batch_size batches (no DDP hang with uneven shards), and
  the few dropped samples at the end of the line change every epoch with the shard order.
* A rank's batches j = 0, 1, ... are dealt round-robin to its K DataLoader workers (batch j is made by worker j % K,
  which is the order torch's DataLoader collects them in). Worker w owns one contiguous block of the rank's range,
  sized by its number of batches; it opens only the shards overlapping that block and skips to its first sample.
  Inside the block a shuffle buffer seeded by (seed, epoch, rank, worker) mixes samples, then they are decoded,
  resized, normalised and batched in the worker. Batches carry their index and are re-ordered in the main process,
  so the sequence of batches is a deterministic function of (seed, epoch, world size, workers, batch size).
* Ranks and workers are computed here, from the `rank`/`world_size` arguments and torch's worker info - never from
  environment variables, and never by webdataset's node/worker splitters or accelerate's dataloader re-sharding (keep
  this loader out of `accelerator.prepare()` and move batches to the device yourself).
* `skip(n)` (mid-epoch resume) makes the next iteration start after batch n: each worker drops its first batches'
  samples before decoding them, so the remaining batches equal those of an uninterrupted epoch.
* DataLoader workers persist across epochs (a spawned worker costs seconds); `set_epoch`/`skip` are handed to them
  through shared memory when `iter()` is called.
* A corrupt member (undecodable image, bad JSON) is skipped with a logged warning and counted in `corrupt_samples`
  (what was skipped, and shards holding more samples than the manifest lists, in `problems`);
  a worker that runs short (corrupt or truncated data) pads its last batches with repeats of samples it already
  produced, so the batch count stays exact.
* A shard not read whole (unreadable, ended early, a URL shard whose sha256 differs from the manifest's) is also a
  bad shard in `bad_shards` (shard, why): with data.on_bad_shard=stop the trainer and evaluate stop on every rank
  alike (BadShardError); the stream itself never raises for it, so ranks stay in step.

Eval mode: the line is the manifest order (optionally cut to `max_images`); rank r owns [r*N/W, (r+1)*N/W), each
sample exactly once over all ranks and workers; workers and batches as above without shuffling, so the order is fixed
for a given world size, worker count and batch size (with 0 or 1 worker: manifest order). A rank's last batch may be
short; corrupt samples are left out. Batches add the segmentation ground truth at model resolution (nearest resize):
`seg` in {0, 1, 255}, `seg_classes` (0 bg, k+1 class k, 255 void), `has_seg`, and `orig_size` [B, 2] (W, H);
`objects`: per image its annotated boxes [n, 6] (class, xmin, ymin, xmax, ymax, difficult) or None.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import json
import logging
import math
import random
import re
import zlib
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_expander

from explainer.data import remote
from explainer.data.transforms import (
    DEFAULT_MAX_IMAGE_PIXELS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    RESIZE_MODES,
    decode_rgb,
    decode_seg,
    mean_fill,
    normalize_batch,
    seg_to_binary,
    stack_images,
)
from explainer.run_errors import InputError, RunError

log = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "png", "jpeg", "webp", "bmp", "gif", "tiff")
IMAGE_FORMATS = ("float", "uint8")


class ManifestError(InputError):
    """A manifest that cannot be used; the message names the file (a ValueError, exit status 2)."""


class BadShardError(RunError):
    """data.on_bad_shard=stop and a shard could not be read whole (unreadable, ended early, checksum mismatch): the
    message names each shard and why (exit status 1). Raised by the trainer and evaluate on every rank alike."""


def bad_shard_error(bad: Iterable[tuple[str, str]], where: str) -> BadShardError:
    """The error for the (shard, reason) pairs the loaders met (all ranks'), each shard named once."""
    first: dict[str, str] = {}
    for url, reason in bad:
        first.setdefault(url, reason)
    listed = "; ".join(f"{url}: {reason}" for url, reason in first.items())
    return BadShardError(f"data.on_bad_shard=stop: {len(first)} bad shard(s) {where}: {listed} (data.on_bad_shard="
                         "skip reads on without them, counting their samples as skipped)")


@dataclass
class SplitInfo:
    shards: list[str]  # absolute paths or URLs
    counts: list[int]
    total: int
    unlabelled: list[list[int]] = field(default_factory=list)  # per shard: positions of all-zero-label samples
    sizes: list[int | None] = field(default_factory=list)  # per shard: bytes, when known (URL shards: saves a HEAD)
    sha256: list[str | None] = field(default_factory=list)  # per shard: checksum (make-shards --out URL writes it)

    def kept_counts(self, drop_unlabelled: bool) -> list[int]:
        if not drop_unlabelled or not self.unlabelled:
            return list(self.counts)
        return [c - len(u) for c, u in zip(self.counts, self.unlabelled)]


@dataclass
class Manifest:
    path: Path | str  # a str for a manifest at a URL
    dataset: str
    classes: list[str]
    splits: dict[str, SplitInfo]
    raw: dict[str, Any] = field(default_factory=dict, repr=False)  # the whole JSON (synthetic spec, skipped, ...)


def _scheme(text: str) -> str | None:
    return remote.scheme(text)


def _check_allowed_schemes(allow_url_schemes: Sequence[str]) -> set[str]:
    allowed = {s.lower().rstrip(":/") for s in allow_url_schemes}
    if "pipe" in allowed:
        raise ManifestError("data.allow_url_schemes: pipe cannot be allowed (a 'pipe:' shard would run a shell "
                            "command: download the shards and point the manifest at the files instead)")
    unknown = sorted(s for s in allowed if not remote.known_protocol(s))
    if unknown:
        raise ManifestError(f"data.allow_url_schemes: {', '.join(unknown)} cannot be allowed: not a protocol fsspec "
                            "knows (e.g. s3, gs, az, https)")
    return allowed


def _resolve_url(manifest: Path | str, entry: str, where: str, allowed: set[str], allow_external_shards: bool) -> str:
    """An entry that is a URL: its protocols allowed, no credentials in it, inside a URL manifest's folder."""
    scheme = remote.scheme(entry)
    if scheme == "pipe":
        raise ManifestError(f"{where} is a shell command ('pipe:'), which a manifest may never run; download the "
                            "shards and list their file names instead")
    secret = remote.credentials_in(entry)
    if secret:
        raise ManifestError(f"{where} carries {secret}; credentials come from the environment or the storage "
                            "tool's config (e.g. AWS_ACCESS_KEY_ID, ~/.aws), never from a manifest")
    for proto in remote.protocols(entry):
        if proto not in allowed:
            if not remote.known_protocol(proto):
                raise ManifestError(f"{where} has the unsupported scheme {proto!r}: a shard must be a file next to "
                                    "the manifest (or a URL of a protocol listed in data.allow_url_schemes)")
            raise ManifestError(f"{where} is an {proto} URL; reading shards over the network is off by default "
                                f"(allow it with data.allow_url_schemes=[{proto}])")
    if remote.is_url(str(manifest)) and not allow_external_shards:
        base = remote.folder(str(manifest))
        if not remote.inside(base, entry):
            raise ManifestError(f"{where} is outside the manifest's folder {base}; shards must live in the "
                                "manifest's folder unless you allow others with data.allow_external_shards=true")
    return entry


def resolve_shard(manifest: Path | str, entry: str, split: str, *, allow_external_shards: bool = False,
                  allow_url_schemes: Sequence[str] = ()) -> str:
    """The absolute path (or URL) of one shard listed in `manifest`, or a ManifestError naming both.

    A manifest usually comes with a downloaded shard set, so it is data, not code: a shard must be a file inside the
    manifest's folder (after following symlinks), or for a manifest at a URL (s3://bucket/x/manifest.json) an object
    under that URL's folder. Absolute paths and paths leading out of the folder need data.allow_external_shards=true;
    URLs in a manifest need their protocol in data.allow_url_schemes (a URL manifest's own relative shards do not);
    'pipe:' is refused whatever is allowed, because webdataset would hand it to a shell.
    """
    where = f"manifest {manifest}: shard {entry!r} of split {split!r}"
    allowed = _check_allowed_schemes(allow_url_schemes)
    if remote.scheme(entry) is not None:
        return _resolve_url(manifest, entry, where, allowed, allow_external_shards)
    if remote.is_url(str(manifest)):
        base = remote.folder(str(manifest))
        full_url = remote.join(base, entry)
        if Path(entry).is_absolute() or not remote.inside(base, full_url):
            if not allow_external_shards:
                kind = "an absolute path" if Path(entry).is_absolute() else f"outside the manifest's folder {base}"
                raise ManifestError(f"{where} is {kind}; shards must live in the manifest's folder unless you allow "
                                    "others with data.allow_external_shards=true")
            if Path(entry).is_absolute():
                return str(Path(entry).resolve())
        return full_url
    folder = Path(manifest).parent.resolve()
    full = (folder / entry).resolve()
    if not allow_external_shards and not full.is_relative_to(folder):
        kind = "an absolute path" if Path(entry).is_absolute() else f"outside the manifest's folder {folder}"
        raise ManifestError(f"{where} is {kind} (it resolves to {full}); shards must live in the manifest's folder "
                            "unless you allow others with data.allow_external_shards=true")
    if not full.is_file():
        raise ManifestError(f"{where} does not exist ({full})")
    return str(full)


def _manifest_text(path: Path | str, policy: remote.RemotePolicy) -> str:
    """The manifest's JSON text, from a file or a URL (whose protocol the config chose: data.manifest)."""
    if not remote.is_url(str(path)):
        return Path(path).read_text()
    secret = remote.credentials_in(str(path))
    if secret:
        raise ManifestError(f"manifest {path} carries {secret}; credentials come from the environment or the storage "
                            "tool's config (e.g. AWS_ACCESS_KEY_ID, ~/.aws), never from a config")
    if remote.scheme(str(path)) == "pipe":
        raise ManifestError(f"manifest {path} is a shell command ('pipe:'), which is never run")
    return remote.fetch(str(path), policy).decode()


def read_manifest(path: str | Path, *, allow_external_shards: bool = False,
                  allow_url_schemes: Sequence[str] = (), remote_policy: remote.RemotePolicy | None = None) -> Manifest:
    """Load and check a manifest.json written by launch/make_shards.py (a path or a URL such as
    s3://bucket/x/manifest.json); every shard goes through resolve_shard."""
    path = path if remote.is_url(str(path)) else Path(path)
    policy = remote_policy or remote.RemotePolicy()
    _check_allowed_schemes(allow_url_schemes)
    try:
        raw = json.loads(_manifest_text(path, policy))
    except FileNotFoundError:
        raise ManifestError(f"manifest {path} does not exist (build shards with launch/make_shards.py)") from None
    except remote.RemoteError as exc:
        raise ManifestError(f"manifest {path} cannot be read ({exc})") from None
    except (OSError, ValueError) as exc:
        raise ManifestError(f"manifest {path} cannot be read as JSON ({exc})") from None
    try:
        classes = [str(c) for c in raw["classes"]]
        splits = {}
        for name, info in raw["splits"].items():
            shards, counts, unlabelled, sizes, sha256 = [], [], [], [], []
            for entry in info["shards"]:
                rel = str(entry["path"])
                url = resolve_shard(path, rel, name, allow_external_shards=allow_external_shards,
                                    allow_url_schemes=allow_url_schemes)
                count = int(entry["count"])
                if count < 0:
                    raise ManifestError(f"manifest {path}: shard {rel} has a negative count")
                shards.append(url)
                counts.append(count)
                unlabelled.append([int(i) for i in entry.get("unlabelled", [])])
                sizes.append(int(entry["size"]) if entry.get("size") is not None else None)
                sha256.append(_checksum_of(path, rel, entry.get("sha256")))
            _refuse_repeats(path, name, shards)
            splits[name] = SplitInfo(shards=shards, counts=counts, total=sum(counts), unlabelled=unlabelled,
                                     sizes=sizes, sha256=sha256)
        dataset = str(raw.get("dataset", Path(str(path)).parent.name))
        _warn_shared(path, splits)
    except ManifestError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ManifestError(f"manifest {path} lacks the expected structure ({type(exc).__name__}: {exc})") from None
    if isinstance(path, str):
        _check_remote_shards(path, splits, policy)
    return Manifest(path=path, dataset=dataset, classes=classes, splits=splits, raw=raw)


def _checksum_of(path: str | Path, entry: str, value: Any) -> str | None:
    """A manifest entry's sha256 (64 hex digits) or None; anything else is a broken manifest, not a bad shard."""
    if value is None:
        return None
    if not isinstance(value, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", value):
        raise ManifestError(f"manifest {path}: shard {entry} has the sha256 {value!r}, not 64 hex digits")
    return value.lower()


def _refuse_repeats(path: str | Path, split: str, shards: Sequence[str]) -> None:
    """A shard listed twice in a split (by any spelling of its path) would be trained on twice per epoch and its
    images evaluated twice: the manifest is wrong, not the data."""
    seen: set[str] = set()
    for shard in shards:
        if shard in seen:
            raise ManifestError(f"manifest {path}: split {split!r} lists the shard {shard} more than once; list each "
                                "shard once")
        seen.add(shard)


def _warn_shared(path: str | Path, splits: dict[str, SplitInfo]) -> None:
    """A shard in two splits (train and test) is allowed, but rarely meant: the test images were trained on."""
    owner: dict[str, str] = {}
    for name, info in splits.items():
        for shard in info.shards:
            if owner.setdefault(shard, name) != name:
                log.warning("manifest %s: shard %s is in split %r and in split %r", path, shard, owner[shard], name)


def _check_remote_shards(path: str, splits: dict[str, SplitInfo], policy: remote.RemotePolicy) -> None:
    """Every shard under a URL manifest's folder exists, with the size the manifest gives: one listing of the
    folder, so a missing or half-uploaded shard fails here, before any process group starts (not for http)."""
    base = remote.folder(path)
    try:
        found = remote.listing(base, policy)
    except PermissionError as exc:  # credentials that may read objects but not list them: checked when read
        log.warning("manifest %s: cannot list its folder to check the shards (%s); a missing shard will be reported "
                    "when it is read", path, exc)
        return
    except OSError as exc:
        raise ManifestError(f"manifest {path}: cannot list its folder ({exc})") from None
    if found is None:
        return
    for name, info in splits.items():
        for i, url in enumerate(info.shards):
            if not remote.inside(base, url):
                continue
            size = found.get(url[len(base.rstrip("/")) + 1:])
            if size is None:
                raise ManifestError(f"manifest {path}: shard {url} of split {name!r} does not exist")
            if info.sizes[i] is not None and info.sizes[i] != size:
                raise ManifestError(f"manifest {path}: shard {url} of split {name!r} is {size} bytes, the manifest "
                                    f"says {info.sizes[i]} (an upload in progress, or another shard set)")
            info.sizes[i] = size


def shard_permissions(dcfg: Any) -> dict[str, Any]:
    """read_manifest's permission arguments from a DataConfig (off for configs that predate them)."""
    return {"allow_external_shards": bool(getattr(dcfg, "allow_external_shards", False)),
            "allow_url_schemes": tuple(getattr(dcfg, "allow_url_schemes", ()) or ())}


def read_data_manifest(dcfg: Any) -> Manifest:
    """read_manifest(dcfg.manifest) with the shard-location permissions and URL timeouts of a DataConfig."""
    return read_data_manifest_at(dcfg, dcfg.manifest)


def read_data_manifest_at(dcfg: Any, path: str | Path) -> Manifest:
    """read_manifest(path) with the permissions and URL timeouts of a DataConfig."""
    return read_manifest(path, **shard_permissions(dcfg), remote_policy=remote.policy_of(dcfg))


def manifest_from_urls(urls: str | Sequence[str], split: str = "train",
                       classes: Sequence[str] | None = None, allow_url_schemes: Sequence[str] = ()) -> Manifest:
    """A Manifest for shards given as (brace-expanded) paths/URLs: reads each shard once to count its samples.

    The caller names the shards itself, so any local path is accepted; URLs follow the same rules as in a manifest.
    """
    import braceexpand

    if isinstance(urls, str):
        urls = list(braceexpand.braceexpand(urls))
    allowed = _check_allowed_schemes(allow_url_schemes)
    counts, unlabelled, shards = [], [], []
    num_classes = None
    for url in urls:
        scheme = _scheme(url)
        if scheme is not None and (scheme not in allowed or remote.credentials_in(url)):
            raise ManifestError(f"shard {url!r}: the scheme {scheme!r} is not allowed (only files, or URLs of the "
                                "protocols in allow_url_schemes, without credentials; 'pipe:' would run a shell "
                                "command)")
        full = url if scheme is not None else str(Path(url).resolve())
        n, zero = 0, []
        for sample in _iter_shard(full):
            try:
                labels = json.loads(sample["json"])["labels"]
                num_classes = num_classes or len(labels)
                if not any(labels):
                    zero.append(n)
            except (KeyError, ValueError, TypeError):
                pass
            n += 1
        shards.append(full)
        counts.append(n)
        unlabelled.append(zero)
    names = list(classes) if classes is not None else [f"class_{i}" for i in range(num_classes or 0)]
    info = SplitInfo(shards=shards, counts=counts, total=sum(counts), unlabelled=unlabelled)
    first = str(urls[0]) if urls else "."
    return Manifest(path=first if remote.is_url(first) else Path(first), dataset="shards", classes=names,
                    splits={split: info})


# ----------------------------------------------------------------------------------------------------------------------
# Reading shards
# ----------------------------------------------------------------------------------------------------------------------


class _Counter:
    """Per-worker problem counter (reported to the main process inside batches)."""

    def __init__(self) -> None:
        self.n = 0
        self.notes: list[str] = []  # what was skipped or looked wrong, for the evaluation's results
        self.bad: list[tuple[str, str]] = []  # (shard, why): shards not read whole (data.on_bad_shard)
        self._taken = 0

    def take(self) -> dict[str, Any]:
        """What a batch hands to the main process: the problems since the last batch."""
        out = {"_corrupt": self.n - self._taken, "_notes": self.notes, "_bad": self.bad}
        self._taken, self.notes, self.bad = self.n, [], []
        return out

    def handler(self, exc: Exception, url: str = "?") -> bool:
        """A shard that cannot be opened or read on (404, truncated tar): noted and logged with the shard's name.
        Not counted here: the samples it loses are counted once the shard ends short of the manifest's count."""
        reason = str(exc.args[0]) if len(exc.args) > 1 else str(exc)  # webdataset appends (stream, url) to args
        reason = reason.split(" @ <")[0]  # and the stream's repr to the message
        # explainer.data.remote's errors already name the URL and the error type: said once here
        reason = reason.removeprefix(f"{url}: ").removeprefix(f"{type(exc).__name__}: ")
        why = type(exc).__name__ + (f": {reason}" if reason else "")
        note = f"unreadable data in shard {url} skipped: {why}"
        self.notes.append(note)
        self.bad.append((url, why))
        log.warning("%s", note)
        return True


def _open(url: str):
    """A shard as a byte stream: a plain file, or a URL (which read_manifest allowed) through explainer.data.remote:
    timeouts, retries, chunks fetched ahead. Never webdataset's gopen: it runs 'pipe:' URLs in a shell and hands other
    schemes to curl/aws/gsutil commands."""
    if _scheme(url) is None:
        return open(url, "rb")  # noqa: SIM115 - closed by the caller's generator
    if _scheme(url) == "pipe":
        raise ManifestError(f"shard {url!r}: 'pipe:' is never opened")
    return remote.open_url(url, remote.RemotePolicy())


def _iter_shard(url: str, counter: _Counter | None = None, opener: Any = None) -> Iterator[dict[str, Any]]:
    """Samples of one shard (dicts of raw member bytes), via webdataset's tar iterators."""
    counter = counter or _Counter()
    handler = functools.partial(counter.handler, url=url)
    try:
        stream = (opener or _open)(url)
    except OSError as exc:
        handler(exc)
        return
    try:
        files = tar_file_expander([{"url": url, "stream": stream}], handler=handler)
        yield from group_by_keys(files, handler=handler)
    finally:
        stream.close()


@dataclass(frozen=True)
class _Piece:
    """Kept samples [start, stop) (positions in the shard's kept list) of one shard."""

    shard: int
    start: int
    stop: int


def _pieces(order: Sequence[int], kept: Sequence[int], start: int, stop: int) -> list[_Piece]:
    """The parts of the line [start, stop) as pieces of shards, given the shard order and kept counts."""
    out, pos = [], 0
    for s in order:
        a, b = max(start, pos), min(stop, pos + kept[s])
        if a < b:
            out.append(_Piece(int(s), a - pos, b - pos))
        pos += kept[s]
        if pos >= stop:
            break
    return out


def _round_robin_blocks(n_batches: int, num_workers: int) -> list[tuple[int, int]]:
    """Per worker (first batch of its contiguous block, number of batches) when batch j goes to worker j % K."""
    counts = [len(range(w, n_batches, num_workers)) for w in range(num_workers)]
    starts = [sum(counts[:w]) for w in range(num_workers)]
    return list(zip(starts, counts))


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def _shuffled(items: Iterator[Any], bufsize: int, rng: random.Random) -> Iterator[Any]:
    buf: list[Any] = []
    for item in items:
        if len(buf) < bufsize:
            buf.append(item)
            continue
        i = rng.randrange(len(buf))
        yield buf[i]
        buf[i] = item
    rng.shuffle(buf)
    yield from buf


def _image_bytes(sample: dict[str, Any]) -> bytes:
    for key in IMAGE_KEYS:
        if key in sample:
            return sample[key]
    raise KeyError(f"no image member (one of {', '.join(IMAGE_KEYS)})")


# ----------------------------------------------------------------------------------------------------------------------
# The worker-side dataset
# ----------------------------------------------------------------------------------------------------------------------


class _ShardStream(IterableDataset):
    """One rank's part of an epoch; each DataLoader worker computes and reads its own block (see module docstring)."""

    def __init__(self, info: SplitInfo, *, num_classes: int, image_size: int, batch_size: int, rank: int,
                 world_size: int, train: bool, seed: int, drop_unlabelled: bool, shuffle_buffer: int,
                 augment: bool, max_images: int | None, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, resize: str = "squash") -> None:
        super().__init__()
        self.info = info
        self.mean, self.std = tuple(mean), tuple(std)  # the classifier's input normalisation
        if resize not in RESIZE_MODES:
            raise ValueError(f"data.resize must be one of {RESIZE_MODES}, got {resize!r}")
        self.resize, self.fill = resize, mean_fill(mean)  # letterbox pads with the mean colour (0 once normalised)
        self.num_classes = num_classes
        self.image_size = image_size
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.train = train
        self.seed = seed
        self.drop_unlabelled = drop_unlabelled and train
        self.shuffle_buffer = shuffle_buffer
        self.augment = augment and train
        self.kept = info.kept_counts(self.drop_unlabelled)
        total = sum(self.kept)
        if train:
            self.per_rank = (total // (world_size * batch_size)) * batch_size
            self.rank_start = rank * self.per_rank
            self.rank_count = self.per_rank
        else:
            total = total if max_images is None else min(total, max_images)
            self.rank_start = rank * total // world_size
            self.rank_count = (rank + 1) * total // world_size - self.rank_start
        self.num_batches = self.rank_count // batch_size if train else math.ceil(self.rank_count / batch_size)
        self.num_workers = 1  # set by the owner before iterating (must equal the DataLoader's)
        self.image_format = "float"  # or "uint8": set by the owner (see make_train_loader)
        self.max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS  # data.max_image_pixels: larger images are skipped
        self.remote = remote.RemotePolicy()  # timeouts and retries of URL shards (data.remote_*)
        self._next_head: remote.ReadAhead | None = None  # the next epoch's first URL shard, being fetched already
        # (epoch, batches to skip): shared memory when DataLoader workers persist across epochs
        self.state: Any = [0, 0]

    @property
    def epoch(self) -> int:
        return int(self.state[0])

    @property
    def skip_batches(self) -> int:
        return int(self.state[1])

    # -- which samples this worker reads -------------------------------------------------------------------------
    def _order(self, epoch: int | None = None) -> list[int]:
        n = len(self.info.shards)
        if not self.train:
            return list(range(n))
        epoch = self.epoch if epoch is None else epoch
        return [int(i) for i in np.random.default_rng([self.seed, epoch]).permutation(n)]

    def _worker_block(self, worker: int) -> tuple[int, int, int]:
        """(first line position, number of samples, number of batches) of this worker.

        Workers' blocks tile the rank's range in worker order; the worker that makes the rank's last batch (eval
        mode, may be short) has its block shortened by the missing samples.
        """
        blocks = _round_robin_blocks(self.num_batches, self.num_workers)
        short = self.num_batches * self.batch_size - self.rank_count  # > 0 only in eval mode
        last_worker = (self.num_batches - 1) % self.num_workers
        sizes = [n * self.batch_size - (short if w == last_worker else 0) for w, (_, n) in enumerate(blocks)]
        start = self.rank_start + sum(sizes[:worker])
        return start, sizes[worker], blocks[worker][1]

    def _piece_samples(self, piece: _Piece, counter: _Counter, opener: Any = None) -> Iterator[dict[str, Any]]:
        zero = set(self.info.unlabelled[piece.shard]) if self.drop_unlabelled and self.info.unlabelled else set()
        kept = 0
        samples = enumerate(_iter_shard(self.info.shards[piece.shard], counter, opener))
        for raw, sample in samples:
            if raw in zero:
                continue
            if kept >= piece.stop:
                return
            if kept >= piece.start:
                if kept + 1 == piece.stop == self.kept[piece.shard]:  # before handing out the shard's last sample
                    self._check_shard_end(samples, zero, piece, counter)
                yield sample
            kept += 1
        missing = piece.stop - max(kept, piece.start)
        if missing > 0:  # truncated or damaged tar: fewer samples than the manifest says
            counter.n += missing
            counter.notes.append(f"shard {self.info.shards[piece.shard]} ended early: {missing} sample(s) missing")
            counter.bad.append((self.info.shards[piece.shard], f"ended early: {missing} sample(s) missing"))
            log.warning("shard %s ended early: %d sample(s) missing from the part this worker reads",
                        self.info.shards[piece.shard], missing)

    def _read_ahead(self, pieces: list[_Piece], worker: int) -> remote.ReadAhead:
        """This worker's URL shards of the epoch, fetched in the background. In training, the first one may already
        be on its way (started near the end of the previous epoch), and once these are all fetched the next epoch's
        first shard is started: no epoch begins by waiting a whole request (and the shuffle buffer's fill) for bytes.
        """
        sizes = dict(zip(self.info.shards, self.info.sizes))
        sha256 = dict(zip(self.info.shards, self.info.sha256))
        head, self._next_head = self._next_head, None
        ahead = remote.ReadAhead([self.info.shards[p.shard] for p in pieces], self.remote, sizes, sha256, head=head)
        if self.train:
            epoch = self.epoch
            ahead.then = lambda: self._start_next_head(worker, epoch + 1, sizes, sha256)
        return ahead

    def _start_next_head(self, worker: int, epoch: int, sizes: dict[str, Any], sha256: dict[str, Any]) -> None:
        """In the fetch thread, once this epoch's shards are fetched: start the first shard of `epoch` for `worker`
        (the same plan as __iter__ will make; if it differs after all, that ReadAhead is dropped unused)."""
        start, count, n_batches = self._worker_block(worker)
        first = _pieces(self._order(epoch), self.kept, start, start + count)[:1] if n_batches else []
        url = self.info.shards[first[0].shard] if first else ""
        if remote.is_url(url):
            stale, self._next_head = self._next_head, remote.ReadAhead([url], self.remote, sizes, sha256).start()
            if stale is not None:  # one the epoch that followed did not take (it began before this was started)
                stale.close()

    def _check_shard_end(self, samples: Iterator[tuple[int, dict[str, Any]]], zero: set[int], piece: _Piece,
                         counter: _Counter) -> None:
        """Warn (and note) when a shard holds more samples than the manifest lists: they would be left out
        silently. Reads one sample past the listed ones, only for the piece that reaches the shard's end."""
        for raw, _ in samples:
            if raw not in zero:
                note = (f"shard {self.info.shards[piece.shard]} holds more samples than the manifest's "
                        f"{self.info.counts[piece.shard]}; only the listed ones are read")
                counter.notes.append(note)
                log.warning("%s", note)
                return

    # -- decoding ------------------------------------------------------------------------------------------------
    def _decode(self, sample: dict[str, Any]) -> dict[str, Any]:
        meta = json.loads(sample["json"])
        labels = np.asarray(meta["labels"], dtype=np.float32)
        if labels.shape != (self.num_classes,):
            raise ValueError(f"labels have {labels.shape[0] if labels.ndim else 0} entries, "
                             f"the manifest has {self.num_classes} classes")
        image = decode_rgb(_image_bytes(sample), self.image_size, self.resize, self.fill, max_pixels=self.max_pixels)
        out = {"key": sample["__key__"], "labels": labels, "image": image}
        if not self.train:
            if "seg.png" in sample:
                out["seg_classes"] = decode_seg(sample["seg.png"], self.image_size, self.resize,
                                                max_pixels=self.max_pixels)
            size = meta.get("orig_size", [0, 0])
            out["orig_size"] = np.asarray(size, dtype=np.int64)
            if "objects" in meta:
                out["objects"] = np.asarray(meta["objects"], dtype=np.int64).reshape(-1, 6)
        return out

    def _draw(self, key: str) -> float:
        """A uniform number in [0, 1) per (seed, epoch, sample): which of its classes the class-specific loss term
        uses (explainer/losses.py:draw_class). A function of the sample, not of the batch, the rank or an RNG state,
        so N processes draw what one process draws, a resumed epoch what the uninterrupted one drew, and every
        validation the same."""
        return _seed(self.seed, self.epoch, zlib.crc32(key.encode()), 3) / 2**32

    def _collate(self, items: list[dict[str, Any]], index: int, rng: random.Random | None) -> dict:
        images = [it["image"] for it in items]
        if rng is not None:
            images = [im[:, ::-1] if rng.random() < 0.5 else im for im in images]
        # in a DataLoader worker, or when the batch goes to the device as uint8: uint8 images, finished by the main
        # process (`_Stream._finish`); same values either way
        as_u8 = get_worker_info() is not None or self.image_format == "uint8"
        batch: dict[str, Any] = {
            "image_u8" if as_u8 else "image": (stack_images(images) if as_u8
                                                else normalize_batch(images, mean=self.mean, std=self.std)),
            "labels": torch.from_numpy(np.stack([it["labels"] for it in items])),
            "key": [it["key"] for it in items],
            "draw": torch.tensor([self._draw(it["key"]) for it in items], dtype=torch.float32),
            "_index": index,
        }
        if not self.train:
            size = self.image_size
            seg_classes = np.zeros((len(items), size, size), np.uint8)
            has_seg = np.zeros(len(items), bool)
            for i, it in enumerate(items):
                if "seg_classes" in it:
                    seg_classes[i] = it["seg_classes"]
                    has_seg[i] = True
            batch["seg_classes"] = torch.from_numpy(seg_classes)
            batch["seg"] = torch.from_numpy(seg_to_binary(seg_classes))
            batch["has_seg"] = torch.from_numpy(has_seg)
            batch["orig_size"] = torch.from_numpy(np.stack([it["orig_size"] for it in items]))
            batch["objects"] = [torch.from_numpy(it["objects"]) if "objects" in it else None for it in items]
        return batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        if (info.num_workers if info is not None else 1) != self.num_workers:
            raise RuntimeError("worker count of the DataLoader differs from the one the stream was planned for")
        start, count, n_batches = self._worker_block(worker)
        if n_batches == 0:
            return
        counter = _Counter()
        pieces = _pieces(self._order(), self.kept, start, start + count)
        ahead = self._read_ahead(pieces, worker)  # URL shards: fetched in the background, the next while one decodes
        raw: Iterator[dict[str, Any]] = ahead.closing(itertools.chain.from_iterable(
            self._piece_samples(p, counter, ahead.open) for p in pieces))
        aug_rng = None
        if self.train:
            raw = _shuffled(raw, max(1, min(self.shuffle_buffer, count)),
                            random.Random(_seed(self.seed, self.epoch, self.rank, worker, 1)))
            if self.augment:
                aug_rng = random.Random(_seed(self.seed, self.epoch, self.rank, worker, 2))
        skip = len(range(worker, self.skip_batches, self.num_workers))  # this worker's batches before batch n
        raw = itertools.islice(raw, skip * self.batch_size, None)
        if aug_rng is not None:  # keep the flips of the remaining batches as in an uninterrupted epoch
            for _ in range(skip * self.batch_size):
                aug_rng.random()

        recent: deque[dict[str, Any]] = deque(maxlen=self.batch_size)
        for i in range(skip, n_batches):
            want = self.batch_size if self.train else min(self.batch_size, count - i * self.batch_size)
            items: list[dict[str, Any]] = []
            while len(items) < want:
                sample = next(raw, None)
                if sample is None:
                    break
                try:
                    items.append(self._decode(sample))
                except Exception as exc:
                    counter.n += 1
                    counter.notes.append(f"corrupt sample {sample.get('__key__')} in {sample.get('__url__')} "
                                         f"skipped: {type(exc).__name__}: {exc}")
                    log.warning("skipping corrupt sample %s in %s: %s: %s", sample.get("__key__"),
                                sample.get("__url__"), type(exc).__name__, exc)
                    continue
                recent.append(items[-1])
            if self.train and len(items) < want:  # ran short (corrupt data): keep the batch count exact
                if not items and not recent:
                    raise RuntimeError(f"rank {self.rank} worker {worker}: no readable sample in its shards "
                                       f"{[self.info.shards[p.shard] for p in pieces]}")
                pool = list(recent) or items
                log.warning("rank %d worker %d: padding batch with %d repeated sample(s) after corrupt data",
                            self.rank, worker, want - len(items))
                items += [pool[k % len(pool)] for k in range(want - len(items))]
            index = worker + i * self.num_workers
            problems = counter.take()
            if not items:
                yield {"_index": index, **problems, "_empty": True}
                continue
            yield {**self._collate(items, index, aug_rng), **problems}


# ----------------------------------------------------------------------------------------------------------------------
# Main-process side
# ----------------------------------------------------------------------------------------------------------------------


class _Stream:
    """Common part of train and eval streams: DataLoader over _ShardStream, batches re-ordered by index.

    Workers persist across epochs (a spawned worker costs seconds); epoch and skip reach them through shared memory,
    read when each iteration starts.
    """

    def __init__(self, dataset: _ShardStream, num_workers: int, image_format: str = "float") -> None:
        if image_format not in IMAGE_FORMATS:
            raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
        self.dataset = dataset
        self.num_workers = num_workers
        self.image_format = image_format
        self.dataset.num_workers = max(1, num_workers)
        self.dataset.image_format = image_format
        self.pin_memory = torch.cuda.is_available()
        if num_workers > 0:
            self.dataset.state = torch.multiprocessing.get_context().Array("q", 2)
        self.corrupt_samples = 0
        self.problems: list[str] = []  # notes of the batches handed out so far (see the module docstring)
        self.bad_shards: list[tuple[str, str]] = []  # (shard, why) of those not read whole, so far (on_bad_shard)
        self._loader: DataLoader | None = None

    def __len__(self) -> int:
        return self.dataset.num_batches

    def _finish(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Normalise a worker's uint8 images here (see transforms.stack_images), or, for image_format "uint8", hand
        them on as they are (pinned by the DataLoader when CUDA is there); "image" stays the first key."""
        if "image_u8" not in batch:
            return batch
        images = batch.pop("image_u8")
        image = images if self.image_format == "uint8" else normalize_batch(
            images.numpy(), pin=self.pin_memory, mean=self.dataset.mean, std=self.dataset.std)
        return {"image": image, **batch}

    def _batches(self, first: int) -> Iterator[dict[str, Any]]:
        if self._loader is None:
            self._loader = DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers,
                                      pin_memory=self.pin_memory, persistent_workers=self.num_workers > 0,
                                      prefetch_factor=2 if self.num_workers > 0 else None)
        loader = self._loader
        heap: list[tuple[int, int, dict[str, Any]]] = []
        expected = first
        tie = itertools.count()
        for batch in loader:
            heapq.heappush(heap, (batch["_index"], next(tie), batch))
            while heap and heap[0][0] == expected:
                _, _, ready = heapq.heappop(heap)
                expected += 1
                self.corrupt_samples += ready.pop("_corrupt")
                self.problems += ready.pop("_notes", [])
                self.bad_shards += ready.pop("_bad", [])
                ready.pop("_index")
                if not ready.pop("_empty", False):
                    yield self._finish(ready)
        if heap or expected != self.dataset.num_batches:
            raise RuntimeError(f"loader produced batches up to {expected} of {self.dataset.num_batches} "
                               f"(rank {self.dataset.rank}); a DataLoader worker must have failed")


class TrainStream(_Stream):
    """One epoch of training batches for this rank; `len()` is identical on every rank.

    `set_epoch` and `skip` take effect when `iter()` is called (the values are handed to the workers then), so an
    abandoned iterator of an earlier epoch can never change the next one.
    """

    def __init__(self, dataset: _ShardStream, num_workers: int, image_format: str = "float") -> None:
        super().__init__(dataset, num_workers, image_format)
        self._epoch = 0
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self._epoch = int(epoch)

    def skip(self, n_batches: int) -> None:
        """The next iteration starts after `n_batches` batches (and yields len(self) - n_batches)."""
        if not 0 <= n_batches <= len(self):
            raise ValueError(f"cannot skip {n_batches} batches of an epoch of {len(self)}")
        self._skip = int(n_batches)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        first, self._skip = self._skip, 0
        self.dataset.state[0], self.dataset.state[1] = self._epoch, first
        return self._batches(first)


class EvalStream(_Stream):
    """Evaluation batches of this rank: every sample of the split exactly once over all ranks, fixed order."""

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self._batches(0)


def _split_info(manifest: Manifest, split: str) -> SplitInfo:
    if split not in manifest.splits:
        raise ManifestError(f"manifest {manifest.path} has no split {split!r} (has {', '.join(manifest.splits)})")
    return manifest.splits[split]


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")


def batch_image_format(cfg: Any, device: torch.device | str) -> str:
    """'uint8' when the images should be normalised on `device` (data.normalize_on_device: auto = on CUDA), else
    'float'. uint8 batches: image uint8 [B, H, W, 3], pinned when CUDA is there; finish them with
    transforms.normalize_on_device after the copy."""
    mode = getattr(cfg, "normalize_on_device", "auto")
    return "uint8" if mode == "on" or (mode == "auto" and torch.device(device).type == "cuda") else "float"


def make_train_loader(cfg: Any, manifest: Manifest | str | Path, split: str, *, rank: int, world_size: int,
                      seed: int, drop_unlabelled: bool, image_format: str = "float",
                      mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> TrainStream:
    """Training stream for one rank (see the module docstring); cfg is a DataConfig. image_format "float": image
    float32 [B, 3, H, W] normalised with mean/std (the classifier's; ImageNet's by default); "uint8": see
    batch_image_format (normalise with the same mean/std on the device)."""
    if not isinstance(manifest, Manifest):
        manifest = read_data_manifest_at(cfg, manifest)
    _check_rank(rank, world_size)
    info = _split_info(manifest, split)
    dataset = _ShardStream(info, num_classes=len(manifest.classes), image_size=cfg.image_size,
                           batch_size=cfg.batch_size, rank=rank, world_size=world_size, train=True, seed=seed,
                           drop_unlabelled=drop_unlabelled, shuffle_buffer=cfg.shuffle_buffer, augment=cfg.augment,
                           max_images=None, mean=mean, std=std, resize=getattr(cfg, "resize", "squash"))
    if dataset.num_batches == 0:
        kept = sum(dataset.kept)
        raise ManifestError(f"split {split!r} of {manifest.path} has {kept} usable samples: not enough for one "
                            f"batch of {cfg.batch_size} on each of {world_size} rank(s)")
    dataset.max_pixels = getattr(cfg, "max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS)
    dataset.remote = remote.policy_of(cfg)
    return TrainStream(dataset, cfg.num_workers, image_format)


def make_eval_loader(cfg: Any, manifest: Manifest | str | Path, split: str, *, rank: int, world_size: int,
                     max_images: int | None = None, image_format: str = "float",
                     mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> EvalStream:
    """Evaluation stream for one rank: images, labels, keys and segmentation ground truth at cfg.image_size
    (image_format, mean, std: as make_train_loader)."""
    if not isinstance(manifest, Manifest):
        manifest = read_data_manifest_at(cfg, manifest)
    _check_rank(rank, world_size)
    info = _split_info(manifest, split)
    dataset = _ShardStream(info, num_classes=len(manifest.classes), image_size=cfg.image_size,
                           batch_size=cfg.batch_size, rank=rank, world_size=world_size, train=False, seed=0,
                           drop_unlabelled=False, shuffle_buffer=0, augment=False, max_images=max_images, mean=mean,
                           std=std, resize=getattr(cfg, "resize", "squash"))
    dataset.max_pixels = getattr(cfg, "max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS)
    dataset.remote = remote.policy_of(cfg)
    return EvalStream(dataset, cfg.num_workers, image_format)


def iter_samples(manifest: Manifest, split: str) -> Iterable[dict[str, Any]]:
    """Raw samples (member bytes) of a split in manifest order, for tools and tests."""
    info = _split_info(manifest, split)
    for url in info.shards:
        yield from _iter_shard(url)
