"""The planned per-step force pass (core/plan.py) against the float64 reference, against the
per-tensor path, and its kernels against each other.

Real ``torch.optim.AdamW`` steps on float32 and float64 tensors of mixed sizes (below and above the
packed-pass threshold of 32768 elements) in two parameter groups with different lr, weight decay,
betas and eps; the reference is :func:`force_budget` in float64 from a float64 copy of w_t taken
before each step and the direction :func:`adamw_direction` rebuilt from the optimizer's moments,
with the decay factor PyTorch really applies (fl32(1 - lr*wd) for float32 tensors, exact for
float64 ones).

Tolerances (stated, and why):

* align, inject, rest, align_post: 1e-6 relative per tensor (the documented bound of the
  float32 ũ of the big-tensor pass and of rebuilding w_t from the float32-rounded w_{t+1});
  1e-8 or so is what is seen.
* decay, decay_nominal: 1e-7 relative (seen: ~2e-9).  Using fl32(1 - lr*wd) for a float64 tensor,
  or the nominal factor for a float32 one, errs by ~1e-4 here.
* the float64 tensor: every column 1e-10 relative (nothing is rounded to float32 there).
* delta: 1e-13 of ||w||² (exact float64 squares; delta itself is a small difference).
* norm2: 1e-12 relative to the exact float64 squared norm of the post-step weights.
* compiled against exact: 1e-6 relative per column (seen: ~6e-9).
* planned path against the per-tensor path (record_step/record_views): 1e-12 relative (they are
  bit-identical on CPU); ``closure`` keys, a difference of much larger terms, within 1e-13 of the
  row's |align| + |inject| + |decay|.
"""

from __future__ import annotations

import copy
import gc
import math
import weakref
from array import array

import numpy as np
import pytest
import torch
from conftest import train_tiny

from hf_weightforces import WeightForcesCallback
from hf_weightforces.core import monitor as monitor_module
from hf_weightforces.core import plan as plan_module
from hf_weightforces.core.budget import (
    BUDGET_TERMS,
    adamw_direction,
    bias_scales,
    decay_factor,
    force_budget,
)
from hf_weightforces.core.health import closure_floor
from hf_weightforces.core.monitor import ForceMonitor, ParamInfo
from hf_weightforces.core.plan import StepPlan
from hf_weightforces.core.rows import Rows, moment_rows
from hf_weightforces.distributed import Backend, ShardContext
from hf_weightforces.distributed.steps import PlannedStep

COL = {name: j for j, name in enumerate(BUDGET_TERMS)}
NT = len(BUDGET_TERMS)

#: (shape, dtype, param group), listed group by group so that the optimizer's order is this order
SPECS = [
    ((64, 32), torch.float32, 0),  # 2048: the packed float64 pass
    ((200, 200), torch.float32, 0),  # 40000 >= 32768: the big-tensor pass (read in place)
    ((50, 60), torch.float64, 0),  # float64: exact decay factor
    ((300,), torch.float32, 1),
    ((70000,), torch.float32, 1),  # big
]
GROUPS = [
    {"lr": 3e-3, "weight_decay": 0.1, "betas": (0.9, 0.999), "eps": 1e-8},
    {"lr": 1e-3, "weight_decay": 0.3, "betas": (0.8, 0.95), "eps": 1e-6},
]
FLOAT64 = 2  # index of the float64 tensor in SPECS

COMPILED = pytest.param("compiled", id="compiled")


def exact_norm2(tensors) -> torch.Tensor:
    return torch.stack([(t.detach().double() ** 2).sum() for t in tensors])


class Accumulators:
    """(sums, nonfinite, norm2) of a monitor, read when indexed: ``[2]`` is its norm2 as a log event
    reads it, the weights unchanged since the last step (the open chain of pending steps computed
    and ended on the measured norms)."""

    def __init__(self, mon: ForceMonitor) -> None:
        self.mon = mon

    def __getitem__(self, i: int) -> torch.Tensor:
        if i == 2:
            self.mon.flush(measured=True)
        return (self.mon.sums, self.mon.nonfinite, self.mon.norm2)[i]


