"""Weibull fit report of a saved model: one row per weight matrix, one pooled row per group.

``fit_checkpoint(path)`` streams the tensors of a model folder, checkpoint or weights file
(:mod:`hf_weightforces.analysis.checkpoints`) and, for each floating-point tensor with at least two
dimensions (and 1-D tensors of at least ``min_1d_numel`` elements),

* fits Weibull(k, λ) to |w| with the exact protocol of docs/weibull.md (``method="exact"``),
* records σ = RMS(w) = sqrt(||w||² / numel) over all elements (zeros included, float64) and λ/σ
  (0.8875 for Gaussian weights; docs/weibull.md),
* adds its magnitudes to its group's histogram (docs/aggregates.md classes via
  :func:`hf_weightforces.core.groups.classify`) and, unless it is ``other``, to the ``matrices``
  pool (every class but ``other``: the live callback's Weibull pool, docs/aggregates.md).

Each group's pooled fit is the histogram fit of the merged counts (``method="histogram"``, default
absolute edges, tolerance in :mod:`hf_weightforces.core.weibull`), beside the median of its
matrices' k, its element count and pooled RMS.  With ``exclude_top=N`` the N largest magnitudes of
each matrix ("super weights") are dropped from its fit and from the pool, and the report also
gives how far k and λ moved: Δk = k - k_all, Δλ/λ = λ / λ_all - 1 (``_all``: super weights kept).

Memory is bounded by the largest tensor: tensors are read one at a time (into memory of their own, not a
map of the file: :mod:`~hf_weightforces.analysis.checkpoints`); the tensor as read and one copy of |w|
(float32 for 16- and 32-bit weights) exist together only while that copy is sorted, then the tensor is
let go and the fits hold the sorted copy, the KS scan's block bounds (about 1 byte per element) and
fixed chunks of under 0.1 GB.  Measured peak growth for one 16384 x 8192 matrix: 2.00x its bytes in
float32 (1.0 GB), 3.00x in bfloat16 (its float32 copy is twice its size); it was 2.29x and 3.58x while
the file's pages stayed mapped (``tests/test_offline_memory.py``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch

from hf_weightforces.analysis.checkpoints import PathLike, iter_tensors, read_step, weight_files
from hf_weightforces.core.groups import GROUPS, MATRICES, Grouping, classify, layer_index
from hf_weightforces.core.records import json_safe
from hf_weightforces.core.weibull import (
    MagnitudeHistogram,
    WeibullFit,
    fit_weibull_sorted,
    sorted_magnitudes,
)

__all__ = [
    "MIN_1D_NUMEL",
    "FitReport",
    "GroupSummary",
    "MatrixFit",
    "SkippedTensor",
    "fit_checkpoint",
    "format_table",
]

_FUSED_QKV = re.compile(r"(^|\.)(query_key_value|c_attn|qkv_proj|Wqkv)\.weight$")

#: 1-D tensors (biases, norm scales) get a row only from this many elements on.
MIN_1D_NUMEL = 1 << 16


@dataclass(frozen=True)
class MatrixFit:
    """One weight matrix: its exact-protocol fit, RMS and (with ``exclude_top``) the fit without."""

    name: str
    group: str
    layer: int | None
    shape: tuple[int, ...]
    dtype: str
    numel: int
    rms: float
    fit: WeibullFit
    fit_all: WeibullFit | None = None  # super weights kept; only when exclude_top > 0

    @property
    def scale_over_rms(self) -> float:
        return self.fit.scale / self.rms if self.rms > 0 else float("nan")

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {
            "name": self.name,
            "group": self.group,
            "layer": self.layer,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "numel": self.numel,
            **_fit_fields(self.fit),
            "rms": self.rms,
            "scale_over_rms": self.scale_over_rms,
        }
        if self.fit_all is not None:
            out.update(_delta_fields(self.fit, self.fit_all))
        return out


@dataclass(frozen=True)
class GroupSummary:
    """A group's pooled histogram fit, with the median of its matrices' k and the pool's RMS."""

    group: str
    matrices: int
    numel: int
    rms: float
    median_k: float
    fit: WeibullFit
    fit_all: WeibullFit | None = None

    @property
    def scale_over_rms(self) -> float:
        return self.fit.scale / self.rms if self.rms > 0 else float("nan")

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {
            "group": self.group,
            "matrices": self.matrices,
            "numel": self.numel,
            **_fit_fields(self.fit),
            "median_k": self.median_k,
            "rms": self.rms,
            "scale_over_rms": self.scale_over_rms,
        }
        if self.fit_all is not None:
            out.update(_delta_fields(self.fit, self.fit_all))
        return out


@dataclass(frozen=True)
class SkippedTensor:
    name: str
    shape: tuple[int, ...]
    dtype: str
    reason: str


