"""What every part of the distributed layer shares: the backends, the errors, the records of a
parameter (docs/distributed.md)."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..core.optim import AdamHyper

_EMPTY = torch.empty(0)


class UnsupportedBackendError(RuntimeError):
    """The distributed setup has no reader for local weights and moments."""


class ShardFailureError(RuntimeError):
    """Some rank reported a failure through the log-time all-reduce; every rank raises it."""


class Backend(str, enum.Enum):
    SINGLE = "single"
    DDP = "ddp"
    FSDP1 = "fsdp1"
    FSDP2 = "fsdp2"
    ZERO1 = "zero1"
    ZERO2 = "zero2"
    ZERO3 = "zero3"

    @property
    def sharded(self) -> bool:
        return self not in (Backend.SINGLE, Backend.DDP)

    @property
    def deepspeed(self) -> bool:
        return self in (Backend.ZERO1, Backend.ZERO2, Backend.ZERO3)


@dataclass(frozen=True)
class ParamEntry:
    """One monitored parameter: its canonical name, the handle the backend reads it through, and
    its full (unsharded) shape."""

    name: str
    param: torch.Tensor
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass
class ParamView:
    """The local piece of one monitored parameter at the step just taken.

    ``weight`` is the post-step tensor (the fp32 master where mixed precision keeps one),
    ``second_moment`` is ``exp_avg_sq`` or, under AMSGrad, ``max_exp_avg_sq``; ``step`` is the
    parameter's own ``state["step"]`` (a number or a 0-d tensor, possibly on the device).
    """

    index: int
    weight: torch.Tensor
    exp_avg: torch.Tensor
    second_moment: torch.Tensor
    step: float | torch.Tensor
    hyper: AdamHyper


# ---------------------------------------------------------------------------------- detection
def detect_backend() -> Backend:
    """The running backend, read once from Accelerate's state (plain torch.distributed otherwise)."""
    try:
        from accelerate.state import AcceleratorState, PartialState
        from accelerate.utils import DistributedType
    except ImportError:  # pragma: no cover - accelerate is a Trainer dependency
        PartialState = None  # type: ignore[assignment]
    if PartialState is not None and PartialState._shared_state:  # initialised by the Trainer
        dtype = PartialState().distributed_type
        if dtype == DistributedType.NO:
            return Backend.SINGLE
        state = AcceleratorState() if AcceleratorState._shared_state else None
        if dtype == DistributedType.FSDP:
            plugin = getattr(state, "fsdp_plugin", None)
            version = getattr(plugin, "fsdp_version", 1) if plugin is not None else 1
            return Backend.FSDP2 if version == 2 else Backend.FSDP1
        if dtype == DistributedType.DEEPSPEED:
            plugin = getattr(state, "deepspeed_plugin", None)
            stage = getattr(plugin, "zero_stage", None)
            if stage in (1, 2, 3):
                return Backend(f"zero{stage}")
            raise UnsupportedBackendError(
                f"weight forces read DeepSpeed ZeRO stages 1, 2 and 3; this run uses stage {stage!r}"
            )
        return Backend.DDP if PartialState().num_processes > 1 else Backend.SINGLE
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return Backend.DDP if torch.distributed.get_world_size() > 1 else Backend.SINGLE
    return Backend.SINGLE


# ---------------------------------------------------------------------------------- helpers
def plan_shares(numels: Sequence[int], world_size: int) -> list[int]:
    """The rank that computes each tensor: disjoint shares balanced by element count.

    Largest tensors first, each to the rank with the fewest elements so far (ties: the lower
    rank; equal sizes: the earlier tensor), the classic LPT rule: no share exceeds the mean by more
    than the largest tensor.  Deterministic, so every rank plans the same shares without talking.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    load = [0] * world_size
    owner = [0] * len(numels)
    for i in sorted(range(len(numels)), key=lambda i: (-numels[i], i)):
        r = min(range(world_size), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += numels[i]
    return owner


def _names(model: torch.nn.Module | None) -> dict[int, str]:
    from ..core.groups import canonical_name

    return {id(p): canonical_name(n) for n, p in model.named_parameters()} if model is not None else {}


def _optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Every parameter of the optimizer once, in param-group order."""
    out: list[torch.Tensor] = []
    seen: set[int] = set()
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def _moments(state: dict, hyper: AdamHyper) -> tuple[torch.Tensor, torch.Tensor]:
    return state["exp_avg"], (state["max_exp_avg_sq"] if hyper.amsgrad else state["exp_avg_sq"])


def _is_host(x: object) -> bool:
    return not isinstance(x, torch.Tensor) or x.device.type == "cpu"
