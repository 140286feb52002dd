"""Crash-safe training checkpoints on top of `Accelerator.save_state`.

A checkpoint is a folder `checkpoints/step_<8-digit step>/` holding accelerate's state (model, optimizer, scaler, RNG of
every rank) plus `meta.json` (our trainer state: step, epoch, batches consumed in the epoch, early-stopping state).
It is written under a temporary name and renamed only once complete, and `meta.json` is written last, so a process
killed at any moment (kill -9 included) leaves either a complete checkpoint or a `.tmp-` folder that is ignored and
later removed. Trainer state lives in JSON rather than register_for_checkpointing because accelerate unpickles those
objects with weights_only=False.

A checkpoint is usable only if every file loads and every tensor is finite (`inspect`): a save refuses non-finite
weights or optimizer state (checked on the device, one reduction), `--resume auto` falls back past a checkpoint that
is incomplete, unreadable or non-finite (saying which and why), and rotation keeps the newest checkpoint this run
knows to be good. Temporary folders carry the writer's id (`.tmp-step_<step>.<host>-<pid>`): rotation removes only
its own; those of dead writers are removed at the start, under the run folder's lock (explainer/run_lock.py).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import load as accelerate_load

from explainer.atomic import write_json_atomic
from explainer.config import ConfigError, from_mapping
from explainer.distributed import any_flag
from explainer.logs import get_logger
from explainer.run_errors import RunError, UserError, first_line, write_failure

log = get_logger(__name__)

_STEP_DIR = re.compile(r"^step_(\d{8})$")
META = "meta.json"
MODEL_FILES = ("model.safetensors", "pytorch_model.bin")
OPTIMIZER_FILE = "optimizer.bin"
RNG_KEYS = ("random_state", "numpy_random_seed", "torch_manual_seed")


class CheckpointError(RunError):
    """A checkpoint that cannot be written or read; the message names the file and the last complete checkpoint."""


@dataclass
class TrainerState:
    """Everything besides tensors that a resumed run needs to continue exactly where it stopped."""

    step: int = 0  # optimiser steps done
    epoch: int = 0  # current epoch
    batches_in_epoch: int = 0  # loader batches consumed in the current epoch
    best_metric: float | None = None
    best_step: int | None = None
    bad_validations: int = 0  # validations without improvement (early stopping)
    bad_steps_in_a_row: int = 0
    skipped_steps: int = 0
    skipped_samples: int = 0  # training samples the loader could not read (all ranks), see training_loop
    stopped_early: bool = False
    scaler: dict[str, Any] | None = None  # our fp16 GradScaler on CPU (scale, growth tracker): JSON, not a pickle
    history: list[dict[str, Any]] = field(default_factory=list)  # validation results, for summary.json
    model: dict[str, Any] | None = None  # {"arch", "classes"} it was trained with (explainer/run_resume.py)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: Any) -> TrainerState:
        """Typed like the config: a wrong type raises ValueError naming the key (unknown keys are ignored)."""
        if not isinstance(raw, dict):
            raise ValueError(f"expected a JSON object, got {type(raw).__name__}")
        known = {k: v for k, v in raw.items() if k in cls.__dataclass_fields__}
        try:
            return from_mapping(cls, known, "meta.json")
        except ConfigError as exc:
            raise ValueError(str(exc)) from None


def _floating(tensors: Any) -> list[torch.Tensor]:
    return [t for t in tensors if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel()]


def _optimizer_tensors(state: dict[str, Any]) -> list[torch.Tensor]:
    return _floating(v for per_param in state.get("state", {}).values() for v in per_param.values())


def all_finite_on_device(accelerator: Accelerator, model: torch.nn.Module, optimizer: Any) -> bool:
    """Every floating tensor of the model (weights and buffers) and of the optimizer state is finite, on every rank.

    Per-tensor max |x| (never overflows; inf and nan propagate) stays on the device; one collective and one
    device-to-host copy decide, instead of a host sync per tensor.
    """
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps torch's
    tensors = _floating(accelerator.unwrap_model(model).state_dict().values())
    tensors += _floating(v for per_param in inner.state.values() for v in per_param.values())
    if not tensors:
        return True
    return not any_flag(accelerator, any_nonfinite(tensors, accelerator.device))


def any_nonfinite(tensors: list[torch.Tensor], device: torch.device | str) -> torch.Tensor:
    """A one-element bool tensor on `device`: some tensor holds an inf or nan. The tensors may live on several
    devices: on a GPU, torch keeps Adam's `step` on the CPU (neither `capturable` nor `fused`), and one stack of
    flags from both raised "Expected all tensors to be on the same device", so no checkpoint was ever written.
    One reduction per device, then one small copy of each device's flag (no host sync)."""
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for tensor in tensors:
        by_device.setdefault(tensor.device, []).append(tensor)
    flags = [(~torch.isfinite(torch.stack(torch._foreach_norm(group, ord=math.inf)))).any().reshape(1).to(device)
             for group in by_device.values()]
    return torch.cat(flags).any().reshape(1)


