"""Bring your own Explanandum: torchvision by name, a user factory, a TorchScript file; frozen, checked, explained.

The end-to-end tests train an Explainer a few steps through the real entry point (explainer/train.py) against each
source and evaluate it through explainer.evaluate, as a user would.
"""

from __future__ import annotations

import copy
import json
import math
import os
import warnings
from pathlib import Path

import pytest
import torch
import torchvision
from _byo_factory import build as build_user_net
from _helpers import PYTHON, ROOT, run_cmd, tiny_overrides

from explainer.baselines.gradcam import GradCAM, gradcam_layer
from explainer.config import (
    ClassifierModelConfig,
    ClassifierRunConfig,
    ConfigError,
    ExplainerRunConfig,
    LossConfig,
    load_config,
)
from explainer.losses import classification_loss
from explainer.models import WeightsNotFoundError, build_explainer, is_frozen
from explainer.models.explanandum import load_explanandum
from explainer.step import explainer_forward_loss

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = ["circle", "square", "triangle", "cross"]
S = 32
TESTS = str(ROOT / "tests")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _script(model: torch.nn.Module, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated in favour of torch.export
        torch.jit.save(torch.jit.script(model.eval()), str(path))
    return path


def make_source(kind: str, tmp: Path, num_classes: int = len(CLASSES)) -> ClassifierModelConfig:
    """A classifier config of the given source, its files written under `tmp`."""
    if kind == "torchvision":
        net = torchvision.models.get_model("mobilenet_v3_small", weights=None, num_classes=num_classes)
        torch.save(net.state_dict(), tmp / "mnv3.pt")
        return ClassifierModelConfig(torchvision="mobilenet_v3_small", checkpoint=str(tmp / "mnv3.pt"))
    if kind == "factory":
        torch.save(build_user_net(num_classes=num_classes).state_dict(), tmp / "user.pt")
        return ClassifierModelConfig(factory="_byo_factory:build", factory_kwargs={"num_classes": num_classes},
                                     checkpoint=str(tmp / "user.pt"))
    return ClassifierModelConfig(torchscript=str(_script(build_user_net(num_classes=num_classes),
                                                         tmp / "user_scripted.pt")))


@pytest.mark.parametrize("kind", ["torchvision", "factory", "torchscript"])
def test_every_source_is_frozen_for_real(kind, tmp_path):
    """The bit-identity check of test_models, for each source: a few explainer steps leave F exactly as it was."""
    explanandum = load_explanandum(make_source(kind, tmp_path), CLASSES, S)
    classifier = explanandum.model
    assert explanandum.kind == kind and is_frozen(classifier)
    before = copy.deepcopy(classifier.state_dict())
    x_probe = torch.randn(2, 3, S, S)
    reference = classifier(x_probe)
    explainer = build_explainer("tiny_unet", len(CLASSES))
    optimizer = torch.optim.Adam(explainer.parameters(), lr=1e-2)
    images, labels = torch.randn(4, 3, S, S), torch.tensor([[1.0, 0, 0, 0], [0, 1, 1, 0], [0, 0, 0, 1], [1, 1, 1, 1]])
    for _ in range(2):
        classifier.train()  # a careless caller
        out = explainer_forward_loss(explainer, classifier, images, labels, LossConfig())
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    assert not classifier.training and not any(m.training for m in classifier.modules())
    assert all(p.grad is None and not p.requires_grad for p in classifier.parameters())
    after = classifier.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in after)
    assert torch.equal(classifier(x_probe), reference)  # BN statistics and dropout untouched


