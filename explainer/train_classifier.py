"""Fine-tune the Explanandum: `python explainer/train_classifier.py --config configs/classifier/voc_vgg16.yaml`."""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # run as a file: import the checkout this file lives in, not an installed copy, and
    _here = os.path.dirname(os.path.abspath(__file__))  # keep explainer/ off sys.path (its modules shadow others)
    sys.path = [os.path.dirname(_here), *(p for p in sys.path if os.path.abspath(p or ".") != _here)]

from typing import Any

from explainer.arguments import parse_run_config
from explainer.config import ClassifierRunConfig
from explainer.distributed import close_process_group
from explainer.recipes import ClassifierRecipe
from explainer.run_errors import exit_on_run_error
from explainer.training_loop import fit


def run_classifier(cfg: ClassifierRunConfig) -> dict[str, Any]:
    return fit(ClassifierRecipe(cfg))


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    cfg = parse_run_config(ClassifierRunConfig, argv, "Fine-tune a multi-label classifier (Explanandum).", prog)
    exit_on_run_error(lambda: run_classifier(cfg))
    close_process_group()
    return 0


if __name__ == "__main__":
    main()
