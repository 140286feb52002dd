"""The Explanandum: multi-label classifiers with the reference heads (docs/method.md#explanandum), and `freeze` for
explainer training.

The torchvision network is kept intact with only its head replaced, so ImageNet state dicts load by their own key
names and Grad-CAM layers (VGG `features[-1]`, ResNet `layer4[-1]`) stay where users expect them.
"""

from __future__ import annotations

import types

import torch
from torch import nn
from torchvision import models

from explainer.models.weights import load_into, load_state_dict_file

CLASSIFIER_ARCHS = ("vgg16", "resnet50", "resnet18", "resnet34", "mobilenet_v3_small", "tiny_cnn")


class TinyCNN(nn.Module):
    """A small CNN with the parts that matter for freezing (BatchNorm, dropout head), for CPU tests and the demo.

    Global max pooling makes it a presence detector, which is what a multi-label classifier needs to learn quickly.
    """

    def __init__(self, num_classes: int, width: int = 16) -> None:
        super().__init__()

        def block(c_in: int, c_out: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *block(3, width), nn.MaxPool2d(2),
            *block(width, 2 * width), nn.MaxPool2d(2),
            *block(2 * width, 4 * width),
            nn.AdaptiveMaxPool2d(1),
            nn.Flatten(1),
        )
        self.fc = nn.Sequential(nn.Dropout(0.2), nn.Linear(4 * width, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


class MultiLabelClassifier(nn.Module):
    """A torchvision network with a new C-logit head; the backbone stays frozen (and in eval) unless fine-tuned."""

    def __init__(self, net: nn.Module, arch: str, num_classes: int, head_name: str, finetune_backbone: bool) -> None:
        super().__init__()
        self.net = net
        self.arch = arch
        self.num_classes = num_classes
        self.head_name = head_name
        self.finetune_backbone = finetune_backbone
        if not finetune_backbone:
            for name, param in self.net.named_parameters():
                param.requires_grad_(name.startswith(head_name + "."))
        self.train(self.training)

    @property
    def head(self) -> nn.Module:
        return self.net.get_submodule(self.head_name)

    def gradcam_layer(self) -> nn.Module | None:
        """The layer the reference ran Grad-CAM on (docs/method.md#baselines); None when Grad-CAM should find the last
        spatial layer."""
        if self.arch == "vgg16":
            return self.net.features[-1]
        if hasattr(self.net, "layer4"):  # ResNets, ResNeXts, wide ResNets
            return self.net.layer4[-1]
        return getattr(self.net, "features", None)

    def train(self, mode: bool = True) -> MultiLabelClassifier:
        """A frozen backbone keeps its BatchNorm statistics: only the head follows `mode`."""
        super().train(mode)
        if not self.finetune_backbone:
            self.net.eval()
            self.head.train(mode)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _vgg16_head(num_classes: int) -> nn.Sequential:
    # Reference head: 25088-4096-4096-C, ReLU and dropout 0.5, fresh weights (not ImageNet's classifier).
    return nn.Sequential(
        nn.Linear(25088, 4096),
        nn.ReLU(inplace=True),
        nn.Dropout(0.5),
        nn.Linear(4096, 4096),
        nn.ReLU(inplace=True),
        nn.Dropout(0.5),
        nn.Linear(4096, num_classes),
    )


def build_classifier(
    arch: str, num_classes: int, imagenet_weights: str | None = None, finetune_backbone: bool = False
) -> nn.Module:
    """x [B,3,H,W] -> logits [B,C]. ImageNet weights only from a local file (WeightsNotFoundError if missing).

    `arch`: one of CLASSIFIER_ARCHS (the reference heads) or any torchvision classification model name, whose last
    Linear is replaced by a fresh C-output one."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if arch == "vgg16":
        net, head_name = models.vgg16(weights=None), "classifier"
        drop = ("classifier.",)
    elif arch in ("resnet18", "resnet34", "resnet50"):
        net, head_name = getattr(models, arch)(weights=None), "fc"
        drop = ("fc.",)
    elif arch == "mobilenet_v3_small":
        net, head_name = models.mobilenet_v3_small(weights=None), "classifier.3"
        drop = ("classifier.3.",)
    elif arch == "tiny_cnn":
        net, head_name, drop = TinyCNN(num_classes), "fc", ()
    else:
        net, head_name = _torchvision_net(arch)
        drop = (head_name + ".",)

    if imagenet_weights is not None:
        if arch == "tiny_cnn":
            raise ValueError("classifier.imagenet_weights: tiny_cnn has no ImageNet weights; set it to null")
        state = load_state_dict_file(imagenet_weights, arch, "classifier.imagenet_weights")
        load_into(net, state, path=imagenet_weights, network=arch, drop_prefixes=drop, allowed_missing_prefixes=drop)

    if arch == "vgg16":
        net.classifier = _vgg16_head(num_classes)
    elif arch.startswith("resnet"):
        net.fc = nn.Linear(net.fc.in_features, num_classes)
    elif arch == "mobilenet_v3_small":
        net.classifier[3] = nn.Linear(net.classifier[3].in_features, num_classes)
    elif arch != "tiny_cnn":
        net.set_submodule(head_name, nn.Linear(net.get_submodule(head_name).in_features, num_classes))
    return MultiLabelClassifier(net, arch, num_classes, head_name, finetune_backbone)


def _torchvision_net(arch: str) -> tuple[nn.Module, str]:
    """Any other torchvision classification model, random init, and the name of its last Linear (the head that is
    replaced, as for the reference architectures)."""
    names = models.list_models(module=models)
    if arch not in names:
        raise ValueError(f"unknown classifier arch {arch!r}; choose one of {', '.join(CLASSIFIER_ARCHS)} or any "
                         f"torchvision classification model (torchvision.models.list_models(module="
                         f"torchvision.models), e.g. {', '.join(names[:4])}, ...)")
    net = models.get_model(arch, weights=None)
    linears = [name for name, module in net.named_modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise ValueError(f"classifier arch {arch!r}: no Linear head to replace")
    return net, linears[-1]


def _frozen_train(self: nn.Module, mode: bool = True) -> nn.Module:
    """train() of a frozen model: stays in eval (the reference trained its "frozen" classifier in train mode)."""
    return self


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode for good (train() becomes a no-op on every submodule) and no parameter gradients."""
    model.eval()
    for module in model.modules():
        module.train = types.MethodType(_frozen_train, module)
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def is_frozen(model: nn.Module) -> bool:
    """True when `freeze` was applied (also through torch.compile's wrapper)."""
    model = getattr(model, "_orig_mod", model)
    train = model.__dict__.get("train")
    return isinstance(train, types.MethodType) and train.__func__ is _frozen_train
