"""Training objectives as objects (docs/extending.md#objective): what an objective asks of the frozen classifier,
and what it makes of the classifier's answers.

An objective DECLARES the classifier inputs it needs, as named batches built from the images and the class split
(m, n and the ground-truth masks), and COMPUTES its loss from F's logits on each of them. The step
(explainer/step.py) concatenates every declared batch into ONE classifier call and never asks which objective it
runs, so a new objective, or a term that needs another classifier input, changes no line of the step. The term maths
stays in explainer/losses.py (pure functions the float64 tests pin by hand); this module only wires it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from explainer.config import LossConfig
from explainer.losses import (
    RTIS_TERMS,
    WYSIWYC_TERMS,
    ClassSplit,
    alternative_image,
    draw_class,
    rtis_loss,
    wysiwyc_loss,
)

MASKED = "masked"  # the one input every objective declares: StepOutput.logits_masked and the metrics need F(x_m)


@dataclass
class ClassifierInputs:
    """One step's declared classifier inputs, and the per-step values the objective's loss needs besides the logits.

    Returned rather than kept on the objective, so an objective holds nothing between steps (one object can serve the
    training and the validation step of a run)."""

    batches: dict[str, Tensor]  # name -> images [N,3,H,W]; MASKED always; F sees them concatenated in this order
    state: dict[str, Tensor] = field(default_factory=dict)  # e.g. L_s's drawn class one-hot [B,C]


class Objective(Protocol):
    """What the step needs of an objective; see WysiwycObjective for an implementation."""

    @property
    def terms(self) -> tuple[str, ...]:
        """The term names `loss` returns besides "loss": fixed per run, so every rank reduces the same keys."""
        ...

    def classifier_inputs(
        self, images: Tensor, labels: Tensor, split: ClassSplit, draws: Tensor | None
    ) -> ClassifierInputs:
        """The batches F must see, from the (normalised) images and the split of the Explainer's masks. `draws`
        ([B] uniform, or None: the global RNG) is for objectives that pick something per image."""
        ...

    def loss(
        self, labels: Tensor, split: ClassSplit, logits: dict[str, Tensor], inputs: ClassifierInputs
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """(total with graph, detached terms with "loss") from F's fp32 logits on each declared batch, by name."""
        ...


class WysiwycObjective:
    """The paper's objective (docs/method.md#objective): F(x * m) and F(x * (1 - m)) on the normalised image, so
    removed pixels become the dataset-mean colour; with loss.w_class_specific > 0 also F(x * s_k) for one drawn
    ground-truth class k per image (L_s, docs/method.md#class-specific-term)."""

    def __init__(self, cfg: LossConfig) -> None:
        self.cfg = cfg
        self.class_specific = cfg.w_class_specific > 0

    @property
    def terms(self) -> tuple[str, ...]:
        return (*WYSIWYC_TERMS, "class_specific") if self.class_specific else WYSIWYC_TERMS

    def classifier_inputs(
        self, images: Tensor, labels: Tensor, split: ClassSplit, draws: Tensor | None
    ) -> ClassifierInputs:
        m = split.m
        batches = {MASKED: images * m, "inverse": images * (1 - m)}
        if not self.class_specific:
            return ClassifierInputs(batches)
        if draws is None:
            draws = torch.rand(images.shape[0], device=images.device)
        drawn = draw_class(labels, draws.to(images.device))
        batches["single"] = images * split.select(drawn).to(images.dtype)  # a blank image where no class was drawn
        return ClassifierInputs(batches, {"drawn": drawn})

    def loss(
        self, labels: Tensor, split: ClassSplit, logits: dict[str, Tensor], inputs: ClassifierInputs
    ) -> tuple[Tensor, dict[str, Tensor]]:
        return wysiwyc_loss(None, labels, logits[MASKED], logits["inverse"], self.cfg, split=split,
                            logits_single=logits.get("single"), drawn=inputs.state.get("drawn"))


class RtisObjective:
    """Dabkowski and Gal's objective (docs/method.md#rtis-objective): removed pixels are replaced by an alternative
    image (blur or noise, loss.rtis_alternative), F(x m + alt (1 - m)) and F(x (1 - m) + alt m)."""

    def __init__(self, cfg: LossConfig) -> None:
        self.cfg = cfg

    @property
    def terms(self) -> tuple[str, ...]:
        return RTIS_TERMS

    def classifier_inputs(
        self, images: Tensor, labels: Tensor, split: ClassSplit, draws: Tensor | None
    ) -> ClassifierInputs:
        del labels, draws
        alt = alternative_image(images, self.cfg.rtis_alternative)
        m = split.m
        return ClassifierInputs({MASKED: images * m + alt * (1 - m), "inverse": images * (1 - m) + alt * m})

    def loss(
        self, labels: Tensor, split: ClassSplit, logits: dict[str, Tensor], inputs: ClassifierInputs
    ) -> tuple[Tensor, dict[str, Tensor]]:
        return rtis_loss(None, labels, logits[MASKED], logits["inverse"], self.cfg, m=split.m, n=split.n)


# loss.kind -> the objective; a study may register its own kind here (tests/test_objectives.py does)
OBJECTIVES: dict[str, Callable[[LossConfig], Objective]] = {"wysiwyc": WysiwycObjective, "rtis": RtisObjective}


def build_objective(cfg: LossConfig) -> Objective:
    """The objective `loss.kind` names, built from the loss config."""
    factory = OBJECTIVES.get(cfg.kind)
    if factory is None:
        raise ValueError(f"loss.kind={cfg.kind!r} names no objective; known: {', '.join(sorted(OBJECTIVES))}")
    return factory(cfg)


def objective_terms(cfg: LossConfig) -> tuple[str, ...]:
    """The term names a config's objective logs (the keys every rank reduces)."""
    return build_objective(cfg).terms


__all__ = [
    "MASKED",
    "OBJECTIVES",
    "ClassifierInputs",
    "Objective",
    "RtisObjective",
    "WysiwycObjective",
    "build_objective",
    "objective_terms",
]
