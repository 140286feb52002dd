"""The Explanandum from any source: our checkpoint, a torchvision model by name, a user's factory, a TorchScript file.

The method only needs a differentiable function from normalised images to C logits, so the classifier may come from
anywhere. Whatever the source, what comes out of `load_explanandum` is frozen for real (eval for good, no parameter
gradients) and has been checked to give one logit per class of the data, with an error naming the source otherwise.
Nothing is downloaded: torchvision weights come from a file or the local torch hub cache.
"""

from __future__ import annotations

import difflib
import importlib
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from explainer.models.classifier import freeze
from explainer.models.weights import WeightsNotFoundError, load_state_dict_file
from explainer.run_errors import MissingInput, ModelFileError

SOURCES = ("checkpoint", "torchvision", "factory", "torchscript")


@dataclass
class Explanandum:
    """A frozen classifier and where it came from (`source` is what error messages and reports name)."""

    model: nn.Module
    kind: str  # one of SOURCES
    source: str  # e.g. "torchvision resnet18 (weights /data/r18.pt)"
    meta: dict[str, Any]  # our checkpoint's metadata (kind "checkpoint"); {} otherwise


def source_kind(cfg: Any) -> str:
    """Which source a ClassifierModelConfig names (config.check_config allows at most one of the three)."""
    for kind in ("torchscript", "factory", "torchvision"):
        if getattr(cfg, kind, None):
            return kind
    return "checkpoint"


# ----------------------------------------------------------------------------------------------------------------------
# torchvision
# ----------------------------------------------------------------------------------------------------------------------


def torchvision_classifiers() -> list[str]:
    """The classification model names torchvision knows (detection/segmentation/video models are not classifiers)."""
    import torchvision

    return list(torchvision.models.list_models(module=torchvision.models))


def check_torchvision_name(name: str) -> None:
    names = torchvision_classifiers()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ModelFileError(
            f"classifier.torchvision: {name!r} is not a torchvision classification model.{hint} "
            f"Valid names: torchvision.models.list_models(module=torchvision.models) ({len(names)} names, e.g. "
            f"{', '.join(names[:6])}, ...)"
        )


def torchvision_cache_file(name: str, weights: str) -> tuple[Path, Any]:
    """(file in the local torch hub cache, weights enum member) for e.g. ("resnet18", "IMAGENET1K_V1"/"DEFAULT")."""
    import torchvision

    enum = torchvision.models.get_model_weights(name)
    members = [m.name for m in enum] + ["DEFAULT"]
    if weights not in members:
        raise ModelFileError(f"classifier.torchvision_weights: {weights!r} is not a weights name of {name}; "
                             f"choose one of {', '.join(members)}")
    member = enum.DEFAULT if weights == "DEFAULT" else enum[weights]
    return Path(torch.hub.get_dir()) / "checkpoints" / member.url.rsplit("/", 1)[-1], member


def load_torchvision(name: str, *, num_classes: int, checkpoint: str | None,
                     weights: str | None) -> tuple[nn.Module, str]:
    """torchvision model `name` with weights from a state-dict file or the local torchvision cache."""
    import torchvision

    check_torchvision_name(name)
    if checkpoint is None and weights is None:
        raise ModelFileError(
            f"classifier.torchvision={name}: no weights. Set classifier.checkpoint to a state-dict file of the "
            f"trained model, or classifier.torchvision_weights (e.g. IMAGENET1K_V1) to use the local torchvision "
            f"cache; a frozen randomly initialised classifier has nothing to explain"
        )
    if weights is not None:
        path, member = torchvision_cache_file(name, weights)
        if not path.is_file():
            raise WeightsNotFoundError(
                f"torchvision weights {type(member).__name__}.{member.name} for {name} are not in the local cache: "
                f"{path} does not exist. Nothing is downloaded at run time: on a machine with internet run "
                f"`python -c \"import torchvision; torchvision.models.get_model('{name}', weights='{member.name}')\"` "
                f"(or download {member.url}) and copy the file to {path} (the cache folder is torch.hub.get_dir(), "
                f"set by $TORCH_HOME), or point classifier.checkpoint at a copy of it"
            )
        outputs = len(member.meta.get("categories") or []) or num_classes
        net = torchvision.models.get_model(name, weights=None, num_classes=outputs)
        _load_strict(net, load_state_dict_file(path, name, "classifier.torchvision_weights"), path,
                     f"torchvision {name}")
        return net, f"torchvision {name} (weights {member.name} from {path})"
    net = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    _load_strict(net, _state_dict(checkpoint, f"torchvision {name}"), Path(checkpoint),
                 f"torchvision {name} with {num_classes} outputs (the data's classes)")
    return net, f"torchvision {name} (weights {checkpoint})"


def _state_dict(path: str, what: str) -> dict[str, torch.Tensor]:
    """A user's state-dict file (weights_only); a missing file is named with the key that points to it."""
    if not Path(path).expanduser().is_file():
        raise MissingInput(f"classifier.checkpoint: {Path(path).expanduser().resolve()} does not exist "
                           f"(expected the state dict of {what}, saved with torch.save(model.state_dict(), ...))")
    return load_state_dict_file(path, what, "classifier.checkpoint")


def _load_strict(net: nn.Module, state: dict[str, torch.Tensor], path: str | os.PathLike, what: str) -> None:
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in state.items()
             if k in own and v.shape != own[k].shape]
    if missing or unexpected or wrong:
        parts = [f"missing {len(missing)} keys (e.g. {missing[:3]})" if missing else "",
                 f"unexpected {len(unexpected)} keys (e.g. {unexpected[:3]})" if unexpected else "",
                 f"shape mismatch {wrong[:3]}" if wrong else ""]
        raise ModelFileError(f"{path}: state dict does not fit {what}: {'; '.join(p for p in parts if p)}")
    net.load_state_dict(state, strict=True)


