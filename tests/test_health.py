"""Health verdicts (docs/health.md): each condition on synthetic rows (raise, stay, clear), the float32
floor against PyTorch's own AdamW arithmetic, and real Trainer runs that plant each condition or
are healthy, live (health.jsonl, the console, W&B) and offline (``hf-weightforces diagnose RUN_DIR``)."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import warnings

import pytest
import torch
from conftest import tiny_model, train_tiny
from transformers import TrainerCallback

from hf_weightforces import WeightForcesCallback
from hf_weightforces.core.health import CONDITIONS, EXTERNAL_FACTOR, WATCHED, HealthState, closure_floor
from hf_weightforces.integrations.console import CONSOLE_LOGGER
from hf_weightforces.integrations.health import HEALTH_FILE, HEALTH_LOGGER, HealthWatch

# ----------------------------------------------------------------------------------------------
# synthetic rows
# ----------------------------------------------------------------------------------------------

HEALTHY = dict(align=1e-2, inject=2e-3, decay=-1e-3, rest=1e-8, rounding=0.0, closure=0.0, decay_ratio=1.0,
               norm2=100.0, nonfinite_steps=0.0)
FLOOR = closure_floor(HEALTHY["norm2"], HEALTHY["inject"])


def _row(steps: int = 4, **aggregates: dict) -> dict:
    """One log event's metrics: ``aggregate=dict(key=value)`` over the healthy defaults."""
    row = {"weightforces/steps": float(steps)}
    for name, keys in aggregates.items():
        for k, v in {**HEALTHY, **keys}.items():
            row[f"weightforces/{name}/{k}"] = v
    return row


def _feed(rows: list[dict], start: int = 4, every: int = 4) -> tuple[HealthState, list[list]]:
    state, out = HealthState(), []
    for i, row in enumerate(rows):
        out.append([(e.condition, e.aggregate, e.state) for e in state.update(row, start + i * every)])
    return state, out


def test_healthy_rows_raise_nothing():
    _, out = _feed([_row(total={}, matrices={}, other={"decay": 0.0})] * 5)
    assert out == [[]] * 5


@pytest.mark.parametrize("name, bad, between, good", [
    ("external_change", {"closure": 100 * FLOOR}, {"closure": 10 * FLOOR}, {"closure": 0.5 * FLOOR}),
    ("rounding_loss", {"rounding": -0.9e-2}, {"rounding": -0.45 * 1.3e-2}, {"rounding": -1e-4}),
    ("nonfinite", {"nonfinite_steps": 2.0, **dict.fromkeys(("align", "inject", "decay", "closure"), math.nan)},
     None, {}),
])
def test_raise_once_stay_and_clear_after_two_healthy_events(name, bad, between, good):
    """Raised at the first bad event, once; kept while bad or between the thresholds (hysteresis);
    cleared only after two consecutive healthy events."""
    rows = [_row(total={}), _row(total=bad), _row(total=bad)]
    if between is not None:
        rows.append(_row(total=between))
    rows += [_row(total=good), _row(total=bad), _row(total=good), _row(total=good), _row(total=good)]
    state, out = _feed(rows)
    events = [e for batch in out for e in batch]
    assert events == [(name, "total", "raised"), (name, "total", "cleared")], out
    raised_at = out.index([(name, "total", "raised")])
    assert raised_at == 1
    assert out.index([(name, "total", "cleared")]) == len(rows) - 2  # one healthy event reset by a bad one
    ep, = state.episodes
    assert (ep.raised, ep.cleared) == (8, 4 + 4 * (len(rows) - 2))