def inspect(path: Path) -> str | None:
    """Why the checkpoint folder `path` cannot be resumed from (the file and what is wrong), or None if it can:
    meta.json typed, weights, optimizer state and every rank's RNG state loadable, every tensor finite."""
    if not (path / META).is_file():
        return f"incomplete: no {META} (written last, so the save did not finish)"
    try:
        TrainerState.from_json(json.loads((path / META).read_text()))
    except (OSError, ValueError) as exc:
        return f"{path / META}: {first_line(exc)}"
    model_file = next((path / name for name in MODEL_FILES if (path / name).is_file()), None)
    if model_file is None:
        return f"incomplete: no {' or '.join(MODEL_FILES)}"
    checks = [(model_file, _load_model_tensors), (path / OPTIMIZER_FILE, _load_optimizer_tensors)]
    rng_files = sorted(path.glob("random_states_*.pkl"))
    if not rng_files:
        return "incomplete: no random_states_*.pkl (a resume would not be exact)"
    checks += [(f, _check_rng) for f in rng_files]
    for file, check in checks:
        try:
            tensors = check(file)
        except Exception as exc:  # noqa: BLE001 - any failure to load means "not usable", said with its reason
            return f"{file}: cannot be read ({type(exc).__name__}: {first_line(exc)})"
        bad = sum(int((~torch.isfinite(t)).sum()) for t in tensors)
        if bad:
            return f"{file}: {bad} non-finite values (the run had diverged when it was saved)"
    return None


def _load_model_tensors(file: Path) -> list[torch.Tensor]:
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        return _floating(load_file(str(file)).values())
    return _floating(accelerate_load(file, map_location="cpu").values())


def _load_optimizer_tensors(file: Path) -> list[torch.Tensor]:
    state = accelerate_load(file, map_location="cpu")
    if not isinstance(state, dict) or "param_groups" not in state:
        raise ValueError("not an optimizer state dict")
    return _optimizer_tensors(state)


def _check_rng(file: Path) -> list[torch.Tensor]:
    """accelerate loads RNG states inside `except Exception: pass`: a garbage file would silently make the resume
    inexact, so it is read here the way accelerate reads it."""
    states = accelerate_load(file)
    missing = [k for k in RNG_KEYS if not isinstance(states, dict) or k not in states]
    if missing:
        raise ValueError(f"not an RNG state (missing {', '.join(missing)})")
    return []


