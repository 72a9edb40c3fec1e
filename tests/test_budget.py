"""The force budget against a hand-written AdamW step, in float64, for every implementation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from float_bounds import U32, abs_sum, sum_tol

from hf_weightforces.core import monitor as monitor_module
from hf_weightforces.core.budget import (
    BUDGET_TERMS,
    adamw_direction,
    bias_scales,
    budget_from_dots,
    decay_factor,
    force_budget,
    step_dots,
)
from hf_weightforces.core.kernels import ROW, SMALL, BlockPass, root
from hf_weightforces.core.monitor import ForceMonitor, ParamInfo
from hf_weightforces.core.optim import UnsupportedOptimizerError, check_supported
from hf_weightforces.core.rows import Pending, Rows, tensor_rows

SMALL_TEST = SMALL + 1000  # a big tensor: read chunk by chunk


def hand_adamw(w, g, m, v, t, lr, wd, b1, b2, eps):
    """One AdamW step written out from docs/budget.md, float64."""
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    u = (m / (1 - b1**t)) / (torch.sqrt(v / (1 - b2**t)) + eps)
    return (1 - lr * wd) * w - lr * u, m, v, u


@pytest.mark.parametrize("lr,wd", [(1e-3, 0.1), (3e-2, 0.0), (1e-4, 0.5)])
def test_identity_exact_in_float64(lr, wd):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(300, generator=gen, dtype=torch.float64) * 0.02
    m = torch.zeros_like(w)
    v = torch.zeros_like(w)
    for t in range(1, 6):
        g = torch.randn(300, generator=gen, dtype=torch.float64) * 0.01 + 0.3 * w
        w_next, m, v, u = hand_adamw(w, g, m, v, t, lr, wd, 0.9, 0.999, 1e-8)
        fb = force_budget(w, u, lr, wd, w_after=w_next)
        # closure = Δ - (A + I + D + R) from float64 sums of n = 300 terms (squares and products rounded once),
        # w_next carrying 3 roundings a coordinate (x2 in its square): Higham, 2·(n + 7)·2^-53·Σ|terms|
        terms = fb.norm2_before + fb.norm2_after + abs(fb.align) + abs(fb.inject) + abs(fb.decay) + abs(fb.rest)
        assert fb.closure == pytest.approx(0.0, abs=sum_tol(w.numel(), terms, ulps_per_term=7))
        # direction from the stored moments equals the one the step used
        torch.testing.assert_close(adamw_direction(m, v, t, 0.9, 0.999, 1e-8), u, rtol=1e-14, atol=0)
        # signs: injection >= 0, decay <= 0
        assert fb.inject >= 0 and fb.decay <= 0
        w = w_next


def test_closure_catches_a_wrong_lr():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(1000, generator=gen, dtype=torch.float64) * 0.02
    g = torch.randn(1000, generator=gen, dtype=torch.float64) * 0.01
    w_next, m, v, u = hand_adamw(w, g, torch.zeros_like(w), torch.zeros_like(w), 1, 1e-3, 0.1, 0.9, 0.999, 1e-8)
    right = force_budget(w, u, 1e-3, 0.1, w_after=w_next)
    wrong = force_budget(w, u, 1.1e-3, 0.1, w_after=w_next)
    scale = abs(right.align) + abs(right.inject) + abs(right.decay)
    # the right lr closes to float64 summation of n = 1000 terms: Higham, 2·(n + 7)·2^-53·Σ|terms| (~1e-13
    # of ||w||², ~1e-9 of this one-step budget); the wrong one leaves 10% of A + I: 1e-2 of the budget
    terms = right.norm2_before + right.norm2_after + scale + abs(right.rest)
    assert abs(right.closure) <= sum_tol(w.numel(), terms, ulps_per_term=7) < 1e-6 * scale
    assert abs(wrong.closure) > 1e-2 * scale


@pytest.mark.parametrize(("chunk", "shared"), [(None, False), (4096, False), (None, True)])
def test_step_dots_against_float64_reference(chunk, shared):
    """Packed small tensors (whole rows and padded), big ones in one chunk or several (``chunk``
    4096: about equal chunks), in rows of 1024, of an odd divisor (771) and a prime size's tail;
    ε' as host numbers (one per tensor, or one ``shared`` by all: added as one number) or as a
    tensor."""
    gen = torch.Generator().manual_seed(2)
    # (64, 32) and (128,) are packed in whole rows, (7, 5, 3) and (1,) padded; the rest take the chunked (big)
    # path: 300 x 300 in rows of 1024 (of 400 with 4096-element chunks), 129 x 257 in rows of 771, 32771
    # (a prime) as 32768 in rows of 1024 and a 3-element tail
    shapes = [(64, 32), (128,), (7, 5, 3), (1,), (300, 300), (129, 257), (32771,)]
    ws = [torch.randn(s, generator=gen) * 0.05 for s in shapes]
    ms = [torch.randn(s, generator=gen) * 1e-3 for s in shapes]
    vs = [torch.rand(s, generator=gen) * 1e-6 for s in shapes]
    eps = [1e-8] * len(shapes) if shared else [1e-8 * 0.3, 1e-8, 0.0, 1e-6, 1e-8, 1e-8, 2e-8]
    if chunk is None:
        got = step_dots(ws, ms, vs, eps)
    else:
        block = BlockPass(ws, ms, vs, chunk=chunk)
        assert len(block._steps) > 3 * len(shapes)  # several chunks a big tensor
        got = block.run(torch.tensor(eps, dtype=torch.float64))
    for i, (w, m, v, e) in enumerate(zip(ws, ms, vs, eps)):
        w64, u = w.double(), m.double() / (v.double().sqrt() + e)
        ref = torch.stack([(w64 * w64).sum(), (w64 * u).sum(), (u * u).sum()])
        n, a, c, wu = w.numel(), float(ref[0]), float(ref[2]), abs_sum(w64, u)
        # The reference: ũ 3 roundings a coordinate (sqrt, +, /), a product 1, then a float64 sum of n terms;
        # the pass the same sums in another order. Higham: sum_tol covers both, with the per-term roundings.
        # Packed small tensors (rows of 64) and big ones (rows of up to ROW) alike: ||w'||² exact squares
        # summed in float64 (a norm, then squared). ũ in float32: the root within 2.5·2^-24 (on a CPU 1/rsqrt:
        # rsqrt within 1.5, its reciprocal 1; torch.sqrt within 1.5 there: kernels.root), ε' to float32 (1), then
        # + and / (1 each): 5.5·2^-24, so 6 of each term of <w', ũ> and 12 of each of ||ũ||²; then a float32
        # product (1) or square (1), float32 sums of rows of up to ROW terms (Higham: (ROW - 1)·2^-24·Σ|x_i|; a
        # row norm is also rooted and squared again: 2), the rows summed in float64.
        tol = [sum_tol(n, a, ulps_per_term=3),
               sum_tol(n, wu, ulps_per_term=6) + (6 + 1 + ROW) * U32 * wu,
               sum_tol(n, c, ulps_per_term=12) + (12 + 1 + 2 + ROW) * U32 * c]
        for k in range(3):
            assert abs(float(got[i, k]) - float(ref[k])) <= tol[k], (i, k, float(got[i, k]), float(ref[k]), tol[k])
    # ||w'||²: exact float64 squares of float32 values summed in float64, in two orders, the norm rooted and
    # squared again: 2·(n + 3)·2^-53 relative (Higham)
    ref_a = torch.stack([(w.double() ** 2).sum() for w in ws])
    for w, g, r in zip(ws, got[:, 0].tolist(), ref_a.tolist()):
        assert g == pytest.approx(r, rel=sum_tol(w.numel(), 1.0, ulps_per_term=3), abs=0)


def test_root_is_the_square_root_within_its_stated_error():
    """kernels.root (1/rsqrt on a CPU) against the float64 square root over every float32 binade,
    denormals included: within 2.5·2^-24 relative, the bound the pass's tolerances take; 0, -0,
    inf and nan as sqrt gives them; in place as into another buffer."""
    gen = torch.Generator().manual_seed(7)
    exps = torch.arange(-149, 128, dtype=torch.float64)
    x = ((1 + torch.rand(len(exps), 4096, generator=gen, dtype=torch.float64)) * 2.0 ** exps[:, None]).float()
    x = x[torch.isfinite(x) & (x > 0)]
    got = root(x, torch.empty_like(x)).double()
    want = x.double().sqrt()
    assert ((got - want).abs() / want).max() <= 2.5 * U32
    special = torch.tensor([0.0, -0.0, float("inf"), float("nan")])
    out, again = root(special, torch.empty(4)), special.clone()
    for r in (out, root(again, again)):
        assert r[0] == 0 and not torch.signbit(r[0]) and r[1] == 0 and torch.signbit(r[1])
        assert r[2] == float("inf") and torch.isnan(r[3])
    inplace = x.clone()
    assert torch.equal(root(inplace, inplace), got.float())


@pytest.mark.parametrize("shared", [True, False])
def test_pass_takes_eps_as_numbers_or_as_a_tensor_alike(shared):
    """ε' as host numbers (the planned pass on a CPU, the per-tensor path) and as a float64 tensor (an
    accelerator's counters) give the same sums, bit for bit: one number added to a float32 buffer is
    rounded to float32 as the tensor is.  Small tensors in float32, in float64 (their own pack) and in
    bfloat16 (widened by the packing copy), and a big one."""
    gen = torch.Generator().manual_seed(5)
    dtypes = [torch.float32, torch.float64, torch.bfloat16, torch.float32, torch.float32]
    shapes = [(96,), (40, 3), (200,), (7,), (SMALL_TEST,)]
    ws = [(torch.randn(s, generator=gen) * 0.05).to(d) for s, d in zip(shapes, dtypes)]
    ms = [(torch.randn(s, generator=gen) * 1e-3).to(torch.float64 if d == torch.float64 else torch.float32)
          for s, d in zip(shapes, dtypes)]
    # sqrt(v) about ε': a change of ε' in its last bits moves ũ in float32
    vs = [(torch.rand(s, generator=gen) * 1e-16).to(m.dtype) for s, m in zip(shapes, ms)]
    eps = [3.3e-9] * len(shapes) if shared else [3.3e-9, 1e-8 / 3, 0.0, 7e-7, 2e-8 / 7]
    block = BlockPass(ws, ms, vs)
    assert len(block._small) == 2 and block._steps  # a float32 pack, a float64 one, a big tensor
    as_numbers = block.run(eps)
    as_tensor = block.run(torch.tensor(eps, dtype=torch.float64))
    assert torch.equal(as_numbers, as_tensor)
    if shared:  # one number for every tensor (the planned pass's usual step)
        assert torch.equal(block.run(eps[0]), as_numbers)
    assert torch.equal(as_numbers, step_dots(ws, ms, vs, eps))


def test_budget_from_dots_equals_reference_budget():
    gen = torch.Generator().manual_seed(3)
    lr, wd, b1, b2, eps, t = 2e-3, 0.1, 0.9, 0.95, 1e-8, 7
    w_prev = torch.randn(500, generator=gen, dtype=torch.float64) * 0.02
    m = torch.randn(500, generator=gen, dtype=torch.float64) * 1e-3
    v = torch.rand(500, generator=gen, dtype=torch.float64) * 1e-6
    u = adamw_direction(m, v, t, b1, b2, eps)
    w_next = (1 - lr * wd) * w_prev - lr * u
    s, e = bias_scales(t, b1, b2, eps)
    ut = m / (v.sqrt() + e)
    dots = torch.stack([(w_next * w_next).sum(), (w_next * ut).sum(), (ut * ut).sum()])[None]
    one = lambda x: torch.tensor([x], dtype=torch.float64)  # noqa: E731
    terms = budget_from_dots(dots, one(lr), one(wd), one(s), one(float((w_prev * w_prev).sum())))[0]
    ref = force_budget(w_prev, u, lr, wd, w_after=w_next)
    for got, want in zip(terms.tolist(), [ref.align, ref.inject, ref.decay, ref.rest, ref.delta, 0.0, ref.decay,
                                          -2 * lr * float((w_next * u).sum())]):
        assert got == pytest.approx(want, rel=1e-10, abs=1e-18)


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))


OPTIMIZERS = {
    "adamw-forloop": lambda ps: torch.optim.AdamW(ps, lr=3e-3, weight_decay=0.1, foreach=False),
    "adamw-foreach": lambda ps: torch.optim.AdamW(ps, lr=3e-3, weight_decay=0.1, foreach=True),
    "adamw-fused": lambda ps: torch.optim.AdamW(ps, lr=3e-3, weight_decay=0.1, fused=True),
    "adamw-amsgrad": lambda ps: torch.optim.AdamW(ps, lr=3e-3, weight_decay=0.1, amsgrad=True),
    "adamw-maximize": lambda ps: torch.optim.AdamW(ps, lr=3e-3, weight_decay=0.1, maximize=True),
    "adamw-tensor-lr": lambda ps: torch.optim.AdamW(ps, lr=torch.tensor(3e-3), weight_decay=0.1),
    "adam-decoupled": lambda ps: torch.optim.Adam(ps, lr=3e-3, weight_decay=0.1, decoupled_weight_decay=True),
    "adam-no-decay": lambda ps: torch.optim.Adam(ps, lr=3e-3),
    "two-groups": lambda ps: torch.optim.AdamW(
        [{"params": ps[:2], "lr": 5e-3, "weight_decay": 0.2}, {"params": ps[2:], "lr": 1e-3, "weight_decay": 0.0}]
    ),
}


def _run_monitored(make_opt, steps=6, lr_scale=1.0):
    """Train a small net; monitor every step; return per-step monitor sums and reference budgets."""
    model = _model()
    params = list(model.parameters())
    opt = make_opt(params)
    infos = [ParamInfo(f"p{i}", "other", None, p.numel()) for i, p in enumerate(params)]
    mon = ForceMonitor(infos)
    gen = torch.Generator().manual_seed(5)
    x, y = torch.randn(64, 16, generator=gen), torch.randn(64, 4, generator=gen)
    got, ref = [], []
    for _ in range(steps):
        w_before = [p.detach().double().clone() for p in params]  # the test may copy; the monitor does not
        mon.observe_norms([p.detach() for p in params])
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        idx, views = [], []
        for group in opt.param_groups:
            b1, b2 = group["betas"]
            lr = float(group["lr"]) * lr_scale
            for p in group["params"]:
                st = opt.state[p]
                second = st["max_exp_avg_sq"] if group["amsgrad"] else st["exp_avg_sq"]
                idx.append(next(i for i, q in enumerate(params) if q is p))
                views.append((p.detach(), st["exp_avg"], second, st["step"], lr, group["weight_decay"], (b1, b2), group["eps"]))
        mon.add([tensor_rows(idx, *map(list, zip(*views)), mon.norm2)])
        sums = mon.unpack(mon.pack().numpy()).sums
        got.append(sums.copy())
        mon.reset()
        step_ref = []
        for i, p in enumerate(params):
            group = next(g for g in opt.param_groups if any(q is p for q in g["params"]))
            b1, b2 = group["betas"]
            st = opt.state[p]
            second = st["max_exp_avg_sq"] if group["amsgrad"] else st["exp_avg_sq"]
            u = adamw_direction(st["exp_avg"], second, float(st["step"]), b1, b2, group["eps"])
            c = decay_factor(float(group["lr"]), group["weight_decay"])  # what the kernel multiplies by
            fb = force_budget(w_before[i], u, float(group["lr"]), group["weight_decay"], w_after=p.detach(), factor=c)
            step_ref.append([fb.align, fb.inject, fb.decay, fb.rest, fb.delta])
        ref.append(np.array(step_ref))
    return np.array(got), np.array(ref)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_optimizer_implementation(name):
    got, ref = _run_monitored(OPTIMIZERS[name])
    scale = np.abs(ref[..., :3]).sum(-1, keepdims=True)
    # each term matches the float64 reference built from a saved copy of w_t
    np.testing.assert_allclose(got[..., :5] / scale, ref / scale, atol=5e-5)
    assert np.all(got[..., 5] == 0)  # float32 weights: no rounding term, the closure holds it
    closure = got[..., 4] - got[..., :4].sum(-1)
    assert np.all(np.abs(closure) <= 5e-4 * scale[..., 0]), np.abs(closure / scale[..., 0]).max()


def test_wrong_lr_fails_the_closure_loudly():
    got, _ = _run_monitored(OPTIMIZERS["adamw-foreach"], lr_scale=1.05)
    scale = np.abs(got[..., :3]).sum(-1)
    closure = np.abs(got[..., 4] - got[..., :4].sum(-1))
    assert np.median(closure / scale) > 1e-2


def test_two_groups_use_their_own_lr_and_decay():
    got, ref = _run_monitored(OPTIMIZERS["two-groups"])
    # group 2 has no decay: its D and R are exactly zero; group 1's are not
    assert np.all(got[:, 2:, 2] == 0) and np.all(got[:, 2:, 3] == 0)
    assert np.all(got[:, :2, 2] < 0)
    np.testing.assert_allclose(got[:, :2, 2], ref[:, :2, 2], rtol=1e-6)
    assert np.all(got[:, 2:, 6] == 0)  # nominal decay of the no-decay group


def test_nonfinite_is_reported_not_summed():
    infos = [ParamInfo("a", "transmission", 0, 4), ParamInfo("b", "other", 0, 4), ParamInfo("c", "transmission", 0, 4)]
    mon = ForceMonitor(infos)
    w = [torch.ones(4)] * 3
    m = [torch.full((4,), float("nan")), torch.ones(4) * 1e-3, torch.full((4,), float("inf"))]
    v = [torch.ones(4) * 1e-6] * 3
    mon.observe_norms(w)
    mon.add([tensor_rows([0, 1, 2], w, m, v, [1.0] * 3, [1e-3] * 3, [0.1] * 3, [(0.9, 0.999)] * 3, [1e-8] * 3,
                         mon.norm2)])
    rows = mon.summarize(mon.pack().numpy(), mon.steps)
    assert math.isnan(rows["weightforces/transmission/align"])
    # one step went non-finite (in two tensors at once): counted once, as a step
    assert rows["weightforces/transmission/nonfinite_steps"] == 1
    assert rows["weightforces/total/nonfinite_steps"] == 1
    assert math.isnan(rows["weightforces/total/align"])
    assert math.isfinite(rows["weightforces/other/align"]) and rows["weightforces/other/nonfinite_steps"] == 0


def test_an_aggregate_never_sees_the_values_of_tensors_outside_it():
    """Aggregates are summed all at once over masks: a tensor's non-finite norm or sums stay in
    the aggregates that hold it (total, its class, its layer), never leak into the others as 0 x NaN."""
    infos = [ParamInfo("a", "transmission", 0, 4), ParamInfo("b", "other", 1, 9), ParamInfo("c", "transmission", 1, 4)]
    mon = ForceMonitor(infos)
    flat = mon.pack().numpy().copy()
    packed = mon.unpack(flat)
    packed.norm2[:] = [float("nan"), 2.0, 3.0]
    packed.sums[:, :] = np.array([[math.inf], [1.0], [2.0]])
    rows = mon.summarize(flat, 1)
    for name in ("transmission", "total", "layer_00"):
        assert math.isnan(rows[f"weightforces/{name}/norm2"]) and math.isinf(rows[f"weightforces/{name}/inject"])
    assert rows["weightforces/other/norm2"] == 2.0 and rows["weightforces/other/inject"] == 1.0
    assert rows["weightforces/layer_01/norm2"] == 5.0 and rows["weightforces/layer_01/inject"] == 3.0
    assert rows["weightforces/layer_01/numel"] == 13.0 and rows["weightforces/total/numel"] == 17.0


def test_unsupported_optimizers_are_refused_with_the_supported_list():
    p = [torch.nn.Parameter(torch.zeros(3))]
    for opt in (torch.optim.SGD(p, lr=0.1), torch.optim.Adam(p, lr=0.1, weight_decay=0.01)):
        with pytest.raises(UnsupportedOptimizerError, match="AdamW"):
            check_supported(opt)
    with pytest.raises(UnsupportedOptimizerError, match="supported"):
        check_supported(object())


@pytest.mark.parametrize("rule_at, sampled_steps", [(0, (5, 10)), (1, (1, 6))])
def test_sparse_recording_integral_samples_the_rule_steps(rule_at, sampled_steps):
    """``sample_every`` N: N·(A + I + D) of the step that stands for each block of N steps: its last
    (right-point rule, ``sample_at`` 0) or its first (left-point, the research script's), nothing else."""
    mon = ForceMonitor([ParamInfo("w", "transmission", 0, 4)], sample_every=5, sample_at=rule_at)
    total = 0.0
    for step in range(1, 11):
        terms = torch.zeros(1, len(BUDGET_TERMS), dtype=torch.float64)
        terms[0, :3] = torch.tensor([step, 0.5 * step, -0.25 * step], dtype=torch.float64)  # A, I, D
        mon.add([Rows([0], terms, torch.ones(1, dtype=torch.float64))], step_id=step)
        if step in sampled_steps:
            total += 5 * 1.25 * step
    assert float(mon.sampled[0]) == total  # small integers and quarters: exact in float64


def test_monitor_add_is_one_step_whatever_the_rows():
    """``ForceMonitor.add``: one call is one optimizer step however many :class:`Rows` it gets (tensors
    on several devices, budgets made several ways, or none); rows are summed where they point, a
    non-finite row is counted and left out, the norms become the observation, variances are summed."""
    infos = [ParamInfo(n, "transmission", 0, 4) for n in "abcd"]
    mon = ForceMonitor(infos)
    mon.add([])
    assert mon.steps == 1 and torch.all(mon.sums == 0)
    t = torch.arange(3 * len(BUDGET_TERMS), dtype=torch.float64).reshape(3, -1)
    bad = t[:1].clone()
    bad[0, 2] = float("nan")
    mon.add([Rows([2, 0], t[:2], torch.tensor([5.0, 7.0], dtype=torch.float64)),
             Rows(torch.tensor([3]), bad, torch.tensor([9.0], dtype=torch.float64), torch.ones(1, 2, dtype=torch.float64)),
             Rows([1], t[2:], torch.tensor([4.0], dtype=torch.float64), torch.tensor([[float("inf"), 2.0]], dtype=torch.float64))])
    assert mon.steps == 2
    assert torch.equal(mon.sums[2], t[0]) and torch.equal(mon.sums[0], t[1]) and torch.equal(mon.sums[1], t[2])
    assert torch.all(mon.sums[3] == 0) and mon.nonfinite.tolist() == [0.0, 0.0, 0.0, 1.0]
    assert mon.norm2.tolist() == [7.0, 4.0, 5.0, 9.0]
    assert mon.var.tolist() == [[0.0, 0.0], [0.0, 2.0], [0.0, 0.0], [1.0, 1.0]]  # a non-finite variance left out


def test_pending_steps_are_the_same_sums_as_rows(monkeypatch):
    """:class:`Pending` steps (terms computed at the flush, a chain of one source's steps together)
    give exactly the sums, non-finite counts, sampled integral and norms of the same steps added as
    :class:`Rows`: two sources interleaved with rows (each ending the other's chain), chains of
    several steps, non-finite rows, sampled steps, and chains longer than the monitor keeps (computed
    in pieces, never more than PENDING_STEPS kept)."""
    monkeypatch.setattr(monitor_module, "PENDING_STEPS", 4)
    infos = [ParamInfo(n, "transmission", 0, 4) for n in "abcd"]
    now, later = ForceMonitor(infos, sample_every=3), ForceMonitor(infos, sample_every=3)
    gen = torch.Generator().manual_seed(3)

    # a source's terms from its stacked inputs [S, k, NT]: 2x + y (or z / 2), and its norms after the
    # chain: the last step's (what a measurement would give, ``end``, wins)
    def doubled(x, y, norm, start, end):
        return 2.0 * x + y, norm[-1] if end is None else end

    def halved(z, norm, start, end):
        return 0.5 * z, norm[-1] if end is None else end

    index_ab, index_d = torch.tensor([1, 0]), torch.tensor([3])
    kept = []
    for step in range(1, 16):
        x, y = (torch.randint(-8, 8, (2, len(BUDGET_TERMS)), generator=gen).double() for _ in range(2))
        z = torch.randint(-8, 8, (1, len(BUDGET_TERMS)), generator=gen).double()
        if step in (4, 9):
            x[1, 5] = float("inf")  # the second row of this step: left out, counted
        norm_ab, norm_d = torch.tensor([step, 2.0 * step], dtype=torch.float64), torch.tensor([-step], dtype=torch.float64)
        alone = step >= 9  # from step 9 on, source ab alone: one chain of its steps
        rows = [Rows(index_ab, doubled(x, y, norm_ab[None], None, None)[0], norm_ab)]
        pending = [Pending(index_ab, (x, y, norm_ab), later.before(index_ab), doubled, lambda n=norm_ab: n)]
        if not alone:
            rows.append(Rows(index_d, halved(z, norm_d[None], None, None)[0], norm_d))
            pending.append(Pending(index_d, (z, norm_d), later.before(index_d), halved, lambda n=norm_d: n))
        if step % 2 and not alone:
            extra = Rows([2], torch.full((1, len(BUDGET_TERMS)), float(step), dtype=torch.float64),
                         torch.tensor([step], dtype=torch.float64))
            rows.append(extra)
            pending.insert(1, extra)  # a row between the two sources' pending steps
        now.add(rows, step_id=step)
        later.add(pending, step_id=step)
        if not alone:
            assert torch.equal(later.norm2, now.norm2)  # read: the chain ends, its norms written
        kept.append(len(later._pending))
    assert kept[-7:] == [1, 2, 3, 0, 1, 2, 3]  # one chain, computed in pieces: at 4 kept steps the monitor flushes
    got, want = later.unpack(later.pack().numpy()), now.unpack(now.pack().numpy())
    for a, b in zip(got, want):
        if a is not None:
            np.testing.assert_array_equal(a, b)  # small integers and halves: exact in float64
    assert want.nonfinite.tolist() == [2.0, 0.0, 0.0, 0.0] and np.any(want.sampled != 0)
    assert later.steps == now.steps == 15


def test_squared_norms_of_chunked_tensors_against_float64():
    """||w||² per tensor from pieces of at most NORM_PIECE_CPU elements (a tensor of 25 pieces beside small
    ones): exact float64 squares summed in float64 (Higham: (n + 3)·2^-53 relative), again on a second
    call (the chunks' index kept, the values read anew)."""
    from hf_weightforces.core.kernels import CHUNK_CPU, squared_norms

    gen = torch.Generator().manual_seed(5)
    ws = [torch.randn(2 * CHUNK_CPU + 1000, generator=gen), torch.randn(300, generator=gen), torch.randn(7, 9, generator=gen)]
    for _ in range(2):
        got = squared_norms(ws)
        for w, g in zip(ws, got.tolist()):
            ref = float((w.double() ** 2).sum())
            assert g == pytest.approx(ref, rel=sum_tol(w.numel(), 1.0, ulps_per_term=3), abs=0)
        ws[0].mul_(0.5)
