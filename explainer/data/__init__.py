"""Data: VOC / COCO / synthetic sources -> WebDataset shards -> rank- and worker-exact streaming batches."""

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
