"""Shared fixtures: tiny synthetic shards and a tiny trained classifier, built once per test session."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _helpers import make_synthetic_shards, train_tiny_classifier


@pytest.fixture(scope="session")
def synthetic_manifest(tmp_path_factory) -> Path:
    """Tiny synthetic shards (4 classes, 32 px, 96/24/24 images) in the official VOC path."""
    return make_synthetic_shards(tmp_path_factory.mktemp("shards") / "synthetic")


@pytest.fixture(scope="session")
def tiny_classifier(synthetic_manifest, tmp_path_factory) -> Path:
    """A tiny_cnn classifier trained on the tiny shards (good enough to explain)."""
    path = train_tiny_classifier(synthetic_manifest, tmp_path_factory.mktemp("classifier"))
    summary = json.loads((path.parent / "summary.json").read_text())
    assert summary["best"]["f1"] > 0.5, summary["best"]
    return path


@pytest.fixture
def one_thread():
    """Tiny ops on a shared 2-core machine: two intra-op threads make TorchRay's EP loop 20x slower under load."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