@pytest.mark.parametrize("kind", ["torchvision", "factory", "torchscript"])
def test_wrong_class_count_is_refused_by_name(kind, tmp_path):
    cfg = make_source(kind, tmp_path, num_classes=3)
    if kind == "torchvision":  # a 3-output state dict cannot even be loaded into a 4-output model
        with pytest.raises(ValueError, match=r"mnv3\.pt: state dict does not fit torchvision mobilenet_v3_small "
                                             r"with 4 outputs.*shape mismatch"):
            load_explanandum(cfg, CLASSES, S)
        return
    name = {"factory": "factory _byo_factory:build", "torchscript": "user_scripted.pt"}[kind]
    with pytest.raises(ValueError, match=rf"{name}.*outputs shape \(1, 3\).*manifest.json has 4 classes "
                                         r"\(circle, square"):
        load_explanandum(cfg, CLASSES, S, where="shards/manifest.json")


def test_torchvision_names_are_validated_and_nothing_is_downloaded(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"'resnet_18' is not a torchvision classification model.*resnet18"):
        load_explanandum(ClassifierModelConfig(torchvision="resnet_18", checkpoint="x.pt"), CLASSES, S)
    with pytest.raises(ValueError, match="no weights"):
        load_explanandum(ClassifierModelConfig(torchvision="resnet18"), CLASSES, S)
    with pytest.raises(FileNotFoundError, match=r"classifier\.checkpoint: .*nowhere\.pt does not exist"):
        load_explanandum(ClassifierModelConfig(torchvision="resnet18", checkpoint=str(tmp_path / "nowhere.pt")),
                         CLASSES, S)
    # the local torchvision cache: a clear error naming the file and the folder, then the file is used
    hub = tmp_path / "hub"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "unused"))
    old_dir = torch.hub.get_dir()
    torch.hub.set_dir(str(hub))
    try:
        cfg = ClassifierModelConfig(torchvision="mobilenet_v3_small", torchvision_weights="IMAGENET1K_V1")
        expected = hub / "checkpoints" / "mobilenet_v3_small-047dcff4.pth"
        with pytest.raises(WeightsNotFoundError) as info:
            load_explanandum(cfg, CLASSES, S)
        assert str(expected) in str(info.value) and "Nothing is downloaded" in str(info.value)
        expected.parent.mkdir(parents=True)
        source = torchvision.models.mobilenet_v3_small(weights=None)  # stands for the real ImageNet file
        torch.save(source.state_dict(), expected)
        imagenet = [f"class_{i}" for i in range(1000)]
        loaded = load_explanandum(cfg, imagenet, S).model
        assert torch.equal(loaded.features[0][0].weight, source.features[0][0].weight)
        with pytest.raises(ValueError, match=r"torchvision mobilenet_v3_small \(weights IMAGENET1K_V1.*1000\).*"
                                             r"has 4 classes"):
            load_explanandum(cfg, CLASSES, S)
        with pytest.raises(ValueError, match="IMAGENET1K_V9.*IMAGENET1K_V1"):
            load_explanandum(ClassifierModelConfig(torchvision="mobilenet_v3_small",
                                                   torchvision_weights="IMAGENET1K_V9"), CLASSES, S)
    finally:
        torch.hub.set_dir(old_dir)


def test_factory_errors_name_what_failed(tmp_path):
    cases = {
        "no_such_pkg.models:build": "cannot import module 'no_such_pkg.models'",
        "_byo_factory:missing": "has no attribute 'missing'",
        "_byo_factory:UserNet": "failed with classifier.factory_kwargs",  # needs arguments the config does not give
    }
    for spec, message in cases.items():
        with pytest.raises(ValueError, match=message):
            load_explanandum(ClassifierModelConfig(factory=spec), CLASSES, S)
    torch.save(build_user_net(width=4).state_dict(), tmp_path / "narrow.pt")
    with pytest.raises(ValueError, match=r"narrow\.pt: state dict does not fit the model built by _byo_factory"):
        load_explanandum(ClassifierModelConfig(factory="_byo_factory:build", checkpoint=str(tmp_path / "narrow.pt")),
                         CLASSES, S)


