"""The two recipes the training loop runs: what the Explainer and the Explanandum (classifier) trainers each do in
a step, a validation and an export. (Named recipes, not tasks, so as not to read as SLURM tasks.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator

from explainer.config import ClassifierRunConfig, ExplainerRunConfig
from explainer.data.loader import Manifest
from explainer.losses import full_precision
from explainer.metrics import CLEAN_THRESHOLD, classification_counts, precision_recall_f1
from explainer.models import build_classifier, build_explainer, freeze, save_model_file
from explainer.models.explanandum import load_explanandum, source_kind
from explainer.objectives import Objective, build_objective
from explainer.precision import Precision
from explainer.run_errors import InputError
from explainer.step import explainer_forward_loss
from explainer.training_loop import HOST_LABELS, StepResult


class ExplainerRecipe:
    """Trains the Explainer against a frozen classifier (docs/method.md#objective)."""

    kind = "explainer"

    def __init__(self, cfg: ExplainerRunConfig):
        if source_kind(cfg.classifier) == "checkpoint" and not cfg.classifier.checkpoint:
            raise InputError("classifier.checkpoint is required: the classifier to explain (train_classifier output), "
                             "or set classifier.torchvision, classifier.factory or classifier.torchscript")
        self.cfg = cfg
        self.drop_unlabelled = cfg.data.drop_unlabelled
        self.classifier: torch.nn.Module | None = None
        # the objective loss.kind names (explainer/objectives.py): a subclass may set another before training
        self.objective: Objective = build_objective(cfg.loss)

    def setup(self, accelerator: Accelerator, manifest: Manifest) -> None:
        explanandum = load_explanandum(self.cfg.classifier, manifest.classes, self.cfg.data.image_size,
                                       map_location=accelerator.device, where=str(manifest.path))
        classifier = freeze(explanandum.model.to(dtype=getattr(torch, self.cfg.train.dtype)))
        if self.cfg.train.channels_last:
            classifier = classifier.to(memory_format=torch.channels_last)
        self.classifier = classifier

    def build_model(self, manifest: Manifest) -> torch.nn.Module:
        e = self.cfg.explainer
        return build_explainer(e.arch, len(manifest.classes), e.backbone_weights, e.head_init)

    def train_step(self, model: torch.nn.Module, batch: dict[str, Any], precision: Precision) -> StepResult:
        out = explainer_forward_loss(model, self.classifier, batch["image"], batch["labels"], self.cfg.loss,
                                     precision.autocast(), batch.get("draw"), objective=self.objective,
                                     host_labels=batch.get(HOST_LABELS))
        # only the images the trainer may log: all C masks of the batch would stay alive through backward
        return StepResult(loss=out.loss, terms=out.terms, masks=out.first_masks(self.cfg.train.image_log_count))

    def val_keys(self, manifest: Manifest) -> tuple[str, ...]:
        return ("count", "loss", *self.objective.terms, "iou_sum", "iou_count")

    def val_sums(self, model: torch.nn.Module, batch: dict[str, Any], precision: Precision) -> dict[str, float]:
        """Every key of val_keys, always (iou_* are 0 for a batch without segmentation), so ranks stay aligned."""
        out = explainer_forward_loss(model, self.classifier, batch["image"], batch["labels"], self.cfg.loss,
                                     precision.autocast(), batch.get("draw"), objective=self.objective,
                                     host_labels=batch.get(HOST_LABELS))
        n = batch["image"].shape[0]
        sums = {"count": float(n), "loss": float(out.loss) * n}
        sums.update({k: float(v) * n for k, v in out.terms.items() if k != "loss"})
        sums.update({"iou_sum": 0.0, "iou_count": 0.0})
        if "seg" in batch and "has_seg" in batch:
            sums.update(_soft_iou_sums(out.m, batch["seg"], batch["has_seg"]))
        return sums

    def val_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        count = sums["count"]
        metrics = {k: v / count for k, v in sums.items() if k not in ("count", "iou_sum", "iou_count")}
        if sums.get("iou_count"):
            metrics["mask_iou"] = sums["iou_sum"] / sums["iou_count"]
        return metrics

    def export(self, model: torch.nn.Module, manifest: Manifest, path: Path) -> None:
        save_model_file(path, model, kind="explainer", arch=self.cfg.explainer.arch,
                        num_classes=len(manifest.classes), classes=manifest.classes,
                        image_size=self.cfg.data.image_size,
                        extra={"loss": self.cfg.loss.kind, "mean": list(self.cfg.classifier.mean),
                               "std": list(self.cfg.classifier.std), "resize": self.cfg.data.resize,
                               "classification": self.cfg.loss.classification})


def _soft_iou_sums(m: torch.Tensor, seg: torch.Tensor, has_seg: torch.Tensor) -> dict[str, float]:
    """Soft IoU of the target mask with the object mask, void excluded: a cheap 'is it learning' signal for runs."""
    m = m.float().squeeze(1)
    valid = (seg != 255).float()
    g = (seg == 1).float()
    inter = (torch.minimum(m, g) * valid).flatten(1).sum(1)
    union = (torch.maximum(m, g) * valid).flatten(1).sum(1).clamp_min(1e-8)
    has_seg = has_seg.to(device=m.device, dtype=torch.bool)
    iou = torch.where(has_seg, inter / union, 0.0)
    return {"iou_sum": float(iou.sum()), "iou_count": float(has_seg.sum())}


class ClassifierRecipe:
    """Fine-tunes the Explanandum's multi-label head (docs/method.md#explanandum)."""

    kind = "classifier"
    drop_unlabelled = False  # images with no class are legitimate negatives for a classifier

    def __init__(self, cfg: ClassifierRunConfig):
        self.cfg = cfg

    def setup(self, accelerator: Accelerator, manifest: Manifest) -> None:
        return None

    def build_model(self, manifest: Manifest) -> torch.nn.Module:
        c = self.cfg.classifier
        return build_classifier(c.torchvision or c.arch, len(manifest.classes), c.imagenet_weights,
                                c.finetune_backbone)

    def train_step(self, model: torch.nn.Module, batch: dict[str, Any], precision: Precision) -> StepResult:
        with precision.autocast():
            logits = full_precision(model(batch["image"]))
        loss = F.binary_cross_entropy_with_logits(logits, batch["labels"].to(logits.dtype))
        return StepResult(loss=loss, terms={})

    def val_keys(self, manifest: Manifest) -> tuple[str, ...]:
        classes = range(len(manifest.classes))
        return ("count", "loss", *(f"{kind}/{c}" for kind in ("tp", "fp", "fn") for c in classes))

    def val_sums(self, model: torch.nn.Module, batch: dict[str, Any], precision: Precision) -> dict[str, float]:
        with precision.autocast():
            logits = full_precision(model(batch["image"]))
        labels = batch["labels"].to(logits.dtype)
        n = labels.shape[0]
        counts = classification_counts(logits, labels, CLEAN_THRESHOLD)  # [3 (tp, fp, fn), C]
        sums = {"count": float(n), "loss": float(F.binary_cross_entropy_with_logits(logits, labels)) * n}
        sums.update({f"{kind}/{c}": float(v) for kind, row in zip(("tp", "fp", "fn"), counts)
                     for c, v in enumerate(row.tolist())})
        return sums

    def val_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        num_classes = sum(1 for k in sums if k.startswith("tp/"))
        counts = torch.tensor([[sums[f"{kind}/{c}"] for c in range(num_classes)] for kind in ("tp", "fp", "fn")],
                              dtype=torch.float64)
        return {"loss": sums["loss"] / sums["count"], **precision_recall_f1(counts)}

    def export(self, model: torch.nn.Module, manifest: Manifest, path: Path) -> None:
        arch = self.cfg.classifier.torchvision or self.cfg.classifier.arch  # our head on any torchvision model
        save_model_file(path, model, kind="classifier", arch=arch,
                        num_classes=len(manifest.classes), classes=manifest.classes,
                        image_size=self.cfg.data.image_size)
