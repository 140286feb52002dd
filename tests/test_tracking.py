"""Tracking: W&B mode resolution, a stable run id across restarts, metrics.jsonl on resume, real offline run files."""

import json

import torch
from accelerate import Accelerator

from explainer.config import TrackingConfig
from explainer.tracking import RunTracker, persistent_run_id, resolve_wandb_mode, wandb_log_with


def test_auto_mode_is_offline_without_a_key(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    assert resolve_wandb_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_wandb_mode("auto") == "online"
    monkeypatch.setenv("SLURM_JOB_ID", "123")  # in a SLURM job: offline unless asked for online
    assert resolve_wandb_mode("auto") == "offline" and resolve_wandb_mode("online") == "online"
    monkeypatch.delenv("SLURM_JOB_ID")
    assert resolve_wandb_mode("disabled") == "disabled"
    assert wandb_log_with(TrackingConfig(wandb_mode="disabled")) is None


def test_run_id_survives_restarts(tmp_path):
    first = persistent_run_id(tmp_path, None)
    assert persistent_run_id(tmp_path, None) == first  # a requeued job finds the same id
    assert persistent_run_id(tmp_path, "fixed123") == "fixed123"
    assert persistent_run_id(tmp_path, None) == "fixed123"


def test_resume_truncates_metrics_logged_after_the_checkpoint(tmp_path):
    accelerator = Accelerator(cpu=True)
    tracker = RunTracker(accelerator, tmp_path, TrackingConfig(wandb_mode="disabled"), {}, resume_step=None)
    for step in range(1, 6):
        tracker.log({"loss": 1.0 / step}, step)
    with (tmp_path / "metrics.jsonl").open("a") as handle:
        handle.write('{"kind": "train", "st')  # a line cut by kill -9
    RunTracker(accelerator, tmp_path, TrackingConfig(wandb_mode="disabled"), {}, resume_step=3)
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_offline_wandb_run_has_run_file_and_mask_media(tmp_path, monkeypatch):
    """A real W&B offline run (no server exists here): the .wandb file and the logged mask images are on disk."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = TrackingConfig(wandb_mode="auto", project="test", run_id="abc123")
    accelerator = Accelerator(cpu=True, log_with=wandb_log_with(cfg), project_dir=str(tmp_path))
    tracker = RunTracker(accelerator, tmp_path, cfg, {"lr": 0.1}, resume_step=None)
    tracker.log({"loss": 0.5}, 1)
    images = torch.randn(2, 3, 16, 16)
    masks = torch.rand(2, 3, 16, 16)
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    png = tracker.log_masks(images, masks, labels, ["a", "b", "c"], step=2)
    tracker.finish()
    assert png.is_file()
    runs = list((tmp_path / "wandb").glob("offline-run-*abc123"))
    assert len(runs) == 1, list((tmp_path / "wandb").iterdir())
    assert list(runs[0].glob("run-abc123.wandb"))
    media = list(runs[0].glob("files/media/**/*.png"))
    assert len(media) >= 2  # per-image overlays and the grid