def test_config_accepts_one_source_and_normalisation():
    cfg = load_config(ExplainerRunConfig, None, ["classifier.factory=pkg.mod:build",
                                                 "classifier.factory_kwargs={num_classes: 4, width: 8}",
                                                 "classifier.mean=[0.5,0.5,0.5]", "classifier.std=[0.25,0.25,0.25]",
                                                 "loss.classification=ce", "eval.gradcam_layer=body.4"])
    assert cfg.classifier.factory_kwargs == {"num_classes": 4, "width": 8} and cfg.classifier.mean == [0.5] * 3
    with pytest.raises(ConfigError, match="at most one of torchvision, factory, torchscript"):
        load_config(ExplainerRunConfig, None, ["classifier.factory=a:b", "classifier.torchscript=m.pt"])
    with pytest.raises(ConfigError, match=r"classifier\.mean/std"):
        load_config(ExplainerRunConfig, None, ["classifier.std=[0.2,0.0,0.2]"])
    with pytest.raises(ConfigError, match=r"loss\.classification"):
        load_config(ExplainerRunConfig, None, ["loss.classification=softmax"])
    with pytest.raises(ConfigError, match=r"classifier\.factory_kwargs"):
        load_config(ExplainerRunConfig, None, ["classifier.factory_kwargs=[1,2]"])
    with pytest.raises(ConfigError, match="train_classifier puts our head on"):
        load_config(ClassifierRunConfig, None, ["classifier.torchscript=m.pt"])
    assert load_config(ClassifierRunConfig, None, ["classifier.torchvision=resnet18"]).classifier.torchvision


