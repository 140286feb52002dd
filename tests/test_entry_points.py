"""How users start the code: file entry points import their own checkout (installed or not), `-m` under accelerate
and torchrun, and a plain (non-editable) `pip install .` that ships every `explainer` command.

The install test builds a throw-away venv on top of this interpreter's site-packages (torch etc. are reused, nothing
is downloaded); this repository's own installation there stays inactive because only the folder is added to
sys.path, without running its .pth files, and explainer's entries are left out of it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest
from _helpers import PYTHON, ROOT, TINY_SHARDS, free_port, run_cmd, tiny_overrides

MARKER = "explainer-checkout-marker"


def _env() -> dict[str, str]:
    """The user's environment: no PYTHONPATH pointing at a checkout."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}


def _run(args: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in args], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} exited {proc.returncode}\n--- stdout ---\n"
                             f"{proc.stdout[-3000:]}\n--- stderr ---\n{proc.stderr[-5000:]}")
    return proc


def _copy_checkout(dest: Path, marker: bool = True) -> Path:
    """A second checkout: the package, the launch wrappers and the packaging files; its __init__ announces itself."""
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("explainer", "launch"):
        shutil.copytree(ROOT / name, dest / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, dest / name)
    if marker:
        init = dest / "explainer" / "__init__.py"
        init.write_text(init.read_text() + f"\nimport sys as _s\n_s.stderr.write('{MARKER} ' + __file__ + '\\n')\n")
    return dest


