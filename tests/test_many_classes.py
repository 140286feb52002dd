"""1000 classes, as a user explaining an ImageNet classifier would: a labels file and a classes file with 1000 names
(ImageNet-like, with commas), make_shards folder, a factory softmax classifier (tests/_byo_factory.py), a few training
steps through explainer/train.py, explainer.evaluate with its defaults, explain top-k. Tiny models and 32 px."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from _byo_factory import build as build_user_net
from _data_helpers import make_shards
from _helpers import PYTHON, ROOT, run_cmd
from PIL import Image

from explainer.evaluate import CLASS_SPECIFIC_SUBSET
from explainer.evaluate import main as evaluate_main
from explainer.explain import explain

C = 1000
NAMES = [f"n{k:08d} thing {k}, kind" for k in range(C)]
S = 32


@pytest.fixture(scope="module")
def imagenet_like(tmp_path_factory) -> tuple[Path, dict[str, list[int]]]:
    """Wide 40 x 30 photos with 3 of 1000 classes each (test: 6, so more than CLASS_SPECIFIC_SUBSET classes are
    present); 16 train, 4 val, 4 test; -> (manifest, test labels)."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    (root / "img").mkdir()
    rows, test = [], {}
    for i, split in enumerate(["train"] * 16 + ["val"] * 4 + ["test"] * 4):
        name = f"img/{i:02d}.png"
        Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(root / name)
        classes = sorted(int(k) for k in rng.choice(C, 6 if split == "test" else 3, replace=False))
        rows.append(json.dumps({"path": name, "labels": [NAMES[k] for k in classes], "split": split}))
        if split == "test":
            test[name] = classes
    (root / "labels.jsonl").write_text("\n".join(rows) + "\n")
    (root / "classes.txt").write_text("\n".join(NAMES) + "\n")
    out = root / "shards"
    assert make_shards("folder", "--root", str(root), "--labels", str(root / "labels.jsonl"), "--classes-file",
                       str(root / "classes.txt"), "--out", str(out)) == 0
    return out / "manifest.json", test


def test_train_evaluate_and_explain_at_1000_classes(imagenet_like, tmp_path, capsys):
    manifest, test_labels = imagenet_like
    torch.manual_seed(0)
    torch.save(build_user_net(num_classes=C, width=4).state_dict(), tmp_path / "user.pt")
    run = tmp_path / "run"
    overrides = [
        f"data.manifest={manifest}", f"data.image_size={S}", "data.batch_size=4", "data.num_workers=0",
        "data.shuffle_buffer=8", "data.resize=letterbox", "classifier.checkpoint=" + str(tmp_path / "user.pt"),
        "classifier.factory=_byo_factory:build", f"classifier.factory_kwargs={{num_classes: {C}, width: 4}}",
        "classifier.mean=[0.5,0.5,0.5]", "classifier.std=[0.5,0.5,0.5]", "loss.classification=ce",
        "explainer.arch=tiny_unet", "train.mixed_precision=no", "tracking.wandb_mode=disabled",
        f"train.output_dir={run}", "train.max_steps=2", "train.val_every_steps=2", "train.val_max_batches=1",
        "eval.methods=[explainer]",
    ]
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    proc = run_cmd([PYTHON, "explainer/train.py", "--config", "configs/synthetic.yaml", *overrides], env=env)
    assert "validating on split 'val'" in proc.stdout and f"wrote {run / 'explainer.pt'}" in proc.stdout
    meta = torch.load(run / "explainer.pt", weights_only=True)
    assert meta["num_classes"] == C and meta["extra"]["resize"] == "letterbox"

    # evaluate with the defaults (in this process: one interpreter start less): Table 1 on a logged subset of the
    # classes present, softmax rules
    capsys.readouterr()
    assert evaluate_main(["--config", str(ROOT / "configs" / "synthetic.yaml"), *overrides, "--checkpoint",
                          str(run / "explainer.pt"), "--out", str(tmp_path / "eval"), "--no-progress"]) == 0
    logged = capsys.readouterr().out
    res = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert res["n_images"] == 4
    present = sorted({k for ks in test_labels.values() for k in ks})
    assert len(present) > CLASS_SPECIFIC_SUBSET  # so the cap is what limits the subset
    targets = res["class_specific"]["explainer"]["targets"]
    assert len(targets) == CLASS_SPECIFIC_SUBSET and set(targets) <= {NAMES[k] for k in present}
    assert targets == sorted(targets, key=NAMES.index) and res["settings"]["eval"]["class_specific_classes"] == targets
    assert f"on {CLASS_SPECIFIC_SUBSET} of {C} classes" in logged and targets[0] in logged
    assert res["settings"]["eval"]["faithfulness_prob"] == "softmax"
    assert res["classification"]["clean"]["rule"] == "top-1 (softmax)"

    # explain: the top 3 classes by the classifier's softmax, names padded to 3 digits, masks on the original image
    photo = manifest.parent.parent / "img" / "20.png"
    index = explain(str(run / "explainer.pt"), [str(photo)], str(tmp_path / "explained"), top_k=3, progress=False)
    assert index["ranked_by"] == "probability" and index["resize"] == "letterbox"
    record = json.loads((tmp_path / "explained" / "20" / "scores.json").read_text())
    probs = np.array([record["probabilities"][n] for n in NAMES])
    top = [int(k) for k in np.argsort(-probs, kind="stable")[:3]]
    assert record["written"] == [NAMES[k] for k in top]
    files = sorted(p.name for p in (tmp_path / "explained" / "20" / "masks").iterdir())
    assert files == sorted(f"{k:03d}_{NAMES[k].replace(' ', '_').replace(',', '_')}.png" for k in top)
    assert Image.open(tmp_path / "explained" / "20" / "masks" / files[0]).size == (40, 30)


def test_explain_progress_moves_per_image(imagenet_like, tmp_path, monkeypatch):
    """The bar counts images, one batch of three here (it used to move per batch, after all its files): the real
    tqdm bar, with its updates recorded."""
    import tqdm

    import explainer.explain as explain_module
    from explainer.models import build_explainer, save_model_file

    updates: list[tuple[int, int]] = []  # (step, images whose files exist at that moment)

    class Recorded(tqdm.tqdm):
        def update(self, n=1):
            updates.append((n, len(list((tmp_path / "o").glob("*/scores.json")))))
            return super().update(n)

    monkeypatch.setattr(explain_module, "tqdm", Recorded)
    manifest, _ = imagenet_like
    ckpt = tmp_path / "explainer.pt"
    save_model_file(ckpt, build_explainer("tiny_unet", C), kind="explainer", arch="tiny_unet", num_classes=C,
                    classes=NAMES, image_size=S)
    photos = [str(manifest.parent.parent / "img" / f"{i:02d}.png") for i in range(3)]
    explain(str(ckpt), photos, str(tmp_path / "o"), batch_size=8, rank_by="mask")
    assert updates == [(1, 1), (1, 2), (1, 3)]
    assert all(len(list(d.glob("masks/*.png"))) == 5 for d in (tmp_path / "o").iterdir() if d.is_dir())
