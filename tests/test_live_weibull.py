"""Live Weibull fits, the RMS-to-Weibull offset and resuming, in real Trainer runs."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch
from conftest import tiny_model, train_tiny

from hf_weightforces import WeightForcesCallback
from hf_weightforces.core.groups import classify
from hf_weightforces.core.offset import gamma_bridge
from hf_weightforces.core.weibull import fit_weibull


def _group_weights(model, group):
    return torch.cat([p.detach().reshape(-1) for n, p in model.named_parameters() if classify(n, p.dim()) == group])


def test_live_fit_equals_the_exact_fit_of_the_final_weights(tmp_path, wf_rows):
    trainer = train_tiny(tmp_path, [WeightForcesCallback(weibull_every=8)], max_steps=16, logging_steps=4)
    rows = wf_rows(tmp_path)
    assert [("weightforces/matrices/weibull_k" in r) for r in rows] == [False, True, False, True]
    assert not any("weightforces/total/weibull_k" in r for r in rows)  # total: every trained tensor, no fit
    last = rows[-1]
    for group in ("transmission", "selection", "embedding"):
        exact = fit_weibull(_group_weights(trainer.model, group))
        assert last[f"weightforces/{group}/weibull_k"] == pytest.approx(exact.k, abs=1e-3)
        assert last[f"weightforces/{group}/weibull_scale"] == pytest.approx(exact.scale, rel=2e-4)
        assert 0.9 < last[f"weightforces/{group}/weibull_r2"] <= 1
        assert 0 < last[f"weightforces/{group}/weibull_ks"] < 0.2
    # biases and norm scales are not fitted; the "matrices" pool holds every weight matrix
    assert "weightforces/other/weibull_k" not in last
    matrices = torch.cat([p.detach().reshape(-1) for n, p in trainer.model.named_parameters()
                          if classify(n, p.dim()) != "other"])
    assert last["weightforces/matrices/weibull_k"] == pytest.approx(fit_weibull(matrices).k, abs=1e-3)
    # the start fit of freshly initialised N(0, 0.02^2) matrices sits at the Gaussian anchor
    first = rows[0]
    assert first["weightforces/transmission/start_weibull_k"] == pytest.approx(1.2054, abs=0.02)


def test_offset_components_recomputed_from_the_rows(tmp_path, wf_rows):
    cb = WeightForcesCallback(weibull_every=4, offset_sample_every=4)
    train_tiny(tmp_path, [cb], max_steps=16, logging_steps=4)
    rows = wf_rows(tmp_path)
    init = tiny_model(0)
    for group in ("transmission", "selection"):
        w0 = _group_weights(init, group).double()
        n, norm2_0 = w0.numel(), float((w0 * w0).sum())
        lock = rows[0][f"weightforces/{group}/start_weibull_scale"] / math.sqrt(norm2_0 / n)
        integral = 0.0
        for r in rows:
            steps = r["weightforces/steps"]
            integral += steps * sum(r[f"weightforces/{group}/{k}"] for k in ("align", "inject", "decay"))
            sigma = r[f"weightforces/{group}/rms"]
            pred = math.sqrt((norm2_0 + integral) / n)
            lam, k = r[f"weightforces/{group}/weibull_scale"], r[f"weightforces/{group}/weibull_k"]
            assert r[f"weightforces/{group}/rms_pred"] == pytest.approx(pred, rel=1e-9)
            # integrating every step leaves only the dropped rest R (and float32 rounding)
            assert abs(r[f"weightforces/{group}/offset_integration"]) < 1e-4
            assert r[f"weightforces/{group}/offset_bridge_klock"] == pytest.approx(sigma * lock / lam - 1, abs=1e-9)
            assert r[f"weightforces/{group}/offset_bridge_gamma"] == pytest.approx(gamma_bridge(sigma, k) / lam - 1, abs=1e-9)
            assert r[f"weightforces/{group}/offset_total_klock"] == pytest.approx(pred * lock / lam - 1, abs=1e-9)
        # sampling every 4 steps costs accuracy: the sampled integral is further off than the dense one
        last = rows[-1]
        assert abs(last[f"weightforces/{group}/offset_integration_sampled"]) > abs(last[f"weightforces/{group}/offset_integration"])


def test_weibull_off(tmp_path, wf_rows):
    train_tiny(tmp_path, [WeightForcesCallback(weibull_every=0)], max_steps=4, logging_steps=4)
    (row,) = wf_rows(tmp_path)
    assert not any("weibull" in k or "offset" in k for k in row)
    with pytest.raises(ValueError, match="multiple"):
        WeightForcesCallback(every=3, offset_sample_every=10)


@pytest.mark.slow
def test_resume_continues_the_curves_without_a_seam(tmp_path, wf_rows):
    from transformers import GPTNeoXForCausalLM

    def cb():
        return WeightForcesCallback(weibull_every=4, offset_sample_every=2)

    full = tmp_path / "full"
    train_tiny(full, [cb()], max_steps=12, logging_steps=2, save_strategy="steps", save_steps=6)
    assert (full / "checkpoint-6" / "weightforces_state.json").is_file()
    resumed = tmp_path / "resumed"
    shutil.copytree(full / "checkpoint-6", resumed / "checkpoint-6")
    shutil.copytree(full / "weightforces", resumed / "weightforces")  # holds rows past the resume point
    # GPT-NeoX's head is not restored by resume_from_checkpoint alone (DISTRIBUTED.md): load the model
    model = GPTNeoXForCausalLM.from_pretrained(resumed / "checkpoint-6")
    train_tiny(resumed, [cb()], model=model, max_steps=12, logging_steps=2, save_strategy="steps", save_steps=6,
               resume=str(resumed / "checkpoint-6"))
    a, b = wf_rows(full), wf_rows(resumed)
    assert [r["step"] for r in b] == [r["step"] for r in a] == [2, 4, 6, 8, 10, 12]  # no duplicates
    # the closure of an interval is its steps' observed closures, each carried to the end of its chain of
    # planned steps by the later steps' decay factors (docs/budget.md, section 9): the resumed run's first
    # step (its plan is made there) starts a chain the full run did not, which moves the closure by up to
    # 2ηλ of it a step (lr 2e-3, weight decay 0.1, two steps an interval)
    carried = 2 * 2 * 2e-3 * 0.1
    for ra, rb in zip(a[3:], b[3:]):
        assert ra.keys() == rb.keys()
        for k in ra:
            if isinstance(ra[k], float) and math.isnan(ra[k]):
                assert math.isnan(rb[k]), k
            elif k.endswith(("/closure", "/closure_rel")):
                assert rb[k] == pytest.approx(ra[k], rel=carried, abs=1e-12), k
            else:
                assert rb[k] == pytest.approx(ra[k], rel=1e-6, abs=1e-12), k
    assert np.isfinite(b[-1]["weightforces/matrices/offset_total_klock"])


def test_super_weights_left_out(tmp_path, wf_rows):
    """Plant a few huge weights; the fit and the shares without them are reported beside the plain ones."""
    model = tiny_model(0)
    with torch.no_grad():
        w = model.gpt_neox.layers[0].mlp.dense_h_to_4h.weight
        w.view(-1)[:3] = torch.tensor([5.0, -4.0, 3.0])  # far above the 0.02-scale bulk
    trainer = train_tiny(tmp_path, [WeightForcesCallback(super_weights=3, weibull_every=4)], model=model,
                         max_steps=8, logging_steps=4)
    r = wf_rows(tmp_path)[-1]
    assert r["weightforces/transmission/super_weights"] == 3
    assert r["weightforces/selection/super_weights"] == 0
    # the fit without them equals the exact fit of the pooled transmission weights minus those three
    pooled = _group_weights(trainer.model, "transmission")
    exact = fit_weibull(pooled, exclude_top=3)
    assert r["weightforces/transmission/weibull_k_no_super"] == pytest.approx(exact.k, abs=1e-3)
    assert r["weightforces/transmission/weibull_scale_no_super"] == pytest.approx(exact.scale, rel=2e-4)
    # the three planted weights carry a visible part of the decay: leaving them out changes the budget
    assert r["weightforces/transmission/align_no_super"] != r["weightforces/transmission/align"]
    assert 0 < r["weightforces/transmission/align_share_no_super"] < 1
    # and a group without super weights is untouched
    assert r["weightforces/selection/align_no_super"] == pytest.approx(r["weightforces/selection/align"], rel=1e-12)
    assert r["weightforces/selection/weibull_k_no_super"] == pytest.approx(r["weightforces/selection/weibull_k"], abs=1e-12)


def test_resume_with_a_corrupt_state_file_warns_and_trains_on(tmp_path, wf_rows, caplog):
    from transformers import GPTNeoXForCausalLM

    full = tmp_path / "full"
    train_tiny(full, [WeightForcesCallback(weibull_every=4)], max_steps=8, logging_steps=2,
               save_strategy="steps", save_steps=4)
    ckpt = full / "checkpoint-4"
    (ckpt / "weightforces_state.json").write_text('{"integral": {"version": 1, "names": ["not', encoding="utf-8")
    with caplog.at_level("WARNING"):
        trainer = train_tiny(full, [WeightForcesCallback(weibull_every=4)], model=GPTNeoXForCausalLM.from_pretrained(ckpt),
                             max_steps=8, logging_steps=2, save_strategy="no", resume=str(ckpt))
    assert trainer.state.global_step == 8
    assert any("cannot use" in r.getMessage() and "weightforces_state.json" in r.getMessage() for r in caplog.records)
    rows = wf_rows(full)
    assert [r["step"] for r in rows] == [2, 4, 6, 8]
    assert np.isfinite(rows[-1]["weightforces/total/align"])


def test_per_matrix_fits_equal_exact_fits(tmp_path, wf_rows):
    trainer = train_tiny(tmp_path, [WeightForcesCallback(weibull_every=4, weibull_per_matrix=True)],
                         max_steps=4, logging_steps=4)
    (row,) = wf_rows(tmp_path)
    fitted = 0
    for name, p in trainer.model.named_parameters():
        key = f"weightforces/matrix/{name}/weibull_k"
        if classify(name, p.dim()) == "other":
            assert key not in row
            continue
        exact = fit_weibull(p.detach())
        assert row[key] == pytest.approx(exact.k, abs=1e-3), name
        assert row[f"weightforces/matrix/{name}/weibull_scale"] == pytest.approx(exact.scale, rel=2e-4), name
        fitted += 1
    assert fitted == 2 + 2 * 4  # embed_in, lm_head and four matrices in each of two layers


@pytest.mark.parametrize("every, rule, sample_at", [(1, "right", 0), (1, "left", 1), (2, "left", 2), (5, "left", 0)])
def test_offset_rule_picks_the_step_that_stands_for_each_block(tmp_path, every, rule, sample_at):
    """``offset_rule``: the sparse-recording integral samples each block's last step (right) or its
    first budget step (left: step ``every`` of the block; the same step as right when N == every)."""
    from conftest import train_tiny

    from hf_weightforces import WeightForcesCallback

    cb = WeightForcesCallback(every=every, offset_sample_every=10 if every != 5 else 5, offset_rule=rule,
                              weibull_every=0, quiet=True)
    train_tiny(tmp_path, [cb], max_steps=every, logging_steps=every)
    assert cb.monitor.sample_at == sample_at
    with pytest.raises(ValueError, match="offset_rule"):
        WeightForcesCallback(offset_rule="middle")
