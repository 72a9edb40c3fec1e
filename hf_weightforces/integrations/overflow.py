"""Whether an optimizer step was skipped by a GradScaler overflow (fp16 mixed precision).

Accelerate's ``AcceleratedOptimizer.step_was_skipped`` is true when ``GradScaler.step`` did not call
the optimizer.  Optimizers that take the scaler's inf check themselves (``fused=True`` and
``capturable`` AdamW, the Trainer's default ``adamw_torch_fused``: ``_step_supports_amp_scaling``)
are always called; the kernel then leaves weights, moments and the step count untouched when
``found_inf`` is set, and Accelerate reports the step as taken.  :class:`OverflowWatch` reads
``found_inf`` from a step post-hook on the torch optimizer (GradScaler sets it as an attribute for
exactly the duration of that call), so such a step is counted as skipped too.

Where it cannot be seen: a scaler that hands itself to the optimizer (``step(grad_scaler=...)``
signature, no ``found_inf`` attribute), and DeepSpeed's own fp16 loss scaler (the Trainer does not
use GradScaler there); those steps count as taken unless ``step_was_skipped`` says otherwise.
On a host ``found_inf`` is read at once.  On an accelerator (``defer``, set by the callback where the
planned pass reads the step: its tensors are masked on the device by their step counters, which the
fused kernel puts back on an overflow) nothing is read during the step: :meth:`OverflowWatch.skipped`
answers from Accelerate's flag alone and keeps the device flag, and :meth:`OverflowWatch.drain`
reads the interval's overflow counts at the log event, in the transfer that event makes anyway.
"""

from __future__ import annotations

import torch

__all__ = ["OverflowWatch"]


class OverflowWatch:
    """``skipped(optimizer)``: Accelerate's flag, or the GradScaler's ``found_inf`` seen inside the step."""

    def __init__(self, optimizer) -> None:
        inner = getattr(optimizer, "optimizer", optimizer)  # AcceleratedOptimizer wraps the torch one
        self._found: torch.Tensor | None = None
        self._handle = None
        #: leave device flags on the device (see the module docstring); set by the callback
        self.defer = False
        #: devices whose flag is read at once even when deferring (a host read costs no sync)
        self.read_now: tuple[str, ...] = ("cpu",)
        self.last: bool | torch.Tensor = False  # the last step's verdict: a bool, or a deferred device flag
        self._pending: torch.Tensor | None = None  # [overflow steps, of which budget steps], on the device
        if isinstance(inner, torch.optim.Optimizer) and getattr(inner, "_step_supports_amp_scaling", False):
            self._handle = inner.register_step_post_hook(self._after_step)

    def _after_step(self, opt, args, kwargs) -> None:
        found = getattr(opt, "found_inf", None)
        self._found = found if isinstance(found, torch.Tensor) else None

    def skipped(self, optimizer, budget_step: bool = False) -> bool:
        """Whether the step just taken was skipped, as far as the host knows now (a deferred
        device flag counts at :meth:`drain`; ``budget_step``: whether the step's budget is read)."""
        found, self._found = self._found, None
        self.last = False
        if bool(getattr(optimizer, "step_was_skipped", False)):
            self.last = True
            return True
        if found is None:
            return False
        if not self.defer or found.device.type in self.read_now:
            self.last = bool(found.sum().item() > 0)
            return self.last
        flag = (found.sum() > 0).to(torch.float64)
        self.last = flag
        step = torch.stack((flag, flag if budget_step else torch.zeros_like(flag)))
        self._pending = step if self._pending is None else self._pending + step
        return False

    def drain(self) -> tuple[int, int]:
        """(overflow steps, of which budget steps) deferred since the last call: one transfer."""
        pending, self._pending = self._pending, None
        if pending is None:
            return 0, 0
        skipped, budget = pending.tolist()
        return int(skipped), int(budget)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
