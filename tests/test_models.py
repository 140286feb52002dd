"""Explainer / classifier builders, local ImageNet weights, freezing and our checkpoint files."""

import copy

import pytest
import torch
import torchvision
from torch import nn

from explainer.config import LossConfig
from explainer.models import (
    CLASSIFIER_ARCHS,
    IMAGENET_SOURCES,
    WeightsNotFoundError,
    build_classifier,
    build_explainer,
    freeze,
    is_frozen,
    load_classifier,
    load_explainer,
    save_model_file,
)
from explainer.step import explainer_forward_loss


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_paper_explainer_is_deeplabv3_resnet50_from_scratch_at_head_resolution():
    model = build_explainer("deeplabv3_resnet50", 5)
    net = model.net
    assert isinstance(net, torchvision.models.segmentation.DeepLabV3)
    assert net.aux_classifier is None
    assert net.classifier[-1].out_channels == 5
    model.eval()
    x = torch.randn(1, 3, 40, 48)
    with torch.no_grad():
        out = model(x)
        torchvision_out = net(x)["out"]  # what the model returned before: every class upsampled to the input
    assert out.logits.shape == (1, 5, 5, 6) and out.size == (40, 48)  # the head's output stride 8, and the input size
    assert out.full().shape == (1, 5, 40, 48)
    torch.testing.assert_close(out.full(), torchvision_out, rtol=0, atol=1e-6)  # the same bilinear call
    torch.testing.assert_close(out.full(torch.tensor([3, 1])), torchvision_out[:, [3, 1]], rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch", ["lraspp_mobilenet_v3_large", "tiny_unet"])
def test_light_explainers_shapes(arch):
    model = build_explainer(arch, 3).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 33, 47))
    assert out.size == (33, 47) and out.full().shape == (2, 3, 33, 47)
    assert out.logits.shape == ((2, 3, 5, 6) if arch.startswith("lraspp") else (2, 3, 33, 47))  # tiny U-Net: full res


def test_unknown_archs_name_the_choices():
    with pytest.raises(ValueError, match="tiny_unet"):
        build_explainer("unet_giant", 3)
    with pytest.raises(ValueError, match="resnet50"):
        build_classifier("vit", 3)


def test_vgg16_head_is_the_reference_head():
    with torch.device("meta"):  # structure only: skips initialising 138M weights
        model = build_classifier("vgg16", 7)
    head = model.head
    linears = [m for m in head if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(25088, 4096), (4096, 4096), (4096, 7)]
    assert [m.p for m in head if isinstance(m, nn.Dropout)] == [0.5, 0.5]
    assert sum(isinstance(m, nn.ReLU) for m in head) == 2
    assert model.gradcam_layer() is model.net.features[-1]
    # backbone frozen by default: only the head trains
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("net.classifier.") for n in trainable)


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3_small", "tiny_cnn"])
def test_classifier_shapes_and_head(arch):
    model = build_classifier(arch, 4).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 4)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable == list(model.head.parameters())


def test_resnet50_head():
    with torch.device("meta"):
        model = build_classifier("resnet50", 6)
    assert (model.head.in_features, model.head.out_features) == (2048, 6)
    assert model.gradcam_layer() is model.net.layer4[-1]


@pytest.mark.numerics
def test_frozen_backbone_keeps_batchnorm_statistics_during_head_training():
    model = build_classifier("resnet18", 3, finetune_backbone=False)
    model.train()
    assert model.head.training and not model.net.layer1.training and not model.net.bn1.training
    before = copy.deepcopy(model.net.bn1.state_dict())
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    after = model.net.bn1.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    tuned = build_classifier("resnet18", 3, finetune_backbone=True).train()
    assert tuned.net.bn1.training and all(p.requires_grad for p in tuned.parameters())


@pytest.mark.numerics
def test_freeze_really_freezes_through_explainer_training():
    classifier = build_classifier("tiny_cnn", 3, finetune_backbone=True)
    classifier.train()
    classifier(torch.randn(8, 3, 32, 32))  # move the BN running statistics away from their init
    freeze(classifier)
    explainer = build_explainer("tiny_unet", 3)
    reference_state = copy.deepcopy(classifier.state_dict())
    reference_out = classifier(torch.ones(2, 3, 32, 32))
    optimizer = torch.optim.Adam(explainer.parameters(), lr=1e-2)
    explainer_before = copy.deepcopy(explainer.state_dict())
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([[1.0, 0, 0], [0, 1, 1], [0, 0, 0], [1, 1, 1]])
    for _ in range(3):
        classifier.train()  # what a careless trainer (or the reference) would do
        explainer.train()
        out = explainer_forward_loss(explainer, classifier, images, labels, LossConfig())
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    assert is_frozen(classifier)
    assert not any(m.training for m in classifier.modules())  # BN and dropout stayed in eval
    assert all(p.grad is None and not p.requires_grad for p in classifier.parameters())
    state = classifier.state_dict()
    assert state.keys() == reference_state.keys()
    assert all(torch.equal(state[k], reference_state[k]) for k in state)  # weights AND BN buffers, bit-identical
    assert torch.equal(classifier(torch.ones(2, 3, 32, 32)), reference_out)  # dropout off: deterministic
    assert any(not torch.equal(v, explainer_before[k]) for k, v in explainer.state_dict().items())


