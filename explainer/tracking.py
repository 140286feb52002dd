"""Run tracking: W&B through accelerate's tracker, plus a local metrics.jsonl that always exists.

Only the main process writes. W&B mode 'auto' means: the user's WANDB_MODE if set, else offline inside a SLURM job,
else online when an API key is configured, offline otherwise (the offline run folder can be uploaded later with
`wandb sync`). WANDB_DISABLED or WANDB_MODE in the environment can make tracking more private than the config asks
(disabled > offline > online), never less, so a user who turned W&B off in their shell never ends up online. The run
id is stored in the run folder so a resumed or requeued job continues the same W&B run.
"""

from __future__ import annotations

import json
import netrc
import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from PIL import Image

from explainer.config import TrackingConfig

RUN_ID_FILE = "wandb_run_id.txt"


PRIVACY = ("online", "offline", "disabled")  # in increasing privacy
_ENV_MODES = {"online": "online", "run": "online", "offline": "offline", "dryrun": "offline", "disabled": "disabled"}
_TRUE = ("1", "true", "yes", "on")


def env_wandb_mode() -> str | None:
    """The mode the user's environment asks for: WANDB_DISABLED=true -> 'disabled', else WANDB_MODE (wandb's own
    spellings: run = online, dryrun = offline), else None."""
    if os.environ.get("WANDB_DISABLED", "").strip().lower() in _TRUE:
        return "disabled"
    value = os.environ.get("WANDB_MODE", "").strip().lower()
    if not value:
        return None
    if value not in _ENV_MODES:
        raise ValueError(f"WANDB_MODE={value!r} is not a W&B mode; use one of online, offline, disabled")
    return _ENV_MODES[value]


def has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return bool(netrc.netrc().authenticators("api.wandb.ai"))
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def resolve_wandb_mode(mode: str) -> str:
    """The W&B mode to run in: tracking.wandb_mode, made more private by the environment if it asks so.

    'auto' -> the environment's mode if set; else 'offline' inside a SLURM job (compute nodes often have no internet:
    rank 0 would stall in wandb.init while the others wait); else 'online' with an API key (env or ~/.netrc), else
    'offline'.
    """
    env = env_wandb_mode()
    if mode == "auto":
        if env:
            return env
        if os.environ.get("SLURM_JOB_ID"):
            return "offline"
        return "online" if has_api_key() else "offline"
    if mode not in PRIVACY:
        raise ValueError(f"tracking.wandb_mode={mode!r}; use auto, online, offline or disabled")
    return max(mode, env or mode, key=PRIVACY.index)


def wandb_log_with(cfg: TrackingConfig) -> str | None:
    """The accelerate `log_with` value, and the WANDB_MODE the wandb library will obey (set only to the resolved
    mode, which is never less private than one the user exported)."""
    mode = resolve_wandb_mode(cfg.wandb_mode)
    if mode == "disabled":
        return None
    os.environ["WANDB_MODE"] = mode
    os.environ.setdefault("WANDB_SILENT", "true")
    return "wandb"


def persistent_run_id(run_dir: Path, requested: str | None) -> str:
    """The configured id, else the one saved by an earlier attempt of this run, else a new one (saved)."""
    path = run_dir / RUN_ID_FILE
    if requested:
        run_id = requested
    elif path.is_file():
        run_id = path.read_text().strip()
    else:
        run_id = uuid.uuid4().hex[:12]
    if not path.is_file() or path.read_text().strip() != run_id:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(run_id)
        os.replace(tmp, path)
    return run_id


class RunTracker:
    """Writes metrics.jsonl and forwards to accelerate's trackers; a no-op on non-main ranks."""

    def __init__(self, accelerator: Accelerator, run_dir: Path, cfg: TrackingConfig, config_dict: dict[str, Any],
                 resume_step: int | None):
        self.accelerator = accelerator
        self.run_dir = run_dir
        self.enabled = accelerator.is_main_process
        self.metrics_path = run_dir / "metrics.jsonl"
        self.use_wandb = bool(accelerator.log_with)
        if not self.enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            self._truncate_after(resume_step)
        if self.use_wandb:
            run_id = persistent_run_id(run_dir, cfg.run_id)
            init = {"dir": str(run_dir), "id": run_id, "resume": "allow", "tags": list(cfg.tags)}
            if cfg.entity:
                init["entity"] = cfg.entity
            if cfg.group:
                init["group"] = cfg.group
            if cfg.run_name:
                init["name"] = cfg.run_name
            accelerator.init_trackers(cfg.project, config=config_dict, init_kwargs={"wandb": init})

    def _truncate_after(self, step: int) -> None:
        """Drop lines logged after the checkpoint we resume from: they will be logged again."""
        if not self.metrics_path.is_file():
            return
        kept = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
        tmp = self.metrics_path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(k + "\n" for k in kept))
        os.replace(tmp, self.metrics_path)

    def log(self, metrics: dict[str, float], step: int, kind: str = "train") -> None:
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, **{k: _to_float(v) for k, v in metrics.items()}}
        with self.metrics_path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.use_wandb:
            self.accelerator.log({f"{kind}/{k}": _to_float(v) for k, v in metrics.items()}, step=step)

    def log_masks(self, images: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor, class_names: list[str],
                  step: int) -> Path | None:
        """A small grid of images with per-class mask overlays: a PNG in the run folder, and wandb.Image masks."""
        if not self.enabled:
            return None
        from explainer.data.transforms import denormalize

        rgb = (denormalize(images.float().cpu()).clamp(0, 1) * 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        masks = masks.float().cpu().numpy()
        labels = labels.cpu().numpy()
        out_dir = self.run_dir / "images"
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"masks_step_{step:08d}.png"
        grid = mask_grid(rgb, masks, labels)
        tmp = path.with_suffix(".tmp.png")
        Image.fromarray(grid).save(tmp)
        os.replace(tmp, path)
        if self.use_wandb:
            import wandb

            run = self.accelerator.get_tracker("wandb", unwrap=True)
            logged = []
            for i in range(rgb.shape[0]):
                overlays = {}
                for c in np.flatnonzero(labels[i] > 0.5):
                    overlays[class_names[c]] = {
                        "mask_data": (masks[i, c] > 0.5).astype(np.uint8),
                        "class_labels": {1: class_names[c]},
                    }
                logged.append(wandb.Image(rgb[i], masks=overlays or None))
            run.log({"train/masks": logged, "train/mask_grid": wandb.Image(grid)}, step=step)
        return path

    def finish(self) -> None:
        # Not accelerator.end_training(): it also destroys the process group, and the trainer still needs it
        # (wait_for_everyone after finish; any run where RANK/WORLD_SIZE are exported: torchrun, SLURM tasks).
        if self.enabled and self.use_wandb:
            for tracker in self.accelerator.trackers:
                tracker.finish()


def mask_grid(rgb: np.ndarray, masks: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Rows: image, then the mask of each of its ground-truth classes (grey), side by side."""
    n, h, w, _ = rgb.shape
    cols = 1 + max(1, int(labels.sum(1).max()) if n else 1)
    canvas = np.full((n * h, cols * w, 3), 255, np.uint8)
    for i in range(n):
        canvas[i * h : (i + 1) * h, :w] = rgb[i]
        for j, c in enumerate(np.flatnonzero(labels[i] > 0.5)):
            grey = (masks[i, c] * 255).astype(np.uint8)
            canvas[i * h : (i + 1) * h, (j + 1) * w : (j + 2) * w] = grey[..., None]
    return canvas


def _to_float(value: Any) -> float:
    if isinstance(value, torch.Tensor):
        return float(value.detach().float().item())
    return float(value)
