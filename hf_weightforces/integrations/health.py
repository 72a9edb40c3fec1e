"""The live health verdicts: :class:`HealthWatch`, a sink that reads each log event's rows.

At each log event the callback's rows go through :class:`~hf_weightforces.core.health.HealthState`
(the same code ``hf-weightforces diagnose RUN_DIR`` runs on the records afterwards).  Each raise
and each clear goes

* as one JSON line to ``<output_dir>/<output_subdir>/health.jsonl``: ``step``, ``condition``,
  ``aggregate``, ``state`` (raised / cleared), ``value``, ``threshold``, ``message``;
* to the console: one ``logging.warning`` line per condition and log event (logger
  ``hf_weightforces.health``), naming every aggregate it concerns, the reason and the remedy;
* to W&B as an alert (``wandb.alert``) when a W&B run is active (WARN for a raise, ERROR for
  ``nonfinite``, INFO for a clear).

Nothing here can stop training: each of the three outputs is guarded on its own (a failure warns
once and that output alone is lost), and the sink itself is guarded by ``log_to_sinks``.  A resumed
run keeps the file's lines up to the resume step and replays ``metrics.jsonl`` up to there, so a
condition raised before the checkpoint is not raised a second time; lines it drops (and a previous
run's, for a fresh run in the same folder) are copied beside the metrics rows that
``continue_records`` keeps in ``previous/<n>/``.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path

from ..core.health import CONDITIONS, HealthEvent, HealthState, fmt_value, format_summary, worse
from ..core.records import read_jsonl, read_rows
from .guard import Faults

__all__ = ["HEALTH_FILE", "HEALTH_LOGGER", "HealthWatch"]

HEALTH_FILE = "health.jsonl"
HEALTH_LOGGER = "hf_weightforces.health"


class HealthWatch:
    """A sink (``log(metrics, step)``, ``close()``) that raises and clears the health conditions.

    ``folder``: where ``health.jsonl`` goes (None: no file); ``resume_step``: the step a resumed run
    continues from (0: a fresh run, the file starts empty); ``decay_rule``: how the optimizer applies
    weight decay (``budget_info``'s ``decay_rule``; None: AdamW's)."""

    def __init__(self, folder: str | Path | None, resume_step: int = 0, logger: logging.Logger | None = None,
                 decay_rule: str | None = None) -> None:
        self.state = HealthState(decay_rule=decay_rule)
        self.logger = logger or logging.getLogger(HEALTH_LOGGER)
        self.path = None if folder is None else Path(folder) / HEALTH_FILE
        self._faults = Faults()
        if self.path is not None:
            with self._faults.guard("health-file", f"preparing {self.path}", "health events are not written to it"):
                self._prepare(int(resume_step))

    def __repr__(self) -> str:
        return f"HealthWatch({str(self.path) if self.path else None!r})"

    def _prepare(self, resume_step: int) -> None:
        """Keep the lines up to ``resume_step`` (none for a fresh run); replay the metrics rows up to
        there so that the state (raised conditions, the run's decay sums) continues."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if self.path.is_file():
            rows = read_rows(self.path)
            kept = [row for row in rows.rows if row["step"] <= resume_step]
            if len(kept) < len(rows.rows) + rows.skipped:
                _keep_beside_previous_records(self.path)
        self.path.write_text("".join(json.dumps(row) + "\n" for row in kept), encoding="utf-8")
        metrics = self.path.parent / "metrics.jsonl"
        if resume_step > 0 and metrics.is_file():
            self.state.feed(row for row in read_jsonl(metrics, strict=False) if row["step"] <= resume_step)

    # ------------------------------------------------------------------ the sink
    def log(self, metrics: Mapping[str, float], step: int) -> None:
        events = self.state.update(metrics, step)
        if not events:
            return
        if self.path is not None:
            with self._faults.guard("health-file", f"writing {self.path}", "later health events are not in it"):
                with open(self.path, "a", encoding="utf-8") as f:
                    f.write("".join(json.dumps(e.to_json(), allow_nan=False) + "\n" for e in events))
        for (name, state), group in _grouped(events).items():
            line = _line(name, state, group)
            with self._faults.guard("health-console", "printing a health line", "later health lines are not printed"):
                self.logger.warning(line)
            with self._faults.guard("health-wandb", "sending a W&B alert", "later health alerts are not sent"):
                _alert(name, state, line)

    def close(self) -> None:
        pass  # nothing is held open

    def summary_lines(self) -> list[str]:
        """The conditions seen (one line each), for the end-of-training table; empty when none."""
        return format_summary(self.state)


def _keep_beside_previous_records(path: Path) -> None:
    """The lines a fresh or resumed run drops go where ``continue_records`` just put the metrics rows
    they came from (the newest ``previous/<n>/``), unless that already holds a copy."""
    from .runfiles import PREVIOUS_DIR

    folders = [d for d in (path.parent / PREVIOUS_DIR).glob("*") if d.is_dir() and d.name.isdigit()]
    if folders:
        newest = max(folders, key=lambda d: int(d.name))
        if not (newest / path.name).exists():
            shutil.copyfile(path, newest / path.name)


def _grouped(events: list[HealthEvent]) -> dict[tuple[str, str], list[HealthEvent]]:
    out: dict[tuple[str, str], list[HealthEvent]] = {}
    for e in events:
        out.setdefault((e.condition, e.state), []).append(e)
    return out


def _line(name: str, state: str, group: list[HealthEvent]) -> str:
    """One console line for one condition at one log event: every aggregate it concerns, the worst value."""
    c = CONDITIONS[name]
    worst = group[0]
    for e in group[1:]:
        if worse(name, e.value, worst.value):
            worst = e
    where = ", ".join(e.aggregate for e in group)
    value = fmt_value(name, worst.value) + (f" on {worst.aggregate}" if len(group) > 1 else "")
    if state == "raised":
        return (f"weight forces health: {name} raised at step {worst.step} on {where} ({value}): {c.reason}. "
                f"Remedy: {c.remedy}")
    return f"weight forces health: {name} cleared at step {worst.step} on {where} ({value})"


def _alert(name: str, state: str, text: str) -> None:
    """``wandb.alert`` when a W&B run is active; wandb is never imported here (a run that uses it has)."""
    wandb = sys.modules.get("wandb")
    if wandb is None or getattr(wandb, "run", None) is None:
        return
    level = "INFO" if state == "cleared" else ("ERROR" if name == "nonfinite" else "WARN")
    title = f"weight forces: {name}" + (" cleared" if state == "cleared" else "")
    wandb.alert(title=title[:63], text=text, level=level, wait_duration=1)
