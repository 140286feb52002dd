"""One writer per run folder: rank 0 holds an exclusive lock on `<output_dir>/run.lock` for the whole run.

Two runs writing one folder used to delete each other's in-progress checkpoints. The lock is a POSIX record lock
(fcntl.lockf), which the kernel drops when the process dies, kill -9 included: a stale lock cannot exist, and the file
left behind only names the last holder. POSIX locks rather than flock: a flock is shared with every forked child
(the data-loader workers), which outlive a killed trainer by seconds; a POSIX lock belongs to the process alone.
Its one trap: closing ANY descriptor of the lock file in the holding process drops it, so nothing else in the
process may open run.lock.

Filesystems without working locks: where locking fails with ENOLCK/EOPNOTSUPP (NFS without lockd, some FUSE
mounts) the run warns and goes on unprotected. On NFS mounted with `nolock` the lock succeeds but is local to the
node, so two runs on two nodes are not detected; run folders belong on a filesystem with working locks (local disk,
NFS with lockd, Lustre/GPFS with locking enabled).
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from explainer.logs import get_logger
from explainer.run_errors import RunError, UserError, os_reason

log = get_logger(__name__)

LOCK_NAME = "run.lock"
_UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class RunFolderBusy(UserError):
    """Another live process holds the run folder."""


@dataclass
class RunLock:
    path: Path
    holder: str  # "host h, pid p": also the token of this run's temporary checkpoint folders
    fd: int | None = None  # None: not held (released, a non-main rank, or no working locks here)
    enforced: bool = True  # False where the filesystem has no working locks

    @property
    def held(self) -> bool:
        return self.fd is not None

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # drops the lock
            self.fd = None

    def __del__(self) -> None:
        self.release()


def holder_id() -> str:
    return f"host {socket.gethostname()}, pid {os.getpid()}"


def acquire(run_dir: str | os.PathLike) -> RunLock:
    """Take the run folder's lock or raise RunFolderBusy naming the holder (host, pid, since when)."""
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise UserError(f"train.output_dir {run_dir}: cannot be used as a run folder ({exc.strerror})") from None
    path, me = run_dir / LOCK_NAME, holder_id()
    try:
        os.lockf(fd, os.F_TLOCK, 0)
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EAGAIN):
            holder = _read_holder(fd)
            os.close(fd)
            raise RunFolderBusy(
                f"train.output_dir {run_dir} is in use by another run ({holder}); wait for it to end, stop it, or "
                f"choose another train.output_dir"
            ) from None
        if exc.errno not in _UNSUPPORTED:
            os.close(fd)
            raise RunError(f"{path}: cannot lock the run folder ({os_reason(exc)}, errno {exc.errno}); the run "
                           "folder must be on a filesystem with working file locks") from None
        os.close(fd)
        log.warning("%s: this filesystem has no working file locks (%s); the run goes on, but a second run started "
                    "into %s would not be refused", path, exc.strerror, run_dir)
        return RunLock(path, me, None, enforced=False)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps({"holder": me, "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}) + "\n").encode(), 0)
    except OSError as exc:  # a full disk: the lock file is the first thing written
        os.close(fd)
        raise UserError(f"train.output_dir {run_dir}: cannot write {path} ({os_reason(exc)})") from None
    return RunLock(path, me, fd)


def _read_holder(fd: int) -> str:
    try:
        raw = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"{raw['holder']}, since {raw['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown: run.lock names none"


def acquire_shared(accelerator, run_dir: str | os.PathLike) -> RunLock:
    """Collective: rank 0 takes the lock, every rank learns the outcome (and rank 0's holder id, which names this
    run's temporary checkpoint folders). Any failure on rank 0 (busy, a lock error, a full disk) raises the same
    error on every rank, so none waits in a later collective for a rank that stopped."""
    lock, error = None, None
    if accelerator.is_main_process:
        try:
            lock = acquire(run_dir)
        except (RunError, OSError) as exc:
            error = exc
    shared = [None if lock is None else (lock.holder, lock.enforced), None if error is None else
              (type(error).__name__, str(error), getattr(error, "exit_code", 1))]
    if accelerator.num_processes > 1:
        torch.distributed.broadcast_object_list(shared, src=0)
    if shared[1] is not None:
        if error is not None:
            raise error
        kind, message, code = shared[1]
        if kind == RunFolderBusy.__name__:
            raise RunFolderBusy(message)
        raise (UserError if code == UserError.exit_code else RunError)(f"rank 0: {message}")
    if lock is None:  # another rank: rank 0 holds it for the run
        lock = RunLock(Path(run_dir) / LOCK_NAME, shared[0][0], None, enforced=shared[0][1])
    return lock
