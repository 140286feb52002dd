"""Baseline attribution methods for the paper's tables (docs/method.md#baselines), all with one calling convention
(common.py).

Grad-CAM uses captum; RISE and Extremal Perturbations use TorchRay, an optional extra (`pip install
'explainer[baselines]'`: CC BY-NC 4.0, unmaintained, pulls in pymongo), imported only when those methods are asked
for; without it they raise MissingExtra naming the extra. RTIS is not here: it is the same Explainer network
trained with the Dabkowski-Gal loss (loss.kind=rtis) and evaluated like the Explainer. iGOS++ is out of scope (no
maintained implementation).
"""

from __future__ import annotations

from torch import nn

from explainer.baselines.common import AttributionMethod, minmax
from explainer.config import EvalConfig
from explainer.run_errors import InputError

BASELINES = ("gradcam", "rise", "ep")


class MissingExtra(ImportError):
    """A method whose library is an optional extra that is not installed."""


def missing_torchray(method: str, cause: ImportError) -> MissingExtra:
    """The error RISE and EP raise when TorchRay cannot be imported."""
    return MissingExtra(f"{method} needs TorchRay, an optional extra that is not installed: pip install -c "
                        "requirements/constraints.txt 'explainer[baselines]' (from a checkout: '.[baselines]'). "
                        f"TorchRay is CC BY-NC 4.0 (non-commercial use only). Import error: {cause}")


def build_baseline(name: str, classifier: nn.Module, cfg: EvalConfig) -> AttributionMethod:
    """The baseline `name` on a frozen classifier, with its settings from EvalConfig."""
    if name == "gradcam":
        from explainer.baselines.gradcam import GradCAM

        return GradCAM(classifier, cfg.gradcam_layer)
    if name == "rise":
        from explainer.baselines.rise import RISE

        return RISE(classifier, num_masks=cfg.rise_masks, cells=cfg.rise_cells, p=cfg.rise_p,
                    batch_size=cfg.rise_batch)
    if name == "ep":
        from explainer.baselines.extremal import ExtremalPerturbation

        return ExtremalPerturbation(classifier, areas=cfg.ep_areas, iterations=cfg.ep_iterations)
    raise InputError(f"unknown baseline {name!r}; choose one of {', '.join(BASELINES)}")


__all__ = ["AttributionMethod", "BASELINES", "MissingExtra", "build_baseline", "minmax", "missing_torchray"]
