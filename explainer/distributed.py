"""Process-group set-up shared by every entry point (python, torchrun, accelerate launch, SLURM tasks).

Accelerate reads RANK / WORLD_SIZE / MASTER_ADDR from the environment, whoever exported them (torchrun, accelerate
launch, or submitit's TorchDistributedEnvironment in a SLURM task). On a machine without CUDA we force its CPU mode,
so that a multi-process world uses gloo instead of each process believing it is rank 0
(docs/dependencies.md#accelerate-cpu).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import random
import socket
import uuid
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DDPCommunicationHookType, DistributedDataParallelKwargs, InitProcessGroupKwargs

from explainer.atomic import write_text_atomic
from explainer.config import TrainConfig
from explainer.run_errors import UserError, os_reason


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


class DeviceBindingError(RuntimeError):
    """This process cannot tell which GPU is its own; the message says how to launch instead."""


def choose_cuda_device(local_rank: int, local_world_size: int | None, visible: int) -> int:
    """Index (among the GPUs this process sees) of this process's GPU, for both ways sites hand out GPUs:

    * every task sees all the node's GPUs (plain `srun`, torchrun): GPU `local_rank`;
    * every task sees exactly one GPU (`--gpus-per-task=1`, `--gpu-bind=single:1`, cgroup binding): GPU 0.
    Anything else (say 2 GPUs visible to each of 8 tasks) is ambiguous: fail now, not with "invalid device ordinal"
    in DDP after the job waited in the queue.
    """
    if visible < 1:
        raise DeviceBindingError(f"local rank {local_rank}: CUDA is available but no GPU is visible "
                                 f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})")
    if local_rank < visible and (local_world_size is None or local_world_size <= visible):
        return local_rank
    if visible == 1:
        return 0
    raise DeviceBindingError(
        f"local rank {local_rank} of {local_world_size or '?'} tasks on this node sees {visible} GPUs "
        f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}): give every task either all the node's "
        f"GPUs or exactly one (launch/submit.py: one task per GPU, --gpus-per-node N; under srun: --gpus-per-task=1 "
        f"or --gpu-bind=none; torchrun: --nproc_per_node = GPUs)")


def _env_int(environ: Mapping[str, str], *names: str) -> int | None:
    for name in names:
        value = environ.get(name, "")
        if value.strip().isdigit():
            return int(value)
    return None


def bind_local_device(environ: MutableMapping[str, str] | None = None, device_count: int | None = None) -> int | None:
    """Pick this process's GPU before accelerate does, and make accelerate agree (returns its index, or None for a
    single process).

    accelerate takes `cuda:LOCAL_RANK % device_count` but hands DDP `device_ids=[LOCAL_RANK]`, which is an invalid
    device ordinal for ranks 1..N-1 where each task sees one GPU. There LOCAL_RANK is set to the chosen index (0),
    so both agree; the node-local rank the launcher gave stays in EXPLAINER_NODE_LOCAL_RANK. Nothing of ours uses
    LOCAL_RANK for data (ranks come from RANK).
    """
    environ = os.environ if environ is None else environ
    world = _env_int(environ, "WORLD_SIZE")  # torch's world: a plain `python` inside an allocation is one process
    if world is None or world <= 1:
        return None
    local_rank = _env_int(environ, "LOCAL_RANK", "SLURM_LOCALID")
    if local_rank is None:
        raise DeviceBindingError("WORLD_SIZE > 1 but neither LOCAL_RANK nor SLURM_LOCALID is set: start the processes "
                                 "with torchrun, accelerate launch or launch/submit.py")
    visible = torch.cuda.device_count() if device_count is None else device_count
    index = choose_cuda_device(local_rank, _env_int(environ, "LOCAL_WORLD_SIZE"), visible)
    if index != local_rank or "LOCAL_RANK" not in environ:
        environ.setdefault("EXPLAINER_NODE_LOCAL_RANK", str(local_rank))
        environ["LOCAL_RANK"] = str(index)
    return index


def check_gpus_visible(environ: Mapping[str, str] | None = None, cuda_available: bool | None = None) -> None:
    """A job that was given GPUs must not silently train on the CPU (CPU-only torch build, driver not loaded)."""
    environ = os.environ if environ is None else environ
    cuda_available = torch.cuda.is_available() if cuda_available is None else cuda_available
    gpus = _env_int(environ, "SLURM_GPUS_ON_NODE")
    if gpus and not cuda_available:
        raise DeviceBindingError(f"SLURM gave this job {gpus} GPU(s) on this node but torch.cuda.is_available() is "
                                 f"False (torch {torch.__version__}: a CPU-only build, or no driver); not training on "
                                 "the CPU")


def ddp_kwargs(train: TrainConfig, *, cuda: bool, world_size: int) -> DistributedDataParallelKwargs:
    """DDP options from the config. broadcast_buffers (null = auto): rank 0's BatchNorm statistics are broadcast
    before every forward unless they are already equal everywhere (SyncBatchNorm, which the trainer uses only on CUDA
    with > 1 process); a frozen BatchNorm can set it off explicitly."""
    broadcast = train.ddp_broadcast_buffers
    if broadcast is None:
        broadcast = not (train.sync_batchnorm and cuda and world_size > 1)
    hooks = {"none": DDPCommunicationHookType.NO, "fp16": DDPCommunicationHookType.FP16,
             "bf16": DDPCommunicationHookType.BF16}
    # find_unused_parameters=False: the explainer's aux/unused heads are disabled, every parameter gets a gradient
    return DistributedDataParallelKwargs(find_unused_parameters=False,
                                         gradient_as_bucket_view=train.ddp_gradient_as_bucket_view,
                                         broadcast_buffers=broadcast, bucket_cap_mb=train.ddp_bucket_cap_mb,
                                         comm_hook=hooks[train.ddp_comm_hook])


def process_group_kwargs(timeout_min: float) -> InitProcessGroupKwargs:
    """The timeout every collective of the run gets (init_process_group's `timeout`). accelerate forwards only values
    that differ from the class default (10 min), so exactly 10 min leaves gloo at torch's 30."""
    return InitProcessGroupKwargs(timeout=datetime.timedelta(minutes=timeout_min))


def make_accelerator(mixed_precision: str, log_with: str | None, project_dir: str,
                     train: TrainConfig | None = None) -> Accelerator:
    """One Accelerator per run. CPU-only machines get gloo. accelerate ignores 'fp16' on CPU (no autocast, no
    scaler), so there it is told 'no' and explainer.precision.Precision does fp16 autocast and loss scaling itself.

    On CUDA: this process's GPU is chosen from what it can see (bind_local_device), cuDNN autotuning is on
    (train.cudnn_benchmark), and DDP gets the train.ddp_* options; every process group gets
    train.process_group_timeout_min. With several processes, every rank must see `project_dir` (the run folder) as
    rank 0 does: the trainer checks it (check_shared_run_folder) once rank 0 holds the folder's lock.
    """
    train = train if train is not None else TrainConfig()
    use_cpu = not torch.cuda.is_available()
    check_gpus_visible(cuda_available=not use_cpu)
    if use_cpu:
        os.environ.setdefault("ACCELERATE_USE_CPU", "1")
        if mixed_precision == "fp16":
            mixed_precision = "no"  # fp16 on CPU: autocast + GradScaler("cpu") by explainer.precision
    else:
        bind_local_device()
        torch.backends.cudnn.benchmark = train.cudnn_benchmark
    world_size = _env_int(os.environ, "WORLD_SIZE") or 1
    accelerator = Accelerator(
        cpu=use_cpu,
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=1,  # the trainer accumulates by hand (exact resume on a step boundary)
        log_with=log_with,
        project_dir=project_dir,
        kwargs_handlers=[ddp_kwargs(train, cuda=not use_cpu, world_size=world_size),
                         process_group_kwargs(train.process_group_timeout_min)],
    )
    return accelerator


def make_state(timeout_min: float) -> Any:
    """accelerate's process state for evaluation-style entry points (no model wrapping): same device choice and
    process-group timeout as training; gloo without CUDA."""
    from accelerate import PartialState

    cpu = not torch.cuda.is_available()
    check_gpus_visible(cuda_available=not cpu)
    if cpu:
        os.environ.setdefault("ACCELERATE_USE_CPU", "1")
    else:
        bind_local_device()
    return PartialState(cpu=cpu, timeout=datetime.timedelta(minutes=timeout_min))


def seed_everything(seed: int) -> None:
    """Same initial weights on every rank (DDP also broadcasts them, this keeps 1- and N-process runs equal)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def any_flag(accelerator: Accelerator, flags: torch.Tensor) -> bool:
    """True on every rank if any element of `flags` (a small device tensor, > 0 = set) is set on any rank.

    One collective and one device-to-host copy: the trainer calls it once per optimizer step, never per micro-batch.
    """
    flags = flags.detach().float().reshape(-1).amax()
    if accelerator.num_processes > 1:
        flags = accelerator.reduce(flags.reshape(1), reduction="sum")
    return bool(flags.item() > 0)


def max_over_ranks(accelerator: Accelerator, values: torch.Tensor) -> list[float]:
    """Element-wise maximum of a small device vector over all ranks, on every rank: several flags (> 0 = set) or
    codes decided in ONE collective and one device-to-host copy (the trainer's once-per-step decision)."""
    values = values.detach().float().reshape(-1)
    if accelerator.num_processes > 1:
        values = values.clone()
        torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.MAX)
    return values.tolist()


def all_reduce_sums(
    accelerator: Accelerator, sums: dict[str, float], keys: list[str] | tuple[str, ...]
) -> dict[str, float]:
    """Sum a dict of floats over ranks, in the fixed key order `keys` that every rank passes alike.

    The collective always runs (also with no local batch: missing keys count 0), so ranks whose data differ (one saw
    a segmented image, another none) still line up; a key outside `keys` is a bug and raises before the collective.
    """
    unknown = sorted(set(sums) - set(keys))
    if unknown:
        raise KeyError(f"all_reduce_sums: keys {unknown} are not in the fixed key set {list(keys)}")
    values = torch.tensor([float(sums.get(k, 0.0)) for k in keys], dtype=torch.float64, device=accelerator.device)
    if accelerator.num_processes > 1:
        values = accelerator.reduce(values, reduction="sum")
    return {k: float(v) for k, v in zip(keys, values.tolist())}


def close_process_group() -> None:
    """Leave the process group cleanly at the end of an entry point. A rank that exits while gloo's threads still
    serve the others can abort at interpreter exit ("terminate called without an active exception") after a
    successful run; destroying the group first avoids it (NCCL also warns without it)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


class RunFolderNotShared(RuntimeError):
    """Some ranks do not see rank 0's run folder: checkpoints, resume and the summary would silently split."""


SHARED_TOKEN = ".rank0-token"


def check_shared_run_folder(accelerator: Accelerator, run_dir: str | os.PathLike) -> None:
    """Every rank must see the run folder rank 0 writes (checkpoints are written by all ranks and resumed from rank
    0's choice). Rank 0 writes a fresh token file there and broadcasts its path and content (a barrier); every rank
    reads it, and if any rank cannot, all ranks raise the same RunFolderNotShared naming those ranks and hosts.
    Call it once rank 0 holds the run folder's lock (a second run into the folder is then refused as busy, not
    mistaken for a folder that is not shared); rank 0 failing to write the token raises on every rank.
    One process: nothing to check."""
    if accelerator.num_processes <= 1:
        return
    path = Path(run_dir).absolute() / SHARED_TOKEN  # this rank's view of the run folder
    sent: list[Any] = [None, None]
    if accelerator.is_main_process:
        sent[0] = f"{socket.gethostname()} {os.getpid()} {uuid.uuid4().hex}"
        try:
            write_text_atomic(path, sent[0])
        except OSError as exc:  # read-only, full: said on every rank instead of leaving them in the broadcast
            sent[1] = f"train.output_dir {path.parent}: rank 0 cannot write {path.name} there ({os_reason(exc)})"
    torch.distributed.broadcast_object_list(sent, src=0)
    if sent[1] is not None:
        raise UserError(sent[1])
    try:
        seen = path.read_text() == sent[0]
    except OSError:
        seen = False
    views: list[Any] = [None] * accelerator.num_processes
    torch.distributed.all_gather_object(views, (socket.gethostname(), str(path.parent), seen))
    if accelerator.is_main_process:
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)  # every rank has read it (all_gather is collective)
    main_host, main_dir, _ = views[0]
    blind = [f"rank {rank} on {host}" + ("" if folder == main_dir else f" (its folder: {folder})")
             for rank, (host, folder, ok) in enumerate(views) if not ok]
    if blind:
        raise RunFolderNotShared(
            f"train.output_dir {main_dir} is not shared: {', '.join(blind)} cannot read the token file rank 0 "
            f"(on {main_host}) wrote there. The run folder, the shards (data.manifest) and the classifier must be "
            "on a filesystem every node mounts at the same path (README, SLURM section)")
