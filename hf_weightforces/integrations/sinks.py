"""Where metric rows go.  A sink has two methods, ``log(metrics, step)`` and ``close()``;
ranks that must not write get :class:`NullSink`, so no call site checks the rank."""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

from ..core.records import read_jsonl

__all__ = ["JsonlSink", "NullSink", "Sink", "WandbSink", "read_jsonl"]


logger = logging.getLogger(__name__)


class Sink(Protocol):
    def log(self, metrics: Mapping[str, float], step: int) -> None: ...

    def close(self) -> None: ...


class NullSink:
    def log(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def close(self) -> None:
        pass


def _json_value(v):
    """Numbers as floats, non-finite as null (strict JSON has no NaN/inf), lists element-wise."""
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return v
    if isinstance(v, (list, tuple)):
        return [_json_value(x) for x in v]
    v = float(v)
    return v if math.isfinite(v) else None


class JsonlSink:
    """``{"step": global_step, ...}`` per row, flushed as written.

    On resume (``resume_step`` > 0) rows after the resume point are dropped first, so a resumed
    run continues the file without duplicated steps; a fresh run (``resume_step`` 0) starts it anew.
    """

    def __init__(self, path: str | os.PathLike, resume_step: int = 0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept: list[str] = []
        if resume_step > 0 and self.path.exists():
            for row in read_jsonl(self.path, strict=False):
                if row.get("step", math.inf) <= resume_step:
                    kept.append(json.dumps(row))
        with open(self.path, "w", encoding="utf-8") as f:
            f.writelines(line + "\n" for line in kept)
        self._f = open(self.path, "a", encoding="utf-8")

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        row = {"step": int(step), **{k: _json_value(v) for k, v in metrics.items()}}
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()


class WandbSink:
    """Adds the metrics to the W&B row that the Trainer's ``WandbCallback`` is about to commit.

    ``wandb.log(..., commit=False)`` from a callback that runs *before* ``WandbCallback`` puts the
    keys, under their own names, into the same row as ``train/loss`` at the same
    ``train/global_step`` (DISTRIBUTED.md, "W&B offline").  If the callback could not be placed
    before it (``ordered=False``), the row is logged on its own with ``train/global_step`` set,
    which costs W&B one extra internal step per log event.
    """

    def __init__(self, ordered: bool) -> None:
        self.ordered = ordered

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        import wandb

        if wandb.run is None:
            return
        if self.ordered:
            wandb.log(dict(metrics), commit=False)
        else:
            wandb.log({**metrics, "train/global_step": step})

    def close(self) -> None:
        pass