class CheckpointManager:
    """Names, writes, lists, rotates and restores checkpoints of one run folder.

    `writer` names this run's temporary folders (rank 0's lock holder id, the same on every rank).
    """

    def __init__(self, run_dir: str | os.PathLike, keep_last: int, writer: str | None = None):
        self.root = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last
        self.writer = re.sub(r"[^A-Za-z0-9_.-]+", "-", writer or f"pid-{os.getpid()}").strip("-")
        self.last_good: Path | None = None  # written or resumed by this run: rotation never deletes it

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first. Incomplete (.tmp-*) folders and folders without meta.json are not."""
        return [p for p in self._step_dirs() if (p / META).is_file()]

    def _step_dirs(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if _STEP_DIR.match(p.name) and p.is_dir()]
        return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1] if done else None

    def latest_usable(self) -> Path | None:
        """The newest checkpoint that `inspect` accepts (loads every file; for messages and resume, not per step)."""
        if self.last_good is not None and self.last_good == self.latest():
            return self.last_good
        return next((p for p in reversed(self.complete()) if inspect(p) is None), None)

    def remove_stale_temporaries(self) -> None:
        """Temporary folders of writers that are gone. Call only while holding the run folder's lock."""
        for stale in self.root.glob(".tmp-step_*"):
            shutil.rmtree(stale, ignore_errors=True)

    def save(self, accelerator: Accelerator, state: TrainerState) -> Path:
        """Collective: every rank must call it (each writes its own RNG state). A failure on any rank raises the same
        CheckpointError on every rank (no rank is left waiting), with the temporary folder removed."""
        final = self.root / f"step_{state.step:08d}"
        tmp = self.root / f".tmp-step_{state.step:08d}.{self.writer}"
        error = None
        if accelerator.is_main_process:
            error = self._attempt(tmp, lambda: (self.root.mkdir(parents=True, exist_ok=True),
                                                shutil.rmtree(tmp) if tmp.exists() else None))
        self._agree(accelerator, error, tmp)
        self._agree(accelerator, self._attempt(tmp, lambda: accelerator.save_state(str(tmp))), tmp)
        error = None
        if accelerator.is_main_process:
            error = self._attempt(tmp, lambda: self._finish(tmp, final, state))
        self._agree(accelerator, error, tmp)
        if accelerator.is_main_process:
            self.last_good = final
            self._rotate(state.best_step)
        accelerator.wait_for_everyone()
        return final

    def write_on_main(self, accelerator: Accelerator, path: Path, write: Callable[[], Any]) -> None:
        """Collective: rank 0 alone writes `path` (explainer.pt, config.yaml, summary.json, the last weights). A
        failure (full disk, permissions) raises the same RunError on every rank, so none waits for rank 0 in a later
        collective until the process-group timeout."""
        error = self._attempt(path, write) if accelerator.is_main_process else None
        if any_flag(accelerator, torch.tensor([1.0 if error else 0.0], device=accelerator.device)):
            raise RunError(f"cannot write {path}: {error or 'on rank 0 (its message says why)'}; the last complete "
                           f"checkpoint is {self.last_good or self.latest() or 'none'}, untouched")

    @staticmethod
    def _attempt(tmp: Path, write: Any) -> str | None:
        try:
            write()
        except Exception as exc:  # noqa: BLE001 - reported by _agree with the path and the reason
            return write_failure(exc, tmp.parent)
        return None

    def _finish(self, tmp: Path, final: Path, state: TrainerState) -> None:
        write_json_atomic(tmp / META, state.to_json())
        if final.exists():  # a re-save of the same step after a resume: replace it
            shutil.rmtree(final)
        os.replace(tmp, final)

    def _agree(self, accelerator: Accelerator, error: str | None, tmp: Path) -> None:
        failed = any_flag(accelerator, torch.tensor([1.0 if error else 0.0], device=accelerator.device))
        if not failed:
            return
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        where = "on another rank (its message says why)" if not error else \
            error if accelerator.num_processes == 1 else f"rank {accelerator.process_index}: {error}"
        raise CheckpointError(f"cannot write checkpoint {tmp}: {where}; the last complete checkpoint is "
                              f"{self.last_good or self.latest() or 'none'}, untouched")

    def _rotate(self, best_step: int | None) -> None:
        done = self.complete()
        keep = set(done[-self.keep_last :])
        if best_step is not None:
            keep.add(self.root / f"step_{best_step:08d}")
        if self.last_good is not None:
            keep.add(self.last_good)
        for path in done:
            if path not in keep:
                shutil.rmtree(path, ignore_errors=True)
        for mine in self.root.glob(f".tmp-step_*.{self.writer}"):
            shutil.rmtree(mine, ignore_errors=True)

    def resolve(self, resume: str | None) -> Path | None:
        """Map the `train.resume` setting to a usable checkpoint folder (None: start fresh).

        `auto` takes the newest checkpoint that `inspect` accepts, logging each newer one it skips and why; a named
        folder must itself be usable.
        """
        if resume is None:
            return None
        if resume == "auto":
            return self._newest_usable()
        path = Path(resume)
        if path.is_dir() and not (path / META).is_file() and (path / "checkpoints").is_dir():
            raise CheckpointError(f"train.resume={resume!r} is a run folder; name one of its checkpoints/step_* "
                                  "folders, or use --resume auto with train.output_dir set to it")
        if not (path / META).is_file():
            raise FileNotFoundError(f"train.resume={resume!r}: {path / META} not found; not a complete checkpoint")
        reason = inspect(path)
        if reason is not None:
            raise CheckpointError(f"train.resume={resume!r} cannot be resumed from: {reason}")
        return path

    def _newest_usable(self) -> Path | None:
        skipped = []
        for path in reversed(self._step_dirs()):  # also those without meta.json: the user hears why they are skipped
            reason = inspect(path)
            if reason is None:
                if skipped:
                    log.warning("--resume auto: resuming from %s, the newest usable checkpoint", path)
                return path
            log.warning("--resume auto: skipping checkpoint %s: %s", path, reason)
            skipped.append(f"{path.name} ({reason})")
        if skipped:
            raise CheckpointError(f"--resume auto: no usable checkpoint in {self.root}; skipped {'; '.join(skipped)}. "
                                  "Move the folders away to start fresh")
        return None

    def _resolve_on_main(self, resume: str | None, check: Callable[[Path], None] | None) -> Path | None:
        """Rank 0's part of resolve_shared: refuse a fresh start over another run's checkpoints, resolve, check,
        then set aside the checkpoints newer than the chosen one."""
        if resume is None and self._step_dirs():
            raise CheckpointError(
                f"train.output_dir {self.root.parent} holds another run's checkpoints (newest: "
                f"{self._step_dirs()[-1].name}); continue that run with --resume auto, or choose another "
                "train.output_dir")
        found = self.resolve(resume)
        if found is not None:
            if check is not None:
                check(found)
            self.set_aside_newer_than(found)
        return found

    def set_aside_newer_than(self, chosen: Path) -> list[Path]:
        """Checkpoints of this run folder newer than the one resumed from (skipped as unusable, or an explicit
        resume from an older step) belong to an abandoned continuation: left in place they would be named as the
        latest, take keep_last slots, and a later --resume auto would continue the abandoned run. They are moved
        into `checkpoints/set-aside-<time>/`, never deleted; rank 0 only, under the run folder's lock."""
        step = _step_of(chosen)
        newer = [p for p in self._step_dirs() if step is not None and _step_of(p) > step]
        if not newer:
            return []
        base = self.root / f"set-aside-{time.strftime('%Y%m%dT%H%M%S')}"
        aside = next(p for p in (base, *(base.with_name(f"{base.name}-{i}") for i in range(1, 1000))) if not p.exists())
        aside.mkdir()
        moved = []
        for path in newer:
            os.replace(path, aside / path.name)
            moved.append(aside / path.name)
        log.warning("resuming from %s: moved the newer checkpoint(s) %s aside to %s (nothing deleted); they belong "
                    "to the run this resume abandons", chosen, ", ".join(p.name for p in newer), aside)
        return moved

    def resolve_shared(self, accelerator: Accelerator, resume: str | None,
                       check: Callable[[Path], None] | None = None) -> Path | None:
        """`resolve` done by rank 0 only and broadcast, then checked readable on every rank (collective). A resume
        setting that names nothing usable, a fresh start into a folder with another run's checkpoints, or `check`
        (rank 0, on the chosen checkpoint) refusing it raises UserError (exit status 2) on every rank.

        Ranks resolving `auto` on their own could pick different checkpoints (or none) when run folders are
        node-local, and then diverge or hang in the first collective. Instead every rank gets rank 0's choice, and
        when any rank cannot read it every rank raises the same clear error.
        """
        choice: list[str | None] = [None]
        error: list[str | None] = [None]
        if accelerator.is_main_process:
            try:
                found = self._resolve_on_main(resume, check)
                choice[0] = None if found is None else str(found)
            except (FileNotFoundError, RunError, OSError) as exc:
                error[0] = str(exc)
        if accelerator.num_processes > 1:
            torch.distributed.broadcast_object_list(choice, src=0)
            torch.distributed.broadcast_object_list(error, src=0)
        if error[0] is not None:
            raise UserError(error[0])  # the resume setting names nothing usable: the user decides what to do
        if choice[0] is None:
            return None
        path = Path(choice[0])
        self.last_good = path
        readable = (path / META).is_file() and _own_rng_readable(path, accelerator.process_index)
        if accelerator.num_processes > 1:
            flags = torch.zeros(accelerator.num_processes, dtype=torch.float64, device=accelerator.device)
            flags[accelerator.process_index] = 0.0 if readable else 1.0
            missing = accelerator.reduce(flags, reduction="sum")
            unreadable = [rank for rank, bad in enumerate(missing.tolist()) if bad > 0]
        else:
            unreadable = [] if readable else [0]
        if unreadable:
            raise RuntimeError(
                f"train.resume={resume!r}: rank 0 chose checkpoint {path} but rank(s) {unreadable} cannot read "
                f"{path / META} or their random_states_<rank>.pkl (a resume needs each rank's RNG state, so as many "
                "processes as the run that saved it). Every process must see the same run folder (train.output_dir on "
                "a shared filesystem, not a node-local disk); copy it there or resume from a folder all nodes can read."
            )
        return path

    @staticmethod
    def load(accelerator: Accelerator, path: Path) -> TrainerState:
        try:
            accelerator.load_state(str(path))
        except Exception as exc:  # noqa: BLE001 - e.g. a config whose model no longer fits the checkpoint
            raise CheckpointError(f"checkpoint {path}: cannot be loaded into this run ({type(exc).__name__}: "
                                  f"{first_line(exc)})") from exc
        try:
            raw = json.loads((path / META).read_text())
            return TrainerState.from_json(raw)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"checkpoint {path}: cannot read {META}: {first_line(exc)}") from exc


def _step_of(path: Path) -> int | None:
    match = _STEP_DIR.match(path.name)
    return int(match.group(1)) if match else None


def _own_rng_readable(path: Path, rank: int) -> bool:
    """This rank's RNG state loads (accelerate would silently skip it); a checkpoint without any is not exact."""
    try:
        _check_rng(path / f"random_states_{rank}.pkl")
    except Exception:  # noqa: BLE001 - unreadable for any reason
        return False
    return True
