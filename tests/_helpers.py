"""Helpers shared by the tests: run the real entry points in subprocesses, tiny synthetic data and classifier.

Training runs go through subprocesses, so each gets a fresh accelerate state and the tests exercise exactly what users
run. Imported as `_helpers` (pytest puts tests/ on sys.path), so it works under `pytest` and `python -m pytest`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable

# Small enough for 2 CPU cores, big enough that a classifier and an explainer can learn something.
TINY_SHARDS = ["--num-classes", "4", "--image-size", "32", "--counts", "train=96,val=24,test=24", "--seed", "3",
               "--max-objects", "2"]


def run_cmd(args: list[str], timeout: float = 600, env: dict[str, str] | None = None, check: bool = True,
            cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """Run a command, print its output on failure (pytest shows it), return the completed process."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true", **(env or {})}
    full_env.pop("WANDB_API_KEY", None)
    proc = subprocess.run(args, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"command failed ({proc.returncode}): {' '.join(map(str, args))}\n"
                             f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-6000:]}")
    return proc


def make_synthetic_shards(out: Path, extra: list[str] | None = None) -> Path:
    run_cmd([PYTHON, "launch/make_shards.py", "synthetic", "--out", str(out), "--workers", "1", "--no-progress",
             *TINY_SHARDS, *(extra or [])])
    return out / "manifest.json"


def tiny_overrides(manifest: Path, out: Path) -> list[str]:
    """Overrides shared by every tiny CPU training run in the tests."""
    return [f"data.manifest={manifest}", "data.image_size=32", "data.batch_size=8", "data.num_workers=0",
            "data.shuffle_buffer=16", "train.mixed_precision=no", "tracking.wandb_mode=offline",
            f"train.output_dir={out}", "train.log_every_steps=5",
            "optim.batch_policy=scale"]  # batch 8 per process also in the multi-process tests (no-op for one)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Without this, a rank leaving while gloo's threads still talk to the other rank can abort at exit
# ("terminate called without an active exception", seen once under load).
_CLOSE_GROUP = """
import torch.distributed as _dist
if _dist.is_initialized():
    _dist.barrier()
    _dist.destroy_process_group()
"""


def run_ranks(script: str, world: int = 2, timeout: float = 120, cwds: list[Path] | None = None,
              args: list[str] | None = None) -> list[subprocess.CompletedProcess]:
    """Run `python -c script` as `world` real gloo ranks (RANK/WORLD_SIZE/MASTER_* in the environment, as torchrun
    sets them); a rank that hangs fails the test after `timeout` seconds instead of blocking the suite."""
    port = str(free_port())
    procs = []
    for rank in range(world):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": port, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
               "LOCAL_WORLD_SIZE": str(world), "PYTHONPATH": str(ROOT)}
        procs.append(subprocess.Popen([PYTHON, "-c", script + _CLOSE_GROUP, *(args or [])],
                                      cwd=cwds[rank] if cwds else ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    done = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=timeout)
            done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return done


def train_tiny_classifier(manifest: Path, out: Path, steps: int = 60) -> Path:
    run_cmd([PYTHON, "explainer/train_classifier.py", "--config", "configs/classifier/synthetic.yaml",
             *tiny_overrides(manifest, out), f"train.max_steps={steps}", "train.val_every_steps=20"])
    return out / "classifier.pt"




def colour_classifier(gain: float):
    """A frozen toy classifier: logit_k = gain * mean(relu(channel k - 0.1)) - 2 for k in (red, green), so class k
    is present iff enough of channel k is lit. Its right attribution is known exactly, which the baseline and
    evaluation tests rely on."""
    import torch
    from torch import nn

    from explainer.models import freeze

    conv = nn.Conv2d(3, 2, 1)
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.fill_(-0.1)
        conv.weight[0, 0] = 1.0
        conv.weight[1, 1] = 1.0
    head = nn.Linear(2, 2)
    with torch.no_grad():
        head.weight.copy_(gain * torch.eye(2))
        head.bias.fill_(-2.0)
    return freeze(nn.Sequential(conv, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(1), head))
