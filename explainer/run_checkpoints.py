"""Crash-safe training checkpoints on top of `Accelerator.save_state`.

A checkpoint is a folder `checkpoints/step_<8-digit step>/` holding accelerate's state (model, optimizer, scaler, RNG of
every rank) plus `meta.json` (our trainer state: step, epoch, batches consumed in the epoch, early-stopping state).
It is written under a temporary name and renamed only once complete, and `meta.json` is written last, so a process
killed at any moment (kill -9 included) leaves either a complete checkpoint or a `.tmp-` folder that is ignored and
later removed. Trainer state lives in JSON rather than register_for_checkpointing because accelerate unpickles those
objects with weights_only=False.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from explainer.atomic import write_json_atomic

_STEP_DIR = re.compile(r"^step_(\d{8})$")
META = "meta.json"


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
    stopped_early: bool = False
    scaler: dict[str, Any] | None = None  # our fp16 GradScaler on CPU (scale, growth tracker): JSON, not a pickle
    history: list[dict[str, Any]] = field(default_factory=list)  # validation results, for summary.json

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> TrainerState:
        known = {k: v for k, v in raw.items() if k in cls.__dataclass_fields__}
        return cls(**known)


class CheckpointManager:
    """Names, writes, lists, rotates and restores checkpoints of one run folder."""

    def __init__(self, run_dir: str | os.PathLike, keep_last: int):
        self.root = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first. Incomplete (.tmp-*) folders and folders without meta.json are not."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if _STEP_DIR.match(p.name) and (p / META).is_file()]
        return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1] if done else None

    def save(self, accelerator: Accelerator, state: TrainerState) -> Path:
        """Collective: every rank must call it (each writes its own RNG state)."""
        final = self.root / f"step_{state.step:08d}"
        tmp = self.root / f".tmp-step_{state.step:08d}"
        if accelerator.is_main_process:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            write_json_atomic(tmp / META, state.to_json())
            if final.exists():  # a re-save of the same step after a resume: replace it
                shutil.rmtree(final)
            os.replace(tmp, final)
            self._rotate(state.best_step)
        accelerator.wait_for_everyone()
        return final

    def _rotate(self, best_step: int | None) -> None:
        done = self.complete()
        keep = set(done[-self.keep_last :])
        if best_step is not None:
            keep.add(self.root / f"step_{best_step:08d}")
        for path in done:
            if path not in keep:
                shutil.rmtree(path, ignore_errors=True)
        for stale in self.root.glob(".tmp-step_*"):
            shutil.rmtree(stale, ignore_errors=True)

    def resolve(self, resume: str | None) -> Path | None:
        """Map the `train.resume` setting to a checkpoint folder (None: start fresh)."""
        if resume is None:
            return None
        if resume == "auto":
            return self.latest()
        path = Path(resume)
        if not (path / META).is_file():
            raise FileNotFoundError(f"train.resume={resume!r}: {path / META} not found; not a complete checkpoint")
        return path

    def resolve_shared(self, accelerator: Accelerator, resume: str | None) -> Path | None:
        """`resolve` done by rank 0 only and broadcast, then checked readable on every rank (collective).

        Ranks resolving `auto` on their own could pick different checkpoints (or none) when run folders are
        node-local, and then diverge or hang in the first collective. Instead every rank gets rank 0's choice, and
        when any rank cannot read it every rank raises the same clear error.
        """
        choice: list[str | None] = [None]
        error: list[str | None] = [None]
        if accelerator.is_main_process:
            try:
                found = self.resolve(resume)
                choice[0] = None if found is None else str(found)
            except FileNotFoundError as exc:
                error[0] = str(exc)
        if accelerator.num_processes > 1:
            torch.distributed.broadcast_object_list(choice, src=0)
            torch.distributed.broadcast_object_list(error, src=0)
        if error[0] is not None:
            raise FileNotFoundError(error[0])
        if choice[0] is None:
            return None
        path = Path(choice[0])
        readable = (path / META).is_file()
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
                f"{path / META}. Every process must see the same run folder (train.output_dir on a shared "
                "filesystem, not a node-local disk); copy it there or resume from a folder all nodes can read."
            )
        return path

    @staticmethod
    def load(accelerator: Accelerator, path: Path) -> TrainerState:
        accelerator.load_state(str(path))
        try:
            raw = json.loads((path / META).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise RuntimeError(f"checkpoint {path}: cannot read {META}: {exc}") from exc
        return TrainerState.from_json(raw)
