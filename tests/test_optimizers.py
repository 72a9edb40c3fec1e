"""Every optimizer the Trainer offers: the budget equals a float64 recomputation from the weights
before and after each step (snapshots taken by the test's own hooks), in real Trainer runs."""

from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
import pytest
import torch
from conftest import tiny_model, train_tiny
from float_bounds import rel_sum_tol
from transformers import TrainerCallback

from hf_weightforces import WeightForcesCallback
from hf_weightforces.core.monitor import BUDGET_MODES
from hf_weightforces.core.optim import observed_factor, plan_optimizer

bnb = pytest.importorskip("bitsandbytes")


def _f32(x: float) -> float:
    return float(np.float32(x))


#: The factor c each optimizer really applies, written out independently of core/optim.py.
FACTOR = {
    "sgd": lambda lr, wd: 1.0,  # L2 decay inside the gradient
    "rmsprop": lambda lr, wd: 1.0,
    "adafactor": lambda lr, wd: 1.0 - _f32(lr * wd),  # p.add_(p, alpha=-wd*lr)
    "bnb": lambda lr, wd: _f32(1.0 - lr * wd),  # p.mul_(1 - lr*wd)
    "adamw": lambda lr, wd: _f32(1.0 - lr * wd),
}


class Snapshots(TrainerCallback):
    """Per step and tensor, the float64 budget of η u := c w_t - w_{t+1} from full copies."""

    def __init__(self, rule: str):
        self.rule, self.steps, self._pre = rule, [], None

    def on_train_begin(self, args, state, control, optimizer=None, **kw):
        self.opt = optimizer.optimizer
        self.opt.register_step_pre_hook(self._before)

    def _before(self, opt, *_):
        self._pre = {id(p): (p.detach().double().clone(), g["lr"], g.get("weight_decay", 0.0))
                     for g in opt.param_groups for p in g["params"] if p.grad is not None}

    def on_optimizer_step(self, args, state, control, **kw):
        rows = {}
        for g in self.opt.param_groups:
            for p in g["params"]:
                if id(p) not in self._pre:
                    continue
                w, lr, wd = self._pre[id(p)]
                c = FACTOR[self.rule](float(lr), float(wd))
                w1 = p.detach().double()
                e = c * w - w1
                ww, we = float((w * w).sum()), float((w * e).sum())
                d = 1.0 - c
                rows[id(p)] = np.array([-2 * we, float((e * e).sum()), -2 * d * ww, d * d * ww + 2 * d * we,
                                        float((w1 * w1).sum()) - ww])
        self.steps.append(rows)


def _reference(cb, snaps, every_row_steps):
    """Reference rows: per log interval, the mean per step of each aggregate."""
    index_of = cb._index_of
    masks = cb.monitor.aggregates(per_layer=False)
    out, k = [], 0
    for n in every_row_steps:
        per_tensor = np.zeros((len(index_of), 5))
        for rows in snaps.steps[k : k + n]:
            for key, v in rows.items():
                per_tensor[index_of[key]] += v
        k += n
        out.append({name: per_tensor[mask].sum(0) / n for name, mask in masks.items()})
    return out


def _run(tmp_path, optim, rule, wf_rows, **cb_kw):
    cb = WeightForcesCallback(weibull_every=0, quiet=True, **cb_kw)
    snaps = Snapshots(rule)
    train_tiny(tmp_path, [cb, snaps], optim=optim, max_steps=6, logging_steps=3, warmup_steps=0)
    rows = wf_rows(tmp_path)
    assert [r["weightforces/steps"] for r in rows] == [3, 3]
    return cb, rows, _reference(cb, snaps, [3, 3])


EXACT_CASES = [  # (optim, factor rule, budget mode the row must carry)
    ("sgd", "sgd", "observed_exact"),
    ("adafactor", "adafactor", "observed_exact"),
    ("rmsprop", "rmsprop", "observed_exact"),
    ("lion_32bit", "bnb", "staged"),
    ("adamw_8bit", "bnb", "staged"),
    ("paged_adamw_8bit", "bnb", "staged"),
]


