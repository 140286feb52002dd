"""Shared fixtures: tiny synthetic shards and a tiny trained classifier, built once per test session."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
from _helpers import ROOT, make_synthetic_shards, run_cmd, train_tiny_classifier


@pytest.fixture(scope="session")
def synthetic_manifest(tmp_path_factory) -> Path:
    """Tiny synthetic shards (4 classes, 32 px, 96/24/24 images) in the official VOC path."""
    return make_synthetic_shards(tmp_path_factory.mktemp("shards") / "synthetic")


@pytest.fixture(scope="session")
def tiny_classifier(synthetic_manifest, tmp_path_factory) -> Path:
    """A tiny_cnn classifier trained on the tiny shards (good enough to explain)."""
    path = train_tiny_classifier(synthetic_manifest, tmp_path_factory.mktemp("classifier"))
    summary = json.loads((path.parent / "summary.json").read_text())
    assert summary["best"]["f1"] > 0.5, summary["best"]
    return path


@pytest.fixture(scope="session")
def huge_png(tmp_path_factory) -> Path:
    """A real 12000 x 12000 PNG of one colour: ~40 KB on disk, 432 MB once decoded as RGB (issue 17: such a file made
    `explain` take 10 GB). 1-bit, so making it takes ~1 s and 18 MB."""
    from PIL import Image

    path = tmp_path_factory.mktemp("huge") / "huge.png"
    Image.new("1", (12000, 12000), 1).save(path, "PNG")
    return path


@pytest.fixture(autouse=True)
def fresh_wandb_per_test():
    """An in-process wandb.init starts a wandb-core service and exports WANDB_SERVICE into os.environ, and wandb keeps
    its settings in a process-wide singleton. Without this, a later test's W&B mode or API key is ignored, and the
    SLURM jobs this process submits inherit WANDB_SERVICE and talk to this process's service ("run ID is in use")."""
    had_service = "WANDB_SERVICE" in os.environ
    yield
    import sys

    if "wandb" in sys.modules:
        sys.modules["wandb"].teardown()
    if not had_service:
        os.environ.pop("WANDB_SERVICE", None)


