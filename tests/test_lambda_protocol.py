"""`lambda`'s integration rule and k-lock point: the research code's protocol reproduced to float precision at
every record spacing and in both alignment conventions, and one lock point shared with the live offset keys."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import train_tiny
from test_scale import run_cli

from hf_weightforces.analysis.dynamics import integrate_forces, predict_lambda

STEPS = 60
GROUP = "transmission"
LWD = 0.1  # the research script's --lwd; only its recovery of n uses it (see _records)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Forces and a live fit at every step, the rows the research script's records are made of."""
    from hf_weightforces import WeightForcesCallback

    folder = tmp_path_factory.mktemp("protocol")
    train_tiny(folder, [WeightForcesCallback(every=1, weibull_every=1, quiet=True)], max_steps=STEPS, logging_steps=1,
               learning_rate=2e-3, lr_scheduler_type="cosine", warmup_steps=6, weight_decay=LWD,
               save_strategy="steps", save_steps=20)
    from hf_weightforces.analysis.records import read_metrics

    return folder, read_metrics(folder / "weightforces" / "metrics.jsonl")


def _records(rows, spacing, alignment):
    """The research script's inputs from the rows: ``v1b_spline_true.jsonl`` records every ``spacing`` steps
    (REC = range(rec, T+1, rec) in three_force_spline.py) and ``lambda_trajectory.json`` from the fits."""
    g = f"weightforces/{GROUP}/"
    tr = []
    for r in rows:
        if r["step"] % spacing:
            continue
        rms = math.sqrt(r[g + "norm2"] / r[g + "numel"])
        dec_full = -r[g + "decay"]
        # The script recovers the element count n as dec_full / (2 eta lwd rms^2) from its own records; the rows
        # carry n, so "eta" is written such that this recovery returns it (to 1 ulp).
        eta = dec_full / (2 * LWD * rms**2 * r[g + "numel"])
        tr.append({"step": r["step"], "eta": eta, "true_align_full": -r[g + ("align_post" if alignment == "post" else "align")],
                   "inj_full": r[g + "inject"], "dec_full": dec_full, "rms": rms})
    lam = [{"step": r["step"], "lambda": r[g + "weibull_scale"],
            "lambda_over_sigma": r[g + "weibull_scale"] / math.sqrt(r[g + "norm2"] / r[g + "numel"])}
           for r in rows if g + "weibull_scale" in r]
    return tr, lam


def _research(tr, lam, lwd=LWD):
    """make_predicted_lambda_fig.py (NPM-Weibull-public, Weibull_WeightScale_dynamics/analysis), its loop and
    formulas as written there, without the figure."""
    los = np.mean([r["lambda_over_sigma"] for r in lam])
    r0 = tr[5]
    N = r0["dec_full"] / (2 * r0["eta"] * lwd * r0["rms"] ** 2)
    steps = [r["step"] for r in tr]
    SW2 = [tr[0]["rms"] ** 2 * N]
    for i in range(1, len(tr)):
        dt = steps[i] - steps[i - 1]
        pr = tr[i - 1]
        dperstep = (-pr["true_align_full"]) + pr["inj_full"] - pr["dec_full"]
        SW2.append(SW2[-1] + dperstep * dt)
    sig_pred = np.sqrt(np.array(SW2) / N)
    lam_pred = sig_pred * los
    lk_step = np.array([r["step"] for r in lam])
    lk_lam = np.array([r["lambda"] for r in lam])
    lam_obs_on_tr = np.interp(steps, lk_step, lk_lam)
    mask = np.array(steps) >= lk_step.min()
    logrmse = np.sqrt(np.mean((np.log(lam_pred[mask]) - np.log(lam_obs_on_tr[mask])) ** 2))
    resid = (lam_pred[mask] - lam_obs_on_tr[mask]) / lam_obs_on_tr[mask]
    return {"steps": steps, "sigma_pred": sig_pred, "lambda_pred": lam_pred, "log_rmse": float(logrmse),
            "max_abs_err": float(np.max(np.abs(resid))), "los": float(los),
            "rms": np.array([r["rms"] for r in tr])}


SPACINGS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10)