def test_rounding_loss_is_fraction_of_gross_budget_and_above_the_float32_floor():
    """Half of |A| + |I| + |D|, not of the signed change: at the balance (A + I = -D) a small rounding
    is no loss; and a rounding within what float32 can do (a cancelling aggregate at a tiny lr) is not."""
    balanced = dict(align=5e-3, inject=1e-3, decay=-6e-3)  # intended change ~0
    _, out = _feed([_row(total={**balanced, "rounding": 1e-3})])  # 8% of the gross budget, all of the net
    assert out == [[]]
    tiny = dict(align=1e-7, inject=1e-9, decay=0.0, norm2=320.0)  # budget below the float32 floor of ||w||^2
    assert 0.9e-7 < 2 * closure_floor(320.0, 1e-9)
    _, out = _feed([_row(total={**tiny, "rounding": 0.9e-7})])
    assert out == [[]]
    _, out = _feed([_row(total={**balanced, "rounding": -7e-3})])
    assert out == [[("rounding_loss", "total", "raised")]]


def test_decay_not_applied_weighs_the_run_not_one_interval():
    """No decay from the first event: raised at once.  A schedule's tail below float32 resolution
    (interval ratio 0 after a run that applied its decay): silent.  19% more than asked: silent."""
    none = dict(decay=0.0, decay_ratio=0.0)
    _, out = _feed([_row(total=none, other={"decay": 0.0})] * 3)
    assert out == [[("decay_not_applied", "total", "raised")], [], []]
    _, out = _feed([_row(total={})] * 20 + [_row(total=none)] * 3)
    assert out == [[]] * 23
    _, out = _feed([_row(total={"decay_ratio": 1.192})] * 3)
    assert out == [[]] * 3
    # a schedule's tail of 30 intervals with none applied after 20 that applied one float32 step, with
    # 52 of the 100 in ||w||^2 decayed: counted at half a step of the decayed part (0.63), not of all (0.44)
    one_step = dict(decay_ratio=1.19, decay=-2 * 2.0**-24 * 52.0)
    _, out = _feed([_row(total=one_step)] * 20 + [_row(total=none)] * 30)
    assert out == [[]] * 50
    # coupled decay (SGD): its ratio is 0 by construction, the condition is not read
    state = HealthState(decay_rule="coupled").feed({"step": 4 * i, **_row(total=none)} for i in range(1, 4))
    assert state.events == []
    # a warm-up that starts below resolution: raised, then cleared once the decay applied catches up
    state, out = _feed([_row(total=none)] + [_row(total={})] * 4)
    assert [e for b in out for e in b] == [("decay_not_applied", "total", "raised"),
                                          ("decay_not_applied", "total", "cleared")]


def test_decay_dominates_needs_time_and_a_run_never_near_its_balance():
    strong = dict(align=1e-3, inject=1e-3, decay=-2e-2, norm2=0.06)  # share 0.91, e-folding 3 steps
    state, out = _feed([_row(total=strong)] * 3)
    assert out == [[("decay_dominates", "total", "raised")], [], []]
    assert "equilibrium ||w||^2 0.1x the current one" in state.events[0].message
    # the e-folding time longer than the run so far: not yet
    _, out = _feed([_row(total={**strong, "norm2": 10.0})] * 3)
    assert out == [[]] * 3
    # once near its balance (the annealing of a run that was at equilibrium): never
    _, out = _feed([_row(total={})] + [_row(total=strong)] * 3)
    assert out == [[]] * 4


def test_only_watched_aggregates_and_each_step_once():
    bad = {"closure": 1e3 * FLOOR}
    state, out = _feed([_row(layer_00=bad, **{"matrix/x.weight": bad}), _row(total=bad, value=bad)])
    assert out == [[], [("external_change", "total", "raised"), ("external_change", "value", "raised")]]
    assert state.update(_row(matrices=bad), 8) == []  # a step already seen (the Trainer's final summary)
    assert "layer_00" not in WATCHED


def test_nonfinite_rows_are_no_evidence_for_the_others():
    state, out = _feed([_row(total={"closure": 1e3 * FLOOR}),
                        _row(total={"nonfinite_steps": 1.0, "closure": math.nan, "align": math.nan}),
                        _row(total={}), _row(total={})])
    assert out[1] == [("nonfinite", "total", "raised")]
    assert ("external_change", "total", "cleared") in out[3] and ("external_change", "total", "cleared") not in out[2]
    assert math.isnan(_feed([_row(total={"norm2": math.inf})])[0].events[0].value)


