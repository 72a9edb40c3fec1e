"""The report's figures of the force budget, the Weibull fits, the offset and the spline, drawn
from ``metrics.jsonl`` rows (see :mod:`~hf_weightforces.analysis.report`).

Each ``fig_*`` function draws one figure in a :class:`~hf_weightforces.analysis.plotstyle.Style`,
saves it through ``save(fig)`` and returns its caption, or ``None`` when the rows hold no data for
it.  Axes carry their quantity and unit; legends sit outside the data (below the panels or in an
empty panel); a force that spans decades is drawn on a symmetric-log axis.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from hf_weightforces.analysis.plotstyle import FORCES, Style, class_color, figure, grid_shape
from hf_weightforces.core.groups import GROUPS, TOTAL

__all__ = ["column", "fig_balance", "fig_forces", "fig_layers", "fig_offset", "fig_shares", "fig_spline",
           "fig_weibull", "weibull_pools"]

PREFIX = "weightforces"
STEP = "optimizer step"
Save = Callable[[object], None]


def column(rows: Sequence[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of the rows that hold ``key`` with a finite value."""
    pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None and math.isfinite(r[key])]
    if not pts:
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    steps, values = zip(*pts)
    return np.asarray(steps), np.asarray(values, dtype=np.float64)


def legend_below(fig, axes, ncols: int = 4) -> None:
    """One legend for the figure, under the panels (never over the data); duplicates dropped."""
    seen: dict[str, object] = {}
    for ax in np.atleast_1d(axes):
        for h, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, h)
    if seen:
        fig.legend(list(seen.values()), list(seen), loc="outside lower center", ncols=min(ncols, len(seen)),
                   frameon=False)


def hide_unused(axes, used: int) -> None:
    for ax in axes[used:]:
        ax.set_axis_off()


def symlog_threshold(series: Sequence[np.ndarray]) -> float | None:
    """A linear-region width for a symmetric-log axis: the decade below the smallest typical
    magnitude among the series (zeros ignored); ``None`` when they span less than two decades."""
    typical = [float(np.median(np.abs(v[v != 0]))) for v in series if np.any(v != 0)]
    if not typical or max(typical) < 100 * min(typical):
        return None
    return 10.0 ** math.floor(math.log10(min(typical)))


def fig_forces(rows, classes, save: Save, s: Style) -> str:
    fig, axes = figure(*grid_shape(len(classes), s), s)
    for ax, g in zip(axes, classes):
        series = []
        for key in ("align", "inject", "decay", "rest"):
            label, color = FORCES[key]
            st, v = column(rows, f"{PREFIX}/{g}/{key}")
            ax.plot(st, v, color=color, label=label, lw=s.line_width * (0.8 if key == "rest" else 1.0))
            series.append(v)
        thresh = symlog_threshold(series)
        if thresh is not None:
            ax.set_yscale("symlog", linthresh=thresh)
        ax.axhline(0.0, color="black", lw=0.5)
        ax.set_title(g)
        ax.set_xlabel(STEP)
        ax.set_ylabel("Δ‖w‖² per optimizer step" + (" (symlog)" if thresh else ""))
    hide_unused(axes, len(classes))
    legend_below(fig, axes)
    fig.suptitle("AdamW force budget per optimizer step (means over each logging interval)")
    save(fig)
    return ("Signed contributions to Δ‖w‖² per optimizer step: alignment A = −2η⟨w,u⟩, injection I = η²‖u‖², "
            "decay D = −2ηλ‖w‖², rest R; means over each logging interval. Panels whose forces span more than "
            "two decades use a symmetric-log axis (linear within the smallest force's decade), so I, D and R "
            "stay readable beside A.")


