"""How the monitor degrades: a failure warns once, says what was lost, and training goes on.

Every hook of the callback runs its work through :meth:`Faults.guard` (or reports to
:meth:`Faults.report`), so a full disk, a read-only checkpoint folder, a state that does not
serialise or a broken tracker costs the diagnostics that depended on it and nothing else: the
Trainer never sees the exception.  Each kind of failure warns once (a ``RuntimeWarning`` and a log
record with the traceback); repeats go to the debug log.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import PurePosixPath, PureWindowsPath

__all__ = ["Faults", "output_subdir_problem", "warn_fault"]

logger = logging.getLogger(__name__)


def warn_fault(what: str, exc: BaseException | None, lost: str) -> str:
    """Warn (once per call) that ``what`` failed with ``exc`` and ``lost`` is what is missing now."""
    cause = "" if exc is None else f" ({type(exc).__name__}: {exc})"
    msg = f"weight forces: {what} failed{cause}; {lost}; training goes on"
    logger.warning(msg, exc_info=exc)
    warnings.warn(msg, RuntimeWarning, stacklevel=3)
    return msg


class Faults:
    """Failures seen in one run, by kind; each kind warns once."""

    def __init__(self) -> None:
        self.seen: dict[str, int] = {}

    def report(self, kind: str, what: str, exc: BaseException | None, lost: str) -> None:
        count = self.seen.get(kind, 0)
        self.seen[kind] = count + 1
        if count:
            logger.debug("weight forces: %s failed again (%r)", what, exc)
            return
        warn_fault(what, exc, lost)

    @contextmanager
    def guard(self, kind: str, what: str, lost: str) -> Iterator[None]:
        """Run the block; an exception in it is reported and swallowed (never KeyboardInterrupt)."""
        try:
            yield
        except Exception as exc:  # a diagnostic never stops training
            self.report(kind, what, exc, lost)


def output_subdir_problem(subdir: object) -> str | None:
    """What is wrong with ``subdir`` as the records folder under the output folder, or ``None``.

    Rows go to ``<output_dir>/<subdir>``.  An absolute path (``os.path.join`` then drops
    ``output_dir``) or a ``..`` component would put them outside the run's folder, where another
    run's or another user's files are: refused rather than normalised, so the folder is the one
    the user wrote.  Both separators count (``a\\..\\b`` leaves the folder on Windows).
    """
    if not isinstance(subdir, (str, os.PathLike)):
        return f"must be a folder name, got {subdir!r}"
    text = os.fspath(subdir)
    if not isinstance(text, str) or not text.strip():
        return "must not be empty"
    if "\x00" in text:
        return f"must not contain a NUL character, got {text!r}"
    if any(p.is_absolute() or p.drive or p.root for p in (PurePosixPath(text), PureWindowsPath(text))):
        return f"must be a folder inside the output folder, got the absolute path {text!r}"
    if ".." in re.split(r"[\\/]", text):
        return f"must be a folder inside the output folder, got {text!r} (a '..' component leaves it)"
    return None
