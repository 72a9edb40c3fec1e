"""One meaning per number (docs/aggregates.md): every ratio key equals the ratio of its own row's
keys, live (a real Trainer run) and offline (``lambda`` and ``fit`` JSON of its checkpoint)."""

from __future__ import annotations

import contextlib
import io
import json
import math

import numpy as np
import pytest
from conftest import train_tiny
from float_bounds import rel_sum_tol

from hf_weightforces import WeightForcesCallback
from hf_weightforces.analysis.records import read_metrics
from hf_weightforces.cli import main
from hf_weightforces.core.aggregates import ParamInfo, aggregate_masks, describe
from hf_weightforces.core.offset import gamma_bridge

P = "weightforces/"
FORCES = ("align", "inject", "decay")


def _rows_by_aggregate(row: dict) -> dict[str, dict[str, float]]:
    """``{aggregate: {key: value}}`` for the ``weightforces/<aggregate>/<key>`` keys of one row."""
    out: dict[str, dict[str, float]] = {}
    for key, value in row.items():
        if key.startswith(P) and key.count("/") >= 2 and not key.startswith((P + "matrix/", P + "backbone/")):
            agg, _, name = key[len(P):].rpartition("/")
            out.setdefault(agg, {})[name] = value
    return out


def _check_ratios(agg: str, r: dict[str, float]) -> int:
    """Assert each ratio key of one aggregate's row against its own keys; returns how many."""
    checked = 0

    def same(key: str, value: float, rel: float = 1e-12) -> None:
        nonlocal checked
        assert r[key] == pytest.approx(value, rel=rel, abs=1e-300), (agg, key)
        checked += 1

    if "rms" in r:
        same("rms", math.sqrt(r["norm2"] / r["numel"]))
    if "align" in r:
        budget = sum(abs(r[k]) for k in FORCES)
        for k in FORCES:
            same(f"{k}_share", abs(r[k]) / budget, rel=1e-9)  # per-step means: sums/steps, same ratio
        same("closure_rel", r["closure"] / budget, rel=1e-6)
    if "weibull_scale" in r:
        assert "rms" in r, f"{agg}: Weibull keys in a row without its own rms"
        same("weibull_scale_over_rms", r["weibull_scale"] / r["rms"], rel=1e-9)
        if "rms_pred" in r:
            k, scale = r["weibull_k"], r["weibull_scale"]
            same("offset_integration", r["rms_pred"] / r["rms"] - 1, rel=1e-6)
            same("offset_bridge_gamma", gamma_bridge(r["rms"], k) / scale - 1, rel=1e-6)
            same("offset_total_gamma", gamma_bridge(r["rms_pred"], k) / scale - 1, rel=1e-6)
    return checked


def run_cli(argv: list[str]) -> dict:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    assert code == 0, err.getvalue()
    return json.loads(out.getvalue())


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("agg")
    train_tiny(out, [WeightForcesCallback(weibull_every=2, offset_sample_every=2)], max_steps=4, logging_steps=2,
               save_strategy="steps", save_steps=4)
    return out


def test_every_live_ratio_key_is_the_ratio_of_its_own_row(run):
    rows = read_metrics(run / "weightforces" / "metrics.jsonl")
    assert len(rows) == 2
    last = _rows_by_aggregate(rows[-1])
    checked = sum(_check_ratios(agg, r) for agg, r in last.items())
    assert checked >= 50  # 7 aggregates with forces and rms, 4 with Weibull keys
    # total: every trained tensor, no fit; matrices: every class but other, with fit and full row
    assert "weibull_k" not in last["total"] and "rms_pred" not in last["total"]
    assert {"align", "rms", "weibull_k", "rms_pred", "offset_total_klock"} <= set(last["matrices"])
    classes = [g for g in ("transmission", "selection", "value", "embedding") if g in last]
    assert last["matrices"]["numel"] == sum(last[g]["numel"] for g in classes)
    assert last["total"]["numel"] == last["matrices"]["numel"] + last["other"]["numel"]
    for key in ("norm2", *FORCES):  # sums first: the pools add up
        parts = sum(last[g][key] for g in classes)
        assert last["matrices"][key] == pytest.approx(parts, rel=1e-9, abs=1e-18)
    assert not any(k.startswith(P + "frozen/") for k in rows[-1])  # nothing frozen in this model