@dataclass(frozen=True)
class FitReport:
    """Everything :func:`fit_checkpoint` measured; ``to_dict()`` is the JSON form."""

    path: str
    step: int | None
    files: tuple[str, ...]
    exclude_top: int
    matrices: tuple[MatrixFit, ...]
    groups: tuple[GroupSummary, ...]
    skipped: tuple[SkippedTensor, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, object]:
        """Plain JSON-able data; NaN becomes ``None`` (strict JSON has no NaN)."""
        return json_safe(
            {
                "path": self.path,
                "step": self.step,
                "files": list(self.files),
                "exclude_top": self.exclude_top,
                "matrix_method": "exact",
                "group_method": "histogram",
                "matrices": [m.to_dict() for m in self.matrices],
                "groups": [g.to_dict() for g in self.groups],
                "skipped": [
                    {"name": s.name, "shape": list(s.shape), "dtype": s.dtype, "reason": s.reason}
                    for s in self.skipped
                ],
            }
        )


def fit_checkpoint(
    path: PathLike,
    *,
    exclude_top: int = 0,
    grouping: Grouping | None = None,
    min_1d_numel: int = MIN_1D_NUMEL,
) -> FitReport:
    """Fit every weight matrix under ``path`` and pool the fits per group (module docstring).

    Raises :class:`~hf_weightforces.analysis.checkpoints.CheckpointError` for unreadable input and
    ``ValueError`` for a negative ``exclude_top``.
    """
    if exclude_top < 0:
        raise ValueError(f"exclude_top must be >= 0, got {exclude_top}")
    files = weight_files(path)
    rows: list[MatrixFit] = []
    skipped: list[SkippedTensor] = []
    pools: dict[str, _Pool] = {}
    for name, tensor in iter_tensors(path):
        shape, dtype = tuple(tensor.shape), str(tensor.dtype).removeprefix("torch.")
        reason = _skip_reason(tensor, min_1d_numel)
        if reason:
            skipped.append(SkippedTensor(name, shape, dtype, reason))
            continue
        group = classify(name, tensor.ndim, grouping)
        numel, sumsq = tensor.numel(), _sum_of_squares(tensor)
        xs, n_bad = sorted_magnitudes(tensor)
        del tensor  # the fits read only the sorted copy (the reader keeps no reference either)
        note = f"; dropped {n_bad} non-finite values" if n_bad else ""
        kept = xs[: max(0, xs.size - exclude_top)]
        excluded = f"; excluded the {exclude_top} largest magnitudes" if exclude_top else ""
        fit = fit_weibull_sorted(kept, message=note + excluded)
        fit_all = fit_weibull_sorted(xs, message=note) if exclude_top else None
        rms = math.sqrt(sumsq / numel)
        rows.append(MatrixFit(name, group, layer_index(name), shape, dtype, numel, rms, fit, fit_all))
        for pool in (group, MATRICES) if group != "other" else (group,):  # matrices: the live Weibull pool
            pools.setdefault(pool, _Pool(exclude_top > 0)).add(kept, xs, sumsq, numel, fit.k)
        del xs, kept
    rows.sort(key=lambda r: (-1 if r.layer is None else r.layer, r.name))
    order = {g: i for i, g in enumerate((*GROUPS, MATRICES))}
    names = sorted(pools, key=lambda g: (order.get(g, len(order)), g))
    groups = tuple(pools[g].summary(g) for g in names)
    return FitReport(
        path=str(path),
        step=read_step(path),
        files=tuple(f.name for f in files),
        exclude_top=exclude_top,
        matrices=tuple(rows),
        groups=groups,
        skipped=tuple(skipped),
    )


class _Pool:
    """Additive statistics of one group: histogram counts (with and without super weights),
    Σ||w||², Σ numel and the per-matrix k values."""

    def __init__(self, track_all: bool) -> None:
        self.hist = MagnitudeHistogram()
        self.hist_all = MagnitudeHistogram() if track_all else None
        self.sumsqs: list[float] = []  # summed with math.fsum: exact, so shard order cannot matter
        self.numel = 0
        self.ks: list[float] = []

    def add(self, kept: np.ndarray, xs: np.ndarray, sumsq: float, numel: int, k: float) -> None:
        self.hist.add_sorted(kept)
        if self.hist_all is not None:
            self.hist_all.add_sorted(xs)
        self.sumsqs.append(sumsq)
        self.numel += numel
        self.ks.append(k)

    def summary(self, group: str) -> GroupSummary:
        finite = [k for k in self.ks if math.isfinite(k)]
        return GroupSummary(
            group=group,
            matrices=len(self.ks),
            numel=self.numel,
            rms=math.sqrt(math.fsum(self.sumsqs) / self.numel) if self.numel else float("nan"),
            median_k=float(np.median(finite)) if finite else float("nan"),
            fit=self.hist.fit(),
            fit_all=self.hist_all.fit() if self.hist_all is not None else None,
        )


def _skip_reason(tensor: torch.Tensor, min_1d_numel: int) -> str:
    if not tensor.is_floating_point():
        return "not floating point"
    if tensor.ndim == 0:
        return "scalar"
    if tensor.numel() == 0:
        return "empty"
    if tensor.ndim == 1 and tensor.numel() < min_1d_numel:
        return f"1-D with fewer than {min_1d_numel} elements"
    return ""


