"""The sampled observed mode's standard errors hold: in real Trainer runs of every optimizer read from its
observed update here, the float64 reference from full snapshots lies within 3 logged standard errors in at
least 99% of the (row, aggregate) pairs, at sample sizes 64 and 1024.  And an optimizer of one's own can
declare its decay rule."""

from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
import pytest
import torch
from conftest import tiny_data, tiny_model, train_tiny
from transformers import TrainerCallback

from hf_weightforces import WeightForcesCallback
from hf_weightforces.core.optim import DECAY_RULES, plan_optimizer, register_decay_rule


def _f32(x: float) -> float:
    return float(np.float32(x))


#: The factor c each rule applies, written out independently of core/optim.py.
FACTOR = {
    "mul": lambda lr, wd: _f32(1.0 - lr * wd) if wd > 0 else 1.0,  # p.mul_(1 - lr*wd)
    "add": lambda lr, wd: 1.0 - _f32(lr * wd) if wd > 0 else 1.0,  # p.add_(p, alpha=-lr*wd)
    "coupled": lambda lr, wd: 1.0,  # wd*w inside the gradient
}


class Reference(TrainerCallback):
    """Per step and tensor, the float64 (A, I) of η u := c w_t - w_{t+1} from full copies taken at the
    start of the step (before any backward: LOMO updates inside it) and at its end."""

    def __init__(self, rule: str):
        self.rule, self.steps = rule, []

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kw):
        self.model, self.opt = model, getattr(optimizer, "optimizer", optimizer)

    def on_step_begin(self, args, state, control, **kw):
        self.pre = {id(p): p.detach().double().clone() for p in self.model.parameters() if p.requires_grad}
        self.lrs = {id(p): (float(g["lr"]), float(g.get("weight_decay", 0.0) or 0.0))
                    for g in self.opt.param_groups for p in g["params"]}

    def on_step_end(self, args, state, control, **kw):
        rows = {}
        for p in self.model.parameters():
            if id(p) not in self.pre:
                continue
            if hasattr(self.opt, "fused_backward"):  # LOMO: the lr it was handed for this step, one decay
                lr, wd = float(self.opt.lr), float(self.opt.weight_decay)
            else:
                lr, wd = self.lrs[id(p)]
            c = FACTOR[self.rule](lr, wd)
            w, w1 = self.pre[id(p)], p.detach().double()
            e = c * w - w1
            rows[id(p)] = (-2.0 * float((w * e).sum()), float((e * e).sum()))
        self.steps.append(rows)


#: Every optimizer read from its observed update that runs on CPU here: (optim, decay rule, extra args, package).
CASES = [
    ("sgd", "coupled", {"optim_args": "momentum=0.9"}, None),
    ("adafactor", "add", {}, None),
    ("rmsprop", "coupled", {}, None),
    ("adagrad", "coupled", {}, None),
    ("ademamix", "mul", {}, "bitsandbytes"),
    ("rmsprop_bnb", "coupled", {}, "bitsandbytes"),
    ("lomo", "mul", {}, "lomo_optim"),
]
SIZES = (64, 1024)
STEPS = 16


def _pairs(optim, rule, extra, tmp_path, wf_rows, size):
    """(|z|, se, reference I) of every (row, aggregate) pair of one run logged at every step; A's z is
    -I's exactly (Â = (T - Î)/c), so each pair counts once."""
    cb = WeightForcesCallback(weibull_every=0, quiet=True, per_layer=True, observed_sample_size=size,
                              observed_seed=5)
    ref = Reference(rule)
    train_tiny(tmp_path, [cb, ref], optim=optim, max_steps=STEPS, logging_steps=1, warmup_steps=0, seed=1, **extra)
    rows = wf_rows(tmp_path)
    assert [r["weightforces/steps"] for r in rows] == [1] * STEPS and len(ref.steps) == STEPS
    masks = cb.monitor.aggregates(per_layer=True)
    out = []
    for row, snaps in zip(rows, ref.steps):
        per = np.zeros((len(cb._index_of), 2))
        for key, v in snaps.items():
            per[cb._index_of[key]] += v
        for name, mask in masks.items():
            a, i = per[mask].sum(0)
            got_a, got_i = row[f"weightforces/{name}/align"], row[f"weightforces/{name}/inject"]
            se_a, se_i = row[f"weightforces/{name}/align_se"], row[f"weightforces/{name}/inject_se"]
            # float64 sums of the same exact products in other orders: 1e-9 of the budget is far above them
            tol = 1e-9 * (abs(a) + abs(i))
            z_i = abs(got_i - i) / se_i if se_i > 0 else (0.0 if abs(got_i - i) <= tol else math.inf)
            z_a = abs(got_a - a) / se_a if se_a > 0 else (0.0 if abs(got_a - a) <= tol else math.inf)
            assert z_a == pytest.approx(z_i, rel=1e-5, abs=1e-5), (name, z_a, z_i)  # the identity ties them
            out.append((z_i, se_i, i))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("optim,rule,extra,package", CASES, ids=[c[0] for c in CASES])
