"""Submitting Explainer training to SLURM (or running it locally) through submitit.

The launcher is kept apart from the trainer: every task of a job exports the torch.distributed environment from
SLURM's variables and calls the same `explainer.train.run(cfg)` that `python explainer/train.py` and torchrun use, so
single-node, multi-node, local and debug runs share one code path. One task per GPU (CPU-only: `tasks_per_node`).

Preemption and time limits: `TrainJob` is submitit-Checkpointable. On the preemption signal (USR2, `signal_delay_s`
before the limit, or sent by the scheduler) during training, every rank finishes its step and writes a checkpoint
(explainer/signals.py); then submitit's handler calls `checkpoint()` on global rank 0 only; it returns the same job
with `train.resume=auto` and the same W&B run id, and submitit requeues it. Nothing collective happens there: the
requeued job continues from the newest complete checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import shlex
import shutil
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import submitit
from submitit.core.utils import FailedJobError, UncompletedJobError
from submitit.slurm.slurm import SlurmExecutor

from explainer.config import ConfigError, ExplainerRunConfig
from explainer.data.remote import is_url
from explainer.logs import configure_logging, get_logger

log = get_logger(__name__)


class LaunchError(RuntimeError):
    """The job cannot be submitted from here (no sbatch, ...); the message says what to do instead."""


Cluster = Literal["slurm", "local", "debug"]
TORCH_DIST_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
# Requeues after a time-out (preemptions do not count): a 100-epoch COCO run on 12 h slots needs several.
MAX_TIMEOUT_REQUEUES = 20
# Defaults per task when --cpus-per-task / --mem-gb are not given: the main process feeding the GPU, a spare core
# (pin-memory thread, logging, checkpoint writes) and one core per decode worker; memory for the main process (CUDA
# context, pinned batches) plus each worker's shuffle buffer of encoded images and decoded batches in flight.
EXTRA_CPUS_PER_TASK = 2
MEM_GB_PER_TASK = {"gpu": 8.0, "cpu": 2.0}
MEM_GB_PER_WORKER = {"gpu": 2.0, "cpu": 1.0}


@dataclass
class JobSpec:
    """Resources of one job (or of each job of an array), in the launcher's own terms."""

    cluster: Cluster = "slurm"
    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int | None = None  # default: gpus_per_node, or 1 without GPUs
    cpus_per_task: int | None = None  # default: data.num_workers + 2 (with_defaults)
    mem_gb: float | None = None  # per node; default: tasks x per-task default (with_defaults); 0: partition default
    time_min: int = 60
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    exclude: str | None = None
    array_parallelism: int = 16
    signal_delay_s: int = 120
    name: str = "explainer"

    @property
    def ntasks_per_node(self) -> int:
        if self.tasks_per_node is not None:
            return self.tasks_per_node
        return self.gpus_per_node if self.gpus_per_node > 0 else 1

    def with_defaults(self, num_workers: int) -> JobSpec:
        """CPUs and memory filled in from the run's data.num_workers where the user gave none: without them SLURM
        gives a task one CPU (all decode workers on one core) and the partition's default memory."""
        kind = "gpu" if self.gpus_per_node > 0 else "cpu"
        cpus = self.cpus_per_task if self.cpus_per_task is not None else num_workers + EXTRA_CPUS_PER_TASK
        if self.mem_gb is not None:
            mem = self.mem_gb
        else:
            mem = self.ntasks_per_node * (MEM_GB_PER_TASK[kind] + MEM_GB_PER_WORKER[kind] * num_workers)
        return dataclasses.replace(self, cpus_per_task=cpus, mem_gb=mem)

    def check(self, num_workers: int | None = None) -> None:
        """Errors that sbatch would only report after queueing (or never, for a silently wrong layout). With
        `num_workers` (data.num_workers of the run), also whether each task has a core per decode worker."""
        problems = []
        if self.nodes < 1:
            problems.append(f"--nodes must be >= 1, got {self.nodes}")
        if self.gpus_per_node < 0:
            problems.append(f"--gpus-per-node must be >= 0, got {self.gpus_per_node}")
        if self.tasks_per_node is not None and self.tasks_per_node < 1:
            problems.append(f"--tasks-per-node must be >= 1, got {self.tasks_per_node}")
        if self.gpus_per_node > 0 and self.tasks_per_node not in (None, self.gpus_per_node):
            problems.append(f"one task per GPU: --tasks-per-node {self.tasks_per_node} conflicts with "
                            f"--gpus-per-node {self.gpus_per_node} (leave --tasks-per-node out)")
        if self.time_min < 1:
            problems.append(f"--time must be >= 1 minute, got {self.time_min}")
        if self.cpus_per_task is not None and self.cpus_per_task < 1:
            problems.append(f"--cpus-per-task must be >= 1, got {self.cpus_per_task}")
        elif self.cpus_per_task is not None and num_workers is not None and self.cpus_per_task < num_workers + 1:
            problems.append(f"--cpus-per-task {self.cpus_per_task} leaves no core for the main process next to "
                            f"data.num_workers={num_workers} decode workers: give at least {num_workers + 1} "
                            f"(default {num_workers + EXTRA_CPUS_PER_TASK}) or lower data.num_workers")
        if self.mem_gb is not None and self.mem_gb < 0:
            problems.append(f"--mem-gb must be >= 0 (0: the partition's default), got {self.mem_gb}")
        if self.array_parallelism < 1:
            problems.append(f"--array-parallelism must be >= 1, got {self.array_parallelism}")
        if self.cluster in ("local", "debug") and self.nodes != 1:
            problems.append(f"--cluster {self.cluster} runs on this machine only: --nodes must be 1, got {self.nodes} "
                            "(several nodes on one machine: `launch/local_slurm.sh start --nodes 2`, then "
                            "--cluster slurm with SLURM_CONF from `launch/local_slurm.sh env`)")
        if self.cluster == "debug" and self.ntasks_per_node != 1:
            problems.append("--cluster debug runs one task in this process; use --cluster local for several tasks")
        if problems:
            raise ConfigError("; ".join(problems))

    def executor_parameters(self) -> dict[str, Any]:
        """AutoExecutor parameters: generic names plus `slurm_`-prefixed ones (ignored by local/debug)."""
        params: dict[str, Any] = {
            "name": self.name,
            "timeout_min": self.time_min,
            "nodes": self.nodes,
            "tasks_per_node": self.ntasks_per_node,
            "slurm_signal_delay_s": self.signal_delay_s,
            "slurm_array_parallelism": self.array_parallelism,
        }
        if self.gpus_per_node > 0:
            params["gpus_per_node"] = self.gpus_per_node
        if self.cpus_per_task is not None:
            params["cpus_per_task"] = self.cpus_per_task
        if self.mem_gb:  # 0 or None: the partition's default
            params["mem_gb"] = self.mem_gb
        for key in ("partition", "account", "qos", "constraint", "exclude"):
            value = getattr(self, key)
            if value:
                params[f"slurm_{key}"] = value
        return params


