"""Errors that stop a run for a reason outside the code (user input, a full disk, a corrupt file), and how the entry
points report them: one line naming the file and what is wrong, no traceback. Tracebacks are for bugs.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn, TypeVar

T = TypeVar("T")


class RunError(RuntimeError):
    """A fault the user can act on; the message says what and where. Exit status 1."""

    exit_code = 1


class UserError(RunError):
    """Bad input on the command line or in the run folder (exit status 2, like a config error)."""

    exit_code = 2


class InputError(UserError, ValueError):
    """A file or setting the user gave that cannot be used (a manifest, a model file, a config value): exit status 2,
    one line. Also a ValueError, which is what the library raised for these before they had a type of their own."""


class MissingInput(InputError, FileNotFoundError):
    """A file the user named does not exist (also a FileNotFoundError, for callers that catch that)."""


class ModelFileError(InputError):
    """A model or weights file that cannot be loaded, or does not fit the data/config; the message names it."""


DEBUG_ENV = "EXPLAINER_DEBUG"  # =1: user errors keep their traceback (what --debug sets)
DEBUG_HELP = f"show the traceback of errors in the input too (also {DEBUG_ENV}=1)"


def debug_requested() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def request_debug(on: bool) -> None:
    """--debug: tracebacks for user errors too, in this process and the ones it starts."""
    if on:
        os.environ[DEBUG_ENV] = "1"


def untrusted_load_reason(exc: BaseException) -> str:
    """Why torch.load(weights_only=True) refused a file, in the unpickler's words, without torch's advice to re-run
    with weights_only=False or to allow-list the global (either would run whatever the file contains)."""
    text = str(exc).split("WeightsUnpickler error:", 1)[-1]  # torch's advice comes before the reason
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    kept = [p.split(". Please use")[0] for p in paragraphs
            if "weights_only" not in p and not p.startswith("Check the documentation")]
    return " ".join(" ".join(kept).split()) or type(exc).__name__


_REASONS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
            errno.EROFS: "read-only file system", errno.EACCES: "permission denied"}


def os_reason(exc: BaseException) -> str | None:
    """The OS-level reason behind `exc` or anything it was raised from ("no space left on device"), or None."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno is not None:
            return _REASONS.get(exc.errno, exc.strerror or os.strerror(exc.errno))
        exc = exc.__cause__ or exc.__context__
    return None


def write_failure(exc: BaseException, where: str | os.PathLike) -> str:
    """Why a write under `where` failed, in words. torch's zip writer reports a full disk as "unexpected pos 121536
    vs 121424" with no errno, so a filesystem with (almost) no free space is called full too."""
    reason = os_reason(exc)
    if reason is not None:
        return reason
    free = free_bytes(where)
    if free is not None and free < 1 << 20:
        return f"no space left on device ({free} bytes free)"
    return f"{type(exc).__name__}: {first_line(exc)}"


def free_bytes(where: str | os.PathLike) -> int | None:
    path = Path(where)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def exit_on_run_error(main: Callable[[], T]) -> T:
    """Run an entry point's body; a RunError becomes `error: <message>` on stderr and its exit status (2 for bad
    input). With EXPLAINER_DEBUG=1 (--debug) it keeps its traceback; anything else is a bug and always does."""
    try:
        return main()
    except RunError as exc:
        if debug_requested():
            raise
        _stop(one_line(exc), exc.exit_code)
    except OSError as exc:  # a file or folder the system refused (an --out that is a file, no permission, full disk)
        if exc.filename is None or debug_requested():
            raise
        _stop(f"{exc.filename}: {os_reason(exc)}", 1 if exc.errno in (errno.ENOSPC, errno.EDQUOT) else 2)


def _stop(message: str, code: int) -> NoReturn:
    _close_progress_bars()
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code) from None


def one_line(exc: BaseException) -> str:
    """The message on one line: a multi-line message (a list of problems) is joined with '; '."""
    return "; ".join(part.strip() for part in str(exc).strip().splitlines() if part.strip()) or type(exc).__name__


def _close_progress_bars() -> None:
    """A bar left open by the exception would redraw at exit, after the message, and bury it."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()
