"""Command-line parsing shared by the entry points: one help style, and --config/--resume/overrides for training."""

from __future__ import annotations

import argparse
from typing import Any, TypeVar

from explainer.config import ConfigError, load_config
from explainer.run_errors import DEBUG_HELP, request_debug

T = TypeVar("T")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the module docstring's layout and appends each option's default.

    Unlike argparse.ArgumentDefaultsHelpFormatter it also covers options without help text, and it leaves alone
    defaults that say nothing (None, off flags) or that the help text already explains (it mentions "default").
    """

    def _format_action(self, action: argparse.Action) -> str:
        if _shows_default(action) and "default" not in (action.help or "").lower():
            action = _copy_with_help(action, f"{action.help or ''} (default: %(default)s)".strip())
        return super()._format_action(action)


def _shows_default(action: argparse.Action) -> bool:
    default = action.default
    if default is None or default is False or default == argparse.SUPPRESS or default == [] \
            or action.help == argparse.SUPPRESS:
        return False
    return bool(action.option_strings) or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE)


def _copy_with_help(action: argparse.Action, text: str) -> argparse.Action:
    import copy

    clone = copy.copy(action)
    clone.help = text
    return clone


class ArgumentParser(argparse.ArgumentParser):
    """argparse.ArgumentParser with HelpFormatter; its sub-parsers inherit it (add_subparsers reuses the class)."""

    def __init__(self, *args: Any, formatter_class: type[argparse.HelpFormatter] = HelpFormatter,
                 **kwargs: Any) -> None:
        super().__init__(*args, formatter_class=formatter_class, **kwargs)


def parse_run_config(cls: type[T], argv: list[str] | None, description: str, prog: str | None = None) -> T:
    parser = ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", required=True, help="YAML preset, e.g. configs/synthetic.yaml")
    parser.add_argument("--resume", default=None,
                        help="'auto' (newest complete checkpoint in train.output_dir) or a checkpoint folder")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted overrides, e.g. optim.lr=1e-4")
    args = parser.parse_args(argv)
    request_debug(args.debug)
    overrides = list(args.overrides)
    if args.resume is not None:
        overrides.append(f"train.resume={args.resume}")
    try:
        return load_config(cls, args.config, overrides)
    except ConfigError as exc:
        parser.exit(2, f"config error: {exc}\n")


def max_pixels_arg(text: str) -> int | None:
    """--max-image-pixels: a pixel count >= 1, or 'none' for no cap (PIL's Image.MAX_IMAGE_PIXELS semantics)."""
    if text.strip().lower() == "none":
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a pixel count >= 1 or 'none', got {text!r}")
    return value