def fig_shares(rows, classes, save: Save, s: Style) -> str:
    fig, axes = figure(*grid_shape(len(classes), s), s)
    for ax, g in zip(axes, classes):
        parts = [(column(rows, f"{PREFIX}/{g}/{key}_share"), key) for key in ("align", "inject", "decay")]
        steps = min((p[0][0] for p in parts), key=len)
        if steps.size == 0:
            continue
        stack = [np.interp(steps, st, v) for (st, v), _ in parts]
        ax.stackplot(steps, *stack, labels=[FORCES[k][0] for _, k in parts], colors=[FORCES[k][1] for _, k in parts],
                     alpha=0.85)
        ax.set_ylim(0, 1)
        ax.set_title(g)
        ax.set_xlabel(STEP)
        ax.set_ylabel("share of |A|+|I|+|D|")
    hide_unused(axes, len(classes))
    legend_below(fig, axes, ncols=3)
    fig.suptitle("Shares of the absolute force budget")
    save(fig)
    return "Shares |A|, |I|, |D| of |A| + |I| + |D| per logging interval (sums first, ratios last), stacked."


def fig_balance(rows, classes, save: Save, s: Style) -> str | None:
    decayed, skipped = [], []
    for g in classes:
        _, d = column(rows, f"{PREFIX}/{g}/decay")
        (decayed if d.size and np.any(d != 0) else skipped).append(g)
    if not decayed:
        return None
    fig, axes = figure(1, 2, s, height=s.panel_height * 1.3)
    lo = 0.0
    for g in decayed:
        st, a = column(rows, f"{PREFIX}/{g}/align")
        st2, d = column(rows, f"{PREFIX}/{g}/decay")
        if st.size == 0 or not np.array_equal(st, st2):
            continue
        imbalance = (a + d) / (np.abs(a) + np.abs(d))
        lo = min(lo, float(np.nanmin(imbalance)))
        axes[0].plot(st, imbalance, color=class_color(g), label=g)
    axes[0].axhline(0.0, color="black", lw=0.5)
    axes[0].set_ylim(min(-0.05, lo - 0.05), 1.02)
    axes[0].set_title("(A + D) / (|A| + |D|): 0 is balance")
    axes[0].set_xlabel(STEP)
    axes[0].set_ylabel("(A + D) / (|A| + |D|)")
    pick = TOTAL if TOTAL in decayed else decayed[-1]
    st, a = column(rows, f"{PREFIX}/{pick}/align")
    _, d = column(rows, f"{PREFIX}/{pick}/decay")
    if st.size and a.size == d.size:
        axes[1].plot(st, a, color=FORCES["align"][1], label="A (alignment)")
        axes[1].plot(st, -d, color=FORCES["decay"][1], label="−D (decay, sign flipped)")
        axes[1].fill_between(st, a, -d, color="0.6", alpha=0.3, label="A + D")
        thresh = symlog_threshold([a, d])
        if thresh is not None:
            axes[1].set_yscale("symlog", linthresh=thresh)
    axes[1].set_title(f"alignment against decay ({pick})")
    axes[1].set_xlabel(STEP)
    axes[1].set_ylabel("Δ‖w‖² per optimizer step")
    legend_below(fig, axes, ncols=4)
    fig.suptitle("Alignment and decay approaching balance (norm growth stops when A + D → 0)")
    save(fig)
    return ("Left: (A + D)/(|A| + |D|) per class, positive while alignment outgrows decay, 0 at balance"
            + (f"; left out: {', '.join(skipped)} (no weight decay, D = 0, so the ratio is ±1 by construction)"
               if skipped else "")
            + f". Right: A and −D of {pick}, the shaded gap is A + D.")


def weibull_pools(rows) -> list[tuple[str, str]]:
    """(label, key prefix) of the fitted pools: the matrix classes and ``matrices``, every weight
    matrix (older runs called that pool ``total``)."""
    keys = set().union(*(r.keys() for r in rows))

    def fitted(g: str) -> bool:  # a fit at some event, or only the one at the first step
        return f"{PREFIX}/{g}/weibull_k" in keys or f"{PREFIX}/{g}/start_weibull_k" in keys

    pools = [(g, g) for g in GROUPS if g != "other" and fitted(g)]
    if fitted("matrices"):
        pools.append(("matrices", "matrices"))
    elif fitted(TOTAL):
        pools.append(("matrices", TOTAL))
    return pools