@pytest.mark.numerics
def test_cross_entropy_term_by_hand():
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, math.log(3.0)], [1.0, 2.0]], dtype=torch.float64)
    labels = torch.tensor([[0.0, 1.0], [1.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
    got = classification_loss(logits, labels, "ce")
    expected = [-math.log(0.75), -(0.5 * math.log(0.25) + 0.5 * math.log(0.75)), 0.0]
    assert got.tolist() == pytest.approx(expected, rel=1e-12, abs=1e-15)
    bce = classification_loss(logits, labels)  # the reference default is unchanged
    assert bce[0].item() == pytest.approx((math.log(2.0) + math.log(1 + 1 / 3)) / 2, rel=1e-12)


def test_gradcam_layer_automatic_named_and_refused(tmp_path):
    net = load_explanandum(make_source("torchvision", tmp_path), CLASSES, S).model
    x = torch.randn(2, 3, S, S)
    auto = gradcam_layer(net, x)  # 32 px: the last map with spatial extent (later ones are 1x1)
    names = {m: n for n, m in net.named_modules()}
    assert names[auto].startswith("features.")
    maps = GradCAM(net, "features.3")(x, torch.ones(2, 4, dtype=torch.bool))
    assert maps.shape == (2, 4, S, S) and maps.min() >= 0 and maps.max() <= 1 and maps.flatten(2).amax(2).gt(0).all()
    with pytest.raises(ValueError, match=r"no layer 'features\.99'; candidate layers \(last first\): features\.12"):
        GradCAM(net, "features.99")
    with pytest.raises(ValueError, match=r"'classifier\.3' outputs shape \(1, 4\), not a feature map"):
        GradCAM(net, "classifier.3")(x, torch.ones(2, 4, dtype=torch.bool))
    scripted = load_explanandum(make_source("torchscript", tmp_path), CLASSES, S).model
    with pytest.raises(ValueError, match="TorchScript classifier does not run Python hooks.*rise, ep"):
        GradCAM(scripted)


@pytest.mark.numerics
def test_loader_uses_the_classifiers_normalisation(synthetic_manifest):
    """A pixel of the configured mean colour is 0 after normalisation: masking removes to that colour."""
    from explainer.config import DataConfig
    from explainer.data.loader import make_eval_loader
    from explainer.data.transforms import normalize_batch

    mean, std = (0.5, 0.25, 0.75), (0.5, 0.25, 0.125)
    pixel = torch.tensor([[[127.5, 63.75, 191.25]]]).round().to(torch.uint8).numpy()  # within rounding of the mean
    out = normalize_batch([pixel.repeat(2, 0).repeat(2, 1)], mean=mean, std=std)
    assert out.abs().max() < 0.5 / 255 / min(std) + 1e-6
    cfg = DataConfig(manifest=str(synthetic_manifest), image_size=S, batch_size=4, num_workers=0)
    default = next(iter(make_eval_loader(cfg, synthetic_manifest, "test", rank=0, world_size=1)))["image"]
    custom = next(iter(make_eval_loader(cfg, synthetic_manifest, "test", rank=0, world_size=1, mean=mean,
                                        std=std)))["image"]
    imagenet_mean, imagenet_std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    raw = default * imagenet_std.view(3, 1, 1) + imagenet_mean.view(3, 1, 1)
    expected = (raw - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    assert torch.allclose(custom, expected, atol=1e-4)
    from explainer.data.transforms import normalize_on_device  # uint8 batches normalised on the device (GPU path)

    u8 = next(iter(make_eval_loader(cfg, synthetic_manifest, "test", rank=0, world_size=1, image_format="uint8")))
    assert torch.equal(normalize_on_device(u8["image"], mean=mean, std=std), custom)  # same arithmetic, bit for bit


# ----------------------------------------------------------------------------------------------------------------------
# End to end: train through explainer/train.py, evaluate through explainer.evaluate
# ----------------------------------------------------------------------------------------------------------------------


def _source_overrides(cfg: ClassifierModelConfig) -> list[str]:
    out = ["classifier.checkpoint=null"]  # the preset names our demo checkpoint
    for key in ("torchvision", "factory", "torchscript", "checkpoint"):
        value = getattr(cfg, key)
        if value is not None:
            out.append(f"classifier.{key}={value}")
    if cfg.factory_kwargs:
        out.append("classifier.factory_kwargs={" + ", ".join(f"{k}: {v}" for k, v in cfg.factory_kwargs.items())
                   + "}")
    return out


@pytest.mark.parametrize("kind", ["torchvision", "factory", "torchscript"])
def test_explainer_trains_and_evaluates_against_each_source(kind, synthetic_manifest, tmp_path):
    source = _source_overrides(make_source(kind, tmp_path))
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT), TESTS, os.environ.get("PYTHONPATH", "")])}
    extra = ["loss.classification=ce"] if kind == "factory" else []
    if kind == "torchvision":  # travels from training (normalised on the device) to the explainer checkpoint
        extra += ["classifier.mean=[0.5,0.5,0.5]", "data.normalize_on_device=on"]
    run_dir = tmp_path / "run"
    overrides = [*tiny_overrides(synthetic_manifest, run_dir), *source, *extra, "explainer.arch=tiny_unet",
                 "train.max_steps=3", "train.val_every_steps=3", "train.val_max_batches=1"]
    run_cmd([PYTHON, "explainer/train.py", "--config", "configs/synthetic.yaml", *overrides], env=env)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 3 and math.isfinite(summary["best_val_loss"]), summary
    meta = torch.load(run_dir / "explainer.pt", weights_only=True)
    assert meta["extra"]["mean"] == ([0.5] * 3 if kind == "torchvision" else [0.485, 0.456, 0.406])

    methods = "explainer,rise" if kind == "torchscript" else "explainer,gradcam"
    layer = ["eval.gradcam_layer=body.4"] if kind == "factory" else []  # named; automatic for torchvision
    run_cmd([PYTHON, "-m", "explainer.evaluate", "--config", "configs/synthetic.yaml", *overrides, *layer,
             "eval.rise_masks=50", "eval.rise_batch=50", "--checkpoint", str(run_dir / "explainer.pt"), "--methods",
             methods, "--max-images", "8", "--out", str(tmp_path / "eval"), "--no-progress"], env=env)
    res = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert res["n_images"] == 8
    baseline = methods.split(",")[1]
    assert res["segmentation"][baseline]["n"] > 0 and 0 <= res["segmentation"][baseline]["iou"] <= 1
    assert res["timing"][baseline]["images"] == 8
    assert kind.replace("torchscript", "TorchScript") in res["settings"]["classifier"]
    # TorchScript: Grad-CAM is refused with the reason (test_gradcam_layer_automatic_named_and_refused)


