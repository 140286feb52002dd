"""The `explainer` console script: one subcommand per entry point, each parsed by its own module.

Subcommands register a parser builder and a runner here; the modules keep their own `python -m` entry points.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence


def _explain(sub: argparse._SubParsersAction) -> Callable[[argparse.Namespace], int]:
    from explainer import explain

    explain.build_parser(sub.add_parser("explain", help="masks, overlays and scores for images (explainer only)",
                                        description=explain.__doc__,
                                        formatter_class=argparse.RawDescriptionHelpFormatter))
    return explain.run_args


def _evaluate(sub: argparse._SubParsersAction) -> Callable[[argparse.Namespace], int]:
    from explainer import evaluate

    evaluate.build_parser(sub.add_parser("evaluate", help="paper Tables 1-4 and figures on the test split",
                                         description=evaluate.__doc__,
                                         formatter_class=argparse.RawDescriptionHelpFormatter))
    return evaluate.run_args


SUBCOMMANDS: dict[str, Callable[[argparse._SubParsersAction], Callable[[argparse.Namespace], int]]] = {
    "explain": _explain,
    "evaluate": _evaluate,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="explainer", description="Explainer networks (Stalder et al., 2022).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    argv = list(sys.argv[1:] if argv is None else argv)
    runners = {}
    for name, register in SUBCOMMANDS.items():
        # build only the parser that will run: importing every module costs seconds (torch, captum, torchray)
        if not argv or argv[0] not in SUBCOMMANDS or argv[0] == name:
            runners[name] = register(sub)
    args = parser.parse_args(argv)
    return int(runners[args.command](args) or 0)


if __name__ == "__main__":
    sys.exit(main())