@pytest.fixture
def one_thread():
    """Tiny ops on a shared 2-core machine: two intra-op threads make TorchRay's EP loop 20x slower under load."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------------------------------------------------
# SLURM tests (marker `slurm`): mandatory where they can run, one clear skip line elsewhere
# ----------------------------------------------------------------------------------------------------------------------

LOCAL_SLURM = ROOT / "launch" / "local_slurm.sh"
SLURM_DIR = Path(os.environ.get("EXPLAINER_SLURM_DIR", "/tmp/explainer-slurm"))
# The cluster of the test session: two nodes, each in its own network namespace. EXPLAINER_TEST_SLURM_NODES=1 runs
# tests/test_slurm.py on the one-node mode instead (tests/test_slurm_two_nodes.py then fails: it needs two).
SLURM_NODES = int(os.environ.get("EXPLAINER_TEST_SLURM_NODES", "2"))
REQUIRE_SLURM = "EXPLAINER_REQUIRE_SLURM"  # .ci/run sets it: a SLURM that cannot start is then a failure
_SLURM_SKIP = "SLURM tests skipped"
_SLURM_REASON = pytest.StashKey[str]()
HOW_TO_RUN_SLURM = "to run them, run `make test` as root (a container or CI machine; .ci/run makes them mandatory)"


def slurm_unavailable_reason() -> str | None:
    """Why launch/local_slurm.sh cannot give these tests a cluster here, or None if it can.

    `local_slurm.sh start` installs the Debian packages if missing and starts munged/slurmctld/slurmd, so it needs
    root (it refuses to run otherwise, even when a cluster is up). EXPLAINER_TEST_EUID stands in for the user id, so
    that the test of this logic can play a non-root user.
    """
    euid = int(os.environ.get("EXPLAINER_TEST_EUID", os.geteuid()))
    if euid != 0:
        return "they need root (launch/local_slurm.sh installs SLURM with apt-get and starts munged, slurmctld, slurmd)"
    if all(shutil.which(tool) for tool in ("slurmctld", "slurmd", "sbatch", "munged")) or shutil.which("apt-get"):
        return None
    return "SLURM is not installed and there is no apt-get to install it (launch/local_slurm.sh is Debian/Ubuntu only)"


def pytest_collection_modifyitems(config, items):
    """Decide once per session: run the SLURM tests, skip them (one summary line), or fail them (required)."""
    slurm_items = [item for item in items if item.get_closest_marker("slurm")]
    for item in slurm_items:  # under pytest-xdist (`--dist loadgroup`): one worker runs them all, one cluster start
        item.add_marker(pytest.mark.xdist_group("slurm"))
    reason = slurm_unavailable_reason() if slurm_items else None
    if reason is None:
        return
    config.stash[_SLURM_REASON] = reason
    if os.environ.get(REQUIRE_SLURM) == "1":
        return  # pytest_runtest_setup fails each of them
    skip = pytest.mark.skip(reason=f"{_SLURM_SKIP}: {reason}")
    for item in slurm_items:
        item.add_marker(skip)


def pytest_runtest_setup(item):
    reason = item.config.stash.get(_SLURM_REASON, None)
    if reason and item.get_closest_marker("slurm") and os.environ.get(REQUIRE_SLURM) == "1":
        pytest.fail(f"{REQUIRE_SLURM}=1 but {reason}; {HOW_TO_RUN_SLURM}", pytrace=False)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Counted from the reports, not the stash: under pytest-xdist the workers collect and skip, not this process."""
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if _SLURM_SKIP in str(r.longrepr)]
    if skipped:
        reason = config.stash.get(_SLURM_REASON, None) or slurm_unavailable_reason()
        terminalreporter.write_line(f"{len(skipped)} {_SLURM_SKIP}: {reason}; {HOW_TO_RUN_SLURM}", yellow=True)


# ----------------------------------------------------------------------------------------------------------------------
# The cluster: started once per session, stopped by the last session using it if a test session started it
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running two-node SLURM (launch/local_slurm.sh start --nodes 2); SLURM_CONF exported for submit.py, squeue,
    scontrol and submitit. One-node jobs (tests/test_slurm.py) run on one of its nodes. If this session started it,
    the last session using it stops it, which also removes its network namespaces, even after failures."""
    users = SLURM_DIR / "test-sessions"
    marker = SLURM_DIR / "started-by-tests"
    was_up = subprocess.run(["bash", str(LOCAL_SLURM), "status"], capture_output=True).returncode == 0
    t0 = time.perf_counter()
    run_cmd(["bash", str(LOCAL_SLURM), "start", "--nodes", str(SLURM_NODES)], timeout=600)
    print(f"\n[slurm] local {SLURM_NODES}-node cluster ready in {time.perf_counter() - t0:.1f} s (was up: {was_up})")
    users.mkdir(parents=True, exist_ok=True)
    me = users / str(os.getpid())
    with _lock():
        me.touch()
        if not was_up:
            marker.touch()
    saved = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(SLURM_DIR / "etc" / "slurm.conf")
    yield os.environ["SLURM_CONF"]
    if saved is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = saved
    with _lock():
        me.unlink(missing_ok=True)
        others = [p for p in users.iterdir() if Path(f"/proc/{p.name}").exists()]
        if marker.exists() and not others:
            run_cmd(["bash", str(LOCAL_SLURM), "stop"], timeout=120)
            marker.unlink(missing_ok=True)


class _lock:
    """Serialises the session bookkeeping of concurrent pytest sessions sharing the cluster."""

    def __enter__(self):
        SLURM_DIR.mkdir(parents=True, exist_ok=True)
        self.handle = open(SLURM_DIR / "test-sessions.lock", "w")  # noqa: SIM115
        fcntl.flock(self.handle, fcntl.LOCK_EX)

    def __exit__(self, *exc):
        fcntl.flock(self.handle, fcntl.LOCK_UN)
        self.handle.close()
