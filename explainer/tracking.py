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
from collections.abc import Sequence
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
                  step: int, *, mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> Path | None:
        """A small grid of images with per-class mask overlays: a PNG in the run folder, and wandb.Image masks.
        `mean`/`std`: the classifier's input normalisation, undone for display (ImageNet's when not given)."""
        if not self.enabled:
            return None
        from explainer.data.transforms import IMAGENET_MEAN, IMAGENET_STD, denormalize

        shown = denormalize(images.float().cpu(), mean or IMAGENET_MEAN, std or IMAGENET_STD)
        rgb = (shown.clamp(0, 1) * 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        masks = masks.float().cpu().numpy()
        labels = labels.cpu().numpy()
        out_dir = self.run_dir / "images"
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"masks_step_{step:08d}.png"
        grid = mask_grid(rgb, masks, labels, class_names)
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
                gt = ", ".join(class_names[c] for c in np.flatnonzero(labels[i] > 0.5)) or "no class"
                logged.append(wandb.Image(rgb[i], masks=overlays or None, caption=f"ground truth: {gt}"))
            caption = "per row: image, mask of each ground-truth class (GT), strongest other class (not GT)"
            run.log({"train/masks": logged, "train/mask_grid": wandb.Image(grid, caption=caption)}, step=step)
        return path

    def finish(self) -> None:
        # Not accelerator.end_training(): it also destroys the process group, and the trainer still needs it
        # (wait_for_everyone after finish; any run where RANK/WORLD_SIZE are exported: torchrun, SLURM tasks).
        if self.enabled and self.use_wandb:
            for tracker in self.accelerator.trackers:
                tracker.finish()


MIN_PANEL = 96  # px: panels are enlarged (nearest) to at least this, so captions fit
CAPTION_H = 14
PAD_COLOUR = (214, 226, 240)  # light blue: grey masks never have a colour
HATCH_COLOUR = (150, 170, 200)


def _padding_panel(h: int, w: int) -> np.ndarray:
    """A cell with no mask: light blue with diagonal hatching, unmistakable for a (grey-scale) mask."""
    panel = np.empty((h, w, 3), np.uint8)
    panel[:] = PAD_COLOUR
    yy, xx = np.mgrid[:h, :w]
    panel[(yy + xx) % 8 < 2] = HATCH_COLOUR
    return panel


def mask_grid(rgb: np.ndarray, masks: np.ndarray, labels: np.ndarray,
              class_names: list[str] | None = None) -> np.ndarray:
    """Rows: the image, the mask of each of its ground-truth classes (grey, captioned "<class> (GT)"), then the
    strongest mask of a class NOT in the image (captioned "<class> (not GT)": what leaks). Cells of shorter rows are
    hatched light blue, never white (a white cell would read as a full mask)."""
    from PIL import ImageDraw

    n, h, w, _ = rgb.shape
    c = masks.shape[1]
    names = class_names or [str(k) for k in range(c)]
    scale = max(1, -(-MIN_PANEL // max(h, w)))
    ph, pw = h * scale, w * scale
    rows = []
    for i in range(n):
        gt = list(np.flatnonzero(labels[i] > 0.5))
        others = [k for k in range(c) if k not in gt]
        panels = [(rgb[i], "image")] + [(masks[i, k], f"{names[k]} (GT)") for k in gt]
        if others:
            k = max(others, key=lambda j: float(masks[i, j].mean()))
            panels.append((masks[i, k], f"{names[k]} (not GT)"))
        rows.append(panels)
    cols = max(len(r) for r in rows) if rows else 1
    canvas = Image.new("RGB", (cols * pw, max(n, 1) * (ph + CAPTION_H)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, panels in enumerate(rows):
        top = i * (ph + CAPTION_H)
        for j in range(cols):
            if j < len(panels):
                data, caption = panels[j]
                cell = data if data.ndim == 3 else np.repeat((np.clip(data, 0, 1) * 255).astype(np.uint8)[..., None],
                                                             3, axis=2)
            else:
                cell, caption = _padding_panel(h, w), "(no class)"
            cell = np.repeat(np.repeat(cell, scale, axis=0), scale, axis=1)
            canvas.paste(Image.fromarray(np.ascontiguousarray(cell)), (j * pw, top + CAPTION_H))
            draw.text((j * pw + 2, top + 1), caption[: max(4, pw // 6)], fill=(0, 0, 0))
    return np.asarray(canvas)


def _to_float(value: Any) -> float:
    if isinstance(value, torch.Tensor):
        return float(value.detach().float().item())
    return float(value)
