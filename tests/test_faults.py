"""Fault injection: every write the callback makes fails in turn, resume meets malformed state and
records, a sink breaks.  Training must finish with bit-identical weights, with every row that
could be written, one warning per kind of failure, and no file left open."""

from __future__ import annotations

import errno
import gc
import json
import math
import os
import shutil
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import tiny_model, train_tiny
from transformers import TrainerCallback

from hf_weightforces import WeightForcesCallback
from hf_weightforces.core.integral import RunIntegral
from hf_weightforces.core.records import read_rows
from hf_weightforces.integrations import state as state_module
from hf_weightforces.integrations.sinks import JsonlSink, close_sinks, log_to_sinks
from hf_weightforces.integrations.state import STATE_FILE, load_state

pytestmark = pytest.mark.slow
RUN = dict(max_steps=8, logging_steps=2, save_strategy="steps", save_steps=4)


def _weights(trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """The same run without the callback: the weights every faulty run must reproduce."""
    return _weights(train_tiny(tmp_path_factory.mktemp("plain"), **RUN))


def _train_warned(out, callbacks, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = train_tiny(out, callbacks, **{**RUN, **kw})
    ours = [str(w.message) for w in caught if str(w.message).startswith("weight forces:")]
    return trainer, ours


def _same(a, b) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


class Stateful:
    """A probe with JSON and tensor state; ``bad`` makes its state unserialisable."""

    def __init__(self, bad: bool = False) -> None:
        self.bad = bad

    def setup(self, entries, infos, ctx, args, state):
        self.steps = 0

    def on_gradients(self, step_id, model, optimizer):
        pass

    def on_step(self, step_id, optimizer, skipped):
        self.steps += 1

    def collect(self, step):
        return {"weightforces/probe/steps": float(self.steps)}

    def state_dict(self):
        return {"steps": self.steps, "when": object()} if self.bad else {"steps": self.steps}

    def tensors_state(self):
        return {"seen": torch.full((3,), float(self.steps))}

    def load_tensors_state(self, tensors):
        self.seen = tensors["seen"]

    def load_state_dict(self, state):
        self.steps = int(state["steps"])


def _disk_full_for(monkeypatch, prefix: str) -> None:
    """os.replace onto files whose name starts with ``prefix`` fails with ENOSPC (a full disk)."""
    real = os.replace

    def replace(src, dst, *a, **k):
        if os.path.basename(os.fspath(dst)).startswith(prefix):
            raise OSError(errno.ENOSPC, "No space left on device", os.fspath(dst))
        return real(src, dst, *a, **k)

    monkeypatch.setattr(state_module.os, "replace", replace)


@pytest.mark.parametrize("fault", ["folder_in_the_way", "disk_full"])
def test_state_write_fails_at_every_save(tmp_path, plain, wf_rows, monkeypatch, fault):
    if fault == "disk_full":
        _disk_full_for(monkeypatch, "weightforces_")
    else:  # a directory where the temporary file must go: open() fails for root too
        for step in (4, 8):
            (tmp_path / f"checkpoint-{step}" / f"{STATE_FILE}.tmp").mkdir(parents=True)
    trainer, ours = _train_warned(tmp_path, [WeightForcesCallback(weibull_every=4, probes=[Stateful()])])
    _same(_weights(trainer), plain)
    assert [r["step"] for r in wf_rows(tmp_path)] == [2, 4, 6, 8]
    assert [r["weightforces/probe/steps"] for r in wf_rows(tmp_path)] == [2.0, 4.0, 6.0, 8.0]
    state_warnings = [m for m in ours if STATE_FILE in m]
    assert len(state_warnings) == 1 and "restarts the force integrals" in state_warnings[0]
    for step in (4, 8):
        ckpt = tmp_path / f"checkpoint-{step}"
        assert not (ckpt / STATE_FILE).exists()
        assert (ckpt / "model.safetensors").is_file()  # the Trainer's own save is untouched
        leftovers = {p.name for p in ckpt.iterdir() if p.name.endswith(".tmp") and p.is_file()}
        assert not leftovers


def test_unserialisable_probe_state_loses_that_probe_alone(tmp_path, plain, wf_rows):
    good, bad = Stateful(), Stateful(bad=True)
    trainer, ours = _train_warned(tmp_path, [WeightForcesCallback(weibull_every=4, probes=[bad, good])])
    _same(_weights(trainer), plain)
    assert sum("Stateful (probe 0)" in m for m in ours) == 2  # once per save: the state file was still written
    data = json.loads((tmp_path / "checkpoint-8" / STATE_FILE).read_text())
    assert data["probes"] == [{}, {"steps": 8}]
    assert data["probe_tensors"] == [None, "weightforces_probe_1.safetensors"]
    assert RunIntegral.from_dict(data["integral"], data["integral"]["names"]).started


def test_an_unexpected_error_at_train_start_switches_off_and_trains_on(tmp_path, plain, monkeypatch):
    """Not bad configuration (that raises at train start): a bug while setting up warns once and
    leaves the monitor off; the run finishes with the weights of a run without it."""
    from hf_weightforces import distributed

    def broken(self, model, optimizer):
        raise RuntimeError("planted set-up failure")

    monkeypatch.setattr(distributed.ShardContext, "entries", broken)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = train_tiny(tmp_path, [WeightForcesCallback()], **RUN)
    said = [str(w.message) for w in caught if "planted set-up failure" in str(w.message)]
    assert len(said) == 1 and "on_train_begin" in said[0]
    _same(_weights(trainer), plain)
    assert trainer.state.global_step == 8


def test_bad_configuration_still_fails_at_train_start(tmp_path):
    """A real configuration error (nothing to split without AdamW's moments) stops the run before any step."""
    with pytest.raises(ValueError, match="rounding_split needs AdamW"):
        train_tiny(tmp_path, [WeightForcesCallback(rounding_split=True)], optim="sgd", **RUN)


def test_records_folder_unusable_from_the_start(tmp_path, plain):
    (tmp_path / "weightforces").write_text("a file where the records folder should be")
    trainer, ours = _train_warned(tmp_path, [WeightForcesCallback()])
    _same(_weights(trainer), plain)
    assert any("metrics.jsonl" in m and "not written" in m for m in ours)
    assert trainer.state.global_step == 8


def test_metrics_file_breaks_mid_run_the_schedule_goes_on(tmp_path, wf_rows):
    class BreakMetrics(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == 3:  # after the first row: the file becomes a folder
                path = tmp_path / "weightforces" / "metrics.jsonl"
                shutil.move(path, tmp_path / "first_rows.jsonl")
                path.mkdir()

    trainer, ours = _train_warned(tmp_path, [WeightForcesCallback(), BreakMetrics()], save_strategy="no")
    assert trainer.state.global_step == 8
    assert [r["step"] for r in read_rows(tmp_path / "first_rows.jsonl").rows] == [2]
    assert len([m for m in ours if "metrics.jsonl" in m]) == 1
    schedule = read_rows(tmp_path / "weightforces" / "schedule.jsonl").rows
    assert [r["step"] for r in schedule] == list(range(1, 9))


def test_a_failing_wandb_sink_is_dropped_alone(tmp_path, wf_rows, monkeypatch):
    from wandb_reader import find_run_files, read_history

    from hf_weightforces.integrations.sinks import WandbSink

    calls = []
    real = WandbSink.log

    def flaky(self, metrics, step):
        calls.append(step)
        if len(calls) == 2:
            raise ConnectionError("wandb service went away")
        real(self, metrics, step)

    monkeypatch.setattr(WandbSink, "log", flaky)
    trainer, ours = _train_warned(tmp_path, [WeightForcesCallback()], report_to=["wandb"], save_strategy="no")
    assert calls == [2, 4]  # dropped after its failure, never called again
    assert [r["step"] for r in wf_rows(tmp_path)] == [2, 4, 6, 8]  # the JSONL sink kept every row
    assert len([m for m in ours if "WandbSink" in m]) == 1
    history = read_history(find_run_files(tmp_path)[0])
    with_keys = [h["train/global_step"] for h in history if any(k.endswith("total/align") for k in h)]
    assert with_keys == [2]
    assert [h["train/global_step"] for h in history if "train/loss" in h] == [2, 4, 6, 8]


def test_sink_helpers_drop_and_close_each_alone(tmp_path):
    class Broken:
        def log(self, metrics, step):
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self):
            raise OSError(errno.EIO, "I/O error")

    good = JsonlSink(tmp_path / "m.jsonl")
    sinks = [Broken(), good]
    with pytest.warns(RuntimeWarning, match="dropped"):
        log_to_sinks(sinks, {"a": 1.0}, 1)
    log_to_sinks(sinks, {"a": math.nan}, 2)
    log_to_sinks(sinks, {"a": 3.0}, 2)  # a step already written is never written twice
    assert sinks == [good]
    with pytest.warns(RuntimeWarning, match="closing"):
        close_sinks([Broken(), good])
    assert [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()] == [
        {"step": 1, "a": 1.0}, {"step": 2, "a": None}]


# ------------------------------------------------------------------ resume from malformed state
NAMES = ["a.weight", "b.weight"]


def _good_state() -> dict:
    integral = RunIntegral(NAMES)
    integral.start(np.array([1.0, 2.0]))
    return {"integral": integral.to_dict(), "next_weibull": 8, "step": 4, "probes": [], "probe_tensors": []}


def _mutations():
    yield "valid", lambda d: d, True
    yield "next_weibull_text", lambda d: {**d, "next_weibull": "soon"}, True  # that field alone restarts
    yield "probes_not_a_list", lambda d: {**d, "probes": 42}, True
    yield "integral_null", lambda d: {**d, "integral": None}, False
    yield "not_an_object", lambda d: [d], False
    yield "short_arrays", lambda d: {**d, "integral": {**d["integral"], "dense": [0.0]}}, False
    yield "text_numbers", lambda d: {**d, "integral": {**d["integral"], "sampled": ["0", "0"]}}, False
    yield "other_names", lambda d: {**d, "integral": {**d["integral"], "names": ["x", "y"]}}, False
    yield "names_not_list", lambda d: {**d, "integral": {**d["integral"], "names": "ab"}}, False
    yield "bad_start_fit", lambda d: {**d, "integral": {**d["integral"], "start_fit": {"total": [1.0]}}}, False
    yield "bool_as_number", lambda d: {**d, "integral": {**d["integral"], "norm2_start": [True, 1.0]}}, False


@pytest.mark.parametrize("name,mutate,usable", list(_mutations()), ids=[m[0] for m in _mutations()])
def test_load_state_validates_every_field(tmp_path, caplog, name, mutate, usable):
    ckpt = tmp_path / "checkpoint-4"
    ckpt.mkdir()
    (ckpt / STATE_FILE).write_text(json.dumps(mutate(_good_state())))
    args, st = SimpleNamespace(output_dir=str(tmp_path), resume_from_checkpoint=str(ckpt)), SimpleNamespace(global_step=4)
    with caplog.at_level("WARNING"):
        data = load_state(args, st, NAMES)
    assert (data is not None) == usable
    if usable:
        assert isinstance(data["next_weibull"], int) and isinstance(data["probes"], list)
        assert data["integral"].dense.shape == (2,)
    else:
        assert any("cannot use" in r.getMessage() for r in caplog.records)


def test_resume_from_malformed_state_and_records_keeps_every_row(tmp_path, wf_rows):
    from transformers import GPTNeoXForCausalLM

    train_tiny(tmp_path, [WeightForcesCallback(weibull_every=4)], **RUN)
    ckpt = tmp_path / "checkpoint-4"
    data = json.loads((ckpt / STATE_FILE).read_text())
    data["integral"]["dense"] = data["integral"]["dense"][:-1]  # wrong length: used to switch the monitor off later
    data["next_weibull"] = "soon"
    (ckpt / STATE_FILE).write_text(json.dumps(data))
    metrics = tmp_path / "weightforces" / "metrics.jsonl"
    original = metrics.read_text().splitlines()
    first = json.loads(original[0])
    first["weightforces/total/weibull_k"] = None  # a null that must stay null
    lines = [json.dumps(first), "42", '{"step": "3", "x": 1}', "[1, 2]", *original[1:]]
    metrics.write_text("\n".join(lines) + "\n")
    _, ours = _train_warned(tmp_path, [WeightForcesCallback(weibull_every=4)],
                            model=GPTNeoXForCausalLM.from_pretrained(ckpt), resume=str(ckpt), save_strategy="no")
    assert not any("switched off" in m for m in ours)
    text = metrics.read_text()
    assert "NaN" not in text and "Infinity" not in text
    rows = [json.loads(line) for line in text.splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6, 8]
    assert rows[0]["weightforces/total/weibull_k"] is None
    assert all(math.isfinite(r["weightforces/total/align"]) for r in rows)
    kept = tmp_path / "weightforces" / "previous" / "1" / "metrics.jsonl"
    assert kept.read_text().splitlines() == lines  # what the resume dropped is kept whole


# ------------------------------------------------------------------ no lost rows, no open files
def _open_files_under(folder: Path) -> list[str]:
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(folder)):
            out.append(target)
    return out


@pytest.mark.filterwarnings("error::ResourceWarning")
def test_two_trains_and_a_rerun_keep_every_row(tmp_path):
    from conftest import tiny_data
    from transformers import Trainer

    cb = WeightForcesCallback()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        trainer = train_tiny(tmp_path, [cb], max_steps=4, logging_steps=2)
        assert _open_files_under(tmp_path) == []
        trainer.train()  # the same Trainer again: steps 1..4 once more
        again = Trainer(model=tiny_model(1), args=trainer.args, train_dataset=tiny_data(), callbacks=[WeightForcesCallback()])
        again.train()  # a rerun into the same output folder
        del trainer, again
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]
    assert _open_files_under(tmp_path) == []
    folder = tmp_path / "weightforces"
    runs = [folder / "previous" / "1", folder / "previous" / "2", folder]
    for run in runs:
        rows = read_rows(run / "metrics.jsonl").rows
        assert [r["step"] for r in rows] == [2, 4], run
        assert [r["step"] for r in read_rows(run / "schedule.jsonl").rows] == [1, 2, 3, 4], run
        assert (run / "params.json").is_file()
    assert not (folder / "previous" / "3").exists()