class AdamWRun:
    """Real AdamW steps on a fixed set of tensors, the inputs a StepPlan takes, and the reference."""

    def __init__(self, specs=SPECS, groups=GROUPS, seed=0):
        self.gen = torch.Generator().manual_seed(seed)
        params = [torch.nn.Parameter((torch.randn(shape, generator=self.gen, dtype=torch.float64) * 0.05).to(dtype))
                  for shape, dtype, _ in specs]
        param_groups = [dict(params=[p for p, s in zip(params, specs) if s[2] == g], **h) for g, h in enumerate(groups)]
        self.opt = torch.optim.AdamW(param_groups, foreach=False)
        self.params = [p for group in self.opt.param_groups for p in group["params"]]  # the planned order
        assert all(a is b for a, b in zip(self.params, params)), "specs must be listed group by group"
        self.group_of = [g for g, group in enumerate(self.opt.param_groups) for _ in group["params"]]
        self.n = len(self.params)
        self.monitors: dict[int, ForceMonitor] = {}

    def plan(self, kernel: str) -> StepPlan:
        return StepPlan(list(range(self.n)), self.group_of, len(self.opt.param_groups),
                        [p.dtype == torch.float64 for p in self.params], [p.numel() for p in self.params],
                        torch.device("cpu"), kernel)

    def hypers(self):
        return [(g["weight_decay"], *g["betas"], g["eps"]) for g in self.opt.param_groups]

    def accumulators(self) -> Accumulators:
        """(sums, nonfinite, norm2) of a fresh monitor (the very tensors it accumulates into), norm2
        observed now."""
        mon = ForceMonitor([ParamInfo(f"p{i}", "other", None, p.numel()) for i, p in enumerate(self.params)])
        mon.observe_norms([p.detach() for p in self.params])
        self.monitors[id(mon.sums)] = mon
        return Accumulators(mon)

    def counters(self) -> torch.Tensor:
        return torch.stack([self.opt.state.get(p, {}).get("step", torch.tensor(0.0)) for p in self.params])

    def step(self, no_grad=()):
        """One real AdamW step (tensors in ``no_grad`` get none); returns (t_before, t_after,
        float64 copies of w_t)."""
        for i, p in enumerate(self.params):
            if i in no_grad:
                p.grad = None
                continue
            noise = torch.randn(p.shape, generator=self.gen, dtype=torch.float64) * 0.01
            p.grad = (noise + 0.3 * p.detach().double()).to(p.dtype)  # partly aligned with w
        w_before = [p.detach().double().clone() for p in self.params]
        t_before = self.counters()
        self.opt.step()
        return t_before, self.counters(), w_before

    def lrs(self):
        return [g["lr"] for g in self.opt.param_groups]

    def decay_lrs(self, by: float = 0.8):
        for g in self.opt.param_groups:  # a schedule: the step vector must follow the groups' lrs
            g["lr"] *= by

    def inputs(self):
        st = [self.opt.state[p] for p in self.params]
        return ([p.detach().view(-1) for p in self.params], [s["exp_avg"].view(-1) for s in st],
                [s["exp_avg_sq"].view(-1) for s in st])

    def run(self, plan: StepPlan, t_before, t_after, acc, inputs=None) -> torch.Tensor:
        """One planned step added to the monitor of ``acc`` (its one way in); returns the step's terms
        computed alone (the monitor computes the eager pass's pending steps together at
        :meth:`flush`)."""
        hv = plan.step_vector(self.lrs(), self.hypers())
        ws, ms, vs = inputs if inputs is not None else self.inputs()
        mon = self.monitors[id(acc[0])]
        rows = plan.run(ws, ms, vs, t_after, t_before, hv, mon.before(plan.index))
        mon.add([rows])
        return rows.terms

    def flush(self) -> None:
        """Every monitor's pending steps into its sums, the weights unchanged since the last step
        (what a log event does first: the chain ends on the measured norms)."""
        for mon in self.monitors.values():
            mon.flush(measured=True)

    def reference(self, i: int, w_before: torch.Tensor) -> np.ndarray:
        """Tensor i's float64 budget row (BUDGET_TERMS) of the step just taken."""
        p, g = self.params[i], self.opt.param_groups[self.group_of[i]]
        st = self.opt.state[p]
        lr, wd = g["lr"], g["weight_decay"]
        u = adamw_direction(st["exp_avg"], st["exp_avg_sq"], float(st["step"]), *g["betas"], g["eps"])
        fb = force_budget(w_before, u, lr, wd, w_after=p.detach(), factor=decay_factor(lr, wd, p.dtype))
        align_post = -2.0 * lr * float((p.detach().double() * u).sum())
        return np.array([fb.align, fb.inject, fb.decay, fb.rest, fb.delta, 0.0,
                         -2.0 * lr * wd * fb.norm2_before, align_post])


def assert_rows_match_reference(got: np.ndarray, ref: np.ndarray, norm2: np.ndarray, float64_rows=(FLOAT64,)):
    """``got`` and ``ref`` [P, NT] (one step or sums over steps); ``norm2`` [P] sets delta's scale."""
    for i in range(len(got)):
        tight = i in float64_rows
        for name in ("align", "inject", "rest", "align_post"):
            j = COL[name]
            rel = 1e-10 if tight else 1e-6
            assert abs(got[i, j] - ref[i, j]) <= rel * abs(ref[i, j]) + 1e-300, (i, name, got[i, j], ref[i, j])
        for name in ("decay", "decay_nominal"):
            j = COL[name]
            rel = 1e-10 if tight else 1e-7
            assert abs(got[i, j] - ref[i, j]) <= rel * abs(ref[i, j]) + 1e-300, (i, name, got[i, j], ref[i, j])
        j = COL["delta"]
        assert abs(got[i, j] - ref[i, j]) <= 1e-13 * norm2[i], (i, "delta", got[i, j], ref[i, j])
        assert got[i, COL["rounding"]] == 0.0  # rebuilt from the stored weights: no rounding term


def check_compiled_really_ran(plan: StepPlan) -> None:
    assert not plan_module._COMPILE_FAILED, "torch.compile failed: the compiled tests ran the eager pass"
    assert plan._fns is not None and len(plan._fns) == len(plan.chunks)