def _matrices_rms(rows) -> tuple[np.ndarray, np.ndarray]:
    """σ of every weight matrix: ``matrices/rms`` where logged, else from the classes' ‖w‖² and numel."""
    st, v = column(rows, f"{PREFIX}/matrices/rms")
    if st.size:
        return st, v
    classes = [g for g in GROUPS if g != "other"]
    pts = []
    for r in rows:
        n2 = [r.get(f"{PREFIX}/{g}/norm2") for g in classes]
        n = [r.get(f"{PREFIX}/{g}/numel") for g in classes]
        pairs = [(a, b) for a, b in zip(n2, n) if a is not None and b]
        if pairs:
            pts.append((r["step"], math.sqrt(sum(a for a, _ in pairs) / sum(b for _, b in pairs))))
    return (np.array([p[0] for p in pts]), np.array([p[1] for p in pts])) if pts else (st, v)


def fig_weibull(rows, trajectory, save: Save, s: Style) -> str | None:
    pools = weibull_pools(rows)
    offline = [] if trajectory is None else [n for n in trajectory.names("group") if n != TOTAL and n != "other"]
    if not pools and not offline:
        return None
    panels = (("weibull_k", "Weibull shape k  [dimensionless]", 1.2054),
              ("weibull_scale", "Weibull scale λ  [weight units]", None),
              ("rms", "σ = RMS of w  [weight units]", None),
              ("weibull_scale_over_rms", "λ / σ  [dimensionless]", 0.8875))
    fig, axes = figure(2, 2, s, height=s.panel_height * 1.15)
    for ax, (key, label, ref) in zip(axes, panels):
        for name, prefix in pools:
            if key == "rms":
                st, v = _matrices_rms(rows) if name == "matrices" else column(rows, f"{PREFIX}/{prefix}/rms")
                ax.plot(st, v, color=class_color(name), label=name)
                continue
            st, v = column(rows, f"{PREFIX}/{prefix}/{key}")
            if key in ("weibull_k", "weibull_scale"):  # the fit at the first step goes out as start_*
                _, v0 = column(rows, f"{PREFIX}/{prefix}/start_{key}")
                st, v = np.concatenate([np.zeros(v0.size, dtype=st.dtype), st]), np.concatenate([v0, v])
            ax.plot(st, v, color=class_color(name), marker=".", label=name)
        for name in offline:
            steps, k, lam, sigma = trajectory.series(name)
            values = {"weibull_k": k, "weibull_scale": lam, "rms": sigma, "weibull_scale_over_rms": lam / sigma}[key]
            ax.plot(steps, values, ls="none", marker="o", mfc="none", color=class_color(name),
                    label=f"{name}, checkpoints")
        if ref is not None:
            ax.axhline(ref, color="0.4", ls=":", lw=1.0, label="Gaussian weights")
        ax.set_xlabel(STEP)
        ax.set_ylabel(label)
    legend_below(fig, axes, ncols=5)
    fig.suptitle("Weibull fits of |w| per class and over all weight matrices")
    save(fig)
    return ("Shape k, scale λ, RMS σ and λ/σ of each matrix class and of `matrices` (every weight matrix pooled; "
            "biases and norm scales, class `other`, are not fitted and not in σ here). Lines and dots: the "
            "callback's live fits (step 0: the fit at the first step); open circles: exact fits of the "
            "checkpoints. Dotted: the Gaussian anchors k0 = 1.2054 and λ/σ = 0.8875.")