def _sum_of_squares(tensor: torch.Tensor, chunk: int = 1 << 22) -> float:
    """||w||² accumulated in float64, chunk by chunk (never in the stored low precision)."""
    flat = tensor.detach().reshape(-1)
    total = 0.0
    for start in range(0, flat.numel(), chunk):
        part = flat[start : start + chunk].to(torch.float64)
        total += float(torch.dot(part, part))
    return total


def _fit_fields(fit: WeibullFit) -> dict[str, object]:
    return {
        "k": fit.k,
        "scale": fit.scale,
        "r2": fit.r2,
        "ks": fit.ks,
        "n": fit.n,
        "method": fit.method,
        "success": fit.success,
        "message": fit.message,
    }


def _delta_fields(fit: WeibullFit, fit_all: WeibullFit) -> dict[str, object]:
    return {
        "k_all": fit_all.k,
        "scale_all": fit_all.scale,
        "delta_k": fit.k - fit_all.k,
        "delta_scale_rel": fit.scale / fit_all.scale - 1.0,
    }


# ----------------------------------------------------------------------------------------------
# Text rendering
# ----------------------------------------------------------------------------------------------


def _num(x: float, spec: str) -> str:
    return "nan" if not math.isfinite(x) else format(x, spec)


def _table(header: list[str], rows: Iterable[list[str]], left: int = 1) -> list[str]:
    """Aligned text columns: the first ``left`` columns left-aligned, the rest right-aligned."""
    rows = [header, *rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = []
    for r in rows:
        cells = [c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))]
        lines.append("  ".join(cells).rstrip())
    return lines


def format_table(report: FitReport) -> str:
    """The report as readable, aligned text: per-matrix rows, then per-group pooled rows."""
    ex = report.exclude_top
    step = "" if report.step is None else f"  step {report.step}"
    out = [f"{report.path}{step}  ({', '.join(report.files)})", ""]
    out.append(
        "Per matrix: exact Weibull fit of |w| (middle 80%, float64)"
        + (f", {ex} largest magnitudes excluded" if ex else "")
        + "; sigma = RMS(w), lambda/sigma is 0.8875 and k 1.2054 for Gaussian weights."
    )
    header = ["name", "group", "layer", "shape", "numel", "k", "lambda", "R2", "KS", "sigma", "lambda/sigma"]
    if ex:
        header += ["dk", "dlambda%"]
    rows = []
    for m in report.matrices:
        row = [
            m.name,
            m.group,
            "-" if m.layer is None else str(m.layer),
            "x".join(map(str, m.shape)),
            str(m.numel),
            _num(m.fit.k, ".4f"),
            _num(m.fit.scale, ".4g"),
            _num(m.fit.r2, ".5f"),
            _num(m.fit.ks, ".4f"),
            _num(m.rms, ".4g"),
            _num(m.scale_over_rms, ".4f"),
        ]
        if ex and m.fit_all is not None:
            row += [_num(m.fit.k - m.fit_all.k, "+.5f"), _num(100 * (m.fit.scale / m.fit_all.scale - 1), "+.4f")]
        rows.append(row)
    out += _table(header, rows, left=2)
    out += ["", "Per group: pooled histogram fit of the group's matrices (merged counts, 1024 bins/decade)."]
    gheader = ["group", "matrices", "numel", "k", "lambda", "R2", "KS", "sigma", "lambda/sigma", "median k"]
    if ex:
        gheader += ["dk", "dlambda%"]
    grows = []
    for g in report.groups:
        row = [
            g.group,
            str(g.matrices),
            str(g.numel),
            _num(g.fit.k, ".4f"),
            _num(g.fit.scale, ".4g"),
            _num(g.fit.r2, ".5f"),
            _num(g.fit.ks, ".4f"),
            _num(g.rms, ".4g"),
            _num(g.scale_over_rms, ".4f"),
            _num(g.median_k, ".4f"),
        ]
        if ex and g.fit_all is not None:
            row += [_num(g.fit.k - g.fit_all.k, "+.5f"), _num(100 * (g.fit.scale / g.fit_all.scale - 1), "+.4f")]
        grows.append(row)
    out += _table(gheader, grows)
    fused = [m.name for m in report.matrices if _FUSED_QKV.search(m.name)]
    if fused:
        out.append(f"Note: {len(fused)} fused QKV matrices (e.g. {fused[0]}) hold V too; reported as selection.")
    failed = [m for m in report.matrices if not m.fit.success]
    for m in failed:
        out.append(f"fit failed: {m.name}: {m.fit.message}")
    if report.skipped:
        reasons: dict[str, int] = {}
        for s in report.skipped:
            reasons[s.reason] = reasons.get(s.reason, 0) + 1
        detail = ", ".join(f"{n} {r}" for r, n in reasons.items())
        out += ["", f"Skipped {len(report.skipped)} tensors: {detail}."]
    return "\n".join(out)

