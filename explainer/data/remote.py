"""Shards and manifests at URLs: s3://, gs://, az://, https:// and any other fsspec protocol the config allows.

Why a layer of our own over fsspec (docs/training.md#object-storage):

* One fault policy for every protocol. Each request has a timeout; a transient failure (5xx, throttling, a reset or
  cut connection, a timeout) is retried with exponential backoff and jitter, `retries` times, and only the chunk being
  fetched is asked for again (what the reader has is not); 404 and 403 are not retried. What still fails is an
  OSError naming the URL, which the loader reports as a bad shard. The storage libraries' own retries are turned off
  for s3 and gs so the bound is ours.
* Read-ahead. A loader worker fetches its shards in ranged chunks in a background thread, `depth` chunks ahead: while
  it decodes one shard, the next one's first bytes are already on their way.
* Checksums. Where the manifest gives a shard's sha256 (make-shards --out URL writes it), the fetch threads hash the
  chunks in order as they arrive and the last one compares: a mismatch is a ChecksumError naming the URL, a bad shard
  (a shard read only in part cannot be checked; local files are not hashed).
* Credentials only from where the storage libraries look themselves (environment, instance metadata, their config
  files). A URL carrying a user, password or signature is refused, so none can end up in a config, a manifest or a log.
* Atomic uploads: make-shards writes a shard locally, then uploads it in one PUT (object stores publish an object only
  when it is complete) or, elsewhere, under a temporary name then renamed.

http(s) is read with the standard library (ranged GETs: no extra needed); every other protocol through fsspec and its
backend (`pip install '.[s3]'` for s3fs, `'.[gcs]'` for gcsfs; adlfs for az://).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import posixpath
import queue
import random
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

HTTP = ("http", "https")
REFUSED = ("pipe",)  # webdataset's shell-command "URLs": never a protocol, whatever a config says
ATOMIC_PUT = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "memory")  # a PUT publishes a complete object
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):")
_SECRET_QUERY = re.compile(r"(?i)(^|&)[^=&]*(signature|credential|token|secret|password|sig|key)[^=&]*=")
FIRST_CHUNK = 1 << 20  # bytes of a shard's first request
MIN_UPLOAD_RATE = 256 * 1024  # bytes/s: an upload slower than this (on top of the request timeout) counts as hung


class RemoteError(OSError):
    """A request that failed for good (after the retries, or at once when not transient); names the URL."""


class ChecksumError(RemoteError):
    """A shard whose bytes do not hash to the manifest's sha256 (changed or damaged in the store); names the URL."""


@dataclass(frozen=True)
class RemotePolicy:
    """How URLs are read and written (data.remote_timeout_s, data.remote_retries; the rest fixed)."""

    timeout: float = 60.0  # seconds one request may take
    retries: int = 5  # further tries after a transient failure
    backoff: float = 0.5  # first wait in seconds, doubled each try (x 0.5-1 jitter), at most 20 s
    chunk: int = 8 << 20  # bytes per ranged request
    depth: int = 3  # chunks a loader worker fetches ahead


def policy_of(dcfg: Any) -> RemotePolicy:
    """The policy a DataConfig asks for (defaults for configs that predate the keys)."""
    return RemotePolicy(timeout=float(getattr(dcfg, "remote_timeout_s", 60.0)),
                        retries=int(getattr(dcfg, "remote_retries", 5)))


# ----------------------------------------------------------------------------------------------------------------------
# URLs
# ----------------------------------------------------------------------------------------------------------------------


def scheme(text: str) -> str | None:
    """The lower-case scheme of a URL ("pipe:", "s3://", ...), None for a path. One letter is not a scheme."""
    match = _SCHEME.match(text)
    return match.group(1).lower() if match else None


def is_url(text: str | os.PathLike) -> bool:
    return isinstance(text, str) and scheme(text) is not None


def protocols(url: str) -> list[str]:
    """Every protocol of a (possibly chained, fsspec "a::b://...") URL, outermost first."""
    return [scheme(part) or "file" for part in url.split("::")]


def known_protocol(name: str) -> bool:
    """A protocol fsspec has an implementation for (installed or not), or http(s)."""
    import fsspec

    return name in HTTP or (name not in REFUSED and name in fsspec.available_protocols())


