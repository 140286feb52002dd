"""Tracking: W&B mode resolution, a stable run id across restarts, metrics.jsonl on resume, real offline run files."""

import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from PIL import Image

from explainer.config import TrackingConfig
from explainer.tracking import RunTracker, persistent_run_id, resolve_wandb_mode, wandb_log_with


@pytest.fixture(autouse=True)
def clean_wandb_env(monkeypatch, tmp_path):
    """No W&B setting of the developer's shell leaks in, and whatever a test (or wandb_log_with) sets is undone."""
    for name in ("WANDB_MODE", "WANDB_DISABLED", "WANDB_API_KEY", "WANDB_BASE_URL", "SLURM_JOB_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc, no ~/.config/wandb


@pytest.fixture
def wandb_server(monkeypatch):
    """A stand-in for the W&B server, the one part that cannot run here: it records every request and answers 503.
    WANDB_BASE_URL points at it and an API key is set, so a run that went online would show up in `requests`."""
    requests: list[tuple[str, str]] = []

    class Handler(BaseHTTPRequestHandler):
        def _record(self) -> None:
            requests.append((self.command, self.path))
            self.send_response(503)
            self.end_headers()

        do_GET = do_POST = do_PUT = _record

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    yield requests
    server.shutdown()
    server.server_close()


def test_auto_mode_is_offline_without_a_key(monkeypatch):
    assert resolve_wandb_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_wandb_mode("auto") == "online"
    monkeypatch.setenv("SLURM_JOB_ID", "123")  # in a SLURM job: offline unless asked for online
    assert resolve_wandb_mode("auto") == "offline" and resolve_wandb_mode("online") == "online"
    monkeypatch.setenv("WANDB_MODE", "online")  # ... in the config or in the environment
    assert resolve_wandb_mode("auto") == "online"
    monkeypatch.delenv("SLURM_JOB_ID")
    monkeypatch.delenv("WANDB_MODE")
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


@pytest.mark.parametrize(("config", "env", "key", "expected"), [
    ("auto", {}, True, "online"),
    ("auto", {"WANDB_MODE": "offline"}, True, "offline"),
    ("auto", {"WANDB_MODE": "dryrun"}, True, "offline"),  # wandb's old spelling of offline
    ("auto", {"WANDB_MODE": "disabled"}, True, "disabled"),
    ("auto", {"WANDB_DISABLED": "true"}, True, "disabled"),
    ("auto", {"WANDB_DISABLED": "false"}, False, "offline"),
    ("auto", {"WANDB_MODE": "online"}, False, "online"),  # the user asks for it: wandb will ask for a key
    ("online", {"WANDB_MODE": "offline"}, True, "offline"),  # the environment may only make tracking more private
    ("online", {"WANDB_DISABLED": "1"}, True, "disabled"),
    ("offline", {"WANDB_MODE": "online"}, True, "offline"),
    ("disabled", {"WANDB_MODE": "online"}, True, "disabled"),
])
def test_the_users_wandb_environment_is_respected(monkeypatch, config, env, key, expected):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    if key:
        monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_wandb_mode(config) == expected
    log_with = wandb_log_with(TrackingConfig(wandb_mode=config))
    assert log_with == (None if expected == "disabled" else "wandb")
    if expected != "disabled":  # what the wandb library will obey
        assert os.environ["WANDB_MODE"] == expected
    elif "WANDB_MODE" in env:  # the user's value is left alone
        assert os.environ["WANDB_MODE"] == env["WANDB_MODE"]


def test_a_bad_wandb_mode_in_the_environment_is_named(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offlline")
    with pytest.raises(ValueError, match="WANDB_MODE='offlline'"):
        resolve_wandb_mode("auto")


def test_exported_wandb_mode_disabled_with_an_api_key_stays_off(wandb_server, monkeypatch, tmp_path):
    """The issue's case: WANDB_MODE=disabled plus an API key used to end up online (auto overwrote WANDB_MODE)."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    cfg = TrackingConfig(wandb_mode="auto", project="test", run_id="off123")
    log_with = wandb_log_with(cfg)
    assert log_with is None and os.environ["WANDB_MODE"] == "disabled"
    accelerator = Accelerator(cpu=True, log_with=log_with, project_dir=str(tmp_path))
    tracker = RunTracker(accelerator, tmp_path, cfg, {"lr": 0.1}, resume_step=None)
    tracker.log({"loss": 0.5}, 1)
    tracker.finish()
    assert (tmp_path / "metrics.jsonl").is_file() and not (tmp_path / "wandb").exists()
    assert wandb_server == []


def test_exported_offline_mode_with_an_api_key_is_a_real_offline_run(wandb_server, monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = TrackingConfig(wandb_mode="auto", project="test", run_id="offl456")
    assert resolve_wandb_mode(cfg.wandb_mode) == "offline"  # before the fix: online (an API key is set)
    accelerator = Accelerator(cpu=True, log_with=wandb_log_with(cfg), project_dir=str(tmp_path))
    tracker = RunTracker(accelerator, tmp_path, cfg, {"lr": 0.1}, resume_step=None)
    tracker.log({"loss": 0.5}, 1)
    tracker.finish()
    runs = list((tmp_path / "wandb").glob("offline-run-*offl456"))
    assert len(runs) == 1 and list(runs[0].glob("run-offl456.wandb")), list((tmp_path / "wandb").iterdir())
    assert not list((tmp_path / "wandb").glob("run-*"))  # no online run folder
    assert wandb_server == []  # the server was never contacted


def test_mask_grid_captions_and_padding_cannot_pass_for_a_mask():
    """Rows: image, each ground-truth class's mask, the strongest other class; short rows padded with a coloured
    hatch (a mask panel is grey: equal R, G, B), each panel under a caption strip."""
    import numpy as np

    from explainer.tracking import CAPTION_H, MIN_PANEL, mask_grid

    rgb = np.zeros((2, 32, 32, 3), np.uint8)
    masks = np.ones((2, 3, 32, 32))  # full masks: white panels
    masks[0, 1] = 0.0
    labels = np.array([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    grid = mask_grid(rgb, masks, labels, ["a", "b", "c"])
    scale = MIN_PANEL // 32
    ph, pw = 32 * scale, 32 * scale
    assert grid.shape == (2 * (ph + CAPTION_H), 4 * pw, 3)  # image + 2 GT masks + 1 "not GT"
    row1 = grid[ph + CAPTION_H + CAPTION_H :]
    mask_cell = grid[CAPTION_H:ph + CAPTION_H, pw:2 * pw]
    assert (mask_cell == 255).all()  # a full mask is white
    pad_cell = row1[:, 2 * pw:3 * pw].astype(int)  # image, strongest other class, then padding
    assert (pad_cell[..., 2] - pad_cell[..., 0] > 20).all()  # bluish everywhere: never grey like a mask
    captions = grid[:CAPTION_H]
    assert (captions < 128).any()  # dark caption text on the white strip


def test_mask_grid_shows_the_image_with_the_classifiers_normalisation_undone(tmp_path):
    """Images normalised with the classifier's mean = std = 0.5 come back as their own colours in the grid (with
    ImageNet's statistics they came back at about half the contrast)."""
    from explainer.data.transforms import normalize_batch

    colour = np.array([200, 40, 120], np.uint8)
    pixels = np.broadcast_to(colour, (1, 16, 16, 3)).copy()
    images = normalize_batch(pixels, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    tracker = RunTracker(Accelerator(cpu=True), tmp_path, TrackingConfig(wandb_mode="disabled"), {}, resume_step=None)
    png = tracker.log_masks(images, torch.rand(1, 2, 16, 16), torch.tensor([[1.0, 0.0]]), ["a", "b"], step=1,
                            mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    grid = np.asarray(Image.open(png).convert("RGB")).astype(int)
    panel = grid[20:60, 20:60]  # inside the image panel (16 px enlarged to 96)
    assert np.abs(panel - colour).max() <= 1
