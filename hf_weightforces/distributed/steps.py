"""Which tensors an optimizer step updated, and the step planned once (docs/budget.md section 9):
the step pre-hook on the torch optimizer, and the monitored tensors of a replicated optimizer listed
once for :class:`~hf_weightforces.core.plan.StepPlan`."""

from __future__ import annotations

from array import array
from typing import NamedTuple

import torch

from ..core.monitor import ForceMonitor
from ..core.optim import AdamHyper, group_hyper
from ..core.plan import StepPlan
from ..core.rows import Pending, Rows
from .common import _is_host


class _StepRecorder:
    """A step pre-hook on the torch optimizer: what each ``optimizer.step()`` call started from.

    It records, per parameter group (keyed by the group dict: DeepSpeed's ZeRO-1/2 step one group
    at a time with ``param_groups`` cut down to it), the lr the call used, and per tensor stepped,
    its ``state["step"]`` before the call.  A tensor was updated by the last step iff its counter
    moved past that.  This catches skips that no flag reports: a fused AdamW under a GradScaler
    skips inside its kernel and puts the counter back, while Accelerate's ``step_was_skipped``
    stays False.  A step skipped without calling the optimizer (GradScaler with a plain AdamW,
    DeepSpeed's overflow) is reported by ``step_was_skipped`` and never read.  Counters that live
    on an accelerator (fused or capturable AdamW on a GPU) are not compared (a host sync per step);
    those tensors count as updated.  Reading a step twice gives the same answer.
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.lrs: dict[int, object] = {}
        self.before: dict[int, float] = {}
        #: the planned fast path (:class:`_PlannedTensors`), whose counters the pre-hook stacks
        self.planned: _PlannedTensors | None = None
        self.planned_before: torch.Tensor | None = None
        self.before_of: _PlannedTensors | None = None
        self._handle = optimizer.register_step_pre_hook(self._record)

    def _record(self, optimizer, args, kwargs) -> None:
        for group in optimizer.param_groups:
            if group["params"]:  # ZeRO-3 steps one sub-group at a time; the others are empty meanwhile
                lr = group["lr"]
                self.lrs[id(group)] = lr.detach().clone() if isinstance(lr, torch.Tensor) else lr
        planned = self.planned
        if planned is not None and planned.fresh(optimizer):
            # the planned tensors' counters in one stacked copy (the one taken after the last step
            # when no step ran since: only a step moves them); the per-tensor dict only if asked
            before, planned.last_after = planned.last_after, None  # a step runs now
            self.planned_before, self.before_of = (before if before is not None else planned.snapshot()), planned
            return
        self.planned_before, self.before_of = None, None
        for group in optimizer.param_groups:
            for p in group["params"]:
                state = optimizer.state.get(p)
                step = state.get("step") if state else None
                if step is None:
                    self.before.pop(id(p), None)  # no state (yet, or reset): its first step counts
                    continue
                if not _is_host(step):
                    break  # device counters (fused/capturable on a GPU): one group, one kind
                self.before[id(p)] = float(step)

    def advanced(self, t: torch.Tensor, state: dict) -> bool:
        step = state.get("step")
        if step is None or not _is_host(step):
            return True
        if self.before_of is not None:  # the pre-hook took the planned snapshot: unpack it once
            planned, self.before_of = self.before_of, None
            if self.planned_before is not None and _is_host(self.planned_before):
                self.before.update(zip(planned.keys, self.planned_before.tolist()))
        return float(step) > self.before.get(id(t), 0.0)

    def lr(self, group: dict) -> float | torch.Tensor:
        return self.lrs.get(id(group), group["lr"])

    def hyper(self, group: dict) -> AdamHyper:
        """The group's hyper-parameters with the lr its last step used (under DeepSpeed a
        scheduler may have moved ``group["lr"]`` on before ``on_optimizer_step`` runs)."""
        hyper = group_hyper(group)
        if id(group) in self.lrs:
            lr = self.lrs[id(group)]
            lr = float(lr.item()) if isinstance(lr, torch.Tensor) else float(lr)
            hyper = AdamHyper(lr, hyper.weight_decay, hyper.beta1, hyper.beta2, hyper.eps, hyper.amsgrad)
        return hyper

    def close(self) -> None:
        self._handle.remove()


class PlannedStep(NamedTuple):
    """One step's inputs to :meth:`StepPlan.run` (:meth:`ShardContext.planned_step`)."""

    plan: StepPlan
    weights: list[torch.Tensor]
    exp_avgs: list[torch.Tensor]
    second_moments: list[torch.Tensor]
    t_after: torch.Tensor
    t_before: torch.Tensor
    hyper_now: torch.Tensor | array  # StepPlan.step_vector: the groups' hyper-parameters and decay factors

    def rows(self, monitor: ForceMonitor) -> Rows | Pending:
        """The step's budget rows, for ``monitor`` (whose squared norms observed before the step it reads)."""
        return self.plan.run(self.weights, self.exp_avgs, self.second_moments, self.t_after, self.t_before,
                             self.hyper_now, monitor.before(self.plan.index))