def credentials_in(url: str) -> str | None:
    """What in `url` looks like a credential (user:password@, a signed query), or None."""
    for part in url.split("::"):
        parts = urllib.parse.urlsplit(part)
        if "@" in parts.netloc:
            return "a user or password before '@'"
        if _SECRET_QUERY.search(parts.query):
            return "a signature, token or key in its query string"
    return None


def folder(url: str) -> str:
    return url.rsplit("/", 1)[0] if "/" in url.split("://", 1)[-1] else url


def join(base_folder: str, relative: str) -> str:
    """`relative` (a manifest entry) under the URL folder `base_folder`, '..' resolved."""
    head, _, tail = base_folder.partition("://")
    return f"{head}://{posixpath.normpath(posixpath.join(tail, relative))}"


def inside(base_folder: str, url: str) -> bool:
    prefix = base_folder.rstrip("/") + "/"
    return url.startswith(prefix) and "/../" not in url[len(prefix) - 1:] and not url.endswith("/..")


# ----------------------------------------------------------------------------------------------------------------------
# Requests, timeouts and retries
# ----------------------------------------------------------------------------------------------------------------------


class _HttpStatus(OSError):
    def __init__(self, url: str, status: int, reason: str):
        super().__init__(f"HTTP {status} {reason}")
        self.status = status


def _permanent(exc: BaseException) -> bool:
    """Errors a retry cannot fix: missing, forbidden, a bad request; everything else counts as transient."""
    if isinstance(exc, _HttpStatus):
        return 400 <= exc.status < 500 and exc.status not in (408, 429)
    code = getattr(exc, "code", None)  # gcsfs's HttpError
    if isinstance(code, int) and 400 <= code < 500:
        return code not in (408, 429)
    if type(exc) is OSError and str(exc).startswith("Forbidden: "):  # gcsfs's 403
        return True
    return isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, ValueError,
                            TypeError, ImportError, NotImplementedError, RemoteError))


def _describe(exc: BaseException, timeout: float) -> str:
    text = str(exc).strip() or ("timed out" if "Timeout" in type(exc).__name__ else "")
    if "Timeout" in type(exc).__name__:
        text = f"no answer within {timeout:g} s ({text})" if text != "timed out" else f"no answer within {timeout:g} s"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def with_retries(what: str, policy: RemotePolicy, call: Callable[[], T]) -> T:
    """`call()` retried on transient errors with exponential backoff; the last error names `what`."""
    for attempt in range(policy.retries + 1):
        try:
            return call()
        except Exception as exc:
            reason = _describe(exc, policy.timeout)
            if _permanent(exc) or attempt == policy.retries:
                tries = f" (after {attempt + 1} tries)" if attempt else ""
                kind = type(exc) if isinstance(exc, (FileNotFoundError, PermissionError)) else RemoteError
                raise kind(f"{what}: {reason}{tries}") from exc
            wait = min(policy.backoff * 2**attempt, 20.0) * (0.5 + random.random() / 2)
            log.warning("%s: %s; retrying in %.1f s (try %d of %d)", what, reason, wait, attempt + 2,
                        policy.retries + 1)
            time.sleep(wait)
    raise AssertionError("unreachable")


def filesystem(url: str, policy: RemotePolicy) -> tuple[Any, str]:
    """(fsspec filesystem, path) of a non-http URL. Credentials and endpoints come from the backend's own places
    (AWS_* / GOOGLE_* variables, ~/.aws, gcloud's config, instance metadata, fsspec's config); only timeouts and
    retries are ours."""
    from fsspec.core import url_to_fs

    outer = protocols(url)[0]
    kwargs: dict[str, Any] = {}
    if outer in ("s3", "s3a"):
        import fsspec.config

        user = dict(fsspec.config.conf.get("s3", {}).get("config_kwargs", {}))
        kwargs["config_kwargs"] = {**user, "connect_timeout": min(policy.timeout, 10.0), "read_timeout": policy.timeout,
                                   "retries": {"total_max_attempts": 1, "mode": "standard"}}
        kwargs["use_listings_cache"] = False  # a listing kept by the instance would hide objects written since
    try:
        if outer in ("gs", "gcs"):
            fs, path = _gcs(url, policy)
        else:
            fs, path = url_to_fs(url, **kwargs)
    except ImportError as exc:
        extra = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}.get(outer)
        raise RemoteError(f"{url}: {exc}" + (f" (pip install 'explainer[{extra}]')" if extra else "")) from None
    if hasattr(fs, "retries"):
        fs.retries = 1  # s3fs's own retry loop: ours is the one with a documented bound
    _KEEP.setdefault(id(fs), fs)
    return fs, path


