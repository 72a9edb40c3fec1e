"""Where metric rows go.  A sink has two methods, ``log(metrics, step)`` and ``close()``;
ranks that must not write get :class:`NullSink`, so no call site checks the rank.

:func:`log_to_sinks` and :func:`close_sinks` call every sink; one that raises is dropped alone
(with one warning naming it and the first step it misses) and the others keep writing.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

from ..core.records import continue_records, read_jsonl, read_rows
from .guard import warn_fault

__all__ = ["JsonlSink", "NullSink", "Sink", "WandbSink", "close_sinks", "log_to_sinks", "read_jsonl"]


logger = logging.getLogger(__name__)


class Sink(Protocol):
    def log(self, metrics: Mapping[str, float], step: int) -> None: ...

    def close(self) -> None: ...


class NullSink:
    def log(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def write_rows(self, rows: Sequence[tuple[Mapping, int]]) -> None:
        pass

    def close(self) -> None:
        pass


def _json_value(v):
    """Numbers as floats, non-finite as null (strict JSON has no NaN/inf), lists element-wise."""
    if type(v) is float:  # nearly every value: the short way
        return v if math.isfinite(v) else None
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return v
    if isinstance(v, (list, tuple)):
        return [_json_value(x) for x in v]
    v = float(v)
    return v if math.isfinite(v) else None


def _plain(v) -> bool:
    """A value json writes as :func:`_json_value` would have it (a float, a flag, a list of floats),
    but for a NaN or an infinity, which ``allow_nan=False`` refuses."""
    kind = type(v)
    return kind is float or kind is bool or (kind is list and all(type(x) is float for x in v))


def _json_line(step: int, metrics: Mapping) -> str:
    """One row as strict JSON: as it is when every value is plain (the usual row: no conversion
    pass), else through :func:`_json_value` (non-finite as null, other numbers as floats)."""
    if all(map(_plain, metrics.values())):
        try:
            return json.dumps({"step": step, **metrics}, allow_nan=False)
        except ValueError:  # a NaN or an infinity: null
            pass
    return json.dumps({"step": step, **{k: _json_value(v) for k, v in metrics.items()}}, allow_nan=False)


class JsonlSink:
    """``{"step": global_step, ...}`` per row, appended as written.

    The file is opened for each write and closed at once: nothing stays open between log events,
    so a run that dies leaks no handle and a reader always sees whole rows.  Steps only increase:
    a row for a step at or before the last one in the file is skipped (no step is written twice;
    the Trainer's final summary re-fires ``on_log`` at the last step).

    ``resume_step``: the file continues a run resumed there (0: a fresh run starts an empty file);
    see :func:`~hf_weightforces.core.records.continue_records`, which keeps whatever it
    drops in ``previous/<n>/``.
    """

    def __init__(self, path: str | os.PathLike, resume_step: int = 0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        continue_records(self.path.parent, resume_step, (self.path.name,))  # no-op when already done
        self.last_step = -1
        if self.path.is_file():
            steps = [row["step"] for row in read_rows(self.path).rows]
            self.last_step = max(steps, default=-1)
        else:
            self.path.touch()

    def __repr__(self) -> str:
        return f"JsonlSink({str(self.path)!r})"

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self.write_rows([(metrics, step)])

    def write_rows(self, rows: Sequence[tuple[Mapping, int]]) -> None:
        """Append rows (one open and close for all of them), skipping steps already written."""
        lines, last = [], self.last_step
        for metrics, step in rows:
            step = int(step)
            if step <= last:
                logger.debug("%s: step %d is already written; row skipped", self.path, step)
                continue
            lines.append(_json_line(step, metrics))
            last = step
        if lines:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write("\n".join(lines) + "\n")
            self.last_step = last

    def close(self) -> None:
        pass  # nothing is held open


class WandbSink:
    """Adds the metrics to the W&B row that the Trainer's ``WandbCallback`` is about to commit,
    laid out for W&B's automatic workspace (integrations/wandb_layout.py: sections by topic, heat
    maps for per-layer quantities, the report's figures and summary values at train end).

    ``wandb.log(..., commit=False)`` from a callback that runs *before* ``WandbCallback`` puts the
    keys into the same row as ``train/loss`` at the same ``train/global_step`` (DISTRIBUTED.md,
    "W&B offline").  If the callback could not be placed before it (``ordered=False``), the row is
    logged on its own with ``train/global_step`` set, which costs W&B one extra internal step per
    log event.  ``records``: the folder of ``metrics.jsonl`` (figures are drawn from it).
    """

    def __init__(self, ordered: bool, dashboard=None, records: str | os.PathLike | None = None) -> None:
        from .wandb_media import DashboardWriter

        self.ordered = ordered
        self.writer = DashboardWriter(dashboard, records)
        self.step = 0

    def __repr__(self) -> str:
        return "WandbSink()"

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        import wandb

        if wandb.run is None:
            return
        self.step = int(step)
        row = self.writer.row(wandb, metrics, step)
        if self.ordered:
            wandb.log(row, commit=False)
        else:
            wandb.log({**row, "train/global_step": step})

    def close(self) -> None:
        import wandb

        if wandb.run is None or not self.writer.logged:
            return
        row = self.writer.finish(wandb)
        if row:
            wandb.log({**row, "train/global_step": self.step})


def log_to_sinks(sinks: list, metrics: Mapping[str, float], step: int) -> None:
    """``sink.log`` on every sink; one that raises warns once and is removed from ``sinks``."""
    for sink in list(sinks):
        try:
            sink.log(metrics, step)
        except Exception as exc:  # a broken sink must not take the others down
            sinks.remove(sink)
            warn_fault(f"{sink!r}.log at step {step}", exc, f"it is dropped: rows from step {step} on are not in it, "
                       f"the other sinks ({', '.join(map(repr, sinks)) or 'none'}) go on")


def close_sinks(sinks: list) -> None:
    """``close()`` on every sink (a failure warns and the rest are still closed); empties ``sinks``."""
    while sinks:
        sink = sinks.pop(0)
        try:
            sink.close()
        except Exception as exc:
            warn_fault(f"closing {sink!r}", exc, "rows already written stay as they are")
