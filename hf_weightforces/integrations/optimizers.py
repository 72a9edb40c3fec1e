"""Budgets for optimizers other than torch AdamW (docs/optimizers.md).

* :class:`StagedMoments`: bitsandbytes Adam/AdamW (8-bit, 32-bit, paged) and Lion.  A step
  pre-hook on the torch optimizer reads, just before ``optimizer.step()``, the state the kernel is
  about to read (8-bit states dequantised by bitsandbytes' own ``dequantize_blockwise``), the
  final gradients and the weights, and computes the direction the kernel will apply, exactly:
  Adam u = (m_t/(1-β1^t)) / (sqrt(v_t/(1-β2^t)) + ε) with m_t, v_t advanced by g (as
  ``intended_dots``), Lion u = sign(β1 m + (1-β1) g) with bitsandbytes' CPU float32 arithmetic.
  (The stored 8-bit moments after the step are re-quantised, so they cannot rebuild the update:
  hence before the step.)  After the step the monitor adds it with the observed Δ; ``rounding``
  holds what the stored weights' rounding took (float32: tiny).
* :class:`ObservedUpdate`: everything else.  At the start of each budget step's accumulation
  cycle (``on_step_begin``, before any backward: correct also where the update happens inside
  backward, as with LOMO) it keeps w_t, whole (``exact``: one copy of the trained parameters in
  their dtype) or as R seeded signed bucket sums per tensor (``sampled``: a sketch, R the smallest
  prime ≥ the sample size; tensors no larger than the sample are copied whole), and after the
  step computes the budget of η u := c w_t - w_{t+1} (core/observed.py).

Failures are the callback's: every call here runs inside its guards (warn once, monitor off).
"""

from __future__ import annotations

import logging

import torch

from ..core.budget import intended_dots
from ..core.kernels import to_device
from ..core.monitor import ForceMonitor
from ..core.observed import budget_from_observed, observed_dots, signed_bucket_sums, sketch_buckets, sketched_budget
from ..core.optim import OptimizerPlan, adafactor_lr, observed_factor
from ..core.rows import Rows, Staged, index_tensor, moment_rows
from ..distributed import ParamEntry, ShardContext

__all__ = ["OBSERVED_MODES", "ObservedUpdate", "StagedMoments"]

logger = logging.getLogger(__name__)

OBSERVED_MODES = ("sampled", "exact")

_BNB_BLOCKSIZE = 256  # bitsandbytes' blockwise optimizer states (its CPU and CUDA kernels alike)


def _f(x) -> float:
    return float(x.item()) if isinstance(x, torch.Tensor) else float(x)


def _dequantised(state: dict, which: int) -> torch.Tensor | None:
    """State ``which`` (1 or 2) of a bitsandbytes optimizer as float32, or None (first step)."""
    t = state.get(f"state{which}")
    if t is None:
        return None
    if t.dtype != torch.uint8:
        return t
    from bitsandbytes.functional import dequantize_blockwise

    return dequantize_blockwise(t, absmax=state[f"absmax{which}"], code=state[f"qmap{which}"], blocksize=_BNB_BLOCKSIZE)


def _lion_dots(w: torch.Tensor, g: torch.Tensor, m: torch.Tensor | None, beta1: float, eightbit: bool) -> torch.Tensor:
    """(||w||², <w, u>, ||u||²) in float64 for u = sign(β1 m + (1-β1) g), computed in float32 in
    the order of bitsandbytes' CPU kernel (32-bit: m·β1 + (1-β1)·g fused by ``add``; 8-bit: two
    products then a sum), so every sign is the kernel's."""
    g = g.float()
    if m is None:
        m = torch.zeros_like(g)
    mix = (m.mul(beta1) + g.mul(1.0 - beta1)) if eightbit else m.mul(beta1).add(g, alpha=1.0 - beta1)
    u = torch.sign(mix).to(torch.float64).reshape(-1)
    x = w.detach().to(torch.float64).reshape(-1)
    return torch.stack((torch.dot(x, x), torch.dot(x, u), torch.dot(u, u)))


