"""Figures of a run for a paper or a notebook, and a Markdown summary linking them.

``write_report(run_dir)`` reads ``<run_dir>/weightforces/metrics.jsonl`` (the callback's rows) and,
when there are checkpoints, fits λ(t) over them (:mod:`~hf_weightforces.analysis.scale`) and runs
the spline estimators (:mod:`~hf_weightforces.analysis.spline`).  It writes PNG figures:

=================  ============================================================================
``forces.png``     A, I, D, R per optimizer step over training, one panel per class and total
``shares.png``     shares |A|, |I|, |D| of the absolute budget over training
``balance.png``    A + D approaching balance: (A + D) / (|A| + |D|) per class, and A beside -D
``weibull.png``    k, λ, σ and λ/σ per class: live fits (lines) and checkpoint fits (markers)
``layers.png``     per-layer heat maps of A per weight and of the alignment share
``offset.png``     RMS-to-Weibull offset components (integration, bridges, totals) per class
``spline.png``     A from checkpoints (spline, corrected, two-point) against the logged truth
``backbone.png``   the AdamW backbone per class: captured fraction and stability beside their
                   random-walk nulls, per-step |cos| of updates and gradients against the floor
``ranks.png``      key-query rank collapse per layer (stable rank, top share) and layer means
=================  ============================================================================

and ``summary.md`` with the run's numbers and links to every figure.  A figure whose data the run
does not have (no layer rows, no Weibull events, fewer than four checkpoints, no probes) is left out and the
summary says why.  Beside each PNG go PDF and SVG copies (``formats``); ``style="paper"`` draws for
one journal column.  The drawing is in :mod:`~hf_weightforces.analysis.figures` and
:mod:`~hf_weightforces.analysis.figures_geometry`, colours and sizes in
:mod:`~hf_weightforces.analysis.plotstyle`; matplotlib is imported there only, through its object
API (no pyplot state).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hf_weightforces.analysis.figures import (
    column,
    fig_balance,
    fig_forces,
    fig_layers,
    fig_offset,
    fig_shares,
    fig_spline,
    fig_weibull,
)
from hf_weightforces.analysis.figures_geometry import RANK_KINDS, backbone_classes, fig_backbone, fig_ranks
from hf_weightforces.analysis.records import RecordError, Schedule, read_records
from hf_weightforces.core.groups import GROUPS, TOTAL

__all__ = ["FIGURES", "Report", "write_report"]

log = logging.getLogger(__name__)

PREFIX = "weightforces"
#: file -> title, in the order the summary lists them.
FIGURES: dict[str, str] = {
    "forces.png": "Force budget per optimizer step",
    "shares.png": "Shares of the absolute budget",
    "balance.png": "Alignment and decay approaching balance",
    "weibull.png": "Weibull shape k, scale λ, RMS σ and λ/σ",
    "layers.png": "Per-layer alignment",
    "offset.png": "RMS-to-Weibull offset components",
    "spline.png": "Alignment from checkpoints against the logged truth",
    "backbone.png": "The AdamW backbone against its random-walk null",
    "ranks.png": "Key-query rank collapse and condensation",
}
@dataclass
class Report:
    """What :func:`write_report` wrote: figure paths with captions, the summary, and what it skipped."""

    out_dir: Path
    figures: dict[str, str] = field(default_factory=dict)  # file name -> caption
    skipped: dict[str, str] = field(default_factory=dict)  # file name -> reason
    summary: Path | None = None


# ----------------------------------------------------------------------------------------------
# Reading the rows
# ----------------------------------------------------------------------------------------------


def _aggregates(rows: Sequence[dict]) -> tuple[list[str], list[str]]:
    """Classes (in class order, then total) and layers that the rows hold forces for."""
    keys = set().union(*(r.keys() for r in rows))
    classes = [g for g in (*GROUPS, TOTAL) if f"{PREFIX}/{g}/align" in keys]
    layers = sorted(k.split("/")[1] for k in keys if k.endswith("/align")
                    and k.split("/")[1].startswith(("layer_", "encoder_layer_", "decoder_layer_")))
    return classes, layers


# ----------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------


def write_report(
    run_dir: str | os.PathLike,
    *,
    out_dir: str | os.PathLike | None = None,
    checkpoints: bool = True,
    spline: bool = True,
    sample_size: int | None = None,
    seed: int = 0,
    keep_every: int = 0,
    flags_schedule: Schedule | None = None,
    dpi: int | None = None,
    style: str = "default",
    formats: Sequence[str] = ("png", "pdf", "svg"),
) -> Report:
    """Write every figure the run has data for, and ``summary.md``, into ``out_dir``
    (default ``<run_dir>/weightforces/report``).  ``style``: ``default`` (screen) or ``paper`` (one
    journal column, 300 dpi); ``formats``: the files written per figure (PNG, and PDF/SVG vector
    copies beside it); ``dpi`` overrides the style's.  Raises :class:`RecordError` when the run has
    no ``metrics.jsonl``."""
    from hf_weightforces.analysis import plotstyle

    if style not in plotstyle.STYLES:
        raise ValueError(f"unknown style {style!r}; choose one of {sorted(plotstyle.STYLES)}")
    bad = sorted(set(formats) - {"png", "pdf", "svg"})
    if bad or "png" not in formats:
        raise ValueError(f"formats must include png and be among png, pdf, svg; got {list(formats)}")
    from hf_weightforces.analysis.spline import DEFAULT_SAMPLE, MIN_CHECKPOINTS, analyze

    run_dir = Path(run_dir)
    records = read_records(run_dir)
    if not records.metrics:
        raise RecordError(f"{run_dir}: no weightforces/metrics.jsonl (train with WeightForcesCallback first)")
    rows = records.metrics
    classes, layers = _aggregates(rows)
    if not classes:
        raise RecordError(f"{records.folder}/metrics.jsonl holds no force rows")
    out = Path(out_dir) if out_dir is not None else records.folder / "report"
    out.mkdir(parents=True, exist_ok=True)
    report = Report(out)
    ckpts = sorted(run_dir.glob("checkpoint-*"))

    trajectory = None
    if checkpoints and ckpts:
        from hf_weightforces.analysis.scale import scale_trajectory

        trajectory = scale_trajectory([run_dir], per_matrix=False, keep_every=keep_every)
    spline_report, spline_reason = None, "turned off"
    if spline and checkpoints:
        try:
            spline_report = analyze([run_dir], flags_schedule=flags_schedule, seed=seed, keep_every=keep_every,
                                    sample_size=DEFAULT_SAMPLE if sample_size is None else sample_size)
            spline_reason = "" if spline_report.accuracy else "metrics.jsonl has no rows between the checkpoints"
        except RecordError as exc:
            spline_reason = str(exc) if ckpts else f"no checkpoint-N folders (need at least {MIN_CHECKPOINTS})"

    makers = {
        "forces.png": lambda save, st: fig_forces(rows, classes, save, st),
        "shares.png": lambda save, st: fig_shares(rows, classes, save, st),
        "balance.png": lambda save, st: fig_balance(rows, classes, save, st),
        "weibull.png": lambda save, st: fig_weibull(rows, trajectory, save, st),
        "layers.png": lambda save, st: fig_layers(rows, layers, save, st),
        "offset.png": lambda save, st: fig_offset(rows, save, st),
        "spline.png": lambda save, st: fig_spline(spline_report, save, st),
        "backbone.png": lambda save, st: fig_backbone(rows, save, st),
        "ranks.png": lambda save, st: fig_ranks(rows, save, st),
    }
    reasons = {
        "weibull.png": "no Weibull events in metrics.jsonl (weibull_every=0) and no checkpoints",
        "balance.png": "no class has weight decay (D = 0 everywhere)",
        "layers.png": "no per-layer rows in metrics.jsonl (train with per_layer=True)",
        "offset.png": "no offset keys in metrics.jsonl (they come with the Weibull events)",
        "spline.png": spline_reason,
        "backbone.png": "no backbone keys in metrics.jsonl (train with BackboneProbe, "
                        "--weight_forces_backbone_every N)",
        "ranks.png": "no rank keys in metrics.jsonl (train with RankProbe, --weight_forces_rank_every N)",
    }
    for name, make in makers.items():
        with plotstyle.style(style) as st:
            caption = make(lambda fig, path=out / name, st=st: plotstyle.save(fig, path, dpi or st.dpi, formats), st)
        if caption is None:
            report.skipped[name] = reasons.get(name, "no data")
        else:
            report.figures[name] = caption
    report.summary = out / "summary.md"
    report.summary.write_text(_summary(run_dir, records, rows, classes, layers, trajectory, spline_report, report))
    return report


def _fmt(x: float, spec: str = ".3g") -> str:
    return "–" if x is None or not math.isfinite(x) else format(x, spec)


def _summary(run_dir, records, rows, classes, layers, trajectory, spline_report, report: Report) -> str:
    last = rows[-1]
    lines = [f"# Weight forces: {run_dir.name}", "",
             f"{len(rows)} logged rows, optimizer steps {rows[0]['step']}–{last['step']}; "
             f"classes {', '.join(classes)}; {len(layers)} layers with rows.", ""]
    lines += ["## Over the whole run", "",
              "| class | mean A | mean I | mean D | share A | share I | share D | σ at end |",
              "|---|---|---|---|---|---|---|---|"]
    for g in classes:
        vals = {k: column(rows, f"{PREFIX}/{g}/{k}")[1] for k in ("align", "inject", "decay", "rms")}
        if vals["align"].size == 0:
            continue
        a, i, d = (float(np.mean(vals[k])) for k in ("align", "inject", "decay"))
        budget = abs(a) + abs(i) + abs(d)
        shares = [abs(x) / budget if budget else math.nan for x in (a, i, d)]
        lines.append(f"| {g} | {_fmt(a)} | {_fmt(i)} | {_fmt(d)} | "
                     + " | ".join(_fmt(s, ".1%") for s in shares)
                     + f" | {_fmt(float(vals['rms'][-1]) if vals['rms'].size else math.nan, '.4g')} |")
    lines += ["", "Means are over logged rows (each a mean per step); shares of the summed magnitudes.", ""]
    if spline_report is not None and spline_report.accuracy:
        f = spline_report.forces
        lines += ["## Alignment from checkpoints", "",
                  f"{len(f.checkpoint_steps)} checkpoints (steps {', '.join(map(str, f.checkpoint_steps))}); "
                  f"lr and weight decay: {f.schedule_source}; {f.sampled:,} of {f.total:,} coordinates.", "",
                  "| class | estimator | median per row | median per checkpoint interval | pooled |",
                  "|---|---|---|---|---|"]
        by = {(a.aggregate, a.estimator, a.resolution): a for a in spline_report.accuracy}
        for (g, est, res), a in by.items():
            if res == "row":
                c = by.get((g, est, "checkpoint"))
                lines.append(f"| {g} | {est} | {_fmt(a.median, '.3f')} | "
                             f"{_fmt(c.median, '.3f') if c else '–'} | {_fmt(a.pooled, '.3f')} |")
        lines += ["", "estimate / true A; `interval_oracle` spreads the true sum of each checkpoint interval over "
                  "its rows by lr: no estimator that sees only the checkpoints can resolve more.", ""]
    if trajectory is not None:
        lines += ["## Weibull fits of the checkpoints", "", "| class | step | k | λ | σ | λ/σ |", "|---|---|---|---|---|---|"]
        for g in trajectory.names("group"):
            steps, k, lam, sigma = trajectory.series(g)
            for j in (0, steps.size - 1) if steps.size > 1 else (0,):
                lines.append(f"| {g} | {steps[j]} | {k[j]:.4f} | {lam[j]:.4g} | {sigma[j]:.4g} | {lam[j] / sigma[j]:.4f} |")
        lines.append("")
    lines += _geometry_summary(rows)
    lines += ["## Figures", ""]
    for name, caption in report.figures.items():
        lines += [f"### {FIGURES[name]}", "", f"![{FIGURES[name]}]({name})", "", caption, ""]
    if report.skipped:
        lines += ["## Not drawn", ""]
        lines += [f"- `{name}`: {reason}" for name, reason in report.skipped.items()]
        lines.append("")
    return "\n".join(lines)


def _geometry_summary(rows) -> list[str]:
    """The backbone at its last estimate and the layer-mean ranks at the first and last pass."""
    lines: list[str] = []
    names = [g for g in backbone_classes(rows) if column(rows, f"{PREFIX}/backbone/{g}/fraction")[0].size]
    if names:
        lines += ["## Trajectory geometry: the backbone", "",
                  "| class | step | fraction | null | score | stability | null | update \\|cos\\| | gradient \\|cos\\| | floor |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for g in names:
            key = f"{PREFIX}/backbone/{g}/"
            cols = {k: column(rows, key + k)[1] for k in ("fraction", "fraction_null", "fraction_score", "stability",
                                                            "stability_null", "update_cos", "grad_cos", "cos_floor")}

            def at(k: str, mean: bool = False, cols=cols) -> float:
                v = cols[k]
                return math.nan if v.size == 0 else float(np.mean(v)) if mean else float(v[-1])

            step = column(rows, key + "fraction")[0][-1]
            lines.append(f"| {g} | {step} | {_fmt(at('fraction'), '.4f')} | "
                         f"{_fmt(at('fraction_null'), '.4f')} | {_fmt(at('fraction_score'), '.3f')} | "
                         f"{_fmt(at('stability'), '.4f')} | {_fmt(at('stability_null'), '.4f')} | "
                         f"{_fmt(at('update_cos', True))} | {_fmt(at('grad_cos', True))} | {_fmt(at('cos_floor'))} |")
        lines += ["", ("Fraction, score and stability at the last estimate (stability needs two); |cos| are means "
                       "over the logged rows, beside the floor of an independent direction."), ""]
    kinds = [(k, label) for k, label, _ in RANK_KINDS if column(rows, f"{PREFIX}/rank/all/{k}/stable_rank")[0].size]
    if kinds:
        lines += ["## Trajectory geometry: ranks (means over layers)", "",
                  "| matrices | first step | stable rank | top share | last step | stable rank | top share |",
                  "|---|---|---|---|---|---|---|"]
        for k, _ in kinds:
            s, sr = column(rows, f"{PREFIX}/rank/all/{k}/stable_rank")
            s2, ts = column(rows, f"{PREFIX}/rank/all/{k}/top_share")
            share = dict(zip(s2.tolist(), ts.tolist()))
            cells = [f"{s[j]} | {_fmt(float(sr[j]), '.3f')} | {_fmt(share.get(s[j], math.nan), '.3f')}" for j in (0, -1)]
            lines.append(f"| {k} | " + " | ".join(cells) + " |")
        lines += ["", ("`kq`: the key-query products W_Qᵀ·W_K, mean over heads; `outer`: W_V and the transmission "
                       "matrices."), ""]
    return lines
