"""Command-line parsing shared by the training entry points: --config, --resume and dotted overrides."""

from __future__ import annotations

import argparse
from typing import TypeVar

from explainer.config import ConfigError, load_config

T = TypeVar("T")


def parse_run_config(cls: type[T], argv: list[str] | None, description: str) -> T:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="YAML preset, e.g. configs/synthetic.yaml")
    parser.add_argument("--resume", default=None,
                        help="'auto' (newest complete checkpoint in train.output_dir) or a checkpoint folder")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted overrides, e.g. optim.lr=1e-4")
    args = parser.parse_args(argv)
    overrides = list(args.overrides)
    if args.resume is not None:
        overrides.append(f"train.resume={args.resume}")
    try:
        return load_config(cls, args.config, overrides)
    except ConfigError as exc:
        parser.exit(2, f"config error: {exc}\n")
