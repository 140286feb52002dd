"""The training loop shared by the Explainer and the Explanandum (classifier) trainers.

What differs between the two lives in a `Recipe` (explainer/recipes.py); everything else is here once: process group,
data streams, batch/lr policy, optimiser, precision, gradient accumulation and clipping, non-finite-loss guard,
validation, early stopping, checkpoints with exact resume, tracking.

`fit` only orchestrates. The pieces are module-level functions over one `Run` (the live objects of a run):
`plan_batch` / `plan_steps` (pure), `build_optimizer`, `optimizer_step`, `run_validation`, `after_validation`,
`log_window`, `write_summary`.

The hot loop makes no host sync per micro-batch: the non-finite flag stays on the device and is decided once per
optimizer step, in one collective together with the gradient norm's finiteness; logged terms are summed on the
device and reduced only every `train.log_every_steps`.

Data is NOT passed through `accelerator.prepare` (accelerate would re-split the already rank-split WebDataset
stream); batches are moved to the device here. Gradient accumulation is done by hand with `no_sync`, so a resumed
run restarts exactly on an optimiser-step boundary.
"""

from __future__ import annotations

import contextlib
import dataclasses
import resource
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, Protocol

import torch
from accelerate import Accelerator
from tqdm import tqdm

from explainer.atomic import write_json_atomic
from explainer.config import (
    DataConfig,
    OptimConfig,
    TrainConfig,
    input_normalization,
    save_config,
    to_dict,
    with_absolute_paths,
)
from explainer.data.loader import (
    EvalStream,
    Manifest,
    bad_shard_error,
    batch_image_format,
    make_eval_loader,
    make_train_loader,
    read_data_manifest,
)
from explainer.data.transforms import normalize_on_device
from explainer.distributed import (
    WorldInfo,
    all_reduce_sums,
    check_shared_run_folder,
    close_process_group,
    make_accelerator,
    max_over_ranks,
    seed_everything,
    world_from,
)
from explainer.logs import configure_logging, get_logger
from explainer.precision import Precision
from explainer.run_checkpoints import CheckpointManager, TrainerState, all_finite_on_device
from explainer.run_errors import InputError, RunError, UserError, first_line
from explainer.run_lock import RunLock, acquire_shared
from explainer.run_resume import CHANGES_FILE, check_resume, model_identity, record_changes
from explainer.signals import StopRequest, exit_status, signal_name
from explainer.tracking import RunTracker, wandb_log_with

log = get_logger(__name__)

class TrainingDiverged(RunError):
    """Non-finite losses too often, or non-finite weights at a save; the last finite checkpoint is left untouched."""


@dataclass
class StepResult:
    loss: torch.Tensor
    terms: dict[str, torch.Tensor]
    masks: torch.Tensor | None = None  # per-class masks, for image logging (explainer only)


class Recipe(Protocol):
    """What the generic loop needs from a concrete trainer: its run config and what it does in a step, a
    validation and an export."""

    cfg: Any  # the whole run config; the loop reads its data, optim, train and tracking sections
    kind: str  # "explainer" or "classifier": names the exported file
    drop_unlabelled: bool

    def build_model(self, manifest: Manifest) -> torch.nn.Module: ...

    def setup(self, accelerator: Accelerator, manifest: Manifest) -> None: ...

    def train_step(self, model: torch.nn.Module, batch: dict[str, Any], precision: Precision) -> StepResult: ...

    def val_keys(self, manifest: Manifest) -> tuple[str, ...]:
        """Every key val_sums may return, the same on every rank (the all-reduce is over this fixed list)."""
        ...

    def val_sums(self, model: torch.nn.Module, batch: dict[str, Any], precision: Precision) -> dict[str, float]:
        """Per-batch sums; must contain 'loss' (summed over images) and 'count'."""
        ...

    def val_metrics(self, sums: dict[str, float]) -> dict[str, float]: ...

    def export(self, model: torch.nn.Module, manifest: Manifest, path: Path) -> None: ...


# ----------------------------------------------------------------------------------------------------------------------
# Planning (pure functions)
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchPlan:
    """How the one-process config maps onto N processes (optim.batch_policy)."""

    policy: str
    world_size: int
    per_process_batch: int
    accum: int
    global_batch: int
    lr: float  # peak lr
    lr_factor: float  # lr / optim.lr


