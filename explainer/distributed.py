"""Process-group set-up shared by every entry point (python, torchrun, accelerate launch, SLURM tasks).

Accelerate reads RANK / WORLD_SIZE / MASTER_ADDR from the environment, whoever exported them (torchrun, accelerate
launch, or submitit's TorchDistributedEnvironment in a SLURM task). On a machine without CUDA we force its CPU mode,
so that a multi-process world uses gloo instead of each process believing it is rank 0 (LIBRARIES.md).
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs


@dataclass(frozen=True)
class WorldInfo:
    rank: int
    world_size: int
    local_rank: int
    is_main: bool


def world_from(accelerator: Accelerator) -> WorldInfo:
    return WorldInfo(
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        local_rank=accelerator.local_process_index,
        is_main=accelerator.is_main_process,
    )


def make_accelerator(mixed_precision: str, log_with: str | None, project_dir: str) -> Accelerator:
    """One Accelerator per run. CPU-only machines get gloo; mixed precision 'fp16' on CPU falls back to fp32."""
    use_cpu = not torch.cuda.is_available()
    if use_cpu:
        os.environ.setdefault("ACCELERATE_USE_CPU", "1")
        if mixed_precision == "fp16":
            # accelerate would silently run fp32 anyway (no fp16 autocast on CPU); say it out loud instead.
            print("[explainer] mixed_precision=fp16 is not available on CPU; running fp32 (use bf16 for CPU autocast)")
            mixed_precision = "no"
    return Accelerator(
        cpu=use_cpu,
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=1,  # the trainer accumulates by hand (exact resume on a step boundary)
        log_with=log_with,
        project_dir=project_dir,
        # The explainer's aux/unused heads are disabled, so every parameter gets a gradient each step.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)],
    )


def seed_everything(seed: int) -> None:
    """Same initial weights on every rank (DDP also broadcasts them, this keeps 1- and N-process runs equal)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def any_true(accelerator: Accelerator, flag: bool) -> bool:
    """True on every rank if `flag` is true on any rank (so all ranks take the same branch; no DDP hang)."""
    if accelerator.num_processes == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(value, reduction="sum").item() > 0)


def all_reduce_sums(accelerator: Accelerator, sums: dict[str, float]) -> dict[str, float]:
    """Sum a dict of floats over ranks (deterministic key order)."""
    if accelerator.num_processes == 1 or not sums:
        return dict(sums)
    keys = sorted(sums)
    values = torch.tensor([float(sums[k]) for k in keys], dtype=torch.float64, device=accelerator.device)
    values = accelerator.reduce(values, reduction="sum")
    return {k: float(v) for k, v in zip(keys, values.tolist())}
