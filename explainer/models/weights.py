"""Local ImageNet weight files: nothing is downloaded at run time.

Compute nodes usually have no internet, so pretrained weights are opt-in through a path to a torchvision state-dict
file. A missing or wrong file must say what to fetch, from where, and where to put it - not end in a stack trace.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from explainer.run_errors import MissingInput, ModelFileError, untrusted_load_reason


class WeightsNotFoundError(MissingInput):
    """A configured weights file does not exist; the message says where to get it and where to put it."""


@dataclass(frozen=True)
class WeightsSource:
    """Which torchvision ImageNet weights fit an architecture, and where the user can download them."""

    torchvision_name: str  # e.g. "ResNet50_Weights.IMAGENET1K_V1"
    url: str

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


# The versions the reference code used (`pretrained=True` meant IMAGENET1K_V1). URLs are constants in torchvision's
# weight enums; they are written out here so the error message needs no network and no enum lookups.
IMAGENET_SOURCES: dict[str, WeightsSource] = {
    "vgg16": WeightsSource("VGG16_Weights.IMAGENET1K_V1", "https://download.pytorch.org/models/vgg16-397923af.pth"),
    "resnet18": WeightsSource(
        "ResNet18_Weights.IMAGENET1K_V1", "https://download.pytorch.org/models/resnet18-f37072fd.pth"
    ),
    "resnet34": WeightsSource(
        "ResNet34_Weights.IMAGENET1K_V1", "https://download.pytorch.org/models/resnet34-b627a593.pth"
    ),
    "resnet50": WeightsSource(
        "ResNet50_Weights.IMAGENET1K_V1", "https://download.pytorch.org/models/resnet50-0676ba61.pth"
    ),
    "resnet101": WeightsSource(
        "ResNet101_Weights.IMAGENET1K_V1", "https://download.pytorch.org/models/resnet101-63fe2227.pth"
    ),
    "mobilenet_v3_small": WeightsSource(
        "MobileNet_V3_Small_Weights.IMAGENET1K_V1",
        "https://download.pytorch.org/models/mobilenet_v3_small-047dcff4.pth",
    ),
    "mobilenet_v3_large": WeightsSource(
        "MobileNet_V3_Large_Weights.IMAGENET1K_V1",
        "https://download.pytorch.org/models/mobilenet_v3_large-8738ca79.pth",
    ),
}


def missing_weights_message(path: str | os.PathLike, network: str, config_key: str) -> str:
    """The text of WeightsNotFoundError: which file, where to put it, where to get it."""
    path = Path(path).expanduser()
    source = IMAGENET_SOURCES.get(network)
    lines = [f"ImageNet weights file for {network} not found: {path.resolve()} does not exist."]
    if source is not None:
        lines.append(
            f"Download torchvision's {source.torchvision_name} on a machine with internet "
            f"({source.url}), e.g. `python -c \"import torchvision; torchvision.models.{source.torchvision_name}"
            f".get_state_dict(progress=True)\"` (it lands in ~/.cache/torch/hub/checkpoints/{source.filename}),"
        )
        lines.append(
            f"copy it to {path.resolve()} (suggested place: weights/{source.filename} in the repository) "
            f"and set {config_key} to that path."
        )
    lines.append(f"Or set {config_key} to null to start from random weights.")
    return " ".join(lines)


def load_state_dict_file(path: str | os.PathLike, network: str, config_key: str) -> dict[str, torch.Tensor]:
    """Read a torchvision-style state dict (weights_only=True); clear errors for a missing or foreign file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsNotFoundError(missing_weights_message(path, network, config_key))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means "not a plain state dict"
        raise ModelFileError(f"{path}: not a loadable weights file for {network} "
                             f"({untrusted_load_reason(exc)})") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelFileError(f"{path}: expected a state dict (name -> tensor) of torchvision {network} weights")
    return state


def load_into(
    module: nn.Module,
    state: dict[str, torch.Tensor],
    *,
    path: str | os.PathLike,
    network: str,
    strip_prefix: str = "",
    drop_prefixes: Iterable[str] = (),
    allowed_missing_prefixes: Iterable[str] = (),
) -> None:
    """Load `state` into `module` after renaming; every module key must be filled except the allowed new ones."""
    drop = tuple(drop_prefixes)
    renamed = {}
    for key, value in state.items():
        if drop and key.startswith(drop):
            continue
        if strip_prefix:
            if not key.startswith(strip_prefix):
                continue
            key = key[len(strip_prefix):]
        renamed[key] = value
    own = module.state_dict()
    allowed = tuple(allowed_missing_prefixes)
    missing = [k for k in own if k not in renamed and not (allowed and k.startswith(allowed))]
    unexpected = [k for k in renamed if k not in own]
    wrong_shape = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in renamed.items()
        if k in own and v.shape != own[k].shape
    ]
    if missing or unexpected or wrong_shape:
        detail = "; ".join(
            part
            for part in (
                f"missing {len(missing)} keys (e.g. {missing[:3]})" if missing else "",
                f"unexpected {len(unexpected)} keys (e.g. {unexpected[:3]})" if unexpected else "",
                f"shape mismatch {wrong_shape[:3]}" if wrong_shape else "",
            )
            if part
        )
        raise ModelFileError(f"{path}: does not hold torchvision ImageNet weights for {network}: {detail}")
    module.load_state_dict(renamed, strict=False)
