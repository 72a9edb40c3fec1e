"""λ(t) from the forces, the moving target λ* and the phase timeline (Ding, arXiv:2606.19367).

**Prediction** (docs/weibull.md; the research code's ``make_predicted_lambda_fig.py``).  The callback's rows
hold, per aggregate G, the mean A + I + D per optimizer step over the interval since the previous row and
the observed ||w||² (``norm2``) and n (``numel``).  Using only the rows every ``every`` steps (forces
"recorded every N steps"; 0: every row) at steps s_0 < s_1 < ..., from the first used row s_0::

    σ_pred(s_i)² = (||w(s_0)||² + Σ_{j=1..i} F_j (s_j - s_{j-1})) / n
    λ_pred(t)    = σ_pred(t) · (λ/σ)_lock                        the k-lock bridge

with the force F_j that stands for the interval (s_{j-1}, s_j] chosen by the **integration rule**:

* ``right`` (default): F_j = the row at s_j, the interval's own end.  A row holds the mean force over the
  steps since the previous row, so with every row used this integrates every budget step exactly (only
  the dropped rest R is left), and with sparse rows the force used lies inside the interval it stands
  for.  The live ``rms_pred_sampled``/``offset_*_sampled`` keys integrate the same way: the sample at a
  multiple of ``offset_sample_every`` stands for the steps up to it.
* ``left``: F_j = the row at s_{j-1}, the interval's start: the research script's forward-Euler rule
  (its records are single-step forces measured after ``optimizer.step()``, each standing for the steps
  up to the next record).  With its inputs (rows logged every step, ``alignment="post"`` for its
  post-step alignment, ``lock="mean"``) this reproduces the script's λ_pred at every record, its
  log-RMSE and max |err| (:attr:`LambdaPrediction.research`) to float precision.  With every row of a
  run logged every N > 1 steps it lags by one logging interval.

The **lock point** of the k-lock ratio (λ/σ)_lock:

* ``start`` (default): λ/σ of the run's start fit (the step the callback started at, 0 for a fresh run):
  the ratio the live ``offset_bridge_klock``/``offset_total_klock`` keys use, logged with every fitted
  row as ``offset_klock_ratio`` (older records: recovered from ``offset_bridge_klock``); runs without
  live fits fall back to ``first``, and the output says so;
* ``first``: the first fit at or after s_0;
* ``mean``: the mean λ/σ over every fit of the run, the research script's bridge (it uses the future).

The prediction is compared with the fitted λ at every fit after s_0 (checkpoint fits when given, else the
live fits in the rows).  Errors, each relative, with (1 + total) = (1 + integration)(1 + bridge) exactly::

    integration = σ_pred/σ - 1,   bridge = σ (λ/σ)_lock / λ - 1,   total = λ_pred/λ - 1
    log-RMSE = sqrt(mean (ln λ_pred - ln λ)²),   max |err| = max |total|

(σ_pred² is interpolated linearly between used rows.)  The research script instead compares at its record
steps from the first fit on, the anchor included, against λ interpolated linearly between fits: those two
figures are in :attr:`LambdaPrediction.research`.

**Moving target** λ*(t) = sqrt(η_t / λ_wd): at balance of decay and injection (A + I + D = 0 with
I ∝ η² n, D = -2 η λ_wd ||w||²) the RMS scales as sqrt(η/λ_wd), so λ* is the target's shape (its constant
depends on the update statistics; the ratio λ/λ* is reported, not a scaled curve).

**Phases** (the paper's rise, overshoot and relaxation; boundaries from the data, never fixed steps):

* ``plateau``: the leading steps before λ has made 10% of its rise to the peak, when it grew there at less
  than a quarter of its mean rate over the rise (absent when λ rises from the start);
* ``rise``: up to the step of the largest λ (``peak``);
* ``overshoot``: from the peak to the largest λ/λ* after it: λ falls slower than its target does
  (needs a schedule; with a constant lr λ* is flat and the phase is empty);
* ``relaxation``: the rest, λ/λ* falling: λ relaxes towards the target as decay catches up.

With forces, each phase reports the alignment share min / median / max over its rows (the paper: 88-94%
during the rise on Pythia-70M).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = ["LOCKS", "RULES", "LambdaPrediction", "Phase", "lambda_star", "phase_timeline", "predict_lambda",
           "series_from_rows"]

_PREFIX = "weightforces/"
PLATEAU_FRACTION = 0.1  # the plateau ends when λ has made this share of its rise ...
PLATEAU_SLOPE = 0.25  # ... and is one only if λ grew there slower than this fraction of the mean rise rate


def _finite(row: Mapping, key: str) -> float | None:
    v = row.get(key)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


#: Where alignment is evaluated (docs/budget.md, section 6): the exact ``align`` at w_t, or the research
#: code's ``align_post`` = -2η<w_{t+1}, u_t> (adds about 2I a step: what its published offsets integrate).
ALIGNMENTS = {"w_t": "align", "post": "align_post"}

#: Which row's force stands for the interval between two used rows (module docstring).
RULES = ("right", "left")
#: Where the k-lock ratio λ/σ is taken (module docstring).
LOCKS = ("start", "first", "mean")


def series_from_rows(rows: Sequence[Mapping], aggregate: str, alignment: str = "w_t") -> dict[str, np.ndarray]:
    """Per row with forces for ``aggregate``: step, A+I+D per step, norm2, numel, align share, and (NaN where the
    row has no fit) the live Weibull λ and k.  ``alignment``: a key of :data:`ALIGNMENTS`."""
    g = f"{_PREFIX}{aggregate}/"
    out: dict[str, list[float]] = {k: [] for k in ("step", "net", "norm2", "numel", "align_share", "lambda", "k")}
    for row in rows:
        a, i, d = (_finite(row, g + k) for k in (ALIGNMENTS[alignment], "inject", "decay"))
        norm2, numel = _finite(row, g + "norm2"), _finite(row, g + "numel")
        if None in (a, i, d, norm2, numel):
            continue
        out["step"].append(int(row["step"]))
        out["net"].append(a + i + d)
        out["norm2"].append(norm2)
        out["numel"].append(numel)
        total = abs(a) + abs(i) + abs(d)
        out["align_share"].append(abs(a) / total if total > 0 else math.nan)
        out["lambda"].append(_finite(row, g + "weibull_scale") or math.nan)
        out["k"].append(_finite(row, g + "weibull_k") or math.nan)
    return {k: np.asarray(v, dtype=np.int64 if k == "step" else np.float64) for k, v in out.items()}


@dataclass(frozen=True)
class LambdaPrediction:
    """λ(t) predicted from the forces of one aggregate against the fitted λ; see the module docstring."""

    aggregate: str
    every: int
    anchor_step: int
    lock_ratio: float
    observed: str  # "checkpoints" or "live"
    steps: np.ndarray
    sigma: np.ndarray
    sigma_pred: np.ndarray
    lam: np.ndarray
    lam_pred: np.ndarray
    rule: str = "right"
    lock: str = "first"  # the lock point used (``start`` falls back to ``first`` without a live start fit)
    lock_point: str = ""  # in words, with the step and the ratio
    research: dict = field(default_factory=dict)  # the research script's own log-RMSE and max |err|

    @property
    def integration(self) -> np.ndarray:
        return self.sigma_pred / self.sigma - 1.0

    @property
    def bridge(self) -> np.ndarray:
        return self.sigma * self.lock_ratio / self.lam - 1.0

    @property
    def total(self) -> np.ndarray:
        return self.lam_pred / self.lam - 1.0

    @property
    def log_rmse(self) -> float:
        d = np.log(self.lam_pred) - np.log(self.lam)
        return float(np.sqrt(np.mean(d * d))) if d.size else math.nan

    @property
    def max_abs_err(self) -> float:
        return float(np.max(np.abs(self.total))) if self.steps.size else math.nan

    def to_dict(self) -> dict[str, object]:
        def stats(x: np.ndarray) -> dict[str, float]:
            a = np.abs(x)
            return {"median_abs": float(np.median(a)) if a.size else math.nan,
                    "max_abs": float(np.max(a)) if a.size else math.nan}

        return {
            "aggregate": self.aggregate, "every": self.every, "anchor_step": self.anchor_step, "rule": self.rule,
            "lock": self.lock, "lock_point": self.lock_point, "research": dict(self.research),
            "lock_ratio": self.lock_ratio, "observed": self.observed, "log_rmse": self.log_rmse,
            "max_abs_err": self.max_abs_err, "integration": stats(self.integration), "bridge": stats(self.bridge),
            "total": stats(self.total),
            "points": [{"step": int(s), "sigma": float(a), "sigma_pred": float(b), "lambda": float(c),
                        "lambda_pred": float(d), "integration": float(e), "bridge": float(f), "total": float(g)}
                       for s, a, b, c, d, e, f, g in zip(self.steps, self.sigma, self.sigma_pred, self.lam,
                                                          self.lam_pred, self.integration, self.bridge, self.total)],
        }


def live_lock_ratio(rows: Sequence[Mapping], aggregate: str) -> float | None:
    """The k-lock ratio the live callback used for ``aggregate`` (λ/σ of the run's start fit): its
    ``offset_klock_ratio`` key, or, in records written before that key, (1 + offset_bridge_klock) λ/σ of a
    fitted row.  None when the rows have neither."""
    g = f"{_PREFIX}{aggregate}/"
    for row in rows:
        ratio = _finite(row, g + "offset_klock_ratio")
        if ratio is not None and ratio > 0:
            return ratio
    for row in rows:
        bridge, lam, rms = (_finite(row, g + k) for k in ("offset_bridge_klock", "weibull_scale", "rms"))
        if None not in (bridge, lam, rms) and rms > 0 and lam > 0:
            return (1.0 + bridge) * lam / rms
    return None


def integrate_forces(norm2_start: float, net: np.ndarray, steps: np.ndarray, rule: str = "right") -> np.ndarray:
    """||w||² predicted at each used row: ||w(s_0)||² + Σ_j F_j (s_j - s_{j-1}), F_j the row at s_j
    (``right``) or at s_{j-1} (``left``); see the module docstring."""
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    net = np.asarray(net, dtype=np.float64)
    spacing = np.diff(np.asarray(steps)).astype(np.float64)
    force = net[1:] if rule == "right" else net[:-1]
    return norm2_start + np.concatenate([[0.0], np.cumsum(force * spacing)])


def predict_lambda(
    rows: Sequence[Mapping],
    aggregate: str,
    *,
    every: int = 0,
    fits: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    alignment: str = "w_t",
    rule: str = "right",
    lock: str = "start",
) -> LambdaPrediction | None:
    """λ(t) of ``aggregate`` predicted from the forces in ``rows`` (a run's ``metrics.jsonl``).

    ``every``: use only rows whose step is a multiple of it (0: every row).  ``fits``: (steps, λ, σ) from
    checkpoint fits to compare with; default the rows' own live fits.  ``alignment``: the exact A at w_t
    (``"w_t"``) or the research code's post-step ``align_post`` (``"post"``).  ``rule``: which row's force
    stands for each interval, ``"right"`` (its end; exact with every row) or ``"left"`` (its start, the
    research script's).  ``lock``: the k-lock ratio's lock point, ``"start"`` (the live keys' ratio, the
    run's start fit), ``"first"`` (the first fit at or after the anchor) or ``"mean"`` (the mean over every
    fit, the research script's).  With ``rule="left"``, ``lock="mean"`` and ``alignment="post"`` on rows
    logged every step, λ_pred at every used row and :attr:`LambdaPrediction.research` are what
    ``make_predicted_lambda_fig.py`` computes from the same forces and fits.  None when the rows have no
    forces or fewer than two fits for this aggregate after the anchor.
    """
    if lock not in LOCKS:
        raise ValueError(f"lock must be one of {LOCKS}, got {lock!r}")
    s = series_from_rows(rows, aggregate, alignment)
    if s["step"].size == 0:
        return None
    keep = np.ones(s["step"].size, dtype=bool) if every <= 0 else s["step"] % every == 0
    steps, net, numel = s["step"][keep], s["net"][keep], s["numel"][keep]
    if steps.size < 2:
        return None
    norm2_pred = integrate_forces(s["norm2"][keep][0], net, steps, rule)
    with np.errstate(invalid="ignore"):
        sigma_pred_rows = np.sqrt(np.where(norm2_pred >= 0, norm2_pred, np.nan) / numel)
    if fits is None:
        has = np.isfinite(s["lambda"])
        all_steps, all_lam = s["step"][has], s["lambda"][has]
        all_sigma = np.sqrt(s["norm2"][has] / s["numel"][has])
        observed = "live"
    else:
        all_steps, all_lam, all_sigma = (np.asarray(a) for a in fits)
        observed = "checkpoints"
    valid = np.isfinite(all_lam) & (all_lam > 0) & np.isfinite(all_sigma) & (all_sigma > 0)
    all_steps, all_lam, all_sigma = all_steps[valid], all_lam[valid], all_sigma[valid]
    inside = (all_steps >= steps[0]) & (all_steps <= steps[-1])
    f_steps, f_lam, f_sigma = all_steps[inside], all_lam[inside], all_sigma[inside]
    if f_steps.size < 2:
        return None
    used = lock
    if lock == "start":
        ratio = live_lock_ratio(rows, aggregate)
        if ratio is not None:
            point = f"λ/σ = {ratio:.5f} of the run's start fit (the live offset keys' lock)"
        else:
            used = "first"
    if used == "first":
        ratio = float(f_lam[0] / f_sigma[0])
        point = f"λ/σ = {ratio:.5f} of the first fit at or after the anchor (step {int(f_steps[0])})" + (
            "; the rows carry no live start fit" if lock == "start" else "")
    elif used == "mean":
        ratio = float(np.mean(all_lam / all_sigma))
        point = f"λ/σ = {ratio:.5f}, the mean over all {all_lam.size} fits (steps {int(all_steps[0])}-" \
                f"{int(all_steps[-1])}; the research script's bridge, uses the future)"
    sig_pred = np.sqrt(np.interp(f_steps, steps, sigma_pred_rows ** 2))
    # the research script's own figures: at the used rows from the first fit on, λ interpolated between fits
    lam_rows = np.interp(steps, all_steps, all_lam)
    mask = steps >= all_steps.min()
    resid = sigma_pred_rows[mask] * ratio / lam_rows[mask] - 1.0
    research = {
        "log_rmse": float(np.sqrt(np.mean((np.log(sigma_pred_rows[mask] * ratio) - np.log(lam_rows[mask])) ** 2))),
        "max_abs_err": float(np.max(np.abs(resid))),
        "steps": steps.tolist(),
        "lambda_pred": (sigma_pred_rows * ratio).tolist(),
    }
    return LambdaPrediction(aggregate, int(every), int(steps[0]), ratio, observed, f_steps[1:], f_sigma[1:],
                            sig_pred[1:], f_lam[1:], sig_pred[1:] * ratio, rule, used, point, research)


def lambda_star(schedule, steps: np.ndarray) -> np.ndarray:
    """λ* = sqrt(η_t / λ_wd) of optimizer group 0 (weight matrices) at ``steps`` (NaN outside the schedule
    or where the decay is 0)."""
    steps = np.asarray(steps, dtype=np.int64)
    out = np.full(steps.shape, np.nan)
    ok = (steps >= schedule.first_step) & (steps <= schedule.last_step)
    idx = steps[ok] - schedule.first_step
    lr, wd = schedule.lr[idx, 0], schedule.weight_decay[idx, 0]
    with np.errstate(divide="ignore", invalid="ignore"):
        out[ok] = np.where(wd > 0, np.sqrt(lr / wd), np.nan)
    return out


@dataclass(frozen=True)
class Phase:
    name: str
    start: int
    end: int
    align_share: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "start": self.start, "end": self.end, "align_share": self.align_share}


def phase_timeline(
    steps: np.ndarray,
    lam: np.ndarray,
    target: np.ndarray | None = None,
    share: tuple[np.ndarray, np.ndarray] | None = None,
) -> list[Phase]:
    """Phases of one λ(t) series (module docstring); ``target`` λ* at the same steps, ``share`` the
    (steps, align share) of the rows for the per-phase alignment statistics."""
    steps, lam = np.asarray(steps), np.asarray(lam, dtype=np.float64)
    ok = np.isfinite(lam)
    steps, lam = steps[ok], lam[ok]
    if target is not None:
        target = np.asarray(target, dtype=np.float64)[ok]
    if steps.size < 2:
        return []
    peak = int(np.argmax(lam))
    rise = lam[peak] - lam[0]
    bounds: list[tuple[str, int, int]] = []
    start = 0
    if rise > 0:
        start = int(np.argmax(lam - lam[0] >= PLATEAU_FRACTION * rise))
        mean_slope = rise / float(steps[peak] - steps[0])
        before = start - 1  # the last point still inside the first 10%
        lead_slope = (lam[before] - lam[0]) / float(steps[before] - steps[0]) if before > 0 else math.inf
        if lead_slope < PLATEAU_SLOPE * mean_slope:
            bounds.append(("plateau", 0, start))
        else:
            start = 0
    bounds.append(("rise", start, peak))
    if peak < steps.size - 1:
        relax_from = peak
        if target is not None and np.isfinite(target[peak:]).all():
            relax_from = peak + int(np.argmax(lam[peak:] / target[peak:]))
            if relax_from > peak:
                bounds.append(("overshoot", peak, relax_from))
        if relax_from < steps.size - 1:
            bounds.append(("relaxation", relax_from, steps.size - 1))
    phases = []
    for name, a, b in bounds:
        stats: dict[str, float] = {}
        if share is not None:
            s_steps, s_val = np.asarray(share[0]), np.asarray(share[1], dtype=np.float64)
            lo = steps[a] if a == 0 else steps[a] + 1  # a phase owns the rows after its start
            pick = s_val[(s_steps >= lo) & (s_steps <= steps[b]) & np.isfinite(s_val)]
            if pick.size:
                stats = {"min": float(pick.min()), "median": float(np.median(pick)), "max": float(pick.max()),
                         "rows": int(pick.size)}
        phases.append(Phase(name, int(steps[a]), int(steps[b]), stats))
    return phases


def run_dynamics(traj, rows: Sequence[Mapping] | None, schedule, *, every: int = 0,
                 alignment: str = "w_t", rule: str = "right", lock: str = "start") -> dict[str, dict]:
    """Per aggregate of ``traj`` (a :class:`~hf_weightforces.analysis.scale.ScaleTrajectory`; or, without it,
    of the rows): the prediction from ``rows`` (the run's metrics; None: no forces), λ* from ``schedule``
    (None: no target) and the phases of the observed λ(t) (checkpoint fits, else the live fits)."""
    names = traj.names("group") if traj is not None else sorted(
        {k.split("/")[1] for k in (rows[0] if rows else {}) if k.endswith("/align") and k.count("/") == 2})
    out: dict[str, dict] = {}
    for name in names:
        fits = None
        if traj is not None:
            f_steps, _, f_lam, f_sigma = traj.series(name)
            ok = np.isfinite(f_lam)
            fits = (f_steps[ok], f_lam[ok], f_sigma[ok]) if ok.sum() >= 2 else None
        series = series_from_rows(rows, name) if rows else None
        pred = predict_lambda(rows, name, every=every, fits=fits, alignment=alignment, rule=rule,
                              lock=lock) if rows else None
        if fits is not None:
            steps, lam = fits[0], fits[1]
        elif series is not None and np.isfinite(series["lambda"]).sum() >= 2:
            has = np.isfinite(series["lambda"])
            steps, lam = series["step"][has], series["lambda"][has]
        else:
            continue
        target = lambda_star(schedule, steps) if schedule is not None else None
        share = (series["step"], series["align_share"]) if series is not None and series["step"].size else None
        phases = phase_timeline(steps, lam, target, share)
        out[name] = {
            "observed": "checkpoints" if fits is not None else "live",
            "steps": steps.tolist(), "lambda": lam.tolist(),
            "lambda_star": None if target is None else target.tolist(),
            "lambda_over_lambda_star": None if target is None else (lam / target).tolist(),
            "phases": [p.to_dict() for p in phases],
            "prediction": None if pred is None else pred.to_dict(),
        }
    return out


def format_dynamics(dyn: dict[str, dict], schedule_source: str | None) -> str:
    """Plain text: per aggregate the prediction's errors and the phase timeline."""
    lines = ["λ(t) dynamics: prediction from the forces (k-lock bridge), moving target λ* = sqrt(η/λ_wd), "
             f"phases from the data; schedule: {schedule_source or 'none (no λ*, no overshoot phase)'}"]
    for name, d in dyn.items():
        p = d["prediction"]
        if p is not None:
            used = f"every {p['every']} steps" if p["every"] else "every logged row"
            lines.append(f"  {name}: {p['rule']}-point rule; k-lock at {p['lock']}: {p['lock_point']}")
            lines.append(
                f"  {name}: predicted from the forces of {used} vs {p['observed']} fits: "
                f"log-RMSE {p['log_rmse']:.4f}, max |err| {100 * p['max_abs_err']:.2f}%, integration "
                f"{100 * p['integration']['median_abs']:.2f}% (max {100 * p['integration']['max_abs']:.2f}%), "
                f"bridge {100 * p['bridge']['median_abs']:.2f}% (max {100 * p['bridge']['max_abs']:.2f}%)")
        parts = []
        for ph in d["phases"]:
            share = ph["align_share"]
            extra = f", align {100 * share['min']:.0f}-{100 * share['max']:.0f}%" if share else ""
            parts.append(f"{ph['name']} {ph['start']}-{ph['end']}{extra}")
        lines.append(f"  {name} phases ({d['observed']} λ): " + ("; ".join(parts) if parts else "too few points"))
    return "\n".join(lines)


def dynamics_of_run(paths, traj, *, records=None, preset: str | None = None, every: int = 0,
                    alignment: str = "w_t", rule: str = "right",
                    lock: str = "start") -> tuple[dict[str, dict], str | None]:
    """:func:`run_dynamics` for the checkpoints ``paths`` that ``traj`` fitted: the run's records (``records``,
    else found beside local checkpoints), its schedule record, else the ``preset`` (given, or inferred from a
    Hub repository id).  Returns the dynamics and where the schedule came from (None: no schedule)."""
    from hf_weightforces.analysis.hub import HubCheckpoints
    from hf_weightforces.analysis.presets import get_preset, preset_for_repo
    from hf_weightforces.analysis.records import locate_records, read_records

    hub = isinstance(paths, HubCheckpoints)
    folder = records if records is not None or hub else locate_records(paths, list(traj.checkpoints))
    rec = read_records(folder)
    schedule = rec.schedule
    if schedule is None:
        name = preset or (preset_for_repo(paths.repo_id) if hub else None)
        schedule = get_preset(name).schedule() if name else None
    return (run_dynamics(traj, rec.metrics, schedule, every=every, alignment=alignment, rule=rule, lock=lock),
            None if schedule is None else schedule.source)
