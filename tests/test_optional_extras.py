"""Optional extras: without TorchRay ([baselines]) the core still trains, evaluates (Explainer, Grad-CAM) and explains,
and RISE/EP say which extra to install; with [export] the ONNX export is tested in test_explain.py.

TorchRay is installed in the test venv, so its absence is simulated: a sitecustomize on PYTHONPATH puts an import
blocker first on sys.meta_path, and `import torchray` fails in that interpreter as if it were not installed.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _helpers import PYTHON, colour_classifier, run_cmd
from PIL import Image

from explainer.baselines import BASELINES, MissingExtra, build_baseline
from explainer.config import EvalConfig
from explainer.data.loader import read_manifest
from explainer.models import build_explainer, save_model_file

BLOCKER = '''
import sys


class _NoTorchRay:
    """Simulates an environment without the [baselines] extra."""

    def find_spec(self, name, path=None, target=None):
        if name == "torchray" or name.startswith("torchray."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, _NoTorchRay())
'''


def test_rise_and_ep_name_the_extra_when_torchray_is_missing(monkeypatch):
    for name in [n for n in sys.modules if n == "torchray" or n.startswith("torchray.")] + ["torchray"]:
        monkeypatch.setitem(sys.modules, name, None)  # None in sys.modules: the import fails as if not installed
    for name in ("explainer.baselines.rise", "explainer.baselines.extremal"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    classifier = colour_classifier(gain=1.0)
    for method, label in (("rise", "RISE"), ("ep", "Extremal Perturbations")):
        with pytest.raises(MissingExtra, match=rf"{label} needs TorchRay.*'explainer\[baselines\]'"):
            build_baseline(method, classifier, EvalConfig())
    assert build_baseline("gradcam", classifier, EvalConfig()).name == "gradcam"
    assert set(BASELINES) == {"gradcam", "rise", "ep"}


@pytest.fixture()
def no_torchray(tmp_path) -> dict[str, str]:
    """Environment for subprocesses in which TorchRay cannot be imported."""
    site_dir = tmp_path / "no-torchray"
    site_dir.mkdir()
    (site_dir / "sitecustomize.py").write_text(BLOCKER)
    path = os.pathsep.join(p for p in (str(site_dir), os.environ.get("PYTHONPATH", "")) if p)
    env = {"PYTHONPATH": path}
    probe = run_cmd([PYTHON, "-c", "import torchray"], env=env, check=False)
    assert probe.returncode == 1 and "No module named 'torchray'" in probe.stderr, probe.stderr  # the blocker works
    return env


@pytest.mark.slow
def test_core_runs_without_torchray(no_torchray, synthetic_manifest, tiny_classifier, tmp_path):
    env = no_torchray
    run_cmd([PYTHON, "-c", "import importlib, explainer.cli as c\n"
                           "for module, _ in c.COMMANDS.values(): importlib.import_module(module)"], env=env)

    classes = list(read_manifest(synthetic_manifest).classes)
    torch.manual_seed(0)
    checkpoint = tmp_path / "explainer.pt"  # untrained: this test is about what runs, not about mask quality
    save_model_file(checkpoint, build_explainer("tiny_unet", len(classes)), kind="explainer", arch="tiny_unet",
                    num_classes=len(classes), classes=classes, image_size=32)
    evaluate = [PYTHON, "-m", "explainer.evaluate", "--config", "configs/synthetic.yaml", "--checkpoint", checkpoint,
                "--max-images", "8", "--no-progress", "--figure-images", "1", f"data.manifest={synthetic_manifest}",
                f"classifier.checkpoint={tiny_classifier}", "data.image_size=32", "data.batch_size=8",
                "data.num_workers=0"]
    out = tmp_path / "eval"
    run_cmd([*map(str, evaluate), "--methods", "explainer,gradcam", "--out", str(out)], env=env, timeout=300)
    results = json.loads((out / "results.json").read_text())
    assert {"explainer", "gradcam"} <= set(results["segmentation"]), results["segmentation"].keys()

    proc = run_cmd([*map(str, evaluate), "--methods", "rise", "--out", str(tmp_path / "rise")], env=env, check=False)
    assert proc.returncode != 0
    assert "RISE needs TorchRay" in proc.stderr and "'explainer[baselines]'" in proc.stderr, proc.stderr[-3000:]

    image = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(image)
    run_cmd([PYTHON, "-m", "explainer.cli", "explain", "--checkpoint", str(checkpoint), str(image),
             "--out", str(tmp_path / "explained"), "--no-progress"], env=env)
    assert Path(tmp_path / "explained" / "photo" / "scores.json").is_file()


def test_torchray_is_imported_only_by_rise_and_ep():
    """The source side of the subprocess test above (in this process other tests may have loaded TorchRay)."""
    root = Path(importlib.import_module("explainer").__file__).parent
    users = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.py")
                   if "from torchray" in p.read_text() or "import torchray" in p.read_text())
    assert users == ["baselines/extremal.py", "baselines/rise.py"], users
