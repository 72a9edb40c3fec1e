"""Spline displacement (docs/spline.md): exact identities on synthetic trajectories, the schedule
flags against the Trainer's own schedulers, clear errors, and a real Trainer run with checkpoints
where the spline beats the two-point baseline against the callback's exact alignment."""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from hf_weightforces.analysis.checkpoints import CheckpointError
from hf_weightforces.analysis.records import (
    RecordError,
    Schedule,
    find_checkpoints,
    read_schedule,
    schedule_from_flags,
)
from hf_weightforces.analysis.spline import analyze, sample_checkpoints, spline_forces
from hf_weightforces.cli import main

NAMES = ("gpt_neox.layers.0.mlp.dense_h_to_4h.weight", "gpt_neox.layers.1.attention.query_key_value.weight")
SHAPES = ((6, 5), (9, 4))


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def write_run(folder: Path, trajectory: dict[int, list[np.ndarray]], dtype=torch.float64) -> list[Path]:
    """checkpoint-N/model.safetensors for every step N of ``trajectory`` (step -> tensors)."""
    paths = []
    for step, tensors in trajectory.items():
        ck = folder / f"checkpoint-{step}"
        ck.mkdir(parents=True, exist_ok=True)
        save_file({n: torch.tensor(t, dtype=dtype) for n, t in zip(NAMES, tensors)}, str(ck / "model.safetensors"))
        paths.append(ck)
    return paths


def true_align(w: dict[int, np.ndarray], lr: np.ndarray, wd: float, first: int, last: int) -> np.ndarray:
    """A_s = -2 η <w(s-1), u_s> with u_s = -(w(s) - w(s-1))/η - λ w(s-1): AdamW's update, solved for u."""
    out = []
    for s in range(first + 1, last + 1):
        eta = lr[s - 1]
        u = -(w[s] - w[s - 1]) / eta - wd * w[s - 1]
        out.append(-2.0 * eta * float(w[s - 1] @ u))
    return np.array(out)


def constant_schedule(lr: np.ndarray, wd: float) -> Schedule:
    return Schedule(1, np.stack([lr, lr], 1), np.tile([wd, 0.0], (lr.size, 1)), "test")


def _path(coef: np.ndarray, x: float) -> np.ndarray:
    """Σ_a coef[a] x^a for a coefficient array [degree+1, n]."""
    return sum(c * x**a for a, c in enumerate(coef))


def _split(flat: np.ndarray) -> list[np.ndarray]:
    sizes = [math.prod(s) for s in SHAPES]
    parts = np.split(flat, np.cumsum(sizes)[:-1])
    return [p.reshape(s) for p, s in zip(parts, SHAPES)]


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_spline_is_exact_on_a_cubic_in_steps(tmp_path, wd):
    """w(t) cubic in t with a constant lr: both spline axes reproduce every step, so A is exact."""
    rng = np.random.default_rng(0)
    n = sum(math.prod(s) for s in SHAPES)
    coef = rng.normal(size=(4, n)) * np.array([[1.0], [1e-2], [1e-4], [1e-6]])
    total, knots = 60, [10, 25, 30, 45, 60]
    lr = np.full(total, 2e-3)
    w = {t: _path(coef, float(t)) for t in range(total + 1)}
    write_run(tmp_path, {t: _split(w[t]) for t in knots})
    ckpts = find_checkpoints([tmp_path])
    forces = spline_forces(sample_checkpoints(ckpts, sample_size=0), constant_schedule(lr, wd))
    truth = true_align(w, lr, wd, knots[0], knots[-1])
    for est in ("spline", "spline_lr"):
        got = forces.align[est].sum(axis=1)
        np.testing.assert_allclose(got, truth, rtol=1e-8, atol=1e-12 * np.abs(truth).max())
    assert forces.align["spline"].shape == (knots[-1] - knots[0], len(NAMES))


