"""Device operations of one planned budget step, counted at the dispatcher, for Pythia layouts.

    python benchmarks/op_count.py                  # 160m, 410m and 1.4b

No accelerator and no memory: the model's parameters and AdamW moments are meta tensors laid out as the
Pythia model's (GPT-NeoX, vocab 50304, untied embeddings, biases on); the pass is the one a run on
an accelerator plans (:data:`~hf_weightforces.core.kernels.CHUNK_ACCEL` elements a chunk), and on a
CPU the one a CPU runs (its chunks, ε' from host counters, its square root), over zeros: pages the
pass only reads stay the one zero page, so no memory is taken however large the layout.  Every
ATen operation the step dispatches counts once (views included): on a GPU each non-view one is a
kernel launch.  A step's budget terms are computed at the log event, for all the steps since the last
one together (the monitor's flush): the figures per step share that flush among the interval's steps.
``tests/test_op_count.py`` keeps these counts from growing back.
"""

from __future__ import annotations

import argparse
from collections import Counter
from unittest import mock

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hf_weightforces.core import kernels
from hf_weightforces.core.kernels import SMALL
from hf_weightforces.core.monitor import ForceMonitor, ParamInfo
from hf_weightforces.core.plan import StepPlan

#: (hidden, layers, intermediate) of EleutherAI's Pythia models; vocab 50304
PYTHIA = {"160m": (768, 12, 3072), "410m": (1024, 24, 4096), "1.4b": (2048, 24, 8192)}
VOCAB = 50304


class OpCounter(TorchDispatchMode):
    """Counts every ATen operation dispatched while active (by name in :attr:`ops`)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())


def pythia_shapes(size: str) -> list[tuple[int, ...]]:
    """Every trained tensor of a Pythia model, in the model's order."""
    h, layers, inter = PYTHIA[size]
    shapes: list[tuple[int, ...]] = [(VOCAB, h)]
    for _ in range(layers):
        shapes += [(h,), (h,), (h,), (h,),  # input and post-attention LayerNorm weight, bias
                   (3 * h, h), (3 * h,), (h, h), (h,),  # attention: query_key_value, dense
                   (inter, h), (inter,), (h, inter), (h,)]  # MLP
    shapes += [(h,), (h,), (VOCAB, h)]  # final LayerNorm, embed_out
    return shapes


def big_tensors(shapes) -> int:
    return sum(1 for s in shapes if torch.Size(s).numel() >= SMALL)


def count_step(shapes, device: str = "meta", kernel: str = "exact", chunk: int | None = None,
               flush_after: int = 0) -> OpCounter:
    """The operations of the second planned step (the first plans the pass) over ``shapes``;
    ``chunk``: the pass's chunk size (default: the device's).  With ``flush_after`` k, the operations of the log event's flush after k
    such steps instead (the budget of the k pending steps computed together, then accumulated)."""
    if chunk is not None:
        with mock.patch.object(kernels, "chunk_size", lambda device: chunk):
            return count_step(shapes, device, kernel, flush_after=flush_after)
    dev = torch.device(device)
    # on a CPU zeros from calloc (numpy's; torch.zeros writes them): pages the pass only reads stay the
    # one zero page (no memory, however large)
    make = torch.empty if dev.type == "meta" else lambda s, device: torch.from_numpy(np.zeros(s, dtype=np.float32))
    ws, ms, vs = ([make(s, device=dev).view(-1) for s in shapes] for _ in range(3))
    n = len(shapes)
    plan = StepPlan(list(range(n)), [0] * n, 1, [False] * n, [w.numel() for w in ws], dev, kernel)
    monitor = ForceMonitor([ParamInfo(f"p{i}", "other", None, w.numel()) for i, w in enumerate(ws)], dev)
    t_before, t_after = torch.zeros(n, device=dev), torch.ones(n, device=dev)
    hv = plan.step_vector([1e-4], [(0.01, 0.9, 0.999, 1e-8)])
    monitor.add([plan.run(ws, ms, vs, t_after, t_before, hv, monitor.before(plan.index))])
    monitor.flush()
    if flush_after:
        for _ in range(flush_after):
            monitor.add([plan.run(ws, ms, vs, t_after, t_before, hv, monitor.before(plan.index))])
        with OpCounter() as counter:
            monitor.flush(measured=True)  # a log event: the chain ends on the measured norms
        return counter
    with OpCounter() as counter:  # the pass and what the monitor does with it at once
        monitor.add([plan.run(ws, ms, vs, t_after, t_before, hv, monitor.before(plan.index))])
    return counter


#: Steps between log events in the figures (the demo's and the benchmarks' ``logging_steps``)
INTERVAL = 10


def per_step(shapes, device: str = "meta", chunk: int | None = None) -> float:
    """Operations per budget step over a logging interval of :data:`INTERVAL` steps: a step's own
    and the interval's flush shared among its steps."""
    return (count_step(shapes, device, chunk=chunk).total
            + count_step(shapes, device, chunk=chunk, flush_after=INTERVAL).total / INTERVAL)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["160m", "410m", "1.4b"], choices=sorted(PYTHIA))
    args = ap.parse_args()
    print(f"| layout | tensors | of them >= 32768 elements | a step (accelerator chunks) | the log event's flush "
          f"| per step, logging every {INTERVAL} | (on a CPU) | bound 10 x big + 50 |")
    print("|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        shapes = pythia_shapes(size)
        big = big_tensors(shapes)
        print(f"| Pythia-{size} | {len(shapes)} | {big} | {count_step(shapes).total} "
              f"| {count_step(shapes, flush_after=INTERVAL).total} | {per_step(shapes):.0f} "
              f"| {per_step(shapes, 'cpu'):.0f} | {10 * big + 50} |")


if __name__ == "__main__":
    main()
