"""Exact in the field: the decay factor PyTorch really applies, bfloat16-held weights, and the
closure at fine-tuning learning rates against the float32 rounding floor (SPEC section 9).

References here are written out from SPEC section 1 in float64 from snapshots the test takes
before and after each step (the monitor itself copies nothing)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_model, train_tiny
from transformers import TrainerCallback

from hf_weightforces import WeightForcesCallback
from hf_weightforces.core.budget import decay_factor, force_budget
from hf_weightforces.core.groups import Grouping

IMPLS = {"for-loop": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}


@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("lr,wd", [(5e-5, 0.01), (1e-5, 0.01), (1e-3, 0.1), (2e-6, 0.01)])
def test_decay_factor_is_what_each_implementation_applies(impl, lr, wd):
    gen = torch.Generator().manual_seed(0)
    w0 = torch.rand(50_000, generator=gen) * 3 + 0.1
    p = torch.nn.Parameter(w0.clone())
    opt = torch.optim.AdamW([p], lr=lr, weight_decay=wd, **IMPLS[impl])
    p.grad = torch.zeros_like(p)  # m = v = 0: u = 0, the step is the decay alone
    opt.step()
    c = decay_factor(lr, wd)
    assert torch.equal(p.detach(), w0 * torch.tensor(c, dtype=torch.float32))
    if (lr, wd) == (5e-5, 0.01):  # SPEC section 9: 4.6% weaker than nominal
        assert (1 - c) / (lr * wd) == pytest.approx(0.9537, abs=1e-4)
    if (lr, wd) == (1e-5, 0.01):  # 19% stronger
        assert (1 - c) / (lr * wd) == pytest.approx(1.192, abs=1e-3)
    assert decay_factor(lr, wd, torch.float64) == 1 - lr * wd


class _Reference(TrainerCallback):
    """Float64 snapshots of w_t, g, m, v before each step and w_{t+1} after it; per class, the
    budget of the update written out from SPEC section 1 (moments advanced in float64)."""

    def __init__(self, intended: bool):
        self.intended = intended  # True: u from the pre-step moments; False: from the stored post-step ones
        self.rows: list[dict] = []

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kw):
        opt = optimizer.optimizer
        names = {id(p): n for n, p in model.named_parameters()}
        grouping = Grouping()
        self.cls = {id(p): grouping.classify(n, p.ndim) for n, p in model.named_parameters()}
        self.names = names
        opt.register_step_pre_hook(self._pre)
        opt.register_step_post_hook(self._post)

    def _pre(self, opt, args, kwargs):
        self.snap = []
        for g in opt.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                st = opt.state.get(p, {})
                z = torch.zeros_like(p, dtype=torch.float64)
                self.snap.append((p, g, p.detach().double().clone(), p.grad.double().clone(),
                                  st["exp_avg"].double().clone() if "exp_avg" in st else z,
                                  st["exp_avg_sq"].double().clone() if "exp_avg_sq" in st else z,
                                  float(st.get("step", 0)) + 1))

    def _post(self, opt, args, kwargs):
        row: dict[str, np.ndarray] = {}
        for p, g, w, grad, m, v, t in self.snap:
            b1, b2 = g["betas"]
            lr, wd, eps = float(g["lr"]), g["weight_decay"], g["eps"]
            if self.intended:
                m = b1 * m + (1 - b1) * grad
                v = b2 * v + (1 - b2) * grad * grad
            else:
                st = opt.state[p]
                m, v = st["exp_avg"].double(), st["exp_avg_sq"].double()
            u = (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
            fb = force_budget(w, u, lr, wd, w_after=p.detach(), factor=decay_factor(lr, wd, p.dtype))
            terms = np.array([fb.align, fb.inject, fb.decay, fb.rest, fb.delta])
            for key in (self.cls[id(p)], "total"):
                row[key] = row.get(key, 0) + terms
        self.rows.append(row)


def _rows_by_step(wf_rows, path):
    return {r["step"]: r for r in wf_rows(path)}


@pytest.mark.slow
def test_bf16_weights_report_the_intended_update_and_its_rounding(tmp_path, wf_rows):
    model = tiny_model(0).to(torch.bfloat16)
    ref = _Reference(intended=True)
    with pytest.warns(RuntimeWarning) if False else _nullcontext():
        train_tiny(tmp_path, [WeightForcesCallback(weibull_every=0), ref], model=model, max_steps=6, logging_steps=1,
                   learning_rate=1e-3, weight_decay=0.1, optim="adamw_torch")
    rows = _rows_by_step(wf_rows, tmp_path)
    assert sorted(rows) == list(range(1, 7)) and len(ref.rows) == 6
    for step, want in enumerate(ref.rows, start=1):
        r = rows[step]
        for agg, terms in want.items():
            a, i, d, rest, delta = terms
            scale = abs(a) + abs(i) + abs(d)
            got = [r[f"weightforces/{agg}/{k}"] for k in ("align", "inject", "decay", "rest")]
            np.testing.assert_allclose(got, [a, i, d, rest], rtol=0, atol=1e-4 * scale, err_msg=f"{agg} step {step}")
            # the observed change is exact; rounding is what the stored weights did not take
            assert r[f"weightforces/{agg}/delta"] == pytest.approx(delta, rel=1e-9, abs=1e-12 * scale)
            assert r[f"weightforces/{agg}/rounding"] == pytest.approx(delta - (a + i + d + rest), rel=1e-6, abs=1e-9 * scale)
            assert abs(r[f"weightforces/{agg}/closure"]) <= 1e-9 * scale
    # bf16 keeps little of a small update: norm gains (other) lose most of their intended change
    other = [rows[s]["weightforces/other/rounding"] for s in rows]
    assert any(abs(x) > 1e-3 * abs(rows[s]["weightforces/other/align"]) for x, s in zip(other, rows))


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