def _gcs(url: str, policy: RemotePolicy) -> tuple[Any, str]:
    """gcsfs's JSON-API filesystem with our timeouts and one try per request.

    Not the class fsspec picks for gs:// (gcsfs's ExtendedGcsFileSystem): that one first asks the Storage Control
    API (gRPC) for each bucket's layout, retrying for up to 60 s on its own, and where the answer is not found (an
    emulator, a restricted key) asks again before every operation. gcsfs retries inside `_request` with a decorator
    bound to 6 tries when the class is made (its `retries` attribute changes nothing), so the instance gets the
    undecorated request: one try, the retries are ours."""
    import types

    import aiohttp
    from gcsfs.core import GCSFileSystem

    timeout = aiohttp.ClientTimeout(total=None, connect=min(policy.timeout, 10.0), sock_read=policy.timeout)
    fs = GCSFileSystem(requests_timeout=timeout)  # credentials, project, endpoint: gcsfs's own defaults and config
    fs._request = types.MethodType(GCSFileSystem._request.__wrapped__, fs)
    return fs, fs._strip_protocol(url)


# Filesystems made here stay referenced: a forked DataLoader worker inherits them while fsspec empties its instance
# cache at the fork, and when the garbage collector then finalizes one, s3fs closes its session on the worker's event
# loop, printing "attached to a different loop" tracebacks. They are few (one per protocol and settings).
_KEEP: dict[int, Any] = {}


def _call(fs: Any, method: str, policy: RemotePolicy, *args: Any, timeout: float | None = None, **kwargs: Any) -> Any:
    """fs.method(...) with a timeout on async backends (fsspec cancels the request when it runs out)."""
    from fsspec.asyn import AsyncFileSystem

    if isinstance(fs, AsyncFileSystem):
        kwargs["timeout"] = timeout or policy.timeout
    return getattr(fs, method)(*args, **kwargs)


def _http(url: str, policy: RemotePolicy, start: int | None = None, end: int | None = None,
          head: bool = False) -> tuple[bytes, int | None]:
    """(body, Content-Length) of a GET (a byte range when start/end are given) or HEAD, with the standard library."""
    headers = {"Range": f"bytes={start}-{end - 1}"} if start is not None and end is not None else {}
    request = urllib.request.Request(url, headers=headers, method="HEAD" if head else "GET")
    try:
        with urllib.request.urlopen(request, timeout=policy.timeout) as resp:  # noqa: S310 - http(s) only
            length = resp.headers.get("Content-Length")
            data = b"" if head else resp.read()
            if headers and resp.status == 200:  # the server ignored the range
                data = data[start:end]
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            raise FileNotFoundError(f"HTTP 404 {exc.reason}") from None
        raise _HttpStatus(url, exc.code, str(exc.reason)) from None
    return data, int(length) if length is not None else None


def fetch(url: str, policy: RemotePolicy, start: int | None = None, end: int | None = None) -> bytes:
    """Bytes [start, end) of an object (all of it without a range), retried."""
    where = url if start is None else f"{url} bytes {start}-{end}"
    if scheme(url) in HTTP:
        return with_retries(where, policy, lambda: _http(url, policy, start, end)[0])
    fs, path = filesystem(url, policy)
    return with_retries(where, policy, lambda: _call(fs, "cat_file", policy, path, start=start, end=end))


def size_of(url: str, policy: RemotePolicy) -> int | None:
    """The object's size in bytes (None when an http server does not say)."""
    if scheme(url) in HTTP:
        return with_retries(url, policy, lambda: _http(url, policy, head=True)[1])
    fs, path = filesystem(url, policy)
    return int(with_retries(url, policy, lambda: _call(fs, "size", policy, path)))


