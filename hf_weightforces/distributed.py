"""The one module that knows about process groups and shards (docs/distributed.md).

Everything backend-specific lives here: which backend is running (detected once, from
Accelerate's state), which rank computes, the local piece of each parameter's weight and AdamW
moments, and the single packed all-reduce per logging event.  The core never sees a process
group: it gets lists of local tensors and returns additive sums, and every sum the budget needs
(||w||², <w, u>, ||u||², element counts) is additive over disjoint pieces of a tensor.

Backends and what a rank reads (``ParamView.weight`` is always the tensor the optimizer updates,
so the fp32 master wherever mixed precision keeps one):

=========  ===========================================================================
single     one process: whole tensors.
ddp        whole, identical tensors on every rank.  The work is divided: at train start the
           tensors are split into one disjoint share per rank, balanced by element count
           (:func:`plan_shares`), each rank reads only its share (the others look empty to
           it), and the log event's all-reduce sums the shares, so every sum is counted once.
fsdp1      ``use_orig_params=True``: each optimizer parameter is this rank's 1-D slice of the
           flat parameter, possibly empty, then without gradient and without state.  Full
           shapes come from the flat parameter's ``_shapes``.
fsdp2      DTensor parameters and moments sharded on dim 0: ``to_local()``.  Mesh dimensions
           with a ``Replicate`` placement (HSDP) count only on coordinate 0.
zero1/2    the torch optimizer steps one flat fp32 partition per parameter group;
           ``p._hp_mapping`` (None where this rank owns nothing of ``p``) locates ``p``'s
           fragment in it.  Moments are read from the optimizer's state of that partition at
           the same offsets, not through ``_hp_mapping``'s moment links, which DeepSpeed 0.19
           creates only after parameter group 0's first step (the no-decay group has none).
zero3      the torch optimizer steps flat fp32 sub-group partitions; ``grad_position`` locates
           each parameter's local slice in them (what ``safe_get_local_fp32_param`` and
           ``safe_get_local_optimizer_state`` return, read without their per-call stream sync).
           Full shapes come from ``ds_shape``.
=========  ===========================================================================

Which parameters the step updated.  A step pre-hook on the torch optimizer records, at every
``optimizer.step()`` call, each group's lr and each tensor's ``state["step"]``; a tensor counts as
updated when its counter moved past the recorded one (and, where the optimizer holds the
parameters, when it has a ``.grad``, as PyTorch's AdamW decides).  That catches the skip no flag
reports (a fused AdamW under a GradScaler skips inside its kernel and puts the counter back while
Accelerate's ``step_was_skipped`` stays False); skips that never call the optimizer (GradScaler
with a plain AdamW, DeepSpeed's overflow) are reported by ``step_was_skipped`` and handled by the
callback.  FSDP1 feeds an unused parameter zero gradients wherever its slice is non-empty, and
DeepSpeed feeds zeros to the flat partition: the optimizer really updates those (decay, moment
decay), so they are counted.

The learning rate is the one the pre-hook saw, which is the one the step used: under DeepSpeed,
which steps inside ``backward``, a scheduler in the DeepSpeed config has already moved
``param_groups[i]["lr"]`` when ``on_optimizer_step`` runs.

Failures.  Under sharding the log-time all-reduce is collective: every rank calls
:meth:`ShardContext.all_reduce_sum` at every log event, a rank whose own work failed passes
``failed=True``, the flag travels in the same tensor, and every rank raises
:class:`ShardFailureError` together, so no rank is left waiting in a collective.
"""

from __future__ import annotations

import enum
import logging
import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .core.optim import AdamHyper, group_hyper
from .core.plan import StepPlan

__all__ = [
    "Backend",
    "ParamEntry",
    "ParamView",
    "ShardContext",
    "ShardFailureError",
    "UnsupportedBackendError",
    "detect_backend",
    "plan_shares",
]

logger = logging.getLogger(__name__)


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
    from .core.groups import canonical_name

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


_EMPTY = torch.empty(0)


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
            # the planned tensors' counters in one stacked copy; the per-tensor dict only if asked
            self.planned_before, self.before_of = planned.snapshot(), planned
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
            if _is_host(self.planned_before):
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


def _is_host(x: object) -> bool:
    return not isinstance(x, torch.Tensor) or x.device.type == "cpu"