def _group_key(group: dict) -> tuple:
    """What a plan fixes about a group (its hyper-parameters come with each step)."""
    return (bool(group.get("amsgrad", False)),)


def _group_hypers(group: dict) -> tuple:
    beta1, beta2 = group["betas"]
    return (group.get("weight_decay", 0.0), beta1, beta2, group["eps"])


class _PlannedTensors:
    """A replicated optimizer's monitored tensors, listed once (the per-step fast path).

    Holds flat detached aliases of the weights, the moments and the step counters of every tensor with
    AdamW state in the monitored set, in the optimizer's order, and the :class:`StepPlan` over them.
    :meth:`valid` checks, per step, that nothing was replaced (the optimizer's state or a tensor's
    entry in it, a moment, a counter, a weight's storage, a group, AMSGrad switched); when anything
    was, the callback takes the per-tensor path for that step and plans again.  Hyper-parameters are
    not planned: they come with each step (:meth:`StepPlan.step_vector`)."""

    def __init__(self, optimizer: torch.optim.Optimizer, index_of: dict[int, int], counts, kernel: str) -> None:
        self.state = optimizer.state
        self.n_state = len(optimizer.state)
        self.group_keys = [(group["params"], len(group["params"]), _group_key(group)) for group in optimizer.param_groups]
        rows = []
        for g, group in enumerate(optimizer.param_groups):
            amsgrad = bool(group.get("amsgrad", False))
            for p in group["params"]:
                st = optimizer.state.get(p)
                if not st or "exp_avg" not in st:
                    continue
                idx = index_of.get(id(p))
                if idx is None or not counts(p):
                    continue
                step = st.get("step")
                if not isinstance(step, torch.Tensor):
                    raise _NotPlannable("a step counter is not a tensor")
                second = "max_exp_avg_sq" if amsgrad else "exp_avg_sq"
                m, v = st["exp_avg"], st[second]
                if not (p.is_contiguous() and m.is_contiguous() and v.is_contiguous()):
                    raise _NotPlannable("a tensor is not contiguous")
                rows.append((idx, g, p, p.detach().view(-1), st, m.view(-1), v.view(-1), step, m, v, second))
        if not rows:
            raise _NotPlannable("no tensor has AdamW state yet")
        devices = {t.device for r in rows for t in (r[3], r[5], r[6])}
        step_devices = {r[7].device for r in rows}
        if len(devices) != 1 or len(step_devices) != 1:
            raise _NotPlannable("the tensors live on several devices")
        self.device = devices.pop()
        self.keys = [id(r[2]) for r in rows]
        self.weights = [r[3] for r in rows]
        self.exp_avgs = [r[5] for r in rows]
        self.second_moments = [r[6] for r in rows]
        self.steps = [r[7] for r in rows]
        self._steps_1d = [t.view(1) for t in self.steps]  # views: read as they are at each snapshot
        self._check = [(r[2], r[2].data_ptr(), r[4], r[8], r[9], r[7], r[10]) for r in rows]
        #: the counters stacked after the last planned step, until the next step runs (its "before")
        self.last_after: torch.Tensor | None = None
        self.plan = StepPlan([r[0] for r in rows], [r[1] for r in rows], len(optimizer.param_groups),
                             [r[3].dtype == torch.float64 for r in rows], [r[3].numel() for r in rows], self.device,
                             kernel)

    def fresh(self, optimizer) -> bool:
        """Cheap: the optimizer still holds the same state (no tensor gained state, none reloaded)."""
        return optimizer.state is self.state and len(optimizer.state) == self.n_state

    def valid(self, optimizer) -> bool:
        """Every planned tensor, moment and counter still the one planned, in the same groups."""
        if not self.fresh(optimizer) or len(optimizer.param_groups) != len(self.group_keys):
            return False
        for group, (params, n, key) in zip(optimizer.param_groups, self.group_keys):
            if group["params"] is not params or len(params) != n or _group_key(group) != key:
                return False
        state = optimizer.state
        for p, ptr, st, m, v, step, second in self._check:
            if (state.get(p) is not st or st.get("exp_avg") is not m or st.get(second) is not v
                    or st.get("step") is not step or p.data_ptr() != ptr):
                return False
        return True

    def snapshot(self) -> torch.Tensor:
        """The planned tensors' step counters, stacked (a copy: read before the step; one ``cat`` of
        1-element views, the operation the pass uses too: right after a training step each kind of
        operation costs most the first time it runs)."""
        return torch.cat(self._steps_1d)


class _NotPlannable(Exception):
    """The step cannot take the planned path (the per-tensor path reads it instead)."""