def test_lr_axis_spline_is_exact_on_a_cubic_in_lr_time(tmp_path):
    """With a warm-up-and-decay lr, w cubic in τ = Σ η: the lr-axis spline is exact, the step one is not."""
    rng = np.random.default_rng(1)
    n = sum(math.prod(s) for s in SHAPES)
    total, knots = 80, [8, 20, 40, 55, 80]
    lr = 1e-3 * np.minimum(1.0, np.arange(1, total + 1) / 20.0) * (1.0 - 0.9 * np.arange(total) / total)
    tau = np.concatenate([[0.0], np.cumsum(lr)])
    coef = rng.normal(size=(4, n)) * np.array([[1.0], [3.0], [20.0], [300.0]])
    w = {t: _path(coef, tau[t]) for t in range(total + 1)}
    write_run(tmp_path, {t: _split(w[t]) for t in knots})
    forces = spline_forces(sample_checkpoints(find_checkpoints([tmp_path]), sample_size=0), constant_schedule(lr, 0.1))
    truth = true_align(w, lr, 0.1, knots[0], knots[-1])
    np.testing.assert_allclose(forces.align["spline_lr"].sum(axis=1), truth, rtol=1e-8)
    assert np.max(np.abs(forces.align["spline"].sum(axis=1) / truth - 1)) > 1e-3


def test_two_point_is_exact_on_a_linear_trajectory(tmp_path):
    """w linear in τ without decay: u is constant, the interpolated two-point is exact at every step and
    the naive two-point (w at the interval's start) at each interval's first step."""
    rng = np.random.default_rng(2)
    n = sum(math.prod(s) for s in SHAPES)
    total, knots = 50, [5, 15, 30, 35, 50]
    lr = 1e-3 * (1.0 + 0.5 * np.sin(np.arange(total)))
    tau = np.concatenate([[0.0], np.cumsum(lr)])
    a, b = rng.normal(size=n), rng.normal(size=n) * 0.3
    w = {t: a + b * tau[t] for t in range(total + 1)}
    write_run(tmp_path, {t: _split(w[t]) for t in knots})
    forces = spline_forces(sample_checkpoints(find_checkpoints([tmp_path]), sample_size=0), constant_schedule(lr, 0.0))
    truth = true_align(w, lr, 0.0, knots[0], knots[-1])
    np.testing.assert_allclose(forces.align["two_point_interp"].sum(axis=1), truth, rtol=1e-9)
    first = np.array(knots[:-1]) - knots[0]  # rows of the first step of each interval
    np.testing.assert_allclose(forces.align["two_point"].sum(axis=1)[first], truth[first], rtol=1e-9)
    assert np.max(np.abs(forces.align["two_point"].sum(axis=1) / truth - 1)) > 1e-3
    np.testing.assert_allclose(forces.align["spline_lr"].sum(axis=1), truth, rtol=1e-8)  # a line is a cubic
    # Î = η² (c_t n_active + (1 - c_t) U) with U = ||b||² (the drift shared by neighbouring intervals)
    steps = np.arange(knots[0] + 1, knots[-1] + 1)
    c_t = (0.1 / 1.9) * (1 + 0.9**steps) / (1 - 0.9**steps)
    expect = lr[steps - 1] ** 2 * (c_t * n + (1 - c_t) * float(b @ b))
    np.testing.assert_allclose(forces.inject_model.sum(axis=1), expect, rtol=1e-8)


def test_injection_model_against_a_reference(tmp_path):
    """Î = η² (c_t n_active + (1 - c_t) U_k) against a direct computation: coordinates that only decay
    (no gradient, u = 0) are left out, U_k is the mean of <v_k, v_j> over neighbouring intervals."""
    total, knots = 40, [10, 20, 30, 40]
    lr, wd = 1e-3 * np.linspace(1.0, 0.5, total), 0.1
    rng = np.random.default_rng(3)
    n = sum(math.prod(s) for s in SHAPES)
    live = np.ones(n, dtype=bool)
    live[:7] = False
    w = {0: rng.normal(size=n)}
    for s in range(1, total + 1):  # AdamW with a drift plus noise on the live coordinates, u = 0 elsewhere
        u = np.where(live, 0.3 + rng.normal(size=n), 0.0)
        w[s] = (1 - lr[s - 1] * wd) * w[s - 1] - lr[s - 1] * u
    write_run(tmp_path, {t: _split(w[t]) for t in knots})
    forces = spline_forces(sample_checkpoints(find_checkpoints([tmp_path]), sample_size=0), constant_schedule(lr, wd))
    v = []
    for lo, hi in zip(knots, knots[1:]):
        decay = np.prod(1 - lr[lo:hi] * wd)
        v.append(np.where(live, (w[hi] - decay * w[lo]) / lr[lo:hi].sum(), 0.0))
    drift = [max(0.0, np.mean([v[k] @ v[j] for j in (k - 1, k + 1) if 0 <= j < len(v)])) for k in range(len(v))]
    steps = forces.steps
    c_t = (0.1 / 1.9) * (1 + 0.9**steps) / (1 - 0.9**steps)
    k = np.searchsorted(knots, steps, side="left") - 1
    expect = lr[steps - 1] ** 2 * (c_t * live.sum() + (1 - c_t) * np.array(drift)[k])
    np.testing.assert_allclose(forces.inject_model.sum(axis=1), expect, rtol=1e-9)


