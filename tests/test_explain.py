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
from explainer.models import build_explainer, save_checkpoint

CLASSES = ["circle", "square", "triangle"]
S = 32


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = build_explainer("tiny_unet", len(CLASSES))
    path = tmp_path_factory.mktemp("ckpt") / "explainer.pt"
    save_checkpoint(path, model, kind="explainer", arch="tiny_unet", num_classes=len(CLASSES), classes=CLASSES,
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
        expected = torch.sigmoid(model(normalize_batch(np.stack([decode_rgb(src.read_bytes(), S)]))))[0].numpy()
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
        assert torch.allclose(torch.sigmoid(loaded(x)), torch.sigmoid(model(x)), atol=1e-5)  # other batch size


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
        eager = torch.sigmoid(model(x))
    exported = torch.sigmoid(torch.from_numpy(session.run(None, {"image": x.numpy()})[0]))
    assert torch.allclose(exported, eager, atol=1e-5, rtol=0)  # another batch size than the exported example


def test_exit_status_and_errors(checkpoint, images, tmp_path):
    assert main([str(images / "a"), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "ok"),
                 "--no-progress"]) == 0
    with pytest.raises(FileNotFoundError, match="does not exist"):
        main([str(images / "a"), "--checkpoint", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "x")])


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