# ---------------------------------------------------------------------------------- 1. reference
@pytest.mark.parametrize("kernel", ["exact", COMPILED])
def test_plan_matches_the_float64_reference(kernel):
    run = AdamWRun()
    plans = {kernel: run.plan(kernel)}
    if kernel != "exact":
        plans["exact"] = run.plan("exact")  # the eager reference pass on the very same steps
    acc = {k: run.accumulators() for k in plans}
    norm2_start = acc[kernel][2].clone()
    ref_sum = np.zeros((run.n, NT))
    returned = {k: torch.zeros(run.n, NT, dtype=torch.float64) for k in plans}
    for _ in range(6):
        t_before, t_after, w_before = run.step()
        assert torch.all(t_after == t_before + 1)
        ref = np.stack([run.reference(i, w_before[i]) for i in range(run.n)])
        ref_sum += ref
        for k, plan in plans.items():
            terms = run.run(plan, t_before, t_after, acc[k])
            returned[k] += terms
            # this step's rows alone, and the new squared norms (exact float64 squares)
            assert_rows_match_reference(terms.numpy(), ref, acc[k][2].numpy())
            exact = exact_norm2(run.params)
            torch.testing.assert_close(acc[k][2], exact, rtol=1e-12, atol=0)
        run.decay_lrs()
    run.flush()  # the eager pass's six steps computed together, the same as each alone
    for k in plans:
        sums, nonfinite, norm2 = acc[k][0], acc[k][1], acc[k][2]
        assert torch.all(nonfinite == 0)
        assert_rows_match_reference(sums.numpy(), ref_sum, norm2.numpy())
        # the accumulators are the sums of what each run returned
        torch.testing.assert_close(sums, returned[k], rtol=1e-13, atol=0)
        # delta telescopes: the summed delta is ||w_end||^2 - ||w_0||^2
        torch.testing.assert_close(sums[:, COL["delta"]], norm2 - norm2_start, rtol=0, atol=1e-13 * float(norm2.max()))
        # what the budget leaves out is the float32 rounding of the stored weights (zero-ish for float64)
        s = sums.numpy()
        closure = s[:, COL["delta"]] - s[:, :4].sum(1)
        scale = np.abs(s[:, :3]).sum(1)
        assert np.all(np.abs(closure) <= 1e-6 * scale), closure / scale
        assert abs(closure[FLOAT64]) <= 1e-12 * scale[FLOAT64]
    if kernel != "exact":
        check_compiled_really_ran(plans[kernel])
        got, want = acc[kernel][0].numpy(), acc["exact"][0].numpy()
        for name, j in COL.items():
            if name == "delta":
                np.testing.assert_allclose(got[:, j], want[:, j], rtol=0, atol=1e-13 * float(acc["exact"][2].max()))
            else:
                np.testing.assert_allclose(got[:, j], want[:, j], rtol=1e-6, atol=0, err_msg=name)
        torch.testing.assert_close(acc[kernel][2], acc["exact"][2], rtol=1e-12, atol=0)


# ---------------------------------------------------------------------------------- 2. mask
@pytest.mark.parametrize("kernel", ["exact", COMPILED])
def test_tensor_without_gradient_is_masked(kernel):
    run = AdamWRun()
    plan = run.plan(kernel)
    acc = run.accumulators()
    sums, nonfinite = acc[0], acc[1]
    # step -> tensors with no gradient: a packed small one and a big one, then the float64 one
    skips = {2: {0, 4}, 3: {FLOAT64}, 4: {1}}
    returned = torch.zeros_like(sums)
    for step in range(6):
        skip = skips.get(step, set())
        norm2_before = acc[2].clone()
        w_prev = [p.detach().clone() for p in run.params]
        t_before, t_after, w_before = run.step(no_grad=skip)
        terms = run.run(plan, t_before, t_after, acc)
        returned += terms
        exact = exact_norm2(run.params)
        norm2 = acc[2]
        for i in range(run.n):
            if i in skip:
                # AdamW left it alone: counter and weights; the plan adds nothing and its norm stays
                assert t_after[i] == t_before[i] and torch.equal(run.params[i].detach(), w_prev[i])
                assert torch.all(terms[i] == 0), terms[i]
                assert norm2[i] == norm2_before[i]
            else:
                assert t_after[i] == t_before[i] + 1
                # the step after a skip: delta is measured from the norm kept over the skipped step
                ref = run.reference(i, w_before[i])[None]
                assert_rows_match_reference(terms[i : i + 1].numpy(), ref, norm2[i : i + 1].numpy(),
                                            float64_rows=(0,) if i == FLOAT64 else ())
            torch.testing.assert_close(norm2[i], exact[i], rtol=1e-12, atol=0)
    run.flush()  # the six steps computed together (the eager pass) mask the same rows
    torch.testing.assert_close(sums, returned, rtol=1e-13, atol=0)
    assert torch.all(nonfinite == 0)
    counters = run.counters()
    assert counters.tolist() == [5.0, 5.0, 5.0, 6.0, 5.0]  # the skips really happened
    if kernel != "exact":
        check_compiled_really_ran(plan)


