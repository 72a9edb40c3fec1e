"""λ(t) over checkpoints: Weibull shape k, scale λ, RMS σ and λ/σ per group and per matrix.

For each checkpoint (streamed one tensor at a time, :mod:`~hf_weightforces.analysis.checkpoints`)
and each weight matrix (floating point, at least 2-D, or 1-D with at least
:data:`~hf_weightforces.analysis.fit.MIN_1D_NUMEL` elements):

* the exact protocol of docs/weibull.md on |w| (sort, middle 80%, least squares of
  ln(-ln(1-F)) on ln|w|: slope k, λ = exp(-intercept / k)), ``method="exact"``;
* σ = sqrt(||w||² / numel) in float64 and λ/σ (0.8875 for Gaussian weights, docs/weibull.md).

Aggregates carry the live rows' names and meanings (docs/aggregates.md): one pooled fit per class
(docs/aggregates.md; ``other`` holds the 1-D tensors and is fitted here, not live) and one over
``matrices``, every class but ``other``, the live callback's Weibull pool; ``total`` covers every
floating-point tensor of the checkpoint for σ only (no fit: a pool of norm gains near 1 and weight
matrices is no Weibull sample).  A checkpoint does not say which tensors were trained, so offline
``total`` also covers what the live rows report as ``frozen``.  The pooled fit is by default
the histogram fit of the merged counts (``method="histogram"``: within 1e-4 of the exact pooled k,
see :mod:`hf_weightforces.core.weibull`), which needs memory for one tensor only; with
``exact_groups=True`` the group's magnitudes are kept and sorted together (``method="exact"``,
memory: the largest group).  σ of a group is sqrt(Σ||w||² / Σ numel) over its tensors.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from hf_weightforces.analysis.checkpoints import iter_tensors
from hf_weightforces.analysis.fit import MIN_1D_NUMEL
from hf_weightforces.analysis.hub import checkpoint_label, resolve_checkpoints
from hf_weightforces.analysis.records import Checkpoint
from hf_weightforces.core.groups import GROUPS, MATRICES, TOTAL, Grouping, classify, layer_index
from hf_weightforces.core.records import json_safe
from hf_weightforces.core.weibull import MagnitudeHistogram, WeibullFit, fit_weibull_sorted, sorted_magnitudes

__all__ = ["ScalePoint", "ScaleTrajectory", "format_scale", "scale_trajectory"]


@dataclass(frozen=True)
class ScalePoint:
    """One fit: an aggregate (``kind="group"``) or a matrix (``kind="matrix"``) at one step."""

    step: int
    name: str
    kind: str
    group: str
    layer: int | None
    numel: int
    sigma: float
    fit: WeibullFit

    @property
    def k(self) -> float:
        return self.fit.k

    @property
    def scale(self) -> float:
        return self.fit.scale

    @property
    def scale_over_sigma(self) -> float:
        return self.fit.scale / self.sigma if self.sigma > 0 else math.nan

    def to_dict(self) -> dict[str, object]:
        return {"step": self.step, "name": self.name, "kind": self.kind, "group": self.group, "layer": self.layer,
                "numel": self.numel, "k": self.k, "lambda": self.scale, "sigma": self.sigma,
                "lambda_over_sigma": self.scale_over_sigma, "r2": self.fit.r2, "ks": self.fit.ks,
                "method": self.fit.method, "success": self.fit.success, "message": self.fit.message}


@dataclass(frozen=True)
class ScaleTrajectory:
    """Every fit of every checkpoint, in step order."""

    checkpoints: tuple[Checkpoint, ...]
    points: tuple[ScalePoint, ...]
    group_method: str

    def series(self, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(steps, k, λ, σ) of one aggregate or matrix."""
        pts = [p for p in self.points if p.name == name]
        return (np.array([p.step for p in pts]), np.array([p.k for p in pts]),
                np.array([p.scale for p in pts]), np.array([p.sigma for p in pts]))

    def names(self, kind: str) -> list[str]:
        seen: dict[str, None] = {}
        for p in self.points:
            if p.kind == kind:
                seen.setdefault(p.name)
        return list(seen)

    def to_dict(self) -> dict[str, object]:
        return json_safe({
            "checkpoints": [{"path": checkpoint_label(c), "step": c.step} for c in self.checkpoints],
            "matrix_method": "exact",
            "group_method": self.group_method,
            "points": [p.to_dict() for p in self.points],
        })


_NOT_FITTED = WeibullFit(math.nan, math.nan, math.nan, math.nan, 0, "histogram", False,
                         "not fitted: total covers every tensor; the Weibull pool is matrices")