def test_sampling_is_seeded_and_scaled(tmp_path):
    rng = np.random.default_rng(4)
    knots = [10, 20, 30, 40]
    base = [rng.normal(size=s) for s in SHAPES]
    write_run(tmp_path, {t: [x * (1 + 0.01 * t) for x in base] for t in knots})
    ck = find_checkpoints([tmp_path])
    one = sample_checkpoints(ck, sample_size=20, seed=7)
    two = sample_checkpoints(ck, sample_size=20, seed=7)
    other = sample_checkpoints(ck, sample_size=20, seed=8)
    np.testing.assert_array_equal(one.values, two.values)
    assert not np.array_equal(one.values, other.values)
    assert one.sampled == sum(t.sampled for t in one.tensors) and one.total == sum(math.prod(s) for s in SHAPES)
    assert all(t.sampled < t.numel for t in one.tensors)


def test_schedule_flags_match_the_trainer_schedulers():
    from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

    for decay, make in (("cosine", get_cosine_schedule_with_warmup), ("linear", get_linear_schedule_with_warmup)):
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=3e-3)
        sched = make(opt, 7, 50)
        expect = []
        for _ in range(50):
            expect.append(opt.param_groups[0]["lr"])  # the lr this optimizer step uses
            opt.step()
            sched.step()
        got = schedule_from_flags(3e-3, 50, warmup_steps=7, decay=decay, weight_decay=0.1)
        np.testing.assert_allclose(got.lr[:, 0], expect, rtol=1e-12, atol=1e-18)
        assert got.weight_decay[0].tolist() == [0.1, 0.0]


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------


def _cubic_run(folder: Path, knots=(10, 20, 30, 40)) -> None:
    rng = np.random.default_rng(5)
    base = [rng.normal(size=s) for s in SHAPES]
    write_run(folder, {t: [x * (1 + 0.01 * t) for x in base] for t in knots})


FLAGS = ["--lr", "1e-3", "--total-steps", "60"]


