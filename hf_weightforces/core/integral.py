"""What the live monitor integrates over a whole run, and its Weibull/offset rows (docs/weibull.md).

:class:`RunIntegral` keeps, per monitored parameter, the squared norm at the start of training
and the running integral of the forces since then (dense: every budget step; sampled: a step every
N, each standing for N), plus, per aggregate, the Weibull fit at the start (the k-lock bridge's
λ/σ).  It is plain numpy, serialises to JSON for checkpoints (no pickle), and is identical on
every rank because it is only fed reduced numbers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from .groups import MATRICES, TOTAL
from .offset import offset_components, predicted_rms
from .weibull import WeibullFit

__all__ = ["RunIntegral", "weibull_row"]

STATE_VERSION = 1


@dataclass
class RunIntegral:
    names: list[str]
    norm2_start: np.ndarray | None = None  # [P] observed at the first step of the run
    dense: np.ndarray = field(default_factory=lambda: np.zeros(0))  # [P] Σ (A+I+D)·every
    sampled: np.ndarray = field(default_factory=lambda: np.zeros(0))  # [P] Σ N·(A+I+D) at sampled steps
    lock_ratio: dict[str, float] = field(default_factory=dict)  # aggregate -> λ/σ at the start
    start_fit: dict[str, tuple[float, float]] = field(default_factory=dict)  # aggregate -> (k0, λ0)

    def __post_init__(self) -> None:
        n = len(self.names)
        if self.dense.size == 0:
            self.dense = np.zeros(n)
        if self.sampled.size == 0:
            self.sampled = np.zeros(n)

    @property
    def started(self) -> bool:
        return self.norm2_start is not None

    def start(self, norm2: np.ndarray) -> None:
        self.norm2_start = np.asarray(norm2, dtype=np.float64).copy()
        self.dense[:] = 0.0
        self.sampled[:] = 0.0

    def add(self, interval_forces: np.ndarray, interval_sampled: np.ndarray, every: int) -> None:
        """Add one logging interval: per-parameter Σ(A+I+D) over its budget steps, and the sampled sum."""
        self.dense += _nan_to_zero(interval_forces) * every
        self.sampled += _nan_to_zero(interval_sampled)

    def to_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "names": list(self.names),
            "norm2_start": None if self.norm2_start is None else self.norm2_start.tolist(),
            "dense": self.dense.tolist(),
            "sampled": self.sampled.tolist(),
            "lock_ratio": dict(self.lock_ratio),
            "start_fit": {k: list(v) for k, v in self.start_fit.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping, names: Sequence[str]) -> RunIntegral:
        """Restore, checking every field: the same parameters (names, in order), arrays of one
        number per parameter, numbers where numbers belong.  Raises ``ValueError`` saying which
        field is wrong (a resume then restarts the integrals)."""
        if not isinstance(data, Mapping):
            raise ValueError(f"the integral is a JSON {type(data).__name__}, not an object")
        if data.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported weight-forces state version {data.get('version')!r}")
        saved = data.get("names")
        if not isinstance(saved, list) or list(saved) != list(names):
            raise ValueError("the saved weight-forces state describes different parameters than this model")
        n = len(names)
        start = data.get("norm2_start")
        return cls(
            names=list(names),
            norm2_start=None if start is None else _numbers(start, n, "norm2_start"),
            dense=_numbers(data.get("dense"), n, "dense"),
            sampled=_numbers(data.get("sampled"), n, "sampled"),
            lock_ratio={_pool_name(k): float(v) for k, v in _number_map(data.get("lock_ratio", {}), "lock_ratio").items()},
            start_fit={_pool_name(k): (float(v[0]), float(v[1]))
                       for k, v in _number_map(data.get("start_fit", {}), "start_fit", pair=True).items()},
        )


def _is_number(x: object) -> bool:
    if isinstance(x, int) and not isinstance(x, bool):
        return abs(x) < 2**1023  # converts to float64
    return isinstance(x, float)


def _numbers(values: object, n: int, field: str) -> np.ndarray:
    """A list of ``n`` numbers as float64, or ValueError naming the field."""
    if not isinstance(values, list) or len(values) != n or not all(_is_number(x) for x in values):
        got = f"a list of {len(values)}" if isinstance(values, list) else type(values).__name__
        raise ValueError(f"{field} must be a list of {n} numbers (got {got})")
    try:
        return np.asarray(values, dtype=np.float64)
    except OverflowError:
        raise ValueError(f"{field} holds an integer beyond float range") from None


def _number_map(values: object, field: str, pair: bool = False) -> dict:
    """``{aggregate: number}`` (or ``{aggregate: [number, number]}``), or ValueError naming the field."""
    ok = isinstance(values, Mapping) and all(
        isinstance(k, str) and (isinstance(v, list) and len(v) == 2 and all(map(_is_number, v)) if pair else _is_number(v))
        for k, v in values.items())
    if not ok:
        raise ValueError(f"{field} must map aggregate names to {'[k, scale] pairs' if pair else 'numbers'}")
    return dict(values)


def _pool_name(name: str) -> str:
    """Checkpoints written before the ``matrices`` pool called it ``total`` (docs/aggregates.md)."""
    return MATRICES if name == TOTAL else name


def weibull_row(
    fit: WeibullFit,
    norm2: float,
    numel: float,
    norm2_start: float | None,
    dense: float,
    sampled: float,
    lock_ratio: float,
) -> dict[str, float]:
    """Weibull and offset keys for one aggregate (without the ``weightforces/G/`` prefix).

    ``lock_ratio`` is the k-lock ratio λ/σ of the run's start fit, logged as ``offset_klock_ratio`` so
    that ``hf-weightforces lambda`` (``--lock start``, its default) uses the same one.  The dense σ
    prediction integrates every budget step (each standing for the ``every`` steps up to it); the sampled
    one each sample at a multiple of N for the N steps up to it: the right-point rule of
    :func:`~hf_weightforces.analysis.dynamics.integrate_forces`.
    """
    row = {
        "weibull_k": fit.k,
        "weibull_scale": fit.scale,
        "weibull_r2": fit.r2,
        "weibull_ks": fit.ks,
    }
    sigma = math.sqrt(norm2 / numel) if numel > 0 and norm2 >= 0 else math.nan
    row["weibull_scale_over_rms"] = fit.scale / sigma if sigma > 0 else math.nan
    if norm2_start is None:
        return row
    sigma_pred = predicted_rms(norm2_start, dense, numel)
    sigma_pred_sampled = predicted_rms(norm2_start, sampled, numel)
    row["rms_pred"] = sigma_pred
    row["rms_pred_sampled"] = sigma_pred_sampled
    row["offset_klock_ratio"] = lock_ratio  # the lock point: λ/σ of the run's start fit (shared with `lambda`)
    row.update(offset_components(sigma, sigma_pred, fit.k, fit.scale, lock_ratio))
    sampled_parts = offset_components(sigma, sigma_pred_sampled, fit.k, fit.scale, lock_ratio)
    row["offset_integration_sampled"] = sampled_parts["offset_integration"]
    row["offset_total_klock_sampled"] = sampled_parts["offset_total_klock"]
    return row


def _nan_to_zero(x: np.ndarray) -> np.ndarray:
    """``np.nan_to_num(x, nan=0.0)``, called only when ``x`` holds a non-finite value (it costs
    ~40 µs a call, most of a log event's integral)."""
    x = np.asarray(x, dtype=np.float64)
    return x if np.isfinite(x).all() else np.nan_to_num(x, nan=0.0)
