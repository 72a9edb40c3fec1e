"""What the W&B sink keeps between rows: heat-map history, the run's summary values, the keys it
logged, and the media it makes from them (heat maps, tables, the report's figures).

Everything here runs on the main process only, inside the sink; each optional piece (an image, a
table, the figures) fails alone with one warning, and the scalar charts go on.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ..core.groups import GROUPS, TOTAL
from .guard import Faults
from .wandb_layout import SECTIONS, Dashboard, place

__all__ = ["DashboardWriter", "Grids", "RunSummary", "KEYS_FILE"]

logger = logging.getLogger(__name__)

#: Written beside metrics.jsonl: every W&B key the run logged (``hf-weightforces wandb-view --keys-from``).
KEYS_FILE = "wandb_keys.json"


class Grids:
    """Per-index values over steps, for heat maps: ``(family, quantity) -> {row: value}`` per step.

    At most ``max_columns`` steps are kept: past that every second one is dropped (the last is
    always kept), so the history of a long run stays bounded and evenly thinned.  Per-head values
    keep their latest event only.
    """

    def __init__(self, max_columns: int = 256) -> None:
        self.max_columns = max_columns
        self.columns: list[tuple[int, dict[tuple[str, str], dict[str, float]]]] = []
        self.heads: dict[str, tuple[int, dict[str, float]]] = {}  # quantity -> (step, {layer/head: v})
        self.rows: dict[str, dict[str, None]] = {}  # family -> rows in first-seen order

    def add(self, step: int, cells: list[tuple[str, str, str, float]], heads: list[tuple[str, str, float]]) -> None:
        column: dict[tuple[str, str], dict[str, float]] = {}
        for family, row, quantity, value in cells:
            column.setdefault((family, quantity), {})[row] = value
            self.rows.setdefault(family, {})[row] = None
        if column:
            self.columns.append((step, column))
            if len(self.columns) > self.max_columns:
                keep = self.columns[-1]
                self.columns = self.columns[:-1][::2] + [keep]
        fresh: dict[str, dict[str, float]] = {}
        for row, quantity, value in heads:
            fresh.setdefault(quantity, {})[row] = value
        for quantity, values in fresh.items():
            self.heads[quantity] = (step, values)

    def quantities(self) -> list[tuple[str, str]]:
        seen: dict[tuple[str, str], None] = {}
        for _, column in self.columns:
            seen.update(dict.fromkeys(column))
        return list(seen)

    def grid(self, family: str, quantity: str) -> tuple[np.ndarray, list[str], np.ndarray]:
        """(steps, rows, values[rows, steps]) of the steps that hold the quantity; NaN where absent."""
        cols = [(s, c[(family, quantity)]) for s, c in self.columns if (family, quantity) in c]
        rows = list(self.rows.get(family, {}))
        rows = [r for r in rows if any(r in values for _, values in cols)]
        data = np.full((len(rows), len(cols)), np.nan)
        for j, (_, values) in enumerate(cols):
            for i, r in enumerate(rows):
                v = values.get(r)
                data[i, j] = np.nan if v is None else float(v)
        return np.array([s for s, _ in cols], dtype=np.int64), rows, data

    def table(self, family: str) -> tuple[list[str], list[list]]:
        """Long format: one line per (step, row) with every quantity of the family as a column."""
        quantities = [q for f, q in self.quantities() if f == family]
        lines = []
        for step, column in self.columns:
            for row in self.rows.get(family, {}):
                values = [column.get((family, q), {}).get(row) for q in quantities]
                if any(v is not None for v in values):
                    lines.append([step, row] + [_finite_or_none(v) for v in values])
        return ["step", "layer" if family == "layers" else "tensor", *quantities], lines


def _finite_or_none(v) -> float | None:
    return None if v is None or not math.isfinite(float(v)) else float(v)


_AGGREGATES = frozenset((*GROUPS, "matrices", "adapters", TOTAL))
_FINAL_FIELDS = ("align_share", "inject_share", "decay_share", "weibull_k", "weibull_scale", "weibull_scale_over_rms", "rms")


class RunSummary:
    """Values that say how the run went, for the W&B summary (``final/...``): the last shares, the
    last Weibull fit of each pool, the worst closure (and rounding) over the run, step counts."""

    def __init__(self) -> None:
        self.last: dict[str, float] = {}
        self.worst: dict[str, tuple[float, str, int]] = {}  # field -> (|value|, aggregate, step)
        self.counts = {"skipped_steps": 0.0, "nonfinite_steps": 0.0, "budget_steps": 0.0}
        self.last_step = 0

    def add(self, metrics: Mapping[str, float], step: int) -> None:
        self.last_step = max(self.last_step, int(step))
        for key, value in metrics.items():
            parts = key.split("/")
            if value is None or not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            if len(parts) == 2 and parts[1] in ("skipped_steps", "steps"):
                self.counts["skipped_steps" if parts[1] == "skipped_steps" else "budget_steps"] += value
            if len(parts) != 3 or parts[1] not in _AGGREGATES:
                continue
            agg, field = parts[1], parts[2]
            if field in ("start_weibull_k", "start_weibull_scale"):  # the fit at the first step, until a later one
                field = field[len("start_"):]
            if field in _FINAL_FIELDS:
                self.last[f"final/{agg}/{field}"] = float(value)
            elif field in ("closure_rel", "rounding") and abs(value) >= self.worst.get(field, (-1.0,))[0]:
                self.worst[field] = (abs(float(value)), agg, int(step))
            elif field == "nonfinite_steps" and agg == TOTAL:
                self.counts["nonfinite_steps"] += value

    def values(self) -> dict[str, float | str]:
        out: dict[str, float | str] = dict(self.last)
        for field, (value, agg, step) in self.worst.items():
            name = "closure" if field == "closure_rel" else field
            out[f"final/worst_{field}"] = value
            out[f"final/worst_{name}_aggregate"] = agg
            out[f"final/worst_{name}_step"] = step
        out.update({f"final/{k}": v for k, v in self.counts.items()})
        out["final/last_step"] = self.last_step
        return out


class DashboardWriter:
    """The state behind :class:`~hf_weightforces.integrations.sinks.WandbSink`.

    ``row(wandb, metrics, step)`` returns what to log for one ``metrics.jsonl`` row (renamed
    scalars, and the heat maps when due); ``finish(wandb)`` returns the final media row and sets the
    summary.  ``records`` is the folder of ``metrics.jsonl`` (the figures are drawn from it, and the
    logged keys are written there as ``wandb_keys.json``).
    """

    def __init__(self, dashboard: Dashboard | None = None, records: str | Path | None = None) -> None:
        self.dashboard = dashboard or Dashboard()
        self.records = None if records is None else Path(records)
        self.grids = Grids(self.dashboard.max_columns)
        self.summary = RunSummary()
        self.logged: set[str] = set()
        self.config: dict[str, float] = {}
        self.faults = Faults()
        self._defined: set[str] = set()
        self._next_heatmap = self.dashboard.heatmap_every or math.inf
        self._next_figures = self.dashboard.figures_every or math.inf
        self._written = 0

    # ------------------------------------------------------------------ per row
    def row(self, wandb, metrics: Mapping[str, float], step: int) -> dict:
        scalars: dict[str, float] = {}
        cells, heads, config = [], [], {}
        for key, value in metrics.items():
            p = place(key)
            if p.kind == "scalar":
                scalars[p.key] = value
            elif p.kind == "config":
                if self.config.get(p.key) != value:
                    config[p.key] = value
            else:
                (cells.append((p.family, p.row, p.quantity, value)) if p.kind == "grid"
                 else heads.append((p.row, p.quantity, value)))
                if self.dashboard.layer_scalars:
                    scalars[p.key] = value
        self.summary.add(metrics, step)
        self.grids.add(int(step), cells, heads)
        if config:
            self.config.update(config)
            with self.faults.guard("config", "W&B config update", "the constants are missing from the run config"):
                wandb.config.update({"weightforces": dict(self.config)}, allow_val_change=True)
        row: dict = dict(scalars)
        if step >= self._next_heatmap:
            self._next_heatmap = (step // self.dashboard.heatmap_every + 1) * self.dashboard.heatmap_every
            row.update(self.heatmaps(wandb))
        if self.dashboard.figures and step >= self._next_figures:
            self._next_figures = (step // self.dashboard.figures_every + 1) * self.dashboard.figures_every
            row.update(self.figures(wandb))
        self.define(wandb, row)
        self.note_logged(row)
        return row

    def define(self, wandb, row: Mapping) -> None:
        """Every section plots against ``train/global_step`` (``step_sync``: rows without it take the last)."""
        sections = {k.split("/")[0] for k in row} - self._defined
        if not sections:
            return
        with self.faults.guard("define_metric", "W&B define_metric", "some charts use W&B's own step axis"):
            if "train/global_step" not in self._defined:
                wandb.define_metric("train/global_step")
                self._defined.add("train/global_step")
            for section in sorted(sections):
                wandb.define_metric(f"{section}/*", step_metric="train/global_step", step_sync=True)
            self._defined |= sections

    def note_logged(self, keys) -> None:
        fresh = set(keys) - self.logged
        if not fresh:
            return
        self.logged |= fresh
        if self.records is not None:
            with self.faults.guard("keys", f"writing {KEYS_FILE}", "wandb-view --keys-from cannot read this run"):
                data = {"sections": {s: SECTIONS[s] for s in SECTIONS}, "keys": sorted(self.logged)}
                (self.records / KEYS_FILE).write_text(json.dumps(data, indent=1) + "\n")

    # ------------------------------------------------------------------ media
    def heatmaps(self, wandb) -> dict:
        """One image per per-index quantity (when matplotlib is there) and one table per family."""
        out: dict = {}
        families = sorted({f for f, _ in self.grids.quantities()})
        for family in families:
            with self.faults.guard(f"table/{family}", f"the {family} table for W&B", "no table this time"):
                columns, lines = self.grids.table(family)
                if lines:
                    out[f"{family}/table"] = wandb.Table(columns=columns, data=lines)
        try:
            from ..analysis.plotstyle import heatmap_image
        except ImportError:  # matplotlib absent: the tables alone
            return out
        for family, quantity in self.grids.quantities():
            with self.faults.guard("heatmap", f"the heat map of {family}/{quantity}", "no heat map this time"):
                steps, rows, data = self.grids.grid(family, quantity)
                finite = data[np.isfinite(data)]
                if finite.size and np.ptp(finite) > 0:  # a constant (no non-finite steps) is in the table only
                    image = heatmap_image(steps, rows, data, quantity, family)
                    row_label = family[:-1] if family == "layers" else "tensor"
                    caption = f"{quantity}: row = {row_label}, column = optimizer step"
                    out[f"{family}/{quantity}"] = wandb.Image(image, caption=caption)
        for quantity, (step, values) in self.grids.heads.items():
            with self.faults.guard("heatmap", f"the per-head map of {quantity}", "no per-head map this time"):
                image = _heads_image(quantity, step, values)
                if image is not None:
                    out[f"layers/{quantity}"] = wandb.Image(image, caption=f"{quantity} per layer and head at step {step}")
        return out

    def figures(self, wandb) -> dict:
        """The report's figures (no checkpoints) drawn from ``metrics.jsonl``."""
        if self.records is None or not (self.records / "metrics.jsonl").is_file():
            return {}
        out: dict = {}
        with self.faults.guard("figures", "drawing the report's figures for W&B", "the run has no figures"):
            from ..analysis.report import write_report

            report = write_report(self.records, out_dir=self.records / "report", checkpoints=False, spline=False,
                                  formats=("png",))
            for name, caption in report.figures.items():
                out[f"figures/{Path(name).stem}"] = wandb.Image(str(report.out_dir / name), caption=caption)
        return out

    def finish(self, wandb) -> dict:
        """The last heat maps, tables and figures (one row), and the run's summary values."""
        row = self.heatmaps(wandb)
        if self.dashboard.figures:
            row.update(self.figures(wandb))
        final = self.summary.values()
        with self.faults.guard("summary", "W&B summary update", "the summary keeps W&B's own last values"):
            wandb.run.summary.update(final)
        self.define(wandb, row)
        self.note_logged(list(row) + list(final))
        return row


_HEAD_ROW = re.compile(r"^(.*)/head_(\d+)$")


def _heads_image(quantity: str, step: int, values: Mapping[str, float]):
    from ..analysis.plotstyle import heatmap_image

    cells = {}
    for key, value in values.items():
        m = _HEAD_ROW.match(key)
        if m:
            cells[(m.group(1), int(m.group(2)))] = value
    if not cells:
        return None
    layers = list(dict.fromkeys(layer for layer, _ in cells))
    heads = sorted({h for _, h in cells})
    data = np.array([[cells.get((layer, h), np.nan) for h in heads] for layer in layers], dtype=np.float64)
    return heatmap_image(np.array(heads), layers, data, f"{quantity} (step {step})", "layers", x_label="head")
