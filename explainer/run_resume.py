"""What a resumed run may change, and what it was trained with (issue 26 §3).

A checkpoint means something only together with the settings it was trained under: resuming a 32 px run at 64 px,
with other classes, another architecture, resize mode or loss kind would silently train (and export) something else
under the old run's name. `check_resume` compares the resolved config with the `config.yaml` of the checkpoint's run
folder and the model its `meta.json` records, refuses those changes naming each key, and returns the others (lr,
steps, logging, ...), which the trainer allows and records in `config_changes.jsonl`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import yaml

from explainer.atomic import write_text_atomic
from explainer.config import to_dict, with_absolute_paths
from explainer.run_errors import UserError

# Settings that change what the checkpoint's weights mean, per recipe kind.
MEANING = {"explainer": ("data.image_size", "data.resize", "explainer.arch", "loss.kind"),
           "classifier": ("data.image_size", "data.resize", "classifier.arch", "classifier.torchvision")}
NOT_COMPARED = ("train.resume",)  # differs on every resume by definition
CHANGES_FILE = "config_changes.jsonl"


def model_identity(kind: str, cfg: Any, classes: list[str]) -> dict[str, Any]:
    """What meta.json records about the model: its architecture and classes (in order)."""
    arch = cfg.explainer.arch if kind == "explainer" else (cfg.classifier.torchvision or cfg.classifier.arch)
    return {"arch": arch, "classes": list(classes)}


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _trained_with(checkpoint: Path, kind: str, saved: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's model: meta.json's record, else (older checkpoints) the run's exported model file."""
    try:
        recorded = json.loads((checkpoint / "meta.json").read_text()).get("model")
    except (OSError, ValueError, AttributeError):
        recorded = None
    if isinstance(recorded, dict) and isinstance(recorded.get("classes"), list):
        return recorded
    exported = checkpoint.parent.parent / f"{kind}.pt"
    if exported.is_file():
        from explainer.models.model_files import read_checkpoint

        try:
            payload = read_checkpoint(exported, kind)
            return {"arch": payload.get("arch"), "classes": list(payload.get("classes", []))}
        except Exception:  # noqa: BLE001 - an unreadable export only means less to compare
            pass
    key = MEANING[kind][2]
    return {"arch": saved.get(key), "classes": None}


def describe(model: dict[str, Any]) -> str:
    classes = model.get("classes")
    return f"{len(classes)} classes / {model.get('arch')}" if classes is not None else str(model.get("arch"))


def check_resume(checkpoint: Path, kind: str, cfg: Any, classes: list[str]) -> dict[str, list[Any]]:
    """Rank 0, before loading `checkpoint`: raise UserError naming each change that alters the checkpoint's meaning,
    else return the allowed changes {key: [old, new]} (empty when the run folder has no config.yaml)."""
    run_dir = checkpoint.parent.parent
    try:
        saved = flatten(yaml.safe_load((run_dir / "config.yaml").read_text()) or {})
    except (OSError, yaml.YAMLError):
        saved = {}
    new = flatten(to_dict(with_absolute_paths(cfg)))  # config.yaml stores absolute paths
    changes = {} if not saved else {
        k: [saved.get(k), new.get(k)] for k in sorted(set(saved) | set(new))
        if k not in NOT_COMPARED and saved.get(k) != new.get(k)}
    trained = _trained_with(checkpoint, kind, saved)
    refused = [f"{k} {old!r} -> {value!r}" for k, (old, value) in changes.items() if k in MEANING[kind]]
    if trained.get("classes") is not None and trained["classes"] != list(classes):
        refused.append(f"classes {len(trained['classes'])} {trained['classes']} -> {len(classes)} {list(classes)} "
                       f"(data.manifest)")
    if trained.get("arch") and trained["arch"] != model_identity(kind, cfg, classes)["arch"] and \
            not any(r.startswith(MEANING[kind][2]) for r in refused):
        refused.append(f"{MEANING[kind][2]} {trained['arch']!r} -> {model_identity(kind, cfg, classes)['arch']!r}")
    if refused:
        raise UserError(f"--resume {checkpoint}: the run folder {run_dir} was trained with {describe(trained)}, and "
                        f"this config changes what its checkpoint means: {'; '.join(refused)}. Resume with the run "
                        "folder's settings (its config.yaml), or start a new run in another train.output_dir")
    return {k: v for k, v in changes.items() if k not in MEANING[kind]}


def record_changes(run_dir: Path, checkpoint: Path, step: int, changes: dict[str, list[Any]]) -> None:
    """Append this resume's allowed changes to the run folder's record (rewritten atomically)."""
    path = run_dir / CHANGES_FILE
    before = path.read_text() if path.is_file() else ""
    line = json.dumps({"time": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "resumed_from": str(checkpoint), "step": step,
                       "changed": changes}, default=str)
    write_text_atomic(path, before + line + "\n")
