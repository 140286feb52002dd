"""Models of the method: the Explainer, the Explanandum (classifier, ours or from any source), weights files and
checkpoints."""

from explainer.models.classifier import (
    CLASSIFIER_ARCHS,
    MultiLabelClassifier,
    build_classifier,
    freeze,
    is_frozen,
)
from explainer.models.explainer import EXPLAINER_ARCHS, build_explainer
from explainer.models.explanandum import Explanandum, load_explanandum
from explainer.models.model_files import (
    load_classifier,
    load_explainer,
    read_checkpoint,
    save_model_file,
    unwrap,
)
from explainer.models.weights import IMAGENET_SOURCES, WeightsNotFoundError

__all__ = [
    "CLASSIFIER_ARCHS",
    "EXPLAINER_ARCHS",
    "Explanandum",
    "IMAGENET_SOURCES",
    "MultiLabelClassifier",
    "WeightsNotFoundError",
    "build_classifier",
    "build_explainer",
    "freeze",
    "is_frozen",
    "load_classifier",
    "load_explainer",
    "load_explanandum",
    "read_checkpoint",
    "save_model_file",
    "unwrap",
]
