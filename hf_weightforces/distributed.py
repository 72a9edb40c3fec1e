"""The one module that knows about process groups and shards (SPEC section 8).

Everything backend-specific lives here: which backend is running (detected once, from
Accelerate's state), which rank computes, the local view of each parameter's weight and AdamW
moments, and the single packed all-reduce per logging event.  The core never sees a process
group: it gets lists of local tensors and returns additive sums.

Backends:

* ``single``: one process.
* ``ddp``: every rank holds whole, identical tensors; rank 0 computes, nothing is reduced
  (summing over ranks would double-count).
* ``fsdp1``, ``fsdp2``, ``deepspeed``: sharded weights and moments; every rank computes on its
  local shard and the sums are all-reduced.  Views for these are registered by backend-specific
  readers; a backend without a reader is refused at train start with a clear message.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .core.optim import AdamHyper, group_hyper

__all__ = ["Backend", "ParamEntry", "ParamView", "ShardContext", "UnsupportedBackendError", "detect_backend"]

logger = logging.getLogger(__name__)


class UnsupportedBackendError(RuntimeError):
    """The distributed backend has no reader for local weights and moments."""


class Backend(str, enum.Enum):
    SINGLE = "single"
    DDP = "ddp"
    FSDP1 = "fsdp1"
    FSDP2 = "fsdp2"
    DEEPSPEED = "deepspeed"

    @property
    def sharded(self) -> bool:
        return self in (Backend.FSDP1, Backend.FSDP2, Backend.DEEPSPEED)


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


def detect_backend() -> Backend:
    """The running backend, read once from Accelerate's state (plain torch.distributed otherwise)."""
    try:
        from accelerate.state import PartialState
        from accelerate.utils import DistributedType
    except ImportError:  # pragma: no cover - accelerate is a Trainer dependency
        PartialState = None  # type: ignore[assignment]
    if PartialState is not None and PartialState._shared_state:  # initialised by the Trainer
        dtype = PartialState().distributed_type
        if dtype == DistributedType.NO:
            return Backend.SINGLE
        if dtype == DistributedType.FSDP:
            from accelerate.state import AcceleratorState

            plugin = getattr(AcceleratorState(), "fsdp_plugin", None)
            version = getattr(plugin, "fsdp_version", 1) if plugin is not None else 1
            return Backend.FSDP2 if version == 2 else Backend.FSDP1
        if dtype == DistributedType.DEEPSPEED:
            return Backend.DEEPSPEED
        return Backend.DDP if PartialState().num_processes > 1 else Backend.SINGLE
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return Backend.DDP if torch.distributed.get_world_size() > 1 else Backend.SINGLE
    return Backend.SINGLE


def _replicated_entries(model: torch.nn.Module | None, optimizer: torch.optim.Optimizer) -> list[ParamEntry]:
    """Every parameter the optimizer updates, in param-group order, named from the model."""
    from .core.groups import canonical_name

    names = {id(p): canonical_name(n) for n, p in model.named_parameters()} if model is not None else {}
    entries: list[ParamEntry] = []
    seen: set[int] = set()
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) in seen:
                continue
            seen.add(id(p))
            entries.append(ParamEntry(names.get(id(p), f"param_{len(entries)}"), p, tuple(p.shape)))
    return entries


def _replicated_views(
    optimizer: torch.optim.Optimizer, index_of: dict[int, int]
) -> list[ParamView]:
    """Views for whole tensors (single process, DDP): read the torch optimizer's state."""
    views: list[ParamView] = []
    for group in optimizer.param_groups:
        hyper = group_hyper(group)
        for p in group["params"]:
            state = optimizer.state.get(p)
            if p.grad is None or not state or "exp_avg" not in state:
                continue  # no gradient this step, or no state yet: the optimizer left it alone
            idx = index_of.get(id(p))
            if idx is None:
                continue
            second = state["max_exp_avg_sq"] if hyper.amsgrad else state["exp_avg_sq"]
            views.append(ParamView(idx, p.detach(), state["exp_avg"], second, state["step"], hyper))
    return views


class ShardContext:
    """Backend, rank, local views and the one reduction, fixed at train start."""

    def __init__(self, backend: Backend | None = None) -> None:
        self.backend = backend if backend is not None else detect_backend()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            self.rank = torch.distributed.get_rank()
            self.world_size = torch.distributed.get_world_size()
        else:
            self.rank, self.world_size = 0, 1
        self._views: Callable[[torch.optim.Optimizer, dict[int, int]], list[ParamView]]
        if self.backend in (Backend.SINGLE, Backend.DDP):
            self._views = _replicated_views
        else:
            raise UnsupportedBackendError(
                f"weight forces do not yet read sharded weights and moments under {self.backend.value}; "
                "supported backends: single process and DDP"
            )

    @property
    def is_main(self) -> bool:
        """Only this rank writes W&B rows and metrics.jsonl."""
        return self.rank == 0

    @property
    def computes(self) -> bool:
        """Whether this rank evaluates the budget: all ranks when sharded, rank 0 when replicated."""
        return self.backend.sharded or self.rank == 0

    def entries(self, model: torch.nn.Module | None, optimizer: torch.optim.Optimizer) -> list[ParamEntry]:
        """The monitored parameters with names and full shapes, identical on every rank."""
        return _replicated_entries(model, optimizer)

    def views(self, optimizer: torch.optim.Optimizer, index_of: dict[int, int]) -> list[ParamView]:
        """Local weights and moments of the parameters the optimizer updated this step."""
        return self._views(optimizer, index_of)

    def local_weights(self, entries: Sequence[ParamEntry]) -> list[torch.Tensor]:
        """The local piece of every monitored parameter (whole tensors when replicated)."""
        return [e.param.detach() for e in entries]

    def all_reduce_sum(self, flat: torch.Tensor) -> torch.Tensor:
        """Sum one flat tensor over ranks when sharded; a no-op when replicated."""
        if self.backend.sharded and self.world_size > 1:
            torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
        return flat