# ---------------------------------------------------------------------------------- 3. non-finite
@pytest.mark.parametrize("kernel", ["exact", COMPILED])
def test_nonfinite_row_is_flagged_and_left_out(kernel):
    run = AdamWRun()
    plan = run.plan(kernel)
    clean, bad = run.accumulators(), run.accumulators()
    broken = {0: float("nan"), 4: float("nan")}  # a packed small tensor and a big one
    first_two = torch.zeros_like(bad[0])
    for step in range(3):
        t_before, t_after, _ = run.step()
        ws, ms, vs = run.inputs()
        if step == 2:  # a copy of the moments with a NaN in two of them (the optimizer's stay clean)
            ms = [m.clone() for m in ms]
            for i, value in broken.items():
                ms[i][17] = value
        terms_clean = run.run(plan, t_before, t_after, clean)
        terms_bad = run.run(plan, t_before, t_after, bad, inputs=(ws, ms, vs))
        clean[2], bad[2]  # noqa: B018  (read as a log event reads: each step a chain of its own)
        if step < 2:
            first_two += terms_bad
    run.flush()  # the NaN row of the last step alone left out
    exact = exact_norm2(run.params)
    for i in range(run.n):
        if i in broken:
            assert not torch.isfinite(terms_bad[i]).all(), terms_bad[i]
            assert torch.equal(bad[0][i], first_two[i])  # nothing added at that step
            assert bad[1][i] == 1.0
            assert torch.isfinite(terms_clean[i]).all() and torch.any(terms_clean[i] != 0)
        else:  # the others exactly as without the NaN
            assert torch.equal(terms_bad[i], terms_clean[i])
            assert torch.equal(bad[0][i], clean[0][i])
            assert bad[1][i] == 0.0
        # the weights are finite: the new squared norm is still observed
        torch.testing.assert_close(bad[2][i], exact[i], rtol=1e-12, atol=0)
    assert torch.all(clean[1] == 0)
    assert float(bad[1].sum()) == len(broken)
    if kernel != "exact":
        check_compiled_really_ran(plan)