@pytest.mark.slow
@pytest.mark.parametrize("alignment", ["w_t", "post"])
def test_left_rule_with_mean_lock_is_the_research_script(run, alignment):
    _, rows = run
    for spacing in SPACINGS:
        tr, lam = _records(rows, spacing, alignment)
        ref = _research(tr, lam)
        pred = predict_lambda(rows, GROUP, every=spacing, alignment=alignment, rule="left", lock="mean")
        assert pred.rule == "left" and pred.lock == "mean" and "mean over all" in pred.lock_point
        assert pred.lock_ratio == pytest.approx(ref["los"], rel=1e-12)
        # every quantity is a float64 sum of at most 60 terms of one sign pattern in both, or one division:
        # they agree to ~1e-15; 1e-9 leaves room and is far inside the 1e-6 asked
        assert pred.research["steps"] == ref["steps"]
        np.testing.assert_allclose(pred.research["lambda_pred"], ref["lambda_pred"], rtol=1e-9)
        assert pred.research["log_rmse"] == pytest.approx(ref["log_rmse"], rel=1e-9, abs=1e-12)
        assert pred.research["max_abs_err"] == pytest.approx(ref["max_abs_err"], rel=1e-9, abs=1e-12)
        # at the fits the library compares with (the records after the anchor), the same λ_pred and integration
        at = dict(zip(ref["steps"], ref["lambda_pred"]))
        sig = dict(zip(ref["steps"], ref["sigma_pred"] / ref["rms"] - 1))
        for step, lam_pred, integration in zip(pred.steps, pred.lam_pred, pred.integration):
            if step in at:
                assert lam_pred == pytest.approx(at[step], rel=1e-9)
                assert integration == pytest.approx(sig[step], rel=1e-9, abs=1e-12)


@pytest.mark.slow
def test_the_rules_differ_only_where_rows_are_sparse(run):
    """Every row used: the right rule integrates every step exactly (only the rest R is left); the left rule
    lags one step.  Every 10 steps both carry a discretisation error, of opposite signs here."""
    _, rows = run
    dense_right = predict_lambda(rows, GROUP, rule="right")
    dense_left = predict_lambda(rows, GROUP, rule="left")
    assert np.max(np.abs(dense_right.integration)) < 2e-4  # the dropped rest: about eta*wd of the budget
    assert np.max(np.abs(dense_left.integration)) > 5 * np.max(np.abs(dense_right.integration))
    right, left = (predict_lambda(rows, GROUP, every=10, rule=r) for r in ("right", "left"))
    assert right.integration[-1] != pytest.approx(left.integration[-1], rel=0.1)
    with pytest.raises(ValueError, match="rule must be one of"):
        integrate_forces(1.0, np.zeros(2), np.arange(2), rule="middle")


@pytest.mark.slow
def test_default_lock_is_the_live_keys_start_fit(run):
    """`lambda` and the live offset keys lock λ/σ at one point, the run's start fit: the bridge error of the
    prediction equals the live `offset_bridge_klock` at every fitted row, and the output names the point."""
    folder, rows = run
    pred = predict_lambda(rows, GROUP)
    assert pred.lock == "start" and "start fit" in pred.lock_point
    live = {r["step"]: r for r in rows}
    g = f"weightforces/{GROUP}/"
    assert pred.lock_ratio == live[1][g + "offset_klock_ratio"]
    for step, bridge in zip(pred.steps, pred.bridge):
        assert bridge == pytest.approx(live[int(step)][g + "offset_bridge_klock"], rel=1e-9, abs=1e-12)
    # records written before offset_klock_ratio existed: the same ratio, recovered from the bridge key
    old = [{k: v for k, v in r.items() if not k.endswith("offset_klock_ratio")} for r in rows]
    assert predict_lambda(old, GROUP).lock_ratio == pytest.approx(pred.lock_ratio, rel=1e-12)
    # the first fit at or after the anchor (step 10 here; the warmup's first step has lr 0, so step 1's fit
    # is the start fit): another ratio, named
    first = predict_lambda(rows, GROUP, every=10, lock="first")
    assert first.lock_ratio != pred.lock_ratio and "first fit at or after the anchor (step 10)" in first.lock_point
    # rows without the live offset keys (no live fit at the start): the first fit, and the output says why
    bare = [{k: v for k, v in r.items() if "offset_" not in k} for r in rows]
    fallback = predict_lambda(bare, GROUP, every=10)
    assert fallback.lock == "first" and "no live start fit" in fallback.lock_point
    assert fallback.lock_ratio == first.lock_ratio
    code, out, err = run_cli(["lambda", str(folder), "--groups-only", "--json", "--predict-every", "10", "--rule", "left",
                              "--lock", "mean", "--alignment", "post"])
    assert code == 0, err
    p = json.loads(out)["dynamics"][GROUP]["prediction"]
    assert (p["rule"], p["lock"], p["every"]) == ("left", "mean", 10) and "research" in p
    code, out, err = run_cli(["lambda", str(folder), "--groups-only"])
    assert code == 0, err
    assert "right-point rule; k-lock at start" in out
