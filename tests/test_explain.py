"""`explainer explain`: real image files in, every output file checked, broken files skipped, TorchScript and ONNX
export."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from explainer.data.transforms import decode_rgb, normalize_batch
from explainer.explain import expand_inputs, explain, main
from explainer.models import build_explainer, save_model_file

CLASSES = ["circle", "square", "triangle"]
S = 32


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = build_explainer("tiny_unet", len(CLASSES))
    path = tmp_path_factory.mktemp("ckpt") / "explainer.pt"
    save_model_file(path, model, kind="explainer", arch="tiny_unet", num_classes=len(CLASSES), classes=CLASSES,
                    image_size=S)
    return path


@pytest.fixture()
def images(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    root = tmp_path / "in"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(root / "a" / "x.png")
    Image.fromarray(rng.integers(0, 255, (20, 30), dtype=np.uint8), mode="L").save(root / "b" / "x.jpg")
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / "b" / "y.jpg")
    (root / "b" / "broken.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    (root / "b" / "notes.txt").write_text("ignored by folder expansion")
    return root


def test_expand_inputs_folders_globs_and_errors(images):
    files = expand_inputs([str(images / "a"), str(images / "b" / "*.jpg"), str(images / "a" / "x.png")])
    assert [f.relative_to(images).as_posix() for f in files] == ["a/x.png", "b/broken.jpg", "b/x.jpg", "b/y.jpg"]
    with pytest.raises(FileNotFoundError, match="matches no file"):
        expand_inputs([str(images / "*.gif")])
    with pytest.raises(FileNotFoundError, match="not a file"):
        expand_inputs([str(images / "missing.png")])


@pytest.mark.numerics
def test_explain_writes_everything_and_skips_broken_files(checkpoint, images, tmp_path):
    out = tmp_path / "out"
    index = explain(str(checkpoint), [str(images)], str(out), batch_size=2, progress=False)
    assert [Path(s["file"]).name for s in index["skipped"]] == ["broken.jpg"]
    assert len(index["images"]) == 3
    folders = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert folders == ["x", "x_2", "y"]  # two inputs named x.* get distinct folders

    model = build_explainer("tiny_unet", len(CLASSES))
    model.load_state_dict(torch.load(checkpoint, weights_only=True)["state_dict"])
    model.eval()
    src = images / "a" / "x.png"
    with torch.no_grad():
        expected = torch.sigmoid(model(normalize_batch(np.stack([decode_rgb(src.read_bytes(), S)]))).full())[0].numpy()
    record = json.loads((out / "x" / "scores.json").read_text())
    assert record["file"] == str(src) and record["size"] == [50, 40]
    for k, name in enumerate(CLASSES):
        assert record["scores"][name] == pytest.approx(float(expected[k].mean()), abs=1e-5)
        mask = Image.open(out / "x" / "masks" / f"{k:02d}_{name}.png")
        assert mask.mode == "L" and mask.size == (50, 40)
    ranked = [score for _, score in record["ranking"]]
    assert ranked == sorted(ranked, reverse=True)
    for name in ("aggregated.png", "overlay.png", "topk.png"):
        assert Image.open(out / "x" / name).size[0] > 0
    assert Image.open(out / "x" / "aggregated.png").size == (50, 40)
    assert Image.open(out / "x_2" / "overlay.png").size == (30, 20)  # the greyscale input, overlay in RGB
    assert Image.open(out / "x_2" / "overlay.png").mode == "RGB"
    written = json.loads((out / "index.json").read_text())
    assert written["skipped"][0]["file"].endswith("broken.jpg")
    assert not list(out.rglob("*.tmp"))


@pytest.mark.numerics
@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit is deprecated; still the format asked for
def test_torchscript_export_gives_the_same_masks(checkpoint, images, tmp_path):
    index = explain(str(checkpoint), [str(images / "b" / "y.jpg")], str(tmp_path / "o"), export="torchscript",
                    progress=False)
    export = index["export"]
    assert export["format"] == "torchscript" and Path(export["path"]).is_file()
    assert export["max_abs_mask_diff"] <= 1e-5
    loaded = torch.jit.load(export["path"])
    x = torch.randn(3, 3, S + 8, S)  # scripted, not traced: other batch and image sizes work too
    model = build_explainer("tiny_unet", len(CLASSES))
    model.load_state_dict(torch.load(checkpoint, weights_only=True)["state_dict"])
    model.eval()
    with torch.no_grad():
        assert torch.allclose(torch.sigmoid(loaded(x)), torch.sigmoid(model(x).logits), atol=1e-5)  # other batch size


@pytest.mark.numerics
def test_onnx_export_gives_the_same_masks(checkpoint, images, tmp_path):
    """torch's current exporter (dynamo=True) -> ONNX Runtime. The [export] extra is part of `make test`'s install,
    so a missing onnxruntime fails here instead of skipping."""
    import onnxruntime as ort

    index = explain(str(checkpoint), [str(images / "a"), str(images / "b" / "y.jpg")], str(tmp_path / "o"),
                    batch_size=2, export="onnx", progress=False)
    export = index["export"]
    assert export["format"] == "onnx" and export["path"] == str(tmp_path / "o" / "explainer.onnx")
    assert export["max_abs_mask_diff"] <= 1e-5  # float32 convolutions in two runtimes: seen ~1e-7
    session = ort.InferenceSession(export["path"], providers=["CPUExecutionProvider"])
    (image_input,) = session.get_inputs()
    assert image_input.name == "image" and not isinstance(image_input.shape[0], int)  # free batch dimension
    x = torch.randn(3, 3, S, S, generator=torch.Generator().manual_seed(1))
    model = build_explainer("tiny_unet", len(CLASSES))
    model.load_state_dict(torch.load(checkpoint, weights_only=True)["state_dict"])
    model.eval()
    with torch.no_grad():
        eager = torch.sigmoid(model(x).logits)
    exported = torch.sigmoid(torch.from_numpy(session.run(None, {"image": x.numpy()})[0]))
    assert torch.allclose(exported, eager, atol=1e-5, rtol=0)  # another batch size than the exported example


def test_exit_status_and_errors(checkpoint, images, tmp_path, capsys):
    assert main([str(images / "a"), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "ok"),
                 "--no-progress"]) == 0
    with pytest.raises(SystemExit) as stopped:  # a user error: one line and exit 2 (tests/test_run_errors.py)
        main([str(images / "a"), "--checkpoint", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "x")])
    assert stopped.value.code == 2
    assert capsys.readouterr().err.strip().endswith("nope.pt does not exist")


def test_console_script_reports_broken_file_by_name(checkpoint, images, tmp_path):
    script = Path(sys.executable).parent / "explainer"
    proc = subprocess.run([str(script), "explain", str(images / "b"), "--checkpoint", str(checkpoint), "--out",
                           str(tmp_path / "cli"), "--no-progress"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "broken.jpg" in proc.stderr
    assert (tmp_path / "cli" / "y" / "topk.png").is_file()


def test_an_image_over_the_pixel_cap_is_refused_by_name(checkpoint, images, tmp_path, huge_png, capsys):
    """Issue 17: a 12000 x 12000 PNG (small on disk) took 10 GB and 81 s; now it is refused from its header, with the
    file named, and the other images are explained. --max-image-pixels lowers (or raises) the cap."""
    (images / "a" / "huge.png").write_bytes(huge_png.read_bytes())
    assert main([str(images / "a"), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "o"),
                 "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert f"skipped {images / 'a' / 'huge.png'}: ImageTooLarge: image is 12000 x 12000 = 144,000,000 pixels" in err
    assert (tmp_path / "o" / "x" / "topk.png").is_file()
    assert main([str(images / "a" / "x.png"), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "p"),
                 "--no-progress", "--max-image-pixels", "1999"]) == 1  # x.png is 50 x 40 = 2000 pixels
    assert "more than the cap of 1,999" in capsys.readouterr().err


def test_cli_usage_and_unknown_command(capsys):
    from explainer import cli

    assert cli.main(["--help"]) == 0
    assert "explain" in capsys.readouterr().out
    assert cli.main(["explode"]) == 2
    assert "unknown command 'explode'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["explain", "--help"])
    assert "explainer explain" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------------------------
# Which classes are written (a classifier ranks them), file names, the input geometry of training
# ----------------------------------------------------------------------------------------------------------------------

MANY = [f"class{k}" for k in range(12)]


@pytest.fixture(scope="module")
def ranked_run(tmp_path_factory) -> Path:
    """A run folder as training leaves it: explainer.pt and config.yaml naming a factory softmax classifier (a state
    dict of _byo_factory's net, mean = std = 0.5)."""
    from _byo_factory import build as build_user_net

    from explainer.config import ExplainerRunConfig, load_config, save_config

    run = tmp_path_factory.mktemp("run")
    torch.manual_seed(1)
    torch.save(build_user_net(num_classes=len(MANY), width=4).state_dict(), run / "user_weights.pt")
    save_model_file(run / "explainer.pt", build_explainer("tiny_unet", len(MANY)), kind="explainer", arch="tiny_unet",
                    num_classes=len(MANY), classes=MANY, image_size=S,
                    extra={"mean": [0.5] * 3, "std": [0.5] * 3, "resize": "squash"})
    cfg = load_config(ExplainerRunConfig, None, [
        "classifier.factory=_byo_factory:build", f"classifier.factory_kwargs={{num_classes: {len(MANY)}, width: 4}}",
        f"classifier.checkpoint={run / 'user_weights.pt'}", "classifier.mean=[0.5,0.5,0.5]",
        "classifier.std=[0.5,0.5,0.5]", "loss.classification=ce"])
    save_config(cfg, run / "config.yaml")
    return run


def _user_probabilities(run: Path, path: Path) -> np.ndarray:
    from _byo_factory import build as build_user_net

    net = build_user_net(num_classes=len(MANY), width=4)
    net.load_state_dict(torch.load(run / "user_weights.pt", weights_only=True))
    x = normalize_batch(np.stack([decode_rgb(path.read_bytes(), S)]), mean=(0.5,) * 3, std=(0.5,) * 3)
    with torch.no_grad():
        return net.eval()(x).softmax(1)[0].double().numpy()


def test_default_writes_the_top_k_classes_by_the_classifiers_probability(ranked_run, images, tmp_path):
    src = images / "a" / "x.png"
    index = explain(str(ranked_run / "explainer.pt"), [str(src)], str(tmp_path / "o"), top_k=3, progress=False)
    assert index["ranked_by"] == "probability" and "_byo_factory" in index["classifier"]
    probs = _user_probabilities(ranked_run, src)
    expected = [int(k) for k in np.argsort(-probs, kind="stable")[:3]]
    record = json.loads((tmp_path / "o" / "x" / "scores.json").read_text())
    assert record["written"] == [MANY[k] for k in expected]
    assert sorted(p.name for p in (tmp_path / "o" / "x" / "masks").iterdir()) == sorted(
        f"{k:02d}_{MANY[k]}.png" for k in expected)
    assert [record["probabilities"][MANY[k]] for k in range(len(MANY))] == pytest.approx(probs, abs=1e-5)
    assert sum(record["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)  # softmax: loss.classification=ce
    assert len(record["scores"]) == len(MANY)  # every class's activation is still reported


def test_classes_by_name_or_index_all_classes_and_errors(ranked_run, images, tmp_path):
    ckpt, src = str(ranked_run / "explainer.pt"), str(images / "b" / "y.jpg")
    assert main([src, "--checkpoint", ckpt, "--out", str(tmp_path / "c"), "--classes", "class7", "--classes", "2",
                 "--no-progress"]) == 0
    names = sorted(p.name for p in (tmp_path / "c" / "y" / "masks").iterdir())
    assert names == ["02_class2.png", "07_class7.png"]
    assert main([src, "--checkpoint", ckpt, "--out", str(tmp_path / "a"), "--all-classes", "--no-progress"]) == 0
    assert len(list((tmp_path / "a" / "y" / "masks").iterdir())) == len(MANY)
    with pytest.raises(ValueError, match="'nope' is neither a class"):
        explain(ckpt, [src], str(tmp_path / "e"), classes=["nope"], progress=False)
    broken = tmp_path / "broken.yaml"
    broken.write_text((ranked_run / "config.yaml").read_text().replace("_byo_factory:build", "_no_such_module:build"))
    with pytest.raises(ValueError, match=r"cannot import module '_no_such_module'.*--rank-by mask"):
        explain(ckpt, [src], str(tmp_path / "e"), config=str(broken), progress=False)


def test_rank_by_mask_without_a_config_and_probability_needs_one(checkpoint, images, tmp_path, capsys):
    src = str(images / "b" / "y.jpg")
    index = explain(str(checkpoint), [src], str(tmp_path / "m"), top_k=2, progress=False)
    assert index["ranked_by"] == "mask" and "ranking classes by average mask activation" in capsys.readouterr().err
    record = json.loads((tmp_path / "m" / "y" / "scores.json").read_text())
    by_activation = sorted(CLASSES, key=lambda c: -record["scores"][c])
    assert record["written"] == by_activation[:2]
    with pytest.raises(FileNotFoundError, match="needs the run's config"):
        explain(str(checkpoint), [src], str(tmp_path / "p"), rank_by="probability", progress=False)


def test_mask_file_names_sort_by_class_index():
    from explainer.explain import mask_file_name

    assert mask_file_name(7, "a b", 20) == "07_a_b.png"
    assert mask_file_name(17, "jay", 1000) == "017_jay.png"
    names = [mask_file_name(k, "c", 1000) for k in (179, 17, 5)]
    assert sorted(names) == [mask_file_name(k, "c", 1000) for k in (5, 17, 179)]


@pytest.mark.numerics
def test_center_crop_recorded_in_the_checkpoint_is_what_explain_does(images, tmp_path):
    """The explainer sees the centred square, as in its training; the written mask lies on the original image, 0
    where the model saw nothing."""
    torch.manual_seed(0)
    model = build_explainer("tiny_unet", len(CLASSES)).eval()
    ckpt = tmp_path / "explainer.pt"
    save_model_file(ckpt, model, kind="explainer", arch="tiny_unet", num_classes=len(CLASSES), classes=CLASSES,
                    image_size=S, extra={"resize": "center_crop"})
    src = images / "a" / "x.png"  # 50 x 40: the centred 40 x 40 square, 5 columns cut on each side
    explain(str(ckpt), [str(src)], str(tmp_path / "o"), rank_by="mask", progress=False)
    with torch.no_grad():
        x = normalize_batch(np.stack([decode_rgb(src.read_bytes(), S, "center_crop")]))
        expected = torch.sigmoid(model(x).full())
    record = json.loads((tmp_path / "o" / "x" / "scores.json").read_text())
    assert record["resize"] == "center_crop"
    assert record["scores"]["circle"] == pytest.approx(float(expected[0, 0].mean()), abs=1e-5)
    mask = np.asarray(Image.open(tmp_path / "o" / "x" / "masks" / "00_circle.png"))
    assert mask.shape == (40, 50)
    assert mask[:, :5].max() == 0 and mask[:, 45:].max() == 0 and mask[:, 5:45].min() > 0


@pytest.mark.parametrize("layout", ["started_above", "inside_run_folder"])
def test_a_runs_relative_classifier_path_is_found_from_any_directory(checkpoint, images, tmp_path, monkeypatch,
                                                                     layout):
    """Issue 26: config.yaml of a run trained with a relative classifier.checkpoint named it from the directory the
    run was started in, so `explain` from anywhere else fell back or failed. Runs now store absolute paths; for older
    ones a relative path is looked up where the run was started (the run folder minus its relative
    train.output_dir), then in the run folder."""
    import shutil

    from explainer.config import ExplainerRunConfig, load_config, save_config
    from explainer.models import build_classifier

    project = tmp_path / "project"
    run = project / "runs" / "x"
    run.mkdir(parents=True)
    shutil.copy(checkpoint, run / "explainer.pt")
    where = project / "clf" if layout == "started_above" else run
    where.mkdir(exist_ok=True)
    save_model_file(where / "classifier.pt", build_classifier("tiny_cnn", len(CLASSES)), kind="classifier",
                    arch="tiny_cnn", num_classes=len(CLASSES), classes=CLASSES, image_size=S)
    relative = "clf/classifier.pt" if layout == "started_above" else "classifier.pt"
    cfg = load_config(ExplainerRunConfig, None, ["classifier.arch=tiny_cnn", f"classifier.checkpoint={relative}",
                                                 "train.output_dir=runs/x", f"data.image_size={S}"])
    save_config(cfg, run / "config.yaml")  # as training wrote it before paths were stored absolute
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main([str(images / "a"), "--checkpoint", str(run), "--out", "out", "--no-progress"]) == 0
    index = json.loads((elsewhere / "out" / "index.json").read_text())
    assert index["ranked_by"] == "probability" and str(where / "classifier.pt") in index["classifier"]


@pytest.mark.numerics
def test_a_head_resolution_explainer_upsamples_only_the_written_classes(images, tmp_path, monkeypatch):
    """LR-ASPP (logits at 1/8): --rank-by mask scores every class at the head's resolution; only the top-k written
    classes (and the aggregated max, one map) are upsampled, and their masks are those of the model as it was, when
    its forward upsampled all classes (an old checkpoint: same weights, same masks)."""
    from explainer import explain as explain_module
    from explainer.data.transforms import mask_to_original

    names = [f"c{k}" for k in range(12)]
    torch.manual_seed(0)
    model = build_explainer("lraspp_mobilenet_v3_large", len(names)).eval()
    ckpt = tmp_path / "explainer.pt"
    save_model_file(ckpt, model, kind="explainer", arch="lraspp_mobilenet_v3_large", num_classes=len(names),
                    classes=names, image_size=S)
    upsampled = []

    def spy(logits, size):
        upsampled.append(tuple(logits.shape[:2]))
        return explain_module.upsample.__wrapped__(logits, size)

    spy.__wrapped__ = explain_module.upsample
    monkeypatch.setattr(explain_module, "upsample", spy)
    src = images / "a" / "x.png"
    explain(str(ckpt), [str(src)], str(tmp_path / "o"), rank_by="mask", top_k=2, progress=False)
    assert sorted(upsampled) == [(1, 1)] * 3  # two written classes and the aggregated map, one map each
    x = normalize_batch(np.stack([decode_rgb(src.read_bytes(), S)]))
    with torch.no_grad():
        head = torch.sigmoid(model(x).logits)[0]
        before = torch.sigmoid(model.net(x)["out"])[0]  # what the model's forward returned before
    record = json.loads((tmp_path / "o" / "x" / "scores.json").read_text())
    for k, name in enumerate(names):
        assert record["scores"][name] == pytest.approx(float(head[k].mean()), abs=1e-6)
    assert len(record["written"]) == 2
    for name in record["written"]:
        k = names.index(name)
        written = np.asarray(Image.open(tmp_path / "o" / "x" / "masks" / f"{k:02d}_{name}.png"))
        assert np.array_equal(written, np.asarray(mask_to_original(before[k].numpy(), (50, 40), "squash")))
