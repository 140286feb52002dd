"""SIGTERM / SIGINT (and SIGUSR2 in training): stop at a safe point instead of dying mid-write or printing a
KeyboardInterrupt traceback.

SIGTERM is what `scancel`, torchrun, Kubernetes and most schedulers send; SIGINT is Ctrl-C. Exit status follows the
shell convention 128 + signal number: 143 for SIGTERM, 130 for SIGINT.

* `StopRequest` (training): the handler only records the signal. The training loop adds the flag to the per-step
  reduction it already does, so every rank learns in the same step that some rank was signalled; all finish that step,
  write a checkpoint together and exit with the signal's status.
* SIGUSR2 (training only) is SLURM's preemption / time-limit warning (`--signal=USR2@120`, submitit's default): the
  same graceful stop, then `StopRequest.hand_over` gives the signal to the handler it replaced (submitit's, which
  requeues the job on rank 0), so the requeue happens after the checkpoint rather than mid-step on rank 0 alone.
  Exit status 140 where nothing else ends the process.
* `raise_on_signals` (make_shards): the handler raises `Interrupted` in the main thread, so the caller can stop its
  worker processes and exit with the signal's status.

Either way a second signal exits at once (`os._exit`): nothing is cleaned up, and the last complete checkpoint or
shard stays as it is (both are written under a temporary name and renamed when complete).
A handler acts only in the process that installed it: a forked child (a DataLoader or shard worker inherits it) ignores
the signal and is stopped by its parent.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
PREEMPT_SIGNAL = signal.SIGUSR2  # SLURM's warning before a preemption or the time limit (submitit's default)


def exit_status(signum: int) -> int:
    """The status a shell reports for a process ended by `signum` (143 SIGTERM, 130 SIGINT)."""
    return 128 + signum


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def _exit_now(signum: int) -> None:
    """Second signal: leave immediately, without unwinding (which could block on a collective or a worker)."""
    os.write(2, f"second signal ({signal_name(signum)}): exiting now, status {exit_status(signum)}\n".encode())
    os._exit(exit_status(signum))


@contextlib.contextmanager
def _installed(handler: Callable[[int, FrameType | None], None],
               signals: tuple[int, ...] = STOP_SIGNALS) -> Iterator[dict[int, Any] | None]:
    """Install `handler` for `signals` (SIGTERM and SIGINT) while the block runs, then restore the previous
    handlers. Yields the previous handlers, or None (nothing installed) outside the main thread, where Python cannot
    set handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield None
        return
    previous = {sig: signal.signal(sig, handler) for sig in signals}
    try:
        yield previous
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


class StopRequest:
    """Records the first SIGTERM / SIGINT (`signum`); the training loop polls `requested` once per step."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._pid = os.getpid()
        self._replaced: dict[int, Any] = {}  # the handlers installed before ours

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def handle(self, signum: int, frame: FrameType | None = None) -> None:
        if os.getpid() != self._pid:  # an inherited handler in a forked worker: its parent decides
            return
        if self.signum is not None:
            _exit_now(signum)
        self.signum = signum

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopRequest]:
        self._pid = os.getpid()
        with _installed(self.handle, (*STOP_SIGNALS, PREEMPT_SIGNAL)) as previous:
            self._replaced = previous or {}
            yield self

    def hand_over(self, signum: int) -> None:
        """After the graceful stop: give a SIGUSR2 to the Python handler ours replaced (submitit's requeues the job on
        rank 0 and exits; on the other ranks it returns). The default action or none: nothing to do."""
        previous = self._replaced.get(signum)
        if signum == PREEMPT_SIGNAL and callable(previous):
            previous(signum, None)


class Interrupted(BaseException):  # noqa: N818 - like KeyboardInterrupt: not an Exception, so no handler swallows it
    """Raised in the main thread by `raise_on_signals` on the first SIGTERM / SIGINT."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal_name(signum)}")
        self.signum = signum
        self.status = exit_status(signum)


@contextlib.contextmanager
def raise_on_signals() -> Iterator[None]:
    """While the block runs, the first SIGTERM / SIGINT raises `Interrupted`; a second exits at once."""
    pid = os.getpid()
    received: list[int] = []

    def handler(signum: int, frame: FrameType | None = None) -> None:
        if os.getpid() != pid:
            return
        if received:
            _exit_now(signum)
        received.append(signum)
        raise Interrupted(signum)

    with _installed(handler):
        yield


def worker_defaults() -> None:
    """For worker processes their parent stops: Ctrl-C (SIGINT reaches the whole process group) is ignored, SIGTERM
    ends them (a forked worker would otherwise inherit the parent's handler)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
