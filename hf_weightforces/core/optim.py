"""Reading AdamW's own moments and hyper-parameters (SPEC section 1), pure torch.

Supported: ``torch.optim.AdamW`` in every implementation (for-loop, ``foreach``, ``fused``,
``capturable``, ``amsgrad``, ``maximize``) and ``torch.optim.Adam`` when its weight decay is
decoupled or zero, which covers the Trainer's ``adamw_torch`` and ``adamw_torch_fused``.
Wrappers that keep the torch optimizer in ``.optimizer`` (Accelerate's ``AcceleratedOptimizer``)
are unwrapped.  Anything else is refused with :class:`UnsupportedOptimizerError` at train start.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "SUPPORTED_OPTIMIZERS",
    "AdamHyper",
    "UnsupportedOptimizerError",
    "check_supported",
    "group_hyper",
    "unwrap_optimizer",
]

SUPPORTED_OPTIMIZERS = (
    "torch.optim.AdamW (for-loop, foreach or fused; Trainer optim='adamw_torch' or "
    "'adamw_torch_fused'), or torch.optim.Adam with decoupled_weight_decay=True or weight_decay=0"
)


class UnsupportedOptimizerError(ValueError):
    """The optimizer's moments cannot be read as AdamW's."""


@dataclass(frozen=True)
class AdamHyper:
    """One parameter group's hyper-parameters at the step just taken."""

    lr: float
    weight_decay: float
    beta1: float
    beta2: float
    eps: float
    amsgrad: bool


def unwrap_optimizer(optimizer: object) -> torch.optim.Optimizer:
    """The torch optimizer inside Accelerate/DeepSpeed-style wrappers."""
    # AcceleratedOptimizer is itself a torch Optimizer subclass holding the real one in .optimizer
    for _ in range(4):
        inner = getattr(optimizer, "optimizer", None)
        if inner is None or inner is optimizer:
            break
        optimizer = inner
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise UnsupportedOptimizerError(
            f"weight forces need the optimizer's AdamW moments, got {type(optimizer).__name__}; "
            f"supported: {SUPPORTED_OPTIMIZERS}"
        )
    return optimizer


def check_supported(optimizer: object) -> torch.optim.Optimizer:
    """Unwrap and validate; raise :class:`UnsupportedOptimizerError` with what is supported."""
    opt = unwrap_optimizer(optimizer)
    name = f"{type(opt).__module__}.{type(opt).__name__}"
    if not isinstance(opt, torch.optim.Adam):
        raise UnsupportedOptimizerError(
            f"weight forces cannot read the moments of {name}; supported: {SUPPORTED_OPTIMIZERS}"
        )
    for i, group in enumerate(opt.param_groups):
        decoupled = bool(group.get("decoupled_weight_decay", isinstance(opt, torch.optim.AdamW)))
        if not decoupled and float(group.get("weight_decay", 0.0)) != 0.0:
            raise UnsupportedOptimizerError(
                f"{name} param group {i} uses L2 (coupled) weight decay {group['weight_decay']}, "
                "which hides the decay inside the moments; use torch.optim.AdamW or "
                f"decoupled_weight_decay=True. Supported: {SUPPORTED_OPTIMIZERS}"
            )
        if group.get("differentiable", False):
            raise UnsupportedOptimizerError(f"{name} param group {i}: differentiable=True is not supported")
    return opt


def _scalar(x: object) -> float:
    return float(x.item()) if isinstance(x, torch.Tensor) else float(x)  # type: ignore[arg-type]


def group_hyper(group: dict) -> AdamHyper:
    """Hyper-parameters of one param group as plain floats (lr may be a tensor)."""
    beta1, beta2 = group["betas"]
    return AdamHyper(
        lr=_scalar(group["lr"]),
        weight_decay=_scalar(group.get("weight_decay", 0.0)),
        beta1=_scalar(beta1),
        beta2=_scalar(beta2),
        eps=_scalar(group["eps"]),
        amsgrad=bool(group.get("amsgrad", False)),
    )
