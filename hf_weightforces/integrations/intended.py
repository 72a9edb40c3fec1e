"""The intended update of low-precision parameters, staged before each budget step (docs/budget.md).

A parameter the optimizer updates in bfloat16 or float16 (a model loaded with
``torch_dtype=torch.bfloat16`` and trained with ``adamw_torch``: no float32 master) loses most of a
small update to rounding, and w_t cannot be rebuilt from the rounded w_{t+1}.  For those tensors a
step pre-hook on the torch optimizer computes, just before ``optimizer.step()`` changes anything
(so after gradient clipping and unscaling), the budget of the update AdamW intends, exactly
(float64, no copy of the weights); after the step the monitor adds it with the observed Δ and
``rounding`` = Δ - (A + I + D + R).  With ``rounding_split=True`` float32 parameters get the same
split.  Backends that keep float32 masters (DeepSpeed, FSDP mixed precision, autocast) never
reach this path.
"""

from __future__ import annotations

import logging
import warnings

import torch

from ..core.budget import decay_factor, intended_dots
from ..core.monitor import ForceMonitor
from ..core.rows import Staged
from ..distributed import ParamEntry, ShardContext

__all__ = ["LOW_PRECISION", "IntendedStager"]

logger = logging.getLogger(__name__)

LOW_PRECISION = (torch.bfloat16, torch.float16)


class IntendedStager:
    """A step pre-hook that stages the intended budget of some parameters at budget steps.

    ``due`` is set by the callback at the start of each budget step's accumulation cycle and
    consumed by the next ``optimizer.step()``.  A failure here warns once and stops staging: the
    monitor then rebuilds those tensors from the post-step state, as for float32 weights.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, monitor: ForceMonitor, entries: list[ParamEntry],
                 indices: list[int], ctx: ShardContext) -> None:
        self.monitor = monitor
        self.targets = {id(entries[i].param): i for i in indices if ctx.owns(entries[i])}
        self.due = False
        self.broken = False
        self.staged: Staged | None = None  # the budget staged before the step, until taken
        self._handle = optimizer.register_step_pre_hook(self._hook)

    def _hook(self, optimizer, args, kwargs) -> None:
        if not self.due or self.broken:
            return
        self.due = False
        self.staged = None
        try:
            self._stage(optimizer, kwargs)
        except Exception as exc:  # a diagnostic never stops training
            self.broken = True
            self.staged = None
            msg = (f"weight forces: the intended-update pass failed ({type(exc).__name__}: {exc}); low-precision "
                   "tensors are rebuilt from the rounded post-step weights from now on (approximate, no rounding term)")
            logger.warning(msg, exc_info=True)
            warnings.warn(msg, RuntimeWarning, stacklevel=2)

    def _stage(self, optimizer: torch.optim.Optimizer, kwargs: dict) -> None:
        cols: dict[str, list] = {k: [] for k in ("idx", "w", "g", "m", "v", "vmax", "t", "lr", "wd", "betas", "eps", "max")}
        for group in optimizer.param_groups:
            amsgrad, maximize = bool(group.get("amsgrad", False)), bool(group.get("maximize", False))
            lr = group["lr"]
            lr = float(lr.item()) if isinstance(lr, torch.Tensor) else float(lr)
            b1, b2 = (float(b) for b in group["betas"])
            for p in group["params"]:
                i = self.targets.get(id(p))
                if i is None or p.grad is None:
                    continue  # not staged here, or no update this step (the optimizer skips it too)
                state = optimizer.state.get(p) or {}
                step = state.get("step", 0.0)
                if isinstance(step, torch.Tensor) and step.device.type == "cpu":
                    step = float(step)  # a host counter: read it (no sync)
                elif not isinstance(step, torch.Tensor):
                    step = float(step)  # a device counter (fused/capturable) stays there: no host sync
                cols["idx"].append(i)
                cols["w"].append(p.detach())
                cols["g"].append(p.grad.detach())
                cols["m"].append(state.get("exp_avg"))
                cols["v"].append(state.get("exp_avg_sq"))
                cols["vmax"].append(state.get("max_exp_avg_sq") if amsgrad else None)
                cols["t"].append(step + 1.0)
                cols["lr"].append(lr)
                cols["wd"].append(float(group.get("weight_decay", 0.0)))
                cols["betas"].append((b1, b2))
                cols["eps"].append(float(group["eps"]))
                cols["max"].append(maximize)
        if not cols["idx"]:
            return  # nothing of ours updated this step: the step goes the post-step way (planned)
        dots = intended_dots(cols["w"], cols["g"], cols["m"], cols["v"], cols["vmax"], cols["t"], cols["betas"], cols["eps"],
                             cols["max"], grad_scale=kwargs.get("grad_scale") if kwargs else None)
        factors = [decay_factor(lr, wd, w.dtype) for lr, wd, w in zip(cols["lr"], cols["wd"], cols["w"])]
        self.staged = Staged(cols["idx"], dots, cols["lr"], cols["wd"], factors, self.monitor.device)

    def take(self) -> Staged | None:
        """What was staged for the step just taken (then forgotten), or None."""
        staged, self.staged = self.staged, None
        return staged

    def close(self) -> None:
        self._handle.remove()

