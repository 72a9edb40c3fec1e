"""λ(t) over checkpoints: per-matrix fits equal the exact protocol, pooled fits agree with the exact
pooled sort, Gaussian anchors, step order, the CLI table and JSON, and its errors."""

from __future__ import annotations

import contextlib
import io
import json
import math

import numpy as np
import pytest
import torch
from float_bounds import rel_sum_tol
from safetensors.torch import save_file

from hf_weightforces.analysis.scale import scale_trajectory
from hf_weightforces.cli import main
from hf_weightforces.core.weibull import WEIBULL_GAUSSIAN_K0, WEIBULL_GAUSSIAN_LAMBDA_RATIO0, fit_weibull

MATRICES = {
    "gpt_neox.layers.0.mlp.dense_h_to_4h.weight": (256, 64),
    "gpt_neox.layers.0.attention.query_key_value.weight": (192, 64),
    "gpt_neox.embed_in.weight": (256, 64),
}
BIAS = "gpt_neox.layers.0.mlp.dense_h_to_4h.bias"
TOTAL_NAME = "total"


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Gaussian weights whose σ grows with the step; checkpoint-100 sorts after checkpoint-20."""
    folder = tmp_path_factory.mktemp("run")
    gen = torch.Generator().manual_seed(0)
    for step in (20, 60, 100):
        sigma = 0.02 * (1 + step / 100)
        tensors = {n: torch.randn(s, generator=gen) * sigma for n, s in MATRICES.items()}
        tensors[BIAS] = torch.full((256,), 0.5)
        (folder / f"checkpoint-{step}").mkdir()
        save_file(tensors, str(folder / f"checkpoint-{step}" / "model.safetensors"))
    return folder


def test_fits_per_matrix_and_group(run):
    traj = scale_trajectory([run])
    assert [c.step for c in traj.checkpoints] == [20, 60, 100]
    assert traj.names("group") == ["transmission", "selection", "embedding", "other", "matrices", TOTAL_NAME]
    assert set(traj.names("matrix")) == set(MATRICES)  # a 256-element bias gets no matrix row
    from safetensors import safe_open

    with safe_open(str(run / "checkpoint-60" / "model.safetensors"), framework="pt") as f:
        for name in MATRICES:
            point = next(p for p in traj.points if p.name == name and p.step == 60)
            w = f.get_tensor(name)
            ref = fit_weibull(w)
            assert point.k == ref.k and point.scale == ref.scale  # the exact protocol, bit for bit
            # a float64 mean of n exact squares in two orders: 2·n·2^-53 relative (Higham), half that on the root
            assert point.sigma == pytest.approx(float(w.double().pow(2).mean().sqrt()), rel=rel_sum_tol(w.numel()))
    for g in ("transmission", "selection", "embedding"):
        steps, k, lam, sigma = traj.series(g)
        assert np.all(np.abs(k - WEIBULL_GAUSSIAN_K0) < 0.03)  # n = 12k-16k: sampling noise ±0.011
        assert np.all(np.abs(lam / sigma - WEIBULL_GAUSSIAN_LAMBDA_RATIO0) < 0.02)
        np.testing.assert_allclose(sigma, 0.02 * (1 + steps / 100), rtol=0.03)



def test_histogram_groups_agree_with_the_exact_pooled_sort(run):
    hist = scale_trajectory([run], per_matrix=False)
    exact = scale_trajectory([run], per_matrix=False, exact_groups=True)
    assert hist.group_method == "histogram" and exact.group_method == "exact"
    for name in ("transmission", "selection", "embedding", "matrices"):
        _, k_h, lam_h, sig_h = hist.series(name)
        _, k_e, lam_e, sig_e = exact.series(name)
        np.testing.assert_allclose(k_h, k_e, atol=1e-4)
        np.testing.assert_allclose(lam_h, lam_e, rtol=5e-5)
        np.testing.assert_array_equal(sig_h, sig_e)
    # matrices pools every weight matrix (the live Weibull pool); total: every tensor, σ only
    matrices = next(p for p in exact.points if p.name == "matrices" and p.step == 20)
    assert matrices.numel == sum(math.prod(s) for s in MATRICES.values())
    total = next(p for p in exact.points if p.name == TOTAL_NAME and p.step == 20)
    assert total.numel == matrices.numel + 256 and not total.fit.success and math.isnan(total.k)
    # two float64 sums of squares over overlapping sets: 2·n·2^-53 relative (Higham), n the larger set
    assert total.sigma ** 2 * total.numel == pytest.approx(matrices.sigma ** 2 * matrices.numel + 256 * 0.25,
                                                           rel=rel_sum_tol(total.numel))


def test_cli_table_json_and_errors(run, tmp_path):
    code, out, _ = run_cli(["lambda", str(run)])
    assert code == 0 and "transmission" in out and "lambda/sigma" in out and "steps 20, 60, 100" in out
    code, out, _ = run_cli(["lambda", str(run), "--json", "--groups-only", "--keep-every", "20"])
    data = json.loads(out)
    assert code == 0 and data["group_method"] == "histogram"
    assert {p["kind"] for p in data["points"]} == {"group"} and len(data["checkpoints"]) == 3
    code, _, err = run_cli(["lambda", str(tmp_path / "missing")])
    assert code == 2 and "no such file" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run_cli(["lambda", str(empty)])
    assert code == 2 and "no checkpoint" in err