def test_freeze_survives_deepcopy():
    frozen = freeze(build_classifier("tiny_cnn", 2))
    clone = copy.deepcopy(frozen)
    clone.train()
    assert is_frozen(clone) and not clone.training and not clone.net.fc.training


def test_imagenet_source_table_matches_torchvision():
    for source in IMAGENET_SOURCES.values():
        enum_name, member = source.torchvision_name.split(".")
        assert getattr(torchvision.models, enum_name)[member].url == source.url


def test_missing_weights_file_says_which_file_where_and_what(tmp_path):
    missing = tmp_path / "weights" / "r50.pth"
    with pytest.raises(WeightsNotFoundError) as info:
        build_classifier("resnet50", 20, imagenet_weights=str(missing))
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert str(missing) in message
    assert "ResNet50_Weights.IMAGENET1K_V1" in message
    assert "https://download.pytorch.org/models/resnet50-0676ba61.pth" in message
    assert "classifier.imagenet_weights" in message
    with pytest.raises(WeightsNotFoundError, match="explainer.backbone_weights") as info:
        build_explainer("deeplabv3_mobilenet_v3_large", 20, backbone_weights=str(tmp_path / "mnv3.pth"))
    assert "MobileNet_V3_Large_Weights.IMAGENET1K_V1" in str(info.value)


def test_local_imagenet_weights_load_into_backbone_not_head(tmp_path):
    source = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18-f37072fd.pth"
    torch.save(source.state_dict(), path)
    model = build_classifier("resnet18", 3, imagenet_weights=str(path))
    assert torch.equal(model.net.conv1.weight, source.conv1.weight)
    assert torch.equal(model.net.layer4[1].bn2.running_var, source.layer4[1].bn2.running_var)
    assert model.net.fc.out_features == 3
    with pytest.raises(ValueError, match="resnet18-f37072fd.pth"):  # wrong network: the error names the file
        build_classifier("resnet34", 3, imagenet_weights=str(path))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"definitely not a state dict")
    with pytest.raises(ValueError, match="garbage.pth"):
        build_classifier("resnet18", 3, imagenet_weights=str(garbage))


def test_local_backbone_weights_for_mobilenet_explainer(tmp_path):
    source = torchvision.models.mobilenet_v3_large(weights=None)
    path = tmp_path / "mobilenet_v3_large.pth"
    torch.save(source.state_dict(), path)
    model = build_explainer("lraspp_mobilenet_v3_large", 4, backbone_weights=str(path))
    assert torch.equal(model.net.backbone["0"][0].weight, source.features[0][0].weight)
    assert torch.equal(model.net.backbone["16"][1].running_mean, source.features[16][1].running_mean)


@pytest.mark.numerics
def test_checkpoint_round_trip_weights_only(tmp_path):
    classes = ["circle", "square", "triangle"]
    classifier = build_classifier("tiny_cnn", 3).eval()
    explainer = build_explainer("tiny_unet", 3).eval()
    c_path = save_model_file(
        tmp_path / "classifier.pt", classifier, kind="classifier", arch="tiny_cnn", num_classes=3,
        classes=classes, image_size=32, extra={"epoch": 4, "metrics": {"f1": 0.5}, "lr": [1e-4]},
    )
    e_path = save_model_file(
        tmp_path / "explainer.pt", explainer, kind="explainer", arch="tiny_unet", num_classes=3,
        classes=classes, image_size=32,
    )
    raw = torch.load(c_path, weights_only=True)  # a plain dict: no pickled classes
    assert set(raw) == {"kind", "arch", "num_classes", "classes", "image_size", "state_dict", "extra"}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files left behind
    loaded_c, meta_c = load_classifier(c_path, arch="tiny_cnn", num_classes=3)
    loaded_e, meta_e = load_explainer(e_path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded_c(x), classifier(x))
        assert torch.equal(loaded_e(x).logits, explainer(x).logits)
    assert is_frozen(loaded_c) and not loaded_e.training
    assert meta_c["classes"] == classes and meta_c["image_size"] == 32 and meta_c["extra"]["metrics"]["f1"] == 0.5
    assert meta_e["kind"] == "explainer" and "state_dict" not in meta_e