@pytest.mark.slow
@pytest.mark.parametrize("optim,rule,mode", EXACT_CASES, ids=[c[0] for c in EXACT_CASES])
def test_exact_budget_equals_the_snapshots(tmp_path, wf_rows, optim, rule, mode):
    kw = {"optim_args": "momentum=0.9"} if optim == "sgd" else {}
    cb = WeightForcesCallback(weibull_every=0, quiet=True, observed_mode="exact")
    snaps = Snapshots(rule)
    train_tiny(tmp_path, [cb, snaps], optim=optim, max_steps=6, logging_steps=3, warmup_steps=0, **kw)
    if optim == "sgd":
        assert snaps.opt.param_groups[0]["momentum"] == 0.9
    rows = wf_rows(tmp_path)
    ref = _reference(cb, snaps, [int(r["weightforces/steps"]) for r in rows])
    params = json.loads((tmp_path / "weightforces" / "params.json").read_text())
    assert params["budget"]["mode"] == mode
    for row, want in zip(rows, ref):
        assert row["weightforces/budget_mode"] == BUDGET_MODES[mode]
        for name, (a, i, d, r, delta) in want.items():
            got = [row[f"weightforces/{name}/{k}"] for k in ("align", "inject", "decay", "rest", "delta")]
            scale = abs(a) + abs(i) + abs(d)
            assert scale > 0, name
            for g, w in zip(got, (a, i, d, r, delta)):
                assert abs(g - w) <= 1e-4 * scale, (name, got, (a, i, d, r, delta))
            assert abs(row[f"weightforces/{name}/closure"]) <= 1e-4 * scale


@pytest.mark.slow
def test_sampled_budget_within_its_standard_error(tmp_path, wf_rows):
    cb, rows, ref = _run(tmp_path, "adafactor", "adafactor", wf_rows, observed_sample_size=512, observed_seed=3)
    zs = []
    for row, want in zip(rows, ref):
        assert row["weightforces/budget_mode"] == BUDGET_MODES["observed_sampled"]
        for name, (a, i, d, _, delta) in want.items():
            se_a, se_i = row[f"weightforces/{name}/align_se"], row[f"weightforces/{name}/inject_se"]
            scale = abs(a) + abs(i) + abs(d)
            assert row[f"weightforces/{name}/decay"] == pytest.approx(d, rel=1e-9)  # exact: observed norms
            # Δ = ||w_{t+1}||² - ||w_t||², float64 sums of n exact squares here and in the reference, in different
            # orders: Higham, |Δ - Δ_ref| <= 4·n·2^-53·||w||² (two norms, two evaluations), ~1e-9 of Δ or more
            n, norm2 = row[f"weightforces/{name}/numel"], row[f"weightforces/{name}/norm2"]
            assert row[f"weightforces/{name}/delta"] == pytest.approx(delta, rel=1e-9, abs=2 * rel_sum_tol(n) * norm2)
            assert abs(row[f"weightforces/{name}/closure"]) <= 1e-9 * scale
            if name == "other":  # biases and norms: no tensor above 512 elements, so copied whole: exact
                assert se_a == se_i == 0
                assert row[f"weightforces/{name}/align"] == pytest.approx(a, abs=1e-9 * scale)
                continue
            assert se_a > 0 and se_i > 0, name
            assert se_i < 0.2 * i, name  # informative, not a formality
            zs += [(row[f"weightforces/{name}/align"] - a) / se_a, (row[f"weightforces/{name}/inject"] - i) / se_i]
    assert max(abs(z) for z in zs) < 6, zs  # heavy tails: see docs/optimizers.md
    params = json.loads((tmp_path / "weightforces" / "params.json").read_text())
    assert params["budget"] == {**params["budget"], "mode": "observed_sampled", "sample_size": 512, "seed": 3,
                                "decay_rule": "add"}


class MyAdamW(torch.optim.AdamW):
    """A user subclass: still read from its moments."""


@pytest.mark.slow
def test_adamw_subclass_is_read_from_its_moments(tmp_path, wf_rows):
    from conftest import tiny_data
    from transformers import Trainer, TrainingArguments

    model = tiny_model()
    opt = MyAdamW(model.parameters(), lr=2e-3, weight_decay=0.1)
    assert plan_optimizer(opt).path == "moments"
    cb, snaps = WeightForcesCallback(weibull_every=0, quiet=True), Snapshots("adamw")
    args = TrainingArguments(str(tmp_path), max_steps=6, logging_steps=3, per_device_train_batch_size=4, report_to=[],
                             use_cpu=True, save_strategy="no", disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=tiny_data(), callbacks=[cb, snaps], optimizers=(opt, None)).train()
    rows = wf_rows(tmp_path)
    for row, want in zip(rows, _reference(cb, snaps, [3, 3])):
        assert row["weightforces/budget_mode"] == BUDGET_MODES["moments"]
        a, i, d = want["total"][:3]
        assert row["weightforces/total/align"] == pytest.approx(a, abs=1e-4 * (abs(a) + abs(i) + abs(d)))