def listing(folder_url: str, policy: RemotePolicy) -> dict[str, int] | None:
    """{path relative to folder_url: size} of every object under it, or None where a protocol cannot list (http)."""
    found = listing_details(folder_url, policy)
    return None if found is None else {name: int(info.get("size") or 0) for name, info in found.items()}


def listing_details(folder_url: str, policy: RemotePolicy) -> dict[str, dict[str, Any]] | None:
    """{path relative to folder_url: the backend's info (size, ETag, generation, ...)} of every object under it, or
    None where a protocol cannot list (http)."""
    if scheme(folder_url) in HTTP:
        return None
    fs, path = filesystem(folder_url, policy)
    fs.invalidate_cache(path)
    try:
        found = with_retries(f"listing {folder_url}", policy,
                             lambda: _call(fs, "find", policy, path, detail=True))
    except FileNotFoundError:
        return {}
    root = path.rstrip("/") + "/"
    return {name[len(root):]: info for name, info in found.items() if name.startswith(root)}


_VERSION_KEYS = ("ETag", "generation", "etag", "version_id", "VersionId")  # s3, gcs, azure/others


def version_tag(info: dict[str, Any]) -> str | None:
    """What the store says identifies this version of an object (S3's ETag, GCS's generation, Azure's etag), from a
    listing or an info call: it changes when the object is written again. None where the backend gives none."""
    for key in _VERSION_KEYS:
        value = info.get(key)
        if value not in (None, ""):
            return f"{key}={str(value).strip(chr(34))}"
    return None


def object_version(url: str, policy: RemotePolicy) -> str | None:
    """version_tag of one object, asked for now (one HEAD-like request, retried)."""
    fs, path = filesystem(url, policy)
    fs.invalidate_cache(path)
    return version_tag(with_retries(url, policy, lambda: _call(fs, "info", policy, path)))


# ----------------------------------------------------------------------------------------------------------------------
# Reading shards: chunks fetched ahead in a background thread
# ----------------------------------------------------------------------------------------------------------------------

_END = object()


