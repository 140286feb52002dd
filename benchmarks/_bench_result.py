"""What every benchmark's JSON says about how it was made: the command line and its arguments, so a number in the
README or docs can be traced to a rerunnable command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from explainer.atomic import write_json_atomic


def provenance(args: argparse.Namespace) -> dict[str, Any]:
    """{"command": the command line, "args": the parsed arguments (non-JSON values as their repr)}."""
    plain = (str, int, float, bool, list, type(None))
    return {"command": " ".join([Path(sys.executable).name, *sys.argv]),
            "args": {k: v if isinstance(v, plain) else repr(v) for k, v in vars(args).items()}}


def write_result(path: str | Path, args: argparse.Namespace, **fields: Any) -> None:
    """The benchmark's result file (atomically): provenance first, then `fields`; says where it went."""
    write_json_atomic(Path(path), {**provenance(args), **fields})
    print(f"wrote {path}")
