"""Device-side accumulation of the force budget between logging events, and its summary.

:class:`ForceMonitor` holds, per monitored parameter and on the parameters' device:

* the interval sums of (A, I, D, R, Δ_observed) over the budget steps since the last log,
* a count of steps whose terms were not finite (those steps are left out of the sums and the
  affected aggregates are reported as NaN, never silently),
* the latest observed squared norm (the "before" of the next step, the "now" of a log row).

Nothing leaves the device until :meth:`ForceMonitor.pack`, which returns one flat float64 tensor
per logging event (the thing a sharded run all-reduces); :meth:`ForceMonitor.summarize` turns the
host copy into metric rows.  Aggregates are sums first, ratios last (docs/budget.md).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

from .aggregates import ParamInfo, aggregate_masks
from .budget import (
    BUDGET_TERMS,
    bias_scales,
    budget_from_dots,
    budget_from_intended,
    decay_factor,
    intended_dots,
    squared_norms,
    step_dots,
)
from .kernels import to_device

__all__ = ["BUDGET_MODES", "OFFSET_RULES", "FORCE_KEYS", "ForceMonitor", "Packed", "ParamInfo", "aggregate_masks", "summarize_sums"]

_NT = len(BUDGET_TERMS)  # align, inject, decay, rest, delta, rounding, decay_nominal, align_post

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


def _is_host(x: object) -> bool:
    return not isinstance(x, torch.Tensor) or x.device.type == "cpu"


def _to_device(values: Sequence[float], device: torch.device, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A host list as a device tensor without a host synchronisation (pinned, non-blocking copy)."""
    return to_device(torch.tensor(values, dtype=dtype), device)


_INDEX_CACHE_SIZE = 64


def _index(cache: dict, indices: Sequence[int], device: torch.device) -> torch.Tensor:
    """The index tensor of ``indices`` on ``device``, made once per distinct set (the parameters a
    step updates are the same set step after step): no per-step host-to-device copy."""
    key = tuple(int(i) for i in indices)
    idx = cache.get(key)
    if idx is None:
        if len(cache) >= _INDEX_CACHE_SIZE:
            cache.clear()
        idx = cache[key] = _to_device(key, device, torch.long)
    return idx