# ----------------------------------------------------------------------------------------------------------------------
# factory and TorchScript
# ----------------------------------------------------------------------------------------------------------------------


def resolve_factory(spec: str) -> Any:
    """"pkg.mod:build" -> the callable; errors say which part failed."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ModelFileError(f"classifier.factory must look like 'package.module:callable', got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelFileError(f"classifier.factory {spec!r}: cannot import module {module_name!r} ({exc}); is its "
                             f"folder on PYTHONPATH or the package installed?") from exc
    target: Any = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise ModelFileError(f"classifier.factory {spec!r}: module {module_name!r} has no attribute {attr!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ModelFileError(f"classifier.factory {spec!r}: {attr!r} is not callable")
    return target


def load_factory(spec: str, kwargs: dict[str, Any], checkpoint: str | None) -> tuple[nn.Module, str]:
    build = resolve_factory(spec)
    try:
        net = build(**kwargs)
    except TypeError as exc:
        raise ModelFileError(f"classifier.factory {spec!r} failed with classifier.factory_kwargs={kwargs}: "
                             f"{exc}") from exc
    if not isinstance(net, nn.Module):
        raise ModelFileError(f"classifier.factory {spec!r} returned {type(net).__name__}, expected a torch.nn.Module")
    if checkpoint is not None:
        _load_strict(net, _state_dict(checkpoint, spec), checkpoint,
                     f"the model built by {spec}")
    return net, f"factory {spec}" + (f" (weights {checkpoint})" if checkpoint else " (weights from the factory)")


def load_torchscript(path: str, map_location: Any) -> tuple[nn.Module, str]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise MissingInput(f"classifier.torchscript: {p} does not exist (write one with torch.jit.save)")
    try:
        with warnings.catch_warnings():  # torch.jit is deprecated in favour of torch.export, and still works
            warnings.simplefilter("ignore", FutureWarning)
            net = torch.jit.load(str(p), map_location=map_location)
    except Exception as exc:  # noqa: BLE001 - any failure means "not a TorchScript archive"
        raise ModelFileError(f"classifier.torchscript: {p} is not a TorchScript file ({type(exc).__name__}: {exc})") \
            from exc
    return net, f"TorchScript {p}"


# ----------------------------------------------------------------------------------------------------------------------
# The one entry point
# ----------------------------------------------------------------------------------------------------------------------


def check_outputs(model: nn.Module, source: str, classes: Sequence[str], image_size: int, device: Any,
                  where: str = "the data") -> None:
    """One forward pass on a blank image: the classifier must give [1, C] logits for the data's C classes."""
    param = next(iter(model.parameters()), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    x = torch.zeros(1, 3, image_size, image_size, device=device, dtype=dtype)
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as exc:  # noqa: BLE001 - the model is user code: report what failed and with which input
        raise ModelFileError(f"classifier ({source}) fails on a 1x3x{image_size}x{image_size} image: "
                             f"{type(exc).__name__}: {exc}") from exc
    shown = ", ".join(list(classes)[:6]) + (", ..." if len(classes) > 6 else "")
    if not isinstance(out, torch.Tensor):
        raise ModelFileError(f"classifier ({source}) returns {type(out).__name__}, expected a logits tensor [B, C]")
    if out.dim() != 2 or out.shape[1] != len(classes):
        raise ModelFileError(f"classifier ({source}) outputs shape {tuple(out.shape)} for one image, but {where} has "
                             f"{len(classes)} classes ({shown}): it must give one logit per class, [B, {len(classes)}]")


def load_explanandum(cfg: Any, classes: Sequence[str], image_size: int, map_location: Any = "cpu",
                     checkpoint: str | None = None, where: str = "the data") -> Explanandum:
    """The frozen classifier a ClassifierModelConfig names, on device `map_location`, checked against `classes`.

    `checkpoint` overrides cfg.checkpoint (evaluate's --classifier). `where` names the class list in errors.
    """
    from explainer.models.model_files import load_classifier

    kind = source_kind(cfg)
    ckpt = checkpoint if checkpoint is not None else cfg.checkpoint
    meta: dict[str, Any] = {}
    device = torch.device(map_location) if isinstance(map_location, str | torch.device) else torch.device("cpu")
    # loaded on the CPU, then moved: torch.load cannot map to "cpu:0", which accelerate reports under gloo
    if kind == "checkpoint":
        if ckpt is None:
            raise ModelFileError("classifier.checkpoint is required: the classifier to explain (train_classifier "
                                 "output), or set classifier.torchvision, classifier.factory or classifier.torchscript")
        model, meta = load_classifier(ckpt, map_location="cpu", num_classes=len(classes))
        if list(meta.get("classes", [])) != list(classes):
            raise ModelFileError(f"classifier.checkpoint {ckpt} was trained on classes {meta.get('classes')} but "
                                 f"{where} has {list(classes)}")
        source = f"checkpoint {ckpt} ({meta.get('arch')})"
    elif kind == "torchvision":
        model, source = load_torchvision(cfg.torchvision, num_classes=len(classes), checkpoint=ckpt,
                                         weights=cfg.torchvision_weights)
    elif kind == "factory":
        model, source = load_factory(cfg.factory, dict(cfg.factory_kwargs), ckpt)
    else:
        model, source = load_torchscript(cfg.torchscript, "cpu")
    model = freeze(model.to(device))
    check_outputs(model, source, classes, image_size, device, where)
    return Explanandum(model=model, kind=kind, source=source, meta=meta)
