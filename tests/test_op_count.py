"""What one budget step dispatches, counted at the dispatcher, and what it allocates.

The bound of issue 20: at most 10 operations per tensor of 32,768 elements or more, plus 50 for
everything else; Pythia layouts on the meta device (no memory, the accelerator chunk size, see
``benchmarks/op_count.py``), the Pythia-160M layout at the CPU chunk size, and a real Trainer step
of the 4 x 256 GPT-NeoX on CPU.  A step's budget terms are computed at the log event for all the
steps since the last one (the monitor's flush): its operations are counted too, shared among the
interval's steps.  The counts fail if a per-tensor or per-chunk operation creeps back in.
"""

from __future__ import annotations

import sys
from pathlib import Path

import psutil
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hf_weightforces.core import kernels
from hf_weightforces.core.kernels import CHUNK_ACCEL, CHUNK_CPU, NORM_PIECE_CPU, ROW, SMALL, BlockPass, _pieces

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from op_count import INTERVAL, OpCounter, big_tensors, count_step, pythia_shapes  # noqa: E402

#: operations of a step that do not depend on the tensor count (ε' per tensor, the packed small
#: tensors, the chunks' rows summed per tensor and their multi-tensor norm, the new squared norms):
#: on a device 24 with small tensors only, 42 with big ones, today; on a CPU (ε' from the host
#: counters) 16 and 35
FIXED = 50
#: operations of a chunk: six, seven on a CPU (its square root is two: kernels.root)
PER_CHUNK = {"meta": 6, "cpu": 7}
#: operations of the log event's flush (the budget of the interval's steps on [steps, P] tensors,
#: the chain's squared norms from the budget identity, the measured norms at its end, the masks,
#: the accumulation), whatever the steps and tensors: 97 on a device today (a tenth of it a step)
FLUSH = 100


def chunks(shapes, chunk: int) -> int:
    return sum(len(_pieces(torch.Size(s).numel(), chunk)) for s in shapes if torch.Size(s).numel() >= SMALL)


@pytest.mark.parametrize(("size", "device"), [("160m", "meta"), ("1.4b", "meta"), ("160m", "cpu")])
def test_pythia_layout_step_is_bounded(size, device):
    """The accelerator's pass (meta tensors, its chunks), and the CPU's at the 160M layout (its
    chunks, ε' from host counters, its square root; over zero pages: no memory)."""
    shapes = pythia_shapes(size)
    counter = count_step(shapes, device)
    n_chunks = chunks(shapes, CHUNK_ACCEL if device == "meta" else CHUNK_CPU)
    assert counter.ops["sum"] == n_chunks + 1  # one row sum per chunk and one for the packed small tensors
    assert counter.total - PER_CHUNK[device] * n_chunks <= FIXED, counter.ops
    # the flush shared among the interval's steps (the same for every layout: tested below)
    ops = counter.total + count_step([(64,), (300,)], device, flush_after=2).total / INTERVAL
    assert ops <= 10 * big_tensors(shapes) + 50, (ops, big_tensors(shapes))


@pytest.mark.parametrize("device", ["meta", "cpu"])
def test_small_tensors_cost_the_same_however_many(device):
    few = count_step([(64,), (300,)], device).total
    many = count_step([(64,), (300,)] * 200 + [(5, 7)] * 50, device).total
    assert few == many <= FIXED


def test_flush_costs_the_same_however_many_steps_and_tensors():
    """The log event computes the interval's budget in a fixed number of operations."""
    few = count_step([(64,), (300,)], flush_after=2).total
    many = count_step([(64,), (300,)] * 200 + [(5, 7)] * 50 + [(40_000,)] * 3, flush_after=INTERVAL * 3).total
    assert few == many <= FLUSH


