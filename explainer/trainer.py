"""The training loop shared by the Explainer and the Explanandum (classifier) trainers.

What differs between the two lives in a `Task` (explainer/tasks.py); everything else is here once: process group,
data streams, optimiser, mixed precision, gradient accumulation and clipping, non-finite-loss guard, validation,
early stopping, checkpoints with exact resume, tracking.

Data is NOT passed through `accelerator.prepare` (accelerate would re-split the already rank-split WebDataset
stream, LIBRARIES.md); batches are moved to the device here. Gradient accumulation is done by hand with
`no_sync`, so a resumed run restarts exactly on an optimiser-step boundary.
"""

from __future__ import annotations

import contextlib
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate import Accelerator
from tqdm import tqdm

from explainer.atomic import write_json_atomic
from explainer.checkpoint import CheckpointManager, TrainerState
from explainer.config import (
    DataConfig,
    OptimConfig,
    TrackingConfig,
    TrainConfig,
    input_normalization,
    save_config,
    to_dict,
)
from explainer.data.loader import (
    Manifest,
    batch_image_format,
    make_eval_loader,
    make_train_loader,
    read_data_manifest,
)
from explainer.data.transforms import normalize_on_device
from explainer.distributed import all_reduce_sums, any_true, make_accelerator, seed_everything, world_from
from explainer.tracking import RunTracker, wandb_log_with


class TrainingDiverged(RuntimeError):
    """Too many non-finite losses in a row; the last good checkpoint is left untouched."""


@dataclass
class StepResult:
    loss: torch.Tensor
    terms: dict[str, torch.Tensor]
    masks: torch.Tensor | None = None  # per-class masks, for image logging (explainer only)


class Task(Protocol):
    """What the generic loop needs from a concrete trainer."""

    kind: str  # "explainer" or "classifier": names the exported file
    drop_unlabelled: bool

    def build_model(self, manifest: Manifest) -> torch.nn.Module: ...

    def setup(self, accelerator: Accelerator, manifest: Manifest) -> None: ...

    def train_step(self, model: torch.nn.Module, batch: dict[str, Any], accelerator: Accelerator) -> StepResult: ...

    def val_sums(self, model: torch.nn.Module, batch: dict[str, Any], accelerator: Accelerator) -> dict[str, float]:
        """Per-batch sums; must contain 'loss' (summed over images) and 'count'."""
        ...

    def val_metrics(self, sums: dict[str, float]) -> dict[str, float]: ...

    def export(self, model: torch.nn.Module, manifest: Manifest, path: Path) -> None: ...


@dataclass
class RunSettings:
    """The parts of a run config the loop reads (both run configs have them)."""

    data: DataConfig
    optim: OptimConfig
    train: TrainConfig
    tracking: TrackingConfig


def _to_device(batch: dict[str, Any], device: torch.device, channels_last: bool,
               norm: dict[str, Any] | None = None) -> dict[str, Any]:
    """`norm`: the classifier's mean/std (config.input_normalization) for uint8 batches normalised here."""
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, non_blocking=True)
            if key == "image" and value.dtype == torch.uint8:  # loader image_format "uint8": normalise here
                value = normalize_on_device(value, channels_last=channels_last, **(norm or {}))
            elif key == "image" and channels_last:
                value = value.contiguous(memory_format=torch.channels_last)
        out[key] = value
    return out


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def mean_over_ranks(accelerator: Accelerator, results: list[tuple[StepResult, dict]]) -> dict[str, float]:
    """Loss and terms of the last step averaged over its micro-batches and all ranks (collective)."""
    keys = ["loss", *sorted(k for k in results[0][0].terms if k != "loss")]
    rows = [torch.stack([r.loss.detach().float(), *(r.terms[k].detach().float() for k in keys[1:])])
            for r, _ in results]
    values = accelerator.reduce(torch.stack(rows).mean(0), reduction="mean")
    return dict(zip(keys, values.tolist()))


