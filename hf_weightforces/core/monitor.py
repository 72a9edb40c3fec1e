"""Device-side accumulation of the force budget between logging events, and its summary.

:class:`ForceMonitor` holds, per monitored parameter and on the parameters' device:

* the interval sums of (A, I, D, R, Δ_observed) over the budget steps since the last log,
* a count of steps whose terms were not finite (those steps are left out of the sums and the
  affected aggregates are reported as NaN, never silently),
* the latest observed squared norm (the "before" of the next step, the "now" of a log row).

A step's budget comes in through one method, :meth:`ForceMonitor.add`, as rows of terms per tensor
(core/rows.py: how each budget source makes them), or as a pending step whose terms are computed
with the interval's other steps at the log event (the planned pass's: a few operations per
interval, not per step).  Nothing leaves the device until :meth:`ForceMonitor.pack`, which returns one flat float64 tensor
per logging event (the thing a sharded run all-reduces); :meth:`ForceMonitor.summarize` turns the
host copy into metric rows.  Aggregates are sums first, ratios last (docs/budget.md).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

from .aggregates import ParamInfo, aggregate_masks
from .budget import BUDGET_TERMS, namespace, squared_norms
from .rows import Pending, Rows, index_tensor

__all__ = ["BUDGET_MODES", "OFFSET_RULES", "FORCE_KEYS", "PENDING_STEPS", "ForceMonitor", "Packed", "ParamInfo", "Pending",
           "Rows", "aggregate_masks", "summarize_sums"]

_NT = len(BUDGET_TERMS)  # align, inject, decay, rest, delta, rounding, decay_nominal, align_post

#: Pending steps kept at most before they are computed (:meth:`ForceMonitor.flush`): a long logging
#: interval is computed in pieces, so their inputs never take more than this many steps' memory.
PENDING_STEPS = 64

#: Which step stands for each block of the sparse-recording integral (the callback's ``offset_rule``).
OFFSET_RULES: tuple[str, ...] = ("right", "left")

#: ``weightforces/budget_mode`` codes: how the row's budget was computed (docs/optimizers.md).
#: moments: AdamW's moments read after the step; staged: the moments read before the step
#: (bitsandbytes Adam, Lion); observed_exact / observed_sampled: the observed update with a copy
#: of w_t / a coordinate sample of it; none: no budget (norms and fits only).
BUDGET_MODES: dict[str, int] = {"moments": 0, "staged": 1, "observed_exact": 2, "observed_sampled": 3, "none": 4}


class Packed(NamedTuple):
    """Host view of :meth:`ForceMonitor.pack` after the reduction."""

    sums: np.ndarray  # [P, len(BUDGET_TERMS)] interval sums
    nonfinite: np.ndarray  # [P] steps left out as non-finite
    norm2: np.ndarray  # [P] latest observed squared norm
    sampled: np.ndarray  # [P] interval sum of N·(A + I + D) at sampled steps
    var: np.ndarray | None = None  # [P, 2] interval sum of the sampling variances of A and I


class ForceMonitor:
    """Accumulates per-parameter budget sums on ``device``; one host transfer per log event."""

    def __init__(
        self, infos: Sequence[ParamInfo], device: torch.device | str = "cpu", sample_every: int | None = None,
        sample_at: int = 0,
    ) -> None:
        """``sample_every`` N also accumulates N·(A + I + D) at the steps whose number is ``sample_at``
        modulo N: the sparse-recording integral of docs/weibull.md (0, the default: each block's last
        step, the right-point rule; the first budget step of each block: the left-point rule)."""
        self.infos = list(infos)
        self.sample_every = sample_every
        self.sample_at = sample_at % sample_every if sample_every else 0
        self.device = torch.device(device)
        n = len(self.infos)
        self.sums = torch.zeros(n, _NT, dtype=torch.float64, device=self.device)
        self.nonfinite = torch.zeros(n, dtype=torch.float64, device=self.device)
        self._norm2 = torch.zeros(n, dtype=torch.float64, device=self.device)
        #: the index of the open chain of pending steps (:class:`~.rows.Pending`): the next step with
        #: this index continues it (no norms read, no operation); any reader of :attr:`norm2` ends it
        self._chain: torch.Tensor | None = None
        self.sampled = torch.zeros(n, dtype=torch.float64, device=self.device)
        self.steps = 0  # budget steps in the current interval (host-side count, no sync)
        self._aggregates: dict[tuple, object] = {}  # masks, made once per choice
        self._numel = np.array([i.numel for i in self.infos], dtype=np.float64)
        self.var = torch.zeros(n, 2, dtype=torch.float64, device=self.device)  # sampled observed mode
        #: which computation produced the rows (:data:`BUDGET_MODES`), set by the callback
        self.budget_mode: str | None = None
        self._pending: list[tuple[Pending, bool]] = []  # (step, sampled), computed at the next flush

    def __len__(self) -> int:
        return len(self.infos)

    @property
    def norm2(self) -> torch.Tensor:
        """The latest squared norm per tensor [P], float64 on the device (reading it ends the open
        chain of pending steps: their terms are computed, the norms after the last from the budget
        identity, the weights having moved since, :meth:`flush`)."""
        if self._chain is not None:
            self.flush()
        return self._norm2

    def before(self, index: torch.Tensor) -> torch.Tensor | None:
        """The squared norms before this step of the tensors at ``index`` (an index tensor on the
        device, the same object step after step): None when the step continues the open chain of
        pending steps with this index (consecutive steps of one plan: no operation), else read
        from :attr:`norm2`."""
        if self._chain is index:
            return None
        return self.norm2.index_select(0, index)

    # ------------------------------------------------------------------ observing
    def observe_norms(self, weights: Sequence[torch.Tensor], indices: Sequence[int] | None = None) -> None:
        """Record ||w||² (float64 accumulation) of local tensors as the current observation."""
        if not weights:
            return
        norms = squared_norms(weights).to(self.device)
        if indices is None:
            self.norm2.copy_(norms)
        else:
            self.norm2[index_tensor(indices, self.device)] = norms

    def add(self, rows: Sequence[Rows | Pending], step_id: int | None = None) -> None:
        """The one way a budget comes in: one optimizer step, as the :class:`~.rows.Rows` of the
        tensors it updated (none: a budget step with nothing to add; several: tensors on several
        devices, or budgets made several ways), or as a :class:`~.rows.Pending` step whose terms
        are computed at the next :meth:`flush` with the other pending steps of its source.  A
        non-finite row is left out of the sums and counted; the rows' squared norms become the
        current observation at once; at the sampled steps of the sparse-recording integral
        N·(A + I + D) is added too.  No host synchronisation."""
        self.steps += 1
        sampled = bool(self.sample_every) and step_id is not None and step_id % self.sample_every == self.sample_at
        for row in rows:
            if type(row) is Pending:  # a step of a chain: computed at the flush
                if not row.index.numel():
                    continue
                if row.start is None and self._chain is not row.index:
                    raise ValueError("a pending step continues a chain the monitor does not hold")
                if self._chain is not None and self._chain is not row.index:  # another source's chain ends
                    self.flush()
                self._pending.append((row, sampled))
                self._chain = row.index
                continue
            if not len(row.index):
                continue
            idx = row.index if isinstance(row.index, torch.Tensor) else index_tensor(row.index, self.device)
            self.norm2.index_copy_(0, idx, row.norm2.to(self.device))
            self._accumulate(idx, row.terms.to(self.device)[None], [0] if sampled else [])
            if row.var is not None:
                var = row.var.to(self.device)
                self.var.index_add_(0, idx, torch.where(torch.isfinite(var), var, 0.0))
        if len(self._pending) >= PENDING_STEPS:  # right after the step: the weights are the last step's
            self.flush(measured=True)

    def flush(self, measured: bool = False) -> None:
        """The terms of the pending steps, computed and added, chain by chain (one ``evaluate`` over
        a chain's stacked inputs), and the squared norms after each chain written into
        :attr:`norm2`.  ``measured``: the weights are still those of the last pending step, so the
        open chain ends on their measured norms (its Δ adds up to the observed change, its closure
        is the observed one): :meth:`pack` (a log event) and :meth:`add` when it keeps
        :data:`PENDING_STEPS` steps say so (and :meth:`end_chain` ends a chain so before the flush);
        otherwise a chain ends on the norms of the budget identity, where the next step starts (a
        chain's Δ telescopes, section 9 of docs/budget.md).  On a CPU the inputs are stacked and
        evaluated as numpy arrays (the same float64 arithmetic: :func:`~.budget.namespace`):
        sixty-odd operations on small vectors cost about half of torch's there, right after a
        training step."""
        pending, self._pending = self._pending, []
        chain, self._chain = self._chain, None
        host = self.device.type == "cpu"
        while pending:
            first = pending[0][0]
            n = next((k for k, (row, _) in enumerate(pending) if k and row.start is not None), len(pending))
            batch, pending = pending[:n], pending[n:]
            stacked = [_stacked(xs, host) for xs in zip(*(row.inputs for row, _ in batch))]
            end = batch[-1][0].end
            if end is None and measured and not pending and chain is not None:
                end = batch[-1][0].measure().to(self.device)
            if host:
                terms, after = first.evaluate(*stacked, first.start.numpy(), None if end is None else end.numpy())
                after = torch.from_numpy(np.ascontiguousarray(after))
            else:
                terms, after = first.evaluate(*stacked, first.start, end)
            self._accumulate(first.index, terms, [k for k, (_, sampled) in enumerate(batch) if sampled])
            self._norm2.index_copy_(0, first.index, after)

    def end_chain(self) -> None:
        """The open chain ends on the measured norms of its last step's tensors, the weights being
        that step's (the callback, after a budget step the next step does not continue): they are
        written into :attr:`norm2` for the next step to start from, and kept with the step for the
        flush (its terms wait for the log event)."""
        if self._chain is None:
            return
        row, sampled = self._pending[-1]
        end = row.measure().to(self.device)
        self._norm2.index_copy_(0, row.index, end)
        self._pending[-1] = (row._replace(end=end), sampled)
        self._chain = None

    def _accumulate(self, idx: torch.Tensor, terms: torch.Tensor | np.ndarray, sampled: list[int]) -> None:
        """Terms [S, k, len(BUDGET_TERMS)] of S steps (a tensor on the device, or a numpy array on a
        CPU) added at ``idx``; ``sampled``: which of the S are sampled steps of the integral.  A
        non-finite row of a step is zeroed and counted."""
        xp = namespace(terms)
        finite = xp.isfinite(terms).all(-1)
        if xp is np and finite.all():  # the usual interval on a CPU: nothing to zero or count
            adds = [(self.sums, terms.sum(0))]
        else:
            terms = xp.where(finite[..., None], terms, 0.0)
            adds = [(self.sums, terms.sum(0)), (self.nonfinite, (~finite).sum(0, dtype=xp.float64))]
        adds += [(self.sampled, terms[s, :, :3].sum(1) * self.sample_every) for s in sampled]
        for into, rows in adds:
            into.index_add_(0, idx, torch.from_numpy(rows) if xp is np else rows)

    # ------------------------------------------------------------------ reporting
    def pack(self) -> torch.Tensor:
        """One flat float64 tensor: sums [P*len(BUDGET_TERMS)], non-finite counts [P], squared norms [P],
        sampled integral [P]."""
        self.flush(measured=True)
        return torch.cat((self.sums.reshape(-1), self.nonfinite, self.norm2, self.sampled, self.var.reshape(-1)))

    @property
    def packed_size(self) -> int:
        return len(self.infos) * (_NT + 5)

    def unpack(self, flat: np.ndarray) -> Packed:
        n = len(self.infos)
        rest = flat[n * _NT :]
        return Packed(flat[: n * _NT].reshape(n, _NT), rest[:n], rest[n : 2 * n], rest[2 * n : 3 * n],
                      rest[3 * n : 5 * n].reshape(n, 2))

    def reset(self) -> None:
        self._pending.clear()  # a new interval (pack, which flushes, came first)
        self._chain = None
        self.sums.zero_()
        self.nonfinite.zero_()
        self.sampled.zero_()
        self.var.zero_()
        self.steps = 0

    def aggregates(self, per_layer: bool = True, per_matrix: bool = False) -> dict[str, np.ndarray]:
        """Name → boolean mask over parameters: the classes, ``total``, layers and matrices (made once
        per choice: the parameters never change)."""
        if (per_layer, per_matrix) not in self._aggregates:
            masks = aggregate_masks(self.infos, per_layer, per_matrix)
            for mask in masks.values():
                mask.flags.writeable = False
            self._aggregates[per_layer, per_matrix] = masks
        return dict(self._aggregates[per_layer, per_matrix])

    def summarize(
        self, flat: np.ndarray, steps: int, *, per_layer: bool = True, per_matrix: bool = False, prefix: str = "weightforces"
    ) -> dict[str, float]:
        packed = self.unpack(flat)
        names, masks = self._mask_matrix(per_layer, per_matrix)
        # every aggregate at once: [aggregates, tensors] masks over the per-tensor columns, the
        # tensors summed in order (what is outside an aggregate, NaN included, is a zero there)
        inside = masks.T[:, :, None]  # [P, A, 1]
        sums = np.where(inside, packed.sums[:, None, :], 0.0).sum(0)  # [A, len(BUDGET_TERMS)]
        norm2, numel = (np.where(inside[..., 0], x[:, None], 0.0).sum(0) for x in (packed.norm2, self._numel))
        # steps, not tensor-steps: the most any one tensor of the aggregate had (exact when the
        # non-finite steps hit its tensors together, as an overflow does; never more than the steps)
        worst = np.where(inside[..., 0], packed.nonfinite[:, None], 0.0).max(0, initial=0.0)
        sampled = self.budget_mode == "observed_sampled" and steps > 0
        var = np.where(inside, packed.var[:, None, :], 0.0).sum(0) if sampled else None
        metrics: dict[str, float] = {f"{prefix}/steps": float(steps)}
        if self.budget_mode is not None:
            metrics[f"{prefix}/budget_mode"] = float(BUDGET_MODES[self.budget_mode])
        for k, name in enumerate(names):
            row = summarize_sums(sums[k], float(worst[k]), float(norm2[k]), float(numel[k]), steps)
            if var is not None:  # standard errors of the logged per-step means (independent draws per step)
                row["align_se"], row["inject_se"] = (math.sqrt(max(float(v), 0.0)) / steps for v in var[k])
            metrics.update(zip(_keys(prefix, name, tuple(row)), row.values()))
        return metrics

    def _mask_matrix(self, per_layer: bool, per_matrix: bool) -> tuple[list[str], np.ndarray]:
        """The aggregates' names and their masks stacked [A, P] (made once per choice)."""
        key = ("matrix", per_layer, per_matrix)
        if key not in self._aggregates:
            masks = self.aggregates(per_layer, per_matrix)
            self._aggregates[key] = (list(masks), np.stack(list(masks.values())) if masks else
                                     np.zeros((0, len(self.infos)), dtype=bool))
        return self._aggregates[key]


def _stacked(xs: Sequence, host: bool) -> torch.Tensor | np.ndarray:
    """One input of a chain's steps stacked along a new first dimension: a tensor on the device, a
    numpy array on a CPU (where a step vector is a plain float64 buffer)."""
    if not host:
        return torch.stack(xs)
    return torch.stack(xs).numpy() if isinstance(xs[0], torch.Tensor) else np.array(xs)


@functools.lru_cache(maxsize=4096)
def _keys(prefix: str, name: str, keys: tuple[str, ...]) -> tuple[str, ...]:
    """``prefix/name/key`` for each of ``keys`` (made once: the same every log event)."""
    return tuple(f"{prefix}/{name}/{key}" for key in keys)


#: Keys of one aggregate's force row, in the order :func:`summarize_sums` writes them.
FORCE_KEYS: tuple[str, ...] = ("align", "inject", "decay", "rest", "delta", "rounding", "closure", "closure_rel",
                               "align_share", "inject_share", "decay_share", "decay_ratio", "align_post")


def summarize_sums(sums: np.ndarray, nonfinite: float, norm2: float, numel: float, steps: int) -> dict[str, float]:
    """Metric row for one aggregate from its interval sums (docs/budget.md: sums first, ratios last).

    Forces are means per budget step; shares come from the interval sums.  ``rounding`` is the
    part of the observed Δ that rounding of low-precision stored weights decided (zero where the
    budget is rebuilt from float32 weights); ``closure`` = Δ - (A + I + D + R + rounding) per step,
    bookkeeping only, and ``closure_rel`` divides it by |A| + |I| + |D|.  ``decay_ratio`` is the
    decay the optimizer applied over the nominal -2ηλ||w||² (1.0 when they agree or both are 0);
    ``align_post`` = -2η<w_{t+1}, u_t>, the research code's alignment (docs/budget.md).
    """
    nan = float("nan")
    padded = np.zeros(len(BUDGET_TERMS))
    padded[: len(sums)] = sums
    align, inject, decay, rest, delta, rounding, decay_nominal, align_post = (float(x) for x in padded)
    budget = abs(align) + abs(inject) + abs(decay)
    closure = delta - (align + inject + decay + rest + rounding)
    row: dict[str, float] = {}
    if steps > 0 and nonfinite == 0:
        row.update(
            align=align / steps,
            inject=inject / steps,
            decay=decay / steps,
            rest=rest / steps,
            delta=delta / steps,
            rounding=rounding / steps,
            closure=closure / steps,
            closure_rel=closure / budget if budget > 0 else nan,
            align_share=abs(align) / budget if budget > 0 else nan,
            inject_share=abs(inject) / budget if budget > 0 else nan,
            decay_share=abs(decay) / budget if budget > 0 else nan,
            decay_ratio=decay / decay_nominal if decay_nominal != 0 else (1.0 if decay == 0 else nan),
            align_post=align_post / steps,
        )
    elif steps > 0:  # non-finite values in this interval: report them as such
        row.update({k: nan for k in FORCE_KEYS})
    row["nonfinite_steps"] = float(nonfinite)
    row["norm2"] = norm2
    row["rms"] = math.sqrt(norm2 / numel) if numel > 0 and math.isfinite(norm2) and norm2 >= 0 else nan
    row["numel"] = numel
    return row
