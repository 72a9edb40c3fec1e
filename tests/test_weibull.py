"""Weibull fits (docs/weibull.md): the exact protocol against a literal reference, the Gaussian
anchors, recovery of known parameters, the mergeable histogram and its tolerance, MLE, and bad data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from hf_weightforces.core.weibull import (
    WEIBULL_GAUSSIAN_K0,
    WEIBULL_GAUSSIAN_LAMBDA_RATIO0,
    MagnitudeHistogram,
    fit_weibull,
    fit_weibull_histogram,
    fit_weibull_mle,
    gamma_bridge_scale,
    histogram_counts,
    log_edges,
    sorted_magnitudes,
)

# Documented tolerance of the histogram fit versus the exact fit (module docstring).
HIST_TOL_K = 1e-4
HIST_TOL_SCALE = 5e-5


def gaussian(n: int, seed: int = 0, sigma: float = 0.02) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(n) * sigma


@pytest.fixture(scope="module")
def gauss_1m() -> np.ndarray:
    return gaussian(10**6, seed=1234)


# ---------------------------------------------------------------- the exact protocol, literally


def literal_protocol(x: np.ndarray) -> tuple[float, float, float, float]:
    """docs/weibull.md written out with no shortcuts: (k, λ, R², KS)."""
    a = np.sort(np.abs(np.asarray(x, dtype=np.float64)))
    a = a[a > 0]
    n = a.size
    f = (np.arange(1, n + 1) - 0.5) / n
    m = (f >= 0.1) & (f <= 0.9)
    lx, y = np.log(a[m]), np.log(-np.log(1 - f[m]))
    k, b = np.polyfit(lx, y, 1)
    r2 = np.corrcoef(lx, y)[0, 1] ** 2
    lam = math.exp(-b / k)
    cdf = 1 - np.exp(-((a / lam) ** k))
    i = np.arange(1, n + 1)
    ks = max(np.max(i / n - cdf), np.max(cdf - (i - 1) / n))
    return k, lam, r2, ks


@pytest.mark.parametrize("n", [10, 11, 15, 20, 95, 100, 1000, 12345, 200_000])
@pytest.mark.parametrize("dist", ["gaussian", "weibull"])
def test_exact_fit_matches_literal_protocol(n: int, dist: str) -> None:
    # Weibull data fits well, so its KS is small and the blocked KS search has to refine more.
    x = gaussian(n, seed=n) if dist == "gaussian" else np.random.default_rng(n).weibull(1.3, n)
    fit = fit_weibull(x)
    k, lam, r2, ks = literal_protocol(x)
    assert fit.success and fit.method == "exact" and fit.n == n
    assert fit.k == pytest.approx(k, rel=1e-10)
    assert fit.scale == pytest.approx(lam, rel=1e-10)
    assert fit.r2 == pytest.approx(r2, rel=1e-10)
    assert fit.ks == pytest.approx(ks, rel=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_torch_tensor_equals_numpy(dtype: torch.dtype) -> None:
    t = torch.from_numpy(gaussian(5000, seed=3)).to(dtype).reshape(50, 100)
    ref = fit_weibull(t.to(torch.float64).numpy())  # the same values, already float64
    fit = fit_weibull(t)
    assert fit.success
    assert (fit.k, fit.scale, fit.r2, fit.n) == pytest.approx((ref.k, ref.scale, ref.r2, ref.n), rel=1e-12)


def test_zeros_and_non_finite_are_dropped_and_counted() -> None:
    x = gaussian(1000, seed=5)
    dirty = np.concatenate([x, np.zeros(7), [np.nan, np.inf, -np.inf]])
    fit, ref = fit_weibull(dirty), fit_weibull(x)
    assert fit.success and fit.n == 1000
    assert "3 non-finite" in fit.message
    assert (fit.k, fit.scale) == (ref.k, ref.scale)


@pytest.mark.parametrize("top", [1, 5, 40])
def test_exclude_top_removes_exactly_n_values(top: int) -> None:
    x = gaussian(2000, seed=top)
    x[:3] = 0.0  # zeros go first, then the top magnitudes
    fit = fit_weibull(torch.from_numpy(x), exclude_top=top)
    nonzero = np.abs(x[x != 0])
    kept = np.sort(nonzero)[:-top]
    ref = fit_weibull(kept)
    assert fit.n == nonzero.size - top == ref.n
    assert (fit.k, fit.scale) == (ref.k, ref.scale)
    assert fit.k != fit_weibull(x).k  # the plotting positions moved


def test_exclude_top_rejects_negative() -> None:
    with pytest.raises(ValueError):
        fit_weibull(gaussian(100), exclude_top=-1)


# ---------------------------------------------------------------- Gaussian anchors and constants


def test_gaussian_anchor_exact(gauss_1m: np.ndarray) -> None:
    sigma = float(np.sqrt(np.mean(gauss_1m**2)))
    fit = fit_weibull(gauss_1m)
    assert fit.success and fit.r2 > 0.99
    assert abs(fit.k - WEIBULL_GAUSSIAN_K0) < 0.004
    assert abs(fit.scale / sigma - WEIBULL_GAUSSIAN_LAMBDA_RATIO0) < 0.003


def test_constants_are_the_protocol_limit_for_half_normal() -> None:
    """The protocol on the half-normal quantile function itself (no sampling noise)."""
    n = 2_000_000
    f = (np.arange(1, n + 1) - 0.5) / n
    f = f[(f >= 0.1) & (f <= 0.9)]
    x = stats.norm.ppf((1 + f) / 2)  # σ = 1
    k, b = np.polyfit(np.log(x), np.log(-np.log1p(-f)), 1)
    assert k == pytest.approx(WEIBULL_GAUSSIAN_K0, abs=1e-4)
    assert math.exp(-b / k) == pytest.approx(WEIBULL_GAUSSIAN_LAMBDA_RATIO0, abs=1e-4)


def test_gamma_bridge() -> None:
    # docs/weibull.md: λ0 sqrt(Γ(1 + 2/k0)) = 1.0854 σ for Gaussian weights.
    assert 1.0 / gamma_bridge_scale(1.0 / WEIBULL_GAUSSIAN_LAMBDA_RATIO0, WEIBULL_GAUSSIAN_K0) == pytest.approx(
        1.0854, abs=1e-4
    )
    k = np.array([0.7, 1.0, 1.5, 2.0, 2.5])
    lam = 0.03
    sigma = lam * np.sqrt(np.array([math.gamma(1 + 2 / kk) for kk in k]))  # E[x²] = λ² Γ(1 + 2/k)
    np.testing.assert_allclose(gamma_bridge_scale(sigma, k), lam, rtol=1e-12)
    assert gamma_bridge_scale(math.sqrt(2.0), 1.0) == pytest.approx(1.0, rel=1e-12)  # exponential
    tt = gamma_bridge_scale(torch.tensor(sigma), torch.tensor(k))
    assert isinstance(tt, torch.Tensor)
    np.testing.assert_allclose(tt.numpy(), lam, rtol=1e-12)


def test_gamma_bridge_on_samples() -> None:
    rng = np.random.default_rng(7)
    x = 0.05 * rng.weibull(1.3, 400_000)
    sigma = float(np.sqrt(np.mean(x**2)))
    assert gamma_bridge_scale(sigma, 1.3) == pytest.approx(0.05, rel=5e-3)


# ---------------------------------------------------------------- recovery of known parameters


@pytest.mark.parametrize("k", [0.7, 1.0, 1.5, 2.5])
def test_recovers_known_weibull(k: float) -> None:
    lam = 0.03
    x = lam * np.random.default_rng(int(k * 10)).weibull(k, 200_000)
    signs = np.where(np.random.default_rng(1).random(x.size) < 0.5, -1.0, 1.0)
    fit = fit_weibull(signs * x)
    assert fit.success
    assert fit.k == pytest.approx(k, rel=0.02)
    assert fit.scale == pytest.approx(lam, rel=0.01)
    assert fit.r2 > 0.999
    assert fit.ks < 0.01
    hist = MagnitudeHistogram().add(x).fit()
    assert abs(hist.k - fit.k) < HIST_TOL_K
    assert abs(hist.scale / fit.scale - 1) < HIST_TOL_SCALE


# ---------------------------------------------------------------- the histogram


def test_histogram_matches_exact_on_gaussian(gauss_1m: np.ndarray) -> None:
    exact = fit_weibull(gauss_1m)
    for hist in (MagnitudeHistogram(), MagnitudeHistogram.for_max_abs(float(np.abs(gauss_1m).max()))):
        fit = hist.add(gauss_1m).fit()
        assert fit.success and fit.method == "histogram" and fit.n == exact.n
        assert abs(fit.k - exact.k) < HIST_TOL_K
        assert abs(fit.scale / exact.scale - 1) < HIST_TOL_SCALE
        # Measured at n = 10^6: |Δk| ~ 5e-7; choosing whole bins by their mid-bin F instead of
        # trimming the two window-edge bins gives 2.7e-5 on this sample and up to 1.1e-4 on others.
        assert abs(fit.k - exact.k) < 1e-5
        assert fit.r2 == pytest.approx(exact.r2, abs=1e-4)
        assert fit.ks == pytest.approx(exact.ks, abs=2e-3)  # KS at edges is a lower bound
        assert fit.ks <= exact.ks + 1e-6


def edge_fit_reference(counts: np.ndarray, edges: np.ndarray) -> float:
    """The biased variant (docs/weibull.md prototype): unweighted least squares at the upper bin edges with
    F = cum_through / n.  Kept only here, as a reference."""
    c = counts.astype(np.float64)
    f = (c[0] + np.cumsum(c[1:-1])) / c.sum()
    keep = (c[1:-1] > 0) & (f >= 0.1) & (f <= 0.9)
    k, _ = np.polyfit(np.log(edges[1:][keep]), np.log(-np.log1p(-f[keep])), 1)
    return float(k)


def test_edge_fit_is_biased_low_and_midpoint_fit_is_not(gauss_1m: np.ndarray) -> None:
    exact = fit_weibull(gauss_1m)
    hist = MagnitudeHistogram.for_max_abs(float(np.abs(gauss_1m).max())).add(gauss_1m)
    bias_edge = edge_fit_reference(hist.counts, hist.edges) - exact.k
    bias_mid = hist.fit().k - exact.k
    assert -0.03 < bias_edge < -0.01  # docs/weibull.md: -0.019
    assert abs(bias_mid) < HIST_TOL_K


def test_shards_merge_to_the_whole() -> None:
    t = torch.from_numpy(gaussian(300_001, seed=11)).reshape(-1)
    t[::1000] = 0.0
    whole = MagnitudeHistogram().add(t)
    shards = torch.tensor_split(t, [70_000, 70_001, 250_000])  # uneven, one of length 1
    merged = MagnitudeHistogram()
    for s in shards:
        merged = merged + MagnitudeHistogram().add(s)
    edges = whole.edges_tensor()
    summed = sum(histogram_counts(s, edges) for s in shards)
    np.testing.assert_array_equal(merged.counts, whole.counts)
    np.testing.assert_array_equal(summed.numpy(), whole.counts)
    assert merged.dropped_zeros == whole.dropped_zeros == 301
    assert merged.fit() == whole.fit()
    assert fit_weibull_histogram(summed, edges) == whole.fit()


def test_merge_refuses_different_edges() -> None:
    with pytest.raises(ValueError):
        MagnitudeHistogram() + MagnitudeHistogram.log_spaced(1e-4, 1.0)


def test_histogram_counts_bucket_rules() -> None:
    edges = log_edges(1e-3, 1.0, 3)  # 1e-3, 1e-2, 1e-1, 1
    x = torch.tensor([0.0, -5e-4, 1e-3, 2e-3, -1e-2, 0.05, 0.5, 1.0, 2.0, math.nan, math.inf], dtype=torch.float64)
    x[4] = -torch.tensor(edges[1])  # exactly on an edge: belongs to the bin below (e[j-1] < |x| <= e[j])
    x[2] = torch.tensor(edges[0])
    counts = histogram_counts(x, torch.tensor(edges), with_dropped=True)
    # underflow {5e-4, 1e-3}, bin1 {2e-3, 1e-2}, bin2 {0.05}, bin3 {0.5, 1.0}, overflow {2.0, inf?}
    # inf is non-finite: dropped, not overflow.
    assert counts.tolist() == [2, 2, 1, 2, 1, 1, 2]
    h = MagnitudeHistogram(edges)
    h.add_sorted(np.sort(np.abs(x.numpy()[[1, 2, 3, 4, 5, 6, 7, 8]])))
    assert h.counts.tolist() == counts[:-2].tolist()


EDGE_SETS = {
    "default": lambda: MagnitudeHistogram().edges_tensor(),  # log-spaced: the CPU's logarithm path
    "4096 over 4 decades": lambda: MagnitudeHistogram.log_spaced(1e-5, 0.1, 4096).edges_tensor(),
    "15,000 over a third of a decade": lambda: MagnitudeHistogram.log_spaced(0.01, 0.02, 15_000).edges_tensor(),
    # not log-spaced: the CPU's sort path
    "irregular": lambda: torch.from_numpy(np.sort(np.random.default_rng(0).uniform(1e-6, 0.1, 10_001))),
    # log-spaced but for edges moved by a thousandth of a bin (the values on them are tested): the sort path
    "nudged": lambda: MagnitudeHistogram().edges_tensor() * torch.where(
        torch.arange(10_241) % 7 == 3, 10.0 ** (1e-3 / 1024), 1.0).double(),
}
#: the edge sets the logarithm path refuses
NOT_LOG_SPACED = {"irregular", "nudged"}


@pytest.mark.parametrize("edge_set", sorted(EDGE_SETS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_cpu_counts_equal_device_path(dtype: torch.dtype, edge_set: str) -> None:
    """The CPU paths of histogram_counts (by logarithm for log-spaced edges, else by sorting) and
    the bucketize path used on accelerators agree, also for values exactly on an edge or one ulp
    away from it."""
    from hf_weightforces.core.weibull import _bucketize_counts, _log_spacing

    edges = EDGE_SETS[edge_set]()
    assert (_log_spacing(edges.numpy()) is None) == (edge_set in NOT_LOG_SPACED)
    t = (torch.randn(100_000, generator=torch.Generator().manual_seed(0)) * 0.02).to(dtype)
    on_edge = edges[3000:9000:11].to(dtype)
    m = on_edge.numel()
    t[:m] = on_edge
    t[m : 2 * m] = -torch.nextafter(on_edge, torch.ones_like(on_edge))
    t[2 * m : 3 * m] = torch.nextafter(on_edge, torch.zeros_like(on_edge))
    t[-3:] = torch.tensor([0.0, math.nan, -math.inf]).to(dtype)
    cpu = histogram_counts(t, edges, with_dropped=True)
    dev = _bucketize_counts(t, edges, with_dropped=True)
    assert torch.equal(cpu, dev)
    assert cpu.sum() == t.numel() and cpu[-1] == 2


def test_sorted_counts_equal_tensor_counts() -> None:
    x = torch.from_numpy(gaussian(200_000, seed=2)).to(torch.float32)
    h1 = MagnitudeHistogram().add(x)
    h2 = MagnitudeHistogram().add_sorted(sorted_magnitudes(x)[0])
    np.testing.assert_array_equal(h1.counts, h2.counts)


def test_underflow_counts_keep_f_right() -> None:
    x = gaussian(200_000, seed=4)
    exact = fit_weibull(x)
    a = np.abs(x)
    lo = float(np.quantile(a, 0.05))  # 5% of the values fall below the lowest edge
    fit = MagnitudeHistogram.log_spaced(lo, float(a.max()) * 1.01, 4096).add(x).fit()
    assert fit.success and fit.n == exact.n
    assert abs(fit.k - exact.k) < HIST_TOL_K
    # An edge range that cuts into the middle 80% fails rather than silently refitting.
    narrow = MagnitudeHistogram.log_spaced(float(np.quantile(a, 0.2)), float(a.max()), 4096).add(x).fit()
    assert not narrow.success and "edges too narrow" in narrow.message


# ---------------------------------------------------------------- MLE: another protocol


def test_mle_is_labelled_and_different() -> None:
    x = gaussian(200_000, seed=9)
    mle, exact = fit_weibull_mle(x), fit_weibull(x)
    assert mle.success and mle.method == "mle" and math.isnan(mle.r2)
    assert mle.k == pytest.approx(1.263, abs=0.01)
    assert mle.k - exact.k > 0.04


# ---------------------------------------------------------------- bad data never raises


BAD_INPUTS = {
    "empty": np.array([]),
    "all zeros": np.zeros(1000),
    "nine values": gaussian(9),
    "constant": np.full(100, 0.5),
    "all nan": np.full(100, np.nan),
    "bf16 zeros": torch.zeros(10, 10, dtype=torch.bfloat16),
    "int zeros": torch.zeros(100, dtype=torch.int64),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
@pytest.mark.parametrize("fitter", ["exact", "histogram", "mle"])
def test_degenerate_inputs_fail_softly(name: str, fitter: str) -> None:
    x = BAD_INPUTS[name]
    if fitter == "exact":
        fit = fit_weibull(x)
    elif fitter == "histogram":
        fit = MagnitudeHistogram().add(x).fit()
    else:
        fit = fit_weibull_mle(x)
    assert fit.success is False and fit.method == fitter
    assert fit.message
    assert all(math.isnan(v) for v in (fit.k, fit.scale, fit.r2, fit.ks))


def test_exclude_everything_fails_softly() -> None:
    fit = fit_weibull(gaussian(50), exclude_top=45)
    assert not fit.success and fit.n == 5


@pytest.mark.parametrize("edge_set", ["default", "irregular"])
def test_pooled_counts_are_each_pools_tensors_counts(edge_set: str) -> None:
    """Counting many tensors together (chunks across tensors, each value's pool and bucket in one
    bincount) gives, per pool, the sum of each tensor's own :func:`histogram_counts`: tensors
    smaller and larger than a chunk, one of exactly a chunk, an empty one, bfloat16 and float64
    (chunks of their own), values on the edges, zeros and non-finite values (left out)."""
    from hf_weightforces.core.weibull import _LOG_CHUNK, pooled_counts

    edges = EDGE_SETS[edge_set]()
    gen = torch.Generator().manual_seed(3)
    sizes = [64, 5000, _LOG_CHUNK, 3 * _LOG_CHUNK + 17, 0, 40_000, 1, 70_000, 12]
    dtypes = [torch.float32, torch.bfloat16, torch.float32, torch.float32, torch.float32, torch.float64,
              torch.float32, torch.float16, torch.float64]
    tensors = [(torch.randn(n, generator=gen) * 0.02).to(d) for n, d in zip(sizes, dtypes)]
    tensors[3][:200] = edges[4000:4200].to(torch.float32)
    tensors[5][:3] = torch.tensor([0.0, math.nan, math.inf], dtype=torch.float64)
    pools = [2, 0, 1, 0, 2, 1, 0, 2, 2]
    got = pooled_counts(tensors, pools, 4, edges)
    want = torch.zeros(4, edges.numel() + 1, dtype=torch.int64)
    for t, r in zip(tensors, pools):
        if t.numel():
            want[r] += histogram_counts(t, edges)
    assert torch.equal(got, want)
    assert got[3].sum() == 0 and got.sum() == sum(sizes) - 3


def test_weibull_pools_count_each_aggregates_tensors() -> None:
    """WeibullPools.counts (pools counted together, then added into the rows they feed) equals the
    per-tensor sum into every aggregate a tensor belongs to, with and without per-matrix rows."""
    from hf_weightforces.core.aggregates import ParamInfo
    from hf_weightforces.core.pools import WeibullPools

    gen = torch.Generator().manual_seed(4)
    groups = ["embedding", "transmission", "other", "selection", "transmission", "value", "other"]
    sizes = [9000, 4096, 64, 20_000, 70_000, 3000, 128]
    infos = [ParamInfo(f"p{i}", g, None if g == "embedding" else i // 2, n) for i, (g, n) in enumerate(zip(groups, sizes))]
    weights = [torch.randn(n, generator=gen) * (0.01 * (i + 1)) for i, n in enumerate(sizes)]
    for per_matrix in (False, True):
        pools = WeibullPools(infos, per_matrix=per_matrix)
        want = torch.zeros(len(pools.names), pools.bins, dtype=torch.float64)
        for rows_of, w in zip(pools.rows, weights):
            for r in rows_of:
                want[r] += histogram_counts(w, pools.edges).double()
        got = pools.counts(weights)
        assert torch.equal(got, want.reshape(-1)), per_matrix
        assert got.reshape(len(pools.names), -1)[pools.names.index("matrices")].sum() == sum(
            n for g, n in zip(groups, sizes) if g != "other")