def test_events_serialise_with_the_documented_fields():
    state, _ = _feed([_row(total={"closure": 1e3 * FLOOR})])
    line = state.events[0].to_json()
    assert set(line) == {"step", "condition", "aggregate", "state", "value", "threshold", "message"}
    assert line["threshold"] == EXTERNAL_FACTOR and line["value"] == pytest.approx(1e3)
    assert "Remedy:" in line["message"] and CONDITIONS["external_change"].remedy in line["message"]
    json.dumps(line, allow_nan=False)


# ----------------------------------------------------------------------------------------------
# the float32 floor against PyTorch's AdamW
# ----------------------------------------------------------------------------------------------


def _closure_over_floor(w0: torch.Tensor, lr: float, wd: float, steps: int = 6, seed: int = 0) -> list[float]:
    """|closure| / floor of each step of torch.optim.AdamW (float32, for-loop) as the monitor rebuilds it."""
    from hf_weightforces.core.aggregates import describe
    from hf_weightforces.core.monitor import ForceMonitor
    from hf_weightforces.core.rows import tensor_rows

    gen = torch.Generator().manual_seed(seed)
    p = torch.nn.Parameter(w0.clone())
    opt = torch.optim.AdamW([p], lr=lr, weight_decay=wd, foreach=False)
    mon = ForceMonitor([describe("layers.0.mlp.dense_h_to_4h.weight", 2, p.numel())], sample_every=None)
    out = []
    for _ in range(steps):
        mon.observe_norms([p.detach()])
        p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
        st = opt.state[p]
        mon.add([tensor_rows([0], [p.detach()], [st["exp_avg"]], [st["exp_avg_sq"]], [st["step"]], [lr], [wd],
                             [(0.9, 0.999)], [1e-8], mon.norm2)])
        row = mon.summarize(mon.pack().numpy(), 1, per_layer=False)
        mon.reset()
        g = "weightforces/total/"
        out.append(abs(row[g + "closure"]) / closure_floor(row[g + "norm2"], row[g + "inject"]))
    return out


@pytest.mark.parametrize("lr, wd, tight", [(1e-2, 0.1, False), (1e-3, 0.1, False), (5e-5, 0.01, False),
                                         (1e-5, 0.01, False), (3.6e-6, 0.01, True), (2e-6, 0.01, False)])
def test_the_floor_bounds_what_float32_adamw_leaves_in_the_closure(lr, wd, tight):
    """Matrices at 0.02 and norm gains at 1 + tiny (mantissas near 1, the worst case for the decay
    product's rounding, docs/health.md): every step's |closure| stays below its floor; at ηλ one or
    two float32 steps from 1 the systematic part gets within a few times of it (the bound is tight)."""
    torch.manual_seed(1)
    matrix = torch.randn(256, 256) * 0.02
    gains = 1.0 + torch.rand(4096) * 1e-3
    ratios = _closure_over_floor(matrix, lr, wd) + _closure_over_floor(gains, lr, wd)
    assert max(ratios) < 1.0, ratios
    if tight:  # c = 1 - 2^-24: every mantissa-1 gain shrinks by a whole ulp instead of half of one
        assert max(ratios) > 0.25, ratios  # measured 0.50


# ----------------------------------------------------------------------------------------------
# HealthWatch without a Trainer
# ----------------------------------------------------------------------------------------------


