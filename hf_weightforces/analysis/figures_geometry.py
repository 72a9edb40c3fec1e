"""The report's figures of trajectory geometry: the AdamW backbone beside its random-walk nulls,
and key-query rank collapse per layer (docs/geometry.md), drawn from ``metrics.jsonl`` rows.

Like :mod:`~hf_weightforces.analysis.figures`: each ``fig_*`` draws in a style, saves through
``save(fig)`` and returns its caption, or ``None`` without data.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np

from hf_weightforces.analysis.figures import STEP, Save, column, legend_below
from hf_weightforces.analysis.plotstyle import Style, class_color, figure
from hf_weightforces.core.groups import GROUPS, TOTAL

__all__ = ["RANK_KINDS", "backbone_classes", "fig_backbone", "fig_ranks"]

PREFIX = "weightforces"


def _log_axis(ax, subs: tuple[float, ...] = (1.0,)) -> None:
    """Log y axis with plain tick labels (0.01, 0.1 / 2, 5, 10) instead of 10ⁿ and 2×10ⁿ."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(subs=subs))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def backbone_classes(rows: Sequence[dict]) -> list[str]:
    """Classes (class order, then total) with a finite backbone fraction or per-step |cos| in some row."""
    return [g for g in (*GROUPS, TOTAL)
            if any(column(rows, f"{PREFIX}/backbone/{g}/{k}")[0].size for k in ("fraction", "update_cos"))]


def fig_backbone(rows, save: Save, s: Style) -> str | None:
    names = backbone_classes(rows)
    if not names:
        return None
    last = max(r["step"] for r in rows)
    restarts = sorted({v for v in column(rows, f"{PREFIX}/backbone/start_step")[1] if v > 0})
    null = {"color": "0.45", "ls": "--", "marker": "o", "mfc": "white", "ms": 4, "lw": 1.0}
    wide = s.max_columns >= 3
    fig, axes = figure(len(names) * (1 if wide else 2), 4 if wide else 2, s,
                       width=s.width * (1.3 if wide else 1.0), height=s.panel_height * 0.95)
    for i, g in enumerate(names):
        ax_f, ax_s, ax_st, ax_c = axes[4 * i : 4 * i + 4]
        color = class_color(g)
        key = f"{PREFIX}/backbone/{g}/"
        st, v = column(rows, key + "fraction")
        ax_f.plot(st, v, color=color, marker="o", ms=4, label="backbone (class colour)")
        st, v = column(rows, key + "fraction_null")
        ax_f.plot(st, v, label="random-walk null", **null)
        st, v = column(rows, key + "fraction_score")
        ax_s.plot(st, v, color=color, marker="o", ms=4)
        ax_s.axhline(0.0, color="0.45", ls="--", lw=1.0)
        ax_s.axhline(1.0, color="0.75", ls=":", lw=1.0)
        ax_s.set_ylim(min(-0.05, *(v - 0.05)) if v.size else -0.05, 1.05)
        st, v = column(rows, key + "stability")
        ax_st.plot(st, v, color=color, marker="o", ms=4)
        st, v = column(rows, key + "stability_null")
        ax_st.plot(st, v, **null)
        for k, label, c, ls in (("update_cos", "per-step updates", color, "-"), ("grad_cos", "per-step gradients", color, ":"),
                                 ("cos_floor", "independent floor ≈ √(2/πk)", "0.45", "--")):
            st, v = column(rows, key + k)
            if st.size:
                ax_c.plot(st, v, color=c, ls=ls, label=label)
        if ax_c.lines:
            _log_axis(ax_c)
        for ax, title, ylabel in ((ax_f, "share of ‖d‖² on the backbone", "fraction of ‖d_T‖²"),
                                  (ax_s, "fraction score", "(fraction − null) / (1 − null)"),
                                  (ax_st, "stability of the direction", "|cos| with previous estimate"),
                                  (ax_c, "per-step |cos| with the backbone", "mean |cos| per optimizer step")):
            ax.set_title(f"{g}: {title}")
            ax.set_ylabel(ylabel)
            ax.set_xlim(0, last)
            ax.set_xlabel(STEP)
            for step in restarts:
                ax.axvline(step, color="#8c564b", ls=":", lw=1.0)
    legend_below(fig, axes, ncols=4)
    fig.suptitle("AdamW backbone (top direction of the displacements from the start); grey dashed, open circles: "
                 "random walk with the same step sizes")
    save(fig)
    return ("Per class, at each backbone estimate: the share of the displacement ‖d_T‖² on the top direction and "
            "of the random-walk null with the run's own step sizes (grey dashed), the normalised score "
            "(fraction − null)/(1 − null) (0: no better than the walk), and the cosine of the direction with the "
            "previous estimate beside its null; right: mean |cos| of each step's update and gradient with the "
            "latest backbone, against the floor of an independent direction (log axis)."
            + (" Brown dotted: the backbone restarted at a resume." if restarts else ""))