class Allocations(TorchDispatchMode):
    """The largest tensor any operation allocates (outputs that are not views of, or written into,
    an input)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {id(t.untyped_storage()) for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and id(t.untyped_storage()) not in inputs:
                self.largest = max(self.largest, t.numel())
        return out


def test_temporary_memory_is_the_planned_scratch():
    """Memory: one float32 scratch buffer of one chunk, made at planning; a step allocates nothing
    larger than a few values per row (rows of up to 1024 elements; here the big tensor has 3 about
    equal chunks, the last in rows of 256), and the float64 norm reads pieces of at most
    NORM_PIECE_CPU elements (ATen widens each to float64 in a temporary of its own: 2 MiB)."""
    n = 2 * CHUNK_CPU + 12_345 * 256 - 2**20
    ws, ms, vs = ([torch.randn(n) * 1e-3] for _ in range(3))
    vs = [v.abs() for v in vs]
    block = BlockPass(ws, ms, vs)
    assert len(block._steps) == 3
    scratch = {id(step[3].untyped_storage()) for step in block._steps}
    assert len(scratch) == 1
    longest = max(step[3].numel() for step in block._steps)
    assert longest <= CHUNK_CPU and block._steps[0][3].untyped_storage().nbytes() == 4 * longest
    pieces = block.measure._pieces  # the float64 norm's (squared_norms)
    assert max(w.numel() for w in pieces) <= NORM_PIECE_CPU and sum(w.numel() for w in pieces) == n
    eps = torch.full((1,), 1e-8, dtype=torch.float64)
    block.run(eps)
    with Allocations() as seen:
        block.run(eps)
    assert seen.largest <= n // 256  # the rows' float64 sums, never a chunk-sized temporary


@pytest.mark.parametrize("n", [SMALL, 3 * CHUNK_CPU, 3 * CHUNK_CPU + 1, 7 * CHUNK_CPU // 2 + 3, 50_257 * 768, 65_537])
def test_pieces_cover_the_tensor_in_about_equal_rowed_chunks(n):
    """Chunks tile the tensor, none over the chunk size, starts on rows of 1024, each viewable as
    rows of at most 1024 (an odd size's tail in a row of its own, never rows of one element)."""
    pieces = _pieces(n, CHUNK_CPU)
    assert pieces[0][0] == 0 and pieces[-1][1] == n
    assert all(b == a2 for (_, b, _), (a2, _, _) in zip(pieces, pieces[1:]))
    assert all(b - a <= CHUNK_CPU and (b - a) % r == 0 and r <= ROW for a, b, r in pieces)
    assert all(a % ROW == 0 for a, _, _ in pieces)
    assert all(r >= 64 or b - a < ROW for a, b, r in pieces)
    big = [b - a for a, b, _ in pieces if b - a >= ROW]
    assert max(big) - min(big) <= len(pieces) * ROW  # starts rounded up to rows: the last is a little shorter


def test_one_thread_inside_the_pass_and_restored(monkeypatch):
    """On a CPU the chunk operations run on one intra-op thread (no parallel region to stall when
    threads outnumber free cores); torch's setting is back afterwards, also after an error."""
    threads = torch.get_num_threads()
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    seen = []
    real_set = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda k: (seen.append(k), real_set(min(k, threads))))
    ws, ms, vs = [torch.randn(SMALL * 2)], [torch.randn(SMALL * 2)], [torch.rand(SMALL * 2)]
    BlockPass(ws, ms, vs).run(torch.zeros(1, dtype=torch.float64))
    assert seen == [1, 4, 1, 4]  # the chunks, then the float64 norms (squared_norms)
    seen.clear()
    with pytest.raises(RuntimeError):
        with kernels.one_thread(torch.device("cpu")):
            raise RuntimeError("inside the pass")
    assert seen == [1, 4]


