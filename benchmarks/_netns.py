"""A network namespace of the benchmark's own with a bandwidth cap in the kernel, CPU pinning and CPU-time reading,
for benchmarks/bench_loader.py --remote (Linux, root, iproute2).

Why: a Python proxy that paces the bytes (tests/_s3.py) burns CPU on the same cores as the loader it measures. Here
the cap is a `tbf` qdisc on the namespace's loopback, so serving costs only the S3 server's own CPU, and that server
can be pinned to a core of its own, as a real bucket's server is on other machines.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterable, Iterator

CLONE_NEWNET = 0x40000000
TBF_BURST = 256 * 1024  # bytes: above the loopback's 64 KiB MTU, so whole packets pass


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"`ip {' '.join(args)}` failed: {done.stderr.strip() or done.returncode}")


def netns_problem() -> str | None:
    """Why a namespace cannot be made here (None: it can)."""
    if os.geteuid() != 0:
        return "needs root (ip netns add)"
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        return f"needs {' and '.join(missing)} (apt-get install iproute2)"
    return None


def qdisc_available(kind: str) -> bool:
    """Whether the kernel has the `kind` qdisc (netem is missing from some, e.g. kernels built without modules)."""
    name = f"xbench-probe-{os.getpid()}-{secrets.token_hex(3)}"
    _ip("netns", "add", name)
    try:
        args = {"netem": ["delay", "1ms"], "tbf": ["rate", "1gbit", "burst", "256kb", "latency", "100ms"]}[kind]
        done = subprocess.run(["ip", "netns", "exec", name, "tc", "qdisc", "add", "dev", "lo", "root", kind, *args],
                              capture_output=True)
        return done.returncode == 0
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


@contextlib.contextmanager
def capped_namespace(rate_bytes: float) -> Iterator[str]:
    """A new network namespace (unique name, removed on the way out whatever happens) whose loopback is up and
    capped at `rate_bytes` bytes/s in all (a tbf qdisc); yields its name."""
    name = f"xbench-{os.getpid()}-{secrets.token_hex(3)}"
    _ip("netns", "add", name)
    try:
        _ip("netns", "exec", name, "ip", "link", "set", "lo", "up")
        _ip("netns", "exec", name, "tc", "qdisc", "add", "dev", "lo", "root", "tbf", "rate",
            f"{int(rate_bytes * 8)}bit", "burst", str(TBF_BURST), "latency", "200ms")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


@contextlib.contextmanager
def entered(name: str) -> Iterator[None]:
    """The calling thread in namespace `name` (and so the threads and processes it starts from now on), back in
    its own namespace on the way out. Call it from the main thread before any thread that does networking starts."""
    libc = ctypes.CDLL(None, use_errno=True)
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into network namespace {name}")
        try:
            yield
        finally:
            libc.setns(own, CLONE_NEWNET)
    finally:
        os.close(own)
        os.close(target)


def pin(pid: int, cpus: Iterable[int]) -> None:
    """Every thread of process `pid` onto `cpus` (threads and processes it starts later inherit it)."""
    cpus = set(cpus)
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError, FileNotFoundError):
            os.sched_setaffinity(int(tid), cpus)


def cpu_seconds(pid: int, thread: int | None = None) -> float:
    """User + system CPU seconds of process `pid`, all its threads (only thread `thread` when given; 0 when gone)."""
    try:
        with open(f"/proc/{pid}/task/{thread}/stat" if thread else f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    """The process ids whose parent is `pid`."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(FileNotFoundError, ProcessLookupError, IndexError), \
                    open(f"/proc/{entry}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry))
    return found
