"""The research code's analyses: λ(t) predicted from the forces (against a slow reference, and its error
split), λ*, the phase timeline, several runs overlaid (three seeds; an η sweep with the power-law fit), the
dynamics figure, and the mid-90 / full-range trims of the Weibull protocol."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import train_tiny
from test_scale import run_cli

from hf_weightforces.analysis.compare import compare_runs, fit_power_law
from hf_weightforces.analysis.dynamics import lambda_star, phase_timeline, predict_lambda, series_from_rows
from hf_weightforces.analysis.presets import get_preset
from hf_weightforces.core.weibull import TRIMS, MagnitudeHistogram, fit_weibull

SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three seeds at lr 2e-3 (the first saves checkpoints every 10 steps) and lr 1e-3 / 4e-3 of seed 0."""
    from hf_weightforces import WeightForcesCallback

    root = tmp_path_factory.mktemp("runs")
    out = {}
    for seed, lr in [(s, 2e-3) for s in SEEDS] + [(0, 1e-3), (0, 4e-3)]:
        folder = root / f"seed{seed}_lr{lr:g}"
        save = {"save_strategy": "steps", "save_steps": 10} if (seed, lr) == (0, 2e-3) else {}
        train_tiny(folder, [WeightForcesCallback(every=1, weibull_every=2)], max_steps=30, logging_steps=2,
                   seed=seed, learning_rate=lr, lr_scheduler_type="cosine", warmup_steps=4, **save)
        out[(seed, lr)] = folder
    return out


def _rows(folder):
    from hf_weightforces.analysis.records import read_metrics

    return read_metrics(folder / "weightforces" / "metrics.jsonl")


def _reference_sigma_pred(rows, group, every):
    """Slow and obvious: walk the rows, keep the used ones, add force x steps since the last used row."""
    used = [r for r in rows if f"weightforces/{group}/align" in r and (every == 0 or r["step"] % every == 0)]
    norm2, out, prev = float(used[0][f"weightforces/{group}/norm2"]), {}, used[0]["step"]
    out[prev] = math.sqrt(norm2 / used[0][f"weightforces/{group}/numel"])
    for r in used[1:]:
        f = sum(float(r[f"weightforces/{group}/{k}"]) for k in ("align", "inject", "decay"))
        norm2 += f * (r["step"] - prev)
        prev = r["step"]
        out[prev] = math.sqrt(norm2 / r[f"weightforces/{group}/numel"])
    return out