class ReadAhead:
    """Fetches the given shards' bytes in order, in chunks, up to `policy.depth` requests ahead of the reader and as
    many at once (so the latency of one request hides behind the others).

    One per loader worker and epoch: `open(url)` returns a stream of one shard (opened in list order; a shard opened
    out of order, or not listed, gets a ReadAhead of its own; a local path is simply opened). Closing a stream before
    its end makes the fetcher skip the rest of that shard. The thread ends when every shard is fetched or `close()`
    is called.

    Across epochs: `head` is a ReadAhead started earlier (`start()`) on the first shard of this list, typically by
    the previous epoch's `then` callback, which runs in the fetch thread once every shard of that epoch is fetched;
    its bytes are used for that shard, so the next epoch's first bytes were already on their way while the last
    shards of this one were decoded.
    """

    waited_s = 0.0  # seconds readers of this process spent waiting for bytes (benchmarks/bench_loader.py --remote)

    def __init__(self, urls: Sequence[str], policy: RemotePolicy, sizes: dict[str, int | None] | None = None,
                 sha256: dict[str, str | None] | None = None, head: ReadAhead | None = None):
        self.urls = list(dict.fromkeys(u for u in urls if is_url(u)))
        self.head = head if head is not None and self.urls[:1] == head.urls else None
        if head is not None and self.head is None:
            head.close()  # fetched for another first shard (a different epoch plan): not ours
        if self.head is not None:
            self.urls = self.urls[1:]
        self.then: Callable[[], None] | None = None  # called in the fetch thread once every shard is fetched
        self.policy = policy
        self.sizes = dict(sizes or {})
        self.sha256 = dict(sha256 or {})  # the manifest's checksums: a shard read to its end is verified
        self._queue: queue.Queue[tuple[int, Any]] = queue.Queue(maxsize=max(1, policy.depth))
        self._stop = threading.Event()
        self._abandoned = -1  # the fetcher skips the rest of shards up to this index
        self._next = 0  # index of the next shard the reader may open
        self._thread: threading.Thread | None = None
        self._pool: ThreadPoolExecutor | None = None

    def _put(self, item: tuple[int, Any]) -> bool:
        while not self._stop.is_set():
            with contextlib.suppress(queue.Full):
                self._queue.put(item, timeout=0.2)
                return True
        return False

    def _fetch_all(self) -> None:
        chunk = self.policy.chunk
        for index, url in enumerate(self.urls):
            try:
                size = self.sizes.get(url)
                if size is None:
                    size = size_of(url, self.policy)
                if size is None:  # an http server that does not give sizes: one request for the whole object
                    if not self._put((index, fetch(url, self.policy))):
                        return
                else:
                    start, step = 0, min(chunk, FIRST_CHUNK)  # a small first request: decoding starts sooner
                    submit = self._submitter(url, size)
                    while start < size and self._abandoned < index:
                        end = min(start + step, size)
                        if not self._put((index, submit(start, end))):
                            return
                        start, step = end, chunk
            except Exception as exc:  # the reader raises it (a bad shard); the next shards are still fetched
                if not self._put((index, exc)):
                    return
                continue
            if not self._put((index, _END)):
                return
        if self.then is not None:
            self.then()

    def _submitter(self, url: str, size: int) -> Callable[[int, int], Future]:
        """How the fetcher asks the pool for bytes [start, end) of `url`: a plain fetch, or, where the manifest gives
        the shard's sha256, one that also hashes them in order (_Sha256)."""
        assert self._pool is not None
        pool, expected = self._pool, self.sha256.get(url)
        if not expected:
            return lambda start, end: pool.submit(fetch, url, self.policy, start, end)
        return _Sha256(url, expected, size, pool, self.policy).submit

    def _get(self) -> tuple[int, Any]:
        while True:
            with contextlib.suppress(queue.Empty):
                return self._queue.get(timeout=1.0)
            if self._thread is None or not self._thread.is_alive():
                raise RemoteError("the read-ahead thread stopped")

    def start(self) -> ReadAhead:
        """Start fetching now, before the first open() (which otherwise starts it)."""
        if self._thread is None:
            self._pool = ThreadPoolExecutor(max(1, self.policy.depth), thread_name_prefix="shard-fetch")
            self._thread = threading.Thread(target=self._fetch_all, name="shard-read-ahead", daemon=True)
            self._thread.start()
        return self

    def open(self, url: str) -> Any:
        if not is_url(url):
            return open(url, "rb")  # noqa: SIM115 - a local shard: closed by the reader
        if self.head is not None and url in self.head.urls[self.head._next:]:
            self.start()  # the shards after the head's: fetched while the head's shard is decoded
            return self.head.open(url)
        if url not in self.urls[self._next:]:
            return ReadAhead([url], self.policy, self.sizes, self.sha256).open(url)
        index = self.urls.index(url, self._next)
        self._abandoned = max(self._abandoned, index - 1)  # shards skipped over are not fetched further
        self._next = index + 1
        self.start()
        return _ChunkStream(self, index, url)

    def close(self) -> None:
        self._stop.set()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        if self.head is not None:
            self.head.close()

    def closing(self, items: Iterator[T]) -> Iterator[T]:
        """`items`, then close() when they are exhausted or abandoned (the generator is closed or collected)."""
        try:
            yield from items
        finally:
            self.close()


class _Sha256:
    """The running sha256 of one shard, fed by the fetch threads in byte order: each chunk's task fetches, then waits
    for the previous chunk's task before hashing (hashlib releases the GIL on large buffers, so the other fetches and
    the decoding go on meanwhile). The task of the shard's last chunk compares the digest with the manifest's and
    raises ChecksumError, which the reader gets with that chunk. A shard whose last chunk is never asked for (a
    reader that stops early) is not verified."""

    def __init__(self, url: str, expected: str, size: int, pool: ThreadPoolExecutor, policy: RemotePolicy):
        self.url, self.expected, self.size, self.pool, self.policy = url, expected.lower(), size, pool, policy
        self._digest = hashlib.sha256()
        self._prev: Future | None = None
        self._broken = False  # a chunk failed: the reader raises that error, the digest is not compared

    def submit(self, start: int, end: int) -> Future:
        prev = self._prev
        self._prev = self.pool.submit(self._chunk, start, end, prev)
        return self._prev

    def _chunk(self, start: int, end: int, prev: Future | None) -> bytes:
        try:
            data = fetch(self.url, self.policy, start, end)
        except Exception:
            self._broken = True
            raise
        if prev is not None:  # submitted earlier, so already running or done: no deadlock in the pool
            wait_futures([prev])
            self._broken = self._broken or prev.cancelled() or prev.exception() is not None
        if self._broken:
            return data
        self._digest.update(data)
        if end >= self.size and (got := self._digest.hexdigest()) != self.expected:
            raise ChecksumError(f"{self.url}: checksum mismatch: its bytes hash to sha256 {got[:12]}..., the manifest "
                                f"says {self.expected[:12]}... (the object changed or was damaged after make-shards)")
        return data