@pytest.fixture(scope="module")
def bare_venv(tmp_path_factory) -> Path:
    """A venv without explainer that reuses this interpreter's packages (no pip inside: this pip installs into it)."""
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    reused = venv / "reused-site-packages"
    reused.mkdir()
    for source in map(Path, site.getsitepackages()):
        for entry in source.iterdir():
            if entry.name.startswith(("explainer", "__editable__")) or entry.suffix == ".pth" \
                    or (reused / entry.name).exists():
                continue
            (reused / entry.name).symlink_to(entry)
    purelib = subprocess.run([venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             check=True, capture_output=True, text=True).stdout.strip()
    Path(purelib, "_reused.pth").write_text(f"{reused}\n")
    probe = _run([venv / "bin" / "python", "-c", "import torch, explainer"], cwd=venv, check=False)
    assert "No module named 'explainer'" in probe.stderr, f"the bare venv must have torch but no explainer: {probe}"
    return venv / "bin" / "python"


FILE_ENTRY_POINTS = ["explainer/train.py", "explainer/train_classifier.py", "launch/make_shards.py",
                     "launch/submit.py", "launch/sweep_report.py"]


@pytest.mark.slow
@pytest.mark.parametrize("installed", [False, True], ids=["not-installed", "another-copy-installed"])
def test_file_entry_points_import_their_own_checkout(installed, bare_venv, tmp_path):
    """`python <checkout>/explainer/train.py` from anywhere: the checkout's code runs, also when the venv has another
    copy of explainer installed (this test run's interpreter has one: the repository's editable install)."""
    checkout = _copy_checkout(tmp_path / "second-checkout")
    python = PYTHON if installed else bare_venv
    for script in FILE_ENTRY_POINTS:
        proc = _run([python, checkout / script, "--help"], cwd=tmp_path)
        assert "usage:" in proc.stdout, script
        assert f"{MARKER} {checkout / 'explainer' / '__init__.py'}" in proc.stderr, \
            f"{script} imported another copy of explainer:\n{proc.stderr[-2000:]}"


@pytest.mark.slow
def test_non_editable_install_ships_every_command(bare_venv, tmp_path):
    """`pip install .` (not editable), then every `explainer` command from a folder that is no checkout: the code the
    commands need must be inside the package, not in launch/."""
    source = _copy_checkout(tmp_path / "source", marker=False)
    _run([sys.executable, "-m", "pip", "--python", bare_venv, "install", "--quiet", "--no-deps", "--no-build-isolation",
          "--no-index", source], cwd=tmp_path)
    shutil.rmtree(source)  # nothing may still come from the source folder
    bin_dir = bare_venv.parent
    where = _run([bare_venv, "-c", "import explainer; print(explainer.__file__)"], cwd=tmp_path).stdout.strip()
    assert Path(where).is_relative_to(bin_dir.parent) and "site-packages" in where, where
    requires = json.loads(_run([bare_venv, "-c", "import importlib.metadata as m, json; "
                                                 "print(json.dumps(m.requires('explainer')))"], cwd=tmp_path).stdout)
    core = {re.split(r"[<>=!~ ;\[]", r, maxsplit=1)[0].lower() for r in requires if "extra ==" not in r}
    assert "torchray" not in core and {"torch", "braceexpand", "webdataset"} <= core, core  # TorchRay: [baselines]
    assert any(r.startswith("torchray") and 'extra == "baselines"' in r for r in requires), requires
    assert {"onnx", "onnxruntime", "onnxscript"} <= {r.split(">")[0] for r in requires if 'extra == "export"' in r}

    work = tmp_path / "user"
    work.mkdir()
    listed = _run([bin_dir / "explainer", "--help"], cwd=work).stdout
    for command in ("train", "train-classifier", "evaluate", "explain", "make-shards", "submit", "sweep-report",
                    "bias", "demo"):
        assert f"  {command} " in listed
    # Every command's module imports from the installed package (one interpreter start instead of nine).
    _run([bare_venv, "-c", "import importlib, explainer.cli as c\n"
                           "for module, _ in c.COMMANDS.values(): importlib.import_module(module)"], cwd=work)

    _run([bin_dir / "explainer", "make-shards", "synthetic", "--out", "shards", "--workers", "1", "--no-progress",
          *TINY_SHARDS[:4], "--counts", "train=8,val=4,test=4"], cwd=work)
    manifest = json.loads((work / "shards" / "manifest.json").read_text())
    assert {k: v["total"] for k, v in manifest["splits"].items()} == {"train": 8, "val": 4, "test": 4}

    # --dry-run checks that the classifier checkpoint exists, never loads it: an empty file stands in for it.
    (work / "classifier.pt").write_bytes(b"")
    proc = _run([bin_dir / "explainer", "submit", "--dry-run", "--config", ROOT / "configs" / "synthetic.yaml",
                 "--partition", "gpu", "data.manifest=shards/manifest.json", "classifier.checkpoint=classifier.pt",
                 "train.output_dir=run"], cwd=work)
    assert proc.stdout.startswith("#!/bin/bash\n") and "#SBATCH --partition=gpu" in proc.stdout, proc.stdout
    assert not (work / "run").exists()

    proc = _run([bin_dir / "explainer", "sweep-report", "no-such-sweep"], cwd=work, check=False)
    assert proc.returncode == 2 and "sweep.json" in proc.stderr, proc.stderr


@pytest.mark.slow
def test_module_entry_points_under_torchrun_and_accelerate(synthetic_manifest, tiny_classifier, tmp_path):
    """`torchrun -m explainer.train` (2 gloo processes) and `accelerate launch -m explainer.train_classifier`."""
    env = {"ACCELERATE_USE_CPU": "1"}
    out = tmp_path / "explainer"
    run_cmd([PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()), "-m",
             "explainer.train", "--config", "configs/synthetic.yaml", *tiny_overrides(synthetic_manifest, out),
             f"classifier.checkpoint={tiny_classifier}", "explainer.arch=tiny_unet", "train.max_steps=2",
             "tracking.wandb_mode=disabled"], env=env, timeout=300)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 2

    out = tmp_path / "classifier"
    accelerate = Path(PYTHON).parent / "accelerate"
    run_cmd([accelerate, "launch", "--cpu", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
             "--dynamo_backend", "no", "-m", "explainer.train_classifier", "--config",
             "configs/classifier/synthetic.yaml", *tiny_overrides(synthetic_manifest, out), "train.max_steps=2",
             "tracking.wandb_mode=disabled"], env=env, timeout=300)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 1 and summary["steps"] == 2
