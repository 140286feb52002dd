"""User errors end in one line and exit status 2 from `train`, `evaluate` and `explain` (issue 26 §4); --debug or
EXPLAINER_DEBUG=1 brings the traceback back. The inputs are the ones a hostile or careless user gives: a bad manifest
of each kind, model files that are not ours (garbage, a pickle with code in it, the wrong kind), class counts that do
not match, inputs that do not exist, unknown names."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from explainer.cli import main
from explainer.models import build_classifier, build_explainer, save_model_file
from explainer.run_errors import DEBUG_ENV, untrusted_load_reason

ROOT = Path(__file__).resolve().parents[1]


class _Payload:
    """What a hostile pickle carries: a class torch's weights_only loader must refuse to build."""

    def __reduce__(self):
        return (os.system, ("echo pwned",))


def _manifest_variants(manifest: Path) -> dict[str, object]:
    raw = json.loads(manifest.read_text())
    first = raw["splits"]["train"]["shards"][0]

    def changed(edit) -> dict:
        copy = json.loads(json.dumps(raw))
        edit(copy)
        return copy

    return {
        "not-json": "{not json",
        "no-splits": {k: v for k, v in raw.items() if k != "splits"},
        "pipe-shard": changed(lambda m: m["splits"]["train"]["shards"][0].update(path="pipe:cat x.tar")),
        "shard-twice": changed(lambda m: m["splits"]["train"]["shards"].append(dict(first))),
        "missing-shard": changed(lambda m: m["splits"]["train"]["shards"][0].update(path="gone.tar")),
        "negative-count": changed(lambda m: m["splits"]["train"]["shards"][0].update(count=-1)),
        "count-not-a-number": changed(lambda m: m["splits"]["train"]["shards"][0].update(count="many")),
        "no-train-split": changed(lambda m: m["splits"].pop("train")),
        "three-classes": changed(lambda m: m.update(classes=m["classes"][:3])),
    }


@pytest.fixture(scope="module")
def inputs(synthetic_manifest, tmp_path_factory) -> Path:
    """Bad manifests next to copies of real shards, model files good and bad, and an image folder."""
    root = tmp_path_factory.mktemp("hostile")
    for name, content in _manifest_variants(synthetic_manifest).items():
        folder = root / "m" / name
        folder.mkdir(parents=True)
        for shard in synthetic_manifest.parent.glob("*.tar"):
            shutil.copy(shard, folder / shard.name)
        (folder / "manifest.json").write_text(content if isinstance(content, str) else json.dumps(content))
    classes = json.loads(synthetic_manifest.read_text())["classes"]
    torch.manual_seed(0)
    save_model_file(root / "classifier.pt", build_classifier("tiny_cnn", len(classes)), kind="classifier",
                    arch="tiny_cnn", num_classes=len(classes), classes=classes, image_size=32)
    save_model_file(root / "explainer.pt", build_explainer("tiny_unet", len(classes)), kind="explainer",
                    arch="tiny_unet", num_classes=len(classes), classes=classes, image_size=32)
    (root / "garbage.pt").write_bytes(b"\x00garbage" * 64)
    (root / "binary.yaml").write_bytes(b"data:\n  manifest: caf\xe9\n")
    torch.save({"state_dict": _Payload()}, root / "pickle.pt")
    (root / "images").mkdir()
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(root / "images" / "a.png")
    shutil.copy(synthetic_manifest, root / "manifest.json")
    for shard in synthetic_manifest.parent.glob("*.tar"):
        shutil.copy(shard, root / shard.name)
    return root


def _train(root: Path, manifest: str) -> list[str]:
    return ["train", "--config", "configs/synthetic.yaml", f"data.manifest={root / 'm' / manifest / 'manifest.json'}",
            f"classifier.checkpoint={root / 'classifier.pt'}", f"train.output_dir={root / 'runs' / manifest}",
            "tracking.wandb_mode=disabled"]


def _evaluate(root: Path, *args: str) -> list[str]:
    return ["evaluate", "--config", "configs/synthetic.yaml", "--no-progress", "--out", str(root / "eval"),
            "--methods", "explainer", f"data.manifest={root / 'manifest.json'}", "data.image_size=32",
            "data.num_workers=0", *args]


def _explain(root: Path, *args: str) -> list[str]:
    return ["explain", "--no-progress", "--out", str(root / "explained"), *args]


