"""Command line: ``hf-weightforces SUBCOMMAND ...``, a thin layer over :mod:`hf_weightforces.analysis`.

    hf-weightforces fit PATH [--json] [--exclude-top N] [--groups-json FILE]

Each subcommand is a ``_add_<name>(subparsers)`` function that registers its arguments and sets
``func`` to a ``_run_<name>(args) -> int``; add new ones to :data:`_SUBCOMMANDS`.  Bad input
(unreadable checkpoint, bad grouping file) exits with status 2 and one ``error: ...`` line on
stderr, no traceback.  Only this module prints.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = ["build_parser", "main"]


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {value}")
    return value


def _load_grouping(file: str | None):
    """A :class:`~hf_weightforces.core.groups.Grouping` from ``{"class": ["regex", ...]}`` or
    ``{"patterns": {...}, "use_defaults": bool}``; raises ValueError with the file named."""
    from hf_weightforces.core.groups import Grouping

    if file is None:
        return None
    try:
        data = json.loads(Path(file).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{file}: cannot read grouping JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{file}: grouping JSON must be an object mapping class -> [regex, ...]")
    if "patterns" in data:
        patterns, use_defaults = data["patterns"], data.get("use_defaults", True)
    else:
        patterns, use_defaults = data, True
    if not isinstance(patterns, dict) or not isinstance(use_defaults, bool):
        raise ValueError(f"{file}: 'patterns' must be an object and 'use_defaults' a boolean")
    try:
        return Grouping(patterns=patterns, use_defaults=use_defaults)
    except ValueError as exc:
        raise ValueError(f"{file}: {exc}") from exc


def _add_fit(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "fit",
        help="Weibull fits of every weight matrix and per-group pooled fits of a checkpoint",
        description="Fit Weibull(k, lambda) to |w| of every weight matrix (SPEC section 4 protocol) "
        "of a model folder, Trainer checkpoint-N folder, .safetensors or .bin file.",
    )
    p.add_argument("path", help="model folder, checkpoint-N folder, .safetensors, .bin/.pt file or index .json")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    p.add_argument(
        "--exclude-top",
        type=_non_negative_int,
        default=0,
        metavar="N",
        help="drop the N largest magnitudes of each matrix (super weights) and report how k and lambda move",
    )
    p.add_argument(
        "--groups-json",
        metavar="FILE",
        help='JSON {"class": ["regex", ...]} overriding the weight classes (tried before the built-in rules)',
    )
    p.set_defaults(func=_run_fit)


def _run_fit(args: argparse.Namespace) -> int:
    from hf_weightforces.analysis.fit import fit_checkpoint, format_table

    report = fit_checkpoint(args.path, exclude_top=args.exclude_top, grouping=_load_grouping(args.groups_json))
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(format_table(report))
    return 0


#: Registered subcommands, in help order.
_SUBCOMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (_add_fit,)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-weightforces",
        description="AdamW force budgets and Weibull weight diagnostics for Hugging Face models.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in _SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (2 for bad input, with one ``error:`` line on stderr)."""
    from hf_weightforces.analysis.checkpoints import CheckpointError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (CheckpointError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
