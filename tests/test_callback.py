"""The callback inside real Trainer runs on a tiny GPT-NeoX trained on stdlib text."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from conftest import tiny_model, train_tiny
from transformers import HfArgumentParser, TrainerCallback, TrainingArguments

from hf_weightforces import WeightForcesArguments, WeightForcesCallback

FORCES = ("align", "inject", "decay", "rest", "delta")


def _state(trainer):
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def test_never_changes_training(tmp_path):
    plain = _state(train_tiny(tmp_path / "plain", max_steps=8))
    watched = _state(train_tiny(tmp_path / "watched", [WeightForcesCallback(per_matrix=True)], max_steps=8))
    assert plain.keys() == watched.keys()
    for k in plain:
        assert torch.equal(plain[k], watched[k]), k


def test_jsonl_rows_close_and_match_the_loss_steps(tmp_path, wf_rows):
    trainer = train_tiny(tmp_path, [WeightForcesCallback()], max_steps=12, logging_steps=4)
    rows = wf_rows(tmp_path)
    loss_steps = [h["step"] for h in trainer.state.log_history if "loss" in h]
    assert [r["step"] for r in rows] == loss_steps == [4, 8, 12]  # no duplicate from the final summary
    for r in rows:
        assert r["weightforces/steps"] == 4
        for g in ("transmission", "selection", "embedding", "other", "total"):
            budget = sum(abs(r[f"weightforces/{g}/{k}"]) for k in ("align", "inject", "decay"))
            assert budget > 0
            assert abs(r[f"weightforces/{g}/closure"]) < 2e-3 * budget, (g, r[f"weightforces/{g}/closure_rel"])
            assert r[f"weightforces/{g}/inject"] >= 0
            shares = sum(r[f"weightforces/{g}/{k}_share"] for k in ("align", "inject", "decay"))
            assert shares == pytest.approx(1.0)
        # no "value" class in GPT-NeoX (fused query_key_value is selection)
        assert "weightforces/value/align" not in r
        # totals are sums over the classes
        for k in FORCES + ("norm2", "numel"):
            parts = sum(r.get(f"weightforces/{g}/{k}", 0.0) for g in ("transmission", "selection", "embedding", "other"))
            assert parts == pytest.approx(r[f"weightforces/total/{k}"], rel=1e-9, abs=1e-15)
        # per-layer rows exist and add up to the layered parameters
        assert {"weightforces/layer_00/align", "weightforces/layer_01/align"} <= r.keys()
        n = sum(p.numel() for p in trainer.model.parameters())
        assert r["weightforces/total/numel"] == n
        norm2 = sum(float((p.detach().double() ** 2).sum()) for p in trainer.model.parameters())
    # squares are float32 products summed in float64: about 1e-9 relative
    assert rows[-1]["weightforces/total/norm2"] == pytest.approx(norm2, rel=2e-8)
    assert rows[-1]["weightforces/total/rms"] == pytest.approx(math.sqrt(norm2 / n), rel=1e-8)
    # the compact record offline tools need: lr and decay per param group at every step
    from hf_weightforces.integrations.sinks import read_jsonl

    schedule = read_jsonl(tmp_path / "weightforces" / "schedule.jsonl")
    assert [r["step"] for r in schedule] == list(range(1, 13))
    logged_lr = {h["step"]: h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h}
    for r in schedule:
        assert r["weight_decay"] == [0.1, 0.0] and r["skipped"] is False
        if r["step"] in logged_lr:
            assert r["lr"] == pytest.approx([logged_lr[r["step"]]] * 2)
    import json

    params = json.loads((tmp_path / "weightforces" / "params.json").read_text())
    assert sum(p["numel"] for p in params["params"]) == n
    assert {p["optimizer_group"] for p in params["params"]} == {0, 1}


def test_interval_mean_equals_mean_of_single_steps(tmp_path, wf_rows):
    """Forces are means per optimizer step, like train/loss: logging every step or every 4 agrees."""
    train_tiny(tmp_path / "one", [WeightForcesCallback(per_layer=False)], max_steps=8, logging_steps=1)
    train_tiny(tmp_path / "four", [WeightForcesCallback(per_layer=False)], max_steps=8, logging_steps=4)
    ones, fours = wf_rows(tmp_path / "one"), wf_rows(tmp_path / "four")
    assert [r["step"] for r in ones] == list(range(1, 9))
    for j, r in enumerate(fours):
        block = ones[4 * j : 4 * j + 4]
        for k in FORCES:
            key = f"weightforces/total/{k}"
            assert r[key] == pytest.approx(np.mean([b[key] for b in block]), rel=1e-9)
        sums = {k: sum(b[f"weightforces/total/{k}"] for b in block) for k in ("align", "inject", "decay")}
        share = abs(sums["align"]) / sum(abs(v) for v in sums.values())
        assert r["weightforces/total/align_share"] == pytest.approx(share, rel=1e-9)


@pytest.mark.slow
def test_wandb_keys_in_the_loss_rows(tmp_path, wf_rows):
    from wandb_reader import find_run_files, read_history

    trainer = train_tiny(tmp_path, [WeightForcesCallback()], max_steps=12, logging_steps=4, report_to=["wandb"])
    order = [type(cb).__name__ for cb in trainer.callback_handler.callbacks]
    assert order.index("WeightForcesCallback") < order.index("WandbCallback")
    (run_file,) = find_run_files(tmp_path)
    history = read_history(run_file)
    loss_rows = [h for h in history if "train/loss" in h]
    assert [h["train/global_step"] for h in loss_rows] == [4, 8, 12]
    jsonl = {r["step"]: r for r in wf_rows(tmp_path)}
    from hf_weightforces.integrations.wandb_layout import place

    for h in loss_rows:
        for k in FORCES + ("closure", "align_share", "norm2", "rms"):
            key = f"weightforces/total/{k}"  # renamed by section on W&B (integrations/wandb_layout.py)
            assert h[place(key).key] == pytest.approx(jsonl[h["train/global_step"]][key], rel=1e-12)
        assert not any("layer_" in k for k in h)  # per-layer values: heat maps at train end
    # our scalars never open rows of their own: W&B's step counter stays with the Trainer's rows
    assert all("train/loss" in h or "train/epoch" in h for h in history if any(k.startswith("forces/") for k in h))
    assert len(history) == len({h["_step"] for h in history})
    assert len(history) <= len(loss_rows) + 2  # + the final summary row + the heat maps and figures at train end


def test_flags_switch_it_on(tmp_path, wf_rows):
    parser = HfArgumentParser((TrainingArguments, WeightForcesArguments))
    _, wf = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--weight_forces", "--weight_forces_every", "2", "--weight_forces_patterns",
         '{"value": ["query_key_value"]}', "--weight_forces_weibull_every", "0", "--weight_forces_super_weights", "4",
         "--weight_forces_offset_sample_every", "4"]
    )
    (cb,) = wf.make_callbacks()
    assert isinstance(cb, WeightForcesCallback) and cb.every == 2
    assert (cb.weibull_every, cb.super_weights, cb.offset_sample_every) == (0, 4, 4)
    assert WeightForcesArguments().make_callbacks() == []
    train_tiny(tmp_path, [cb], max_steps=8, logging_steps=4)
    rows = wf_rows(tmp_path)
    assert [r["weightforces/steps"] for r in rows] == [2, 2]  # steps 2, 4 | 6, 8
    assert "weightforces/value/align" in rows[0] and "weightforces/selection/align" not in rows[0]
    with pytest.raises(ValueError, match="every"):
        WeightForcesArguments(weight_forces=True, weight_forces_every=0)
    with pytest.raises(ValueError, match="JSON"):
        WeightForcesArguments(weight_forces=True, weight_forces_patterns="{not json")


def test_bad_configuration_fails_before_training():
    # every optimizer is read now (tests/test_optimizers.py): what fails is a bad argument
    with pytest.raises(ValueError, match="observed_mode"):
        WeightForcesCallback(observed_mode="fast")
    with pytest.raises(ValueError, match="every"):
        WeightForcesCallback(every=0)
    with pytest.raises(ValueError, match="unknown weight class"):
        WeightForcesCallback(patterns={"attention": ["q_proj"]})


def test_skipped_step_is_not_counted(tmp_path, wf_rows):
    """A real GradScaler skips the step with an inf gradient; the hooks are driven as the Trainer does."""
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer
    from accelerate.state import AcceleratorState
    from transformers import TrainerControl, TrainerState

    args = TrainingArguments(str(tmp_path), report_to=[], use_cpu=True)  # resets Accelerate's state: first
    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(cpu=True)  # noqa: F841 - AcceleratedOptimizer reads this state
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    scaler = torch.amp.GradScaler("cpu")
    opt = AcceleratedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1), scaler=scaler)
    state, control = TrainerState(), TrainerControl()
    cb = WeightForcesCallback(per_layer=False)
    cb.on_train_begin(args, state, control, model=model, optimizer=opt)
    x, y = torch.randn(32, 8), torch.randn(32, 2)
    skipped = []
    for step in range(1, 9):
        cb.on_step_begin(args, state, control)
        scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
        if step in (1, 6):  # the first step (no state yet) and a later one
            model[0].weight.grad.view(-1)[0] = float("inf")
        opt.step()
        skipped.append(opt.step_was_skipped)
        cb.on_optimizer_step(args, state, control, optimizer=opt)
        opt.zero_grad()
        state.global_step += 1
        if step % 4 == 0:
            cb.on_log(args, state, control, logs={"loss": 0.0})
    cb.on_train_end(args, state, control)
    assert skipped == [True, False, False, False, False, True, False, False]
    rows = wf_rows(tmp_path)
    assert [r["weightforces/skipped_steps"] for r in rows] == [1, 1]
    assert [r["weightforces/steps"] for r in rows] == [3, 3]
    for r in rows:
        budget = sum(abs(r[f"weightforces/total/{k}"]) for k in ("align", "inject", "decay"))
        assert abs(r["weightforces/total/closure"]) < 1e-3 * budget


def test_parameter_without_gradient_is_skipped(tmp_path, wf_rows):
    model = tiny_model()
    model.register_parameter("unused", torch.nn.Parameter(torch.randn(8, 8)))  # never gets a gradient
    train_tiny(tmp_path, [WeightForcesCallback(per_matrix=True)], model=model, max_steps=8, logging_steps=4)
    r = wf_rows(tmp_path)[-1]
    assert r["weightforces/matrix/unused/align"] == 0 and r["weightforces/matrix/unused/delta"] == 0
    assert r["weightforces/matrix/unused/norm2"] > 0
    budget = sum(abs(r[f"weightforces/total/{k}"]) for k in ("align", "inject", "decay"))
    assert abs(r["weightforces/total/closure"]) < 2e-3 * budget


def test_a_failure_mid_run_warns_once_and_training_goes_on(tmp_path, wf_rows):
    cb = WeightForcesCallback()

    class Breaker(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == 5 and cb.monitor is not None:
                cb.monitor.add = None  # the next budget step raises TypeError

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = train_tiny(tmp_path, [cb, Breaker()], max_steps=10, logging_steps=4)
    assert trainer.state.global_step == 10
    ours = [w for w in caught if "weight forces switched off" in str(w.message)]
    assert len(ours) == 1
    assert [r["step"] for r in wf_rows(tmp_path)] == [4]


def test_a_failing_probe_is_dropped_alone(tmp_path, wf_rows):
    class Counting:
        """A minimal probe: counts steps, and breaks at the second log event."""

        def setup(self, entries, infos, ctx, args, state):
            self.steps, self.logs = 0, 0

        def on_gradients(self, step_id, model, optimizer):
            pass

        def on_step(self, step_id, optimizer, skipped):
            self.steps += 1

        def collect(self, step):
            self.logs += 1
            if self.logs == 2:
                raise ZeroDivisionError("probe bug")
            return {"weightforces/probe/steps": float(self.steps)}

        def state_dict(self):
            return {"steps": self.steps}

        def load_state_dict(self, state):
            self.steps = state["steps"]

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_tiny(tmp_path, [WeightForcesCallback(probes=[Counting()])], max_steps=12, logging_steps=4)
    rows = wf_rows(tmp_path)
    assert [r.get("weightforces/probe/steps") for r in rows] == [4.0, None, None]
    assert all(np.isfinite(r["weightforces/total/align"]) for r in rows)  # the budget went on
    assert sum("Counting switched off" in str(w.message) for w in caught) == 1