def plan_batch(dcfg: DataConfig, ocfg: OptimConfig, world_size: int) -> BatchPlan:
    """reproduce: the global batch stays data.batch_size x accum, split over processes (must divide), lr unchanged.
    scale: every process keeps data.batch_size, lr x world_size (linear scaling rule; warm-up in plan_steps)."""
    accum = ocfg.grad_accum_steps
    if ocfg.batch_policy == "reproduce":
        if dcfg.batch_size % world_size:
            raise InputError(
                f"optim.batch_policy=reproduce keeps the global batch at data.batch_size={dcfg.batch_size} "
                f"(x grad_accum_steps={accum}), which does not divide over {world_size} processes; use a batch size "
                f"divisible by {world_size}, raise optim.grad_accum_steps and lower data.batch_size, or set "
                "optim.batch_policy=scale"
            )
        per_process, factor = dcfg.batch_size // world_size, 1.0
    elif ocfg.batch_policy == "scale":
        per_process, factor = dcfg.batch_size, float(world_size)
    else:
        raise InputError(f"optim.batch_policy must be 'reproduce' or 'scale', got {ocfg.batch_policy!r}")
    return BatchPlan(policy=ocfg.batch_policy, world_size=world_size, per_process_batch=per_process, accum=accum,
                     global_batch=per_process * world_size * accum, lr=ocfg.lr * factor, lr_factor=factor)


@dataclass(frozen=True)
class StepPlan:
    steps_per_epoch: int
    batches_per_epoch: int  # loader batches per rank per epoch
    total_steps: int
    val_every: int
    ckpt_every: int
    warmup_steps: int


def plan_steps(tcfg: TrainConfig, ocfg: OptimConfig, batch: BatchPlan, batches_available: int,
               where: str = "the train split") -> StepPlan:
    accum = batch.accum
    steps_per_epoch = tcfg.steps_per_epoch or batches_available // accum
    if steps_per_epoch < 1:
        raise InputError(f"{where} gives {batches_available} batches per rank, fewer than grad_accum_steps={accum}; "
                         "lower data.batch_size or use fewer processes")
    batches_per_epoch = steps_per_epoch * accum
    if batches_per_epoch > batches_available:
        raise InputError(f"train.steps_per_epoch={steps_per_epoch} needs {batches_per_epoch} batches per rank, but "
                         f"{where} gives {batches_available}")
    total = tcfg.epochs * steps_per_epoch
    if tcfg.max_steps is not None:
        total = min(total, tcfg.max_steps)
    val_every = tcfg.val_every_steps or steps_per_epoch
    default_warmup = total // 20 if batch.lr_factor > 1 else 0  # 5% of the run when scale raised the lr
    warmup = ocfg.warmup_steps if ocfg.warmup_steps is not None else default_warmup
    return StepPlan(steps_per_epoch=steps_per_epoch, batches_per_epoch=batches_per_epoch, total_steps=total,
                    val_every=val_every, ckpt_every=tcfg.checkpoint_every_steps or val_every, warmup_steps=warmup)