_RANK_LAYER = re.compile(rf"^{PREFIX}/rank/(layer_(\d+))/([^/]+)/stable_rank$")
RANK_KINDS = (("q", "$W_Q$", "#a6611a"), ("k", "$W_K$", "#dfc27d"),
              ("kq", r"$W_Q^\top W_K$ (mean over heads)", "#d62728"), ("outer", "outer ($W_V$, transmission)", "#7b3294"))


def fig_ranks(rows, save: Save, s: Style) -> str | None:
    keys = set().union(*(r.keys() for r in rows))
    roles: dict[str, set[str]] = {}
    for key in keys:
        m = _RANK_LAYER.match(key)
        if m and column(rows, key)[0].size:
            roles.setdefault(m.group(3), set()).add(m.group(1))
    kinds = [kind for kind in RANK_KINDS if column(rows, f"{PREFIX}/rank/all/{kind[0]}/stable_rank")[0].size]
    if not roles and not kinds:
        return None
    from matplotlib import colormaps

    role = next((r for r in ("kq", "q", "qkv") if r in roles), None)
    layers = sorted(roles.get(role, ()), key=lambda name: int(name.split("_")[1]))
    what = {"kq": "key-query W_Qᵀ·W_K, mean over heads", "q": "W_Q (no heads known: no key-query products)",
            "qkv": "fused QKV (no heads known)"}.get(role, "")
    title = {"kq": r"key-query $W_Q^\top W_K$, mean over heads", "q": r"$W_Q$ (no heads known: no key-query products)",
             "qkv": "fused QKV (no heads known)"}.get(role, "")
    fig, axes = figure(2, 2, s, height=s.panel_height * 1.25)
    depth = colormaps["viridis"](np.linspace(0.0, 0.9, max(1, len(layers))))  # no pale yellow on white
    colors = dict(zip(layers, depth))
    for ax, stat, label in ((axes[0], "stable_rank", "stable rank Σ s² / max s²"),
                            (axes[1], "top_share", "top-direction energy share")):
        for name in layers:
            st, v = column(rows, f"{PREFIX}/rank/{name}/{role}/{stat}")
            ax.plot(st, v, color=colors[name], marker="o", ms=3.5, label=name.replace("layer_", "layer "))
        ax.set_title(f"per layer: {title}")
        ax.set_xlabel(STEP)
        ax.set_ylabel(label)
        if stat == "top_share":
            ax.set_ylim(0, 1.02)
    if len(layers) > 1:  # a colour bar says depth; a legend would cover lines
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import BoundaryNorm, ListedColormap

        index = [int(name.split("_")[1]) for name in layers]
        bounds = np.arange(len(layers) + 1) - 0.5
        bar = fig.colorbar(ScalarMappable(BoundaryNorm(bounds, len(layers)), ListedColormap(depth)),
                           ax=axes[:2].tolist(), label="layer", shrink=0.8)
        ticks = range(0, len(layers), math.ceil(len(layers) / 6))
        bar.set_ticks(ticks, labels=[str(index[t]) for t in ticks])
    for ax, stat, label in ((axes[2], "stable_rank", "stable rank, mean over layers"),
                            (axes[3], "top_share", "top-direction share, mean over layers")):
        for kind, kind_label, color in kinds:
            st, v = column(rows, f"{PREFIX}/rank/all/{kind}/{stat}")
            ax.plot(st, v, color=color, marker="o", ms=3.5, label=kind_label)
        ax.set_title(label)
        ax.set_xlabel(STEP)
        ax.set_ylabel("stable rank Σ s² / max s²" if stat == "stable_rank" else "top-direction energy share")
        if stat == "stable_rank" and ax.lines:
            _log_axis(ax, (1.0, 2.0, 5.0))
        if stat == "top_share":
            ax.set_ylim(0, 1.02)
    if kinds:
        legend_below(fig, axes[2:], ncols=4)
    fig.suptitle("Condensation and key-query rank collapse (falling stable rank, rising top share)")
    save(fig)
    return ("Top: per attention layer, the stable rank and top-direction energy share of " + (what or "–")
            + " at each rank pass. Bottom: means over layers of W_Q, W_K, the key-query products and the outer "
            "matrices (V and the transmission matrices), stable rank on a log axis.")


