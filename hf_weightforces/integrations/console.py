"""The console sink: one line per log event when no tracker shows the keys, a short table at train end.

Through ``logging`` (logger ``hf_weightforces.console``, INFO).  When that logger has no level of
its own it gets INFO, and when neither it nor the root logger has a handler it gets one to
stderr (as ``transformers`` does for its own logger), so the lines show in a plain script; a
script that configures logging keeps its handlers and format.  ``quiet=True`` on the callback
(``--weight_forces_quiet``, ``HF_WEIGHTFORCES_QUIET=1``) or a level above INFO on this logger
silences it.

The table's shares are over the whole run: |ΣA| / (|ΣA| + |ΣI| + |ΣD|) with each interval's mean
multiplied back by its number of budget steps, i.e. the same sums-first ratio as a row's
``align_share``, over every row of this ``train()`` call.

The closure is shown against its float32 floor (``core/health.py::closure_floor``, docs/health.md):
``closure/floor`` is the largest |closure| per step of any row over the most float32 arithmetic can
put there, so ``0.02x`` reads as what it is, and a relative closure that is large only because the
budget vanished (the last steps of a cosine schedule) no longer reads like an error.  Rows without
``norm2`` and ``inject`` (written by other tools) keep the old ``max|closure|`` (of ``closure_rel``).
The health conditions seen (``integrations/health.py``) close the table.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Mapping, Sequence

from ..core.health import closure_floor

__all__ = ["CONSOLE_LOGGER", "ConsoleSink", "console_logger", "format_line", "format_table", "tracker_shows_keys"]

CONSOLE_LOGGER = "hf_weightforces.console"
_FORCES = ("align", "inject", "decay")
_SUMMED = ("align", "inject", "decay", "delta")
_ORDER = ("transmission", "selection", "value", "embedding", "other", "matrices", "total")


def console_logger() -> logging.Logger:
    """The logger the monitor speaks through, made visible at INFO unless the user said otherwise."""
    log = logging.getLogger(CONSOLE_LOGGER)
    if log.level == logging.NOTSET:
        log.setLevel(logging.INFO)
    if not log.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[hf-weightforces] %(message)s"))
        log.addHandler(handler)
        log.propagate = False
    return log


def tracker_shows_keys(tracker_sinks: Sequence[object], to_all_integrations: bool, ordered: bool) -> bool:
    """Whether a tracker (or the Trainer's own console printer) already shows the keys: with
    ``to_all_integrations`` (and the callback placed before the reporters) they are in the
    Trainer's ``logs``, which every integration and the console printer receive; otherwise the
    trackers that have a sink of ours (W&B, TensorBoard, MLflow, trackio) get them."""
    if to_all_integrations:
        return ordered
    return bool(tracker_sinks)


def _pct(x: float) -> str:
    return f"{100 * x:5.1f}%" if math.isfinite(x) else "    -"


def _float(x) -> float:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else math.nan


def _num(x: float | None, spec: str = ".2e") -> str:
    return format(x, spec) if x is not None and math.isfinite(x) else "-"


def format_line(metrics: Mapping[str, float], step: int) -> str:
    """``weight forces step 40 (4 budget steps): total align 82.1% inject ...``, from one row."""
    get = lambda key: metrics.get(f"weightforces/total/{key}", math.nan)  # noqa: E731
    shares = " ".join(f"{k} {_pct(get(f'{k}_share')).strip()}" for k in _FORCES)
    n = int(metrics.get("weightforces/steps", 0))
    floor = closure_floor(get("norm2"), get("inject"))
    against = ""
    if math.isfinite(get("closure")) and math.isfinite(floor) and floor > 0:
        against = f" ({abs(get('closure')):.1e}/step, {abs(get('closure')) / floor:.2g}x its float32 floor)"
    line = (f"weight forces step {step} ({n} budget step{'' if n == 1 else 's'}): total {shares}; "
            f"delta {_num(get('delta'))}/step; closure {_num(get('closure_rel'))} of |A|+|I|+|D|{against}; "
            f"rms {_num(get('rms'), '.4g')}")
    for pool in ("matrices", "total"):  # the pooled fit of every weight matrix
        if f"weightforces/{pool}/weibull_k" in metrics:
            line += f"; weibull k {_num(metrics[f'weightforces/{pool}/weibull_k'], '.3f')}"
            break
    return line


class _Totals:
    """Run sums of one aggregate: forces times budget steps, the largest |closure_rel| and |closure| over
    its float32 floor, the last rms and k."""

    def __init__(self, prefix: str) -> None:
        # the row's keys of this aggregate, made once
        self.summed = [f"{prefix}/{k}" for k in _SUMMED]
        self.rel, self.closure_keys = f"{prefix}/closure_rel", [f"{prefix}/{k}" for k in ("closure", "norm2", "inject")]
        self.last = [("rms", f"{prefix}/rms"), ("k", f"{prefix}/weibull_k")]
        self.sums = dict.fromkeys(_SUMMED, 0.0)
        self.steps = 0
        self.closure = 0.0
        self.floor_ratio = math.nan  # the largest |closure| / closure_floor of a row (NaN: no row had them)
        self.rms = math.nan
        self.k = math.nan

    def add(self, row: Mapping[str, float], steps: int) -> None:
        values = [row.get(k, math.nan) for k in self.summed]
        if steps and all(v is not None and math.isfinite(v) for v in values):  # NaN rows: nonfinite steps
            for k, v in zip(_SUMMED, values):
                self.sums[k] += v * steps
            self.steps += steps
        rel = row.get(self.rel)
        if rel is not None and math.isfinite(rel):
            self.closure = max(self.closure, abs(rel))
        closure, norm2, inject = (_float(row.get(k)) for k in self.closure_keys)
        floor = closure_floor(norm2, inject)
        if math.isfinite(closure) and math.isfinite(floor) and floor > 0:
            ratio = abs(closure) / floor
            if not ratio <= self.floor_ratio:  # NaN until the first
                self.floor_ratio = ratio
        for attr, key in self.last:
            value = row.get(key)
            if value is not None and math.isfinite(value):
                setattr(self, attr, value)

    def share(self, force: str) -> float:
        budget = sum(abs(self.sums[k]) for k in _FORCES)
        return abs(self.sums[force]) / budget if budget > 0 else math.nan


def format_table(totals: Mapping[str, _Totals], last: int, rows: int, health: Sequence[str] | None = None) -> str:
    """The end-of-training table; ``health``: the conditions seen, one line each (None: not watched)."""
    names = [g for g in _ORDER if g in totals] + sorted(set(totals) - set(_ORDER))
    floored = any(math.isfinite(t.floor_ratio) for t in totals.values())
    column = "closure/floor" if floored else "max|closure|"
    head = f"{'group':<13}{'align':>8}{'inject':>8}{'decay':>8}{'delta/step':>12}{column:>14}{'rms':>10}{'k':>7}"
    steps = max(t.steps for t in totals.values())
    note = ("; closure/floor: the largest |closure| per step over its float32 floor, under 1 the budget closes"
            if floored else "")
    if health is not None and not health:
        note += "; health: no condition raised"
    lines = [f"weight forces through step {last} ({rows} rows, {steps} budget steps; shares of |A|+|I|+|D| "
             f"summed over the run{note}):", head]
    for name in names:
        t = totals[name]
        delta = t.sums["delta"] / t.steps if t.steps else math.nan
        closure = (f"{t.floor_ratio:.2g}x" if math.isfinite(t.floor_ratio) else "-") if floored else _num(t.closure)
        lines.append(f"{name:<13}{_pct(t.share('align')):>8}{_pct(t.share('inject')):>8}{_pct(t.share('decay')):>8}"
                     f"{_num(delta):>12}{closure:>14}{_num(t.rms, '.4g'):>10}{_num(t.k, '.3f'):>7}")
    if health:
        lines.append(f"health: {len(health)} condition{'' if len(health) == 1 else 's'} raised (docs/health.md; "
                     "each raise and clear is in health.jsonl):")
        lines += [f"  {line}" for line in health]
    return "\n".join(lines)


class ConsoleSink:
    """A sink (``log(metrics, step)``, ``close()``): a line per row when ``lines``, the table at close."""

    def __init__(self, lines: bool, logger: logging.Logger | None = None, health=None) -> None:
        """``health``: the run's :class:`~hf_weightforces.integrations.health.HealthWatch` (its
        ``summary_lines()`` close the table), or None."""
        self.lines = lines
        self.logger = logger or console_logger()
        self.health = health
        self.totals: dict[str, _Totals] = {}
        self.steps: list[int] = []

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        steps = int(metrics.get("weightforces/steps", 0) or 0)
        for key in metrics:
            if not key.endswith("/align"):  # (most keys: no split)
                continue
            parts = key.split("/")
            if len(parts) == 3 and not parts[1].startswith("layer_"):
                totals = self.totals.get(parts[1])
                if totals is None:
                    totals = self.totals[parts[1]] = _Totals(f"weightforces/{parts[1]}")
                totals.add(metrics, steps)
        self.steps.append(int(step))
        if self.lines:
            self.logger.info(format_line(metrics, step))

    def close(self) -> None:
        if self.totals:
            health = None
            if self.health is not None:
                try:
                    health = self.health.summary_lines()
                except Exception as exc:  # the table goes out without them
                    health = [f"(the health summary failed: {type(exc).__name__}: {exc})"]
            self.logger.info(format_table(self.totals, self.steps[-1], len(self.steps), health))
        self.totals, self.steps = {}, []
