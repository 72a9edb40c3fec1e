"""What every ``hf-weightforces`` command shares: validated option types, safe output, progress
lines and the one-line errors.  Standard library only, so ``--help`` and argument errors answer
before torch is imported.

* Option types reject what would fail later or run forever: out-of-range and non-finite numbers
  (``--beta1 1.5``, ``--weight-decay inf``, ``--dpi 100000``), absurd sizes.
* Output passes through :class:`SafeText`: control characters and bidirectional overrides in
  tensor or file names are printed escaped (``\\x1b``), never interpreted by the terminal.
* :func:`run_command` turns every failure into one ``error: ...`` line on stderr and exit status 2
  (the input could not be used), Ctrl-C into exit status 130 with no traceback.
* Progress: the analysis modules log what they read (``logging`` at INFO); :func:`show_progress`
  prints those records on stderr with the elapsed time when stderr is a terminal, unless
  ``--quiet`` (warnings are printed either way).
"""

from __future__ import annotations

import argparse
import logging
import math
import re
import sys
import time
from collections.abc import Callable
from typing import TextIO

__all__ = [
    "ArgumentParser",
    "SafeText",
    "add_common_flags",
    "bounded_float",
    "bounded_int",
    "describe_error",
    "run_command",
    "safe",
    "show_progress",
]

#: Control characters (C0 but newline and tab, DEL, C1) and the bidirectional-text overrides.
_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def safe(text: str) -> str:
    """``text`` with every control character written as an escape (``\\x1b``, ``\\u202e``)."""
    return _UNSAFE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


class SafeText:
    """A text stream wrapper that writes :func:`safe` text (everything else passes through)."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        return self._stream.write(safe(text))

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with usage errors as one line: ``error: PROG: MESSAGE (see PROG --help)``, status 2."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {safe(message)} (see '{self.prog} --help')\n")


def bounded_int(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in [low, high]."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            span = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise argparse.ArgumentTypeError(f"expected an integer {span}, got {value}")
        return value

    return parse


def bounded_float(low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number in the interval (``low_open``/``high_open`` exclude an end)."""
    lb, hb = "(" if low_open else "[", ")" if high_open else "]"
    span = f"in {lb}{low:g}, {high:g}{hb}" if math.isfinite(high) else (f"> {low:g}" if low_open else f">= {low:g}")

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if value < low or (low_open and value == low) or value > high or (high_open and value == high):
            raise argparse.ArgumentTypeError(f"expected a number {span}, got {value:g}")
        return value

    return parse


def add_common_flags(parser: argparse.ArgumentParser) -> None:
    """``--quiet`` and ``--traceback`` on a subcommand (unless it defines them itself)."""
    if "--quiet" not in parser._option_string_actions:
        parser.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    if "--traceback" not in parser._option_string_actions:
        parser.add_argument("--traceback", action="store_true", help="on an error, also print where it happened")


class _Elapsed(logging.Formatter):
    def __init__(self) -> None:
        super().__init__()
        self.start = time.monotonic()

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage().replace("\n", " ")
        level = "" if record.levelno < logging.WARNING else f"{record.levelname.lower()}: "
        return f"[{time.monotonic() - self.start:6.1f}s] {level}{text}"


def show_progress(quiet: bool, stream: TextIO | None = None) -> Callable[[], None]:
    """Print this package's INFO log records (what it reads) on stderr with the elapsed time, when
    stderr is a terminal and not ``quiet``; returns the function that undoes it."""
    stream = sys.stderr if stream is None else stream
    if quiet or not getattr(stream, "isatty", lambda: False)():
        return lambda: None
    log = logging.getLogger("hf_weightforces")
    handler = logging.StreamHandler(stream)
    handler.setFormatter(_Elapsed())
    old_level, old_propagate = log.level, log.propagate
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False

    def undo() -> None:
        log.removeHandler(handler)
        log.setLevel(old_level)
        log.propagate = old_propagate

    return undo


def describe_error(exc: BaseException) -> str:
    """One line naming the file and the cause (a permission error is not "no such file")."""
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        what = exc.strerror if exc.errno != 2 else "no such file or folder"
        return f"{exc.filename}: {what}"
    if isinstance(exc, MemoryError):
        return "out of memory (the input is larger than this machine can hold)"
    text = str(exc).strip() or type(exc).__name__
    if not isinstance(exc, (ValueError, OSError)):  # not a reader's own message: say what kind of failure
        text = f"cannot use this input ({type(exc).__name__}: {text})"
    return " ".join(text.split())


def run_command(func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run one subcommand: its exit status, 2 with one ``error:`` line for any failure, 130 for Ctrl-C."""
    stdout, stderr = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = SafeText(stdout), SafeText(stderr)
    undo = show_progress(bool(getattr(args, "quiet", False)), sys.stderr)
    try:
        return int(func(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `... | head`: the reader left; nothing more to say
        return 0
    except Exception as exc:
        if getattr(args, "traceback", False):
            import traceback

            traceback.print_exc()
        print(f"error: {describe_error(exc)}", file=sys.stderr)
        return 2
    finally:
        undo()
        try:
            sys.stdout.flush()
        except (BrokenPipeError, ValueError):
            pass
        sys.stdout, sys.stderr = stdout, stderr
