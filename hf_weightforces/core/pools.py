"""Pooled Weibull fits during training: which aggregates are fitted, and from which tensors.

Only weight matrices are fitted (docs/weibull.md): the ``other`` class (biases, norm scales near 1)
is not Weibull-distributed and would swamp a pool, so the fits run per matrix class and on
``matrices``, the pool of every class but ``other`` (the same tensors as the ``matrices`` row of
the force budget, so λ/σ, ``rms_pred`` and the offsets of a row all describe one set; ``total``
has no Weibull keys: docs/aggregates.md).  Counts of |w| in fixed log-spaced bins are additive
over tensors and shards, so each rank adds its local pieces into one row per aggregate and the
rows travel in the log event's single all-reduce; the fits and the offset rows (docs/weibull.md)
are then plain host arithmetic.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from .aggregates import ParamInfo
from .groups import GROUPS, MATRICES
from .integral import RunIntegral, weibull_row
from .weibull import MagnitudeHistogram, WeibullFit, fit_weibull_histogram, pooled_counts

__all__ = ["WeibullPools"]


class WeibullPools:
    def __init__(self, infos: Sequence[ParamInfo], device: torch.device | str = "cpu", per_matrix: bool = False) -> None:
        self.infos = list(infos)
        self.hist = MagnitudeHistogram()
        self.edges = self.hist.edges_tensor(device)
        self.device = torch.device(device)
        classes = [g for g in GROUPS if g != "other" and any(i.group == g for i in infos)]
        self.names = classes + ([MATRICES] if classes else [])
        if per_matrix:
            self.names += [f"matrix/{i.name}" for i in infos if i.group != "other"]
        row = {name: k for k, name in enumerate(self.names)}
        #: per parameter, the aggregate rows its counts feed (none for ``other``)
        self.rows = [
            [] if i.group == "other" else
            [row[i.group], row[MATRICES]] + ([row[f"matrix/{i.name}"]] if f"matrix/{i.name}" in row else [])
            for i in infos
        ]
        self.masks = np.zeros((len(self.names), len(infos)), dtype=bool)
        for p, rows_of in enumerate(self.rows):
            self.masks[rows_of, p] = True
        # the tensors counted together: one pool per distinct set of rows (a class, with per_matrix
        # each matrix), and which rows each pool's counts feed
        kinds = list(dict.fromkeys(tuple(r) for r in self.rows if r))
        self._pool_of = [kinds.index(tuple(r)) if r else -1 for r in self.rows]
        feeds = np.zeros((len(self.names), len(kinds)))
        for k, rows_of in enumerate(kinds):
            feeds[list(rows_of), k] = 1.0
        self._feeds = torch.from_numpy(feeds).to(self.device)

    @property
    def bins(self) -> int:
        """Counts per aggregate (underflow, the bins, overflow)."""
        return self.edges.numel() + 1

    @property
    def size(self) -> int:
        """Length of the flat counts tensor :meth:`counts` returns."""
        return len(self.names) * self.bins

    def counts(self, weights: Sequence[torch.Tensor]) -> torch.Tensor:
        """Counts of |w| per aggregate from the local pieces, flattened, float64, on the device: the
        tensors of each pool counted together (:func:`pooled_counts`), then added into the rows
        they feed (float64 sums of integer counts: exact below 2^53)."""
        counted = [(w, k) for w, k in zip(weights, self._pool_of) if k >= 0]
        pooled = pooled_counts([w for w, _ in counted], [k for _, k in counted], self._feeds.shape[1], self.edges)
        return (self._feeds @ pooled.to(self.device, torch.float64)).reshape(-1)

    def fits(self, counts: np.ndarray) -> list[WeibullFit]:
        """One fit per aggregate from (reduced) flat counts."""
        rows = np.asarray(counts).reshape(len(self.names), self.bins)
        return [fit_weibull_histogram(r, self.hist.edges) for r in rows]

    def metrics(self, counts: np.ndarray, norm2: np.ndarray, integral: RunIntegral) -> dict[str, float]:
        """Fits, λ/σ and the offset components per aggregate; the first call sets the k-lock
        reference (λ/σ at the run's start) in ``integral``."""
        numel = np.array([i.numel for i in self.infos], dtype=np.float64)
        out: dict[str, float] = {}
        for name, mask, fit in zip(self.names, self.masks, self.fits(counts)):
            n2, n = float(norm2[mask].sum()), float(numel[mask].sum())
            if name not in integral.lock_ratio and fit.success and n2 > 0:
                integral.lock_ratio[name] = fit.scale / math.sqrt(n2 / n)
                integral.start_fit[name] = (fit.k, fit.scale)
            row = weibull_row(
                fit, n2, n,
                None if integral.norm2_start is None else float(integral.norm2_start[mask].sum()),
                float(integral.dense[mask].sum()), float(integral.sampled[mask].sum()),
                integral.lock_ratio.get(name, math.nan),
            )
            out.update({f"weightforces/{name}/{key}": v for key, v in row.items()})
        return out
