"""How the monitor degrades: a failure warns once, says what was lost, and training goes on.

Every hook of the callback runs its work through :meth:`Faults.guard` (or reports to
:meth:`Faults.report`), so a full disk, a read-only checkpoint folder, a state that does not
serialise or a broken tracker costs the diagnostics that depended on it and nothing else: the
Trainer never sees the exception.  Each kind of failure warns once (a ``RuntimeWarning`` and a log
record with the traceback); repeats go to the debug log.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["Faults", "warn_fault"]

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
