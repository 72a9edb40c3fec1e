"""Parameters the optimizer does not train: reported as ``weightforces/frozen/...``, never dropped.

A frozen parameter (``requires_grad=False``, or in no parameter group of the optimizer) has no
force budget, but it is part of the model's weights: a fine-tune that freezes layer 0, or a LoRA
run over a frozen base model, reports

    weightforces/frozen/norm2    Σ ||w||² over the frozen floating-point tensors (float64 sums)
    weightforces/frozen/numel    their element count
    weightforces/frozen/rms      sqrt(norm2 / numel)
    weightforces/frozen/tensors  how many tensors that is

observed at each log event on the main process (whole tensors: single process and DDP, where
every rank holds the same copy).  Tensors that are not floating point (bitsandbytes 4/8-bit
storage) have no meaningful norm: a warning at train start names them.  Under FSDP and DeepSpeed
ZeRO the frozen tensors are sharded or flattened by the backend and not read: a warning at train
start says so.  A failure here warns once and drops the frozen keys alone.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence

import torch

from ..core.budget import squared_norms
from ..core.groups import FROZEN, canonical_name

__all__ = ["FrozenTensors", "find_frozen"]

logger = logging.getLogger(__name__)


def _warn(msg: str) -> None:
    logger.warning(msg)
    warnings.warn(msg, RuntimeWarning, stacklevel=3)


class FrozenTensors:
    """The frozen floating-point tensors of a model and their squared norms at a log event."""

    def __init__(self, named: Sequence[tuple[str, torch.Tensor]]) -> None:
        self.names = [n for n, _ in named]
        self.tensors = [t for _, t in named]
        self.numel = sum(t.numel() for t in self.tensors)
        self._on = bool(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def norm2(self) -> float:
        """Σ ||w||² with float64 sums, one host transfer per device."""
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for t in self.tensors:
            by_device.setdefault(t.device, []).append(t.detach())
        return math.fsum(float(squared_norms(ts).sum()) for ts in by_device.values())

    def metrics(self, prefix: str = "weightforces") -> dict[str, float]:
        """The frozen row; empty when there is nothing frozen or reading failed before."""
        if not self._on:
            return {}
        try:
            norm2 = self.norm2()
        except Exception as exc:  # a diagnostic never stops training: warn once, drop these keys
            self._on = False
            _warn(f"weight forces: frozen parameters no longer reported after {type(exc).__name__}: {exc}")
            return {}
        key = f"{prefix}/{FROZEN}"
        return {f"{key}/norm2": norm2, f"{key}/numel": float(self.numel),
                f"{key}/rms": math.sqrt(norm2 / self.numel) if self.numel else math.nan,
                f"{key}/tensors": float(len(self.tensors))}


def find_frozen(model: torch.nn.Module | None, optimizer, sharded: str | None = None) -> FrozenTensors:
    """The parameters of ``model`` that no parameter group of ``optimizer`` holds.

    ``sharded``: the backend's name when it shards or flattens parameters (FSDP, ZeRO); then
    nothing is read and, if the model has frozen parameters, a warning says they are not reported.
    """
    if model is None:
        return FrozenTensors([])
    trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
    if sharded is not None:
        n = sum(1 for p in model.parameters() if not p.requires_grad)
        if n:
            _warn(f"weight forces: {n} frozen parameter tensors are not reported under {sharded} "
                  "(weightforces/frozen/* needs whole tensors: single process or DDP)")
        return FrozenTensors([])
    frozen, unread = [], []
    for name, p in model.named_parameters():
        if id(p) in trained:
            continue
        (frozen if p.is_floating_point() else unread).append((canonical_name(name), p))
    if unread:
        _warn(f"weight forces: {len(unread)} frozen tensors are not floating point (quantized storage, e.g. "
              f"{unread[0][0]}) and are left out of weightforces/frozen/*")
    return FrozenTensors(frozen)