class _Pool:
    def __init__(self, exact: bool, fitted: bool = True) -> None:
        self.fitted = fitted
        self.hist = MagnitudeHistogram()
        self.parts: list[np.ndarray] | None = [] if exact else None
        self.sumsq = 0.0
        self.numel = 0

    def add(self, xs: np.ndarray, sumsq: float, numel: int) -> None:
        if self.fitted and self.parts is None:
            self.hist.add_sorted(xs)
        elif self.fitted:
            self.parts.append(xs)
        self.sumsq += sumsq
        self.numel += numel

    def fit(self) -> WeibullFit:
        if not self.fitted:
            return _NOT_FITTED
        if self.parts is None:
            return self.hist.fit()
        xs = np.sort(np.concatenate(self.parts)) if self.parts else np.zeros(0)
        return fit_weibull_sorted(xs)


def _fits(ck: Checkpoint, grouping: Grouping | None, exact_groups: bool, per_matrix: bool) -> list[ScalePoint]:
    pools: dict[str, _Pool] = {}
    matrices: list[ScalePoint] = []
    for name, tensor in iter_tensors(ck.path):
        if not tensor.is_floating_point() or tensor.numel() == 0:
            continue
        group = classify(name, tensor.ndim, grouping)
        xs, _ = sorted_magnitudes(tensor)
        flat = tensor.detach().reshape(-1).double()
        sumsq, numel = float(flat @ flat), tensor.numel()
        sigma = math.sqrt(sumsq / numel)
        if per_matrix and (tensor.ndim >= 2 or numel >= MIN_1D_NUMEL):
            matrices.append(ScalePoint(ck.step, name, "matrix", group, layer_index(name), numel, sigma,
                                       fit_weibull_sorted(xs)))
        for pool in (group, MATRICES, TOTAL) if group != "other" else (group, TOTAL):
            pools.setdefault(pool, _Pool(exact_groups, fitted=pool != TOTAL)).add(xs, sumsq, numel)
        del tensor, flat, xs
    order = {g: i for i, g in enumerate((*GROUPS, MATRICES, TOTAL))}
    groups = [ScalePoint(ck.step, g, "group", g, None, pools[g].numel, math.sqrt(pools[g].sumsq / pools[g].numel),
                         pools[g].fit())
              for g in sorted(pools, key=lambda g: (order.get(g, len(order)), g))]
    return groups + sorted(matrices, key=lambda p: (-1 if p.layer is None else p.layer, p.name))


def scale_trajectory(
    paths: Sequence[str | os.PathLike] | Sequence[Checkpoint],
    *,
    grouping: Grouping | None = None,
    exact_groups: bool = False,
    per_matrix: bool = True,
    keep_every: int = 0,
) -> ScaleTrajectory:
    """Fit every checkpoint of ``paths`` (a run folder, a folder of checkpoints or a list of them;
    see :func:`~hf_weightforces.analysis.records.find_checkpoints`; or Hub revisions,
    :class:`~hf_weightforces.analysis.hub.HubCheckpoints`), in step order."""
    checkpoints = resolve_checkpoints(paths)
    if keep_every > 0:
        checkpoints = [c for c in checkpoints if c.step % keep_every == 0]
    points: list[ScalePoint] = []
    for ck in checkpoints:  # in step order, each read once: Hub revisions are fetched one at a time
        points += _fits(ck, grouping, exact_groups, per_matrix)
    return ScaleTrajectory(tuple(checkpoints), tuple(points), "exact" if exact_groups else "histogram")



def _num(x: float, spec: str) -> str:
    return "nan" if not math.isfinite(x) else format(x, spec)


def format_scale(traj: ScaleTrajectory, *, per_matrix: bool = True) -> str:
    """One table per kind: a row per (aggregate or matrix, step), then the change first -> last."""
    lines = [f"{len(traj.checkpoints)} checkpoints, steps {', '.join(str(c.step) for c in traj.checkpoints)}",
             f"Weibull fit of |w| (docs/weibull.md protocol): matrices exact, groups {traj.group_method}; "
             "sigma = RMS(w); lambda/sigma is 0.8875 and k 1.2054 for Gaussian weights.", ""]
    kinds = ("group", "matrix") if per_matrix else ("group",)
    for kind in kinds:
        header = ["group" if kind == "group" else "matrix", "step", "k", "lambda", "sigma", "lambda/sigma", "R2"]
        rows = []
        for name in traj.names(kind):
            for p in (q for q in traj.points if q.name == name):
                rows.append([name, str(p.step), _num(p.k, ".4f"), _num(p.scale, ".5g"), _num(p.sigma, ".5g"),
                             _num(p.scale_over_sigma, ".4f"), _num(p.fit.r2, ".5f")])
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        for r in [header, *rows]:
            lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        lines.append("")
    change = []
    for name in traj.names("group"):
        steps, k, lam, sigma = traj.series(name)
        if steps.size >= 2 and name == TOTAL:
            change.append(f"{name}: sigma x{sigma[-1] / sigma[0]:.4f} (steps {steps[0]} -> {steps[-1]})")
        elif steps.size >= 2:
            change.append(f"{name}: k {k[0]:.4f} -> {k[-1]:.4f}, lambda x{lam[-1] / lam[0]:.4f}, "
                          f"sigma x{sigma[-1] / sigma[0]:.4f} (steps {steps[0]} -> {steps[-1]})")
    return "\n".join(lines + change)
