"""Data: VOC / COCO / your own folder (labels file or ImageFolder) / synthetic sources -> WebDataset shards -> rank-
and worker-exact streaming batches."""

from importlib import import_module
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from explainer.data.loader import (
        EvalStream,
        Manifest,
        ManifestError,
        SplitInfo,
        TrainStream,
        make_eval_loader,
        make_train_loader,
        manifest_from_urls,
        read_manifest,
    )
    from explainer.data.transforms import IMAGENET_MEAN, IMAGENET_STD, denormalize

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "EvalStream",
    "Manifest",
    "ManifestError",
    "SplitInfo",
    "TrainStream",
    "denormalize",
    "make_eval_loader",
    "make_train_loader",
    "manifest_from_urls",
    "read_manifest",
]

_HOME = {"IMAGENET_MEAN": "transforms", "IMAGENET_STD": "transforms", "denormalize": "transforms"}


def __getattr__(name: str):
    """Loader names are imported on first use: the shard writer (make_shards, its workers) never needs torch."""
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{_HOME.get(name, 'loader')}"), name)
    globals()[name] = value
    return value