# (command line given the inputs folder, what the one line must say); one case per family of user error
CASES = {
    **{f"train-manifest-{name}": (lambda r, n=name: _train(r, n), said) for name, said in {
        "not-json": "cannot be read as JSON",
        "no-splits": "lacks the expected structure (KeyError: 'splits')",
        "pipe-shard": "is a shell command",
        "shard-twice": "lists the shard",
        "missing-shard": "'gone.tar' of split 'train' does not exist",
        "negative-count": "has a negative count",
        "count-not-a-number": "lacks the expected structure (ValueError: invalid literal",
        "no-train-split": "has no split 'train'",
    }.items()},
    "train-class-count": (lambda r: [*_train(r, "three-classes"), "data.image_size=32", "data.num_workers=0",
                                     "train.mixed_precision=no"],
                           "classifier.pt: checkpoint has 4 classes but the data/config has 3"),
    "evaluate-class-count": (lambda r: _evaluate(r, "--checkpoint", str(r / "explainer.pt"), "--classifier",
                                                 str(r / "classifier.pt"),
                                                 f"data.manifest={r / 'm' / 'three-classes' / 'manifest.json'}"),
                             "checkpoint has 4 classes but the data/config has 3"),
    "evaluate-garbage-classifier": (lambda r: _evaluate(r, "--checkpoint", str(r / "explainer.pt"), "--classifier",
                                                        str(r / "garbage.pt")),
                                    "garbage.pt: not a checkpoint written by explainer's save_model_file"),
    "evaluate-pickle-checkpoint": (lambda r: _evaluate(r, "--checkpoint", str(r / "pickle.pt"), "--classifier",
                                                       str(r / "classifier.pt")),
                                   "pickle.pt: not a checkpoint written by explainer's save_model_file"),
    "evaluate-classifier-as-explainer": (lambda r: _evaluate(r, "--checkpoint", str(r / "classifier.pt"),
                                                             "--classifier", str(r / "classifier.pt")),
                                         "is a 'classifier' checkpoint, but a 'explainer' checkpoint was expected"),
    "evaluate-unknown-method": (lambda r: _evaluate(r, "--checkpoint", str(r / "explainer.pt"), "--classifier",
                                                    str(r / "classifier.pt"), "--methods", "lime"),
                                "--methods: unknown or empty ['lime']"),
    "evaluate-unknown-config-key": (lambda r: _evaluate(r, "--checkpoint", str(r / "explainer.pt"), "data.size=3"),
                                    "unknown key 'data.size'"),
    "evaluate-config-not-utf8": (lambda r: ["evaluate", "--config", str(r / "binary.yaml"), "--checkpoint",
                                            str(r / "explainer.pt")],
                                 "config file {root}/binary.yaml: line 2 is not UTF-8 text"),
    "explain-out-is-a-file": (lambda r: ["explain", "--no-progress", "--checkpoint", str(r / "explainer.pt"),
                                         "--rank-by", "mask", "--out", str(r / "garbage.pt"), str(r / "images")],
                              "garbage.pt/a/masks: Not a directory"),
    "explain-garbage-checkpoint": (lambda r: _explain(r, "--checkpoint", str(r / "garbage.pt"), str(r / "images")),
                                   "garbage.pt: not a checkpoint written by explainer's save_model_file"),
    "explain-missing-checkpoint": (lambda r: _explain(r, "--checkpoint", str(r / "nope.pt"), str(r / "images")),
                                   "explainer checkpoint " + "{root}/nope.pt does not exist"),
    "explain-missing-input": (lambda r: _explain(r, "--checkpoint", str(r / "explainer.pt"), str(r / "no_such")),
                              "is not a file, a folder or a glob pattern that matches files"),
    "explain-unknown-class": (lambda r: _explain(r, "--checkpoint", str(r / "explainer.pt"), "--classes", "zebra",
                                                 "--rank-by", "mask", str(r / "images")),
                              "--classes 'zebra' is neither a class of the explainer"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_user_errors_are_one_line_and_exit_2(case, inputs, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    argv, said = CASES[case]
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        main(argv(inputs))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert stopped.value.code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert said.format(root=inputs) in lines[0], err
    assert "Traceback" not in err and "weights_only" not in err, err  # no advice to unpickle an untrusted file


def test_debug_flag_and_environment_bring_the_traceback_back(inputs, monkeypatch):
    from explainer.data.loader import ManifestError
    from explainer.models.model_files import ModelFileError

    monkeypatch.chdir(ROOT)
    monkeypatch.setenv(DEBUG_ENV, "0")  # restored after the test: --debug sets it for the processes a run starts
    with pytest.raises(ManifestError, match="cannot be read as JSON"):
        main([*_train(inputs, "not-json"), "--debug"])
    assert os.environ[DEBUG_ENV] == "1"
    with pytest.raises(ModelFileError, match="not a checkpoint written by"):
        main(_explain(inputs, "--checkpoint", str(inputs / "garbage.pt"), str(inputs / "images")))


def test_untrusted_file_reason_keeps_the_unpickler_words_and_drops_the_advice(tmp_path):
    path = tmp_path / "x.pt"
    path.write_bytes(pickle.dumps(_Payload(), protocol=2))  # torch's protocol: it reads as far as the global
    with pytest.raises(Exception) as refused:
        torch.load(path, weights_only=True)
    assert "weights_only` set to `False`" in str(refused.value)  # what torch says, and we must not repeat
    reason = untrusted_load_reason(refused.value)
    assert reason == "Trying to load unsupported GLOBAL posix.system whose module posix is blocked.", reason
