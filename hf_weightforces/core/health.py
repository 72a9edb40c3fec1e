"""Health verdicts: named conditions read from the force budget's metric rows (docs/health.md).

Pure: no transformers, no wandb, no files.  The live callback (``integrations/health.py``) and the
offline ``hf-weightforces diagnose RUN_DIR`` (``analysis/run_health.py``) both feed the rows the monitor
writes at each log event (``{"weightforces/<aggregate>/<key>": value}``, :meth:`ForceMonitor.summarize`)
through one :class:`HealthState`, in step order, so they give the same verdicts.

Conditions (thresholds derived in docs/health.md):

* ``nonfinite``: non-finite budget terms (``nonfinite_steps`` > 0) or a non-finite ``norm2``;
* ``decay_not_applied``: the decay PyTorch applied so far differs from the decay asked for by more
  than a factor of 2 either way (0 when lr x wd is below float32 resolution near 1);
* ``rounding_loss``: rounding of the stored weights takes more than half of the change of ||w||^2 the
  update intended (|A| + |I| + |D|) and more than twice what float32 rounding can take;
* ``external_change``: |closure| above 16 times its float32 floor 2^-22 (||w||^2 + 4 ||w|| sqrt(I)) per
  step: something besides the optimizer changed the weights;
* ``decay_dominates``: decay is more than twice alignment and injection together (decay share above
  2/3, so the equilibrium ||w||^2 is below half the current one), has been at every log event so far
  (the norm was never near its balance: not the annealing of a run that was), and its e-folding time
  ||w||^2 / |D| is shorter than the run so far.

Each (condition, aggregate) is raised at the first log event where it holds and cleared after
:attr:`HealthState.clear_after` consecutive events on the healthy side of a second, looser threshold
(hysteresis): one event when it starts, one when it ends.  Rows with non-finite forces are no
evidence for the other conditions (their state is kept).  Only :data:`WATCHED` aggregates are read:
the classes, ``matrices``, ``total`` and ``adapters``, not layers or single matrices (one cause would
be raised once per layer; every layer's tensors are in a class and in ``total``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

__all__ = ["CONDITIONS", "EXTERNAL_FACTOR", "MULTIPLICATIVE", "WATCHED", "Condition", "Episode", "HealthEvent", "HealthState",
           "closure_floor", "format_summary", "fmt_value", "worse"]

#: Aggregates whose rows are watched, in report order.
WATCHED: tuple[str, ...] = ("total", "matrices", "transmission", "selection", "value", "embedding", "other",
                            "adapters")

#: Decay rules whose ``decay_ratio`` is the applied over the asked decay (coupled decay sits inside A
#: and I, schedule-free's inside its update: their ratio is 0 by construction, docs/optimizers.md).
MULTIPLICATIVE = (None, "mul", "add")
#: Float32 unit roundoff.
U32 = 2.0**-24
#: external_change (and the floor part of rounding_loss) raise above this many floors ...
EXTERNAL_FACTOR = 16.0
#: ... and clear below this many.
EXTERNAL_CLEAR = 8.0
#: rounding_loss also needs |rounding| above this many floors (float32-held weights never get there) ...
ROUNDING_FACTOR = 2.0
#: ... and clears below this many.
ROUNDING_CLEAR = 1.0


def closure_floor(norm2: float, inject: float) -> float:
    """The most float32 arithmetic can put into ``closure`` (or ``rounding``) per step, first order in u = 2^-24.

    PyTorch's AdamW stores w' = fl(fl(c w) - fl(η u)) in float32: each element is off by at most
    u|c w| (the decay product) + u|w'| (the final addition) + ~6u η|u_i| (the update's division,
    square root, scaling and the monitor's own float32 ũ), so the rebuilt w_t is off by e/c and
    ||w_t||^2 by 2<w, e>/c <= 4u ||w||^2 + 16u Σ|w_i| η|u_i| <= 4u (||w||^2 + 4 ||w|| sqrt(I)),
    I = η^2 ||u||^2 (Cauchy-Schwarz, also over the tensors of an aggregate).  docs/health.md.
    """
    if not (math.isfinite(norm2) and math.isfinite(inject)):
        return math.nan
    return 4.0 * U32 * (max(norm2, 0.0) + 4.0 * math.sqrt(max(norm2, 0.0) * max(inject, 0.0)))


@dataclass(frozen=True)
class Condition:
    """One named condition: what its value is, when it raises and clears, why it matters, what to do."""

    name: str
    value: str  # what the reported value is
    threshold: float  # raise beyond this
    clear: float  # clear back on the healthy side of this
    reason: str  # one line
    remedy: str  # one line


CONDITIONS: dict[str, Condition] = {c.name: c for c in (
    Condition(
        "nonfinite", "non-finite budget steps in the interval (norm2 not finite counts as all of them)", 0.0, 0.0,
        "non-finite budget terms or weights: the forces of these steps are NaN and left out of every sum",
        "look for an overflow (fp16 without a loss scaler, a too-large lr) or a NaN/inf in the data or the loss; "
        "lower the lr, clip gradients, or use bf16/fp32"),
    Condition(
        "decay_not_applied", "decay applied / decay asked for, summed over the run so far", 2.0, 1.5,
        "the weight decay PyTorch applies differs from the one asked for by more than a factor of 2 "
        "(lr x weight_decay below float32 resolution near 1: c = fl32(1 - lr*wd) rounds to 1 below 2.98e-8)",
        "raise weight_decay so that lr x weight_decay >= 6e-8 (>= 6e-7 for a decay within 5% of the one asked), "
        "or set weight_decay 0 to say there is none"),
    Condition(
        "rounding_loss", "|rounding| / (|align| + |inject| + |decay|) of the interval", 0.5, 0.4,
        "rounding of the stored weights takes more than half of the change of ||w||^2 the update intended: "
        "these parameters barely train",
        "keep float32 master weights (load the model in float32 and train with bf16=True / fp16=True, i.e. "
        "autocast) or use an optimizer that keeps a float32 copy or stochastic rounding; or raise the lr"),
    Condition(
        "external_change", "|closure| / its float32 floor 2^-22 (||w||^2 + 4 ||w|| sqrt(inject)) per step",
        EXTERNAL_FACTOR, EXTERNAL_CLEAR,
        "the closure sits far above its float32 floor: something besides the optimizer changed the weights "
        "between steps (a clip, projection, EMA swap, manual p.data edit), or the lr or decay the optimizer "
        "reports is not the one it applied",
        "find the code that writes to the weights outside optimizer.step() (callbacks, hooks, "
        "p.data edits) or the scheduler/optimizer that reports a different lr; if intended, read the forces "
        "of these steps as incomplete"),
    Condition(
        "decay_dominates", "decay_share = |decay| / (|align| + |inject| + |decay|)", 2.0 / 3.0, 0.6,
        "decay has removed more than twice what alignment and injection add at every log event so far: the "
        "equilibrium ||w||^2 of AdamW is below half the current one and the norm falls toward it in less time "
        "than the run has lasted",
        "if the shrinking is not intended, lower weight_decay (the equilibrium ||w||^2 scales as "
        "(align + inject) / (2 lr wd)) or exclude these parameters from decay"),
)}


def fmt_value(condition: str, value: float) -> str:
    """A condition's value in words that cannot be misread."""
    if not math.isfinite(value):
        return "non-finite"
    if condition == "external_change":
        return f"closure {value:.3g}x its float32 floor"
    if condition == "rounding_loss":
        return f"rounding {100 * value:.1f}% of |A|+|I|+|D|"
    if condition == "decay_not_applied":
        return f"decay applied {value:.3g}x the decay asked for"
    if condition == "decay_dominates":
        return f"decay share {100 * value:.1f}%"
    return f"{value:g} non-finite step{'' if value == 1 else 's'}"