def test_watch_writes_lines_speaks_once_per_condition_and_survives_an_unwritable_folder(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger=HEALTH_LOGGER)
    watch = HealthWatch(tmp_path / "wf")
    bad = {"closure": 1e3 * FLOOR}
    watch.log(_row(total=bad, matrices=bad, other={}), 4)
    lines = [json.loads(x) for x in (tmp_path / "wf" / HEALTH_FILE).read_text().splitlines()]
    assert [(x["aggregate"], x["state"]) for x in lines] == [("total", "raised"), ("matrices", "raised")]
    said = [r.getMessage() for r in caplog.records if r.name == HEALTH_LOGGER]
    assert len(said) == 1 and "external_change raised at step 4 on total, matrices" in said[0]
    assert watch.summary_lines()[0].startswith("external_change: total (from step 4, still raised at 4)")

    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        broken = HealthWatch(blocker / "wf")
        broken.log(_row(total=bad), 4)  # no file, but the console line and the state go on
    assert any("health events are not written" in str(w.message) for w in caught)
    assert broken.state.active and sum(r.name == HEALTH_LOGGER for r in caplog.records) == 2


# ----------------------------------------------------------------------------------------------
# real Trainer runs
# ----------------------------------------------------------------------------------------------


class ShrinkWeights(TrainerCallback):
    """Something besides the optimizer: every weight times 0.999 after each step."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(0.999)


class PlantInf(TrainerCallback):
    """An inf in one weight after step ``at``."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.at:
            with torch.no_grad():
                model.gpt_neox.layers[0].mlp.dense_h_to_4h.weight[0, 0] = float("inf")


def _health_lines(out) -> list[dict]:
    path = out / "weightforces" / HEALTH_FILE
    return [json.loads(line) for line in path.read_text().splitlines()]


def _diagnose_json(out) -> dict:
    from hf_weightforces.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["diagnose", str(out), "--json"]) == 0
    return json.loads(buf.getvalue())


def _said(caplog, logger: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == logger]


@pytest.mark.slow
@pytest.mark.parametrize("lr, wd, warmup", [(1e-3, 0.1, 3), (5e-5, 0.01, 0)])
def test_healthy_fp32_runs_raise_nothing(tmp_path, caplog, lr, wd, warmup):
    """lr 1e-3 / wd 0.1 and the Trainer's defaults (lr 5e-5, wd 0.01, linear to 0, no warm-up), 48
    steps: no line, no warning, the table says so and shows the closure against its floor."""
    caplog.set_level(logging.INFO)
    train_tiny(tmp_path, [WeightForcesCallback(weibull_every=0)], max_steps=48, logging_steps=4, learning_rate=lr,
               weight_decay=wd, warmup_steps=warmup)
    assert _health_lines(tmp_path) == []
    assert _said(caplog, HEALTH_LOGGER) == []
    table = _said(caplog, CONSOLE_LOGGER)[-1]
    assert "health: no condition raised" in table and "closure/floor" in table
    total = next(line for line in table.splitlines() if line.startswith("total"))
    assert float(total.split()[5].rstrip("x")) < 1.0  # below its float32 floor
    assert _diagnose_json(tmp_path)["events"] == []


def _planted(kind: str, out):
    kw = dict(max_steps=16, logging_steps=4)
    callbacks: list = [WeightForcesCallback(weibull_every=0)]
    if kind == "bf16":
        kw.update(model=tiny_model(0).to(torch.bfloat16), learning_rate=1e-4, weight_decay=0.01, warmup_steps=0)
    elif kind == "no_decay":
        kw.update(learning_rate=2e-6, weight_decay=0.01, warmup_steps=0)
    elif kind == "shrink":
        kw.update(learning_rate=1e-3, weight_decay=0.1)
        callbacks.append(ShrinkWeights())
    elif kind == "inf":
        kw.update(learning_rate=1e-3, weight_decay=0.1)
        callbacks.append(PlantInf(at=5))
    elif kind == "strong_decay":
        kw.update(max_steps=24, learning_rate=1e-3, weight_decay=30.0, warmup_steps=0, lr_scheduler_type="constant")
    train_tiny(out, callbacks, **kw)