def test_offline_lambda_and_fit_use_the_same_sets(run):
    rows = read_metrics(run / "weightforces" / "metrics.jsonl")
    live = _rows_by_aggregate(rows[-1])
    lam = run_cli(["lambda", str(run), "--json"])
    groups = {p["name"]: p for p in lam["points"] if p["kind"] == "group"}
    matrices = [p for p in lam["points"] if p["kind"] == "matrix"]
    for p in lam["points"]:
        if p["lambda"] is not None:
            assert p["lambda_over_sigma"] == pytest.approx(p["lambda"] / p["sigma"], rel=1e-12), p["name"]
    assert groups["total"]["lambda"] is None and groups["total"]["success"] is False
    assert groups["matrices"]["numel"] == sum(p["numel"] for p in matrices if p["group"] != "other")
    # the checkpoint is the final weights: the same numbers as the live row, for the same sets
    for agg in ("matrices", "total", "transmission", "embedding"):
        assert groups[agg]["numel"] == live[agg]["numel"], agg
        # σ² = ||w||²/n: float64 sums of n exact squares, offline and live in different orders (Higham: 2·n·2^-53
        # relative on ||w||², half that on σ)
        assert groups[agg]["sigma"] == pytest.approx(live[agg]["rms"], rel=rel_sum_tol(live[agg]["numel"])), agg
    assert groups["matrices"]["k"] == pytest.approx(live["matrices"]["weibull_k"], abs=2e-4)
    assert groups["matrices"]["lambda"] == pytest.approx(live["matrices"]["weibull_scale"], rel=2e-4)

    fit = run_cli(["fit", str(run / "checkpoint-4"), "--json"])
    fgroups = {g["group"]: g for g in fit["groups"]}
    for g in fit["groups"] + fit["matrices"]:
        assert g["scale_over_rms"] == pytest.approx(g["scale"] / g["rms"], rel=1e-12)
    assert fgroups["matrices"]["numel"] == live["matrices"]["numel"]
    assert fgroups["matrices"]["rms"] == pytest.approx(live["matrices"]["rms"], rel=rel_sum_tol(live["matrices"]["numel"]))


def test_older_runs_pool_keys_are_read_as_matrices(tmp_path):
    path = tmp_path / "metrics.jsonl"
    old = {"step": 4, P + "total/rms": 0.5, P + "total/weibull_k": 1.2, P + "total/rms_pred": 0.02,
           P + "total/offset_total_klock": 0.01, P + "total/start_weibull_scale": 0.01, P + "transmission/weibull_k": 1.1}
    path.write_text(json.dumps(old) + "\n")
    (row,) = read_metrics(path)
    assert row[P + "total/rms"] == 0.5 and P + "total/weibull_k" not in row
    assert row[P + "matrices/weibull_k"] == 1.2 and row[P + "matrices/rms_pred"] == 0.02
    assert row[P + "matrices/offset_total_klock"] == 0.01 and row[P + "matrices/start_weibull_scale"] == 0.01
    assert row[P + "transmission/weibull_k"] == 1.1


def test_aggregate_masks_table():
    infos = [describe(n, d, 10) for n, d in (
        ("encoder.block.0.layer.0.SelfAttention.q.weight", 2),
        ("encoder.block.0.layer.0.layer_norm.weight", 1),
        ("decoder.block.1.layer.2.DenseReluDense.wo.weight", 2),
        ("shared.weight", 2),
        ("decoder.block.1.layer.0.SelfAttention.v.lora_B.default.weight", 2),
    )]
    masks = {k: v.tolist() for k, v in aggregate_masks(infos).items()}
    assert masks == {
        "transmission": [False, False, True, False, False],
        "selection": [True, False, False, False, False],
        "value": [False, False, False, False, True],
        "embedding": [False, False, False, True, False],
        "other": [False, True, False, False, False],
        "matrices": [True, False, True, True, True],
        "adapters": [False, False, False, False, True],
        "total": [True] * 5,
        "encoder_layer_00": [True, True, False, False, False],
        "decoder_layer_01": [False, False, True, False, True],
    }
    # one stack alone (BERT's encoder.layer.N, a decoder-only model) keeps layer_NN; objects without
    # ``stack``/``adapter`` (offline records) get them parsed from the name
    bert = [ParamInfo("bert.encoder.layer.3.attention.self.query.weight", "selection", 3, 4)]
    assert list(aggregate_masks(bert)) == ["selection", "matrices", "total", "layer_03"]
    assert np.array_equal(aggregate_masks(infos[:1] + infos[2:3])["decoder_layer_01"], [False, True])