class PlannedStep(NamedTuple):
    """One step's inputs to :meth:`StepPlan.run` (:meth:`ShardContext.planned_step`)."""

    plan: StepPlan
    weights: list[torch.Tensor]
    exp_avgs: list[torch.Tensor]
    second_moments: list[torch.Tensor]
    t_after: torch.Tensor
    t_before: torch.Tensor
    hyper_now: torch.Tensor  # StepPlan.step_vector: the groups' lrs and decay factors, the bias corrections


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
    :meth:`valid` checks, per step, that nothing was replaced (the optimizer's state, a moment, a
    counter, a weight's storage, a group's hyper-parameters); when anything was, the callback
    takes the per-tensor path for that step and plans again."""

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
                m, v = st["exp_avg"], st["max_exp_avg_sq" if amsgrad else "exp_avg_sq"]
                if not (p.is_contiguous() and m.is_contiguous() and v.is_contiguous()):
                    raise _NotPlannable("a tensor is not contiguous")
                rows.append((idx, g, p, p.detach().view(-1), st, m.view(-1), v.view(-1), step, m, v))
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
        self._check = [(r[2], r[2].data_ptr(), r[4], r[8], r[9], r[7], "max_exp_avg_sq" if
                        _group_key(optimizer.param_groups[r[1]])[0] else "exp_avg_sq") for r in rows]
        self.plan = StepPlan([r[0] for r in rows], [r[1] for r in rows], len(optimizer.param_groups),
                             [r[3].dtype == torch.float64 for r in rows], [r[3].numel() for r in rows], self.device,
                             kernel)

    def fresh(self, optimizer) -> bool:
        """Cheap: the optimizer still holds the same state (no tensor gained state, none reloaded)."""
        return optimizer.state is self.state and len(optimizer.state) == self.n_state

    def valid(self, optimizer) -> bool:
        """Every planned tensor, counter and hyper-parameter still the one planned."""
        if not self.fresh(optimizer) or len(optimizer.param_groups) != len(self.group_keys):
            return False
        for group, (params, n, key) in zip(optimizer.param_groups, self.group_keys):
            if group["params"] is not params or len(params) != n or _group_key(group) != key:
                return False
        state = optimizer.state
        for p, ptr, st, m, v, step, second in self._check:
            if state.get(p) is not st or st.get("exp_avg") is not m or st.get(second) is not v or st.get("step") is not step or p.data_ptr() != ptr:
                return False
        return True

    def snapshot(self) -> torch.Tensor:
        """The planned tensors' step counters, stacked (a copy: read before the step)."""
        return torch.stack(self.steps)


class _NotPlannable(Exception):
    """The step cannot take the planned path (the per-tensor path reads it instead)."""