class _ChunkStream:
    """One shard's bytes from a ReadAhead, as the file object tarfile's stream mode reads."""

    def __init__(self, owner: ReadAhead, index: int, url: str):
        self.owner, self.index, self.name = owner, index, url
        self._buf = b""
        self._pos = 0
        self._done = False

    def _more(self) -> None:
        while True:
            start = time.perf_counter()
            index, item = self.owner._get()
            if index < self.index:
                continue  # the rest of a shard an earlier reader abandoned
            if isinstance(item, Future):
                try:
                    item = item.result()
                except Exception as exc:
                    item = exc
            ReadAhead.waited_s += time.perf_counter() - start
            if item is _END:
                self._done = True
            elif isinstance(item, BaseException):
                self._done = True
                raise item
            else:
                self._buf = self._buf[self._pos:] + item
                self._pos = 0
            return

    def __repr__(self) -> str:
        return f"<stream of {self.name}>"

    def read(self, n: int = -1) -> bytes:
        while not self._done and (n < 0 or len(self._buf) - self._pos < n):
            self._more()
        end = len(self._buf) if n < 0 else min(len(self._buf), self._pos + n)
        data = self._buf[self._pos:end]
        self._pos = end
        return data

    def close(self) -> None:
        if not self._done:
            self.owner._abandoned = max(self.owner._abandoned, self.index)
            self._done = True
        if len(self.owner.urls) == 1:
            self.owner.close()


def open_url(url: str, policy: RemotePolicy, size: int | None = None) -> _ChunkStream:
    """One object as a sequential stream (chunks fetched ahead, retried)."""
    return ReadAhead([url], policy, {url: size}).open(url)


# ----------------------------------------------------------------------------------------------------------------------
# Writing: small objects, atomic uploads
# ----------------------------------------------------------------------------------------------------------------------


def write_bytes(url: str, data: bytes, policy: RemotePolicy) -> None:
    """A small object (record, manifest) in one PUT: readers see the old or the new one, never a part."""
    fs, path = filesystem(url, policy)
    with_retries(f"writing {url}", policy, lambda: _call(fs, "pipe_file", policy, path, data))


def upload_file(local: Path, url: str, policy: RemotePolicy) -> None:
    """Upload a finished local file: one PUT where the store publishes only complete objects, else a temporary
    name renamed into place; retried whole on transient errors."""
    fs, path = filesystem(url, policy)
    timeout = policy.timeout + local.stat().st_size / MIN_UPLOAD_RATE
    if protocols(url)[0] in ATOMIC_PUT:
        with_retries(f"uploading {url}", policy,
                     lambda: _call(fs, "put_file", policy, str(local), path, timeout=timeout))
        return
    tmp = posixpath.join(posixpath.dirname(path), f".{posixpath.basename(path)}.{os.getpid()}.tmp")
    with_retries(f"uploading {url}", policy, lambda: _call(fs, "put_file", policy, str(local), tmp, timeout=timeout))
    with_retries(f"renaming {url}", policy, lambda: _call(fs, "mv", policy, tmp, path))


def delete(url: str, policy: RemotePolicy) -> None:
    fs, path = filesystem(url, policy)
    with contextlib.suppress(FileNotFoundError):
        with_retries(f"deleting {url}", policy, lambda: _call(fs, "rm_file", policy, path))


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
