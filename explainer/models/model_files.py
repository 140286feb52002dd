"""Model checkpoints of ours: a plain dict that torch.load(weights_only=True) accepts, written atomically.

{"kind", "arch", "num_classes", "classes", "image_size", "state_dict", "extra"} - no pickled classes, so a file can be
inspected and loaded without trusting code, and a config object cannot sneak in (see docs/dependencies.md#submitit).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from explainer.atomic import write_atomic
from explainer.models.classifier import build_classifier, freeze
from explainer.models.explainer import build_explainer
from explainer.run_errors import MissingInput, ModelFileError, untrusted_load_reason

KINDS = ("classifier", "explainer")


_REQUIRED = ("kind", "arch", "num_classes", "classes", "image_size", "state_dict", "extra")


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module behind torch.compile / DDP / accelerate wrappers (their state-dict keys carry prefixes)."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        else:
            return model


def _check_plain(value: Any, where: str) -> None:
    """`extra` must survive weights_only loading: plain containers, numbers, strings, tensors."""
    if value is None or isinstance(value, bool | int | float | str | torch.Tensor):
        return
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str | int):
                raise TypeError(f"{where}: key {key!r} must be a str or int")
            _check_plain(item, f"{where}.{key}")
        return
    raise TypeError(
        f"{where}: {type(value).__name__} cannot be stored in a weights_only checkpoint; convert it to plain "
        "dicts/lists/numbers/strings first"
    )


def save_model_file(
    path: str | os.PathLike,
    model: nn.Module,
    *,
    kind: Literal["classifier", "explainer"],
    arch: str,
    num_classes: int,
    classes: list[str],
    image_size: int,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write the model's weights and metadata to `path` via a temp file and rename (never a half-written file)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if len(classes) != num_classes:
        raise ValueError(f"{len(classes)} class names given for num_classes={num_classes}")
    extra = dict(extra or {})
    _check_plain(extra, "extra")
    state = {k: v.detach().to("cpu", copy=True) for k, v in unwrap(model).state_dict().items()}
    payload = {
        "kind": kind,
        "arch": arch,
        "num_classes": int(num_classes),
        "classes": [str(c) for c in classes],
        "image_size": int(image_size),
        "state_dict": state,
        "extra": extra,
    }
    try:
        return write_atomic(path, lambda handle: torch.save(payload, handle))
    except Exception as exc:  # noqa: BLE001 - torch reports a full disk as "unexpected pos ..." without a file name
        from explainer.run_checkpoints import CheckpointError
        from explainer.run_errors import write_failure

        raise CheckpointError(f"cannot write {kind} checkpoint {path}: {write_failure(exc, Path(path).parent)}; "
                              "a previous version of it, if any, is untouched") from exc




def model_file(path: str | os.PathLike, kind: str) -> Path:
    """`path` itself, or `<path>/<kind>.pt` when `path` is a run folder (`--checkpoint runs/x` means its best model)."""
    path = Path(path)
    if path.is_dir():
        inside = path / f"{kind}.pt"
        if not inside.is_file():
            raise MissingInput(f"{kind} checkpoint {path} is a folder without {inside.name} (a run folder has "
                                    f"one once its first validation improved)")
        return inside
    return path


def read_checkpoint(path: str | os.PathLike, kind: str, map_location: Any = "cpu") -> dict[str, Any]:
    """Load and validate one of our checkpoint files (or a run folder's); the error names the file and what is wrong."""
    path = model_file(path, kind)
    if not path.is_file():
        raise MissingInput(f"{kind} checkpoint {path} does not exist")
    try:
        with warnings.catch_warnings():  # torch's note on the pickle protocol of a file that is not ours
            warnings.simplefilter("ignore", UserWarning)
            payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means "not one of ours"
        raise ModelFileError(
            f"{path}: not a checkpoint written by explainer's save_model_file ({untrusted_load_reason(exc)})"
        ) from exc
    if not isinstance(payload, dict) or not all(key in payload for key in _REQUIRED):
        found = sorted(payload)[:8] if isinstance(payload, dict) else type(payload).__name__
        raise ModelFileError(
            f"{path}: not a checkpoint written by explainer's save_model_file (expected keys {list(_REQUIRED)}, "
            f"found {found})"
        )
    if payload["kind"] != kind:
        raise ModelFileError(f"{path}: is a {payload['kind']!r} checkpoint, but a {kind!r} checkpoint was expected")
    return payload


def _check_expected(path: Path, payload: dict[str, Any], arch: str | None, num_classes: int | None) -> None:
    if arch is not None and payload["arch"] != arch:
        raise ModelFileError(f"{path}: checkpoint arch is {payload['arch']!r} but the config asks for {arch!r}")
    if num_classes is not None and payload["num_classes"] != num_classes:
        raise ModelFileError(
            f"{path}: checkpoint has {payload['num_classes']} classes but the data/config has {num_classes}"
        )


def _load_weights(path: Path, model: nn.Module, payload: dict[str, Any]) -> None:
    try:
        model.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as exc:
        raise ModelFileError(
            f"{path}: weights do not fit arch={payload['arch']!r} with num_classes={payload['num_classes']}: {exc}"
        ) from exc


def _place(model: nn.Module, map_location: Any) -> nn.Module:
    """Move the model where its tensors were mapped (torch.load already put the weights there)."""
    return model.to(map_location) if isinstance(map_location, str | torch.device) else model


def _load_model(path: str | os.PathLike, kind: str, builder: Any, map_location: Any, arch: str | None,
                num_classes: int | None) -> tuple[nn.Module, dict[str, Any]]:
    path = model_file(path, kind)
    payload = read_checkpoint(path, kind, map_location)
    _check_expected(path, payload, arch, num_classes)
    try:
        model = builder(payload["arch"], payload["num_classes"])
    except ValueError as exc:
        raise ModelFileError(f"{path}: {exc}") from exc
    _load_weights(path, model, payload)
    meta = {k: v for k, v in payload.items() if k != "state_dict"}
    return _place(model, map_location), meta


def load_classifier(
    path: str | os.PathLike, map_location: Any = "cpu", *, arch: str | None = None, num_classes: int | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """A frozen classifier (eval for good, no gradients) and its metadata; arch/num_classes are checked if given."""
    model, meta = _load_model(path, "classifier", build_classifier, map_location, arch, num_classes)
    return freeze(model), meta


def load_explainer(
    path: str | os.PathLike, map_location: Any = "cpu", *, arch: str | None = None, num_classes: int | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """An explainer in eval mode and its metadata; arch/num_classes are checked if given."""
    model, meta = _load_model(path, "explainer", build_explainer, map_location, arch, num_classes)
    return model.eval(), meta