# ---------------------------------------------------------------------------------- readers
class _ReplicatedReader:
    """Tensors the optimizer holds and steps itself (single process, DDP; FSDP below)."""

    def __init__(self) -> None:
        self.rec: _StepRecorder | None = None

    def attach(self, optimizer) -> None:
        self.close()
        self.rec = _StepRecorder(optimizer)

    def entries(self, model, optimizer) -> list[ParamEntry]:
        self.attach(optimizer)
        names = _names(model)
        params = _optimizer_params(optimizer)
        return [ParamEntry(names.get(id(p), f"param_{i}"), p, tuple(p.shape)) for i, p in enumerate(params)]

    def counts(self, p: torch.Tensor) -> bool:
        """Whether this rank counts its piece of ``p`` (each element must count on one rank)."""
        return True

    def local(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's piece of a tensor the optimizer holds (a parameter or a moment)."""
        return t.detach()

    def offset(self, p: torch.Tensor) -> int:
        """Where this rank's piece of ``p`` starts in the full tensor flattened (row-major): every
        backend holds one contiguous range of it."""
        return 0

    def local_grad(self, p: torch.Tensor) -> torch.Tensor | None:
        """This rank's piece of ``p``'s gradient (None without one), before the optimizer step."""
        return self.local(p.grad) if p.grad is not None and self.counts(p) else None

    def views(self, optimizer, index_of: dict[int, int]) -> list[ParamView]:
        views: list[ParamView] = []
        for group in optimizer.param_groups:
            hyper = self.rec.hyper(group)
            for p in group["params"]:
                state = optimizer.state.get(p)
                if p.grad is None or not state or "exp_avg" not in state or not self.rec.advanced(p, state):
                    continue  # no gradient, no state yet, or a skipped step: the optimizer left it alone
                idx = index_of.get(id(p))
                if idx is None or not self.counts(p):
                    continue
                m, v = _moments(state, hyper)
                views.append(ParamView(idx, self.local(p), self.local(m), self.local(v), state["step"], hyper))
        return views

    def local_weights(self, entries: Sequence[ParamEntry]) -> list[torch.Tensor]:
        return [self.local(e.param) if self.counts(e.param) else _EMPTY for e in entries]

    def close(self) -> None:
        if self.rec is not None:
            self.rec.close()  # the hook goes; what it recorded stays readable


class _FSDP2Reader(_ReplicatedReader):
    """DTensor parameters and moments: the local shard, counted once per replica group."""

    def __init__(self) -> None:
        super().__init__()
        self._counted: dict[tuple, bool] = {}

    def counts(self, p: torch.Tensor) -> bool:
        from torch.distributed.tensor import DTensor, Replicate

        if not isinstance(p, DTensor):  # a plain tensor beside DTensors is whole on every rank
            return torch.distributed.get_rank() == 0
        key = (id(p.device_mesh), tuple(p.placements))
        if key not in self._counted:  # HSDP: a shard is replicated along Replicate mesh dims
            coord = p.device_mesh.get_coordinate() or ()
            self._counted[key] = all(c == 0 for c, pl in zip(coord, p.placements) if isinstance(pl, Replicate))
        return self._counted[key]

    def local(self, t: torch.Tensor) -> torch.Tensor:
        from torch.distributed.tensor import DTensor

        return t.to_local().detach() if isinstance(t, DTensor) else t.detach()

    def offset(self, p: torch.Tensor) -> int:
        from torch.distributed.tensor import DTensor
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        if not isinstance(p, DTensor):
            return 0
        full = tuple(p.shape)
        local, start = compute_local_shape_and_global_offset(full, p.device_mesh, p.placements)
        if tuple(local[1:]) != full[1:] and math.prod(local) > 0:
            raise UnsupportedBackendError(f"a DTensor sharded off dim 0 ({p.placements}) is not one contiguous range")
        return int(start[0]) * math.prod(full[1:]) if full else 0


class _FSDP1Reader(_ReplicatedReader):
    """``use_orig_params=True``: 1-D local slices of each flat parameter, full shapes from it."""

    def __init__(self) -> None:
        super().__init__()
        self._replicated: set[int] = set()  # whole on every rank: NO_SHARD units, ignored modules
        self._start: dict[int, int] = {}  # id(param) -> start of its local slice in the flat param

    def entries(self, model, optimizer) -> list[ParamEntry]:
        from torch.distributed.fsdp._flat_param import FlatParameter, HandleShardingStrategy

        full: dict[int, tuple[int, ...]] = {}
        seen: set[int] = set()
        for module in model.modules() if model is not None else ():
            handle = getattr(module, "_handle", None)
            flat = getattr(handle, "flat_param", None)
            if flat is None or id(flat) in seen:
                continue
            seen.add(id(flat))
            strategy = getattr(handle, "_sharding_strategy", None)
            if strategy in (HandleShardingStrategy.HYBRID_SHARD, HandleShardingStrategy._HYBRID_SHARD_ZERO2):
                raise UnsupportedBackendError("weight forces do not read FSDP1 hybrid sharding; use FSDP2 (HSDP)")
            if getattr(flat, "_params", None) is None:
                raise UnsupportedBackendError(
                    "weight forces need FSDP1 with use_orig_params=True (fsdp_config use_orig_params: true)"
                )
            for p, shape, info in zip(flat._params, flat._shapes, flat._shard_param_infos):
                full[id(p)] = tuple(shape)
                self._start[id(p)] = int(info.intra_param_start_idx or 0)
                if strategy == HandleShardingStrategy.NO_SHARD:
                    self._replicated.add(id(p))
        self.attach(optimizer)
        names = _names(model)
        entries = []
        for i, p in enumerate(_optimizer_params(optimizer)):
            if isinstance(p, FlatParameter):
                raise UnsupportedBackendError(
                    "weight forces need FSDP1 with use_orig_params=True: the optimizer holds flat parameters"
                )
            if id(p) not in full:  # not managed by FSDP (an ignored module): whole on every rank
                self._replicated.add(id(p))
            entries.append(ParamEntry(names.get(id(p), f"param_{i}"), p, full.get(id(p), tuple(p.shape))))
        return entries

    def counts(self, p: torch.Tensor) -> bool:
        return id(p) not in self._replicated or torch.distributed.get_rank() == 0

    def offset(self, p: torch.Tensor) -> int:
        return 0 if id(p) in self._replicated else self._start.get(id(p), 0)


class _DeepSpeedReader(_ReplicatedReader):
    """ZeRO 1/2/3: the torch optimizer steps flat fp32 partitions, not the model's parameters.

    Entries come from the model (its parameters are the handles); each one is located in a flat
    partition by :meth:`locate`, and its weight and moments are slices of that partition and of
    the optimizer's state for it, at the same offsets."""

    def __init__(self) -> None:
        super().__init__()
        self._by_id: dict[int, torch.Tensor] = {}  # id(handle) -> model parameter

    def managed(self, p: torch.Tensor) -> bool:
        raise NotImplementedError

    def full_shape(self, p: torch.Tensor) -> tuple[int, ...]:
        return tuple(p.shape)

    def dp_group(self, p: torch.Tensor):
        raise NotImplementedError

    def locate(self, optimizer, p: torch.Tensor) -> tuple[int, int, int, torch.Tensor] | None:
        """(param group index, start, numel, flat fp32 partition) of p's local slice; None if
        this rank holds nothing of p."""
        raise NotImplementedError

    def entries(self, model, optimizer) -> list[ParamEntry]:
        if model is None:
            raise UnsupportedBackendError("weight forces need the model under DeepSpeed")
        from .core.groups import canonical_name

        entries = [ParamEntry(canonical_name(n), p, self.full_shape(p))
                   for n, p in model.named_parameters() if self.managed(p)]
        world = torch.distributed.get_world_size()
        if entries and torch.distributed.get_world_size(group=self.dp_group(entries[0].param)) != world:
            raise UnsupportedBackendError(
                "weight forces read DeepSpeed data parallelism over all ranks; this run partitions over a subgroup"
            )
        self._by_id = {id(e.param): e.param for e in entries}
        self._optimizer = optimizer
        self.attach(optimizer)
        return entries

    def views(self, optimizer, index_of: dict[int, int]) -> list[ParamView]:
        views = []
        for key, idx in index_of.items():
            p = self._by_id.get(key)
            loc = self.locate(optimizer, p) if p is not None else None
            if loc is None:
                continue  # this rank holds nothing of p
            gi, start, n, flat = loc
            state = optimizer.state.get(flat)
            if not state or "exp_avg" not in state or not self.rec.advanced(flat, state):
                continue  # no state yet, or the partition did not step
            hyper = self.rec.hyper(optimizer.param_groups[gi])
            m, v = _moments(state, hyper)
            views.append(ParamView(idx, flat.detach().narrow(0, start, n), m.narrow(0, start, n),
                                   v.narrow(0, start, n), state["step"], hyper))
        return views

    def local_weights(self, entries: Sequence[ParamEntry]) -> list[torch.Tensor]:
        out = []
        for e in entries:
            loc = self.locate(self._optimizer, e.param)
            out.append(_EMPTY if loc is None else loc[3].detach().narrow(0, loc[1], loc[2]))
        return out

    def local_grad(self, p: torch.Tensor) -> torch.Tensor | None:
        return None  # DeepSpeed steps inside backward: no hook sees its gradients before the step


class _Zero12Reader(_DeepSpeedReader):
    """One flat fp32 partition per parameter group (``param_groups[i]["params"] == [flat]``);
    ``p._hp_mapping`` is set on every parameter ZeRO manages, None where this rank owns none of it."""

    def managed(self, p):
        return hasattr(p, "_hp_mapping")

    def dp_group(self, p):
        return getattr(p, "_dp_group", None)

    def offset(self, p):
        mapping = getattr(p, "_hp_mapping", None)
        return 0 if mapping is None else int(mapping.lp_fragment_address.start)

    def locate(self, optimizer, p):
        mapping = getattr(p, "_hp_mapping", None)
        if mapping is None:
            return None
        gi = mapping.param_group_index
        addr = mapping.get_hp_fragment_address()
        return gi, addr.start, addr.numel, optimizer.param_groups[gi]["params"][0]


class _Zero3Reader(_DeepSpeedReader):
    """Flat fp32 sub-group partitions; ``grad_position`` holds each parameter's slice in them
    (the tensors ``safe_get_local_fp32_param`` / ``safe_get_local_optimizer_state`` return,
    read here without their per-call stream sync).  Full shapes from ``ds_shape``."""

    def managed(self, p):
        z3 = getattr(p, "_z3_optimizer", None)
        if z3 is None or z3.get_param_id(p) not in z3.grad_position:
            return False
        if getattr(z3, "swap_optimizer", False):
            raise UnsupportedBackendError("weight forces do not read ZeRO-3 optimizer states swapped to NVMe")
        return True

    def full_shape(self, p):
        return tuple(p.ds_shape)

    def dp_group(self, p):
        return p._z3_optimizer.dp_process_group

    def offset(self, p):
        z3 = p._z3_optimizer
        n = z3.grad_position[z3.get_param_id(p)][2]
        return torch.distributed.get_rank(group=z3.dp_process_group) * n

    def locate(self, optimizer, p):
        z3 = p._z3_optimizer
        sub, start, n = z3.grad_position[z3.get_param_id(p)]
        rank = torch.distributed.get_rank(group=z3.dp_process_group)
        real = max(0, min(n, p.ds_numel - rank * n))  # the last partitions end in zero padding
        return z3.sub_group_to_group_id[sub], start, real, z3.fp32_partitioned_groups_flat[sub]


_READERS = {
    Backend.SINGLE: _ReplicatedReader,
    Backend.DDP: _ReplicatedReader,
    Backend.FSDP1: _FSDP1Reader,
    Backend.FSDP2: _FSDP2Reader,
    Backend.ZERO1: _Zero12Reader,
    Backend.ZERO2: _Zero12Reader,
    Backend.ZERO3: _Zero3Reader,
}


# ---------------------------------------------------------------------------------- context
class ShardContext:
    """Backend, rank, local views and the one reduction, fixed at train start.

    ``divide`` (DDP only): split the work into disjoint per-rank shares (the default); with
    ``divide=False`` rank 0 computes everything and nothing is reduced."""

    def __init__(self, backend: Backend | None = None, divide: bool = True) -> None:
        self.backend = Backend(backend) if backend is not None else detect_backend()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            self.rank = torch.distributed.get_rank()
            self.world_size = torch.distributed.get_world_size()
        else:
            self.rank, self.world_size = 0, 1
        if self.backend.sharded and self.world_size == 1 and not torch.distributed.is_initialized():
            raise UnsupportedBackendError(f"backend {self.backend.value} needs an initialised process group")
        self._reader = _READERS[self.backend]()
        #: DDP: every rank computes a disjoint share of the tensors (planned at :meth:`entries`)
        self.divides = bool(divide) and self.backend == Backend.DDP and self.world_size > 1
        self._owned: set[int] | None = None  # ids of the parameters in this rank's share
        self._index_cache: tuple[int, dict[int, int], dict[int, int]] | None = None

    @property
    def is_main(self) -> bool:
        """Only this rank writes W&B rows and metrics.jsonl."""
        return self.rank == 0

    @property
    def computes(self) -> bool:
        """Whether this rank evaluates the budget: all ranks when sharded or dividing, else rank 0."""
        return self.backend.sharded or self.divides or self.rank == 0

    @property
    def reduces(self) -> bool:
        """Whether each log event sums the ranks' parts (sharded, or DDP divided)."""
        return (self.backend.sharded or self.divides) and self.world_size > 1

    def owns(self, entry: ParamEntry) -> bool:
        """Whether this rank computes ``entry`` (always, unless the work is divided)."""
        return self._owned is None or id(entry.param) in self._owned

    def entries(self, model: torch.nn.Module | None, optimizer: torch.optim.Optimizer) -> list[ParamEntry]:
        """The monitored parameters with names and full shapes, identical on every rank.

        Under sharding this is checked with one all-reduce (a fingerprint of names and shapes),
        so every rank must call it, once, at train start."""
        entries = self._reader.entries(model, optimizer)
        if not self.computes:
            self._reader.close()  # DDP ranks but 0 never read a step
        if self.divides:  # planned once; identical on every rank (checked with the fingerprint below)
            owner = plan_shares([e.numel for e in entries], self.world_size)
            self._owned = {id(e.param) for e, r in zip(entries, owner) if r == self.rank}
            self._index_cache = None
            mine = sum(e.numel for e, r in zip(entries, owner) if r == self.rank)
            logger.info("weight forces: DDP rank %d computes %d of %d tensors (%.1f%% of the elements)", self.rank,
                        len(self._owned), len(entries), 100 * mine / max(1, sum(e.numel for e in entries)))
        if self.reduces:
            text = "\n".join(f"{e.name}:{e.shape}" for e in entries)
            fp = float(zlib.crc32(text.encode()))
            device = entries[0].param.device if entries else torch.device("cpu")
            n = float(len(entries))
            probe = torch.tensor([fp, -fp, n, -n], dtype=torch.float64, device=device)
            torch.distributed.all_reduce(probe, op=torch.distributed.ReduceOp.MAX)
            if float(probe[0]) != -float(probe[1]) or float(probe[2]) != -float(probe[3]):
                raise UnsupportedBackendError(
                    f"the monitored parameters differ across ranks under {self.backend.value} (names, shapes or order)"
                )
        return entries

    def views(self, optimizer: torch.optim.Optimizer, index_of: dict[int, int], whole: bool = False) -> list[ParamView]:
        """Local weights and moments of the parameters the optimizer updated this step (this
        rank's share when the work is divided; every tensor with ``whole``, replicated only)."""
        if self._owned is not None and not whole:
            index_of = self._share_index(index_of)
        elif whole and self.backend.sharded:
            raise UnsupportedBackendError(f"whole tensors are not held under {self.backend.value}")
        return self._reader.views(optimizer, index_of)

    def planned_step(self, optimizer: torch.optim.Optimizer, index_of: dict[int, int], kernel: str) -> PlannedStep | None:
        """This step's inputs to the planned pass (core/plan.py), or None where the per-tensor
        :meth:`views` must read it: a sharded backend, the first budget step, or a step where a
        tensor, counter or hyper-parameter was replaced since the plan (planned again for the
        next step).  The shares of a divided DDP run are planned like a single process's."""
        reader = self._reader
        rec = getattr(reader, "rec", None)
        if type(reader) is not _ReplicatedReader or rec is None:
            return None
        if self._owned is not None:
            index_of = self._share_index(index_of)
        planned = rec.planned
        if planned is None or planned.index_of is not index_of or planned.kernel != kernel or not planned.valid(optimizer):
            rec.planned = self._plan(optimizer, index_of, kernel)
            return None  # the pre-hook of this step did not snapshot the new plan's counters
        if rec.planned_before is None:
            return None
        t_before, t_after = rec.planned_before, planned.snapshot()
        groups = optimizer.param_groups
        hyper = planned.plan.step_vector([rec.lr(g) for g in groups], [_group_hypers(g) for g in groups], t_after)
        if t_after.device != planned.device:  # host counters of accelerator tensors: pinned, no sync
            t_before, t_after = (x.pin_memory().to(planned.device, non_blocking=True) for x in (t_before, t_after))
        return PlannedStep(planned.plan, planned.weights, planned.exp_avgs, planned.second_moments, t_after, t_before, hyper)

    def _plan(self, optimizer, index_of: dict[int, int], kernel: str) -> _PlannedTensors | None:
        key = (id(optimizer.state), len(optimizer.state), id(index_of), kernel)
        if getattr(self, "_unplannable", None) == key:
            return None
        try:
            planned = _PlannedTensors(optimizer, index_of, self._reader.counts, kernel)
        except _NotPlannable:
            self._unplannable = key
            return None
        planned.index_of, planned.kernel = index_of, kernel
        return planned

    def _share_index(self, index_of: dict[int, int]) -> dict[int, int]:
        """``index_of`` cut down to this rank's share (cached: the callback passes one dict)."""
        cache = self._index_cache
        if cache is None or cache[0] != id(index_of) or cache[1] is not index_of:
            cache = (id(index_of), index_of, {k: v for k, v in index_of.items() if k in self._owned})
            self._index_cache = cache
        return cache[2]

    def local_weights(self, entries: Sequence[ParamEntry]) -> list[torch.Tensor]:
        """The local piece of every monitored parameter (whole tensors when replicated, an empty
        tensor where this rank holds nothing of it or, DDP divided, where another rank computes
        it), in the order of ``entries``."""
        if self._owned is not None:
            return [e.param.detach() if id(e.param) in self._owned else _EMPTY for e in entries]
        return self._reader.local_weights(entries)

    def whole_weights(self, entries: Sequence[ParamEntry]) -> list[torch.Tensor]:
        """Every monitored parameter whole, on a replicated backend (single process, DDP)."""
        if self.backend.sharded:
            raise UnsupportedBackendError(f"whole tensors are not held under {self.backend.value}")
        return [e.param.detach() for e in entries]

    def local_grads(self, entries: Sequence[ParamEntry]) -> list[torch.Tensor | None]:
        """The local piece of every monitored parameter's gradient, in the pieces of
        :meth:`local_weights` (None without a gradient, or where this rank holds nothing)."""
        if self._owned is not None:
            return [e.param.grad if id(e.param) in self._owned else None for e in entries]
        return [self._reader.local_grad(e.param) for e in entries]

    def local_offsets(self, entries: Sequence[ParamEntry]) -> list[int]:
        """Where each piece of :meth:`local_weights` starts in its full tensor, flattened
        row-major: piece i is elements ``[offset_i, offset_i + numel_i)`` of the full tensor."""
        if self._owned is not None:
            return [0] * len(entries)
        return [self._reader.offset(e.param) for e in entries]

    def full_weight(self, entry: ParamEntry, local: torch.Tensor, offset: int) -> torch.Tensor:
        """One whole weight, float32, in its full shape, on every rank (collective when reducing).

        ``local`` and ``offset`` are this rank's piece and its place (:meth:`local_weights`,
        :meth:`local_offsets`).  Each rank writes its piece into a zero buffer of the full size
        and one all-reduce sums them: the memory of one matrix, used at sparse intervals only.
        """
        if not self.backend.sharded:
            return entry.param.detach().float()  # whole on every rank
        device = entry.param.device
        buf = torch.zeros(entry.numel, dtype=torch.float32, device=device)
        if local.numel():
            buf[offset : offset + local.numel()] = local.reshape(-1).to(device, torch.float32)
        if self.world_size > 1:
            torch.distributed.all_reduce(buf, op=torch.distributed.ReduceOp.SUM)
        return buf.view(entry.shape)

    def all_reduce_sum(self, flat: torch.Tensor, *, failed: bool = False) -> torch.Tensor:
        """Sum one flat tensor over ranks when sharded (a no-op when replicated); a host tensor.

        Under sharding every rank must call this at every log event, in the same order, whatever
        it holds; a rank whose own work failed passes ``failed=True`` (``flat`` must still have
        the agreed length: its content is ignored).  The flag is one more element of the same
        all-reduce, and if any rank set it every rank raises :class:`ShardFailureError`.
        """
        if not self.reduces:
            if failed:
                raise ShardFailureError("weight forces failed on this rank")
            return flat.detach().cpu()
        flag = flat.new_full((1,), float(failed), dtype=torch.float64)
        buf = torch.cat((flat.detach().reshape(-1).to(torch.float64), flag))
        torch.distributed.all_reduce(buf, op=torch.distributed.ReduceOp.SUM)
        host = buf.cpu()
        n_failed = int(host[-1].item())
        if n_failed:
            raise ShardFailureError(
                f"{n_failed} of {self.world_size} ranks failed (their own warning says why); switched off on every rank"
            )
        return host[:-1]

    def step_lrs(self, optimizer: torch.optim.Optimizer) -> list[float | torch.Tensor]:
        """The lr each param group's last optimizer step used (under DeepSpeed a scheduler in its
        config has already moved ``group["lr"]`` on when ``on_optimizer_step`` runs)."""
        rec = self._reader.rec
        return [rec.lr(g) if rec is not None else g["lr"] for g in optimizer.param_groups]

    def close(self) -> None:
        """Remove the step hook this context put on the optimizer at :meth:`entries`."""
        self._reader.close()