@pytest.mark.slow
def test_trainer_step_of_the_4x256_model_is_bounded(tmp_path):
    """A real Trainer run: the operations inside the callback's hooks (the log events' included) and
    its optimizer pre-hook per budget step over two logging intervals, after the plan is made; one
    pass planned for the whole run; no other process during or after the run."""
    from transformers import GPTNeoXForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from hf_weightforces import WeightForcesCallback
    from hf_weightforces.demo import make_datasets, pythia_config
    from hf_weightforces.distributed import _StepRecorder

    counts: list[int] = []
    children: list[int] = []
    state = {"on": False}

    def counted(fn):
        def wrapper(*args, **kwargs):
            if not state["on"]:
                return fn(*args, **kwargs)
            with OpCounter() as c:
                try:
                    return fn(*args, **kwargs)
                finally:
                    counts[-1] += c.total
        return wrapper

    class Counted(WeightForcesCallback):
        pass

    for name in ("on_step_begin", "on_pre_optimizer_step", "on_optimizer_step", "on_step_end", "on_substep_end",
                 "on_log"):
        setattr(Counted, name, counted(getattr(WeightForcesCallback, name)))

    class Gate(TrainerCallback):
        def on_step_begin(self, args, state_, control, **kwargs):
            state["on"] = state_.global_step >= 3  # planned at the second budget step
            counts.append(0)
            children.extend(p.pid for p in psutil.Process().children(recursive=True))

    pre_hook = _StepRecorder._record
    _StepRecorder._record = counted(pre_hook)
    passes = []
    plan_pass = BlockPass.__init__
    BlockPass.__init__ = lambda self, *a, **k: (passes.append(1), plan_pass(self, *a, **k))[1]
    try:
        torch.manual_seed(0)
        model = GPTNeoXForCausalLM(pythia_config("bench"))
        data = make_datasets(block_size=32, max_bytes=200_000, eval_fraction=0.01)[0]
        targs = TrainingArguments(output_dir=str(tmp_path), max_steps=9, per_device_train_batch_size=2,
                                  learning_rate=1e-3, weight_decay=0.1, logging_steps=3, report_to=[],
                                  save_strategy="no", disable_tqdm=True, use_cpu=True, seed=0)
        trainer = Trainer(model=model, args=targs, train_dataset=data,
                          callbacks=[Gate(), Counted(every=1, weibull_every=0, quiet=True)])
        trainer.train()
    finally:
        _StepRecorder._record = pre_hook
        BlockPass.__init__ = plan_pass
    # one pass for the run: the first budget step's per-tensor pass is the planned steps' (same memory)
    assert len(passes) == 1
    big = sum(1 for p in model.parameters() if p.numel() >= SMALL)
    assert big == 18
    steps = counts[3:]  # steps 4-9: two logging intervals, each with its log event
    assert len(steps) == 6 and all(steps) and sum(steps) / len(steps) <= 10 * big + 50, steps
    assert not children and not psutil.Process().children(recursive=True)


def test_per_tensor_pass_is_planned_once_for_the_same_memory():
    """``step_dots`` keeps the pass of tensors it saw (a sharded backend hands the same local views
    every step): the second call plans nothing and reads the current values; tensors that are not
    contiguous (flattening copies them) get a fresh pass, never a stale copy."""
    from hf_weightforces.core.kernels import step_dots

    w, m, v = [torch.randn(SMALL * 2), torch.randn(300)], [torch.randn(SMALL * 2), torch.randn(300)], \
        [torch.rand(SMALL * 2), torch.rand(300)]
    first = step_dots(w, m, v, [1e-8, 1e-8])
    with Allocations() as seen:
        w[0].mul_(2.0)
        again = step_dots(w, m, v, [1e-8, 1e-8])
    assert seen.largest < SMALL  # no scratch made again
    assert float(again[0, 0]) == pytest.approx(4 * float(first[0, 0]), rel=1e-12)  # the new values, exact squares
    wt = torch.randn(300, 200).t()
    m2, v2 = torch.randn(200, 300), torch.rand(200, 300)
    before = step_dots([wt], [m2], [v2], [1e-8])
    wt.mul_(2.0)
    assert float(step_dots([wt], [m2], [v2], [1e-8])[0, 0]) == pytest.approx(4 * float(before[0, 0]), rel=1e-12)
