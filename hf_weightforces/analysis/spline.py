"""Spline displacement: the alignment force of AdamW from sparse checkpoints (docs/spline.md).

Given checkpoints w(t_1), ..., w(t_K) and the lr η_s and decoupled weight decay λ_s of every
optimizer step s (step s takes w(s-1) to w(s)), fit a cubic spline W through the checkpoints and
read, at every step between the first and last checkpoint (Ding, arXiv:2606.19367)::

    u_hat = -(W(s) - W(s-1)) / η_s - λ_s W(s-1),        A_hat = -2 η_s <W(s-1), u_hat>

which needs no division: A_hat = 2<W(s-1), dW> + 2 η λ ||W(s-1)||² with dW = W(s) - W(s-1), and
likewise I_hat = ||dW + η λ W(s-1)||², D_hat = -2 η λ ||W(s-1)||².  Estimators, all per tensor and
per step, summed into classes, layers and matrices like the live callback's rows:

``spline``
    the paper's: a not-a-knot cubic spline along the step axis.
``spline_lr``
    the same spline along cumulative lr, τ(s) = Σ_{r<=s} η_r (per optimizer param group).  AdamW
    moves each weight by about η|u| per step, so w is far smoother in τ than in steps (warm-up,
    decay to zero); the step-axis spline overshoots where the lr changes fast.
``corrected``
    ``spline_lr`` with the injection it cannot see put back.  Any interpolant through exact
    checkpoints keeps the interval sum of A + I + D + R (it is the observed change of ||w||²), so
    its alignment error is the injection it misses: A_corr = A_hat + I_hat - Î (docs/spline.md).
    Î models Adam's update as drift plus noise: per coordinate E[u²] ≈ c_t + (1 - c_t) ū² with
    ū the drift the spline sees and c_t = (1-β1)/(1+β1) · (1+β1^t)/(1-β1^t) the mean square of
    the bias-corrected momentum of pure noise at optimizer step t (the the docs' noise floor, made
    exact for early steps).  Summed over the *active* coordinates (those that moved by more than
    their weight decay between two checkpoints: embedding rows of tokens never seen have u = 0):
    Î = c_t η² n_active + (1 - c_t) I_hat(active).
``two_point``
    the naive baseline: u_2 = -(w(t_hi) - w(t_lo)) / Σ η - λ̄ w(t_lo) on each checkpoint interval
    (λ̄ the lr-weighted mean decay) and A_2 = -2 η_s <w(t_lo), u_2>.
``two_point_interp``
    the same u_2 with w linearly interpolated in τ between the two checkpoints instead of w(t_lo).

How it is computed.  The spline is linear in its knot values: on interval k, W(h) = Σ_a h^a B_k[a] Z
with Z the first checkpoint and the consecutive differences, and B_k a 4 x K matrix from the knots.
So every sum over coordinates is a quadratic form in the K x K Gram matrix Z Zᵀ of each tensor
(and of its active coordinates per interval): the per-step work is O(16) per tensor, whatever the
model size, and the weights are read once, one checkpoint and one tensor at a time.  Memory is the
coordinate subsample, K x ``sample_size`` values (all coordinates when the model is smaller), plus
a dozen float64 arrays of (steps between the first and last checkpoint) x (tensors) for the
per-step estimates; sums over a tensor's subsample are scaled by numel / sampled.

Accuracy against the live callback's truth: :func:`accuracy`.
"""

from __future__ import annotations

import logging
import math
import os
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from hf_weightforces.analysis.checkpoints import iter_tensors
from hf_weightforces.analysis.hub import checkpoint_label
from hf_weightforces.analysis.records import (
    Checkpoint,
    ParamsRecord,
    RecordError,
    Schedule,
    truth_intervals,
)
from hf_weightforces.core.aggregates import aggregate_masks
from hf_weightforces.core.groups import Grouping, canonical_name, layer_index
from hf_weightforces.core.records import json_safe

__all__ = [
    "DEFAULT_SAMPLE",
    "ESTIMATORS",
    "POST_ESTIMATORS",
    "MIN_CHECKPOINTS",
    "ORACLE",
    "SplineReport",
    "analyze",
    "format_spline",
    "Accuracy",
    "CheckpointSample",
    "SampledTensor",
    "SplineForces",
    "accuracy",
    "sample_checkpoints",
    "spline_forces",
]

log = logging.getLogger(__name__)

ESTIMATORS: tuple[str, ...] = ("spline", "spline_lr", "corrected", "two_point", "two_point_interp", "spline_post")
#: The estimators of the research code's convention, A at the post-step weights (docs/budget.md):
#: compared with the logged ``align_post`` as well as with ``align``.
POST_ESTIMATORS: tuple[str, ...] = ("spline_post",)
#: Not an estimator: the true A summed over each checkpoint interval, spread over its logged rows
#: in proportion to Σ η.  The best any estimator that only knows the checkpoints can do per row.
ORACLE = "interval_oracle"
#: A not-a-knot cubic spline needs four knots to be a cubic (three give a parabola).
MIN_CHECKPOINTS = 4
#: Coordinates kept per checkpoint by default (all of them for smaller models).
DEFAULT_SAMPLE = 1_000_000
_CHUNK = 1 << 18  # coordinates per Gram chunk: float64 temporaries of K x 2^18 values