@dataclass(frozen=True)
class HealthEvent:
    """One raise or clear: what ``health.jsonl`` holds, one line each."""

    step: int
    condition: str
    aggregate: str
    state: str  # "raised" or "cleared"
    value: float
    threshold: float
    message: str

    def to_json(self) -> dict:
        value = self.value if math.isfinite(self.value) else None
        return {"step": self.step, "condition": self.condition, "aggregate": self.aggregate, "state": self.state,
                "value": value, "threshold": self.threshold, "message": self.message}


@dataclass
class Episode:
    """One (condition, aggregate) from its raise to its clear (``cleared`` None while raised)."""

    condition: str
    aggregate: str
    raised: int
    value: float  # at the raise
    worst: float
    cleared: int | None = None


@dataclass
class _Track:
    raised: bool = False
    healthy_events: int = 0
    episode: Episode | None = None


@dataclass
class _DecaySums:
    applied: float = 0.0  # Σ decay x steps
    asked: float = 0.0  # Σ nominal decay x steps (an upper bound for intervals that applied none)
    bounded: bool = False  # some of ``asked`` is that upper bound
    per_norm: float | None = None  # |decay| / ||w||^2 of the last interval that applied decay


def _finite(*xs: float | None) -> bool:
    return all(x is not None and isinstance(x, (int, float)) and math.isfinite(x) for x in xs)


