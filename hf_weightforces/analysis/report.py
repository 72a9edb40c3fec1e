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
summary says why.  Matplotlib is imported here only, through its object API (no pyplot state).
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hf_weightforces.analysis.records import RecordError, Schedule, read_records
from hf_weightforces.core.groups import GROUPS, MATRICES, TOTAL

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
_FORCES = (("align", "A (alignment)", "tab:blue"), ("inject", "I (injection)", "tab:orange"),
           ("decay", "D (decay)", "tab:green"), ("rest", "R (rest)", "tab:gray"))
_OFFSETS = (("offset_integration", "integration"), ("offset_integration_sampled", "integration, sampled"),
            ("offset_bridge_klock", "bridge, k-lock"), ("offset_bridge_gamma", "bridge, Γ"),
            ("offset_total_klock", "total, k-lock"), ("offset_total_gamma", "total, Γ"))
_ESTIMATOR_STYLE = {"spline": ("tab:purple", "-"), "corrected": ("tab:red", "-"),
                    "two_point": ("tab:olive", "--"), "two_point_interp": ("tab:cyan", ":")}


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


def _column(rows: Sequence[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of the rows that hold ``key`` with a finite value."""
    pts = [(r["step"], r[key]) for r in rows if key in r and r[key] is not None and math.isfinite(r[key])]
    if not pts:
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    steps, values = zip(*pts)
    return np.asarray(steps), np.asarray(values, dtype=np.float64)


def _aggregates(rows: Sequence[dict]) -> tuple[list[str], list[str]]:
    """Classes (in SPEC order, then total) and layers that the rows hold forces for."""
    keys = set().union(*(r.keys() for r in rows))
    classes = [g for g in (*GROUPS, TOTAL) if f"{PREFIX}/{g}/align" in keys]
    layers = sorted(k.split("/")[1] for k in keys if k.endswith("/align")
                    and k.split("/")[1].startswith(("layer_", "encoder_layer_", "decoder_layer_")))
    return classes, layers


# ----------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------


def _figure(nrows: int, ncols: int, width: float = 11.0, height: float = 2.7):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height * nrows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    return fig, axes


def _save(fig, path: Path, dpi: int) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=dpi)


def _grid(n: int) -> tuple[int, int]:
    cols = min(3, n)
    return math.ceil(n / cols), cols


def _hide_unused(axes, used: int) -> None:
    """Hide the empty panels; the first of them holds the legend of panel 0 when there is one."""
    handles, labels = axes[0].get_legend_handles_labels()
    for ax in axes[used:]:
        ax.set_axis_off()
    if used < len(axes):
        axes[used].legend(handles, labels, loc="center", fontsize=9, frameon=False)
    else:
        axes[0].legend(fontsize=7)


def _fig_forces(rows, classes, path: Path, dpi: int) -> str:
    fig, axes = _figure(*_grid(len(classes)))
    for ax, g in zip(axes, classes):
        for key, label, color in _FORCES:
            s, v = _column(rows, f"{PREFIX}/{g}/{key}")
            ax.plot(s, v, color=color, label=label, lw=1.4 if key != "rest" else 1.0)
        ax.axhline(0.0, color="black", lw=0.6)
        ax.set_title(g)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("contribution to Δ‖w‖² per step")
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    _hide_unused(axes, len(classes))
    fig.suptitle("Force budget of AdamW per optimizer step (means over each logging interval)")
    _save(fig, path, dpi)
    return ("Signed contributions to Δ‖w‖² per step: alignment A = −2η⟨w,u⟩, injection I = η²‖u‖², "
            "decay D = −2ηλ‖w‖², rest R; means over each logging interval.")


def _fig_shares(rows, classes, path: Path, dpi: int) -> str:
    fig, axes = _figure(*_grid(len(classes)))
    for ax, g in zip(axes, classes):
        steps, parts = None, []
        for key, label, color in _FORCES[:3]:
            s, v = _column(rows, f"{PREFIX}/{g}/{key}_share")
            steps = s if steps is None or s.size < steps.size else steps
            parts.append((s, v, label, color))
        if steps is None or steps.size == 0:
            continue
        stack = [np.interp(steps, s, v) for s, v, _, _ in parts]
        ax.stackplot(steps, *stack, labels=[p[2] for p in parts], colors=[p[3] for p in parts], alpha=0.85)
        ax.set_ylim(0, 1)
        ax.set_title(g)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("share of |A| + |I| + |D|")
    _hide_unused(axes, len(classes))
    fig.suptitle("Shares of the absolute force budget")
    _save(fig, path, dpi)
    return "Shares |A|, |I|, |D| of |A| + |I| + |D| per logging interval (sums first, ratios last)."


def _fig_balance(rows, classes, path: Path, dpi: int) -> str:
    fig, axes = _figure(1, 2, height=3.6)
    colors = _group_colors(classes)
    for g in classes:
        s, a = _column(rows, f"{PREFIX}/{g}/align")
        s2, d = _column(rows, f"{PREFIX}/{g}/decay")
        if s.size == 0 or not np.array_equal(s, s2):
            continue
        with np.errstate(divide="ignore", invalid="ignore"):
            imbalance = (a + d) / (np.abs(a) + np.abs(d))
        axes[0].plot(s, imbalance, color=colors[g], label=g)
        if g == TOTAL or len(classes) == 1:
            axes[1].plot(s, a, color="tab:blue", label=f"A ({g})")
            axes[1].plot(s, -d, color="tab:green", label=f"−D ({g})")
            axes[1].fill_between(s, a, -d, color="tab:gray", alpha=0.25, label="A + D")
    axes[0].axhline(0.0, color="black", lw=0.6)
    axes[0].set_ylim(-1.05, 1.05)
    axes[0].set_title("(A + D) / (|A| + |D|): 0 is balance")
    axes[0].set_xlabel("optimizer step")
    axes[0].legend(fontsize=8)
    axes[1].set_title("alignment against decay (total)")
    axes[1].set_xlabel("optimizer step")
    axes[1].set_ylabel("per step")
    axes[1].legend(fontsize=8)
    fig.suptitle("Alignment and decay approaching balance (norm growth stops when A + D → 0)")
    _save(fig, path, dpi)
    return ("Left: (A + D)/(|A| + |D|) per class, positive while alignment outgrows decay, 0 at balance. "
            "Right: A and −D of all weights, the shaded gap is A + D.")


def _group_colors(classes: Sequence[str]) -> dict[str, str]:
    palette = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "black"]
    order = [*GROUPS, MATRICES, TOTAL]
    return {g: palette[order.index(g) % len(palette)] if g in order else "tab:gray" for g in classes}


def _fig_weibull(rows, classes, trajectory, path: Path, dpi: int) -> str | None:
    panels = (("weibull_k", "k (shape)", 1.2054), ("weibull_scale", "λ (scale)", None),
              ("rms", "σ (RMS)", None), ("weibull_scale_over_rms", "λ / σ", 0.8875))
    # the Weibull pools (docs/aggregates.md): matrix classes and matrices; biases and norm scales are not Weibull-like
    classes = [g for g in (*GROUPS, MATRICES)
               if g != "other" and (g in classes or any(f"{PREFIX}/{g}/weibull_k" in r for r in rows))]
    colors = _group_colors(classes)
    have_live = any(_column(rows, f"{PREFIX}/{g}/weibull_k")[0].size for g in classes)
    if not have_live and trajectory is None:
        return None
    fig, axes = _figure(2, 2, height=3.2)
    for ax, (key, label, ref) in zip(axes, panels):
        for g in classes:
            s, v = _column(rows, f"{PREFIX}/{g}/{key}")
            if key in ("weibull_k", "weibull_scale"):  # the fit at the first step goes out as start_*
                s0, v0 = _column(rows, f"{PREFIX}/{g}/start_{key}")
                s, v = np.concatenate([np.zeros(v0.size, dtype=s.dtype), s]), np.concatenate([v0, v])
            if key == "rms":  # σ is in every row
                ax.plot(s, v, color=colors[g], lw=1.0, label=g)
            elif s.size:
                ax.plot(s, v, color=colors[g], marker=".", lw=1.2, label=g)
            if trajectory is not None and g in trajectory.names("group"):
                steps, k, lam, sigma = trajectory.series(g)
                offline = {"weibull_k": k, "weibull_scale": lam, "rms": sigma,
                           "weibull_scale_over_rms": lam / sigma}[key]
                ax.plot(steps, offline, ls="none", marker="o", mfc="none", color=colors[g])
        if ref is not None:
            ax.axhline(ref, color="gray", ls=":", lw=1.0, label="Gaussian anchor")
        ax.set_title(label)
        ax.set_xlabel("optimizer step")
    axes[0].legend(fontsize=8)
    fig.suptitle("Weibull fits of |w| per class (lines: live histogram fits; circles: exact fits of checkpoints)")
    _save(fig, path, dpi)
    return ("Shape k, scale λ, RMS σ and λ/σ per class over training. Lines: the callback's live fits (step 0: "
            "the fit at the first step); open circles: `hf-weightforces lambda` on the checkpoints (classes "
            "pooled). Dotted: the Gaussian anchors k0 = 1.2054 and λ/σ = 0.8875. `other` (biases, norm "
            "scales) is left out: it is not Weibull-like; `total` pools every tensor, norm scales near 1 "
            "included, which dominate its σ.")


def _fig_layers(rows, layers, path: Path, dpi: int) -> str | None:
    if not layers:
        return None
    steps = None
    grids = {"align_per_weight": [], "align_share": [], "balance": []}
    for name in layers:
        s, a = _column(rows, f"{PREFIX}/{name}/align")
        _, share = _column(rows, f"{PREFIX}/{name}/align_share")
        _, d = _column(rows, f"{PREFIX}/{name}/decay")
        _, n = _column(rows, f"{PREFIX}/{name}/numel")
        steps = s if steps is None else steps
        if s.size != steps.size or share.size != s.size or d.size != s.size or n.size != s.size:
            return None
        grids["align_per_weight"].append(a / n)
        grids["align_share"].append(share)
        with np.errstate(divide="ignore", invalid="ignore"):
            grids["balance"].append((a + d) / (np.abs(a) + np.abs(d)))
    titles = {"align_per_weight": ("A per weight per step", "viridis"),
              "align_share": ("alignment share |A| / (|A| + |I| + |D|)", "magma"),
              "balance": ("(A + D) / (|A| + |D|)", "coolwarm")}
    fig, axes = _figure(3, 1, width=10.0, height=max(1.6, 0.35 * len(layers) + 1.0))
    extent = (steps[0], steps[-1], len(layers) - 0.5, -0.5)
    for ax, (key, (title, cmap)) in zip(axes, titles.items()):
        data = np.array(grids[key])
        kw = {"vmin": -1, "vmax": 1} if key == "balance" else {}
        im = ax.imshow(data, aspect="auto", cmap=cmap, extent=extent, interpolation="nearest", **kw)
        ax.set_yticks(range(len(layers)), [name.replace("layer_", "layer ") for name in layers])
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.figure.colorbar(im, ax=ax)
    fig.suptitle("Per-layer forces (all parameters of each transformer layer)")
    _save(fig, path, dpi)
    return "Per transformer layer and logging interval: A per weight, the alignment share, and A + D balance."


def _fig_offset(rows, classes, path: Path, dpi: int) -> str | None:
    have = [g for g in (*GROUPS, MATRICES) if g != "other" and _column(rows, f"{PREFIX}/{g}/offset_total_klock")[0].size]
    if not have:
        return None
    fig, axes = _figure(*_grid(len(have)))
    styles = [("tab:blue", "-", "o", 6), ("tab:blue", ":", "o", 6), ("tab:orange", "-", "s", 8),
              ("tab:orange", "--", "s", 8), ("tab:red", "-", "x", 7), ("tab:red", "--", "x", 7)]
    for ax, g in zip(axes, have):
        for (key, label), (color, ls, marker, ms) in zip(_OFFSETS, styles):
            s, v = _column(rows, f"{PREFIX}/{g}/{key}")
            if s.size:
                ax.plot(s, 100.0 * v, ls=ls, color=color, marker=marker, ms=ms, mfc="none", lw=1.2, label=label)
        ax.axhline(0.0, color="black", lw=0.6)
        ax.set_title(g)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("relative error (%)")
    _hide_unused(axes, len(have))
    fig.suptitle("RMS-to-Weibull offset: σ predicted from the forces, through a bridge, against the fitted λ")
    _save(fig, path, dpi)
    return ("Offset components at each Weibull event (SPEC section 5): integration = σ_pred/σ − 1 "
            "(dense and sampled every N steps), bridge = bridge(σ)/λ − 1 (k-lock and Γ), total = "
            "bridge(σ_pred)/λ − 1. With an exact integration the totals lie on the bridges. `other` is left out.")


def _fig_spline(spline_report, path: Path, dpi: int) -> str | None:
    if spline_report is None or not spline_report.accuracy:
        return None
    rows_acc = [a for a in spline_report.accuracy if a.resolution == "row"]
    names = [g for g in (*GROUPS, TOTAL) if any(a.aggregate == g for a in rows_acc)]
    fig, axes = _figure(len(names), 2, height=2.8)
    for i, g in enumerate(names):
        ax, axr = axes[2 * i], axes[2 * i + 1]
        accs = {a.estimator: a for a in rows_acc if a.aggregate == g}
        truth = next(iter(accs.values()))
        ax.plot(truth.end, truth.true, "ko", ms=3.5, label="logged truth")
        for est, (color, ls) in _ESTIMATOR_STYLE.items():
            if est in accs:
                ax.step(accs[est].end, accs[est].estimate, where="pre", color=color, ls=ls, lw=1.2, label=est)
                axr.plot(accs[est].end, accs[est].ratio, color=color, ls=ls, marker=".", ms=3)
        for step in spline_report.forces.checkpoint_steps:
            ax.axvline(step, color="0.75", lw=0.8)
            axr.axvline(step, color="0.75", lw=0.8)
        axr.axhline(1.0, color="black", lw=0.6)
        axr.set_ylim(0.0, 1.6)
        ax.set_title(f"{g}: A per step")
        medians = ", ".join(f"{e} {accs[e].median:.3f}" for e in _ESTIMATOR_STYLE if e in accs)
        axr.set_title(f"{g}: estimate / true per logged interval\nmedians: {medians}", fontsize=8.5)
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        ax.set_xlabel("optimizer step")
        axr.set_xlabel("optimizer step")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=5, fontsize=9)
    fig.suptitle("Alignment from sparse checkpoints (grey verticals) against the callback's exact A")
    _save(fig, path, dpi)
    return ("Alignment estimated from the checkpoints alone (grey verticals): the paper's spline, the "
            "corrected spline (lr-time axis, injection put back), the two-point baseline and two-point with "
            "interpolated w, against the exact A the callback logged; right: estimate / true per logging interval.")


def _log_axis(ax, subs: tuple[float, ...] = (1.0,)) -> None:
    """Log y axis with plain tick labels (0.01, 0.1 / 2, 5, 10) instead of 10ⁿ and 2×10ⁿ."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(subs=subs))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _backbone_classes(rows: Sequence[dict]) -> list[str]:
    """Classes (SPEC order, then total) with a finite backbone fraction or per-step |cos| in some row."""
    return [g for g in (*GROUPS, TOTAL)
            if any(_column(rows, f"{PREFIX}/backbone/{g}/{k}")[0].size for k in ("fraction", "update_cos"))]


def _fig_backbone(rows, path: Path, dpi: int) -> str | None:
    names = _backbone_classes(rows)
    if not names:
        return None
    last = max(r["step"] for r in rows)
    restarts = sorted({v for v in _column(rows, f"{PREFIX}/backbone/start_step")[1] if v > 0})
    null = {"color": "0.45", "ls": "--", "marker": "o", "mfc": "white", "ms": 4.5, "lw": 1.2}
    fig, axes = _figure(len(names), 4, width=14.0, height=2.5)
    for i, g in enumerate(names):
        ax_f, ax_s, ax_st, ax_c = axes[4 * i : 4 * i + 4]
        key = f"{PREFIX}/backbone/{g}/"
        s, v = _column(rows, key + "fraction")
        ax_f.plot(s, v, color="tab:blue", marker="o", ms=4.5, lw=1.5, label="captured fraction")
        s, v = _column(rows, key + "fraction_null")
        ax_f.plot(s, v, label="random-walk null", **null)
        s, v = _column(rows, key + "fraction_score")
        ax_s.plot(s, v, color="tab:purple", marker="o", ms=4.5, lw=1.5, label="(fraction − null) / (1 − null)")
        ax_s.axhline(0.0, color="0.45", ls="--", lw=1.0, label="null level (0)")
        ax_s.axhline(1.0, color="0.75", ls=":", lw=1.0)
        ax_s.set_ylim(min(-0.05, *(v - 0.05)) if v.size else -0.05, 1.05)
        s, v = _column(rows, key + "stability")
        ax_st.plot(s, v, color="tab:green", marker="o", ms=4.5, lw=1.5, label="stability (cos with previous)")
        s, v = _column(rows, key + "stability_null")
        ax_st.plot(s, v, label="random-walk null", **null)
        for k, label, color, ls in (("update_cos", "updates", "tab:red", "-"), ("grad_cos", "gradients", "tab:orange", "-"),
                                     ("cos_floor", "independent floor ≈ √(2/πk)", "0.45", "--")):
            s, v = _column(rows, key + k)
            if s.size:
                ax_c.plot(s, v, color=color, ls=ls, lw=1.3, label=label)
        if ax_c.lines:
            _log_axis(ax_c)
        ax_f.set_title(f"{g}: share of ‖d‖² on the backbone", fontsize=9.5)
        ax_s.set_title(f"{g}: fraction score", fontsize=9.5)
        ax_st.set_title(f"{g}: stability of the direction", fontsize=9.5)
        ax_c.set_title(f"{g}: per-step |cos| with the backbone", fontsize=9.5)
        for ax in (ax_f, ax_s, ax_st, ax_c):
            ax.set_xlim(0, last)
            ax.set_xlabel("optimizer step")
            for step in restarts:
                ax.axvline(step, color="tab:brown", ls=":", lw=1.0)
            if i == 0 and ax.lines:
                ax.legend(fontsize=7, loc="best")
    fig.suptitle("AdamW backbone (top direction of the displacements from the start); grey dashed, open circles: "
                 "random walk with the same step sizes")
    _save(fig, path, dpi)
    return ("Per class, at each backbone estimate: the share of the displacement ‖d_T‖² on the top direction and "
            "of the random-walk null with the run's own step sizes (grey dashed), the normalised score "
            "(fraction − null)/(1 − null) (0: no better than the walk), and the cosine of the direction with the "
            "previous estimate beside its null; right: mean |cos| of each step's update and gradient with the "
            "latest backbone, against the floor of an independent direction (log axis)."
            + (" Brown dotted: the backbone restarted at a resume." if restarts else ""))


_RANK_LAYER = re.compile(rf"^{PREFIX}/rank/(layer_(\d+))/([^/]+)/stable_rank$")
_RANK_KINDS = (("q", "$W_Q$", "tab:blue"), ("k", "$W_K$", "tab:orange"),
               ("kq", r"$W_Q^\top W_K$ (mean over heads)", "tab:red"), ("outer", "outer ($W_V$, transmission)", "tab:green"))


def _fig_ranks(rows, path: Path, dpi: int) -> str | None:
    keys = set().union(*(r.keys() for r in rows))
    roles: dict[str, set[str]] = {}
    for key in keys:
        m = _RANK_LAYER.match(key)
        if m and _column(rows, key)[0].size:
            roles.setdefault(m.group(3), set()).add(m.group(1))
    kinds = [kind for kind in _RANK_KINDS if _column(rows, f"{PREFIX}/rank/all/{kind[0]}/stable_rank")[0].size]
    if not roles and not kinds:
        return None
    from matplotlib import colormaps

    role = next((r for r in ("kq", "q", "qkv") if r in roles), None)
    layers = sorted(roles.get(role, ()), key=lambda name: int(name.split("_")[1]))
    what = {"kq": "key-query W_Qᵀ·W_K, mean over heads", "q": "W_Q (no heads known: no key-query products)",
            "qkv": "fused QKV (no heads known)"}.get(role, "")
    title = {"kq": r"key-query $W_Q^\top W_K$, mean over heads", "q": r"$W_Q$ (no heads known: no key-query products)",
             "qkv": "fused QKV (no heads known)"}.get(role, "")
    fig, axes = _figure(2, 2, width=11.0, height=3.4)
    depth = colormaps["viridis"](np.linspace(0.0, 0.9, max(1, len(layers))))  # no pale yellow on white
    colors = dict(zip(layers, depth))
    for ax, stat, label in ((axes[0], "stable_rank", "stable rank Σ s² / max s²"),
                            (axes[1], "top_share", "top-direction energy share")):
        for name in layers:
            s, v = _column(rows, f"{PREFIX}/rank/{name}/{role}/{stat}")
            ax.plot(s, v, color=colors[name], marker="o", ms=4, lw=1.4, label=name.replace("layer_", "layer "))
        ax.set_title(f"per layer: {label}\n{title}", fontsize=9.5)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(stat.replace("_", " "))
        if stat == "top_share":
            ax.set_ylim(0, 1.02)
    if len(layers) > 8:  # a colour bar says depth where a legend would not fit
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import BoundaryNorm, ListedColormap

        index = [int(name.split("_")[1]) for name in layers]
        bounds = np.arange(len(layers) + 1) - 0.5
        bar = fig.colorbar(ScalarMappable(BoundaryNorm(bounds, len(layers)), ListedColormap(depth)),
                           ax=axes[:2].tolist(), label="layer", shrink=0.8)
        ticks = range(0, len(layers), math.ceil(len(layers) / 6))
        bar.set_ticks(ticks, labels=[str(index[t]) for t in ticks])
    elif layers:
        axes[0].legend(fontsize=7, ncols=2)
    for ax, stat, label in ((axes[2], "stable_rank", "stable rank, mean over layers"),
                            (axes[3], "top_share", "top-direction share, mean over layers")):
        for kind, kind_label, color in kinds:
            s, v = _column(rows, f"{PREFIX}/rank/all/{kind}/{stat}")
            ax.plot(s, v, color=color, marker="o", ms=4, lw=1.4, label=kind_label)
        ax.set_title(label, fontsize=9.5)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(stat.replace("_", " "))
        if stat == "stable_rank" and ax.lines:
            _log_axis(ax, (1.0, 2.0, 5.0))
        if stat == "top_share":
            ax.set_ylim(0, 1.02)
    if kinds:
        axes[2].legend(fontsize=7)
    fig.suptitle("Condensation and key-query rank collapse (falling stable rank, rising top share)")
    _save(fig, path, dpi)
    return ("Top: per attention layer, the stable rank and top-direction energy share of " + (what or "–")
            + " at each rank pass. Bottom: means over layers of W_Q, W_K, the key-query products and the outer "
            "matrices (V and the transmission matrices), stable rank on a log axis.")


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
    dpi: int = 130,
) -> Report:
    """Write every figure the run has data for, and ``summary.md``, into ``out_dir``
    (default ``<run_dir>/weightforces/report``).  Raises :class:`RecordError` when the run has
    no ``metrics.jsonl``."""
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
        "forces.png": lambda p: _fig_forces(rows, classes, p, dpi),
        "shares.png": lambda p: _fig_shares(rows, classes, p, dpi),
        "balance.png": lambda p: _fig_balance(rows, classes, p, dpi),
        "weibull.png": lambda p: _fig_weibull(rows, classes, trajectory, p, dpi),
        "layers.png": lambda p: _fig_layers(rows, layers, p, dpi),
        "offset.png": lambda p: _fig_offset(rows, classes, p, dpi),
        "spline.png": lambda p: _fig_spline(spline_report, p, dpi),
        "backbone.png": lambda p: _fig_backbone(rows, p, dpi),
        "ranks.png": lambda p: _fig_ranks(rows, p, dpi),
    }
    reasons = {
        "weibull.png": "no Weibull events in metrics.jsonl (weibull_every=0) and no checkpoints",
        "layers.png": "no per-layer rows in metrics.jsonl (train with per_layer=True)",
        "offset.png": "no offset keys in metrics.jsonl (they come with the Weibull events)",
        "spline.png": spline_reason,
        "backbone.png": "no backbone keys in metrics.jsonl (train with BackboneProbe, "
                        "--weight_forces_backbone_every N)",
        "ranks.png": "no rank keys in metrics.jsonl (train with RankProbe, --weight_forces_rank_every N)",
    }
    for name, make in makers.items():
        caption = make(out / name)
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
        vals = {k: _column(rows, f"{PREFIX}/{g}/{k}")[1] for k in ("align", "inject", "decay", "rms")}
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
    names = [g for g in _backbone_classes(rows) if _column(rows, f"{PREFIX}/backbone/{g}/fraction")[0].size]
    if names:
        lines += ["## Trajectory geometry: the backbone", "",
                  "| class | step | fraction | null | score | stability | null | update \\|cos\\| | gradient \\|cos\\| | floor |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for g in names:
            key = f"{PREFIX}/backbone/{g}/"
            cols = {k: _column(rows, key + k)[1] for k in ("fraction", "fraction_null", "fraction_score", "stability",
                                                            "stability_null", "update_cos", "grad_cos", "cos_floor")}

            def at(k: str, mean: bool = False, cols=cols) -> float:
                v = cols[k]
                return math.nan if v.size == 0 else float(np.mean(v)) if mean else float(v[-1])

            step = _column(rows, key + "fraction")[0][-1]
            lines.append(f"| {g} | {step} | {_fmt(at('fraction'), '.4f')} | "
                         f"{_fmt(at('fraction_null'), '.4f')} | {_fmt(at('fraction_score'), '.3f')} | "
                         f"{_fmt(at('stability'), '.4f')} | {_fmt(at('stability_null'), '.4f')} | "
                         f"{_fmt(at('update_cos', True))} | {_fmt(at('grad_cos', True))} | {_fmt(at('cos_floor'))} |")
        lines += ["", ("Fraction, score and stability at the last estimate (stability needs two); |cos| are means "
                       "over the logged rows, beside the floor of an independent direction."), ""]
    kinds = [(k, label) for k, label, _ in _RANK_KINDS if _column(rows, f"{PREFIX}/rank/all/{k}/stable_rank")[0].size]
    if kinds:
        lines += ["## Trajectory geometry: ranks (means over layers)", "",
                  "| matrices | first step | stable rank | top share | last step | stable rank | top share |",
                  "|---|---|---|---|---|---|---|"]
        for k, _ in kinds:
            s, sr = _column(rows, f"{PREFIX}/rank/all/{k}/stable_rank")
            s2, ts = _column(rows, f"{PREFIX}/rank/all/{k}/top_share")
            share = dict(zip(s2.tolist(), ts.tolist()))
            cells = [f"{s[j]} | {_fmt(float(sr[j]), '.3f')} | {_fmt(share.get(s[j], math.nan), '.3f')}" for j in (0, -1)]
            lines.append(f"| {k} | " + " | ".join(cells) + " |")
        lines += ["", ("`kq`: the key-query products W_Qᵀ·W_K, mean over heads; `outer`: W_V and the transmission "
                       "matrices."), ""]
    return lines
