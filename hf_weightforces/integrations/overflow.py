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
Reading ``found_inf`` costs one host sync per step, only for optimizers that set it.
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
        if isinstance(inner, torch.optim.Optimizer) and getattr(inner, "_step_supports_amp_scaling", False):
            self._handle = inner.register_step_post_hook(self._after_step)

    def _after_step(self, opt, args, kwargs) -> None:
        found = getattr(opt, "found_inf", None)
        self._found = found if isinstance(found, torch.Tensor) else None

    def skipped(self, optimizer) -> bool:
        found, self._found = self._found, None
        if bool(getattr(optimizer, "step_was_skipped", False)):
            return True
        return found is not None and bool(found.sum().item() > 0)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