# ------------------------------------------------------------------ a GradScaler skip with fused AdamW
@pytest.mark.parametrize("deferred", [False, True])
def test_fused_adamw_overflow_is_counted_as_skipped(tmp_path, wf_rows, deferred):
    """The Trainer's default adamw_torch_fused takes the scaler's inf check into its kernel, so
    Accelerate's step_was_skipped stays False on an overflow; the monitor still counts it skipped.
    ``deferred``: the flag is left where it is, as on an accelerator (no host sync in the step);
    the planned pass masks the step by the counters the kernel put back, and the log event reads
    the count."""
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer
    from accelerate.state import AcceleratorState
    from transformers import TrainerControl, TrainerState, TrainingArguments

    args = TrainingArguments(str(tmp_path), report_to=[], use_cpu=True)
    AcceleratorState._reset_state(reset_partial_state=True)
    Accelerator(cpu=True)  # AcceleratedOptimizer reads this state
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    scaler = torch.amp.GradScaler("cpu")
    opt = AcceleratedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, fused=True),
                               scaler=scaler)
    state, control = TrainerState(), TrainerControl()
    cb = WeightForcesCallback(per_layer=False)
    cb.on_train_begin(args, state, control, model=model, optimizer=opt)
    assert cb._overflow.defer  # a single process reading AdamW's moments: the planned pass masks skips
    if deferred:
        cb._overflow.read_now = ()  # the CPU flag treated like a device one
    x, y = torch.randn(32, 8), torch.randn(32, 2)
    flags, moved = [], []
    for step in range(1, 9):
        cb.on_step_begin(args, state, control)
        scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
        if step in (2, 6):
            model[0].weight.grad.view(-1)[0] = float("inf")
        before = model[0].weight.detach().clone()
        opt.step()
        flags.append(opt.step_was_skipped)
        moved.append(not torch.equal(before, model[0].weight))
        cb.on_optimizer_step(args, state, control, optimizer=opt)
        opt.zero_grad()
        state.global_step += 1
        if step % 4 == 0:
            cb.on_log(args, state, control, logs={"loss": 0.0})
    cb.on_train_end(args, state, control)
    assert not any(flags)  # what Accelerate says...
    assert moved == [True, False, True, True, True, False, True, True]  # ...and what happened
    rows = wf_rows(tmp_path)
    assert [r["weightforces/skipped_steps"] for r in rows] == [1, 1]
    assert [r["weightforces/steps"] for r in rows] == [3, 3]
    for r in rows:  # a skipped step counted as taken would add forces with no change of the weights
        budget = sum(abs(r[f"weightforces/total/{k}"]) for k in ("align", "inject", "decay"))
        assert abs(r["weightforces/total/closure"]) < 1e-3 * budget
    schedule = read_rows(tmp_path / "weightforces" / "schedule.jsonl").rows
    assert [r["step"] for r in schedule if r["skipped"]] == [2, 6]