def test_cli_errors(tmp_path):
    _cubic_run(tmp_path / "three", knots=(10, 20, 30))
    code, _, err = run_cli(["spline", str(tmp_path / "three"), *FLAGS])
    assert code == 2 and "at least 4 checkpoints" in err and err.count("\n") == 1

    _cubic_run(tmp_path / "ok")
    code, _, err = run_cli(["spline", str(tmp_path / "ok")])
    assert code == 2 and "--lr" in err  # no record: the schedule flags are needed
    ck = sorted((tmp_path / "ok").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    code, _, err = run_cli(["spline", str(ck[1]), str(ck[0]), str(ck[2]), str(ck[3]), *FLAGS])
    assert code == 2 and "out of step order" in err

    dup = tmp_path / "dup"
    _cubic_run(dup)
    (dup / "extra").mkdir()
    (dup / "extra" / "trainer_state.json").write_text(json.dumps({"global_step": 20}))
    listed = [dup / "checkpoint-10", dup / "checkpoint-20", dup / "extra", dup / "checkpoint-30"]
    code, _, err = run_cli(["spline", *map(str, listed), *FLAGS])
    assert code == 2 and "two checkpoints at step 20" in err

    code, _, err = run_cli(["spline", str(tmp_path / "nowhere"), *FLAGS])
    assert code == 2 and "no such file" in err

    shape = tmp_path / "shape"
    _cubic_run(shape)
    save_file({NAMES[0]: torch.zeros(3, 3, dtype=torch.float64), NAMES[1]: torch.zeros(SHAPES[1], dtype=torch.float64)},
              str(shape / "checkpoint-30" / "model.safetensors"))
    code, _, err = run_cli(["spline", str(shape), *FLAGS])
    assert code == 2 and "shape" in err and "checkpoint-30" in err

    corrupt = tmp_path / "corrupt"
    _cubic_run(corrupt)
    (corrupt / "checkpoint-20" / "model.safetensors").write_bytes(b"\x00garbage, not a safetensors file")
    code, _, err = run_cli(["spline", str(corrupt), *FLAGS])
    assert code == 2 and "checkpoint-20" in err


def test_pickles_are_never_executed(tmp_path):
    """A .bin checkpoint that pickles a callable is refused by the weights-only loader, not run."""
    import pickle

    marker = tmp_path / "executed"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    _cubic_run(tmp_path / "run")
    bad = tmp_path / "run" / "checkpoint-20"
    (bad / "model.safetensors").unlink()
    with open(bad / "pytorch_model.bin", "wb") as f:
        pickle.dump({"x": Evil()}, f)
    with pytest.raises(CheckpointError, match="checkpoint-20"):
        analyze([tmp_path / "run"], flags_schedule=schedule_from_flags(1e-3, 60))
    assert not marker.exists()


def test_schedule_record_errors(tmp_path):
    path = tmp_path / "schedule.jsonl"
    rows = [{"step": s, "lr": [1e-3], "weight_decay": [0.1], "skipped": False} for s in (1, 2, 2, 3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(RecordError, match="duplicated"):
        read_schedule(path)
    path.write_text('{"step": 1, "lr": [1e-3], "weight_decay": [0.1]}\n{"step": 2, "lr": oops}\n')
    with pytest.raises(RecordError, match=r"schedule.jsonl:2"):
        read_schedule(path)


# ----------------------------------------------------------------------------------------------
# A real Trainer run
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_run_spline_beats_two_point(tmp_path):
    """Tiny GPT-NeoX, real Trainer, checkpoints every 10 steps: against the callback's exact A, the
    spline and the corrected spline are far closer than the two-point baseline."""
    from conftest import train_tiny

    from hf_weightforces import WeightForcesCallback

    train_tiny(tmp_path, [WeightForcesCallback(weibull_every=0)], max_steps=70, logging_steps=5,
               save_strategy="steps", save_steps=10, save_only_model=True, learning_rate=3e-3, warmup_steps=10)
    report = analyze([tmp_path], sample_size=0)
    assert report.forces.schedule_source.startswith("record")
    acc = {(a.aggregate, a.estimator, a.resolution): a for a in report.accuracy if a.truth == "align"}
    post = {(a.aggregate, a.resolution): a for a in report.accuracy if a.truth == "align_post"}
    # the research code's convention: A at w(t+1), against the logged align_post, reads as well as
    # the plain spline does against A at w_t; against A at w_t it over-reads by about 2I/A
    for group in ("total", "transmission"):
        assert abs(post[(group, "checkpoint")].pooled - acc[(group, "spline", "checkpoint")].pooled) < 0.03
        assert acc[(group, "spline_post", "checkpoint")].pooled > acc[(group, "spline", "checkpoint")].pooled
    for group in ("total", "transmission"):
        two = acc[(group, "two_point", "checkpoint")]
        for est in ("spline", "corrected"):
            mine = acc[(group, est, "checkpoint")]
            assert abs(mine.median - 1) < abs(two.median - 1), (group, est, mine.median, two.median)
            assert abs(mine.pooled - 1) < 0.05, (group, est, mine.pooled)
    assert abs(acc[("total", "corrected", "row")].median - 1) < 0.05
    code, out, _ = run_cli(["spline", str(tmp_path), "--json"])
    data = json.loads(out)
    assert code == 0 and data["schedule"].startswith("record") and data["accuracy"]