#: planted run -> (condition, aggregates that must be raised, aggregates that must not)
PLANTED = {
    "bf16": ("rounding_loss", {"total", "other"}, set()),
    "no_decay": ("decay_not_applied", {"total", "matrices", "transmission", "selection", "embedding"}, {"other"}),
    "shrink": ("external_change", {"total", "matrices", "transmission", "selection", "embedding", "other"}, set()),
    "inf": ("nonfinite", {"total", "matrices", "transmission"}, set()),
    "strong_decay": ("decay_dominates", {"matrices", "transmission"}, {"other"}),
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(PLANTED))
def test_planted_runs_raise_their_condition_live_and_offline(tmp_path, caplog, kind):
    caplog.set_level(logging.INFO)
    _planted(kind, tmp_path)
    condition, must, must_not = PLANTED[kind]
    lines = _health_lines(tmp_path)
    raised = {x["aggregate"] for x in lines if x["state"] == "raised" and x["condition"] == condition}
    assert {x["condition"] for x in lines} == {condition}, lines
    assert must <= raised and not (must_not & raised), raised
    for x in lines:
        assert set(x) == {"step", "condition", "aggregate", "state", "value", "threshold", "message"}
        assert x["threshold"] == CONDITIONS[condition].threshold if x["state"] == "raised" else CONDITIONS[condition].clear
        if x["state"] == "raised":
            assert CONDITIONS[condition].remedy in x["message"] and x["aggregate"] in x["message"]
    said = _said(caplog, HEALTH_LOGGER)
    assert said and all(f"weight forces health: {condition} " in s for s in said)
    assert len(said) == len({(x["step"], x["state"]) for x in lines})  # one line per event, all aggregates in it
    table = _said(caplog, CONSOLE_LOGGER)[-1]
    assert f"\n  {condition}: " in table and "Remedy:" in table
    offline = _diagnose_json(tmp_path)  # the same verdicts from metrics.jsonl
    assert offline["events"] == lines


@pytest.mark.slow
def test_w_and_b_gets_an_alert(tmp_path):
    """An offline W&B run: the alert is in the run's record file (tests/wandb_reader.py)."""
    from wandb_reader import find_run_files, iter_records, wait_until_finished

    train_tiny(tmp_path, [WeightForcesCallback(weibull_every=0), ShrinkWeights()], max_steps=8, logging_steps=4,
               report_to=["wandb"], learning_rate=1e-3)
    run_file = wait_until_finished(find_run_files(tmp_path)[0])
    alerts = [r.alert for r in iter_records(run_file) if r.WhichOneof("record_type") == "alert"]
    assert [(a.title, a.level) for a in alerts] == [("weight forces: external_change", "WARN")]
    assert "on total, matrices" in alerts[0].text and "Remedy:" in alerts[0].text


@pytest.mark.slow
def test_a_resumed_run_does_not_raise_again(tmp_path):
    """Raised at step 4, checkpoint at 4, resumed: the lines up to 4 stay, metrics.jsonl up to 4 is
    replayed, the condition is still raised and not raised a second time.  A fresh run in the same
    folder keeps the old lines in previous/<n>/ beside the old rows."""
    kw = dict(max_steps=8, logging_steps=4, learning_rate=1e-3, save_strategy="steps", save_steps=4)
    train_tiny(tmp_path, [WeightForcesCallback(weibull_every=0), ShrinkWeights()], **kw)
    first = _health_lines(tmp_path)
    assert {x["step"] for x in first} == {4}
    train_tiny(tmp_path, [WeightForcesCallback(weibull_every=0), ShrinkWeights()], resume=str(tmp_path / "checkpoint-4"),
               **kw)
    assert _health_lines(tmp_path) == first
    assert _diagnose_json(tmp_path)["events"] == first
    # a fresh run in the same folder starts an empty file; the old lines go beside the old rows
    train_tiny(tmp_path, [WeightForcesCallback(weibull_every=0)], max_steps=4, logging_steps=4)
    assert _health_lines(tmp_path) == []
    kept = tmp_path / "weightforces" / "previous" / "2"
    assert [json.loads(x) for x in (kept / HEALTH_FILE).read_text().splitlines()] == first
    assert _diagnose_json(kept)["events"] == first  # recomputed from the rows kept there