class StagedMoments:
    """A step pre-hook staging the budget of bitsandbytes Adam/AdamW or Lion at budget steps.

    :meth:`before_step` (the callback, at the start of each budget step) arms the hook for the next
    ``optimizer.step()``; :meth:`record` adds the staged budget after the step.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, plan: OptimizerPlan, monitor: ForceMonitor,
                 entries: list[ParamEntry], ctx: ShardContext) -> None:
        self.plan, self.monitor = plan, monitor
        self.targets = {id(e.param): i for i, e in enumerate(entries) if ctx.owns(e)}
        self.due = False
        self._staged: list[tuple[int, torch.Tensor]] = []
        self._budget: Staged | None = None
        self._handle = optimizer.register_step_pre_hook(self._hook)

    def _hook(self, optimizer, args, kwargs) -> None:
        if not self.due:
            return
        self.due = False
        self._staged, self._budget = [], None
        idx, rows, lrs, wds, factors = [], [], [], [], []
        for gi, group in enumerate(optimizer.param_groups):
            for pi, p in enumerate(group["params"]):
                i = self.targets.get(id(p))
                if i is None or p.grad is None:
                    continue  # not ours, or no update this step (bitsandbytes skips it too)
                cfg = optimizer.get_config(gi, pi, group)  # the library's own per-tensor settings
                state = optimizer.state.get(p) or {}
                lr, wd = _f(cfg["lr"]), _f(cfg["weight_decay"])
                b1, b2 = (float(b) for b in cfg["betas"][:2])
                m = _dequantised(state, 1)
                if self.plan.path == "lion":
                    eightbit = state.get("state1") is not None and state["state1"].dtype == torch.uint8
                    if not state:  # first step: the kernel will be 8-bit where init_state makes it so
                        eightbit = int(cfg.get("optim_bits", 32)) == 8 and p.numel() >= int(cfg.get("min_8bit_size", 4096))
                    dots = _lion_dots(p, p.grad, m, b1, eightbit)
                else:
                    v = _dequantised(state, 2)
                    t = float(state.get("step", 0)) + 1.0
                    dots = intended_dots([p.detach()], [p.grad.detach().float()], [m], [v], [None], [t],
                                         [(b1, b2)], [float(cfg["eps"])], [False])[0]
                idx.append(i)
                rows.append(dots)
                lrs.append(lr)
                wds.append(wd)
                factors.append(observed_factor("mul", lr, wd, p.dtype))  # bitsandbytes: p *= 1 - lr*wd when wd > 0
                self._staged.append((i, p))
        dots = torch.stack(rows) if rows else torch.zeros(0, 3, dtype=torch.float64)
        self._budget = Staged(idx, dots, lrs, wds, factors, self.monitor.device)

    def before_step(self) -> None:
        self.due = True

    def record(self, optimizer, step_id: int) -> None:
        """After the step: add what was staged (those tensors were all updated)."""
        staged, budget, self._staged, self._budget = self._staged, self._budget, [], None
        rows = budget.rows([i for i, _ in staged], [p.detach() for _, p in staged])[0] if budget else None
        self.monitor.add([rows] if rows else [], step_id)

    def close(self) -> None:
        self._handle.remove()


class ObservedUpdate:
    """Keeps w_t at each budget step and turns the observed step into a budget."""

    def __init__(self, plan: OptimizerPlan, monitor: ForceMonitor, entries: list[ParamEntry], ctx: ShardContext,
                 mode: str = "sampled", sample_size: int = 1024, seed: int = 0) -> None:
        if mode not in OBSERVED_MODES:
            raise ValueError(f"observed_mode must be one of {OBSERVED_MODES}, got {mode!r}")
        if mode == "exact" and ctx.backend.sharded:
            raise ValueError(f"observed_mode='exact' needs a single process or DDP, not {ctx.backend.value}; "
                             "use observed_mode='sampled'")
        self.plan, self.monitor, self.entries, self.ctx = plan, monitor, entries, ctx
        self.mode, self.size = mode, int(sample_size)
        self.buckets = sketch_buckets(self.size)
        self.generator = torch.Generator().manual_seed(int(seed) * 1000003 + ctx.rank)
        self._pre: dict[int, tuple[torch.Tensor | None, torch.Tensor]] | None = None

    def before_step(self) -> None:
        """w_t of every local tensor: a copy (exact, or tensors no larger than the sample) or its
        signed bucket sums under freshly drawn signs (the seed is kept for the sums after the step)."""
        pre: dict[int, tuple[int | None, torch.Tensor]] = {}
        for i, w in enumerate(self.ctx.local_weights(self.entries)):
            n = w.numel()
            if n == 0:
                continue
            flat = w.detach().reshape(-1)
            if self.mode == "exact" or n <= self.size:
                pre[i] = (None, flat.clone())
            else:
                seed = int(torch.randint(0, 2**62, (1,), generator=self.generator))
                pre[i] = (seed, signed_bucket_sums(flat, self.buckets, seed))
        self._pre = pre

    def _hyper(self, optimizer, i: int, lrs: dict[int, float], numel: int) -> tuple[float, float, float]:
        """(lr, weight decay, c) of tensor ``i`` at the step just taken."""
        p = self.entries[i].param
        gi, group = self._groups[id(p)]
        lr = _f(lrs[gi])
        if group.get("relative_step") or group.get("scale_parameter"):
            state = optimizer.state.get(p) or {}
            rms = _f(state["RMS"]) if "RMS" in state else (float(self.monitor.norm2[i]) / max(1, numel)) ** 0.5
            lr = adafactor_lr(group, _f(state.get("step", 1)), rms)  # Adafactor's own per-tensor lr
        wd = _f(group.get("weight_decay", 0.0) or 0.0)
        return lr, wd, observed_factor(self.plan.decay, lr, wd, p.dtype)

    def record(self, optimizer, step_id: int) -> None:
        """After the step: the budget of every tensor that changed hands through the optimizer."""
        pre, self._pre = self._pre, None
        if pre is None:
            raise RuntimeError("no weights kept before the step (on_step_begin did not run)")
        self._groups = {id(p): (gi, g) for gi, g in enumerate(optimizer.param_groups) for p in g["params"]}
        lrs = dict(enumerate(self.ctx.step_lrs(optimizer)))
        grads = [self.entries[i].param.grad is not None for i in pre]
        stepped = [i for i, g in zip(pre, grads) if g] if any(grads) else list(pre)  # LOMO consumes the grads
        weights = self.ctx.local_weights(self.entries)
        norm2 = self.monitor.norm2
        whole = [i for i in stepped if pre[i][0] is None]
        parts = [i for i in stepped if pre[i][0] is not None]
        dev = self.monitor.device
        rows = []
        if whole:
            hyper = [self._hyper(optimizer, i, lrs, weights[i].numel()) for i in whole]
            dots = observed_dots([pre[i][1] for i in whole], [weights[i] for i in whole], [h[2] for h in hyper]).to(dev)
            lr, wd, c = (to_device(torch.tensor([h[k] for h in hyper], dtype=torch.float64), dev) for k in range(3))
            idx = index_tensor(whole, dev)
            terms = budget_from_observed(dots, lr, wd, c, norm2[idx])
            rows.append(Rows(idx, terms, dots[:, 3]))
        if parts:
            after = [weights[i].detach().reshape(-1) for i in parts]
            sums = torch.stack([signed_bucket_sums(a, self.buckets, pre[i][0], with_norm=True).to(dev)
                                for a, i in zip(after, parts)])
            post, n2_after = sums[:, :-1], sums[:, -1]
            hyper = [self._hyper(optimizer, i, lrs, after[k].numel()) for k, i in enumerate(parts)]
            lr, wd, c = (to_device(torch.tensor([h[k] for h in hyper], dtype=torch.float64), dev) for k in range(3))
            prev = torch.stack([pre[i][1] for i in parts]).to(dev)
            idx = index_tensor(parts, dev)
            terms, var = sketched_budget(prev, post, c, lr, wd, norm2[idx], n2_after)
            rows.append(Rows(idx, terms, n2_after, var))
        self.monitor.add(rows, step_id)

    def close(self) -> None:
        self._pre = None


class AdamWMoments:
    """AdamW's own moments, read after the step: the planned pass (``ShardContext.planned_step``,
    one call for every tensor, ``kernel``: :data:`~hf_weightforces.core.kernels.KERNELS`) where the
    step has one, else the per-tensor views; tensors staged before the step (low precision:
    ``stager``, integrations/intended.py) are recorded from what was staged.  ``super_weights``: the
    tracker that also takes the step's whole tensors (or None)."""

    def __init__(self, monitor: ForceMonitor, ctx: ShardContext, index_of: dict[int, int], kernel: str = "exact") -> None:
        self.monitor, self.ctx, self.index_of, self.kernel = monitor, ctx, index_of, kernel
        self.super_weights = None
        self.stager = None

    def before_step(self) -> None:
        pass  # nothing to keep: w_t is rebuilt from w_{t+1} and the moments

    def record(self, optimizer, step_id: int) -> None:
        staged = self.stager.take() if self.stager is not None else None
        if self.super_weights is None and staged is None:
            planned = self.ctx.planned_step(optimizer, self.index_of, self.kernel)
            if planned is not None and planned.plan.device == self.monitor.device:  # planned at an earlier step
                self.monitor.add([planned.rows(self.monitor)], step_id)
                return
        views = self.ctx.views(optimizer, self.index_of)
        rows = []
        if staged is not None:
            row, missing = staged.rows([v.index for v in views], [v.weight for v in views], views)
            missing = set(missing)
            rows, views = [row] if row else [], [v for v in views if v.index in missing]
        self.monitor.add(rows + moment_rows(views, self.monitor.norm2), step_id)
        if self.super_weights is not None:
            whole = self.ctx.views(optimizer, self.index_of, whole=True) if self.ctx.divides else views
            self.super_weights.record(whole, step_id)

    def close(self) -> None:
        pass


