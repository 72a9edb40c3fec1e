"""The record format shared by the live callback and the offline tools: JSON lines, one row per
event, ``{"step": int, key: number-or-null, ...}`` (strict JSON: non-finite numbers are null).

Readers are lenient where a run may have left damage (a torn last line after a crash, a line
written by hand): :func:`read_rows` skips every line that is not a JSON object with an integer
``step`` and counts it; nothing is ever ``eval``-ed or unpickled.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

__all__ = ["METRICS_FILE", "PARAMS_FILE", "PREVIOUS_DIR", "SCHEDULE_FILE", "RowsRead", "continue_records", "json_safe",
           "read_jsonl", "read_rows", "replace_file"]

SCHEDULE_FILE = "schedule.jsonl"  # lr and weight decay per param group at every optimizer step
PARAMS_FILE = "params.json"  # names, classes, shapes and optimizer group of the monitored tensors
METRICS_FILE = "metrics.jsonl"
PREVIOUS_DIR = "previous"  # rows a fresh or resumed run does not continue, kept whole

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RowsRead:
    """The usable rows of a JSON-lines file (values exactly as stored: null stays ``None``) and
    how many non-blank lines were skipped, with the first reason."""

    rows: list[dict]
    skipped: int
    first_problem: str = ""


def _problem(line: str) -> tuple[dict | None, str]:
    """The row on this line, or None and why it is unusable."""
    try:
        row = json.loads(line)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError; RecursionError: absurd nesting
        return None, f"not JSON ({type(exc).__name__}: {str(exc)[:80]})"
    if not isinstance(row, dict):
        return None, f"a JSON {type(row).__name__}, not an object"
    step = row.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        return None, f"step {step!r} is not a non-negative integer"
    return row, ""


def read_rows(path: str | os.PathLike) -> RowsRead:
    """Every line of ``path`` that is a JSON object with an integer ``step``; other lines are
    skipped and counted.  Raises ``OSError`` when the file cannot be read at all."""
    rows, skipped, first = [], 0, ""
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            row, why = _problem(line)
            if row is None:
                skipped += 1
                first = first or f"line {lineno}: {why}"
                continue
            rows.append(row)
    return RowsRead(rows, skipped, first)


def read_jsonl(path: str | os.PathLike, strict: bool = True) -> list[dict]:
    """Rows of a metrics.jsonl file; nulls read back as NaN.

    ``strict`` raises ``ValueError`` naming the file and line of the first unusable line;
    ``strict=False`` skips such lines (a torn last line, a non-object, a step that is not an
    integer) and logs one warning with their number.
    """
    read = read_rows(path)
    if read.skipped:
        if strict:
            raise ValueError(f"{path}: {read.first_problem}")
        logger.warning("%s: skipped %d unusable line(s) (first: %s)", path, read.skipped, read.first_problem)
    return [{k: (math.nan if v is None else v) for k, v in row.items()} for row in read.rows]


def json_safe(obj: object) -> object:
    """Strict-JSON copy of nested dicts/lists: non-finite floats become ``None`` (null)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def replace_file(path: Path, text: str) -> None:
    """Write ``text`` to a temporary name and rename it: a reader sees the old file or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def continue_records(folder: Path, resume_step: int, names: tuple[str, ...] = (METRICS_FILE, SCHEDULE_FILE)) -> Path | None:
    """Make the JSON-lines record files in ``folder`` continue a run at ``resume_step`` (0: a fresh run).

    Rows with steps up to ``resume_step`` stay, exactly as written (null stays null), in
    increasing step order; rows after it, repeated or out-of-order steps and unusable lines go.
    When anything goes, every record file (and ``params.json``) is first copied whole into the
    first free ``previous/<n>/``, which is returned.  Idempotent: a second call finds nothing to
    drop.  Raises ``OSError`` when the folder cannot be read or written.
    """
    plans: dict[Path, list[dict]] = {}
    for name in names:
        path = folder / name
        if not path.is_file():
            continue
        read = read_rows(path)
        kept: list[dict] = []
        for row in read.rows:
            if (kept[-1]["step"] if kept else -1) < row["step"] <= resume_step:
                kept.append(row)
        if len(kept) != len(read.rows) or read.skipped:
            plans[path] = kept
    if not plans:
        return None
    n = 1
    while (folder / PREVIOUS_DIR / str(n)).exists():
        n += 1
    archive = folder / PREVIOUS_DIR / str(n)
    archive.mkdir(parents=True)
    for name in (*names, PARAMS_FILE):
        if (folder / name).is_file():
            shutil.copyfile(folder / name, archive / name)
    for path, kept in plans.items():
        replace_file(path, "".join(json.dumps(json_safe(row)) + "\n" for row in kept))
    what = f"rows after step {resume_step}" if resume_step else "the rows of a previous run"
    logger.warning("weight forces: %s in %s kept in %s", what, folder, archive)
    return archive