def worse(condition: str, a: float, b: float) -> bool:
    """Whether value ``a`` is worse than ``b`` (decay_not_applied: further from 1 by a factor)."""
    if condition == "decay_not_applied":
        off = lambda x: math.inf if x <= 0 else max(x, 1 / x)  # noqa: E731
        return off(a) > off(b)
    return a > b


@dataclass
class HealthState:
    """The verdicts of one run, fed its rows in step order (:meth:`update`)."""

    clear_after: int = 2
    prefix: str = "weightforces"
    #: how the optimizer applies weight decay (params.json ``budget.decay_rule``, docs/optimizers.md);
    #: decay_not_applied is read only for a multiplicative one (``mul``, ``add``; None: not told, AdamW)
    decay_rule: str | None = None
    aggregates: tuple[str, ...] = WATCHED
    tracks: dict[tuple[str, str], _Track] = field(default_factory=dict)
    episodes: list[Episode] = field(default_factory=list)
    events: list[HealthEvent] = field(default_factory=list)
    last_step: int = -1
    _decay: dict[str, _DecaySums] = field(default_factory=dict)
    _balanced: set[str] = field(default_factory=set)  # decay_dominates: aggregates once near their balance

    # ------------------------------------------------------------------ evaluation
    def update(self, metrics: Mapping[str, float], step: int) -> list[HealthEvent]:
        """Evaluate one row (the metrics of one log event); returns the raises and clears it caused.
        Rows at or before the last step seen are ignored (the files never hold a step twice)."""
        step = int(step)
        if step <= self.last_step:
            return []
        self.last_step = step
        out: list[HealthEvent] = []
        steps = _num(metrics.get(f"{self.prefix}/steps"))
        for agg in self.aggregates:
            prefix = f"{self.prefix}/{agg}/"
            if prefix + "norm2" not in metrics and prefix + "nonfinite_steps" not in metrics:
                continue
            row = {k: _num(metrics.get(prefix + k)) for k in _KEYS}
            for name, verdict in self._verdicts(agg, row, steps, step).items():
                out += self._advance(name, agg, step, verdict)
        self.events += out
        return out

    def _verdicts(self, agg: str, row: dict[str, float | None], steps: float | None,
                  step: int) -> dict[str, tuple[bool, bool, float, str]]:
        """Per condition with evidence in this row: ``(bad, healthy, value, detail)``; ``detail`` makes
        the sentence for a raise or a clear (most rows raise and clear nothing: no sentence made)."""
        align, inject, decay, rest = row["align"], row["inject"], row["decay"], row["rest"]
        norm2, nonfinite = row["norm2"], row["nonfinite_steps"]
        forces_ok = _finite(align, inject, decay) and (nonfinite is None or nonfinite == 0)
        out: dict[str, tuple[bool, bool, float, str]] = {}

        # nonfinite: a count, no threshold to derive
        n = nonfinite if _finite(nonfinite) else 0.0
        bad_norm = norm2 is not None and not math.isfinite(norm2)
        out["nonfinite"] = (n > 0 or bad_norm, n == 0 and not bad_norm, math.nan if bad_norm and n == 0 else n,
                            lambda: "||w||^2 is not finite" if bad_norm and n == 0
                            else f"{n:g} budget step(s) with non-finite terms")
        if not forces_ok or not _finite(norm2):
            return out  # no evidence for the others: their state is kept

        budget = abs(align) + abs(inject) + abs(decay)  # the change of ||w||^2 the update carries, gross
        floor = closure_floor(norm2, inject)

        # decay_not_applied: over the run so far, weighted by the decay asked for
        ratio = row["decay_ratio"]
        sums = self._decay.setdefault(agg, _DecaySums())
        if self.decay_rule in MULTIPLICATIVE and _finite(ratio, steps) and steps > 0:
            if ratio != 0:
                sums.applied += decay * steps
                sums.asked += decay / ratio * steps
                if decay != 0:
                    sums.per_norm = abs(decay) / norm2
            elif decay == 0:  # none applied: the asked decay is at most half a float32 step (docs/health.md)
                limit = 2.0**-24 if sums.per_norm is None else min(2.0**-24, sums.per_norm / 2)
                sums.asked -= limit * norm2 * steps
                sums.bounded = True
            run = sums.applied / sums.asked + 0.0 if sums.asked != 0 else math.nan  # + 0.0: no -0.0
            if math.isfinite(run):
                c = CONDITIONS["decay_not_applied"]
                off = math.inf if run <= 0 else max(run, 1 / run)
                applied, asked, bounded = sums.applied, sums.asked, sums.bounded
                out["decay_not_applied"] = (off > c.threshold, off < c.clear, run, lambda: (
                    f"this interval's decay_ratio {ratio:.3g}; over the run {abs(applied):.3g} applied of "
                    f"{'at most ' if bounded else ''}{abs(asked):.3g} asked (sums of |decay| x steps)"))

        # rounding_loss: more than half the intended change, and more than float32 rounding can take
        rounding = row["rounding"]
        if _finite(rounding) and budget > 0 and floor > 0:
            c = CONDITIONS["rounding_loss"]
            frac = abs(rounding) / budget
            intended = align + inject + decay + (rest if _finite(rest) else 0.0)
            out["rounding_loss"] = (frac > c.threshold and abs(rounding) > ROUNDING_FACTOR * floor,
                                    frac < c.clear or abs(rounding) < ROUNDING_CLEAR * floor, frac, lambda: (
                                        f"rounding {rounding:.3g}/step of an intended change {intended:.3g}/step, "
                                        f"|A|+|I|+|D| {budget:.3g}/step; {abs(rounding) / floor:.3g}x the float32 floor"))

        # external_change
        closure = row["closure"]
        if _finite(closure) and floor > 0:
            times = abs(closure) / floor
            out["external_change"] = (times > EXTERNAL_FACTOR, times < EXTERNAL_CLEAR, times, lambda: (
                f"closure {closure:.3g}/step against a float32 floor of {floor:.3g}/step at ||w||^2 {norm2:.4g}"))

        # decay_dominates
        if decay < 0 and budget > 0:
            c = CONDITIONS["decay_dominates"]
            share = abs(decay) / budget
            tau = norm2 / abs(decay)  # budget steps for ||w||^2 to fall by e under decay alone: 1 / (2 d)
            never_balanced = agg not in self._balanced
            out["decay_dominates"] = (share > c.threshold and tau < step and never_balanced,
                                      share < c.clear or tau > 2 * step, share, lambda: (
                                          f"e-folding time ||w||^2/|D| = {tau:.3g} steps at step {step}; "
                                          + _equilibrium((align + inject) / abs(decay), tau)))
        if budget > 0 and abs(decay) <= CONDITIONS["decay_dominates"].threshold * budget:
            self._balanced.add(agg)  # alignment + injection held decay to 2/3 of the budget at least once
        return out

    def _advance(self, name: str, agg: str, step: int, verdict) -> list[HealthEvent]:
        if verdict is None:
            return []
        bad, healthy, value, detail = verdict
        track = self.tracks.setdefault((name, agg), _Track())
        c = CONDITIONS[name]
        if not track.raised:
            if not bad:
                return []
            track.raised, track.healthy_events = True, 0
            track.episode = Episode(name, agg, step, value, value)
            self.episodes.append(track.episode)
            msg = f"{name} on {agg} at step {step}: {fmt_value(name, value)} ({detail()}); {c.reason}. Remedy: {c.remedy}."
            return [HealthEvent(step, name, agg, "raised", value, c.threshold, msg)]
        if worse(name, value, track.episode.worst):
            track.episode.worst = value
        track.healthy_events = track.healthy_events + 1 if healthy else 0
        if track.healthy_events < self.clear_after:
            return []
        track.raised = False
        track.episode.cleared = step
        msg = (f"{name} on {agg} cleared at step {step}: {fmt_value(name, value)} ({detail()}), healthy for "
               f"{self.clear_after} log events")
        return [HealthEvent(step, name, agg, "cleared", value, c.clear, msg)]

    # ------------------------------------------------------------------ reading
    def feed(self, rows: Iterable[Mapping[str, float]]) -> HealthState:
        """:meth:`update` with every row (each with its ``step``), in order; returns self."""
        for row in rows:
            self.update(row, int(row["step"]))
        return self

    @property
    def active(self) -> list[Episode]:
        return [e for e in self.episodes if e.cleared is None]

    def to_dict(self) -> dict:
        return {"last_step": self.last_step, "thresholds": {
                    n: {"value": c.value, "raise": c.threshold, "clear": c.clear, "reason": c.reason, "remedy": c.remedy}
                    for n, c in CONDITIONS.items()},
                "episodes": [{"condition": e.condition, "aggregate": e.aggregate, "raised": e.raised,
                              "cleared": e.cleared, "value": _json(e.value), "worst": _json(e.worst)}
                             for e in self.episodes],
                "events": [e.to_json() for e in self.events]}


