"""Rank the runs of a sweep by their best validation metrics: `python launch/sweep_report.py SWEEP_DIR`.

Reads SWEEP_DIR/sweep.json (written by `launch/submit.py --sweep`) and each run's summary.json / metrics.jsonl;
prints a markdown table and writes SWEEP_DIR/report.md and report.csv. Failed and unfinished runs stay in the table
with their status (unfinished ones with their best validation so far).
"""

from __future__ import annotations

import argparse
import sys

from explainer.arguments import ArgumentParser
from explainer.sweep import write_report


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    p = ArgumentParser(prog=prog, description=__doc__)
    p.add_argument("sweep_dir", help="folder with sweep.json")
    p.add_argument("--metric", default=None,
                   help="validation metric to rank by (default: the sweep file's `metric`, else loss)")
    p.add_argument("--maximize", action=argparse.BooleanOptionalAction, default=None,
                   help="higher is better (default: the sweep file's `maximize`)")
    args = p.parse_args(argv)
    try:
        markdown, md_path, csv_path = write_report(args.sweep_dir, args.metric, args.maximize)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(markdown, end="")
    print(f"\nwritten: {md_path}, {csv_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
