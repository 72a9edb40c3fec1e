"""``hf-weightforces diagnose RUN_DIR``: the health verdicts of a run, from its records (docs/health.md).

The callback's rows (``RUN_DIR/weightforces/metrics.jsonl``) go through the same
:class:`~hf_weightforces.core.health.HealthState` as at each live log event, in step order, so the
verdicts are those the run raised (``health.jsonl``), also for runs recorded before the live verdicts
existed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from hf_weightforces.analysis.checkpoints import CheckpointError, PathLike, weight_files
from hf_weightforces.analysis.records import METRICS_FILE, PARAMS_FILE, RECORDS_SUBDIR, read_metrics
from hf_weightforces.core.health import CONDITIONS, MULTIPLICATIVE, HealthState, fmt_value, format_summary

__all__ = ["RunHealth", "records_of", "run_health"]


def records_of(path: PathLike) -> Path | None:
    """The ``metrics.jsonl`` of a run folder (or of its records folder itself); None when there is none."""
    p = Path(path)
    for candidate in (p / RECORDS_SUBDIR / METRICS_FILE, p / METRICS_FILE):
        if candidate.is_file():
            return candidate
    return None


@dataclass
class RunHealth:
    """The verdicts of one run's records, and whether the folder also holds weights to diagnose."""

    metrics: Path
    rows: int
    state: HealthState
    has_weights: bool

    def text(self) -> str:
        s = self.state
        first = s.events[0].step if s.events else None
        head = (f"health of {self.metrics} ({self.rows} rows through step {s.last_step}; conditions and thresholds: "
                "docs/health.md):")
        if first is None:
            unread = "" if s.decay_rule in MULTIPLICATIVE else \
                f" (decay_not_applied is not read: the optimizer's decay is {s.decay_rule}, docs/optimizers.md)"
            return head + "\n  no condition raised" + unread
        lines = [head] + [f"  step {e.step:>6}  {e.state:<7}  {e.condition} on {e.aggregate}: {fmt_value(e.condition, e.value)}"
                          for e in s.events]
        lines.append("conditions (each raise's full message is in health.jsonl, or --json):")
        for line in format_summary(s):
            name = line.split(":", 1)[0]
            lines.append(f"  {line}")
            lines.append(f"    why: {CONDITIONS[name].reason}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"metrics": str(self.metrics), "rows": self.rows, **self.state.to_dict()}


def _decay_rule(params: Path) -> str | None:
    """How the run's optimizer applied weight decay (params.json ``budget.decay_rule``); None when not said."""
    try:
        rule = json.loads(params.read_text(encoding="utf-8"))["budget"]["decay_rule"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return rule if isinstance(rule, str) else None


def run_health(path: PathLike) -> RunHealth | None:
    """The health verdicts of the run at ``path`` (a Trainer output_dir or its ``weightforces/``
    folder), or None when it holds no ``metrics.jsonl``.  Raises
    :class:`~hf_weightforces.analysis.records.RecordError` for a file with no usable row."""
    metrics = records_of(path)
    if metrics is None:
        return None
    rows = read_metrics(metrics)
    state = HealthState(decay_rule=_decay_rule(metrics.parent / PARAMS_FILE)).feed(rows)
    try:
        weight_files(path)
        has_weights = True
    except CheckpointError:
        has_weights = False
    return RunHealth(metrics, len(rows), state, has_weights)
