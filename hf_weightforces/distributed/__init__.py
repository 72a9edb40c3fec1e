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

from .common import (
    Backend,
    ParamEntry,
    ParamView,
    ShardFailureError,
    UnsupportedBackendError,
    detect_backend,
    plan_shares,
)
from .context import ShardContext
from .steps import PlannedStep, _PlannedTensors, _StepRecorder  # noqa: F401  (benchmarks time the pre-hook)

__all__ = [
    "Backend",
    "ParamEntry",
    "ParamView",
    "PlannedStep",
    "ShardContext",
    "ShardFailureError",
    "UnsupportedBackendError",
    "detect_backend",
    "plan_shares",
]