def fit(task: Task, settings: RunSettings, full_config: Any) -> dict[str, Any]:
    """Train until max_steps / epochs / early stopping; return the run summary (also written to summary.json)."""
    tcfg, dcfg, ocfg = settings.train, settings.data, settings.optim
    run_dir = Path(tcfg.output_dir)
    manifest = read_data_manifest(dcfg)  # fail fast, before any process group work

    accelerator = make_accelerator(tcfg.mixed_precision, wandb_log_with(settings.tracking), str(run_dir), tcfg)
    world = world_from(accelerator)
    seed_everything(tcfg.seed)
    task.setup(accelerator, manifest)
    model = task.build_model(manifest)
    if tcfg.sync_batchnorm and world.world_size > 1 and accelerator.device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if tcfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    global_batch = dcfg.batch_size * world.world_size * ocfg.grad_accum_steps
    lr = ocfg.lr * (global_batch / ocfg.reference_batch if ocfg.lr_scaling == "linear" else 1.0)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{task.kind}: the model has no trainable parameters")
    if ocfg.optimizer == "adam":
        optimizer = torch.optim.Adam(params, lr=lr, weight_decay=ocfg.weight_decay)
    else:
        optimizer = torch.optim.SGD(params, lr=lr, weight_decay=ocfg.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    if tcfg.compile:
        model = torch.compile(model)

    norm = input_normalization(full_config)  # the classifier's mean/std: a masked-out pixel is its mean colour
    train_stream = make_train_loader(dcfg, manifest, dcfg.train_split, rank=world.rank, world_size=world.world_size,
                                     seed=tcfg.seed, drop_unlabelled=task.drop_unlabelled,
                                     image_format=batch_image_format(dcfg, accelerator.device), **norm)
    accum = ocfg.grad_accum_steps
    steps_per_epoch = tcfg.steps_per_epoch or len(train_stream) // accum
    if steps_per_epoch < 1:
        raise ValueError(
            f"{dcfg.manifest}: split '{dcfg.train_split}' gives {len(train_stream)} batches per rank, fewer than "
            f"grad_accum_steps={accum}; lower data.batch_size or use fewer processes"
        )
    batches_per_epoch = steps_per_epoch * accum
    if batches_per_epoch > len(train_stream):
        raise ValueError(f"train.steps_per_epoch={steps_per_epoch} needs {batches_per_epoch} batches per rank, but "
                         f"split '{dcfg.train_split}' of {dcfg.manifest} gives {len(train_stream)}")
    total_steps = tcfg.epochs * steps_per_epoch
    if tcfg.max_steps is not None:
        total_steps = min(total_steps, tcfg.max_steps)
    val_every = tcfg.val_every_steps or steps_per_epoch
    ckpt_every = tcfg.checkpoint_every_steps or val_every

    checkpoints = CheckpointManager(run_dir, tcfg.keep_last)
    resume_from = checkpoints.resolve(tcfg.resume)
    state = CheckpointManager.load(accelerator, resume_from) if resume_from else TrainerState()
    if world.is_main:
        save_config(full_config, run_dir / "config.yaml")
        if resume_from:
            print(f"[explainer] resumed from {resume_from} (step {state.step}, epoch {state.epoch})")
    tracker = RunTracker(accelerator, run_dir, settings.tracking, to_dict(full_config),
                         resume_step=state.step if resume_from else None)

    def validate() -> dict[str, float]:
        model.eval()
        sums: dict[str, float] = {}
        loader = make_eval_loader(dcfg, manifest, dcfg.val_split, rank=world.rank, world_size=world.world_size,
                                  image_format=batch_image_format(dcfg, accelerator.device), **norm)
        with torch.no_grad():
            for i, batch in enumerate(loader):
                if tcfg.val_max_batches is not None and i >= tcfg.val_max_batches:
                    break
                batch = _to_device(batch, accelerator.device, tcfg.channels_last, norm)
                for key, value in task.val_sums(model, batch, accelerator).items():
                    sums[key] = sums.get(key, 0.0) + value
        model.train()
        sums = all_reduce_sums(accelerator, sums)
        if not sums.get("count"):
            raise ValueError(f"{dcfg.manifest}: validation split '{dcfg.val_split}' yielded no samples")
        return task.val_metrics(sums)

    def after_validation(metrics: dict[str, float]) -> None:
        loss = metrics["loss"]
        improved = state.best_metric is None or loss < state.best_metric - tcfg.early_stop_min_delta
        if improved:
            state.best_metric, state.best_step, state.bad_validations = loss, state.step, 0
            if world.is_main:
                task.export(accelerator.unwrap_model(model), manifest, run_dir / f"{task.kind}.pt")
        else:
            state.bad_validations += 1
            state.stopped_early = state.bad_validations >= tcfg.early_stop_patience
        state.history.append({"step": state.step, "epoch": state.epoch, **metrics, "improved": improved})
        tracker.log({**metrics, "best_loss": state.best_metric}, state.step, kind="val")

    model.train()
    progress = tqdm(total=total_steps, initial=state.step, disable=not world.is_main, desc=task.kind, unit="step",
                    dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 30.0)  # log files: a line / 30 s
    last_validated, last_saved = (state.step if resume_from else -1), (state.step if resume_from else -1)
    window_images, window_start = 0, time.perf_counter()
    while state.step < total_steps and not state.stopped_early:
        train_stream.set_epoch(state.epoch)
        train_stream.skip(state.batches_in_epoch)
        batches = iter(train_stream)
        while state.batches_in_epoch < batches_per_epoch and state.step < total_steps:
            bad, results = False, []
            for micro in range(accum):
                batch = _to_device(next(batches), accelerator.device, tcfg.channels_last, norm)
                state.batches_in_epoch += 1
                sync = micro == accum - 1
                with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                    result = task.train_step(model, batch, accelerator)
                    bad = bad or any_true(accelerator, not bool(torch.isfinite(result.loss.detach())))
                    if not bad:
                        accelerator.backward(result.loss / accum)
                results.append((result, batch))
            if bad:
                optimizer.zero_grad(set_to_none=True)
                state.bad_steps_in_a_row += 1
                state.skipped_steps += 1
                if world.is_main:
                    print(f"[explainer] non-finite loss at step {state.step}: step skipped "
                          f"({state.bad_steps_in_a_row} in a row, limit {tcfg.max_bad_steps})")
                if state.bad_steps_in_a_row >= tcfg.max_bad_steps:
                    tracker.finish()
                    raise TrainingDiverged(
                        f"{state.bad_steps_in_a_row} non-finite losses in a row at step {state.step}; stopping. "
                        f"Last good checkpoint: {checkpoints.latest()}"
                    )
                continue
            state.bad_steps_in_a_row = 0
            if ocfg.grad_clip_norm is not None:
                accelerator.clip_grad_norm_(params, ocfg.grad_clip_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            window_images += sum(b["image"].shape[0] for _, b in results) * world.world_size
            progress.update(1)

            if state.step % tcfg.log_every_steps == 0 or state.step == total_steps:
                elapsed = max(time.perf_counter() - window_start, 1e-9)
                logged = {**mean_over_ranks(accelerator, results), "lr": lr,
                          "images_per_s": window_images / elapsed, "epoch": state.epoch,
                          "memory_mb": _peak_memory_mb(accelerator.device), "skipped_steps": state.skipped_steps}
                tracker.log(logged, state.step)
                progress.set_postfix(loss=f"{logged['loss']:.4f}", img_s=f"{logged['images_per_s']:.1f}")
                window_images, window_start = 0, time.perf_counter()
            last_result, last_batch = results[-1]
            if tcfg.image_log_every_steps and state.step % tcfg.image_log_every_steps == 0 \
                    and last_result.masks is not None:
                n = tcfg.image_log_count
                tracker.log_masks(last_batch["image"][:n], last_result.masks[:n].detach(),
                                  last_batch["labels"][:n], manifest.classes, state.step)
            if state.step % val_every == 0 or state.step == total_steps:
                after_validation(validate())
                last_validated = state.step
            if state.step % ckpt_every == 0 or state.step == total_steps or state.stopped_early:
                checkpoints.save(accelerator, state)
                last_saved = state.step
            if state.stopped_early:
                break
        if state.batches_in_epoch >= batches_per_epoch:
            state.epoch += 1
            state.batches_in_epoch = 0
    progress.close()

    if last_validated != state.step:
        after_validation(validate())
    if last_saved != state.step:
        checkpoints.save(accelerator, state)
    summary = {
        "kind": task.kind,
        "steps": state.step,
        "total_steps": total_steps,
        "epochs_started": state.epoch + (1 if state.batches_in_epoch else 0),
        "best_val_loss": state.best_metric,
        "best_step": state.best_step,
        "stopped_early": state.stopped_early,
        "skipped_steps": state.skipped_steps,
        "world_size": world.world_size,
        "global_batch": global_batch,
        "lr": lr,
        "output_dir": str(run_dir),
        "checkpoint": str(run_dir / f"{task.kind}.pt"),
        "history": state.history,
        "best": next((h for h in state.history if h["step"] == state.best_step), None),
    }
    if world.is_main:
        task.export(accelerator.unwrap_model(model), manifest, run_dir / f"{task.kind}_last.pt")
        write_json_atomic(run_dir / "summary.json", summary)
    tracker.finish()
    accelerator.wait_for_everyone()
    return summary