# ----------------------------------------------------------------------------------------------
# Reading the checkpoints: a seeded coordinate subsample, one tensor at a time
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SampledTensor:
    """One monitored tensor and where its sampled coordinates sit in :attr:`CheckpointSample.values`."""

    name: str  # the record's name (params.json) or the checkpoint's
    stored_name: str  # the name in the checkpoint files
    group: str
    layer: int | None
    optimizer_group: int
    shape: tuple[int, ...]
    numel: int
    offset: int
    sampled: int
    rel_eps: float  # machine epsilon of the stored dtype

    @property
    def scale(self) -> float:
        return self.numel / self.sampled


@dataclass(frozen=True)
class CheckpointSample:
    """values[k, offset:offset+sampled] holds tensor p's sampled coordinates at checkpoint k."""

    steps: np.ndarray
    paths: tuple[str, ...]
    tensors: tuple[SampledTensor, ...]
    values: np.ndarray
    seed: int
    seconds: float

    @property
    def total(self) -> int:
        return sum(t.numel for t in self.tensors)

    @property
    def sampled(self) -> int:
        return sum(t.sampled for t in self.tensors)


def _match_names(record: ParamsRecord, stored: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> dict[str, str]:
    """record name -> checkpoint name: exact, then without wrapper prefixes, then a unique shape.

    The last rule covers renames on save (transformers 5 writes GPT-NeoX's ``lm_head`` as
    ``embed_out``): a leftover record tensor matches the one leftover stored tensor of its shape.
    """
    out: dict[str, str] = {}
    canon = {canonical_name(n): n for n in stored}
    for p in record.params:
        if p.name in stored:
            out[p.name] = p.name
        elif canonical_name(p.name) in canon:
            out[p.name] = canon[canonical_name(p.name)]
    left = [p for p in record.params if p.name not in out]
    free = {n: s for n, s in stored.items() if n not in set(out.values())}
    for p in left:
        same = [n for n, (shape, _) in free.items() if shape == p.shape]
        rivals = [q for q in left if q.shape == p.shape]
        if len(same) == 1 and len(rivals) == 1:
            out[p.name] = same[0]
            log.info("record tensor %s is stored as %s", p.name, same[0])
            free.pop(same[0])
    missing = [p.name for p in record.params if p.name not in out]
    if missing:
        raise RecordError(f"params.json names tensors the checkpoint does not hold: {missing[:5]}")
    return out


def _plan(first: Checkpoint, params: ParamsRecord | None, grouping: Grouping | None) -> list[dict]:
    stored = {}
    for name, tensor in iter_tensors(first.path):
        if tensor.is_floating_point() and tensor.numel() > 0:
            stored[name] = (tuple(tensor.shape), tensor.dtype)
        del tensor
    if not stored:
        raise RecordError(f"{first.path}: holds no floating-point tensors")
    grouping = grouping or Grouping()
    if params is None:  # the Trainer's default: decay on matrices and embeddings, not biases/norms
        return [{"name": n, "stored": n, "group": grouping.classify(n, len(s)), "layer": layer_index(n),
                 "opt": 0 if len(s) >= 2 else 1, "shape": s, "dtype": d} for n, (s, d) in stored.items()]
    names = _match_names(params, stored)
    plan = []
    for p in params.params:
        shape, dtype = stored[names[p.name]]
        if shape != p.shape:
            raise RecordError(f"{first.path}: {names[p.name]} has shape {list(shape)}, params.json says {list(p.shape)}")
        plan.append({"name": p.name, "stored": names[p.name], "group": p.group, "layer": p.layer,
                     "opt": p.optimizer_group, "shape": shape, "dtype": dtype})
    return plan


def sample_checkpoints(
    checkpoints: Sequence[Checkpoint],
    *,
    sample_size: int = DEFAULT_SAMPLE,
    seed: int = 0,
    params: ParamsRecord | None = None,
    grouping: Grouping | None = None,
) -> CheckpointSample:
    """Read a seeded coordinate subsample of every monitored tensor from every checkpoint.

    Tensors are those of ``params`` (the run's ``params.json``: classes, layers and optimizer
    groups as the callback saw them) or, without it, every floating-point tensor of the first
    checkpoint, classed by ``grouping`` and put in optimizer group 0 (decayed) when at least 2-D,
    else group 1.  Each tensor keeps ``round(sample_size · numel / total)`` coordinates (at least
    one), drawn without replacement from a generator seeded by ``seed`` and the tensor's name, so
    every checkpoint samples the same coordinates; ``sample_size <= 0`` or >= the model keeps all.
    Raises :class:`RecordError` for a tensor missing from a checkpoint, a changed shape or
    non-finite weights, and ``CheckpointError`` for unreadable files.
    """
    t0 = time.perf_counter()
    if len(checkpoints) < 2:
        raise RecordError(f"need at least 2 checkpoints, got {len(checkpoints)}")
    plan = _plan(checkpoints[0], params, grouping)
    total = sum(math.prod(p["shape"]) for p in plan)
    frac = 1.0 if sample_size <= 0 or sample_size >= total else sample_size / total
    tensors, indices, offset = [], {}, 0
    for p in plan:
        numel = math.prod(p["shape"])
        m = numel if frac >= 1.0 else min(numel, max(1, round(frac * numel)))
        if m < numel:
            rng = np.random.default_rng([seed, zlib.crc32(p["name"].encode())])
            indices[p["stored"]] = torch.from_numpy(np.sort(rng.choice(numel, m, replace=False)))
        eps = float(torch.finfo(p["dtype"]).eps)
        tensors.append(SampledTensor(p["name"], p["stored"], p["group"], p["layer"], p["opt"], p["shape"],
                                     numel, offset, m, eps))
        offset += m
    dtype = np.float64 if any(p["dtype"] == torch.float64 for p in plan) else np.float32
    values = np.empty((len(checkpoints), offset), dtype=dtype)
    by_name = {t.stored_name: t for t in tensors}
    for k, ck in enumerate(checkpoints):
        seen = set()
        for name, tensor in iter_tensors(ck.path):
            t = by_name.get(name)
            if t is None:
                continue
            if tuple(tensor.shape) != t.shape:
                raise RecordError(
                    f"{ck.path}: {name} has shape {list(tensor.shape)}, but {list(t.shape)} in {checkpoints[0].path}"
                )
            flat = tensor.detach().reshape(-1)
            picked = flat if name not in indices else flat[indices[name]]
            values[k, t.offset : t.offset + t.sampled] = picked.to(torch.float64).numpy()
            seen.add(name)
            del tensor, flat, picked
        missing = [n for n in by_name if n not in seen]
        if missing:
            raise RecordError(f"{ck.path}: missing tensors that {checkpoints[0].path} holds: {missing[:5]}")
        if not np.isfinite(values[k]).all():
            bad = next(t.name for t in tensors if not np.isfinite(values[k, t.offset : t.offset + t.sampled]).all())
            raise RecordError(f"{ck.path}: non-finite weights in {bad}")
    steps = np.array([c.step for c in checkpoints], dtype=np.int64)
    return CheckpointSample(steps, tuple(checkpoint_label(c) for c in checkpoints), tuple(tensors), values, seed,
                            time.perf_counter() - t0)


# ----------------------------------------------------------------------------------------------
# Gram matrices and spline bases
# ----------------------------------------------------------------------------------------------


def _differences(y: np.ndarray) -> np.ndarray:
    """Z = [y_0, y_1 - y_0, ..., y_{K-1} - y_{K-2}] in float64 (small numbers stay small)."""
    z = y.astype(np.float64)
    z[1:] = np.diff(z, axis=0)
    return z


def _grams(sample: CheckpointSample, decay: np.ndarray, lr_sum: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per tensor: Gram of Z [P, K, K]; Gram of Z over the coordinates active in interval k
    [P, K-1, K, K]; the number of active coordinates per interval [P, K-1] (all scaled to numel).

    A coordinate is inactive on an interval when its weight only decayed there:
    |w_hi - d·w_lo| <= 4 (L + 1) ε max(|w_lo|, |w_hi|) with d = Π(1 - η λ) and L steps (the
    rounding of L decay-only updates stored in the checkpoint's dtype), or when Σ η = 0.
    """
    P, K = len(sample.tensors), len(sample.steps)
    gram = np.zeros((P, K, K))
    gram_act = np.zeros((P, K - 1, K, K))
    n_act = np.zeros((P, K - 1))
    spans = np.diff(sample.steps)
    for p, t in enumerate(sample.tensors):
        for a in range(t.offset, t.offset + t.sampled, _CHUNK):
            b = min(a + _CHUNK, t.offset + t.sampled)
            y = sample.values[:, a:b]
            z = _differences(y)
            g = z @ z.T
            gram[p] += g
            for k in range(K - 1):
                lo, hi = y[k].astype(np.float64), y[k + 1].astype(np.float64)
                tol = 4.0 * (spans[k] + 1) * t.rel_eps * np.maximum(np.abs(lo), np.abs(hi))
                active = np.abs(hi - decay[k, t.optimizer_group] * lo) > tol
                if lr_sum[k, t.optimizer_group] <= 0:
                    active[:] = False
                count = int(active.sum())
                n_act[p, k] += count
                if count == active.size:
                    gram_act[p, k] += g
                elif count:
                    za = z[:, active]
                    gram_act[p, k] += za @ za.T
        gram[p] *= t.scale
        gram_act[p] *= t.scale
        n_act[p] *= t.scale
    return gram, gram_act, n_act


def _spline_basis(x: np.ndarray) -> np.ndarray:
    """B [K-1, 4, K]: on interval k, W(x_k + h) = Σ_a h^a (B[k, a] @ Z) for Z as in :func:`_differences`.

    The not-a-knot cubic spline (scipy's ``CubicSpline`` default) is linear in its knot values, so
    its coefficients for unit data give the basis; Y = L Z with L the lower-triangular ones.
    """
    from scipy.interpolate import CubicSpline

    K = x.size
    c = CubicSpline(x, np.eye(K), axis=0).c  # [4, K-1, K], c[m] multiplies h^(3-m)
    power = c[::-1].transpose(1, 0, 2)  # [K-1, 4, K], index a multiplies h^a
    return power @ np.tril(np.ones((K, K)))


def _drift_energy(gram_act: np.ndarray, decay: np.ndarray, lr_sum: np.ndarray) -> np.ndarray:
    """U[p, k] = Σ_i ū_i² over the active coordinates of interval k, from neighbouring intervals.

    v_k = (w_{k+1} - d_k w_k) / Σ_k η is the mean update direction over interval k (decay taken
    out).  Gradient noise in disjoint intervals is independent, so <v_k, v_j> for a neighbour j
    averages to the drift shared by both, without the noise that inflates ||v_k||²:
    U_k = max(0, mean_j <v_k, v_j>), j in {k-1, k+1}.
    """
    P, n_int, K, _ = gram_act.shape
    coef = np.zeros((P, n_int, K))  # v_k = coef[p, k] @ Z, with Y = L Z (see _differences)
    safe = np.where(lr_sum.T > 0, lr_sum.T, np.inf)  # [P, K-1]
    for k in range(n_int):
        coef[:, k, : k + 1] = ((1.0 - decay[k]) / safe[:, k])[:, None]
        coef[:, k, k + 1] = 1.0 / safe[:, k]
    out = np.zeros((P, n_int))
    for k in range(n_int):
        pairs = [j for j in (k - 1, k + 1) if 0 <= j < n_int]
        cross = [np.einsum("pa,pab,pb->p", coef[:, k], gram_act[:, k], coef[:, j]) for j in pairs]
        out[:, k] = np.maximum(0.0, np.mean(cross, axis=0))
    return out


def _quad(gamma: np.ndarray, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Σ_ab left[s, a] gamma[p, a, b] right[s, b] -> [S, P]."""
    return np.einsum("sa,pab,sb->sp", left, gamma, right, optimize=True)


# ----------------------------------------------------------------------------------------------
# The estimators
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SplineForces:
    """Per-step, per-tensor force estimates between the first and last checkpoint.

    ``align[estimator]`` is [S, P]: the estimate of A at optimizer step ``steps[j]`` for tensor p.
    ``inject_spline`` and ``inject_model`` are the lr-axis spline's own injection and the modelled
    true one (Î); ``decay`` the spline's D; ``lr`` [S, P] the lr of each tensor's group at each step.
    """

    steps: np.ndarray
    checkpoint_steps: np.ndarray
    tensors: tuple[SampledTensor, ...]
    align: dict[str, np.ndarray]
    inject_spline: np.ndarray
    inject_model: np.ndarray
    decay: np.ndarray
    lr: np.ndarray
    skipped: np.ndarray
    schedule_source: str
    beta1: float
    sampled: int
    total: int
    seconds_read: float
    seconds_compute: float
    notes: tuple[str, ...] = field(default_factory=tuple)

    def aggregates(self, per_layer: bool = False, per_matrix: bool = False) -> dict[str, np.ndarray]:
        """Name -> boolean mask over tensors: classes present, ``total``, then layers and matrices."""
        return aggregate_masks(self.tensors, per_layer, per_matrix)

    def series(self, estimator: str, mask: np.ndarray) -> np.ndarray:
        """The estimate summed over the tensors in ``mask``, one value per step."""
        return self.align[estimator][:, mask].sum(axis=1)


def spline_forces(sample: CheckpointSample, schedule: Schedule, *, beta1: float = 0.9) -> SplineForces:
    """Every estimator of the module docstring at every step t_1 < s <= t_K (see there).

    Raises :class:`RecordError` with fewer than :data:`MIN_CHECKPOINTS` checkpoints or a schedule
    that does not cover the checkpoints' steps or has fewer param groups than the tensors use.  A
    param group whose lr is zero over a whole checkpoint interval has no lr-time there: its
    lr-axis estimators fall back to the step axis (and a note says so).
    """
    t0 = time.perf_counter()
    steps_k = sample.steps
    K = steps_k.size
    if K < MIN_CHECKPOINTS:
        raise RecordError(f"a cubic spline needs at least {MIN_CHECKPOINTS} checkpoints, got {K}")
    if np.any(np.diff(steps_k) <= 0):
        raise RecordError(f"checkpoint steps must strictly increase, got {steps_k.tolist()}")
    first, last = int(steps_k[0]), int(steps_k[-1])
    lr, wd = schedule.rows(first + 1, last)  # [S, G], row j is step first + 1 + j
    G = schedule.groups
    used = sorted({t.optimizer_group for t in sample.tensors})
    if used[-1] >= G or used[0] < 0:
        raise RecordError(f"tensors use optimizer group {used[-1]}, the schedule ({schedule.source}) has {G}")
    S = last - first
    steps = np.arange(first + 1, last + 1)
    skipped = schedule.skipped_rows(first + 1, last)
    tau = np.vstack([np.zeros((1, G)), np.cumsum(lr, axis=0)])  # tau[j] = Σ lr up to step first + j
    knot = steps_k - first  # row of tau at each checkpoint
    # per interval and optimizer group: decay factor, Σ η, Σ η λ
    decay_factor = np.ones((K - 1, G))
    lr_sum = np.zeros((K - 1, G))
    lr_wd_sum = np.zeros((K - 1, G))
    interval = np.searchsorted(knot, np.arange(1, S + 1), side="left") - 1  # step row j -> interval
    for k in range(K - 1):
        rows = slice(knot[k], knot[k + 1])
        decay_factor[k] = np.prod(1.0 - lr[rows] * wd[rows], axis=0)
        lr_sum[k] = lr[rows].sum(axis=0)
        lr_wd_sum[k] = (lr[rows] * wd[rows]).sum(axis=0)
    gram, gram_act, n_act = _grams(sample, decay_factor, lr_sum)
    gram_y = np.einsum("ij,pjk,lk->pil", np.tril(np.ones((K, K))), gram, np.tril(np.ones((K, K))))

    P = len(sample.tensors)
    opt = np.array([t.optimizer_group for t in sample.tensors])
    eta, lam = lr[:, opt], wd[:, opt]  # [S, P]
    c = (1.0 - beta1) / (1.0 + beta1)
    b_t = beta1 ** steps.astype(np.float64)
    c_t = (c * (1.0 + b_t) / (1.0 - b_t))[:, None]

    notes = []
    flat = [g for g in used if np.any(np.diff(tau[knot, g]) <= 0)]
    if flat:  # no lr-time to speak of: such a group only moves where it has lr
        notes.append(f"optimizer group(s) {flat} have zero lr over a whole checkpoint interval: "
                     "their lr-axis estimators use the step axis")

    def spline_terms(axis: str):
        s_ww, s_wd, s_dd = (np.zeros((S, P)) for _ in range(3))
        for g in used:
            cols = np.nonzero(opt == g)[0]
            x_all = np.arange(S + 1, dtype=np.float64) if axis == "step" or g in flat else tau[:, g]
            x = x_all[knot]
            basis = _spline_basis(x)
            for k in range(K - 1):
                rows = np.arange(knot[k], knot[k + 1])  # step rows j: w(first+j) -> w(first+j+1)
                h0, h1 = x_all[rows] - x[k], x_all[rows + 1] - x[k]
                q = np.stack([np.ones_like(h0), h0, h0**2, h0**3], axis=1)
                d = np.stack([np.zeros_like(h0), h1 - h0, h1**2 - h0**2, h1**3 - h0**3], axis=1)
                gam = basis[k] @ gram[cols] @ basis[k].T
                s_ww[np.ix_(rows, cols)] = _quad(gam, q, q)
                s_wd[np.ix_(rows, cols)] = _quad(gam, q, d)
                s_dd[np.ix_(rows, cols)] = _quad(gam, d, d)
        el = eta * lam
        return 2.0 * s_wd + 2.0 * el * s_ww, s_dd + 2.0 * el * s_wd + el**2 * s_ww, -2.0 * el * s_ww

    a_step, i_step, _ = spline_terms("step")
    a_lr, i_lr, d_lr = spline_terms("lr")
    drift = _drift_energy(gram_act, decay_factor[:, opt], lr_sum[:, opt])  # [P, K-1]
    n_active = n_act[:, interval].T  # [S, P]
    inject_model = eta**2 * (c_t * n_active + (1.0 - c_t) * drift[:, interval].T)

    # two-point baselines, per interval from the Gram of the checkpoints themselves
    two, two_i = np.zeros((S, P)), np.zeros((S, P))
    for k in range(K - 1):
        rows = np.arange(knot[k], knot[k + 1])
        total = lr_sum[k, opt]
        lam_bar = np.divide(lr_wd_sum[k, opt], total, out=np.zeros(P), where=total > 0)
        d_lo = gram[:, : k + 1, k + 1].sum(axis=1)  # <w_lo, w_hi - w_lo>, w_lo = Z_0 + ... + Z_k
        n_lo, n_dd = gram_y[:, k, k], gram[:, k + 1, k + 1]
        safe = np.where(total > 0, total, 1.0)
        w_u = np.where(total > 0, -d_lo / safe - lam_bar * n_lo, 0.0)  # <w_lo, u_2>
        d_u = np.where(total > 0, -n_dd / safe - lam_bar * d_lo, 0.0)  # <w_hi - w_lo, u_2>
        frac = (tau[rows][:, opt] - tau[knot[k]][opt]) / safe  # τ-fraction at w(s-1)
        two[rows] = -2.0 * eta[rows] * w_u
        two_i[rows] = -2.0 * eta[rows] * (w_u + frac * d_u)

    align = {
        "spline": a_step,
        "spline_lr": a_lr,
        "corrected": a_lr + i_lr - inject_model,
        "two_point": two,
        "two_point_interp": two_i,
        # the research code (NPM-Weibull-public) evaluates A at w(t+1): -2η<W(t+1), û> = c Â + 2 Î
        "spline_post": (1.0 - eta * lam) * a_step + 2.0 * i_step,
    }
    inactive = 1.0 - n_act.sum(axis=0) / sum(t.numel for t in sample.tensors)
    if inactive.max() > 0.001:
        notes.append(f"{100 * inactive.max():.1f}% of coordinates only decayed on some interval "
                     "(no gradient: e.g. embedding rows of unseen tokens); left out of the injection model")
    return SplineForces(
        steps=steps,
        checkpoint_steps=steps_k.copy(),
        tensors=sample.tensors,
        align=align,
        inject_spline=i_lr,
        inject_model=inject_model,
        decay=d_lr,
        lr=eta,
        skipped=skipped,
        schedule_source=schedule.source,
        beta1=beta1,
        sampled=sample.sampled,
        total=sample.total,
        seconds_read=sample.seconds,
        seconds_compute=time.perf_counter() - t0,
        notes=tuple(notes),
    )


# ----------------------------------------------------------------------------------------------
# Accuracy against the callback's truth
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Accuracy:
    """estimate / true of one estimator for one aggregate, per interval.

    ``resolution`` is ``"row"`` (each logged interval of metrics.jsonl) or ``"checkpoint"`` (the
    logged rows inside each checkpoint interval pooled: the finest resolution the checkpoints
    resolve).  ``estimate`` and ``true`` are means per budget step; ``end`` is each interval's
    last step; ``weight`` its number of budget steps.  ``median``, ``p25`` and ``p75`` are over
    the intervals, ``pooled`` = Σ estimate / Σ true over all of them (steps weighted equally).
    """

    estimator: str
    aggregate: str
    resolution: str
    end: np.ndarray
    estimate: np.ndarray
    true: np.ndarray
    weight: np.ndarray
    truth: str = "align"  # the logged key compared with: ``align`` (at w_t) or ``align_post`` (at w_{t+1})

    @property
    def ratio(self) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return self.estimate / self.true

    @property
    def n(self) -> int:
        return int(self.end.size)

    def _q(self, q: float) -> float:
        r = self.ratio[np.isfinite(self.ratio)]
        return float(np.quantile(r, q)) if r.size else math.nan

    @property
    def median(self) -> float:
        return self._q(0.5)

    @property
    def p25(self) -> float:
        return self._q(0.25)

    @property
    def p75(self) -> float:
        return self._q(0.75)

    @property
    def pooled(self) -> float:
        t = float(np.sum(self.true * self.weight))
        return float(np.sum(self.estimate * self.weight)) / t if t else math.nan

    def to_dict(self, series: bool = False) -> dict[str, object]:
        out: dict[str, object] = {
            "estimator": self.estimator, "aggregate": self.aggregate, "resolution": self.resolution,
            "truth": self.truth, "intervals": self.n, "median": self.median, "p25": self.p25, "p75": self.p75, "pooled": self.pooled,
        }
        if series:
            out.update(end=self.end.tolist(), estimate=self.estimate.tolist(), true=self.true.tolist())
        return out


def accuracy(
    forces: SplineForces,
    metrics: Sequence[dict],
    *,
    every: int = 1,
    per_layer: bool = False,
    per_matrix: bool = False,
    resolution: str = "row",
    prefix: str = "weightforces",
) -> list[Accuracy]:
    """Compare every estimator with the logged A of every aggregate the metrics hold.

    A logged row is the mean of A over the budget steps (every ``every``-th, not skipped) of its
    interval (previous row's step, row's step]; the estimate is averaged over the same steps.
    Only rows inside [first checkpoint, last checkpoint] count.  ``resolution="checkpoint"``
    pools the rows inside each checkpoint interval (sums of A over their steps) before dividing.
    """
    if resolution not in ("row", "checkpoint"):
        raise ValueError(f"resolution must be 'row' or 'checkpoint', got {resolution!r}")
    out = []
    knots = forces.checkpoint_steps
    lo, hi = int(knots[0]), int(knots[-1])
    budget = (forces.steps % every == 0) & ~forces.skipped
    cum = {e: np.vstack([np.zeros((1, a.shape[1])), np.cumsum(np.where(budget[:, None], a, 0.0), axis=0)])
           for e, a in forces.align.items()}
    count = np.concatenate([[0], np.cumsum(budget)])
    for name, mask in forces.aggregates(per_layer, per_matrix).items():
        for key, estimators in (("align", ESTIMATORS), ("align_post", POST_ESTIMATORS)):
            truth = truth_intervals(metrics, f"{prefix}/{name}/{key}")
            keep = (truth.start >= lo) & (truth.end <= hi) & np.isfinite(truth.value)
            a, b = truth.start[keep] - lo, truth.end[keep] - lo  # rows of cum: steps (start, end]
            n = (count[b] - count[a]).astype(np.float64)
            ok = n > 0
            if not ok.any():
                continue
            a, b, n, end, true_sum = a[ok], b[ok], n[ok], truth.end[keep][ok], truth.value[keep][ok] * n[ok]
            if resolution == "checkpoint":  # row end in (knots[g-1], knots[g]] -> interval g
                labels, group = np.unique(np.searchsorted(knots, end, side="left"), return_inverse=True)
                ends = knots[labels]
            else:
                group, ends = np.arange(end.size), end
            weight = np.bincount(group, weights=n)
            true = np.bincount(group, weights=true_sum) / weight
            for est in estimators:
                sums = (cum[est][b] - cum[est][a])[:, mask].sum(axis=1)
                estimate = np.bincount(group, weights=sums) / weight
                out.append(Accuracy(est, name, resolution, ends, estimate, true, weight, key))
            if key == "align" and resolution == "row":
                numel = np.array([t.numel for t in forces.tensors], dtype=np.float64)[mask]
                lr = (forces.lr[:, mask] @ numel) / numel.sum()
                lr_cum = np.concatenate([[0.0], np.cumsum(np.where(budget, lr, 0.0))])
                row_lr = lr_cum[b] - lr_cum[a]
                interval = np.searchsorted(knots, end, side="left")
                share = row_lr / np.bincount(interval, weights=row_lr)[interval]
                oracle = np.bincount(interval, weights=true_sum)[interval] * share / n
                out.append(Accuracy(ORACLE, name, resolution, end, oracle, true_sum / n, n))
    return out


# ----------------------------------------------------------------------------------------------
# A whole run: checkpoints, records, schedule, estimates, accuracy
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SplineReport:
    """What :func:`analyze` found; :func:`format_spline` renders it, ``to_dict()`` is the JSON."""

    checkpoints: tuple[Checkpoint, ...]
    records: str | None
    forces: SplineForces
    accuracy: tuple[Accuracy, ...]
    notes: tuple[str, ...]

    def interval_means(self, per_layer: bool = False, per_matrix: bool = False) -> dict[str, dict[str, np.ndarray]]:
        """aggregate -> estimator -> mean estimate per step over each checkpoint interval."""
        f = self.forces
        knots = f.checkpoint_steps - f.checkpoint_steps[0]
        out = {}
        for name, mask in f.aggregates(per_layer, per_matrix).items():
            out[name] = {e: np.array([f.series(e, mask)[a:b].mean() for a, b in zip(knots, knots[1:])])
                         for e in ESTIMATORS}
        return out

    def to_dict(self, series: bool = False, per_layer: bool = False, per_matrix: bool = False) -> dict[str, object]:
        f = self.forces
        out: dict[str, object] = {
            "checkpoints": [{"path": checkpoint_label(c), "step": c.step} for c in self.checkpoints],
            "records": self.records,
            "schedule": f.schedule_source,
            "beta1": f.beta1,
            "coordinates": {"sampled": f.sampled, "total": f.total},
            "seconds": {"read": f.seconds_read, "compute": f.seconds_compute},
            "notes": list(self.notes),
            "estimators": list(ESTIMATORS),
            "interval_means": {name: {e: v.tolist() for e, v in d.items()}
                               for name, d in self.interval_means(per_layer, per_matrix).items()},
            "accuracy": [a.to_dict(series) for a in self.accuracy],
        }
        if series:
            out["steps"] = f.steps.tolist()
            out["series"] = {name: {e: f.series(e, mask).tolist() for e in ESTIMATORS}
                             for name, mask in f.aggregates(per_layer, per_matrix).items()}
        return json_safe(out)


def analyze(
    paths: Sequence[str | os.PathLike],
    *,
    records: str | os.PathLike | None = None,
    flags_schedule: Schedule | None = None,
    use_record: bool = True,
    sample_size: int = DEFAULT_SAMPLE,
    seed: int = 0,
    beta1: float | None = None,
    grouping: Grouping | None = None,
    keep_every: int = 0,
    per_layer: bool = False,
    per_matrix: bool = False,
) -> SplineReport:
    """Find the checkpoints and the run's records, pick the schedule, estimate, compare.

    The schedule is the run's ``schedule.jsonl`` when there is one (and ``use_record``), else
    ``flags_schedule``; neither is an error that says which flags to give.  ``keep_every`` keeps
    only checkpoints whose step is a multiple of it (to test sparser spacings of one run).
    """
    from hf_weightforces.analysis.hub import HubCheckpoints, resolve_checkpoints
    from hf_weightforces.analysis.records import locate_records, read_records

    checkpoints = resolve_checkpoints(paths)  # Hub revisions: fetched one at a time, when read
    if keep_every > 0:
        checkpoints = [c for c in checkpoints if c.step % keep_every == 0]
    if len(checkpoints) < MIN_CHECKPOINTS:
        steps = [c.step for c in checkpoints]
        where = ", ".join(str(p) for p in paths) if isinstance(paths, (list, tuple)) else str(paths)
        raise RecordError(f"{where}: a cubic spline needs at least {MIN_CHECKPOINTS} checkpoints; found "
                          f"{len(steps)} (steps {steps}): save more often or pass more checkpoints")
    hub = isinstance(paths, HubCheckpoints)  # no records beside Hub revisions, unless --records names them
    folder = records if records is not None or hub else locate_records(paths, checkpoints)
    rec = read_records(folder)
    notes = []
    if use_record and rec.schedule is not None:
        schedule = rec.schedule
        if flags_schedule is not None:
            notes.append("schedule flags ignored: the run's own record is exact (--ignore-record to use them)")
    elif flags_schedule is not None:
        schedule = flags_schedule
    else:
        raise RecordError(
            "no lr/weight-decay record (weightforces/schedule.jsonl) for these checkpoints: give the schedule "
            "with --lr, --total-steps, --warmup-steps, --lr-decay and --weight-decay"
        )
    params = rec.params
    if params is not None and params.optimizer_group_count() > schedule.groups:
        raise RecordError(f"params.json uses {params.optimizer_group_count()} optimizer groups, "
                          f"the schedule ({schedule.source}) has {schedule.groups}")
    b1 = beta1 if beta1 is not None else (params.beta1 if params is not None else 0.9)
    sample = sample_checkpoints(checkpoints, sample_size=sample_size, seed=seed, params=params, grouping=grouping)
    forces = spline_forces(sample, schedule, beta1=b1)
    acc: list[Accuracy] = []
    if rec.metrics:
        every = params.every if params is not None else 1
        for resolution in ("row", "checkpoint"):
            acc += accuracy(forces, rec.metrics, every=every, per_layer=per_layer, per_matrix=per_matrix,
                            resolution=resolution)
        if not acc:
            notes.append("metrics.jsonl has no align rows between the first and last checkpoint: no accuracy")
    return SplineReport(tuple(checkpoints), None if rec.folder is None else str(rec.folder), forces, tuple(acc),
                        tuple(notes) + forces.notes)


def _fmt(x: float, spec: str = ".3f") -> str:
    return "nan" if not math.isfinite(x) else format(x, spec)


def format_spline(report: SplineReport, *, per_layer: bool = False, per_matrix: bool = False) -> str:
    """Readable text: where the inputs came from, estimates per checkpoint interval, accuracy."""
    f = report.forces
    steps = f.checkpoint_steps
    lines = [
        f"{len(steps)} checkpoints, steps {', '.join(map(str, steps))}",
        f"lr and weight decay: {f.schedule_source}",
        f"coordinates: {f.sampled:,} of {f.total:,}"
        + (" (all)" if f.sampled == f.total else f" (seeded subsample, {f.sampled / f.total:.2%})")
        + f"; beta1 {f.beta1:g}; read {f.seconds_read:.2f} s, computed {f.seconds_compute:.2f} s",
    ]
    lines += [f"note: {n}" for n in report.notes]
    lines += ["", "Alignment A per step (mean over each checkpoint interval):"]
    header = ["aggregate", "interval", *ESTIMATORS]
    rows = []
    for name, d in report.interval_means(per_layer, per_matrix).items():
        for k in range(len(steps) - 1):
            rows.append([name, f"{steps[k]}-{steps[k + 1]}", *(_fmt(d[e][k], ".4g") for e in ESTIMATORS)])
    lines += _table(header, rows, left=2)
    if report.accuracy:
        lines += ["", "Accuracy: estimate / true A (the callback's metrics.jsonl); median [p25, p75] over "
                  "logged rows, median over checkpoint intervals, pooled = sum est / sum true"]
        lines += ["(truth align: A at w_t, exact; align_post: the research code's A at w_{t+1}, docs/budget.md)"]
        header = ["aggregate", "estimator", "truth", "rows", "row median", "row p25-p75", "ckpt median", "pooled"]
        by = {(a.aggregate, a.estimator, a.truth, a.resolution): a for a in report.accuracy}
        rows = []
        for (name, est, key, res), a in by.items():
            if res != "row":
                continue
            c = by.get((name, est, key, "checkpoint"))
            rows.append([name, est, key, str(a.n), _fmt(a.median), f"{_fmt(a.p25)}-{_fmt(a.p75)}",
                         _fmt(c.median) if c else "-", _fmt(a.pooled)])
        lines += _table(header, rows, left=2)
    return "\n".join(lines)


def _table(header: list[str], rows: list[list[str]], left: int = 1) -> list[str]:
    rows = [header, *rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return ["  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
            for r in rows]