def test_a_chain_of_planned_steps_reads_no_norm_and_adds_up():
    """Consecutive planned steps form a chain: a step reads no squared norm (no norm, no
    index_select or index_copy_ between steps of one plan), each step's norms come from the budget
    identity, and where the chain ends on measured norms (a log event) its sums are the float64
    reference's: A and I as every step's, Δ the observed change, D and R within what the chain's
    closure moves them by; the same as a monitor read after every step (each step a chain of its
    own) but for that.  A step of another source in between ends the chain on the identity's norms
    and reads them."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.__name__)
            return func(*args, **(kwargs or {}))

    run = AdamWRun()
    plan = run.plan("exact")
    chained, read = run.accumulators(), run.accumulators()
    mon = chained.mon
    ref_sum, step_closures = np.zeros((run.n, NT)), np.zeros(run.n)
    for step in range(7):
        t_before, t_after, w_before = run.step()
        ref_sum += np.stack([run.reference(i, w_before[i]) for i in range(run.n)])
        hv, (ws, ms, vs) = plan.step_vector(run.lrs(), run.hypers()), run.inputs()
        with Ops() as ops:
            mon.add([plan.run(ws, ms, vs, t_after, t_before, hv, mon.before(plan.index))])
        if step:  # (the first step plans the pass; the fifth starts a new chain after the row below)
            index_ops = [n for n in ops.names if n.startswith(("index_select", "index_copy"))]
            assert index_ops == (["index_select.default"] if step == 4 else []), (step, index_ops)
            assert not [n for n in ops.names if "norm" in n and not n.startswith("linalg_vector_norm.out")], ops.names
        alone = run.run(plan, t_before, t_after, read).numpy()
        read[2]  # noqa: B018  (read after every step, as a log event reads: a chain of one step each)
        step_closures += np.abs(alone[:, COL["delta"]] - alone[:, :4].sum(1))
        if step == 3:  # another source's row in between: the chain ends, the next step reads what it wrote
            for m in (mon, read.mon):
                m.add([Rows([0], torch.zeros(1, NT, dtype=torch.float64), torch.tensor([123.0], dtype=torch.float64))])
            assert mon._chain is None and mon.norm2[0] == 123.0
    assert mon._chain is plan.index  # the chain of steps 5-7 is still open
    got, want = (m.unpack(m.pack().numpy()) for m in (mon, read.mon))  # a log event: measured at its end
    np.testing.assert_array_equal(got.norm2, want.norm2)
    np.testing.assert_allclose(got.norm2, exact_norm2(run.params).numpy(), rtol=1e-12, atol=0)
    others = slice(1, None)  # (tensor 0's Δ has the row's jump in it)
    norm2 = got.norm2
    assert_rows_match_reference(got.sums[others], ref_sum[others], norm2[others], float64_rows=(FLOAT64 - 1,))
    assert_rows_match_reference(want.sums[others], ref_sum[others], norm2[others], float64_rows=(FLOAT64 - 1,))
    for name in ("align", "inject", "align_post"):  # no norm in them: as every step's
        np.testing.assert_allclose(got.sums[:, COL[name]], want.sums[:, COL[name]], rtol=1e-13, atol=0)
    # the chain's closure is the steps' observed closures, each carried to the chain's end by the later
    # steps' decay factors c² = (1 - ηλ)²; its D and R use ||w_t||² off by the closure so far (D by 2ηλ x it)
    closure = [(x.sums[:, COL["delta"]] - x.sums[:, :4].sum(1))[others] for x in (got, want)]
    decay_rate = max(g["lr"] * g["weight_decay"] for g in run.opt.param_groups)  # 1 - c, the largest
    carried = 3.0 * 7 * decay_rate * step_closures[others]
    assert np.all(np.abs(closure[0] - closure[1]) <= carried + 1e-13 * norm2[others])
    assert np.all(np.abs(closure[1]) <= 1e-6 * np.abs(want.sums[others, :3]).sum(1))  # (the float32 floor)
    for name in ("decay", "rest"):
        j = COL[name]
        assert np.all(np.abs(got.sums[others, j] - want.sums[others, j])
                      <= carried + 1e-13 * np.abs(want.sums[others, j])), name


def test_a_pending_step_keeps_its_vectors_not_its_plan():
    """The monitor keeps a pending step's few vectors until the log event, not the plan that made it
    (a new plan after a state reload must not keep the old one's scratch and tensors alive); the step
    is still computed at the flush."""
    run = AdamWRun()
    plan, acc = run.plan("exact"), run.accumulators()
    t_before, t_after, w_before = run.step()
    terms = run.run(plan, t_before, t_after, acc)
    gone = weakref.ref(plan)
    del plan
    gc.collect()
    assert gone() is None
    run.flush()
    torch.testing.assert_close(acc[0], terms, rtol=0, atol=0)
    assert_rows_match_reference(acc[0].numpy(), np.stack([run.reference(i, w_before[i]) for i in range(run.n)]),
                                acc[2].numpy())


# ---------------------------------------------------------------------------------- 4. chunks
def test_compiled_chunks_equal_the_exact_pass(monkeypatch):
    monkeypatch.setattr(plan_module, "CHUNK", 2)
    # chunks 0 and 1 hold equal shapes and dtypes (one graph for both: compiling stays short);
    # chunk 1 mixes the groups; the last chunk is one big tensor (the exact pass reads it in place)
    specs = [((40, 30), torch.float32, 0), ((40, 30), torch.float32, 0), ((40, 30), torch.float32, 0),
             ((40, 30), torch.float32, 1), ((40000,), torch.float32, 1)]
    run = AdamWRun(specs)
    compiled, exact = run.plan("compiled"), run.plan("exact")
    assert [c[0] for c in compiled.chunks] == [slice(0, 2), slice(2, 4), slice(4, 5)]
    acc_c, acc_e = run.accumulators(), run.accumulators()
    ref_sum = np.zeros((run.n, NT))
    skips = {2: {1, 4}}  # masking inside two different chunks
    for step in range(5):
        t_before, t_after, w_before = run.step(no_grad=skips.get(step, ()))
        ref_sum += np.stack([run.reference(i, w_before[i]) if t_after[i] > t_before[i] else np.zeros(NT)
                             for i in range(run.n)])
        terms_c = run.run(compiled, t_before, t_after, acc_c)
        terms_e = run.run(exact, t_before, t_after, acc_e)
        # the chunks' rows come back in the planned order
        np.testing.assert_allclose(terms_c.numpy()[:, :4], terms_e.numpy()[:, :4], rtol=1e-6, atol=0)
        for i in skips.get(step, ()):
            assert torch.all(terms_c[i] == 0), (step, i, terms_c[i])
        run.decay_lrs()
    run.flush()
    check_compiled_really_ran(compiled)
    assert len(compiled._fns) == 3
    for name, j in COL.items():
        if name == "delta":
            np.testing.assert_allclose(acc_c[0][:, j], acc_e[0][:, j], rtol=0, atol=1e-13 * float(acc_e[2].max()))
        else:
            np.testing.assert_allclose(acc_c[0][:, j], acc_e[0][:, j], rtol=1e-6, atol=0, err_msg=name)
    torch.testing.assert_close(acc_c[2], acc_e[2], rtol=1e-12, atol=0)
    torch.testing.assert_close(acc_c[2], exact_norm2(run.params), rtol=1e-12, atol=0)
    assert_rows_match_reference(acc_c[0].numpy(), ref_sum, acc_c[2].numpy(), float64_rows=())


# ---------------------------------------------------------------------------------- 5. Trainer
#: row keys whose value a chain of planned steps moves (section 9 of docs/budget.md): ||w_t||² off by
#: the chain's closure so far
_CHAINED = ("decay", "rest", "closure", "closure_rel", "align_share", "inject_share", "decay_share")


def _compare_rows(planned: list[dict], per_tensor: list[dict], chained: bool = False) -> int:
    """Rows of the two paths equal (see the module docstring); returns how many values were compared.
    ``chained``: the planned rows come from chains of several steps, whose D and R use ||w_t||² from
    the budget identity, off the observed by the closure so far: each step's closure is within twice
    its float32 floor, so D moves by at most 2ηλ (= |D| / ||w||²) x 2 x floor x steps, and the
    closure, R and the shares with it; Δ telescopes to the observed change in both (rounding)."""
    assert len(planned) == len(per_tensor) > 0
    n = 0
    for a, b in zip(planned, per_tensor):
        assert a.keys() == b.keys()
        steps = a.get("weightforces/steps", 1.0) or 1.0
        for key in a:
            x, y = a[key], b[key]
            if not isinstance(x, float):
                assert x == y, key
                continue
            n += 1
            prefix, name = key.rsplit("/", 1)
            prefix += "/"
            if math.isnan(x) or math.isnan(y):
                assert math.isnan(x) and math.isnan(y), (a["step"], key, x, y)
                continue
            if chained and name in _CHAINED + ("delta",) and prefix + "norm2" in a:
                norm2, budget = b[prefix + "norm2"], sum(abs(b[prefix + t]) for t in ("align", "inject", "decay"))
                moved = 2.0 * abs(b[prefix + "decay"]) / norm2 * 2.0 * closure_floor(norm2, b[prefix + "inject"]) * steps
                tol = {"delta": 1e-14 * steps * norm2, "closure": 2 * moved + 1e-14 * steps * norm2,
                       "closure_rel": (2 * moved + 1e-14 * steps * norm2) / budget}.get(name, 2 * moved / budget)
                if name in ("decay", "rest"):
                    tol = moved
                assert abs(x - y) <= tol + 1e-12 * max(abs(x), abs(y)), (a["step"], key, x, y, tol)
            elif key.endswith("/closure"):
                scale = sum(abs(a[prefix + t]) for t in ("align", "inject", "decay"))
                assert abs(x - y) <= 1e-13 * scale, (a["step"], key, x, y)
            elif key.endswith("/closure_rel"):
                assert abs(x - y) <= 1e-13, (a["step"], key, x, y)
            else:
                assert abs(x - y) <= 1e-12 * max(abs(x), abs(y)), (a["step"], key, x, y)
    return n


@pytest.mark.parametrize(("every", "logging_steps", "kept"), [(1, 1, None), (3, 1, None), (1, 5, 2), (3, 6, None)])
def test_trainer_planned_path_equals_the_per_tensor_path(tmp_path, wf_rows, monkeypatch, every, logging_steps, kept):
    """The planned pass (its steps pending until the log event: one step a flush, several, and more
    than the monitor keeps, ``kept``; budget steps apart, each a chain ended on its measured norms
    before the flush) gives the per-tensor path's rows."""
    if kept is not None:
        monkeypatch.setattr(monitor_module, "PENDING_STEPS", kept)
    calls, pending = [], []  # the steps whose rows came from the planned pass
    rows, add = PlannedStep.rows, ForceMonitor.add

    def counting_rows(self, norm2):
        pending.append(True)
        return rows(self, norm2)

    def counting_add(self, step_rows, step_id=None):
        if pending:
            calls.append(step_id)
            pending.clear()
        return add(self, step_rows, step_id)

    monkeypatch.setattr(PlannedStep, "rows", counting_rows)
    monkeypatch.setattr(ForceMonitor, "add", counting_add)

    def train(folder):
        cb = WeightForcesCallback(every=every, kernel="exact", per_matrix=True, quiet=True)
        train_tiny(tmp_path / folder, [cb], max_steps=12, logging_steps=logging_steps)
        return wf_rows(tmp_path / folder)

    planned = train("planned")
    budget_steps = list(range(every, 13, every))
    assert calls == budget_steps[1:]  # the first budget step plans (per-tensor path), every later one is planned
    monkeypatch.setattr(ShardContext, "planned_step", lambda self, *args, **kwargs: None)
    per_tensor = train("per_tensor")
    assert len(calls) == len(budget_steps) - 1  # the per-tensor run never took the planned path
    assert [r["step"] for r in planned] == sorted({*range(logging_steps, 13, logging_steps), 12})
    # not vacuous: forces were recorded (the first step runs at lr 0 in warmup)
    with_budget = [r for r in planned if r["step"] in budget_steps[1:]]
    assert with_budget and sum(r["weightforces/steps"] for r in planned) == len(budget_steps)  # each step once
    assert all(r["weightforces/total/align"] != 0 and r["weightforces/total/decay"] < 0 for r in with_budget)
    assert _compare_rows(planned, per_tensor, chained=every == 1 and logging_steps > 1) > 1000


def test_step_vector_fast_path_equals_the_general_one():
    """The CPU step vector filled in place (float lrs) is, bit for bit, the one built from
    :func:`decay_factor` per group, through lr changes, hyper-parameter changes, a changed number of
    groups; the vector handed out stays whole one step after."""
    rng = np.random.default_rng(0)
    plan = AdamWRun().plan("exact")
    general = AdamWRun().plan("exact")
    hypers = [(0.1, 0.9, 0.999, 1e-8), (0.0, 0.8, 0.95, 1e-6)]
    last, last_lrs = None, []
    for step in range(40):
        if step in (10, 25):
            hypers = [(float(rng.uniform(0, 0.3)), 0.9, 0.98, 1e-7) for _ in range(2 if step == 10 else 3)]
        lrs = [float(x) for x in 10.0 ** rng.uniform(-7, -2, len(hypers))]
        if step % 5 == 0 and len(last_lrs) == len(hypers):
            lrs = last_lrs  # unchanged: the same vector again
        buffer = plan.step_vector(lrs, hypers)
        assert isinstance(buffer, array)  # a CPU step's vector is a plain buffer: no torch operation
        fast = torch.from_numpy(np.asarray(buffer))
        want = general.step_vector([torch.tensor(x, dtype=torch.float64) for x in lrs], hypers)
        g = len(hypers)
        assert fast.shape == (7 * g,) and torch.equal(fast, want), step
        assert [buffer[5 * g + i] for i in range(g)] == [decay_factor(x, h[0]) for x, h in zip(lrs, hypers)]
        if last is not None and last[0].numel() == fast.numel() and last[2] is not buffer:
            assert torch.equal(last[0], last[1]), "the previous vector was overwritten"
        last, last_lrs = (fast, fast.clone(), buffer), lrs


def test_host_eps_is_the_per_tensor_paths_and_the_step_vectors():
    """ε' of the planned pass on a CPU (host numbers from the step vector and the counters) is
    :func:`bias_scales`'s, as the per-tensor path computes it, bit for bit, and within two ulps
    of the device formula (:func:`per_tensor`'s row 4, what an accelerator's counters take), for
    two groups and counters that differ per tensor (one that has not moved)."""
    run = AdamWRun()
    plan = run.plan("exact")
    hypers = run.hypers()
    hv = plan.step_vector(run.lrs(), hypers)
    t = torch.tensor([3.0, 3.0, 1.0, 250.0, 3.0])
    host = plan.eps_now(hv, t)
    assert isinstance(host, list) and len(host) == run.n
    want = [bias_scales(float(tk), hypers[g][1], hypers[g][2], hypers[g][3])[1] for tk, g in zip(t, run.group_of)]
    assert host == want
    device = plan_module.per_tensor(torch.from_numpy(np.asarray(hv)), plan.gidx, plan.f64, t)[4]
    assert torch.allclose(torch.tensor(host, dtype=torch.float64), device, rtol=4 * 2.0**-53, atol=0)
    # one counter, and both groups with the same β2 and ε: one number, the same
    same = [(h[0], h[1], hypers[0][2], hypers[0][3]) for h in hypers]
    for t_all in (3.0, 250.0):
        hv = plan.step_vector(run.lrs(), same)
        one = plan.eps_now(hv, torch.full((run.n,), t_all))
        assert type(one) is float and one == bias_scales(t_all, *same[0][1:])[1]
        # a counter or a group's ε apart: one number per tensor again
        assert isinstance(plan.eps_now(hv, torch.tensor([t_all] * (run.n - 1) + [t_all + 1])), list)
        other = [same[0], (*same[1][:3], same[1][3] * 2)]
        assert isinstance(plan.eps_now(plan.step_vector(run.lrs(), other), torch.full((run.n,), t_all)), list)


# ---------------------------------------------------------------------------------- 6. re-plan
def sums_of(mon: ForceMonitor) -> np.ndarray:
    """The monitor's interval sums as a log event reads them (:meth:`ForceMonitor.pack` flushes
    the pending steps first)."""
    return mon.unpack(mon.pack().numpy()).sums


def _context_run(action_at: int | None = None, action=None, steps: int = 8, kernel: str = "exact",
                 planned: bool = True):
    """The callback's recording logic on plain torch (``_record``): ShardContext's planned step
    where it gives one, else its per-tensor views; with ``planned=False`` the per-tensor views
    always (planned_step never called).  Two runs with the same arguments take identical steps.
    ``action(run, saved)`` runs after step ``action_at``; ``saved`` is a deep copy of the
    optimizer's state dict after step 2.  Returns (which steps were planned, per step: the
    monitor's sums [P, NT], its norm2, the float64 reference [P, NT], the exact norm2)."""
    run = AdamWRun()
    ctx = ShardContext(Backend.SINGLE)
    entries = ctx.entries(None, run.opt)  # registers the step pre-hook
    assert [e.param for e in entries] == run.params
    index_of = {id(e.param): i for i, e in enumerate(entries)}
    mon = ForceMonitor([ParamInfo(e.name, "other", None, e.numel) for e in entries])
    mon.observe_norms([p.detach() for p in run.params])
    pattern, rows = [], []
    saved = None
    try:
        for step in range(1, steps + 1):
            _, _, w_before = run.step()
            step_in = ctx.planned_step(run.opt, index_of, kernel) if planned else None
            pattern.append(step_in is not None)
            if step_in is not None:
                mon.add([step_in.rows(mon)], step)
            else:
                mon.add(moment_rows(ctx.views(run.opt, index_of), mon.norm2), step)
            assert mon.steps == 1
            ref = np.stack([run.reference(i, w_before[i]) for i in range(run.n)])
            rows.append((sums_of(mon), mon.norm2.clone(), ref, exact_norm2(run.params)))
            mon.reset()
            run.decay_lrs(0.9)
            if step == 2:
                saved = copy.deepcopy(run.opt.state_dict())
            if step == action_at:
                action(run, saved)
    finally:
        ctx.close()
    return pattern, rows


def test_counters_before_a_step_after_steps_the_budget_skipped():
    """The pre-hook takes the counters stacked after the last planned step as the next step's
    "before" only while no other step ran: a tensor updated at a step the budget skipped and not
    at the next budget step is not counted there (its row zero, its norm observed again: the same
    weights' squared norm)."""
    run = AdamWRun()
    ctx = ShardContext(Backend.SINGLE)
    entries = ctx.entries(None, run.opt)  # registers the step pre-hook
    index_of = {id(e.param): i for i, e in enumerate(entries)}
    mon = ForceMonitor([ParamInfo(e.name, "other", None, e.numel) for e in entries])
    mon.observe_norms([p.detach() for p in run.params])
    try:
        # budget at steps 1, 2, 3 (planned from 2; 3 reuses 2's counters), none at 4, budget at 5
        pattern = []
        for step, no_grad in ((1, ()), (2, ()), (3, (0,)), (4, ()), (5, (0,))):
            _, _, w_before = run.step(no_grad=no_grad)
            if step == 4:  # the callback observes the norms before the next budget step
                mon.observe_norms([p.detach() for p in run.params])
                continue
            planned = ctx.planned_step(run.opt, index_of, "exact")
            pattern.append(planned is not None)
            if planned is None:
                mon.add(moment_rows(ctx.views(run.opt, index_of), mon.norm2), step)
                mon.reset()
                continue
            norm0 = mon.norm2[0].item()
            mon.add([planned.rows(mon)], step)
            ref = np.stack([run.reference(i, w_before[i]) for i in range(run.n)])
            rows = slice(1 if no_grad else 0, None)
            if no_grad:  # tensor 0 was not updated by this step (at step 5: it was by step 4)
                assert np.all(sums_of(mon)[0] == 0), step
                assert mon.norm2[0].item() == pytest.approx(norm0, rel=1e-14, abs=0), step
            assert_rows_match_reference(sums_of(mon)[rows], ref[rows], mon.norm2.numpy()[rows],
                                        float64_rows=(FLOAT64 - rows.start,))
            mon.reset()
        assert pattern == [False, True, True, True]
    finally:
        ctx.close()


REPLACEMENTS = {
    "reload": lambda run, saved: run.opt.load_state_dict(run.opt.state_dict()),
    # new moment tensors: a plan that kept the old ones would read moments no longer updated
    "reload_copy": lambda run, saved: run.opt.load_state_dict(copy.deepcopy(run.opt.state_dict())),
    "rewind": lambda run, saved: run.opt.load_state_dict(saved),  # counters go back from 4 to 2
    "new_moment": lambda run, saved: run.opt.state[run.params[1]].__setitem__(
        "exp_avg", run.opt.state[run.params[1]]["exp_avg"].clone()),
    "new_second_moment": lambda run, saved: run.opt.state[run.params[2]].__setitem__(
        "exp_avg_sq", run.opt.state[run.params[2]]["exp_avg_sq"].clone()),
    "new_counter": lambda run, saved: run.opt.state[run.params[4]].__setitem__(
        "step", run.opt.state[run.params[4]]["step"].clone()),
    "new_weight": lambda run, saved: setattr(run.params[3], "data", run.params[3].data.clone()),
    # hyper-parameters a schedule moves come with each step: the plan holds, the numbers follow
    "new_weight_decay": lambda run, saved: run.opt.param_groups[1].__setitem__("weight_decay", 0.2),
    "new_betas": lambda run, saved: run.opt.param_groups[0].__setitem__("betas", (0.85, 0.99)),
    "new_eps": lambda run, saved: run.opt.param_groups[1].__setitem__("eps", 1e-6),
}
#: replacements the plan takes in its stride (no new plan)
MOVED = {"new_weight_decay", "new_betas", "new_eps"}


@pytest.mark.parametrize("what", sorted(REPLACEMENTS))
def test_replaced_state_is_planned_again(what):
    pattern, rows = _context_run(4, REPLACEMENTS[what])
    # step 1 plans (per-tensor path), step 5 sees the replacement and plans again, the others are planned
    if what in MOVED:
        assert pattern == [False, True, True, True, True, True, True, True]
    else:
        assert pattern == [False, True, True, True, False, True, True, True]
    per_pattern, per_tensor = _context_run(4, REPLACEMENTS[what], planned=False)
    assert not any(per_pattern)
    for step, ((sums, norm2, ref, exact), (sums_v, norm2_v, ref_v, _)) in enumerate(zip(rows, per_tensor), 1):
        np.testing.assert_array_equal(ref, ref_v)  # the two runs took the same steps
        np.testing.assert_allclose(sums, sums_v, rtol=1e-12, atol=0, err_msg=f"step {step}")
        torch.testing.assert_close(norm2, norm2_v, rtol=1e-12, atol=0)
        torch.testing.assert_close(norm2, exact, rtol=1e-12, atol=0)
        assert_rows_match_reference(sums, ref, norm2.numpy())
        assert np.all(sums[:, COL["inject"]] > 0)  # every tensor counted at every step


RESETS = {
    "state_of_one_tensor": lambda run, saved: run.opt.state.__setitem__(run.params[0], {}),
    "state_of_one_tensor_deleted": lambda run, saved: run.opt.state.pop(run.params[0]),
    "state_cleared": lambda run, saved: run.opt.state.clear(),
}
#: the tensors whose state was reset
RESET = {"state_of_one_tensor": [0], "state_of_one_tensor_deleted": [0], "state_cleared": list(range(len(SPECS)))}


@pytest.mark.parametrize("what", sorted(RESETS))
def test_planned_path_follows_a_reset_optimizer_state(what):
    """A tensor whose state was reset (optimizer.state[p] = {}, del, clear()) is planned again: the
    plan checks optimizer.state[p] itself, not only the dict it saw at planning time."""
    _, rows = _context_run(4, RESETS[what], steps=9)
    # from the second step after the reset on (steps 6-9), every tensor's forces are the reference's
    # again; delta is left out: where step 5 was dropped (the test below) step 6's delta spans two steps
    for step, (sums, norm2, ref, exact) in list(enumerate(rows, 1))[5:]:
        for i in range(len(SPECS)):
            for name in ("align", "inject", "decay", "rest"):
                j = COL[name]
                assert abs(sums[i, j] - ref[i, j]) <= 1e-6 * abs(ref[i, j]) + 1e-300, \
                    (step, i, name, sums[i, j], ref[i, j])
        torch.testing.assert_close(norm2, exact, rtol=1e-12, atol=0)


@pytest.mark.parametrize("what", sorted(RESETS))
def test_per_tensor_path_counts_the_first_step_after_a_reset(what):
    """The pre-hook forgets the counter of a tensor with no state, so the first step after a reset
    (the re-created counter is 1 again) counts."""
    _, rows = _context_run(4, RESETS[what], steps=6, planned=False)
    sums, norm2, ref, exact = rows[4]  # step 5: AdamW re-created the state and stepped
    for i in RESET[what]:
        assert_rows_match_reference(sums[i : i + 1], ref[i : i + 1], norm2[i : i + 1].numpy(),
                                    float64_rows=(0,) if i == FLOAT64 else ())
    torch.testing.assert_close(norm2, exact, rtol=1e-12, atol=0)