def _bias_scales(steps, betas, eps, dev: torch.device) -> tuple[torch.Tensor, list]:
    """(s [k] on ``dev``, ε' per tensor) of :func:`~.budget.bias_scales` for each tensor's counter
    after the step; counters on an accelerator (fused/capturable AdamW) stay there."""
    if all(_is_host(s) for s in steps):
        scales = [bias_scales(float(s), b1, b2, e) for s, (b1, b2), e in zip(steps, betas, eps)]
        return _to_device([s for s, _ in scales], dev), [e for _, e in scales]
    t = torch.stack([torch.as_tensor(s, device=dev).to(torch.float64).reshape(()) for s in steps])
    b1 = _to_device([b[0] for b in betas], dev)
    b2 = _to_device([b[1] for b in betas], dev)
    bc2_sqrt = torch.sqrt(1.0 - b2**t)
    return bc2_sqrt / (1.0 - b1**t), list((_to_device(list(eps), dev) * bc2_sqrt).unbind())


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
        self.norm2 = torch.zeros(n, dtype=torch.float64, device=self.device)
        self.sampled = torch.zeros(n, dtype=torch.float64, device=self.device)
        self.steps = 0  # budget steps in the current interval (host-side count, no sync)
        self._indices: dict[tuple[int, ...], torch.Tensor] = {}  # index tensors, planned once per set
        self._aggregates: dict[tuple[bool, bool], dict[str, np.ndarray]] = {}  # masks, made once per choice
        self.dots_method = "auto"
        self.var = torch.zeros(n, 2, dtype=torch.float64, device=self.device)  # sampled observed mode
        #: which computation produced the rows (:data:`BUDGET_MODES`), set by the callback
        self.budget_mode: str | None = None
        self._staged: tuple | None = None  # the budget staged before the step, until recorded

    def __len__(self) -> int:
        return len(self.infos)

    @property
    def staged(self) -> bool:
        """Whether a budget staged before the step (:meth:`stage_intended`, :meth:`stage_dots`)
        waits to be recorded."""
        return self._staged is not None

    def drop_staged(self) -> None:
        """Forget a staged budget (its pass failed): the step is recorded the post-step way."""
        self._staged = None

    # ------------------------------------------------------------------ observing
    def observe_norms(self, weights: Sequence[torch.Tensor], indices: Sequence[int] | None = None) -> None:
        """Record ||w||² (float64 accumulation) of local tensors as the current observation."""
        if not weights:
            return
        norms = squared_norms(weights).to(self.device)
        if indices is None:
            self.norm2.copy_(norms)
        else:
            self.norm2[_index(self._indices, indices, self.device)] = norms

    def record_step(
        self,
        indices: Sequence[int],
        weights: Sequence[torch.Tensor],
        exp_avgs: Sequence[torch.Tensor],
        second_moments: Sequence[torch.Tensor],
        steps: Sequence[float | torch.Tensor],
        lrs: Sequence[float],
        weight_decays: Sequence[float],
        betas: Sequence[tuple[float, float]],
        eps: Sequence[float],
        step_id: int | None = None,
        factors: Sequence[float] | None = None,
    ) -> None:
        """Add one optimizer step's budget for the parameters the optimizer updated.

        Inputs are the post-step local weights and the optimizer's own moments; nothing is
        copied and nothing is synchronised with the host.  ``factors`` are the decay factors the
        optimizer applied (:func:`~hf_weightforces.core.budget.decay_factor`); by default the
        float32-rounded factor of each tensor's dtype.
        """
        self.steps += 1
        if not indices:
            return
        dev = weights[0].device
        if factors is None:
            factors = [decay_factor(lr, wd, w.dtype) for lr, wd, w in zip(lrs, weight_decays, weights)]
        u_scale, eps_terms = _bias_scales(steps, betas, eps, dev)
        dots = step_dots(weights, exp_avgs, second_moments, eps_terms)
        idx = _index(self._indices, indices, self.device)
        terms = budget_from_dots(
            dots.to(self.device),
            _to_device(list(lrs), self.device),
            _to_device(list(weight_decays), self.device),
            u_scale.to(self.device),
            self.norm2[idx],
            _to_device(list(factors), self.device),
        )
        self._add(idx, terms, step_id)
        self.norm2[idx] = dots[:, 0].to(self.device)

    def record_planned(self, step, step_id: int | None = None) -> None:
        """Add one optimizer step's budget through a planned pass (core/plan.py): ``step`` holds the
        :class:`~.plan.StepPlan` (on this monitor's device) and this step's tensors, counters and
        step vector (``ShardContext.planned_step``).  One compiled call (or a handful of device
        operations) however many tensors; tensors the step did not update are masked out on the
        device."""
        self.steps += 1
        plan = step.plan
        terms = plan.run(step.weights, step.exp_avgs, step.second_moments, step.t_after, step.t_before,
                         step.hyper_now, self.sums, self.nonfinite, self.norm2)
        if self.sample_every and step_id is not None and step_id % self.sample_every == self.sample_at:
            self.sampled.index_add_(0, plan.index, terms[:, :3].sum(dim=1) * self.sample_every)

    def _add(self, idx: torch.Tensor, terms: torch.Tensor, step_id: int | None) -> None:
        finite = torch.isfinite(terms).all(dim=1)
        terms = torch.where(finite[:, None], terms, torch.zeros_like(terms))
        self.sums.index_add_(0, idx, terms)
        if self.sample_every and step_id is not None and step_id % self.sample_every == self.sample_at:
            self.sampled.index_add_(0, idx, terms[:, :3].sum(dim=1) * self.sample_every)
        self.nonfinite.index_add_(0, idx, (~finite).to(torch.float64))

    # ------------------------------------------------------------------ the intended update
    def stage_intended(
        self,
        indices: Sequence[int],
        weights: Sequence[torch.Tensor],
        grads: Sequence[torch.Tensor],
        exp_avgs: Sequence[torch.Tensor | None],
        exp_avg_sqs: Sequence[torch.Tensor | None],
        max_exp_avg_sqs: Sequence[torch.Tensor | None],
        steps: Sequence[float],
        lrs: Sequence[float],
        weight_decays: Sequence[float],
        betas: Sequence[tuple[float, float]],
        eps: Sequence[float],
        maximize: Sequence[bool],
        grad_scale: float | torch.Tensor | None = None,
        factors: Sequence[float] | None = None,
    ) -> None:
        """Before the step: the budget of the update AdamW intends, from the true w_t (docs/budget.md,
        section 5).  Kept until :meth:`record_intended` sees which tensors were really updated;
        ``steps`` are the counters of the step about to be taken (the stored one + 1)."""
        self._staged = None
        if not indices:
            return
        if factors is None:
            factors = [decay_factor(lr, wd, w.dtype) for lr, wd, w in zip(lrs, weight_decays, weights)]
        dots = intended_dots(weights, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, betas, eps,
                             maximize, grad_scale).to(self.device)
        terms = budget_from_intended(dots, _to_device(list(lrs), self.device),
                                     _to_device(list(weight_decays), self.device), _to_device(list(factors), self.device))
        self._staged = ({int(i): k for k, i in enumerate(indices)}, terms, dots[:, 0])

    def record_intended(
        self, indices: Sequence[int], weights_after: Sequence[torch.Tensor], step_id: int | None = None,
        views: Sequence | None = None,
    ) -> list[int]:
        """After the step: add the staged intended budget of the tensors in ``indices`` (those
        the optimizer really updated), with the observed Δ and ``rounding`` = Δ - (A + I + D + R).
        Returns the indices that had nothing staged (to be recorded the post-step way).

        ``views`` (AdamW: the tensors' views, ``index``, ``weight``, ``exp_avg``, ``second_moment``,
        ``step``, ``hyper``): ``align_post`` is then the research code's formula on what is stored
        after the step, -2η s <w_{t+1}, ũ_t> from the stored weights and moments (bf16/fp16-held:
        both rounded), read by the same pass that observes ||w_{t+1}||²; without them (bitsandbytes,
        whose moments are quantised) it is c A + 2I of the intended update (docs/budget.md, section 6)."""
        staged, self._staged = self._staged, None
        rows = {} if staged is None else staged[0]
        have = [i for i in indices if i in rows]
        missing = [i for i in indices if i not in rows]
        if not have:
            return missing
        pick = _index(self._indices, [rows[i] for i in have], self.device)
        intended, before = staged[1][pick], staged[2][pick]
        align, inject, decay, rest, decay_nominal, align_post = intended.unbind(1)
        if views is not None:
            vs = [v for v in views if v.index in rows]
            dev = vs[0].weight.device
            u_scale, eps_terms = _bias_scales([v.step for v in vs], [(v.hyper.beta1, v.hyper.beta2) for v in vs],
                                              [v.hyper.eps for v in vs], dev)
            dots = step_dots([v.weight for v in vs], [v.exp_avg for v in vs], [v.second_moment for v in vs],
                             eps_terms).to(self.device)
            after = dots[:, 0]
            lr = _to_device([float(v.hyper.lr) for v in vs], self.device)
            align_post = -2.0 * lr * u_scale.to(self.device) * dots[:, 1]
        else:
            after = squared_norms([w for i, w in zip(indices, weights_after) if i in rows]).to(self.device)
        delta = after - before
        rounding = delta - (align + inject + decay + rest)
        terms = torch.stack((align, inject, decay, rest, delta, rounding, decay_nominal, align_post), dim=1)
        idx = _index(self._indices, have, self.device)
        self._add(idx, terms, step_id)
        self.norm2[idx] = after
        return missing

    # ------------------------------------------------------------------ budgets computed elsewhere
    def record_budget(self, indices: Sequence[int], terms: torch.Tensor, norm2_after: torch.Tensor,
                      var: torch.Tensor | None = None, step_id: int | None = None) -> None:
        """Add one optimizer step's budget computed outside (the observed update, core/observed.py):
        ``terms`` [k, len(BUDGET_TERMS)], the observed ``norm2_after`` [k] and, for a sampled
        budget, the variances [k, 2] of A and I."""
        self.steps += 1
        if not len(indices):
            return
        idx = _index(self._indices, indices, self.device)
        self._add(idx, terms.to(self.device), step_id)
        if var is not None:
            var = var.to(self.device)
            self.var.index_add_(0, idx, torch.where(torch.isfinite(var), var, torch.zeros_like(var)))
        self.norm2[idx] = norm2_after.to(self.device)

    def stage_dots(self, indices: Sequence[int], dots: torch.Tensor, lrs: Sequence[float],
                   weight_decays: Sequence[float], factors: Sequence[float]) -> None:
        """Before the step: stage the budget of an update whose (||w_t||², <w_t, u_t>, ||u_t||²)
        were computed elsewhere (bitsandbytes Adam, Lion: integrations/optimizers.py); added by
        :meth:`record_staged` after the step, like :meth:`stage_intended`."""
        self._staged = None
        if not len(indices):
            return
        dots = dots.to(self.device)
        terms = budget_from_intended(dots, _to_device(list(lrs), self.device),
                                     _to_device(list(weight_decays), self.device), _to_device(list(factors), self.device))
        self._staged = ({int(i): k for k, i in enumerate(indices)}, terms, dots[:, 0])

    def record_staged(self, indices: Sequence[int], weights_after: Sequence[torch.Tensor], step_id: int | None = None) -> None:
        """After the step: one optimizer step whose budget was staged (:meth:`stage_dots`)."""
        self.steps += 1
        self.record_intended(indices, weights_after, step_id)

    def record_views(self, views: Sequence, step_id: int | None = None, pick=None) -> None:
        """:meth:`record_step` from view objects (``index``, ``weight``, ``exp_avg``,
        ``second_moment``, ``step`` and ``hyper`` with lr, weight_decay, beta1, beta2, eps), one
        call per device; ``pick(view, tensor)`` may select elements of each tensor first.  Tensors
        whose intended update was staged before the step (:meth:`stage_intended`) are recorded
        from that instead."""
        if self._staged is not None and pick is None:
            missing = set(self.record_intended([v.index for v in views], [v.weight for v in views], step_id, views))
            views = [v for v in views if v.index in missing]
        pick = pick or (lambda view, t: t)
        by_device: dict[torch.device, list] = {}
        for v in views:
            by_device.setdefault(v.weight.device, []).append(v)
        if not by_device:
            self.record_step([], [], [], [], [], [], [], [], [], step_id)
            return
        for group in by_device.values():
            self.record_step(
                [v.index for v in group],
                [pick(v, v.weight) for v in group],
                [pick(v, v.exp_avg) for v in group],
                [pick(v, v.second_moment) for v in group],
                [v.step for v in group],
                [v.hyper.lr for v in group],
                [v.hyper.weight_decay for v in group],
                [(v.hyper.beta1, v.hyper.beta2) for v in group],
                [v.hyper.eps for v in group],
                step_id,
                [decay_factor(v.hyper.lr, v.hyper.weight_decay, v.weight.dtype) for v in group],
            )
        self.steps -= len(by_device) - 1  # one optimizer step, however many devices

    # ------------------------------------------------------------------ reporting
    def pack(self) -> torch.Tensor:
        """One flat float64 tensor: sums [P*len(BUDGET_TERMS)], non-finite counts [P], squared norms [P],
        sampled integral [P]."""
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
        sums, nonfinite, norm2 = packed.sums, packed.nonfinite, packed.norm2
        numel = np.array([i.numel for i in self.infos], dtype=np.float64)
        metrics: dict[str, float] = {f"{prefix}/steps": float(steps)}
        if self.budget_mode is not None:
            metrics[f"{prefix}/budget_mode"] = float(BUDGET_MODES[self.budget_mode])
        sampled = self.budget_mode == "observed_sampled"
        for name, mask in self.aggregates(per_layer, per_matrix).items():
            # steps, not tensor-steps: the most any one tensor of the aggregate had (exact when the
            # non-finite steps hit its tensors together, as an overflow does; never more than the steps)
            worst = float(nonfinite[mask].max()) if mask.any() else 0.0
            row = summarize_sums(sums[mask].sum(0), worst, float(norm2[mask].sum()), float(numel[mask].sum()), steps)
            if sampled and steps > 0:  # standard errors of the logged per-step means (independent draws per step)
                var = packed.var[mask].sum(0)
                row["align_se"], row["inject_se"] = (math.sqrt(max(float(v), 0.0)) / steps for v in var)
            metrics.update({f"{prefix}/{name}/{k}": v for k, v in row.items()})
        return metrics


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