def test_reference_within_three_standard_errors(tmp_path, wf_rows, optim, rule, extra, package):
    if package is not None and importlib.util.find_spec(package) is None:
        pytest.skip(f"needs {package}")
    pairs = []
    for size in SIZES:
        pairs += _pairs(optim, rule, extra, tmp_path / str(size), wf_rows, size)
    z = np.array([p[0] for p in pairs])
    assert len(z) >= 2 * STEPS * 6
    coverage = float(np.mean(z <= 3.0))
    assert coverage >= 0.99, (optim, coverage, sorted(z)[-5:])
    # informative, not a formality: at n = 1024 (R = 1031 buckets) a tensor's relative standard error is about
    # sqrt(2/1031) = 4.4% where its update is spread out; the median over the aggregates stays well inside 25%
    rel_se = [se / i for _, se, i in pairs[len(pairs) // 2 :] if i > 0 and se > 0]
    assert np.median(rel_se) < 0.25, (optim, np.median(rel_se))


class DecoupledSGD(torch.optim.Optimizer):
    """An optimizer of one's own that applies decoupled decay itself: w <- fl32(1 - lr*wd) w - lr g."""

    weightforces_decay_rule = "mul"

    def __init__(self, params, lr=1e-2, weight_decay=0.1):
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.mul_(1.0 - group["lr"] * group["weight_decay"]).add_(p.grad, alpha=-group["lr"])


class PlainDecoupledSGD(DecoupledSGD):
    weightforces_decay_rule = None  # says nothing: registered by name below


def test_declared_decay_rule_reaches_the_plan():
    params = [torch.nn.Parameter(torch.zeros(3))]
    assert plan_optimizer(DecoupledSGD(params)).decay == "mul"
    assert plan_optimizer(PlainDecoupledSGD(params)).decay == "unknown"
    register_decay_rule(f"{__name__}.PlainDecoupledSGD", "add")
    assert plan_optimizer(PlainDecoupledSGD(params)).decay == "add"
    with pytest.raises(ValueError, match="decay rule must be one of"):
        register_decay_rule(PlainDecoupledSGD, "decoupled")
    assert "mul" in DECAY_RULES


@pytest.mark.slow
def test_declared_decay_rule_gives_the_decay_in_a_run(tmp_path, wf_rows):
    """Without the declaration the decay is 0 and folded into align; with it, D = -2(1 - c)||w_t||²."""
    from transformers import Trainer, TrainingArguments

    model = tiny_model(0)
    opt = DecoupledSGD(model.parameters(), lr=5e-2, weight_decay=0.1)
    cb = WeightForcesCallback(weibull_every=0, quiet=True, observed_mode="exact")
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, logging_steps=1,
                             report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, lr_scheduler_type="constant")
    Trainer(model=model, args=args, train_dataset=tiny_data(), callbacks=[cb], optimizers=(opt, None)).train()
    params = json.loads((tmp_path / "weightforces" / "params.json").read_text())
    assert params["budget"]["decay_rule"] == "mul"
    c = _f32(1.0 - 5e-2 * 0.1)
    rows = wf_rows(tmp_path)
    assert len(rows) == 4
    for row in rows:  # one step per row, every tensor decayed by the same c: D = -2(1 - c)||w_t||²
        norm_before = row["weightforces/total/norm2"] - row["weightforces/total/delta"]
        # float64 sums of the same exact squares in other orders: relative 1e-12 and below
        assert row["weightforces/total/decay"] == pytest.approx(-2 * (1 - c) * norm_before, rel=1e-9)
        # and the closure of the observed update stays exact with the declared c
        assert abs(row["weightforces/total/closure"]) <= 1e-9 * abs(row["weightforces/total/align"])