def fig_layers(rows, layers, save: Save, s: Style) -> str | None:
    if not layers:
        return None
    steps, grids = None, {"align_per_weight": [], "align_share": [], "balance": []}
    for name in layers:
        st, a = column(rows, f"{PREFIX}/{name}/align")
        _, share = column(rows, f"{PREFIX}/{name}/align_share")
        _, d = column(rows, f"{PREFIX}/{name}/decay")
        _, n = column(rows, f"{PREFIX}/{name}/numel")
        steps = st if steps is None else steps
        if not st.size == steps.size == share.size == d.size == n.size:
            return None
        grids["align_per_weight"].append(a / n)
        grids["align_share"].append(share)
        with np.errstate(divide="ignore", invalid="ignore"):
            grids["balance"].append((a + d) / (np.abs(a) + np.abs(d)))
    titles = {"align_per_weight": ("A per weight", "viridis", "A / numel per step"),
              "align_share": ("alignment share", "magma", "|A| / (|A|+|I|+|D|)"),
              "balance": ("A + D balance", "coolwarm", "(A+D) / (|A|+|D|)")}
    fig, axes = figure(3, 1, s, height=max(1.7 if s.name == "default" else 1.3, 0.12 * len(layers) + 1.0))
    x = steps.astype(np.float64)
    edges = np.concatenate([[x[0] - 0.5], (x[:-1] + x[1:]) / 2, [x[-1] + 0.5]]) if x.size > 1 else x[[0, 0]] + [-0.5, 0.5]
    every = max(1, math.ceil(len(layers) / 12))
    for ax, (key, (title, cmap, unit)) in zip(axes, titles.items()):
        kw = {"vmin": -1, "vmax": 1} if key == "balance" else {}
        mesh = ax.pcolormesh(edges, np.arange(len(layers) + 1) - 0.5, np.ma.masked_invalid(np.array(grids[key])),
                             cmap=cmap, **kw)
        ax.set_ylim(len(layers) - 0.5, -0.5)
        ax.set_yticks(range(0, len(layers), every), [n.split("layer_")[-1] for n in layers][::every])
        ax.set_ylabel("layer")
        ax.set_title(title)
        ax.set_xlabel(STEP)
        ax.grid(False)
        ax.figure.colorbar(mesh, ax=ax, label=unit)
    fig.suptitle("Per-layer forces (every parameter of each transformer layer)")
    save(fig)
    return "Per transformer layer and logging interval: A per weight, the alignment share, and A + D balance."


_OFFSETS = (("offset_integration", "integration", "#1f77b4", "-", "o"),
            ("offset_integration_sampled", "integration, sampled", "#1f77b4", ":", "o"),
            ("offset_bridge_klock", "bridge, k-lock", "#8c564b", "-", "s"),
            ("offset_bridge_gamma", "bridge, Γ", "#8c564b", "--", "s"),
            ("offset_total_klock", "total, k-lock", "#d62728", "-", "x"),
            ("offset_total_gamma", "total, Γ", "#d62728", "--", "x"))


def fig_offset(rows, save: Save, s: Style) -> str | None:
    have = [(n, p) for n, p in weibull_pools(rows) if column(rows, f"{PREFIX}/{p}/offset_total_klock")[0].size]
    if not have:
        return None
    fig, axes = figure(*grid_shape(len(have), s), s)
    for ax, (name, prefix) in zip(axes, have):
        for key, label, color, ls, marker in _OFFSETS:
            st, v = column(rows, f"{PREFIX}/{prefix}/{key}")
            if st.size:
                ax.plot(st, 100.0 * v, ls=ls, color=color, marker=marker, ms=5, mfc="none", label=label)
        ax.axhline(0.0, color="black", lw=0.5)
        ax.set_title(name)
        ax.set_xlabel(STEP)
        ax.set_ylabel("relative error vs fitted λ  [%]")
    hide_unused(axes, len(have))
    legend_below(fig, axes, ncols=3)
    fig.suptitle("RMS-to-Weibull offset: σ predicted from the forces, through a bridge, against the fitted λ")
    save(fig)
    return ("Offset components at each Weibull event (docs/weibull.md): integration = σ_pred/σ − 1 "
            "(dense and sampled every N steps), bridge = bridge(σ)/λ − 1 (k-lock and Γ), total = "
            "bridge(σ_pred)/λ − 1, per matrix class and over all weight matrices. With an exact integration "
            "the totals lie on the bridges.")


