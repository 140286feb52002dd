"""Train an Explainer: `accelerate launch explainer/train.py --config configs/coco_resnet.yaml [key=value ...]`.

Also runs as `accelerate launch -m explainer.train`, `torchrun [-m] ...`, plain `python` (one process),
`explainer train` and inside SLURM tasks (explainer/submit.py calls `run`).
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # run as a file: import the checkout this file lives in, not an installed copy, and
    _here = os.path.dirname(os.path.abspath(__file__))  # keep explainer/ off sys.path (its modules shadow others)
    sys.path = [os.path.dirname(_here), *(p for p in sys.path if os.path.abspath(p or ".") != _here)]

from typing import Any

from explainer.arguments import parse_run_config
from explainer.config import ExplainerRunConfig
from explainer.distributed import close_process_group
from explainer.recipes import ExplainerRecipe
from explainer.run_errors import exit_on_run_error
from explainer.training_loop import fit


def run(cfg: ExplainerRunConfig) -> dict[str, Any]:
    """Train with an already validated config; the single code path of local, torchrun and SLURM runs."""
    return fit(ExplainerRecipe(cfg))


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    cfg = parse_run_config(ExplainerRunConfig, argv, "Train an Explainer for a frozen classifier.", prog)
    exit_on_run_error(lambda: run(cfg))  # a full disk, a busy run folder, a corrupt checkpoint: one line, no traceback
    close_process_group()
    return 0


if __name__ == "__main__":
    main()