_KEYS = ("align", "inject", "decay", "rest", "rounding", "closure", "decay_ratio", "norm2", "nonfinite_steps")


def _equilibrium(rho: float, tau: float) -> str:
    """Where ||w||^2 goes with the current forces: A + I + D = 0 at rho times the current ||w||^2."""
    if rho <= 0:
        return "no equilibrium: alignment and injection do not grow the norm"
    reach = tau * math.log(abs(1 - rho) / (0.1 * rho)) if abs(1 - rho) > 0.1 * rho else 0.0
    return f"equilibrium ||w||^2 {rho:.3g}x the current one, within 10% of it in ~{reach:.3g} steps"


def _num(x) -> float | None:
    if x is None or isinstance(x, bool):
        return None
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def _json(x: float) -> float | None:
    return x if math.isfinite(x) else None


def format_summary(state: HealthState) -> list[str]:
    """One line per condition seen: where, when, the worst value, the remedy; empty when none was raised."""
    by: dict[str, list[Episode]] = {}
    for e in state.episodes:
        by.setdefault(e.condition, []).append(e)
    lines = []
    for name in CONDITIONS:
        eps = by.get(name)
        if not eps:
            continue
        c = CONDITIONS[name]
        worst = eps[0]
        for e in eps[1:]:
            if worse(name, e.worst, worst.worst):
                worst = e
        where = ", ".join(f"{e.aggregate} (steps {e.raised}-{e.cleared})" if e.cleared is not None else
                          f"{e.aggregate} (from step {e.raised}, still raised at {state.last_step})" for e in eps)
        lines.append(f"{name}: {where}; worst {fmt_value(name, worst.worst)} on {worst.aggregate}. Remedy: {c.remedy}")
    return lines
