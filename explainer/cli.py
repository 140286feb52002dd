"""The `explainer` console script: `explainer <command> [args]`, each command parsed by its own module's parser.

Commands map to modules with a `main(argv, prog=...)`; only the module that runs is imported (torch, captum and
TorchRay take seconds to import). Every command is also `python -m <module>`.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("explainer.train", "train an Explainer for a frozen classifier (also under accelerate/torchrun -m)"),
    "train-classifier": ("explainer.train_classifier", "fine-tune the classifier to explain (the Explanandum)"),
    "evaluate": ("explainer.evaluate", "paper Tables 1-4 and figures on the test split"),
    "audit": ("explainer.audit", "per class: do the mask and the classifier's evidence lie on the object or around it"),
    "explain": ("explainer.explain", "masks, overlays and scores for images (needs only the explainer checkpoint)"),
    "make-shards": ("explainer.make_shards", "shards from voc, coco, imagenet, folder (yours), synthetic; merge parts"),
    "submit": ("explainer.submit", "submit training to SLURM (or locally), one run or a sweep as a job array"),
    "sweep-report": ("explainer.sweep_report", "rank the runs of a sweep by their best validation metrics"),
    "bias": ("explainer.experiments.bias",
             "the synthetic background-cue experiment (does the Explainer reveal a bias?)"),
    "demo": ("explainer.experiments.demo",
             "shards, classifier, Explainer and evaluation on synthetic scenes, end to end"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: explainer COMMAND [args]  (explainer COMMAND --help for its options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"explainer: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    return int(module.main(rest, prog=f"explainer {command}") or 0)


if __name__ == "__main__":
    sys.exit(main())