def test_plans_and_factors():
    p = [torch.nn.Parameter(torch.zeros(3))]
    assert plan_optimizer(torch.optim.SGD(p, lr=0.1)).decay == "coupled"
    assert plan_optimizer(torch.optim.Adam(p, lr=0.1, weight_decay=0.01)).path == "observed"
    assert plan_optimizer(bnb.optim.AdamW8bit(p, lr=0.1)).path == "bnb_adam"
    assert plan_optimizer(bnb.optim.Lion(p, lr=0.1)).path == "lion"
    assert plan_optimizer(bnb.optim.RMSprop(p, lr=0.1)).decay == "coupled"

    class Duck(torch.optim.Optimizer):  # Adam-like groups, not a torch Adam
        def __init__(self, params):
            super().__init__(params, {"lr": 1e-3, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.0})

    assert plan_optimizer(Duck(p)).path == "moments"
    assert observed_factor("mul", 5e-5, 0.01, torch.float32) == _f32(1 - 5e-7)
    assert observed_factor("add", 5e-5, 0.01, torch.float32) == 1 - _f32(5e-7)
    assert observed_factor("coupled", 5e-5, 0.01, torch.float32) == 1.0
    with pytest.raises(ValueError, match="observed_mode"):
        WeightForcesCallback(observed_mode="sometimes")
    with pytest.raises(ValueError, match="observed_sample_size"):
        WeightForcesCallback(observed_sample_size=1)


# every other optim value that runs on CPU here, with the package it needs
OTHERS = [
    ("adamw_torch_fused", None), ("adagrad", None), ("ademamix", None), ("ademamix_8bit", None),
    ("adamw_bnb_8bit", None), ("lion_8bit", None), ("paged_adamw_32bit", None), ("paged_ademamix_32bit", None),
    ("paged_ademamix_8bit", None), ("paged_lion_32bit", None), ("paged_lion_8bit", None), ("rmsprop_bnb", None),
    ("rmsprop_bnb_8bit", None), ("rmsprop_bnb_32bit", None), ("galore_adamw", "galore_torch"),
    ("galore_adafactor", "galore_torch"), ("apollo_adamw", "apollo_torch"), ("lomo", "lomo_optim"),
    ("grokadamw", "grokadamw"), ("schedule_free_adamw", "schedulefree"), ("schedule_free_radam", "schedulefree"),
    ("schedule_free_sgd", "schedulefree"), ("stable_adamw", "optimi"),
]


@pytest.mark.slow
@pytest.mark.parametrize("optim,package", OTHERS, ids=[o for o, _ in OTHERS])
def test_every_other_optimizer_completes_a_run(tmp_path, wf_rows, optim, package):
    if package is not None and importlib.util.find_spec(package) is None:
        pytest.skip(f"needs {package}")
    kw = {"optim_target_modules": ["attention", "mlp"]} if optim.startswith(("galore", "apollo")) else {}
    with _no_monitor_warning():
        train_tiny(tmp_path, [WeightForcesCallback(weibull_every=2, quiet=True)], optim=optim, max_steps=4,
                   logging_steps=2, **kw)
    rows = wf_rows(tmp_path)
    assert [r["step"] for r in rows] == [2, 4]
    for r in rows:
        mode = int(r["weightforces/budget_mode"])
        assert mode != BUDGET_MODES["none"]
        budget = sum(abs(r[f"weightforces/total/{k}"]) for k in ("align", "inject", "decay"))
        assert math.isfinite(budget)
        assert budget > 0 or optim == "schedule_free_radam"  # RAdam's first steps make no update at all
        assert abs(r["weightforces/total/closure"]) <= 1e-3 * budget
        assert "weightforces/matrices/weibull_k" in r


class _no_monitor_warning:
    """The monitor must not switch itself off (its only RuntimeWarning starts 'weight forces switched off')."""

    def __enter__(self):
        import warnings

        self._ctx = warnings.catch_warnings(record=True)
        self.seen = self._ctx.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)
        bad = [str(w.message) for w in self.seen if "weight forces" in str(w.message)]
        assert not bad, bad