def test_bad_checkpoints_raise_clear_errors(tmp_path):
    model = build_classifier("tiny_cnn", 3)
    path = save_model_file(
        tmp_path / "c.pt", model, kind="classifier", arch="tiny_cnn", num_classes=3, classes=list("abc"), image_size=32
    )
    with pytest.raises(ValueError, match=r"c\.pt.*'classifier' checkpoint, but a 'explainer'"):
        load_explainer(path)
    with pytest.raises(ValueError, match=r"c\.pt.*arch is 'tiny_cnn' but the config asks for 'resnet18'"):
        load_classifier(path, arch="resnet18")
    with pytest.raises(ValueError, match=r"c\.pt.*3 classes but the data/config has 5"):
        load_classifier(path, num_classes=5)
    tampered = torch.load(path, weights_only=True)
    tampered["num_classes"] = 4
    torch.save(tampered, tmp_path / "tampered.pt")
    with pytest.raises(ValueError, match=r"tampered\.pt: weights do not fit arch='tiny_cnn' with num_classes=4"):
        load_classifier(tmp_path / "tampered.pt")
    torch.save(model.state_dict(), tmp_path / "bare_state_dict.pt")
    with pytest.raises(ValueError, match=r"bare_state_dict\.pt: not a checkpoint written by"):
        load_classifier(tmp_path / "bare_state_dict.pt")
    (tmp_path / "junk.pt").write_bytes(b"\x00junk")
    with pytest.raises(ValueError, match=r"junk\.pt: not a checkpoint written by"):
        load_classifier(tmp_path / "junk.pt")
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        load_classifier(tmp_path / "nowhere.pt")
    with pytest.raises(TypeError, match=r"extra\.args"):
        save_model_file(
            tmp_path / "x.pt", model, kind="classifier", arch="tiny_cnn", num_classes=3, classes=list("abc"),
            image_size=32, extra={"args": object()},
        )
    assert not (tmp_path / "x.pt").exists()


def test_every_arch_is_selectable_in_the_config():
    from typing import get_args, get_type_hints

    from explainer.config import ClassifierModelConfig, ExplainerModelConfig
    from explainer.models import EXPLAINER_ARCHS

    assert set(get_args(get_type_hints(ClassifierModelConfig)["arch"])) == set(CLASSIFIER_ARCHS)
    assert set(get_args(get_type_hints(ExplainerModelConfig)["arch"])) == set(EXPLAINER_ARCHS)


def _two_object_scenes(n: int = 8, size: int = 16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images with a red and a green 5x5 square each; object masks [n, 2, size, size]."""
    g = torch.Generator().manual_seed(0)
    x, objects = torch.zeros(n, 3, size, size), torch.zeros(n, 2, size, size, dtype=torch.bool)
    for i in range(n):
        for k in range(2):
            r, c = (int(v) for v in torch.randint(0, size - 5, (2,), generator=g))
            x[i, k, r : r + 5, c : c + 5] = 1.0
            objects[i, k, r : r + 5, c : c + 5] = True
    return x, torch.ones(n, 2), objects


@pytest.mark.numerics
@pytest.mark.parametrize("arch", ["tiny_unet", "lraspp_mobilenet_v3_large"])
def test_zero_head_starts_every_class_channel_equal_and_fed(arch):
    """Guard against the dying class channel (docs/results.md#class-specific-term, `make demo`): the loss's max over an
    image's classes sends the classification gradient on a pixel to the highest target channel only. With a random head
    a channel that starts lower on a pixel of its own object gets nothing there, and on images with several classes it
    can starve for good. head_init="zero" (the synthetic preset) starts every mask at 0.5, so every channel gets
    gradient on every pixel of its objects; the old random head leaves a large share of them without any."""
    from _helpers import colour_classifier

    from explainer.config import ExplainerRunConfig, load_config
    from explainer.losses import aggregate_masks, classification_loss, negative_entropy

    preset = load_config(ExplainerRunConfig, "configs/synthetic.yaml").explainer.head_init  # what `make demo` uses
    x, labels, objects = _two_object_scenes(size=32)
    clf = colour_classifier(gain=40)
    fed = {}
    for init in (preset, "random"):
        torch.manual_seed(0)
        net = build_explainer(arch, 2, head_init=init)
        logits = net(x).full()
        m, _ = aggregate_masks(torch.sigmoid(logits), labels)
        both = clf(torch.cat([x * m, x * (1 - m)]))
        classifier_terms = classification_loss(both[:8], labels).mean() + negative_entropy(both[8:]).mean()
        grad = torch.autograd.grad(classifier_terms, logits)[0]
        fed[init] = [float((grad[:, k][objects[:, k]] != 0).float().mean()) for k in range(2)]
        if init == "zero":
            assert torch.equal(torch.sigmoid(logits), torch.full_like(logits, 0.5))
    assert fed[preset] == [1.0, 1.0], fed  # ties: autograd splits the max's gradient evenly
    assert min(fed["random"]) < 0.9, fed  # the old head: part of some channel's own object gets no gradient
    with pytest.raises(ValueError, match="head_init"):
        build_explainer("tiny_unet", 2, head_init="ones")