@pytest.mark.slow
@pytest.mark.parametrize("every", [0, 6])
def test_prediction_equals_the_slow_reference(runs, every):
    rows = _rows(runs[(0, 2e-3)])
    pred = predict_lambda(rows, "transmission", every=every)
    ref = _reference_sigma_pred(rows, "transmission", every)
    at = {int(s): v for s, v in zip(pred.steps, pred.sigma_pred)}
    shared = sorted(set(at) & set(ref))  # between used rows sigma_pred^2 is interpolated linearly
    assert len(shared) >= 4 and len(shared) == (len(at) if every == 0 else len(at) // 3)
    for step in shared:
        assert at[step] == pytest.approx(ref[step], rel=1e-12)
    # the split is exact: (1 + total) = (1 + integration)(1 + bridge)
    np.testing.assert_allclose(1 + pred.total, (1 + pred.integration) * (1 + pred.bridge), rtol=1e-13)
    assert pred.log_rmse == pytest.approx(math.sqrt(np.mean(np.log(pred.lam_pred / pred.lam) ** 2)), rel=1e-12)


@pytest.mark.slow
def test_dense_forces_leave_only_the_rest_sparse_ones_drift(runs):
    rows = _rows(runs[(0, 2e-3)])
    dense = predict_lambda(rows, "transmission", every=0)
    sparse = predict_lambda(rows, "transmission", every=10)
    # every step integrated: only the dropped rest R (about eta*wd of the budget) separates sigma_pred from sigma
    assert np.max(np.abs(dense.integration)) < 2e-4
    assert np.max(np.abs(sparse.integration)) > 10 * np.max(np.abs(dense.integration))
    assert dense.observed == "live" and dense.anchor_step == 2


@pytest.mark.slow
def test_post_step_alignment_reproduces_the_research_offset(runs):
    """The research code integrates A at w_{t+1} (= c A + 2 I): it over-predicts sigma by about the
    integrated 2I, where the exact alignment leaves only the dropped rest (docs/budget.md, section 6)."""
    rows = _rows(runs[(0, 2e-3)])
    exact = predict_lambda(rows, "transmission", alignment="w_t")
    post = predict_lambda(rows, "transmission", alignment="post")
    assert np.max(np.abs(exact.integration)) < 2e-4
    assert post.integration[-1] > 10 * np.max(np.abs(exact.integration)) and post.integration[-1] > 0
    integration = {}
    for alignment in ("w_t", "post"):
        code, out, err = run_cli(["lambda", str(runs[(0, 2e-3)]), "--groups-only", "--json", "--alignment", alignment])
        assert code == 0, err
        integration[alignment] = json.loads(out)["dynamics"]["transmission"]["prediction"]["integration"]["max_abs"]
    assert integration["post"] > 10 * integration["w_t"]


@pytest.mark.slow
def test_lambda_cli_json_has_prediction_target_and_phases(runs):
    code, out, err = run_cli(["lambda", str(runs[(0, 2e-3)]), "--groups-only", "--json", "--predict-every", "2"])
    assert code == 0, err
    data = json.loads(out)
    assert data["schedule"].startswith("record schedule.jsonl")
    d = data["dynamics"]["transmission"]
    assert d["observed"] == "checkpoints" and d["steps"] == [10, 20, 30]
    assert d["prediction"]["every"] == 2 and d["prediction"]["log_rmse"] < 0.02
    sched = [json.loads(line) for line in (runs[(0, 2e-3)] / "weightforces" / "schedule.jsonl").read_text().splitlines()]
    lr = {r["step"]: r["lr"][0] for r in sched}
    assert d["lambda_star"][0] == pytest.approx(math.sqrt(lr[10] / 0.1), rel=1e-12)
    assert [p["name"] for p in d["phases"]][-1] in ("rise", "overshoot", "relaxation")


def _curve(steps, peak_at, tail):
    return np.where(steps <= peak_at, 1 + steps / peak_at, 2 - tail * (steps - peak_at) / steps.max())


def test_phase_timeline_finds_peak_overshoot_and_relaxation():
    steps = np.arange(0, 101, 5)
    lam = np.concatenate([np.full(3, 1.0), _curve(steps[3:] - 15, 30, 0.5)])  # flat to 15, rise to 45, fall
    target = np.where(steps < 70, 1.0 - steps / 100, 0.3)  # the target falls until 70, then stays
    phases = phase_timeline(steps, lam, target)
    assert [(p.name, p.start, p.end) for p in phases][:2] == [("plateau", 0, 20), ("rise", 20, 45)]
    ratio = lam / target
    t_relax = int(steps[9 + np.argmax(ratio[9:])])
    assert phases[2].name == "overshoot" and (phases[2].start, phases[2].end) == (45, t_relax)
    assert phases[3].name == "relaxation" and phases[3].end == 100
    flat = phase_timeline(steps, lam, np.ones_like(lam))  # constant lr: no overshoot
    assert [p.name for p in flat] == ["plateau", "rise", "relaxation"]
    assert [p.name for p in phase_timeline(steps, 1 + steps / 100.0)] == ["rise"]


def test_lambda_star_of_the_pythia_preset():
    sched = get_preset("pythia-160m").schedule()
    steps = np.array([0, 1, 1431, 143_000, 143_001])
    star = lambda_star(sched, steps)
    assert math.isnan(star[0]) and star[1] == 0.0 and math.isnan(star[-1])
    assert star[2] == pytest.approx(math.sqrt(6e-4 / 0.1)) and star[3] == pytest.approx(math.sqrt(6e-5 / 0.1))


def test_power_law_fit_recovers_the_exponent():
    eta = np.array([3e-4, 1e-3, 3e-3])
    f = fit_power_law(eta, 2.0 * eta ** 0.78)
    assert f["exponent"] == pytest.approx(0.78, rel=1e-12) and f["coefficient"] == pytest.approx(2.0, rel=1e-10)
    assert f["stderr"] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.slow
def test_report_overlays_three_seeds(runs, tmp_path):
    folders = [str(runs[(s, 2e-3)]) for s in SEEDS]
    code, out, err = run_cli(["report", *folders, "--out", str(tmp_path / "seeds")])
    assert code == 0, err
    assert "3 runs compared as seeds" in out and (tmp_path / "seeds" / "overlay.png").stat().st_size > 10_000
    comp = compare_runs(folders, out_dir=tmp_path / "again")
    stats = comp.stats()["transmission"]
    peaks = [max(series_from_rows(_rows(runs[(s, 2e-3)]), "transmission")["lambda"][1:]) for s in SEEDS]
    assert stats["peak_lambda"] == pytest.approx(peaks, rel=1e-12)
    assert all(0.5 < s <= 1.0 for s in stats["rise_align_share"])


@pytest.mark.slow
def test_report_fits_peak_lambda_against_eta(runs, tmp_path):
    folders = [str(runs[(0, lr)]) for lr in (4e-3, 1e-3, 2e-3)]
    comp = compare_runs(folders, out_dir=tmp_path)
    assert comp.mode == "eta_sweep" and [r.peak_lr for r in comp.runs] == [1e-3, 2e-3, 4e-3]
    assert set(comp.figures) == {"overlay.png", "eta_sweep.png"}
    fit = comp.stats()["transmission"]["peak_lambda_vs_eta"]
    ref = fit_power_law([1e-3, 2e-3, 4e-3], [r.peak("transmission")[0] for r in comp.runs])
    assert fit == ref and 0 < fit["exponent"] < 1  # larger lr, larger peak, slower than linear


@pytest.mark.slow
def test_single_run_report_draws_the_dynamics(runs, tmp_path):
    code, out, err = run_cli(["report", str(runs[(0, 4e-3)]), "--no-checkpoints", "--out", str(tmp_path),
                              "--formats", "png"])
    assert code == 0, err
    assert (tmp_path / "dynamics.png").stat().st_size > 10_000


def test_report_of_runs_without_records_is_one_error_line(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    code, _, err = run_cli(["report", str(tmp_path / "a"), str(tmp_path / "b")])
    assert code == 2 and err.count("error:") == 1 and "metrics.jsonl" in err


def _slow_fit(x: np.ndarray, f_lo: float, f_hi: float) -> tuple[float, float]:
    """The protocol written out: sort, Hazen positions, keep f_lo <= F <= f_hi, least squares."""
    xs = np.sort(np.abs(x[x != 0]).astype(np.float64))
    n = xs.size
    pts = [(math.log(v), math.log(-math.log(1 - (i - 0.5) / n))) for i, v in enumerate(xs, 1)
           if f_lo <= (i - 0.5) / n <= f_hi]
    lx, y = np.array(pts).T
    k, b = np.polyfit(lx, y, 1)
    return k, math.exp(-b / k)


@pytest.mark.parametrize("trim", list(TRIMS))
def test_trims_against_the_slow_protocol(trim):
    x = np.random.default_rng(3).standard_t(5, 20_000)
    fit = fit_weibull(x, trim=trim)
    k, scale = _slow_fit(x, *TRIMS[trim])
    assert fit.k == pytest.approx(k, rel=1e-10) and fit.scale == pytest.approx(scale, rel=1e-10)
    hist = MagnitudeHistogram().add(x).fit(trim=trim)
    assert abs(hist.k - fit.k) < 2e-4


def test_default_trim_is_the_middle_80():
    x = np.random.default_rng(4).normal(size=5000)
    assert fit_weibull(x) == fit_weibull(x, trim="mid80")
    with pytest.raises(ValueError, match="unknown trim"):
        fit_weibull(x, trim="mid70")
