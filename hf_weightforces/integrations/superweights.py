"""Leaving out the "super weights": the few largest-magnitude weights of a model.

Large language models carry a handful of weights far larger than the rest; the paper reports
that the alignment dominance is robust to their removal.  This tracker picks the ``n`` largest |w|
over all weight matrices (re-picked at every log event, fixed within an interval), runs the same
force budget on just those elements (a gather of ``n`` values per step: no extra pass over the
weights) and reports the budget and the Weibull fit without them, so users see how much the
numbers move.  Replicated backends only (single process, DDP).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..core.monitor import ForceMonitor, ParamInfo
from ..core.rows import moment_rows
from ..core.weibull import histogram_counts

__all__ = ["SuperWeightTracker"]


class SuperWeightTracker:
    def __init__(self, n: int, infos: Sequence[ParamInfo], ndims: Sequence[int], device: torch.device) -> None:
        self.n = n
        self.eligible = [d >= 2 for d in ndims]
        self.monitor = ForceMonitor(infos, device=device)
        self.selected: dict[int, torch.Tensor] = {}  # param index -> flat indices into its tensor

    def select(self, weights: Sequence[torch.Tensor]) -> None:
        """The ``n`` largest |w| over every eligible matrix (one small host transfer)."""
        vals, owners, flats = [], [], []
        for i, w in enumerate(weights):
            if not self.eligible[i] or w.numel() == 0:
                continue
            k = min(self.n, w.numel())
            top = torch.topk(w.detach().reshape(-1).abs(), k)
            vals.append(top.values.float().cpu())
            flats.append(top.indices.cpu())
            owners.append(torch.full((k,), i, dtype=torch.long))
        self.selected = {}
        if not vals:
            return
        vals_t, owners_t, flats_t = torch.cat(vals), torch.cat(owners), torch.cat(flats)
        keep = torch.topk(vals_t, min(self.n, vals_t.numel())).indices
        for i in owners_t[keep].unique().tolist():
            mask = owners_t[keep] == i
            self.selected[i] = flats_t[keep][mask].to(weights[i].device)

    def _gather(self, tensors: Sequence[torch.Tensor], indices: Sequence[int]) -> list[torch.Tensor]:
        return [t.detach().reshape(-1)[self.selected[i]] for t, i in zip(tensors, indices)]

    def observe(self, weights: Sequence[torch.Tensor]) -> None:
        idx = sorted(self.selected)
        if idx:
            self.monitor.observe_norms(self._gather([weights[i] for i in idx], idx), idx)

    def record(self, views, step_id: int) -> None:
        views = [v for v in views if v.index in self.selected]
        pick = lambda v, t: t.detach().reshape(-1)[self.selected[v.index]]  # noqa: E731
        self.monitor.add(moment_rows(views, self.monitor.norm2, pick), step_id)

    def counts(self, weights: Sequence[torch.Tensor], rows_of: Sequence[Sequence[int]], n_rows: int,
               edges: torch.Tensor) -> np.ndarray:
        """Histogram counts of the selected magnitudes per Weibull aggregate, to subtract."""
        out = np.zeros((n_rows, edges.numel() + 1))
        for i, flat in self.selected.items():
            c = histogram_counts(weights[i].detach().reshape(-1)[flat], edges).cpu().numpy()
            for r in rows_of[i]:
                out[r] += c
        return out

    def metrics(self, main_sums: np.ndarray, masks: dict[str, np.ndarray], steps: int) -> dict[str, float]:
        """Per aggregate: the budget shares and alignment without the super weights."""
        sub = self.monitor.unpack(self.monitor.pack().cpu().numpy()).sums
        steps = max(steps, 1)
        self.monitor.reset()
        out: dict[str, float] = {}
        for name, mask in masks.items():
            a, i, d = (main_sums[mask, :3] - sub[mask, :3]).sum(axis=0)
            budget = abs(a) + abs(i) + abs(d)
            out[f"weightforces/{name}/align_no_super"] = float(a) / steps
            out[f"weightforces/{name}/align_share_no_super"] = abs(a) / budget if budget > 0 else float("nan")
            out[f"weightforces/{name}/super_weights"] = float(sum(len(self.selected.get(k, ())) for k in np.flatnonzero(mask)))
        return out