_ESTIMATORS = {"spline": ("#9467bd", "-"), "corrected": ("#d62728", "-"),
               "two_point": ("#bcbd22", "--"), "two_point_interp": ("#17becf", ":")}
#: ratio panels leave out intervals whose true A is below this fraction of the largest |A|
MASK_BELOW = 0.05


def fig_spline(spline_report, save: Save, s: Style) -> str | None:
    if spline_report is None or not spline_report.accuracy:
        return None
    rows_acc = [a for a in spline_report.accuracy if a.resolution == "row"]
    names = [g for g in (*GROUPS, "matrices", TOTAL) if any(a.aggregate == g for a in rows_acc)]
    fig, axes = figure(len(names), 2, s, height=s.panel_height * 1.05)
    masked_any = 0
    for i, g in enumerate(names):
        ax, axr = axes[2 * i], axes[2 * i + 1]
        accs = {a.estimator: a for a in rows_acc if a.aggregate == g}
        truth = next(iter(accs.values()))
        ax.plot(truth.end, truth.true, "ko", ms=3, label="logged truth")
        true = np.asarray(truth.true, dtype=np.float64)
        keep = np.abs(true) >= MASK_BELOW * np.max(np.abs(true)) if true.size else true.astype(bool)
        masked_any += int((~keep).sum())
        ratios = []
        for est, (color, ls) in _ESTIMATORS.items():
            if est in accs:
                a = accs[est]
                ax.step(a.end, a.estimate, where="pre", color=color, ls=ls, label=est)
                r = np.where(keep, np.asarray(a.ratio, dtype=np.float64), np.nan)
                axr.plot(a.end, r, color=color, ls=ls, marker=".", ms=3)
                ratios.append(r[np.isfinite(r)])
        for step in spline_report.forces.checkpoint_steps:
            ax.axvline(step, color="0.75", lw=0.8)
            axr.axvline(step, color="0.75", lw=0.8)
        axr.axhline(1.0, color="black", lw=0.5)
        values = np.concatenate(ratios) if ratios else np.zeros(0)
        if values.size:  # every unmasked ratio in view, 1 included
            lo, hi = float(values.min()), float(values.max())
            pad = 0.05 * max(hi - lo, 0.2)
            axr.set_ylim(min(lo, 0.95) - pad, max(hi, 1.05) + pad)
        ax.set_title(f"{g}: A per optimizer step")
        medians = ", ".join(f"{e} {accs[e].median:.3f}" for e in _ESTIMATORS if e in accs)
        note = f"; {int((~keep).sum())} of {keep.size} masked (|A| < {MASK_BELOW:.0%} of max)" if (~keep).any() else ""
        axr.set_title(f"{g}: estimate / true per interval{note}\nmedians: {medians}", fontsize=s.font_size - 1)
        ax.set_ylabel("A  [‖w‖² per optimizer step]")
        axr.set_ylabel("estimate / true A")
        for a in (ax, axr):
            a.set_xlabel(STEP)
    legend_below(fig, axes, ncols=5)
    fig.suptitle("Alignment from sparse checkpoints (grey verticals) against the callback's exact A")
    save(fig)
    return ("Alignment estimated from the checkpoints alone (grey verticals): the paper's spline, the corrected "
            "spline (lr-time axis, injection put back), the two-point baseline and two-point with interpolated w, "
            "against the exact A the callback logged; right: estimate / true per logging interval, leaving out "
            f"intervals where the true |A| is below {MASK_BELOW:.0%} of its largest value (a ratio to a value near "
            "zero says nothing)" + (f": {masked_any} interval(s) masked." if masked_any else "."))