def test_train_refuses_a_wrong_class_count_by_name(synthetic_manifest, tmp_path):
    cfg = make_source("torchscript", tmp_path, num_classes=3)
    proc = run_cmd([PYTHON, "explainer/train.py", "--config", "configs/synthetic.yaml",
                    *tiny_overrides(synthetic_manifest, tmp_path / "run"), f"classifier.torchscript={cfg.torchscript}",
                    "classifier.checkpoint=null", "explainer.arch=tiny_unet", "train.max_steps=1"], check=False)
    assert proc.returncode != 0
    assert f"classifier (TorchScript {cfg.torchscript}) outputs shape (1, 3)" in proc.stderr
    assert f"{synthetic_manifest} has 4 classes" in proc.stderr


def test_our_head_replacement_on_any_torchvision_model(tmp_path):
    """train_classifier's fine-tuning (new C-logit head, frozen backbone) for a torchvision model by name."""
    from explainer.models import build_classifier, load_classifier, save_model_file

    imagenet = torchvision.models.get_model("shufflenet_v2_x0_5", weights=None)  # stands for the ImageNet file
    torch.save(imagenet.state_dict(), tmp_path / "imagenet.pth")
    model = build_classifier("shufflenet_v2_x0_5", 4, imagenet_weights=str(tmp_path / "imagenet.pth"))
    assert model.head_name == "fc" and model.net.fc.out_features == 4
    assert torch.equal(model.net.conv1[0].weight, imagenet.conv1[0].weight)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["net.fc.weight", "net.fc.bias"]
    path = save_model_file(tmp_path / "c.pt", model, kind="classifier", arch="shufflenet_v2_x0_5", num_classes=4,
                           classes=CLASSES, image_size=S)
    loaded = load_explanandum(ClassifierModelConfig(checkpoint=str(path)), CLASSES, S)
    x = torch.randn(2, 3, S, S)
    assert torch.equal(loaded.model(x), model.eval()(x)) and loaded.kind == "checkpoint"
    assert load_classifier(path)[1]["arch"] == "shufflenet_v2_x0_5"
    with pytest.raises(ValueError, match="no Linear head to replace"):
        build_classifier("squeezenet1_1", 4)


@pytest.mark.numerics
def test_explain_uses_the_normalisation_the_explainer_was_trained_with(tmp_path):
    """`explainer explain` reads mean/std from the Explainer checkpoint: same masks as the model on those inputs."""
    import numpy as np
    from PIL import Image

    from explainer.data.transforms import decode_rgb, normalize_batch
    from explainer.explain import explain
    from explainer.models import save_model_file

    mean, std = [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]  # plain [0, 1] inputs, far from ImageNet's normalisation
    model = build_explainer("tiny_unet", len(CLASSES)).eval()
    ckpt = save_model_file(tmp_path / "e.pt", model, kind="explainer", arch="tiny_unet", num_classes=len(CLASSES),
                           classes=CLASSES, image_size=S, extra={"mean": mean, "std": std})
    src = tmp_path / "in" / "x.png"
    src.parent.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (S, S, 3), dtype=np.uint8)).save(src)
    explain(str(ckpt), [str(src)], str(tmp_path / "out"), progress=False)
    scores = json.loads((tmp_path / "out" / "x" / "scores.json").read_text())["scores"]
    pixels = np.stack([decode_rgb(src.read_bytes(), S)])
    with torch.no_grad():
        ours = torch.sigmoid(model(normalize_batch(pixels, mean=mean, std=std)).full())[0]
        imagenet = torch.sigmoid(model(normalize_batch(pixels)).full())[0]
    for k, name in enumerate(CLASSES):
        assert scores[name] == pytest.approx(float(ours[k].mean()), abs=1e-5)
    assert (ours - imagenet).abs().max() > 1e-2  # the normalisation matters for this model