# ----------------------------------------------------------------------------------------------------------------------
# What runs inside every task
# ----------------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def torch_distributed_env() -> Iterator[submitit.helpers.TorchDistributedEnvironment]:
    """Export MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK from the job (SLURM, local or debug) for env:// init.

    CUDA_VISIBLE_DEVICES is left alone: each task then takes its GPU from what it sees, whether the site shows it
    all the node's GPUs or only its own (explainer.distributed.bind_local_device). The previous values come back
    afterwards, which matters for debug jobs (they run inside the submitting process).
    """
    saved = {key: os.environ.get(key) for key in TORCH_DIST_VARS}
    dist_env = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    try:
        yield dist_env
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class TrainJob(submitit.helpers.Checkpointable):
    """One training run as a submitit job: the callable every task of the job executes."""

    def __init__(self, cfg: ExplainerRunConfig):
        self.cfg = cfg

    def __call__(self) -> dict[str, Any]:
        cfg = copy.deepcopy(self.cfg)
        if int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0 and cfg.train.resume is None:
            cfg.train.resume = "auto"  # requeued by SLURM itself (node failure): continue, do not restart
        threads = os.environ.get("SLURM_CPUS_PER_TASK")
        if threads and "OMP_NUM_THREADS" not in os.environ:
            import torch

            # the decode workers have their own cores (single-threaded each); the main process gets the rest
            torch.set_num_threads(max(1, int(threads) - cfg.data.num_workers))
        with torch_distributed_env() as dist_env:
            from explainer.train import run

            configure_logging(dist_env.rank)
            if dist_env.rank == 0:
                log.info("task rank %d/%d master %s:%s output %s resume=%s", dist_env.rank, dist_env.world_size,
                         dist_env.master_addr, dist_env.master_port, cfg.train.output_dir, cfg.train.resume)
            summary = run(cfg)
            launcher = {"rank": dist_env.rank, "world_size": dist_env.world_size, "local_rank": dist_env.local_rank,
                        "master_addr": dist_env.master_addr, "master_port": dist_env.master_port,
                        "job_id": submitit.JobEnvironment().job_id, "host": socket.gethostname(),
                        "restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)}
        return {**summary, "launcher": launcher}

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """Rank 0 only, from the signal handler: requeue this run so that it resumes. No collective calls here."""
        cfg = copy.deepcopy(self.cfg)
        cfg.train.resume = "auto"
        log.warning("preempted or timed out: requeueing %s with train.resume=auto (W&B run %s)",
                    cfg.train.output_dir, cfg.tracking.run_id)
        return submitit.helpers.DelayedSubmission(TrainJob(cfg))


# ----------------------------------------------------------------------------------------------------------------------
# Checks before anything is queued
# ----------------------------------------------------------------------------------------------------------------------

_PATH_FIELDS = (("data", "manifest"), ("classifier", "checkpoint"), ("classifier", "imagenet_weights"),
                ("explainer", "backbone_weights"), ("train", "output_dir"), ("classifier", "torchscript"))


def prepare_config(cfg: ExplainerRunConfig, *, new_run: bool = True, cluster: Cluster = "local") -> ExplainerRunConfig:
    """Absolute paths (jobs must not depend on the submitting shell's cwd), a fixed W&B run id, W&B offline in SLURM
    tasks unless asked for online, and the checks that would otherwise fail minutes later on a compute node. Raises
    ConfigError naming the key."""
    cfg = copy.deepcopy(cfg)
    if cluster == "slurm" and cfg.tracking.wandb_mode == "auto":
        # 'auto' means online wherever an API key is found, and compute nodes often have no internet: rank 0 would
        # stall in wandb.init while the other ranks wait in their first collective. `wandb sync` uploads later.
        cfg.tracking.wandb_mode = "offline"
    for section, key in _PATH_FIELDS:
        owner = getattr(cfg, section)
        value = getattr(owner, key)
        if value and not is_url(value):  # data.manifest may be s3://... (explainer/data/remote.py)
            setattr(owner, key, str(Path(value).expanduser().absolute()))
    if cfg.train.resume not in (None, "auto"):
        cfg.train.resume = str(Path(cfg.train.resume).absolute())
    manifest = cfg.data.manifest if is_url(cfg.data.manifest) else Path(cfg.data.manifest)
    if isinstance(manifest, Path) and not manifest.is_file():
        raise ConfigError(f"data.manifest: {manifest} does not exist (make it with `python launch/make_shards.py`)")
    from explainer.data.loader import read_data_manifest

    try:
        splits = read_data_manifest(cfg.data).splits
    except (ValueError, OSError, KeyError) as exc:
        raise ConfigError(f"data.manifest: {exc}") from exc
    for key in ("train_split", "val_split"):
        split = getattr(cfg.data, key)
        if split not in splits:
            raise ConfigError(f"data.{key}: split {split!r} is not in {manifest} (has: {', '.join(sorted(splits))})")
    clf = cfg.classifier
    if not (clf.checkpoint or clf.torchvision or clf.factory or clf.torchscript):
        raise ConfigError("classifier.checkpoint is required (train one with explainer/train_classifier.py), or "
                          "classifier.torchvision / classifier.factory / classifier.torchscript")
    for section, key in _PATH_FIELDS[1:4]:
        value = getattr(getattr(cfg, section), key)
        if value and not Path(value).is_file():
            raise ConfigError(f"{section}.{key}: {value} does not exist")
    out = Path(cfg.train.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"train.output_dir: {out} exists and is not a folder")
    if new_run and cfg.train.resume is None and (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir()):
        raise ConfigError(f"train.output_dir: {out} already holds checkpoints; pass train.resume=auto to continue that "
                          "run, or choose another train.output_dir")
    if not cfg.tracking.run_id:
        cfg.tracking.run_id = new_run_id()
    return cfg


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


# ----------------------------------------------------------------------------------------------------------------------
# Executors, submission and the dry-run script
# ----------------------------------------------------------------------------------------------------------------------


def make_executor(spec: JobSpec, folder: str | os.PathLike) -> submitit.AutoExecutor:
    """AutoExecutor for the chosen cluster; the job folder gets one sub-folder per job id (%j)."""
    if spec.cluster == "slurm" and shutil.which("sbatch") is None:
        raise LaunchError("--cluster slurm: sbatch not found on PATH; run this on a SLURM login node, use "
                           "--cluster local, or start the test cluster with `launch/local_slurm.sh start`")
    executor = submitit.AutoExecutor(folder=Path(folder) / "%j", cluster=spec.cluster,
                                     slurm_max_num_timeout=MAX_TIMEOUT_REQUEUES)
    executor.update_parameters(**spec.executor_parameters())
    return executor


class _ScriptOnlySlurmExecutor(SlurmExecutor):
    """SlurmExecutor that only renders sbatch scripts, so a dry run also works where srun is not installed."""

    @classmethod
    def affinity(cls) -> int:
        return 2


def render_sbatch(spec: JobSpec, folder: str | os.PathLike, array_size: int | None = None) -> str:
    """The sbatch script submitit would submit for `spec` (same parameter translation as AutoExecutor)."""
    executor = _ScriptOnlySlurmExecutor(Path(folder) / "%j", max_num_timeout=MAX_TIMEOUT_REQUEUES)
    params = spec.executor_parameters()
    generic = {k: v for k, v in params.items() if not k.startswith("slurm_")}
    specific = {k[len("slurm_"):]: v for k, v in params.items() if k.startswith("slurm_")}
    executor.update_parameters(**executor._convert_parameters(generic), **specific)
    if array_size is not None and array_size > 1:
        executor.parameters["map_count"] = array_size  # what SlurmExecutor sets for a job array
    return executor._make_submission_file_text(executor._submitit_command_str, uid="dry-run")


def describe_local(spec: JobSpec, folder: str | os.PathLike, n_runs: int) -> str:
    """Dry run for --cluster local/debug: there is no script, say what would run where."""
    where = "in this process (pdb on failure)" if spec.cluster == "debug" else "as local subprocesses"
    return (f"# --cluster {spec.cluster}: {n_runs} run(s) of {spec.ntasks_per_node} task(s) each, {where}\n"
            f"# job folder: {Path(folder).absolute() / '%j'}\n"
            f"# python: {shlex.quote(sys.executable)} -u -m submitit.core._submit <job folder>\n")


def submit_run(cfg: ExplainerRunConfig, spec: JobSpec, job_dir: str | os.PathLike) -> submitit.Job:
    executor = make_executor(spec, job_dir)
    return executor.submit(TrainJob(cfg))


def submit_array(cfgs: list[ExplainerRunConfig], spec: JobSpec, job_dir: str | os.PathLike) -> list[submitit.Job]:
    """One SLURM job array (parallelism capped by spec.array_parallelism); one TrainJob per config."""
    executor = make_executor(spec, job_dir)
    jobs = []
    with executor.batch():
        for cfg in cfgs:
            jobs.append(executor.submit(TrainJob(cfg)))
    return jobs


def job_log_paths(job: submitit.Job) -> tuple[Path, Path]:
    return job.paths.stdout, job.paths.stderr


# ----------------------------------------------------------------------------------------------------------------------
# What launch/submit.py calls
# ----------------------------------------------------------------------------------------------------------------------


def _wait_local(jobs: list[submitit.Job]) -> list[dict[str, Any]]:
    """local/debug jobs run on this machine: wait and report (debug jobs only run when their result is asked for)."""
    summaries = []
    for job in jobs:
        try:
            s = job.results()[0]
        except (FailedJobError, UncompletedJobError) as exc:
            raise LaunchError(f"job {job.job_id} failed; logs: {job.paths.stdout}, {job.paths.stderr}\n{exc}") from None
        summaries.append(s)
        print(f"job {job.job_id} done: {s.get('steps')}/{s.get('total_steps')} steps, best val loss "
              f"{s.get('best_val_loss')}, world size {s.get('world_size')} -> {s.get('output_dir')}")
    return summaries


def _resources(spec: JobSpec) -> str:
    gpus = f", {spec.gpus_per_node} GPU(s) per node" if spec.gpus_per_node else ""
    part = f", partition {spec.partition}" if spec.partition else ""
    cpus = f", {spec.cpus_per_task} CPU(s) per task" if spec.cpus_per_task else ""
    mem = f", {spec.mem_gb:g} GB per node" if spec.mem_gb else (", partition's default memory"
                                                               if spec.mem_gb == 0 else "")
    return f"{spec.nodes} node(s) x {spec.ntasks_per_node} task(s){gpus}{cpus}{mem}{part}, {spec.time_min} min"


def launch_run(config: str | Path, overrides: list[str], spec: JobSpec, job_dir: str | Path | None,
               dry_run: bool) -> list[submitit.Job]:
    """Validate, then submit one training run (or print what would be submitted)."""
    from explainer.config import load_config

    cfg = prepare_config(load_config(ExplainerRunConfig, config, overrides), cluster=spec.cluster)
    spec.check(cfg.data.num_workers)
    spec = spec.with_defaults(cfg.data.num_workers)
    out = Path(cfg.train.output_dir)
    folder = Path(job_dir).absolute() if job_dir else out / "submitit"
    if spec.name == "explainer":
        spec.name = out.name if out.name.startswith("explainer") else f"explainer-{out.name}"
    if dry_run:
        print(f"# dry run: nothing submitted. Output: {out}, W&B run id {cfg.tracking.run_id} "
              f"({cfg.tracking.wandb_mode}), {_resources(spec)}", file=sys.stderr)
        print(render_sbatch(spec, folder) if spec.cluster == "slurm" else describe_local(spec, folder, 1), end="")
        return []
    job = submit_run(cfg, spec, folder)
    stdout, stderr = job_log_paths(job)
    print(f"submitted job {job.job_id} ({spec.cluster}: {_resources(spec)})")
    print(f"  logs:    {stdout}\n           {stderr}  (rank 0; other ranks: {stdout.parent}/*_log.*)")
    print(f"  outputs: {out}  (config.yaml, metrics.jsonl, checkpoints/, summary.json, {out / 'explainer.pt'})")
    print(f"  W&B run: {cfg.tracking.run_id} ({cfg.tracking.wandb_mode}; kept when the job is requeued after "
          "preemption or time-out)")
    if cfg.tracking.wandb_mode == "offline":
        print(f"           upload later: wandb sync {out}/wandb/offline-run-*  (tracking.wandb_mode=online: live)")
    if spec.cluster == "slurm":
        print(f"  follow:  tail -f {stdout}   |   squeue -j {job.job_id}   |   scancel {job.job_id}")
    else:
        _wait_local([job])
    return [job]


def launch_sweep(sweep_file: str | Path, config: str | Path | None, overrides: list[str], spec: JobSpec,
                 job_dir: str | Path | None, dry_run: bool) -> list[submitit.Job]:
    """Validate every point, then submit the whole sweep as one job array and write SWEEP_DIR/sweep.json."""
    from explainer.sweep import build_runs, load_sweep, make_sweep_id, write_index

    spec.check()
    sweep = load_sweep(sweep_file)
    sweep_id = make_sweep_id(sweep.name)
    sweep_dir = Path(job_dir).absolute() if job_dir else Path("runs", "sweeps", sweep_id).absolute()
    if (sweep_dir / "sweep.json").exists():
        raise ConfigError(f"--job-dir {sweep_dir} already holds a sweep (sweep.json); choose a new folder")
    runs = build_runs(sweep, sweep_dir, sweep_id, overrides, Path(config) if config else None)
    runs = [dataclasses.replace(r, cfg=prepare_config(r.cfg, cluster=spec.cluster)) for r in runs]
    num_workers = max(r.cfg.data.num_workers for r in runs)
    spec.check(num_workers)
    spec = spec.with_defaults(num_workers)
    if spec.name == "explainer":
        spec.name = f"sweep-{sweep.name}"
    # the plan goes to stderr so that `--dry-run > job.sh` leaves a clean script on stdout
    print(f"# sweep {sweep_id}: {len(runs)} run(s) ({sweep.method}) from {sweep.path}, one job array, at most "
          f"{min(spec.array_parallelism, len(runs))} at a time; {_resources(spec)} each", file=sys.stderr)
    for run in runs:
        print(f"#   {run.index:03d}: {' '.join(run.overrides)} -> {run.cfg.train.output_dir}", file=sys.stderr)
    folder = sweep_dir / "submitit"
    if dry_run:
        print("# dry run: nothing submitted.", file=sys.stderr)
        text = render_sbatch(spec, folder, array_size=len(runs)) if spec.cluster == "slurm" else \
            describe_local(spec, folder, len(runs))
        print(text, end="")
        return []
    jobs = submit_array([r.cfg for r in runs], spec, folder)
    index = {
        "sweep_id": sweep_id, "name": sweep.name, "sweep_file": str(sweep.path.absolute()),
        "base_config": str(Path(config).absolute() if config else sweep.base_config), "method": sweep.method,
        "seed": sweep.seed, "parameters": list(sweep.parameters), "metric": sweep.metric, "maximize": sweep.maximize,
        "common_overrides": [*sweep.overrides, *overrides],
        "cluster": spec.cluster, "array_job_id": jobs[0].job_id.split("_")[0] if jobs else None,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "runs": [{"index": r.index, "params": r.params, "overrides": r.overrides, "output_dir": r.cfg.train.output_dir,
                  "job_id": job.job_id, "stdout": str(job.paths.stdout), "stderr": str(job.paths.stderr),
                  "wandb_run_id": r.cfg.tracking.run_id, "wandb_group": r.cfg.tracking.group}
                 for r, job in zip(runs, jobs)],
    }
    path = write_index(sweep_dir, index)
    what = f"job array {index['array_job_id']}" if spec.cluster == "slurm" else f"{spec.cluster} jobs"
    print(f"submitted {what} ({len(jobs)} runs); index: {path}")
    print(f"  logs:    {folder}/<job id>/   outputs: {sweep_dir}/runs/<index>/")
    print(f"  report:  python launch/sweep_report.py {sweep_dir}")
    if spec.cluster != "slurm":
        _wait_local(jobs)
    return jobs