class NoBudget:
    """No budget (nothing to read here, or a rank that does not compute): each budget step is counted;
    norms, fits and probes go on."""

    def __init__(self, monitor: ForceMonitor) -> None:
        self.monitor = monitor

    def before_step(self) -> None:
        pass

    def record(self, optimizer, step_id: int) -> None:
        self.monitor.add([], step_id)

    def close(self) -> None:
        pass


def budget_reader(plan: OptimizerPlan, optimizer: torch.optim.Optimizer, monitor: ForceMonitor,
                  entries: list[ParamEntry], ctx: ShardContext, mode: str, sample_size: int, seed: int,
                  index_of: dict[int, int], kernel: str = "exact"):
    """The budget source for ``plan``, chosen once at train start: (one of :class:`AdamWMoments`,
    :class:`StagedMoments`, :class:`ObservedUpdate`, :class:`NoBudget`; the budget mode name of
    :data:`~hf_weightforces.core.monitor.BUDGET_MODES`).  Every source has the same three methods:
    ``before_step()`` at the start of a budget step, ``record(optimizer, step_id)`` after it,
    ``close()`` at train end; the callback calls them the same way whatever the optimizer."""
    if plan.path == "moments":
        return AdamWMoments(monitor, ctx, index_of, kernel), "moments"
    if plan.path in ("bnb_adam", "lion") and not ctx.backend.sharded:
        logger.info("weight forces: %s: %s", plan.name, plan.note)
        return (StagedMoments(optimizer, plan, monitor, entries, ctx) if ctx.computes else NoBudget(monitor)), "staged"
    if ctx.backend.deepspeed:
        import warnings

        msg = (f"weight forces: {plan.name} under DeepSpeed {ctx.backend.value}: its update cannot be read here, so no "
               "force budget is logged; norms, RMS, Weibull fits and probes go on")
        logger.warning(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
        return NoBudget(monitor), "none"
    reader = ObservedUpdate(plan, monitor, entries, ctx, mode, sample_size, seed)
    logger.info("weight forces: %s: the budget of the observed update (%s%s; decay rule %s)", plan.name, mode,
                f", {sample_size} coordinates per tensor" if mode == "sampled" else ", one copy of the weights", plan.decay)
    return (reader if ctx.computes else NoBudget(monitor)), f"observed_{mode}"


def budget_info(plan: OptimizerPlan, mode: str, sample_size: int, seed: int) -> dict:
    """The ``budget`` block of params.json: which computation produced the rows."""
    from ..core.monitor import BUDGET_MODES

    info = {"mode": mode, "code": BUDGET_MODES[mode], "optimizer": plan.name, "path": plan.path,
            "decay_rule": plan.decay, "note": plan.note}
    if mode == "observed_sampled":
        info.update(sample_size=int(sample_size), seed=int(seed))
    return info
