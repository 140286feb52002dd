"""Train an Explainer: `accelerate launch explainer/train.py --config configs/coco_resnet.yaml [key=value ...]`.

Also runs under `torchrun`, plain `python` (one process) and inside SLURM tasks (launch/submit.py calls `run`).
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # run as a file: keep explainer/ itself off sys.path (its modules would shadow others)
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path = [p for p in sys.path if os.path.abspath(p or ".") != _here]

from typing import Any

from explainer.cli_args import parse_run_config
from explainer.config import ExplainerRunConfig
from explainer.tasks import ExplainerTask
from explainer.trainer import RunSettings, fit


def run(cfg: ExplainerRunConfig) -> dict[str, Any]:
    """Train with an already validated config; the single code path of local, torchrun and SLURM runs."""
    settings = RunSettings(data=cfg.data, optim=cfg.optim, train=cfg.train, tracking=cfg.tracking)
    return fit(ExplainerTask(cfg), settings, cfg)


def main(argv: list[str] | None = None) -> None:
    run(parse_run_config(ExplainerRunConfig, argv, "Train an Explainer for a frozen classifier."))


if __name__ == "__main__":
    main()
