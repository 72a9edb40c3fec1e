"""The shard context: backend, rank, this rank's share, the planned step and the one reduction
(docs/distributed.md)."""

from __future__ import annotations

import logging
import zlib
from collections.abc import Sequence

import torch

from ..core.kernels import to_device
from .common import (
    _EMPTY,
    Backend,
    ParamEntry,
    ParamView,
    ShardFailureError,
    UnsupportedBackendError,
    detect_backend,
    plan_shares,
)
from .readers import _READERS, _ReplicatedReader
from .steps import PlannedStep, _group_hypers, _NotPlannable, _PlannedTensors

logger = logging.getLogger(__name__)


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
        tensor, a moment or a counter was replaced since the plan (planned again for the next
        step).  The shares of a divided DDP run are planned like a single process's."""
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
        if rec.planned_before is None:  # set (or cleared) by the pre-hook of every step
            return None
        t_before, t_after = rec.planned_before, planned.snapshot()
        planned.last_after = t_after  # the next step's "before", if no other step runs first
        groups = optimizer.param_groups
        hyper = planned.plan.step_vector([rec.lr(g) for g in groups], [_group_hypers(g) for g in groups])
        if t_after.device != planned.device:  # host counters of accelerator tensors: pinned, no sync
            t_before, t_after = (to_device(x, planned.device) for x in (t_before, t_after))
        return PlannedStep(planned.plan, planned.weights, planned.exp_avgs, planned.second_moments, t_after, t_before, hyper)

    @property
    def has_plan(self) -> bool:
        """Whether the next step can take the planned pass (a plan was made and holds)."""
        rec = getattr(self._reader, "rec", None)
        return rec is not None and rec.planned is not None

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
