"""The local piece of every parameter and its AdamW moments, one reader per backend
(docs/distributed.md)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .common import (
    _EMPTY,
    Backend,
    ParamEntry,
    ParamView,
    UnsupportedBackendError,
    _moments,
    _names,
    _optimizer_params,
)
from .steps import _StepRecorder


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
        from ..core.groups import canonical_name

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
