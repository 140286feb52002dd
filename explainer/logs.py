"""One logger tree for the library, configured once per process.

Library modules log through `get_logger(__name__)`; entry points (and the trainer, once it knows its rank) call
`configure_logging`. Rank 0 speaks at INFO, the other ranks only from WARNING up, so a message of an 8-GPU job appears
once, not eight times. Messages go to stdout with the `[explainer]` prefix that job logs were always grepped for. A
CLI's own output (a summary table, a dry-run script) stays a plain `print`.
"""

from __future__ import annotations

import logging
import os
import sys

ROOT = "explainer"


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever sys.stdout is at the time (pytest's capture, a redirected SLURM log)."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it; the property always follows sys.stdout
        pass


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name if name == ROOT or name.startswith(ROOT + ".") else f"{ROOT}.{name}")


def configure_logging(rank: int | None = None, level: int = logging.INFO) -> logging.Logger:
    """Idempotent. `rank` defaults to the RANK variable of torchrun / accelerate / SLURM tasks (0 without one)."""
    if rank is None:
        try:
            rank = int(os.environ.get("RANK", "0") or 0)
        except ValueError:
            rank = 0
    logger = logging.getLogger(ROOT)
    if not any(isinstance(h, _StdoutHandler) for h in logger.handlers):
        handler = _StdoutHandler()
        handler.setFormatter(logging.Formatter("[explainer] %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(level if rank == 0 else logging.WARNING)
    return logger
