"""Fine-tune the Explanandum: `python explainer/train_classifier.py --config configs/classifier/voc_vgg16.yaml`."""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # run as a file: keep explainer/ itself off sys.path (its modules would shadow others)
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path = [p for p in sys.path if os.path.abspath(p or ".") != _here]

from typing import Any

from explainer.cli_args import parse_run_config
from explainer.config import ClassifierRunConfig
from explainer.tasks import ClassifierTask
from explainer.trainer import RunSettings, fit


def run_classifier(cfg: ClassifierRunConfig) -> dict[str, Any]:
    settings = RunSettings(data=cfg.data, optim=cfg.optim, train=cfg.train, tracking=cfg.tracking)
    return fit(ClassifierTask(cfg), settings, cfg)


def main(argv: list[str] | None = None) -> None:
    run_classifier(parse_run_config(ClassifierRunConfig, argv, "Fine-tune a multi-label classifier (Explanandum)."))


if __name__ == "__main__":
    main()