def test_jsonl_rows_are_strict_json_whatever_the_values(tmp_path):
    """A row of floats is written as it is; NaN and infinities become null (also inside lists), other
    numbers floats, flags and text as they are: every line parses as strict JSON."""
    sink = JsonlSink(tmp_path / "rows.jsonl")
    rows = [({"a": 0.1, "b": -2.5e-300}, 1), ({"a": math.nan, "b": math.inf}, 2),
            ({"a": np.float32(0.25), "n": 3, "flag": True, "lr": [1e-4, math.nan]}, 3)]
    sink.write_rows(rows)
    lines = (tmp_path / "rows.jsonl").read_text().splitlines()
    parsed = [json.loads(line, parse_constant=lambda c: pytest.fail(f"non-strict JSON: {c}")) for line in lines]
    assert parsed == [{"step": 1, "a": 0.1, "b": -2.5e-300}, {"step": 2, "a": None, "b": None},
                      {"step": 3, "a": 0.25, "n": 3.0, "flag": True, "lr": [1e-4, None]}]
    assert lines[0] == json.dumps({"step": 1, "a": 0.1, "b": -2.5e-300})


@pytest.mark.parametrize("every", [1, 2])
def test_a_failing_measure_at_a_chain_end_warns_once_and_trains_on(tmp_path, plain, monkeypatch, every):
    """The squared norms measured where a chain of planned steps ends (the log event; with every=2,
    right after each budget step) fail from the second call on: one warning, the monitor off,
    training to the end with the weights of a run without it."""
    from hf_weightforces.core import kernels

    calls, real = [], kernels.SquaredNorms.__call__

    def failing(self):
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("measure failed")
        return real(self)

    monkeypatch.setattr(kernels.SquaredNorms, "__call__", failing)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = train_tiny(tmp_path, [WeightForcesCallback(every=every, kernel="exact", quiet=True)], **RUN)
    ours = [str(w.message) for w in caught if str(w.message).startswith("weight forces switched off")]
    assert trainer.state.global_step == RUN["max_steps"]
    assert len(calls) >= 2 and len(ours) == 1 and "measure failed" in ours[0], ours
    _same(_weights(trainer), plain)
