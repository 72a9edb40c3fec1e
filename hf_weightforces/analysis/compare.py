"""Several runs side by side (``hf-weightforces report RUN RUN ...``): seeds overlaid, or an η sweep.

Each run is a Trainer ``output_dir`` trained with the callback; from its records (``weightforces/``) come the
live Weibull λ(t) per class, the alignment share, the lr schedule and the λ(t) prediction from the forces
(:mod:`~hf_weightforces.analysis.dynamics`).  Runs whose peak lr differ by more than 1% form an **η sweep**:
the peak λ of each class is fitted against η on log-log axes, peak λ ∝ η^b (least squares of ln λ on ln η,
with the slope's standard error), beside the sqrt(η/λ_wd) equilibrium floor (b = 1/2) the paper compares
with (it reports b ≈ 0.78 on Pythia-70M, research code ``make_eta_sweep_fig.py``).  Otherwise the runs are
**seeds** of one configuration: per class the mean and spread of the peak λ, of its step and of the
rise-phase alignment share.

Figures (matplotlib, imported when drawing): ``overlay.png`` (λ(t) and the alignment share of every run,
one column per class), ``eta_sweep.png`` (η sweeps only), and for one run ``dynamics.png``
(:func:`write_run_dynamics`: observed and predicted λ(t), λ/λ* and the phase bands).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hf_weightforces.analysis.dynamics import run_dynamics
from hf_weightforces.analysis.records import RecordError, read_records

__all__ = ["Comparison", "RunSummary", "compare_runs", "fit_power_law", "write_run_dynamics"]

CLASSES = ("transmission", "selection", "embedding")
_PHASE_COLORS = {"plateau": "#eef2f3", "rise": "#fdebd0", "overshoot": "#fadbd8", "relaxation": "#eafaf1"}


@dataclass(frozen=True)
class RunSummary:
    """One run: its label, peak lr and decay, and per class the dynamics of :func:`run_dynamics`."""

    label: str
    folder: str
    peak_lr: float
    weight_decay: float
    dynamics: dict[str, dict]
    rows: list[dict] = field(repr=False, default_factory=list)

    def peak(self, name: str) -> tuple[float, int]:
        d = self.dynamics.get(name)
        if not d or not d["lambda"]:
            return math.nan, -1
        i = int(np.nanargmax(d["lambda"]))
        return float(d["lambda"][i]), int(d["steps"][i])

    def rise_share(self, name: str) -> float:
        d = self.dynamics.get(name) or {}
        rise = [p for p in d.get("phases", []) if p["name"] == "rise" and p["align_share"]]
        return rise[0]["align_share"]["median"] if rise else math.nan


def fit_power_law(x: Sequence[float], y: Sequence[float]) -> dict[str, float]:
    """y = c x^b by least squares of ln y on ln x: exponent b, its standard error (NaN for 2 points), c."""
    lx, ly = np.log(np.asarray(x, dtype=np.float64)), np.log(np.asarray(y, dtype=np.float64))
    n = lx.size
    if n < 2 or np.ptp(lx) == 0:
        return {"exponent": math.nan, "stderr": math.nan, "coefficient": math.nan, "points": n}
    b, a = np.polyfit(lx, ly, 1)
    resid = ly - (a + b * lx)
    se = math.sqrt(float(resid @ resid) / (n - 2) / float(((lx - lx.mean()) ** 2).sum())) if n > 2 else math.nan
    return {"exponent": float(b), "stderr": se, "coefficient": float(math.exp(a)), "points": n}


@dataclass(frozen=True)
class Comparison:
    """What :func:`compare_runs` found and drew."""

    mode: str  # "eta_sweep" or "seeds"
    runs: tuple[RunSummary, ...]
    classes: tuple[str, ...]
    figures: tuple[str, ...]
    out_dir: Path

    def stats(self) -> dict[str, dict]:
        out: dict[str, dict] = {}
        for name in self.classes:
            peaks = [r.peak(name) for r in self.runs]
            lam = np.array([p[0] for p in peaks])
            share = np.array([r.rise_share(name) for r in self.runs])
            entry: dict[str, object] = {
                "peak_lambda": lam.tolist(), "peak_step": [p[1] for p in peaks], "rise_align_share": share.tolist()}
            if self.mode == "eta_sweep":
                ok = np.isfinite(lam) & (lam > 0)
                etas = np.array([r.peak_lr for r in self.runs])
                entry["peak_lambda_vs_eta"] = fit_power_law(etas[ok], lam[ok])
            else:
                entry["peak_lambda_mean"] = float(np.nanmean(lam)) if np.isfinite(lam).any() else math.nan
                entry["peak_lambda_cv"] = float(np.nanstd(lam) / np.nanmean(lam)) if np.isfinite(lam).sum() > 1 else math.nan
            out[name] = entry
        return out

    def to_dict(self) -> dict[str, object]:
        from hf_weightforces.core.records import json_safe

        return json_safe({
            "mode": self.mode, "out_dir": str(self.out_dir), "figures": list(self.figures),
            "runs": [{"label": r.label, "folder": r.folder, "peak_lr": r.peak_lr, "weight_decay": r.weight_decay,
                      "dynamics": r.dynamics} for r in self.runs],
            "classes": self.stats(),
        })

    def summary(self) -> str:
        lines = [f"{len(self.runs)} runs compared as {'an eta sweep' if self.mode == 'eta_sweep' else 'seeds'}:"]
        for r in self.runs:
            lines.append(f"  {r.label}: peak lr {r.peak_lr:g}, weight decay {r.weight_decay:g}")
        for name, s in self.stats().items():
            if self.mode == "eta_sweep":
                f = s["peak_lambda_vs_eta"]
                lines.append(f"  {name}: peak lambda ∝ eta^{f['exponent']:.3f} (± {f['stderr']:.3f}, {f['points']} runs); "
                             "the sqrt(eta/wd) floor has exponent 0.5")
            else:
                lines.append(f"  {name}: peak lambda {s['peak_lambda_mean']:.5g} (spread {100 * s['peak_lambda_cv']:.2f}% "
                             f"across runs), at steps {s['peak_step']}, rise-phase alignment share "
                             + ", ".join(f"{100 * v:.1f}%" for v in s["rise_align_share"]))
        return "\n".join(lines)


def _summarise(folder: Path, every: int) -> RunSummary:
    rec = read_records(folder)
    if not rec.metrics or rec.schedule is None:
        raise RecordError(f"{folder}: needs the callback's weightforces/metrics.jsonl and schedule.jsonl")
    lr, wd = rec.schedule.lr[:, 0], rec.schedule.weight_decay[:, 0]
    dyn = run_dynamics(None, rec.metrics, rec.schedule, every=every)
    return RunSummary(folder.name, str(folder), float(lr.max()), float(wd.max()), dyn, rec.metrics)


def compare_runs(runs: Sequence[str | Path], *, out_dir: str | Path | None = None, every: int = 0,
                 classes: Sequence[str] = CLASSES, dpi: int = 130) -> Comparison:
    """Overlay ``runs`` (Trainer output_dirs with the callback's records) and write the figures to ``out_dir``
    (default: ``weightforces-compare`` beside the first run)."""
    if len(runs) < 2:
        raise RecordError("comparing runs needs at least two run folders")
    folders = [Path(r) for r in runs]
    for f in folders:
        if not f.is_dir():
            raise RecordError(f"{f}: no such run folder")
    summaries = tuple(_summarise(f, every) for f in folders)
    etas = np.array([s.peak_lr for s in summaries])
    mode = "eta_sweep" if etas.max() > 1.01 * etas.min() else "seeds"
    if mode == "eta_sweep":
        summaries = tuple(sorted(summaries, key=lambda s: s.peak_lr))
    present = tuple(c for c in classes if any(c in s.dynamics for s in summaries))
    out = Path(out_dir) if out_dir is not None else folders[0].parent / "weightforces-compare"
    out.mkdir(parents=True, exist_ok=True)
    comp = Comparison(mode, summaries, present, (), out)
    figures = [_draw_overlay(comp, out / "overlay.png", dpi)]
    if mode == "eta_sweep":
        figures.append(_draw_sweep(comp, out / "eta_sweep.png", dpi))
    return Comparison(mode, summaries, present, tuple(figures), out)


def _figure(cols: int, rows: int, width: float = 4.2, height: float = 3.2):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    return fig, axes


def _draw_overlay(comp: Comparison, file: Path, dpi: int) -> str:
    fig, axes = _figure(max(1, len(comp.classes)), 2)
    for j, name in enumerate(comp.classes):
        for i, run in enumerate(comp.runs):
            label = f"{run.label} (eta {run.peak_lr:g})" if comp.mode == "eta_sweep" else run.label
            d = run.dynamics.get(name)
            if d:
                axes[0][j].plot(d["steps"], d["lambda"], "-o", ms=3, color=f"C{i}", label=label)
            rows = [r for r in run.rows if f"weightforces/{name}/align_share" in r]
            axes[1][j].plot([r["step"] for r in rows], [100 * r[f"weightforces/{name}/align_share"] for r in rows],
                            "-", lw=1, color=f"C{i}", label=label)
        axes[0][j].set(title=f"{name}: Weibull λ(t) (live fits)", xlabel="optimizer step", ylabel="λ")
        axes[1][j].set(title=f"{name}: alignment share", xlabel="optimizer step", ylabel="|A| / (|A|+|I|+|D|)  [%]")
        axes[0][j].legend(fontsize=7)
    fig.suptitle("Runs overlaid: " + ("η sweep" if comp.mode == "eta_sweep" else "seeds of one configuration"))
    fig.savefig(file, dpi=dpi)
    return file.name


def _draw_sweep(comp: Comparison, file: Path, dpi: int) -> str:
    fig, axes = _figure(1, 1, 5.0, 3.8)
    ax = axes[0][0]
    etas = np.array([r.peak_lr for r in comp.runs])
    grid = np.geomspace(etas.min() / 1.3, etas.max() * 1.3, 50)
    for j, (name, s) in enumerate(comp.stats().items()):
        lam = np.array(s["peak_lambda"])
        f = s["peak_lambda_vs_eta"]
        ax.loglog(etas, lam, "o", color=f"C{j}", label=f"{name}: peak λ ∝ η^{f['exponent']:.2f}")
        if math.isfinite(f["exponent"]):
            ax.loglog(grid, f["coefficient"] * grid ** f["exponent"], "-", color=f"C{j}", lw=1)
            mid = len(etas) // 2
            ax.loglog(grid, lam[mid] * np.sqrt(grid / etas[mid]), ":", color=f"C{j}", lw=1)
    ax.set(xlabel="peak learning rate η", ylabel="peak Weibull λ",
           title="Peak λ against η (dotted: the sqrt(η/λ_wd) floor, slope 1/2)")
    ax.legend(fontsize=7)
    fig.savefig(file, dpi=dpi)
    return file.name


def write_run_dynamics(dyn: dict[str, dict], out_dir: str | Path, *, classes: Sequence[str] = CLASSES,
                       dpi: int = 130) -> str | None:
    """``dynamics.png`` of one run: observed and predicted λ(t) per class with the phase bands, and λ/λ*."""
    names = [c for c in classes if c in dyn]
    if not names:
        return None
    fig, axes = _figure(len(names), 2)
    for j, name in enumerate(names):
        d, ax, ax2 = dyn[name], axes[0][j], axes[1][j]
        for ph in d["phases"]:
            for a in (ax, ax2):
                a.axvspan(ph["start"], ph["end"], color=_PHASE_COLORS.get(ph["name"], "#eeeeee"), zorder=0)
            ax.text((ph["start"] + ph["end"]) / 2, 1.0, ph["name"], transform=ax.get_xaxis_transform(),
                    ha="center", va="top", fontsize=7)
        ax.plot(d["steps"], d["lambda"], "o", ms=4, color="C3", label=f"fitted λ ({d['observed']})")
        p = d["prediction"]
        if p is not None:
            pts = p["points"]
            ax.plot([q["step"] for q in pts], [q["lambda_pred"] for q in pts], "-", color="C0",
                    label=f"predicted from forces (log-RMSE {p['log_rmse']:.3f}, max |err| {100 * p['max_abs_err']:.1f}%)")
        ax.set(title=f"{name}: λ(t)", xlabel="optimizer step", ylabel="Weibull λ")
        ax.legend(fontsize=7)
        if d["lambda_star"] is not None:
            ax2.plot(d["steps"], d["lambda_over_lambda_star"], "-o", ms=3, color="C2")
            ax2.set(title=f"{name}: λ / λ*,  λ* = sqrt(η/λ_wd)", xlabel="optimizer step", ylabel="λ / λ*")
        else:
            ax2.set_axis_off()
    fig.suptitle("λ(t): fitted, predicted from the forces, against the moving target, with its phases")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "dynamics.png", dpi=dpi)
    return str(out / "dynamics.png")
