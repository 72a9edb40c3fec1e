"""Sharded training logs the single-process numbers (docs/distributed.md, issue 4).

Real Trainer runs of the tiny GPT-NeoX on CPU with gloo, launched with ``torch.distributed.run``
(``tests/dist_worker.py``), under DDP, FSDP1, FSDP2, DeepSpeed ZeRO-1/2/3 at world sizes 2 and 3
(3 makes uneven shards), against one process on the same global batches.  Every run also has
* a parameter no forward pass uses (``gpt_neox.unused_bias``): no gradient, so no optimizer state
  (FSDP2, DDP) or zero gradients in the no-decay group (FSDP1, ZeRO): unchanged everywhere;
* a skipped optimizer step (4): DeepSpeed's own overflow skip after a NaN loss, the same skip
  emulated elsewhere;
and the world-3 runs have ranks that hold nothing of some tensors.  The runs of the matrix also
carry the backbone and rank probes (each rank samples its share of the coordinates; the rank probe
gathers one matrix at a time), and the DDP runs super weights (on the main rank, beside the
divided budget).  Runs of one world size share one launch (the imports cost more than the runs):
the fixtures run them once per module.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

WORKER = Path(__file__).resolve().parent / "dist_worker.py"
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
NO_DEEPSPEED = "deepspeed is not installed (pip install -e '.[deepspeed]')"
SKIP_AT = 4  # the skipped optimizer step; rows are logged at steps 3 and 6
COMMON = {"unused": True, "skip_at": SKIP_AT, "probes": True}
SUPER = 3  # super weights in the DDP runs and the references

# backend -> (Accelerate's distributed type, fsdp_version, zero_stage, model wrapper)
EXPECTED = {
    "ddp": ("MULTI_CPU", None, None, "DistributedDataParallel"),
    "fsdp1": ("FSDP", 1, None, "FullyShardedDataParallel"),
    "fsdp2": ("FSDP", 2, None, "FSDPGPTNeoXForCausalLM"),
    "zero1": ("DEEPSPEED", None, 1, "DeepSpeedEngine"),
    "zero2": ("DEEPSPEED", None, 2, "DeepSpeedEngine"),
    "zero3": ("DEEPSPEED", None, 3, "DeepSpeedEngine"),
}
MATRIX = {2: ("ddp", "fsdp1", "fsdp2", "zero1", "zero2", "zero3"), 3: ("ddp", "fsdp1", "fsdp2", "zero2", "zero3")}


def _run(backend: str, **kw) -> dict:
    skip = {"skip": "nan"} if backend.startswith("zero") else {}  # DeepSpeed's own overflow skip
    extra = {"super": SUPER} if backend == "ddp" else {}  # whole tensors only
    return {"name": kw.pop("name", backend), "backend": backend, **skip, **extra, **kw}


def _plan(world: int) -> list[dict]:
    plan = [_run(b, **COMMON) for b in MATRIX[world] if HAS_DEEPSPEED or not b.startswith("zero")]
    if world == 2:
        # a real GradScaler skip (NaN loss, plain AdamW: reported by Accelerate)
        plan.append(_run("fsdp2", name="fsdp2-scaler", skip_at=SKIP_AT, skip="scaler", optim="adamw_torch"))
        # rank 1's reader raises in a step hook: the failure is agreed at the next log event
        plan.append(_run("zero2" if HAS_DEEPSPEED else "fsdp2", name="fail-step", fail_rank=1, fail_at=4))
        # rank 1's backbone probe raises in a step hook: every rank drops it at the next log event
        plan.append(_run("fsdp2", name="probe-fail", probes=True, probe_fail_rank=1, probe_fail_at=4))
        # super weights off: the divided DDP shares take the planned pass
        plan.append(_run("ddp", name="ddp-planned", **{**COMMON, "super": 0}))
        if HAS_DEEPSPEED:  # a scheduler inside the DeepSpeed config steps before on_optimizer_step
            plan.append(_run("zero2", name="zero2-ds-scheduler", ds_scheduler=True))
    else:
        # rank 2's reader raises inside the local part of a log event's reduction (the Weibull counts at 6)
        plan.append(_run("fsdp1", name="fail-reduce", fail_rank=2, fail_at=4, fail_where="local_weights"))
    # DeepSpeed last: it leaves global state behind (deepspeed.comm, the HF DeepSpeed config)
    return sorted(plan, key=lambda r: r["backend"].startswith("zero"))


REFERENCE_PLAN = [
    {"name": "batch8", "batch": 8, "super": SUPER, **COMMON},
    {"name": "batch12", "batch": 12, "super": SUPER, **COMMON},
    {"name": "scaler", "batch": 8, "skip_at": SKIP_AT, "skip": "scaler", "optim": "adamw_torch"},
    # a fused AdamW skips inside its kernel under a GradScaler and Accelerate does not notice
    {"name": "scaler-fused", "batch": 8, "skip_at": SKIP_AT, "skip": "scaler", "max_steps": 5, "logging_steps": 1},
]


# ----------------------------------------------------------------------------- launching
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(out: Path, plan: list[dict], world: int | None, timeout: float = 400) -> subprocess.CompletedProcess:
    if world is None:
        cmd = [sys.executable, str(WORKER)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world),
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(WORKER)]
    cmd += [str(out), json.dumps(plan)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore"}
    # a session of its own, so a hang is killed with every worker
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        log += f"\n[test] killed after {timeout} s: a rank hung"
    (out / "launch.log").write_text(log)
    return subprocess.CompletedProcess(cmd, proc.returncode, log)


class Launch:
    def __init__(self, out: Path, plan: list[dict], world: int | None) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.out, self.world = out, world or 1
        self.proc = _launch(out, plan, world)

    def facts(self, name: str) -> list[dict]:
        folder = self.out / name
        errors = sorted(folder.glob("error*.txt")) if folder.exists() else []
        files = [folder / f"rank{r}.json" for r in range(self.world)]
        if errors or not all(f.exists() for f in files):
            detail = errors[0].read_text() if errors else self.proc.stdout[-3000:]
            pytest.fail(f"run {name!r} did not finish (exit {self.proc.returncode}): {detail}")
        return [json.loads(f.read_text()) for f in files]

    def rows(self, name: str) -> list[dict]:
        from hf_weightforces.integrations.sinks import read_jsonl

        self.facts(name)
        return read_jsonl(self.out / name / "weightforces" / "metrics.jsonl")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Launch:
    return Launch(tmp_path_factory.mktemp("single"), REFERENCE_PLAN, None)


@pytest.fixture(scope="module")
def launches(tmp_path_factory) -> Callable[[int], Launch]:
    """One launch per world size, made when a test first needs it."""
    cache: dict[int, Launch] = {}

    def get(world: int) -> Launch:
        if world not in cache:
            cache[world] = Launch(tmp_path_factory.mktemp(f"world{world}"), _plan(world), world)
        return cache[world]

    return get


# ----------------------------------------------------------------------------- comparing
FORCES = ("align", "inject", "decay", "rest", "delta")
EXACT = ("numel", "steps", "skipped_steps", "nonfinite_steps", "step")


def _budget(row: dict, agg: str) -> float:
    return sum(abs(row.get(f"{agg}/{k}", 0.0)) for k in ("align", "inject", "decay"))


def compare_rows(got: list[dict], want: list[dict]) -> dict[str, float]:
    """Assert that two runs logged the same numbers; return the worst relative difference per
    kind of key (forces relative to their own value where it is not tiny next to the budget)."""
    assert [r["step"] for r in got] == [r["step"] for r in want]
    worst: dict[str, float] = {}
    for g, w in zip(got, want):
        assert g.keys() == w.keys(), sorted(set(g) ^ set(w))[:10]
        for key, ref in w.items():
            val = g[key]
            agg, kind = key.rsplit("/", 1) if "/" in key else ("", key)
            if isinstance(ref, float) and math.isnan(ref):
                assert math.isnan(val), key
                continue
            if kind in EXACT:
                assert val == ref, key
                continue
            # the observed Δ (in delta and closure) differences float32-rounded weights: noise of
            # about 1e-7 ||w||² in either run, which is large next to a small budget (a LayerNorm)
            rounding = 1e-7 * abs(w.get(f"{agg}/norm2", 0.0))
            if kind == "closure":
                tol = 1e-4 * _budget(w, agg) + rounding
            elif kind == "closure_rel":
                tol = 1e-4 + rounding / max(_budget(w, agg), 1e-30)
            elif kind in FORCES:
                tol = 1e-4 * abs(ref) + 1e-5 * _budget(w, agg) + (rounding if kind == "delta" else 0.0)
            elif kind.endswith("_share"):  # moves with the relative error of its forces (1e-4 above): a
                tol = 1e-4  # LayerNorm's own share moved 1.5e-5 under DDP at world 3 (gradients averaged per rank)
            elif kind.startswith("offset_"):
                tol = 1e-5  # dimensionless, at most 1
            elif kind in ("norm2", "rms"):
                tol = 1e-5 * abs(ref)
            else:  # Weibull fits, λ/σ, predicted rms
                tol = 1e-4 * abs(ref) + 1e-9
            assert abs(val - ref) <= tol, f"{key}: {val!r} vs single process {ref!r}"
            if kind in ("align", "inject", "decay", "norm2") and abs(ref) > 1e-3 * _budget(w, agg):
                worst[kind] = max(worst.get(kind, 0.0), abs(val - ref) / abs(ref))
            elif kind in ("delta", "closure") and _budget(w, agg) > 0:  # can be ~0: relative to the budget
                worst[f"{kind}/budget"] = max(worst.get(f"{kind}/budget", 0.0), abs(val - ref) / _budget(w, agg))
    return worst


def expected_rows(ref: list[dict], backend: str) -> list[dict]:
    """The reference rows without the keys the backend cannot have: super weights need whole
    tensors (single process, DDP); DeepSpeed steps inside backward, so no hook sees gradients
    (the backbone's ``grad_cos``)."""
    def drop(key: str) -> bool:
        return (backend != "ddp" and ("_no_super" in key or key.endswith("/super_weights"))
                or backend.startswith("zero") and key.endswith("/grad_cos"))

    return [{k: v for k, v in r.items() if not drop(k)} for r in ref]


def check_closure(rows: list[dict]) -> None:
    for r in rows:
        for agg in ("weightforces/total", "weightforces/transmission", "weightforces/embedding", "weightforces/other"):
            assert abs(r[f"{agg}/closure"]) <= 1e-4 * _budget(r, agg) + 1e-7 * r[f"{agg}/norm2"], (r["step"], agg)


# ----------------------------------------------------------------------------- the matrix
CASES = [(w, b) for w, backends in MATRIX.items() for b in backends]


@pytest.mark.parametrize("world,backend", CASES, ids=[f"{b}-world{w}" for w, b in CASES])
def test_sharded_run_equals_one_process(world, backend, launches, reference):
    if backend.startswith("zero") and not HAS_DEEPSPEED:
        pytest.skip(NO_DEEPSPEED)
    run = launches(world)
    facts = run.facts(backend)
    dtype, fsdp_version, zero_stage, wrapper = EXPECTED[backend]
    for r, f in enumerate(facts):  # the backend we meant really ran (the Trainer falls back to DDP quietly)
        assert (f["distributed_type"], f["fsdp_version"], f["zero_stage"]) == (dtype, fsdp_version, zero_stage)
        assert f["model_wrapped"] == wrapper and f["backend"] == backend
        assert (f["rank"], f["world_size"]) == (r, world)
        assert f["global_step"] == 6 and f["skipped"] == [SKIP_AT] and f["warnings"] == []
        assert f["active"]  # DDP too: every rank computes its share
    if backend == "zero3":
        assert all(f["helper_mismatch"] == [] for f in facts)  # our slices are safe_get_local_*'s
    rows = run.rows(backend)
    ref = expected_rows(reference.rows(f"batch{4 * world}"), backend)
    worst = compare_rows(rows, ref)  # forces, Weibull fits, super weights, backbone and ranks
    for key in ("backbone/total/fraction", "backbone/total/update_cos", "rank/layer_01/kq/stable_rank",
                "rank/all/outer/effective_rank"):
        assert math.isfinite(rows[-1][f"weightforces/{key}"]), key
    # each rank sampled its own share of the backbone's coordinates, together the whole sample
    assert sum(f["backbone_local_coords"] for f in facts) == rows[-1]["weightforces/backbone/total/coords"]
    check_closure(rows)
    assert [r["weightforces/skipped_steps"] for r in rows] == [0, 1]
    assert [r["weightforces/steps"] for r in rows] == [3, 2]
    print(f"\n{backend} world {world}: max relative difference vs one process: "
          + ", ".join(f"{k} {v:.1e}" for k, v in sorted(worst.items())))


@pytest.mark.parametrize("world", [2, 3])
def test_ddp_divides_the_work(world, launches):
    """Under DDP each rank computes a disjoint share of the tensors, balanced by element count
    (its numbers equal one process's: test_sharded_run_equals_one_process)."""
    facts = launches(world).facts("ddp")
    total = facts[0]["total_numel"]
    assert sum(f["local_numel"] for f in facts) == total  # disjoint and complete
    for f in facts:
        assert abs(f["local_numel"] / total - 1 / world) < 0.05, f["local_numel"] / total
        assert f["view_tensors"] > 0 and abs(f["view_numel"] / total - 1 / world) < 0.05
    assert sum(f["view_tensors"] for f in facts) == 28  # every updated tensor once (not the unused one)


def test_ddp_planned_pass_equals_the_per_tensor_path_and_starts_nothing(launches):
    """Super weights off under DDP: every rank plans its share at the second budget step and logs
    the numbers of the per-tensor path of the DDP run beside it; no rank starts a process."""
    run = launches(2)
    facts = run.facts("ddp-planned")
    assert all(f["warnings"] == [] and f["active"] and f["children"] == 0 for f in facts)
    got, want = run.rows("ddp-planned"), run.rows("ddp")
    assert len(got) == len(want)
    common = [set(g) & set(w) for g, w in zip(got, want)]  # not the super weights' keys
    assert all(len(keys) > 100 for keys in common)
    compare_rows([{k: r[k] for k in keys} for r, keys in zip(got, common)],
                 [{k: r[k] for k in keys} for r, keys in zip(want, common)])


def test_a_probe_failing_on_one_rank_switches_off_on_every_rank(launches):
    """The failure travels as the flag of the probe's next all-reduce: no rank waits for another,
    the other probe and the force budget go on."""
    run = launches(2)
    facts, rows = run.facts("probe-fail"), run.rows("probe-fail")
    assert [r["step"] for r in rows] == [3, 6]
    assert "weightforces/backbone/total/fraction" in rows[0]
    assert not [k for k in rows[1] if k.startswith("weightforces/backbone/")]
    assert math.isfinite(rows[1]["weightforces/rank/layer_01/kq/stable_rank"])
    assert rows[1]["weightforces/total/align"] != 0.0
    for f in facts:
        assert f["active"] and f["warnings"] == [] and f["probes_running"] == ["RankProbe"]
        assert any("ShardFailureError" in w and "BackboneProbe" in w for w in f["probe_warnings"])
    assert any("injected probe failure on rank 1" in w for w in facts[1]["probe_warnings"])


# ----------------------------------------------------------------------------- edge cases
@pytest.mark.parametrize("world,backend", [(3, "fsdp1"), (2, "zero2"), (3, "zero2"), (3, "fsdp2")])
def test_a_rank_that_holds_nothing_of_a_tensor(world, backend, launches):
    """Its local piece is empty, it contributes nothing, and the sums still equal one process's
    (test_sharded_run_equals_one_process covers the same runs)."""
    if backend.startswith("zero") and not HAS_DEEPSPEED:
        pytest.skip(NO_DEEPSPEED)
    facts = launches(world).facts(backend)
    empty = [set(f["empty_local"]) for f in facts]
    assert any(empty)
    assert not set.intersection(*empty)  # but every tensor is held somewhere
    if backend == "fsdp2":  # (2, 8) sharded on dim 0 over 3 ranks: rows 1, 1, 0
        assert [("gpt_neox.unused_bias" in e) for e in empty] == [False, False, True]
    if backend == "fsdp1":  # an empty FSDP1 slice gets no gradient and no state: not updated
        assert all(set(f["empty_local"]) <= set(f["not_updated_last_step"]) for f in facts)
    if backend == "zero2":  # p._hp_mapping is None there: nothing read, nothing counted
        assert all(set(f["empty_local"]) == set(f["not_updated_last_step"]) for f in facts)


@pytest.mark.parametrize("world", [2, 3])
def test_a_parameter_without_state(world, launches, reference):
    """FSDP2: the unused parameter never gets a gradient, so no rank has optimizer state for it;
    it is left out of the step's budget and its norm is still observed."""
    facts = launches(world).facts("fsdp2")
    assert all("gpt_neox.unused_bias" in f["not_updated_last_step"] for f in facts)
    row = launches(world).rows("fsdp2")[-1]
    key = "weightforces/matrix/gpt_neox.unused_bias"
    assert row[f"{key}/align"] == row[f"{key}/delta"] == row[f"{key}/decay"] == 0.0
    assert row[f"{key}/norm2"] == pytest.approx(reference.rows(f"batch{4 * world}")[-1][f"{key}/norm2"], rel=1e-12)
    assert row[f"{key}/numel"] == 16


def test_a_gradscaler_skip_under_fsdp2(launches, reference):
    """A real skip: NaN gradients, a GradScaler, the step not taken, reported and not counted."""
    run = launches(2)
    assert all(f["skipped"] == [SKIP_AT] for f in run.facts("fsdp2-scaler"))
    rows = run.rows("fsdp2-scaler")
    compare_rows(rows, reference.rows("scaler"))
    check_closure(rows)
    assert [r["weightforces/skipped_steps"] for r in rows] == [0, 1]


def test_a_skip_no_flag_reports(reference):
    """A fused AdamW under a GradScaler skips inside its kernel and puts its step counter back;
    Accelerate's step_was_skipped stays False.  The scaler's found_inf, read in a step post-hook
    (integrations/overflow.py), says so: the step's row (logged every step here) counts it as
    skipped and holds no forces; the next step counts again."""
    (facts,) = reference.facts("scaler-fused")
    assert facts["skipped"] == []  # Accelerate did not report it
    rows = {r["step"]: r for r in reference.rows("scaler-fused")}
    check_closure(r for r in rows.values() if r["weightforces/steps"] > 0)
    skipped = rows[SKIP_AT]
    assert skipped["weightforces/skipped_steps"] == 1 and skipped["weightforces/steps"] == 0
    assert "weightforces/total/align" not in skipped  # no budget step in this row: no forces, not zeros
    assert rows[SKIP_AT + 1]["weightforces/total/align"] != 0.0  # and the next step counts again


@pytest.mark.skipif(not HAS_DEEPSPEED, reason=NO_DEEPSPEED)
def test_deepspeed_scheduler_lr_is_the_one_the_step_used(launches):
    """With a WarmupLR in the DeepSpeed config, DeepSpeed steps the scheduler inside backward:
    at on_optimizer_step ``group["lr"]`` is already the next step's.  The budget uses the lr the
    step hook saw (for each group: ZeRO-2 steps the groups one at a time), so the books close."""
    run = launches(2)
    for f in run.facts("zero2-ds-scheduler"):
        at_hook = [[g[0] for g in step] for step in f["lrs"]]
        used = [[g[1] for g in step] for step in f["lrs"]]
        assert used[1:] == at_hook[:-1]  # the step used what the previous hook saw...
        assert at_hook[1:] != used[1:]  # ...not what this one sees, while the warmup moves it
        assert used[2][0] > 0
    for r in run.rows("zero2-ds-scheduler"):
        for agg in ("weightforces/total", "weightforces/other"):  # other: the no-decay group
            assert abs(r[f"{agg}/closure"]) <= 1e-4 * _budget(r, agg) + 1e-8 * r[f"{agg}/norm2"], (r["step"], agg)


@pytest.mark.parametrize("world,name", [(2, "fail-step"), (3, "fail-reduce")])
def test_one_rank_failing_switches_every_rank_off_without_a_hang(world, name, launches):
    """The failing rank keeps joining the log-time all-reduce with a failure flag, so every rank
    learns of it there and stops; training finishes and nobody waits forever."""
    facts = launches(world).facts(name)
    rows = launches(world).rows(name)
    assert [r["step"] for r in rows] == [3]  # the row of step 6 is the one that carried the flag
    for r, f in enumerate(facts):
        assert f["global_step"] == 6 and not f["active"]
        assert len(f["warnings"]) == 1
        if r == world - 1:
            assert f"injected failure on rank {r}" in f["warnings"][0]
        else:
            assert "ShardFailureError" in f["warnings"][0] and "1 of" in f["warnings"][0]


# ----------------------------------------------------------------------------- in process
def test_one_process_reduces_nothing_and_a_failure_raises_there():
    import torch

    from hf_weightforces.distributed import Backend, ShardContext, ShardFailureError, UnsupportedBackendError

    ctx = ShardContext(Backend.SINGLE)
    flat = torch.arange(4, dtype=torch.float64)
    assert torch.equal(ctx.all_reduce_sum(flat), flat) and not ctx.reduces and ctx.computes
    with pytest.raises(ShardFailureError):
        ctx.all_reduce_sum(flat, failed=True)
    with pytest.raises(UnsupportedBackendError, match="process group"):
        ShardContext(Backend.FSDP2)  # a sharded backend without torch.distributed