def lr_at(step: int, peak: float, warmup_steps: int) -> float:
    """Linear warm-up to the peak over warmup_steps optimizer steps (step counts steps already done), then flat."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return peak
    return peak * (step + 1) / warmup_steps


def build_optimizer(model: torch.nn.Module, ocfg: OptimConfig, lr: float) -> tuple[torch.optim.Optimizer, list]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    if ocfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=ocfg.weight_decay), params
    return torch.optim.SGD(params, lr=lr, weight_decay=ocfg.weight_decay), params


# ----------------------------------------------------------------------------------------------------------------------
# The run's live objects
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class LogWindow:
    """Loss terms summed on the device since the last log (no host sync until the log step)."""

    keys: list[str] = field(default_factory=list)
    sums: torch.Tensor | None = None
    micro_batches: int = 0
    images: int = 0
    start: float = field(default_factory=time.perf_counter)

    def add(self, rows: torch.Tensor, keys: list[str], images: int) -> None:
        """rows: [micro-batches, terms] of one applied step."""
        self.keys = keys
        total = rows.sum(0)
        self.sums = total if self.sums is None else self.sums + total
        self.micro_batches += rows.shape[0]
        self.images += images

    def reset(self) -> None:
        self.sums, self.micro_batches, self.images, self.start = None, 0, 0, time.perf_counter()


@dataclass
class Run:
    recipe: Recipe
    accelerator: Accelerator
    world: WorldInfo
    precision: Precision
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    params: list
    manifest: Manifest
    data: DataConfig  # data config with this process's batch size
    batch: BatchPlan
    plan: StepPlan
    state: TrainerState
    checkpoints: CheckpointManager
    tracker: Any
    val_stream: EvalStream
    run_dir: Path
    norm: dict[str, Any] = field(default_factory=dict)  # the classifier's mean/std (uint8 batches normalised here)
    window: LogWindow = field(default_factory=LogWindow)
    stop: StopRequest = field(default_factory=StopRequest)  # SIGTERM / SIGINT seen by this process
    lock: RunLock | None = None  # the run folder's lock, held by rank 0 for the whole run (explainer/run_lock.py)
    over_cap: int = 0  # this step's largest class count over loss.max_classes_per_image on this rank (0: none)
    train_stream: Any = None  # this rank's TrainStream: its corrupt_samples / problems are the skipped data
    skipped_seen: int = 0  # this rank's skipped samples already added to state.skipped_samples
    skipped_notes: list[str] = field(default_factory=list)  # what was skipped, over all ranks (summary.json)

    @property
    def cfg(self) -> Any:
        """The run config as given (`data` above holds this process's batch size)."""
        return self.recipe.cfg


HOST_LABELS = "labels_host"  # the loader's labels as they came (CPU): what a step reads shapes from without a sync


def _to_device(batch: dict[str, Any], device: torch.device, channels_last: bool,
               dtype: torch.dtype = torch.float32, norm: dict[str, Any] | None = None) -> dict[str, Any]:
    """`norm`: the classifier's mean/std (config.input_normalization) for uint8 batches normalised here. The labels
    are also kept as they came, under HOST_LABELS."""
    out = {HOST_LABELS: batch["labels"]} if isinstance(batch.get("labels"), torch.Tensor) else {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, non_blocking=True)
            if key == "image" and value.dtype == torch.uint8:  # loader image_format "uint8": normalise here
                value = normalize_on_device(value, channels_last=channels_last, **(norm or {}))
            elif key == "image" and channels_last:
                value = value.contiguous(memory_format=torch.channels_last)
            if value.is_floating_point() and value.dtype != dtype:
                value = value.to(dtype)
        out[key] = value
    return out


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# ----------------------------------------------------------------------------------------------------------------------
# One optimizer step
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class StepOutcome:
    applied: bool
    images: dict[str, torch.Tensor] | None = None  # image, labels, masks of the last micro-batch, when logging images
    stop_signal: int = 0  # a SIGTERM / SIGINT reached some rank (the largest signal number): stop after this step


def _train_step(run: Run, batch: dict[str, Any]) -> StepResult:
    """The recipe's step; BatchNorm's refusal of a single value per channel (DeepLabV3's image pooling with one
    image per process) becomes an error naming the settings that cause it."""
    try:
        return run.recipe.train_step(run.model, batch, run.precision)
    except ValueError as exc:
        if "Expected more than 1 value per channel" not in str(exc):
            raise
        raise UserError(
            f"a BatchNorm layer of the model got one value per channel ({first_line(exc)}): this process trains on "
            f"{batch['image'].shape[0]} image(s) per micro-batch (data.batch_size={run.cfg.data.batch_size} over "
            f"{run.world.world_size} process(es), optim.batch_policy={run.cfg.optim.batch_policy}); give each "
            f"process at least 2 images (a larger data.batch_size, fewer processes or optim.batch_policy=scale)"
        ) from exc


def optimizer_step(run: Run, batches: Iterator[dict[str, Any]], keep_images: int = 0) -> StepOutcome:
    """Micro-batches of one optimizer step, then one decision: step, or skip a non-finite step on every rank.

    Backward runs for every micro-batch (also a non-finite one) so DDP's all-reduce stays aligned across ranks;
    a skipped step only zeroes the gradients. `keep_images` > 0 keeps that many images of the last micro-batch.
    """
    model, precision = run.model, run.precision
    accum, device = run.batch.accum, run.accelerator.device
    tcfg = run.cfg.train
    nonfinite = torch.zeros((), device=device)
    rows, keys, images, kept = [], [], 0, None
    run.over_cap = 0
    for micro in range(accum):
        batch = _to_device(cap_classes(run, next(batches)), device, tcfg.channels_last, precision.dtype, run.norm)
        run.state.batches_in_epoch += 1
        last = micro == accum - 1
        with contextlib.nullcontext() if last else run.accelerator.no_sync(model):
            result = _train_step(run, batch)
            loss = result.loss
            nonfinite = nonfinite + (~torch.isfinite(loss.detach())).float()
            precision.backward(loss / accum)
        keys = ["loss", *sorted(k for k in result.terms if k != "loss")]
        rows.append(torch.stack([loss.detach().float(), *(result.terms[k].float() for k in keys[1:])]))
        images += batch["image"].shape[0]
        if last and keep_images and result.masks is not None:
            kept = {"image": batch["image"][:keep_images], "labels": batch["labels"][:keep_images],
                    "masks": result.masks[:keep_images].detach()}
        del result, loss  # the graph is gone after backward; drop this micro-batch's masks now

    clip = run.cfg.optim.grad_clip_norm
    if precision.scaler is None:
        # Gradients are already all-reduced (identical on every rank): their norm joins the loss flag in ONE
        # collective and ONE host sync for the step.
        norm = torch.nn.utils.get_total_norm([p.grad for p in run.params if p.grad is not None])
        bad, stop = _decide_step(run, nonfinite, (~torch.isfinite(norm)).float())
        if not bad and clip is not None:
            torch.nn.utils.clip_grads_with_norm_(run.params, clip, norm)
    else:
        # fp16 with our scaler: inf/nan gradients are the scaler's business (skip + lower the scale); only a
        # non-finite LOSS counts against max_bad_steps.
        bad, stop = _decide_step(run, nonfinite)
        if not bad:
            precision.unscale_(run.optimizer)
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(run.params, clip)
    if bad:
        run.optimizer.zero_grad(set_to_none=True)
        return StepOutcome(applied=False, stop_signal=stop)
    for group in run.optimizer.param_groups:
        group["lr"] = lr_at(run.state.step, run.batch.lr, run.plan.warmup_steps)
    precision.step(run.optimizer)
    run.optimizer.zero_grad(set_to_none=True)
    run.window.add(torch.stack(rows), keys, images * run.world.world_size)
    return StepOutcome(applied=True, images=kept, stop_signal=stop)


def _decide_step(run: Run, *flags: torch.Tensor) -> tuple[bool, int]:
    """(skip this step: a flag is set on some rank, the signal number that asks every rank to stop or 0), in the one
    collective of the step: a signal that reached only one rank stops all of them after the same step, and so do
    an image over loss.max_classes_per_image (UserError on every rank, the step not applied) and, with
    data.on_bad_shard=stop, a bad shard met by any rank's loader (BadShardError on every rank, likewise)."""
    device = flags[0].device
    signum = torch.full((), float(run.stop.signum or 0), device=device)  # a fill, no host-to-device copy
    over = [torch.full((), float(v), device=device)
            for v in (run.over_cap, run.world.rank + 1 if run.over_cap else 0, bad_shard_flag(run, run.train_stream))]
    *bad, stop, over_cap, over_rank, bad_shard = max_over_ranks(run.accelerator, torch.stack([*flags, signum, *over]))
    if over_cap:
        stop_over_cap(run, over_cap, over_rank, f"step {run.state.step + 1}")
    if bad_shard:
        stop_on_bad_shard(run, f"by step {run.state.step + 1}")
    return any(b > 0 for b in bad), int(stop)


def bad_shard_flag(run: Run, stream: Any) -> float:
    """1.0 when data.on_bad_shard=stop and this rank's `stream` met a shard it could not read whole."""
    return float(getattr(run.data, "on_bad_shard", "skip") == "stop" and bool(getattr(stream, "bad_shards", None)))


def stop_on_bad_shard(run: Run, where: str) -> NoReturn:
    """Collective, on every rank after the same decision: the bad shards of all ranks' loaders, in one error (exit 1);
    the step is not applied, nothing is saved, the checkpoints already written stay."""
    bad = [*getattr(run.train_stream, "bad_shards", []), *getattr(run.val_stream, "bad_shards", [])]
    if run.world.world_size > 1:
        gathered: list[list[tuple[str, str]]] = [[] for _ in range(run.world.world_size)]
        torch.distributed.all_gather_object(gathered, bad)
        bad = [pair for part in gathered for pair in part]
    run.tracker.finish()
    error = bad_shard_error(bad, where)
    raise type(error)(f"{error}; stopped on every rank, the last checkpoint is {last_finite_checkpoint(run)}")


def stop_over_cap(run: Run, over_cap: float, over_rank: float, where: str) -> NoReturn:
    """Every rank learnt in the same collective that an image had more classes than the cap: the same error."""
    run.tracker.finish()
    raise UserError(
        f"loss.max_classes_per_image is {run.cfg.loss.max_classes_per_image}, but an image with {int(over_cap)} "
        f"ground-truth classes reached rank {int(over_rank) - 1} in {where}: raise the cap or set it to null (each "
        f"batch's maximum); stopped on every rank, the last checkpoint is {last_finite_checkpoint(run)}")


def cap_classes(run: Run, batch: dict[str, Any]) -> dict[str, Any]:
    """Check the loader's CPU labels against loss.max_classes_per_image (no device sync). An image over the cap
    keeps its first `cap` classes so that this rank's step still meets the other ranks' collectives; the count goes
    into the step's one decision, which stops every rank (before, the loss raised on this rank alone and the others
    waited in the gradient all-reduce until the process-group timeout)."""
    cap = getattr(getattr(run.cfg, "loss", None), "max_classes_per_image", None)
    labels = batch.get("labels")
    if cap is None or not isinstance(labels, torch.Tensor) or labels.dim() != 2:
        return batch
    present = labels > 0.5 if labels.dtype != torch.bool else labels
    count = int(present.sum(dim=1).max()) if len(labels) else 0
    if count <= cap:
        return batch
    run.over_cap = max(run.over_cap, count)
    kept = present & (present.cumsum(dim=1) <= cap)
    return {**batch, "labels": torch.where(kept, labels, torch.zeros_like(labels))}


def handle_skipped_step(run: Run) -> None:
    state, tcfg = run.state, run.cfg.train
    state.bad_steps_in_a_row += 1
    state.skipped_steps += 1
    if run.world.is_main:
        log.warning("non-finite loss at step %d: step skipped (%d in a row, limit %d)", state.step,
                    state.bad_steps_in_a_row, tcfg.max_bad_steps)
    if state.bad_steps_in_a_row >= tcfg.max_bad_steps:
        run.tracker.finish()
        raise TrainingDiverged(
            f"{state.bad_steps_in_a_row} non-finite losses in a row at step {state.step}; stopping. "
            f"Last finite checkpoint: {last_finite_checkpoint(run)}"
        )


def last_finite_checkpoint(run: Run) -> str:
    """For stop messages: rank 0 checks the files (every tensor finite), the other ranks point to it."""
    if not run.world.is_main:
        return "see rank 0's message"
    return str(run.checkpoints.latest_usable() or "none")


def log_window(run: Run) -> dict[str, float]:
    """Mean loss terms over the window's micro-batches and all ranks (the one collective of a log step)."""
    window = run.window
    means = window.sums / max(window.micro_batches, 1)
    means = run.accelerator.reduce(means, reduction="mean") if run.world.world_size > 1 else means
    elapsed = max(time.perf_counter() - window.start, 1e-9)
    logged = {**dict(zip(window.keys, means.tolist())),
              "lr": run.optimizer.param_groups[0]["lr"], "images_per_s": window.images / elapsed,
              "epoch": run.state.epoch, "memory_mb": _peak_memory_mb(run.accelerator.device),
              "skipped_steps": run.state.skipped_steps, "skipped_samples": count_skipped_data(run)}
    run.tracker.log(logged, run.state.step)
    window.reset()
    return logged


# ----------------------------------------------------------------------------------------------------------------------
# Validation, bookkeeping, summary
# ----------------------------------------------------------------------------------------------------------------------


def run_validation(run: Run) -> dict[str, float]:
    """Validation metrics over the whole split and all ranks (collective; the stream is built once per run)."""
    tcfg, model = run.cfg.train, run.model
    total = len(run.val_stream) if tcfg.val_max_batches is None else min(len(run.val_stream), tcfg.val_max_batches)
    if run.world.is_main:
        log.info("step %d: validating on split '%s' (%d batches per process)", run.state.step, run.data.val_split,
                 total)
    model.eval()
    sums: dict[str, float] = {}
    bar = tqdm(total=total, desc="validate", unit="batch", leave=False, disable=not run.world.is_main,
               dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 30.0)
    run.over_cap = 0
    with torch.no_grad():
        for i, batch in enumerate(run.val_stream):
            if tcfg.val_max_batches is not None and i >= tcfg.val_max_batches:
                break
            bar.update(1)
            batch = cap_classes(run, batch)
            batch = _to_device(batch, run.accelerator.device, tcfg.channels_last, run.precision.dtype, run.norm)
            for key, value in run.recipe.val_sums(model, batch, run.precision).items():
                sums[key] = sums.get(key, 0.0) + value
    bar.close()
    model.train()
    over = torch.tensor([run.over_cap, run.world.rank + 1 if run.over_cap else 0, bad_shard_flag(run, run.val_stream)],
                        device=run.accelerator.device)
    over_cap, over_rank, bad_shard = max_over_ranks(run.accelerator, over)
    if over_cap:
        stop_over_cap(run, over_cap, over_rank, f"the validation after step {run.state.step}")
    if bad_shard:
        stop_on_bad_shard(run, f"in the validation after step {run.state.step}")
    sums = all_reduce_sums(run.accelerator, sums, run.recipe.val_keys(run.manifest))
    if not sums["count"]:
        raise ValueError(f"{run.data.manifest}: validation split '{run.data.val_split}' yielded no samples")
    return run.recipe.val_metrics(sums)


def after_validation(run: Run, metrics: dict[str, float]) -> None:
    """Early stopping, best-model export and the validation record."""
    state, tcfg = run.state, run.cfg.train
    loss = metrics["loss"]
    improved = state.best_metric is None or loss < state.best_metric - tcfg.early_stop_min_delta
    if improved:
        state.best_metric, state.best_step, state.bad_validations = loss, state.step, 0
        path = run.run_dir / f"{run.recipe.kind}.pt"
        export_on_main(run, path)
        if run.world.is_main:
            log.info("step %d: validation loss %.4f, the best so far: wrote %s", state.step, loss, path)
    else:
        state.bad_validations += 1
        state.stopped_early = state.bad_validations >= tcfg.early_stop_patience
        if run.world.is_main:
            log.info("step %d: validation loss %.4f, not better than %.4f (step %d): %s kept", state.step, loss,
                     state.best_metric, state.best_step, run.run_dir / f"{run.recipe.kind}.pt")
    state.history.append({"step": state.step, "epoch": state.epoch, **metrics, "improved": improved})
    run.tracker.log({**metrics, "best_loss": state.best_metric}, state.step, kind="val")


def save_run_state(run: Run) -> None:
    """Never a non-finite checkpoint: a diverged run stops here instead of overwriting good ones (issue 17)."""
    if not all_finite_on_device(run.accelerator, run.model, run.optimizer):
        run.tracker.finish()
        raise TrainingDiverged(
            f"non-finite weights or optimizer state at step {run.state.step} (the last update diverged; check "
            f"optim.lr and the loss weights); not saved. Last finite checkpoint: {last_finite_checkpoint(run)}"
        )
    count_skipped_data(run)  # collective, like the save: the checkpoint carries the count up to its step
    run.state.scaler = run.precision.state_dict()
    run.state.model = model_identity(run.recipe.kind, run.cfg, run.manifest.classes)
    run.checkpoints.save(run.accelerator, run.state)


def stop_on_signal(run: Run, signum: int, saved: bool) -> NoReturn:
    """Every rank learnt in this step's decision that a SIGTERM / SIGINT / SIGUSR2 arrived: write this step's
    checkpoint (collective; `saved`: already written), say where once, leave the process group and exit 143 / 130 /
    140 (SIGUSR2 first goes to the handler ours replaced: submitit's requeues the job)."""
    if not saved:
        save_run_state(run)
    if run.world.is_main:
        print(f"{signal_name(signum)}: stopped after step {run.state.step}; checkpoint {run.checkpoints.latest()} "
              f"(continue with train.resume=auto); exit {exit_status(signum)}", file=sys.stderr, flush=True)
    run.tracker.finish()
    close_process_group()
    run.stop.hand_over(signum)  # SIGUSR2 under submitit: its handler requeues the job now that the checkpoint exists
    raise SystemExit(exit_status(signum))


def count_skipped_data(run: Run) -> int:
    """Collective: adds the training samples skipped since the last call on every rank (unreadable or missing shard
    data, corrupt samples: the loader counts them per DataLoader worker and hands the counts over with the batches)
    to state.skipped_samples, which a resumed run carries on; returns the run's total."""
    total = int(getattr(run.train_stream, "corrupt_samples", 0))
    new, run.skipped_seen = total - run.skipped_seen, total
    if run.world.world_size > 1:
        summed = all_reduce_sums(run.accelerator, {"skipped": float(new)}, ("skipped",))
        new = int(round(summed["skipped"]))
    run.state.skipped_samples += new
    return run.state.skipped_samples


def gather_skipped_notes(run: Run, limit: int = 50) -> list[str]:
    """Collective: what the loaders of all ranks skipped in this process's lifetime, each note naming the shard
    (at most `limit`, rank 0's first)."""
    notes = list(getattr(run.train_stream, "problems", []))[:limit]
    if run.world.world_size > 1:
        gathered: list[list[str]] = [[] for _ in range(run.world.world_size)]
        torch.distributed.all_gather_object(gathered, notes)
        notes = [note for part in gathered for note in part]
    return notes[:limit]


def batch_summary(run: Run) -> dict[str, Any]:
    b = run.batch
    return {"batch_policy": b.policy, "world_size": b.world_size, "per_process_batch": b.per_process_batch,
            "grad_accum_steps": b.accum, "global_batch": b.global_batch, "lr": b.lr,
            "warmup_steps": run.plan.warmup_steps, "total_steps": run.plan.total_steps,
            "steps_per_epoch": run.plan.steps_per_epoch, "precision": run.precision.describe()}


def write_summary(run: Run) -> dict[str, Any]:
    state = run.state
    summary = {
        "kind": run.recipe.kind,
        "steps": state.step,
        "epochs_started": state.epoch + (1 if state.batches_in_epoch else 0),
        "best_val_loss": state.best_metric,
        "best_step": state.best_step,
        "stopped_early": state.stopped_early,
        "skipped_steps": state.skipped_steps,
        "skipped_samples": state.skipped_samples,  # training data the loaders could not read, all ranks
        "skipped_data": run.skipped_notes,  # what, naming the shards (this process's part of the run)
        **batch_summary(run),
        "output_dir": str(run.run_dir),
        "checkpoint": str(run.run_dir / f"{run.recipe.kind}.pt"),
        "history": state.history,
        "best": next((h for h in state.history if h["step"] == state.best_step), None),
    }
    export_on_main(run, run.run_dir / f"{run.recipe.kind}_last.pt")
    run.checkpoints.write_on_main(run.accelerator, run.run_dir / "summary.json",
                                  lambda: write_json_atomic(run.run_dir / "summary.json", summary))
    return summary


def export_on_main(run: Run, path: Path) -> None:
    """Collective: rank 0 exports the model to `path`; a failure stops every rank (CheckpointManager.write_on_main)."""
    run.checkpoints.write_on_main(run.accelerator, path, lambda: run.recipe.export(
        run.accelerator.unwrap_model(run.model), run.manifest, path))


# ----------------------------------------------------------------------------------------------------------------------
# Set-up and the orchestrator
# ----------------------------------------------------------------------------------------------------------------------


def start_run(recipe: Recipe) -> tuple[Run, Any, bool]:
    """Process group, model, optimizer, streams, plan, resume: everything before the first step."""
    cfg = recipe.cfg
    tcfg, dcfg, ocfg = cfg.train, cfg.data, cfg.optim
    run_dir = Path(tcfg.output_dir)
    manifest = read_data_manifest(dcfg)  # fail fast, before any process group work

    accelerator = make_accelerator(tcfg.mixed_precision, wandb_log_with(cfg.tracking), str(run_dir), tcfg)
    world = world_from(accelerator)
    configure_logging(world.rank)
    lock, checkpoints = claim_run_folder(accelerator, run_dir, tcfg.keep_last)  # a second run stops here
    precision = Precision(tcfg.mixed_precision, accelerator, tcfg.dtype)
    batch_plan = plan_batch(dcfg, ocfg, world.world_size)
    data = dataclasses.replace(dcfg, batch_size=batch_plan.per_process_batch)
    seed_everything(tcfg.seed)
    recipe.setup(accelerator, manifest)
    model = recipe.build_model(manifest).to(precision.dtype)
    if tcfg.sync_batchnorm and world.world_size > 1:
        if accelerator.device.type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        elif world.is_main:  # torch's SyncBatchNorm refuses CPU tensors (README "Training")
            log.warning("train.sync_batchnorm: torch supports SyncBatchNorm on GPUs only; on CPU each process keeps "
                        "its own BatchNorm statistics")
    if tcfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer, params = build_optimizer(model, ocfg, lr_at(0, batch_plan.lr, 0))
    model, optimizer = accelerator.prepare(model, optimizer)
    if tcfg.compile:
        model = torch.compile(model)

    image_format = batch_image_format(dcfg, accelerator.device)
    norm = input_normalization(cfg)  # the classifier's mean/std: a masked-out pixel is its mean colour
    train_stream = make_train_loader(data, manifest, dcfg.train_split, rank=world.rank, world_size=world.world_size,
                                     seed=tcfg.seed, drop_unlabelled=recipe.drop_unlabelled, image_format=image_format,
                                     **norm)
    plan = plan_steps(tcfg, ocfg, batch_plan, len(train_stream), f"{dcfg.manifest}: split '{dcfg.train_split}'")
    val_stream = make_eval_loader(data, manifest, dcfg.val_split, rank=world.rank, world_size=world.world_size,
                                  image_format=image_format, **norm)

    resume_from, changes = resolve_resume(recipe, accelerator, checkpoints, manifest)
    state = CheckpointManager.load(accelerator, resume_from) if resume_from else TrainerState()
    precision.load_state_dict(state.scaler)
    checkpoints.write_on_main(accelerator, run_dir / "config.yaml",
                              lambda: save_run_config(cfg, run_dir, resume_from, state.step, changes))
    if world.is_main:
        if resume_from:
            log.info("resumed from %s (step %d, epoch %d)", resume_from, state.step, state.epoch)
        log.info(f"{batch_plan.policy}: global batch {batch_plan.global_batch} = "
              f"{batch_plan.per_process_batch} per process x {world.world_size} processes x {batch_plan.accum} "
              f"accumulation; lr {batch_plan.lr:g} (warm-up {plan.warmup_steps} steps); {plan.total_steps} steps "
              f"({plan.steps_per_epoch} per epoch); {precision.describe()}")
    tracker = RunTracker(accelerator, run_dir, cfg.tracking, to_dict(cfg),
                         resume_step=state.step if resume_from else None)
    run = Run(recipe=recipe, accelerator=accelerator, world=world, precision=precision, model=model,
              optimizer=optimizer, params=params, manifest=manifest, data=data, batch=batch_plan, plan=plan,
              state=state, checkpoints=checkpoints, tracker=tracker, val_stream=val_stream, run_dir=run_dir,
              norm=norm, lock=lock, train_stream=train_stream)
    return run, train_stream, resume_from is not None


def resolve_resume(recipe: Recipe, accelerator: Accelerator, checkpoints: CheckpointManager,
                   manifest: Manifest) -> tuple[Path | None, dict[str, list[Any]]]:
    """The checkpoint to resume from (None: a fresh start), checked by rank 0 against this config before anything
    loads (explainer/run_resume.py), and the allowed changes (known on rank 0 only)."""
    changes: dict[str, list[Any]] = {}

    def check(path: Path) -> None:
        changes.update(check_resume(path, recipe.kind, recipe.cfg, manifest.classes))

    return checkpoints.resolve_shared(accelerator, recipe.cfg.train.resume, check), changes


def save_run_config(cfg: Any, run_dir: Path, resumed_from: Path | None, step: int,
                    changes: dict[str, list[Any]]) -> None:
    """Rank 0: config.yaml (paths made absolute: the same files from any directory), and what a resume changed
    (said and appended to config_changes.jsonl)."""
    save_config(with_absolute_paths(cfg), run_dir / "config.yaml")
    if resumed_from is not None and changes:
        log.warning("resumed with changed settings: %s (recorded in %s)", "; ".join(
            f"{key} {old!r} -> {new!r}" for key, (old, new) in changes.items()), run_dir / CHANGES_FILE)
        record_changes(run_dir, resumed_from, step, changes)


def claim_run_folder(accelerator: Accelerator, run_dir: Path, keep_last: int) -> tuple[RunLock, CheckpointManager]:
    """Collective: rank 0 locks the run folder (a second run into it stops here, naming the holder), every rank
    checks it sees the folder rank 0 writes, then rank 0 clears the temporary folders of dead writers; checkpoints
    written by this run carry the lock holder's id. A failure on rank 0 raises on every rank."""
    lock = acquire_shared(accelerator, run_dir)
    check_shared_run_folder(accelerator, run_dir)  # after the lock: it writes a token into the folder
    checkpoints = CheckpointManager(run_dir, keep_last, writer=lock.holder)
    if lock.held:
        checkpoints.remove_stale_temporaries()
    return lock, checkpoints


def fit(recipe: Recipe) -> dict[str, Any]:
    """Train until max_steps / epochs / early stopping; return the run summary (also written to summary.json).

    SIGTERM / SIGINT / SIGUSR2: the step in progress is finished, checkpointed on every rank, and the process exits
    143 / 130 / 140 (explainer/signals.py); a signal after the last step lets the run finish normally.
    """
    stop = StopRequest()
    with stop.installed():
        return _fit(recipe, stop)


def _fit(recipe: Recipe, stop: StopRequest) -> dict[str, Any]:
    run, train_stream, resumed = start_run(recipe)
    run.stop = stop
    try:
        return train_until_done(run, train_stream, resumed)
    finally:
        if run.lock is not None:
            run.lock.release()


def train_until_done(run: Run, train_stream: Any, resumed: bool) -> dict[str, Any]:
    recipe = run.recipe
    state, plan, tcfg = run.state, run.plan, run.cfg.train
    run.model.train()
    progress = tqdm(total=plan.total_steps, initial=state.step, disable=not run.world.is_main, desc=recipe.kind,
                    unit="step", dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 30.0)
    last_validated = last_saved = state.step if resumed else -1
    while state.step < plan.total_steps and not state.stopped_early:
        train_stream.set_epoch(state.epoch)
        train_stream.skip(state.batches_in_epoch)
        batches = iter(train_stream)
        while state.batches_in_epoch < plan.batches_per_epoch and state.step < plan.total_steps:
            upcoming = state.step + 1
            log_images = bool(tcfg.image_log_every_steps) and upcoming % tcfg.image_log_every_steps == 0
            outcome = optimizer_step(run, batches, keep_images=tcfg.image_log_count if log_images else 0)
            if not outcome.applied:
                handle_skipped_step(run)
                if outcome.stop_signal:
                    progress.close()
                    stop_on_signal(run, outcome.stop_signal, saved=last_saved == state.step)
                continue
            state.step, state.bad_steps_in_a_row = upcoming, 0
            progress.update(1)
            if state.step % tcfg.log_every_steps == 0 or state.step == plan.total_steps:
                logged = log_window(run)
                progress.set_postfix(loss=f"{logged['loss']:.4f}", img_s=f"{logged['images_per_s']:.1f}")
            if outcome.images is not None:
                run.tracker.log_masks(outcome.images["image"], outcome.images["masks"], outcome.images["labels"],
                                      run.manifest.classes, state.step, **run.norm)
            if state.step % plan.val_every == 0 or state.step == plan.total_steps:
                after_validation(run, run_validation(run))
                last_validated = state.step
            if state.step % plan.ckpt_every == 0 or state.step == plan.total_steps or state.stopped_early:
                save_run_state(run)
                last_saved = state.step
            if outcome.stop_signal:
                progress.close()
                stop_on_signal(run, outcome.stop_signal, saved=last_saved == state.step)
            if state.stopped_early:
                break
        if state.batches_in_epoch >= plan.batches_per_epoch:
            state.epoch, state.batches_in_epoch = state.epoch + 1, 0
    progress.close()
    if last_validated != state.step:
        after_validation(run, run_validation(run))
    if last_saved != state.step:
        save_run_state(run)
    count_skipped_data(run)
    run.skipped_notes = gather_skipped_notes(run)
    summary = write_summary(run)
    run.tracker.finish()
    run.accelerator.wait_for_everyone()
    return summary
