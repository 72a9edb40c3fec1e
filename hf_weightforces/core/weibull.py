"""Two-parameter Weibull fits of weight magnitudes (docs/weibull.md) and the σ→λ bridges (section 5).

The paper's protocol (Ding, arXiv:2605.18898), for one matrix or a pooled group, in float64:

    x = |w| flattened, zeros dropped, sorted ascending, n = len(x)
    F_i = (i - 0.5) / n                                  i = 1..n (Hazen plotting positions)
    keep 0.1 <= F_i <= 0.9                               the "middle 80%"
    y_i = ln(-ln(1 - F_i)),  least squares  y = k ln x + b
    k = slope,  λ = exp(-b / k),  R² of that line

because the Weibull CDF F(x) = 1 - exp(-(x/λ)^k) linearises to ln(-ln(1-F)) = k ln x - k ln λ.
The KS distance sup_x |F_emp(x) - F(x)| of the fitted CDF is reported beside it.

Three ways to run it, each labelled in :attr:`WeibullFit.method`:

* ``"exact"`` (:func:`fit_weibull`): sort every element (numpy sort; ``torch.sort`` is ~10x slower
  on CPU).
* ``"histogram"`` (:class:`MagnitudeHistogram`, :func:`fit_weibull_histogram`): counts of |w| in
  fixed log-spaced bins, additive across tensors, shards and ranks (all-reduce a sum).  The fit uses
  each non-empty bin's geometric midpoint, weighted by its count, at the mid-bin empirical CDF
  F = (cum_before + count/2)/n; the two bins cut by the window edges count only their in-window
  ranks.  Tolerance versus ``"exact"`` at 1024 bins per decade (the default edges, and the the docs'
  4096 bins over 4 decades): |Δk| <= 1e-4 and |Δλ|/λ <= 5e-5 for n >= 10^4.  Measured over 5 seeds
  and both edge choices: Gaussian, n = 10^6: |Δk| <= 4.4e-6, |Δλ|/λ <= 1.6e-6; Weibull k in
  {0.7, 1, 1.5, 2.5} and Gaussian at n in {10^4, 10^5, 10^6}: |Δk| <= 7.4e-5 (largest at k = 2.5,
  n = 10^4, where the window spans fewest bins), |Δλ|/λ <= 1.4e-5; the 2-D weights of
  all-MiniLM-L6-v2: |Δk| <= 7.7e-6 (``tests/test_weibull.py`` checks the bound).  Selecting
  whole bins by their mid-bin F instead of trimming the two edge bins: |Δk| up to 1.1e-4 on
  Gaussian data.  A fit at bin *edges* instead
  (unweighted, F = cum_through/n) is biased low by about 0.019 in k; do not use it.
* ``"mle"`` (:func:`fit_weibull_mle`): scipy's maximum likelihood.  A different estimator of a
  different thing: on half-normal data it gives k ≈ 1.263, not the protocol's 1.2054.  Never mix
  the two in one comparison.

Cost on 10^7 float32 values, 2-core CPU (median of 7): exact 0.14-0.20 s (numpy sort, the window
regression and an exact KS that evaluates F only in blocks where the maximum can be); histogram
0.13 s (:func:`histogram_counts` on CPU places each value by its logarithm; sorting with numpy
instead took 0.49 s in the same run; the ``torch.bucketize`` path used on accelerators takes
1.1 s on this CPU); fit from counts 0.2 ms;
``torch.sort`` alone 1.06 s; scipy MLE about 2 s per 10^6 values.

Gaussian anchors: for i.i.d. N(0, σ²) weights (|w| half-normal) the protocol converges to
k0 = 1.2054 and λ0 = 0.8875 σ (:data:`WEIBULL_GAUSSIAN_K0`, :data:`WEIBULL_GAUSSIAN_LAMBDA_RATIO0`;
both recomputed from the half-normal quantile function in the tests).

Trims (``trim=`` of every fit, :data:`TRIMS`): ``"mid80"`` is the protocol above and the default;
``"mid90"`` (0.05 <= F <= 0.95) and ``"full"`` (every rank) are the research code's alternatives
(github tiexinding/NPM-Weibull-public, ``npm_weibull/core/weibull.py``), reported beside mid-80 to show
how much of a departure sits in the tails.

Nothing here raises on bad data: an unusable input gives ``success=False``, NaN numbers and a
message (too few values, all zeros, no spread).  Non-finite values are dropped and counted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import torch

__all__ = [
    "DEFAULT_BINS_PER_DECADE",
    "DEFAULT_HI",
    "DEFAULT_LO",
    "TRIMS",
    "WEIBULL_GAUSSIAN_K0",
    "WEIBULL_GAUSSIAN_LAMBDA_RATIO0",
    "MagnitudeHistogram",
    "WeibullFit",
    "fit_weibull",
    "fit_weibull_histogram",
    "fit_weibull_mle",
    "fit_weibull_sorted",
    "gamma_bridge_scale",
    "histogram_counts",
    "log_edges",
    "pooled_counts",
    "sorted_magnitudes",
    "weibull_cdf",
]

ArrayLike = np.ndarray | torch.Tensor
Method = Literal["exact", "histogram", "mle"]

#: Protocol k for i.i.d. Gaussian weights (half-normal magnitudes), docs/weibull.md.
WEIBULL_GAUSSIAN_K0 = 1.2054
#: Protocol λ/σ for i.i.d. Gaussian weights, docs/weibull.md.
WEIBULL_GAUSSIAN_LAMBDA_RATIO0 = 0.8875

#: Default histogram edges: a fixed absolute range, so histograms of any tensor, shard, layer or
#: step merge without agreeing on a range first.  1024 log bins per decade (the resolution of the
#: docs/weibull.md prototype's 4096 bins over [1e-4·max|w|, max|w|]) over [1e-8, 1e2]: 10240 bins.  Values
#: below 1e-8 or above 1e2 go to the underflow/overflow bins and still count in n, so F stays right
#: as long as the middle 80% lies inside the range.
DEFAULT_LO = 1e-8
DEFAULT_HI = 1e2
DEFAULT_BINS_PER_DECADE = 1024

_F_LO, _F_HI = 0.1, 0.9  # the middle-80% window
#: Fit windows of plotting positions F = (i - 0.5)/n: the paper's middle 80% (the default everywhere), and
#: the research code's alternatives (``npm_weibull.core.weibull``, ``trim="mid_90"`` / ``"full_range"``):
#: the middle 90% and every rank.  Wider windows weigh the tails, where trained matrices depart most.
TRIMS: dict[str, tuple[float, float]] = {"mid80": (_F_LO, _F_HI), "mid90": (0.05, 0.95), "full": (0.0, 1.0)}
_MIN_N = 10
_CHUNK = 1 << 22  # elements per chunk: bounds temporaries in histogram_counts and the KS scan


@dataclass(frozen=True)
class WeibullFit:
    """Result of one Weibull fit.

    ``k`` shape, ``scale`` λ, ``r2`` of the probability-plot line (NaN for ``"mle"``), ``ks`` the
    KS distance of the fitted CDF to the data (exact: whole sample; histogram: at the bin edges),
    ``n`` the number of magnitudes used (after dropping zeros, non-finite values and excluded top
    values), ``method`` which estimator ran.  Numbers are NaN when ``success`` is False.
    """

    k: float
    scale: float
    r2: float
    ks: float
    n: int
    method: Method
    success: bool
    message: str = ""

    @property
    def lam(self) -> float:
        """Alias of :attr:`scale` (the paper's λ)."""
        return self.scale

    def to_dict(self) -> dict[str, object]:
        return {
            "k": self.k,
            "scale": self.scale,
            "r2": self.r2,
            "ks": self.ks,
            "n": self.n,
            "method": self.method,
            "success": self.success,
            "message": self.message,
        }


def _failed(method: Method, n: int, message: str) -> WeibullFit:
    nan = float("nan")
    return WeibullFit(nan, nan, nan, nan, int(n), method, False, message)


def weibull_cdf(x: np.ndarray, k: float, scale: float) -> np.ndarray:
    """F(x) = 1 - exp(-(x/λ)^k), computed as -expm1 for accuracy in the lower tail."""
    return -np.expm1(-np.power(np.asarray(x, dtype=np.float64) / scale, k))


def _line_fit(
    lx: np.ndarray, y: np.ndarray, w: np.ndarray | None = None
) -> tuple[float, float, float] | None:
    """(Weighted) least squares y = k·lx + b; returns (k, λ = exp(-b/k), R²), None if degenerate."""
    if w is None:
        mx, my = float(lx.mean()), float(y.mean())
        dx, dy = lx - mx, y - my
        sxx, sxy, syy = float(dx @ dx), float(dx @ dy), float(dy @ dy)
    else:
        sw = float(w.sum())
        mx, my = float(w @ lx) / sw, float(w @ y) / sw
        dx, dy = lx - mx, y - my
        wdx = w * dx
        sxx, sxy, syy = float(wdx @ dx), float(wdx @ dy), float((w * dy) @ dy)
    return _line_from_sums(mx, my, sxx, sxy, syy)


_LINE_CHUNK = 1 << 20  # ranks per chunk of the exact line fit: its temporaries stay ~50 MB for any n


def _window_line(xs: np.ndarray, start: int, stop: int, n: int) -> tuple[float, float, float] | None:
    """:func:`_line_fit` of (ln x_i, ln(-ln(1 - F_i))), F_i = (i - 0.5)/n, over the sorted ranks
    start..stop-1.  A window of more than :data:`_LINE_CHUNK` ranks is summed in chunks, two passes
    (means, then centred sums), so memory does not grow with n; shorter ones are one chunk."""

    def points(a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        f = (np.arange(a + 1, b + 1, dtype=np.float64) - 0.5) / n
        return np.log(xs[a:b].astype(np.float64)), np.log(-np.log1p(-f))

    if stop - start <= _LINE_CHUNK:
        return _line_fit(*points(start, stop))
    chunks = [(a, min(a + _LINE_CHUNK, stop)) for a in range(start, stop, _LINE_CHUNK)]
    sx = sy = 0.0
    for a, b in chunks:
        lx, y = points(a, b)
        sx, sy = sx + float(lx.sum()), sy + float(y.sum())
    mx, my = sx / (stop - start), sy / (stop - start)
    sxx = sxy = syy = 0.0
    for a, b in chunks:
        lx, y = points(a, b)
        dx, dy = lx - mx, y - my
        sxx, sxy, syy = sxx + float(dx @ dx), sxy + float(dx @ dy), syy + float(dy @ dy)
    return _line_from_sums(mx, my, sxx, sxy, syy)


def _line_from_sums(mx: float, my: float, sxx: float, sxy: float, syy: float) -> tuple[float, float, float] | None:
    if not (sxx > 0.0 and syy > 0.0) or not math.isfinite(sxx * syy):
        return None
    k = sxy / sxx
    if not (k > 0.0 and math.isfinite(k)):
        return None
    b = my - k * mx
    return k, math.exp(-b / k), sxy * sxy / (sxx * syy)


def _to_numpy_abs(x: ArrayLike) -> np.ndarray:
    """|x| flattened as a CPU numpy array of float32 or float64 (order-preserving, exact)."""
    if isinstance(x, torch.Tensor):
        t = x.detach()
        if t.is_complex() or not t.is_floating_point():
            t = t.to(torch.float64)
        elif t.dtype not in (torch.float32, torch.float64):
            t = t.to(torch.float32)  # bf16/fp16/fp8 → float32 is exact
        fresh = t.dtype != x.dtype or t.device.type != "cpu"  # already a copy: take |.| in place
        a = t.reshape(-1).cpu().numpy()
    else:
        a = np.asarray(x).reshape(-1)
        fresh = a.dtype not in (np.float32, np.float64)
        if fresh:
            a = a.astype(np.float64)
    return np.abs(a, out=a) if fresh else np.abs(a)


def sorted_magnitudes(x: ArrayLike) -> tuple[np.ndarray, int]:
    """Sorted positive finite |x| as a CPU numpy array, and the number of non-finite values dropped.

    float32 data stays float32 (the order is the same as in float64 and sorting is ~2x faster);
    the fits convert to float64 where they compute.  Memory: one copy of |x| (float32 or float64),
    sorted in place; the result is a view of it (zeros sort first, inf and NaN last).
    """
    a = _to_numpy_abs(x)  # a new array, never a view of x
    a.sort()
    zero, inf = a.dtype.type(0), a.dtype.type(np.inf)  # keys of a's dtype: no float64 copy of a
    lo = int(np.searchsorted(a, zero, side="right"))
    hi = int(np.searchsorted(a, inf, side="left"))
    return a[lo:hi], int(a.size - hi)


def _trim_bounds(trim: str) -> tuple[float, float]:
    try:
        return TRIMS[trim]
    except KeyError:
        raise ValueError(f"unknown trim {trim!r}; choose one of {', '.join(TRIMS)}") from None


def _window(n: int, f_lo: float = _F_LO, f_hi: float = _F_HI) -> tuple[int, int]:
    """0-based [start, stop) of the ranks i (1-based) with f_lo <= (i-0.5)/n <= f_hi (default the
    middle 80%), evaluated with the same float64 comparison as the literal protocol."""
    lo = max(1, math.ceil(f_lo * n + 0.5) - 1)
    while lo > 1 and (lo - 1 - 0.5) / n >= f_lo:
        lo -= 1
    while lo <= n and (lo - 0.5) / n < f_lo:
        lo += 1
    hi = min(n, math.floor(f_hi * n + 0.5) + 1)
    while hi >= 1 and (hi - 0.5) / n > f_hi:
        hi -= 1
    while hi < n and (hi + 1 - 0.5) / n <= f_hi:
        hi += 1
    return lo - 1, hi


def _ks_direct(xs: np.ndarray, k: float, scale: float, offset: int, n: int) -> float:
    """max over the given ranks of max(i/n - F(x_i), F(x_i) - (i-1)/n); xs holds ranks offset+1..."""
    cdf = weibull_cdf(xs, k, scale)
    i = np.arange(offset + 1, offset + 1 + xs.size, dtype=np.float64)
    return max(float(np.max(i / n - cdf)), float(np.max(cdf - (i - 1) / n)))


def _ks_sorted(xs: np.ndarray, k: float, scale: float, block: int = 64) -> float:
    """KS distance D = max_i max(i/n - F(x_i), F(x_i) - (i-1)/n) over the whole sorted sample.

    Exact, but F is evaluated only where D can be: F at the ends a, b of each block of ranks bounds
    the block (i/n - F(x_i) <= b/n - F(x_a), F(x_i) - (i-1)/n <= F(x_b) - (a-1)/n, F monotone),
    and only blocks whose bound beats the best value seen at block ends are evaluated in full.
    """
    n = xs.size
    if n <= 16 * block:
        return _ks_direct(xs, k, scale, 0, n)
    starts = np.arange(0, n, block)
    ends = np.minimum(starts + block - 1, n - 1)
    fa = weibull_cdf(xs[starts], k, scale)
    fb = weibull_cdf(xs[ends], k, scale)
    a1, b1 = starts + 1.0, ends + 1.0  # 1-based ranks
    best = max(
        float(np.max(a1 / n - fa)), float(np.max(fa - (a1 - 1) / n)),
        float(np.max(b1 / n - fb)), float(np.max(fb - (b1 - 1) / n)),
    )
    bound = np.maximum(b1 / n - fa, fb - (a1 - 1) / n)
    todo = np.nonzero(bound > best)[0]
    for j in range(0, todo.size, _CHUNK // block):  # candidate blocks, a bounded batch at a time
        idx = (starts[todo[j : j + _CHUNK // block]][:, None] + np.arange(block)).ravel()
        idx = idx[idx < n]
        cdf = weibull_cdf(xs[idx], k, scale)
        i = idx + 1.0
        best = max(best, float(np.max(i / n - cdf)), float(np.max(cdf - (i - 1) / n)))
    return best


def fit_weibull_sorted(xs: np.ndarray, *, message: str = "", trim: str = "mid80") -> WeibullFit:
    """The exact protocol on an already sorted array of positive finite magnitudes.

    For callers that fit the same sorted array more than once (with and without super weights:
    ``fit_weibull_sorted(xs[:-N])``).  ``message`` is appended to the result's message.  ``trim``
    picks the window of plotting positions (:data:`TRIMS`; default the paper's middle 80%).
    """
    f_lo, f_hi = _trim_bounds(trim)
    n = int(xs.size)
    if n < _MIN_N:
        return _failed("exact", n, f"only {n} positive finite values (need >= {_MIN_N})" + message)
    start, stop = _window(n, f_lo, f_hi)
    line = _window_line(xs, start, stop, n)
    if line is None:
        return _failed("exact", n, f"no spread in the {trim} window of |w| (constant values?)" + message)
    k, scale, r2 = line
    return WeibullFit(k, scale, r2, _ks_sorted(xs, k, scale), n, "exact", True, message.lstrip("; "))


def fit_weibull(x: ArrayLike, *, exclude_top: int = 0, trim: str = "mid80") -> WeibullFit:
    """Fit Weibull(k, λ) to |x| with the paper's exact protocol (module docstring, docs/weibull.md).

    ``x`` is a torch tensor (any dtype or device; copied to CPU) or a numpy array.  Zeros and
    non-finite values are dropped; ``exclude_top`` further drops that many of the largest
    magnitudes ("super weights") before the plotting positions are assigned, so F uses the
    remaining n.  ``trim``: the window of plotting positions (:data:`TRIMS`, default ``"mid80"``).
    Never raises on bad data: see :attr:`WeibullFit.success`.
    """
    _trim_bounds(trim)
    if exclude_top < 0:
        raise ValueError(f"exclude_top must be >= 0, got {exclude_top}")
    xs, n_bad = sorted_magnitudes(x)
    message = f"; dropped {n_bad} non-finite values" if n_bad else ""
    if exclude_top:
        xs = xs[: max(0, xs.size - exclude_top)]
        message += f"; excluded the {exclude_top} largest magnitudes"
    return fit_weibull_sorted(xs, message=message, trim=trim)


def fit_weibull_mle(x: ArrayLike) -> WeibullFit:
    """Maximum-likelihood Weibull fit, ``scipy.stats.weibull_min.fit(|x|, floc=0)``.

    NOT the paper's protocol: MLE weighs the whole range (tails included) and answers a different
    question, e.g. k ≈ 1.263 on half-normal data where the protocol gives 1.2054.  Slow (about 2 s
    per 10^6 values).  ``r2`` is NaN (there is no probability-plot line); ``ks`` is computed on the
    whole sample as for ``"exact"``.
    """
    from scipy import stats  # optional at import time: only this estimator needs it

    xs, n_bad = sorted_magnitudes(x)
    message = f"dropped {n_bad} non-finite values" if n_bad else ""
    n = int(xs.size)
    if n < _MIN_N:
        return _failed("mle", n, f"only {n} positive finite values (need >= {_MIN_N})")
    if xs[0] == xs[-1]:
        return _failed("mle", n, "no spread in |w| (constant values)")
    xd = xs.astype(np.float64)
    try:
        k, _, scale = stats.weibull_min.fit(xd, floc=0)
    except Exception as exc:  # scipy optimiser failures are data problems here, not bugs
        return _failed("mle", n, f"scipy weibull_min.fit failed: {exc}")
    k, scale = float(k), float(scale)
    if not (k > 0 and scale > 0 and math.isfinite(k) and math.isfinite(scale)):
        return _failed("mle", n, f"scipy weibull_min.fit returned k={k}, scale={scale}")
    return WeibullFit(k, scale, float("nan"), _ks_sorted(xs, k, scale), n, "mle", True, message)


# ----------------------------------------------------------------------------------------------
# Mergeable histogram
# ----------------------------------------------------------------------------------------------


def log_edges(lo: float, hi: float, bins: int) -> np.ndarray:
    """``bins + 1`` log-spaced edges from ``lo`` to ``hi`` (float64)."""
    if not (0 < lo < hi and math.isfinite(hi)) or bins < 1:
        raise ValueError(f"need 0 < lo < hi and bins >= 1, got lo={lo}, hi={hi}, bins={bins}")
    return np.logspace(math.log10(lo), math.log10(hi), int(bins) + 1, dtype=np.float64)


def histogram_counts(
    tensor: torch.Tensor, edges: torch.Tensor, *, with_dropped: bool = False
) -> torch.Tensor:
    """Counts of |tensor| in buckets of ``edges``, on the tensor's device, with no host sync.

    Layout (``B = len(edges) - 1`` bins), an int64 tensor of length ``B + 2``:
    ``[0]`` underflow 0 < |x| <= edges[0]; ``[j]`` for j = 1..B the bin edges[j-1] < |x| <= edges[j];
    ``[B+1]`` overflow |x| > edges[-1].  Zeros and non-finite values are not counted; with
    ``with_dropped=True`` two more entries follow: the number of zeros and of non-finite values.
    The result is a sum over elements, so counts of shards, tensors and ranks add (one all-reduce
    of this tensor).

    On accelerators: ``torch.bucketize`` in chunks, |x| compared in ``edges.dtype`` (pass float64
    edges, as :meth:`MagnitudeHistogram.edges_tensor` does).  On CPU the same counts, |x|
    compared exactly against the float64 edges: for log-spaced edges (every
    :class:`MagnitudeHistogram`'s) from each value's logarithm, in one pass and no sort
    (:func:`_log_counts`: 2-3x faster than sorting on 10^5 to 10^7 values); for other edges from a
    numpy sort and a binary search of the edges (about 10x faster than ``torch.bucketize`` there).
    """
    if tensor.device.type == "cpu":
        e = edges.detach().to(torch.float64).numpy()
        spacing = _log_spacing(e)
        if spacing is not None:
            return torch.from_numpy(_log_counts(tensor, e, spacing, with_dropped))
        xs, n_bad = sorted_magnitudes(tensor)
        counts = _sorted_counts(xs, e)
        if with_dropped:
            counts = np.concatenate([counts, [tensor.numel() - n_bad - xs.size, n_bad]])
        return torch.from_numpy(counts)
    return _bucketize_counts(tensor, edges, with_dropped=with_dropped)


#: Half-width, in bins, of the band around each edge where :func:`_log_buckets` places a value by an
#: exact comparison instead of by its logarithm.  The position comes from a float64 logarithm: a
#: few float64 ulp of |log10 x| <= 324 and of the position, at most 2^16 bins per unit of log10,
#: under 1e-8 bins off; and an edge set is taken as log-spaced only when every edge lies within
#: :data:`_SPACING_TOL` bins of its place (np.logspace's: within 1e-11).  Ten times both: about two
#: values in a million are searched (at 0.05 bins a tenth were, and the search was two thirds of
#: the time).
_EDGE_BAND = 1e-6
_SPACING_TOL = 1e-7
_LOG_CHUNK = 1 << 16
_LOG_SPACINGS: dict[tuple, tuple[float, float, np.ndarray] | None] = {}


def _log_spacing(edges: np.ndarray) -> tuple[float, float, np.ndarray] | None:
    """(log10 of the first edge, bins per unit of log10, the edges as float32 comparisons: the
    largest float32 at or below each) when ``edges`` are log-spaced to within :data:`_SPACING_TOL`
    bins (every edge set of :class:`MagnitudeHistogram` is), else None; kept per edge set."""
    key = (edges.size, hash(edges.tobytes()))
    if key not in _LOG_SPACINGS:
        if len(_LOG_SPACINGS) >= 16:
            _LOG_SPACINGS.clear()
        spacing = None
        if edges.size >= 2 and edges[0] > 0 and np.all(np.isfinite(edges)) and np.all(np.diff(edges) > 0):
            logs = np.log10(edges)
            lo, per = float(logs[0]), (edges.size - 1) / float(logs[-1] - logs[0])
            if np.abs((logs - lo) * per - np.arange(edges.size)).max() < _SPACING_TOL and per <= 1 << 16:
                e32 = edges.astype(np.float32)
                above = e32.astype(np.float64) > edges  # a <= edge iff a <= (the largest float32 <= edge)
                e32[above] = np.nextafter(e32[above], np.float32(-np.inf))
                spacing = (lo, per, e32)
        _LOG_SPACINGS[key] = spacing
    return _LOG_SPACINGS[key]


def _log_buckets(a: np.ndarray, edges: np.ndarray, spacing: tuple[float, float, np.ndarray]) -> np.ndarray:
    """Each magnitude's bucket of :func:`histogram_counts` (0 underflow, 1..B the bins, B + 1
    overflow; B + 2 for zeros and non-finite values) from its logarithm: bucket
    ceil((log10 a - log10 e[0]) x bins per decade), except the few within :data:`_EDGE_BAND` of an
    edge, placed by an exact binary search of the edges (float32 values against the largest float32
    at or below each edge, as :func:`_sorted_counts`)."""
    lo, per, e32 = spacing
    n_buckets = edges.size + 1  # underflow, the bins, overflow
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.log10(a, dtype=np.float64)
        t -= lo
        t *= per  # the position among the edges, in bins
        dropped = ~np.isfinite(t)  # zeros (-inf), NaN, inf
        near = np.abs(t - np.rint(t)) < _EDGE_BAND
        j = np.ceil(t, out=t).astype(np.intp)  # (the dropped values' cast is undefined: replaced below)
        np.clip(j, 0, n_buckets - 1, out=j)
        exact = np.flatnonzero(near)
        j[exact] = np.searchsorted(e32 if a.dtype == np.float32 else edges, a[exact], side="left")  # e[j-1] < a <= e[j]
    j[dropped] = n_buckets
    return j


def _numpy_values(tensor: torch.Tensor) -> np.ndarray:
    """A CPU tensor's values, flat, as float32 or float64 numpy (bf16/fp16 -> float32 is exact)."""
    x = tensor.detach().reshape(-1)
    if x.dtype not in (torch.float32, torch.float64):
        x = x.to(torch.float32)
    return x.numpy()


def _log_counts(tensor: torch.Tensor, edges: np.ndarray, spacing: tuple[float, float, np.ndarray],
                with_dropped: bool) -> np.ndarray:
    """:func:`histogram_counts` on a CPU for log-spaced ``edges``, in one pass over the values and no
    sort (:func:`_log_buckets`).  Chunks of :data:`_LOG_CHUNK` values keep the temporaries in cache."""
    x = _numpy_values(tensor)
    n_buckets = edges.size + 1
    counts = np.zeros(n_buckets + 1, dtype=np.int64)  # per bucket, and one more for the dropped values
    zeros = 0
    for start in range(0, x.size, _LOG_CHUNK):
        a = np.abs(x[start : start + _LOG_CHUNK])
        zeros += int(np.count_nonzero(a == 0))
        counts += np.bincount(_log_buckets(a, edges, spacing), minlength=n_buckets + 1)
    n_bad = int(counts[-1]) - zeros
    return np.concatenate([counts[:-1], [zeros, n_bad]]) if with_dropped else counts[:-1]


def pooled_counts(tensors: Sequence[torch.Tensor], pools: Sequence[int], n_pools: int,
                  edges: torch.Tensor) -> torch.Tensor:
    """[n_pools, len(edges) + 1] int64: row r is the sum of :func:`histogram_counts` (without the
    dropped entries) of the tensors ``i`` with ``pools[i] == r``, on the tensors' device.

    On a CPU with log-spaced edges the tensors are counted together: their values go through
    :func:`_log_buckets` in chunks of about :data:`_LOG_CHUNK` values across tensors, each value's
    pool and bucket counted by one ``bincount`` per chunk (a few dozen numpy operations per chunk,
    not per tensor: most tensors of a small model are much smaller than a chunk).  Elsewhere one
    :func:`histogram_counts` per tensor."""
    n_buckets = edges.numel() + 1
    device = tensors[0].device if tensors else edges.device
    e = edges.detach().to(torch.float64).numpy() if device.type == "cpu" else None  # (no host read of device edges)
    spacing = _log_spacing(e) if e is not None else None
    if spacing is None:
        out = torch.zeros(n_pools, n_buckets, dtype=torch.int64, device=device)
        for w, r in zip(tensors, pools):
            if w.numel():
                out[r] += histogram_counts(w, edges).to(device)
        return out
    counts = np.zeros(n_pools * (n_buckets + 1), dtype=np.int64)  # per pool: the buckets and the dropped
    parts: list[np.ndarray] = []
    owners: list[int] = []  # the pool of each part

    def count() -> None:  # the parts gathered so far, as one chunk
        a = np.abs(parts[0] if len(parts) == 1 else np.concatenate(parts))
        first = np.repeat(np.array(owners, dtype=np.intp) * (n_buckets + 1), [x.size for x in parts])  # each value's pool
        counts[:] += np.bincount(_log_buckets(a, e, spacing) + first, minlength=counts.size)
        parts.clear()
        owners.clear()

    for wide in (False, True):  # float64 values are compared with the float64 edges: chunks of their own
        size = 0
        for w, r in zip(tensors, pools):
            if not w.numel() or (w.dtype == torch.float64) != wide:
                continue
            x = _numpy_values(w)
            for start in range(0, x.size, _LOG_CHUNK):
                parts.append(x[start : start + _LOG_CHUNK])
                owners.append(r)
                size += parts[-1].size
                if size >= _LOG_CHUNK:
                    count()
                    size = 0
        if parts:
            count()
    return torch.from_numpy(counts.reshape(n_pools, n_buckets + 1)[:, :-1].copy())


def _bucketize_counts(tensor: torch.Tensor, edges: torch.Tensor, *, with_dropped: bool) -> torch.Tensor:
    """The device path of :func:`histogram_counts` (runs on any device; tested on CPU)."""
    nb = edges.numel() + 1  # buckets 0..len(edges)
    edges = edges.to(device=tensor.device)
    counts = torch.zeros(nb + 2, dtype=torch.int64, device=tensor.device)
    flat = tensor.detach().reshape(-1)
    for start in range(0, flat.numel(), _CHUNK):
        a = flat[start : start + _CHUNK].abs().to(edges.dtype)
        idx = torch.bucketize(a, edges)  # edges[i-1] < a <= edges[i]  ->  i
        idx = idx.masked_fill(a == 0, nb).masked_fill(~torch.isfinite(a), nb + 1)
        if idx.device.type == "cpu":
            counts += torch.bincount(idx, minlength=nb + 2)
        else:  # bincount sizes its output from max(idx): a host sync on accelerators
            counts.scatter_add_(0, idx, torch.ones_like(idx))
    return counts if with_dropped else counts[:nb]


def _sorted_counts(xs: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """:func:`histogram_counts` layout from an already sorted array of positive finite values,
    each value compared exactly with the float64 edges."""
    edges = np.asarray(edges, dtype=np.float64)
    if xs.dtype == np.float32:
        # For a float32 a: a <= e  iff  a <= (largest float32 <= e).  Searching in float32 avoids
        # promoting the whole sorted array to float64.
        e32 = edges.astype(np.float32)
        above = e32.astype(np.float64) > edges
        e32[above] = np.nextafter(e32[above], np.float32(-np.inf))
        pos = np.searchsorted(xs, e32, side="right")
    else:
        pos = np.searchsorted(xs, edges, side="right")
    out = np.empty(edges.size + 1, dtype=np.int64)
    out[0] = pos[0]
    out[1:-1] = np.diff(pos)
    out[-1] = xs.size - pos[-1]
    return out


class MagnitudeHistogram:
    """Counts of |w| over fixed log-spaced edges; additive across tensors, shards and ranks.

    ``counts`` (int64, length ``bins + 2``) follows :func:`histogram_counts`: underflow, the bins,
    overflow.  Edges are fixed at construction, so two histograms merge by adding counts
    (``h1 + h2``, ``h1.merge(h2)``, or an all-reduce of ``counts``) only if their edges are equal.
    The default edges are absolute (:data:`DEFAULT_LO`, :data:`DEFAULT_HI`, 1024 bins per decade),
    so every histogram built with defaults merges with every other.  :meth:`for_max_abs` builds the
    docs/weibull.md prototype's 4096 bins over [1e-4·max|w|, max|w|] instead.

    Usage::

        h = MagnitudeHistogram()
        for shard in shards:
            h.add(shard)
        fit = h.fit()
    """

    def __init__(self, edges: ArrayLike | None = None, counts: ArrayLike | None = None) -> None:
        if edges is None:
            decades = math.log10(DEFAULT_HI / DEFAULT_LO)
            edges = log_edges(DEFAULT_LO, DEFAULT_HI, round(decades * DEFAULT_BINS_PER_DECADE))
        if isinstance(edges, torch.Tensor):
            edges = edges.detach().cpu().numpy()
        edges = np.array(edges, dtype=np.float64)
        if edges.ndim != 1 or edges.size < 2 or not np.all(np.diff(edges) > 0) or edges[0] <= 0:
            raise ValueError("edges must be a 1-D increasing array of positive values")
        edges.flags.writeable = False
        self.edges = edges
        if counts is None:
            self.counts = np.zeros(edges.size + 1, dtype=np.int64)
        else:
            if isinstance(counts, torch.Tensor):  # e.g. all-reduced counts from histogram_counts
                counts = counts.detach().cpu().numpy()
            counts = np.array(counts)
            if counts.shape != (edges.size + 1,):
                raise ValueError(f"counts must have length len(edges)+1 = {edges.size + 1}, got {counts.shape}")
            self.counts = counts
        self.dropped_zeros = 0
        self.dropped_nonfinite = 0

    @classmethod
    def log_spaced(cls, lo: float, hi: float, bins: int = 4096) -> MagnitudeHistogram:
        """Empty histogram with ``bins`` log-spaced bins over [lo, hi]."""
        return cls(log_edges(lo, hi, bins))

    @classmethod
    def for_max_abs(cls, max_abs: float, *, decades: float = 4.0, bins: int = 4096) -> MagnitudeHistogram:
        """The docs/weibull.md prototype: ``bins`` log bins over [10^-decades · max|w|, max|w|]."""
        return cls.log_spaced(max_abs * 10.0 ** (-decades), max_abs, bins)

    @property
    def n(self) -> int:
        """Number of magnitudes counted (zeros and non-finite values excluded)."""
        return int(self.counts.sum())

    def edges_tensor(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The edges as a float64 tensor on ``device`` (for :func:`histogram_counts`)."""
        return torch.tensor(self.edges, dtype=torch.float64, device=device)

    def add(self, x: ArrayLike) -> MagnitudeHistogram:
        """Count |x| (torch tensor on any device, or numpy array); returns ``self``."""
        t = torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x
        c = histogram_counts(t, self.edges_tensor(t.device), with_dropped=True).cpu().numpy()
        self.counts = self.counts + c[:-2]
        self.dropped_zeros += int(c[-2])
        self.dropped_nonfinite += int(c[-1])
        return self

    def add_sorted(self, xs: np.ndarray) -> MagnitudeHistogram:
        """Count an already sorted array of positive finite magnitudes (O(bins · log n))."""
        self.counts = self.counts + _sorted_counts(xs, self.edges)
        return self

    def merge(self, other: MagnitudeHistogram) -> MagnitudeHistogram:
        """A new histogram holding both counts; edges must be identical."""
        if not np.array_equal(self.edges, other.edges):
            raise ValueError("cannot merge histograms with different edges")
        out = MagnitudeHistogram(self.edges, self.counts + other.counts)
        out.dropped_zeros = self.dropped_zeros + other.dropped_zeros
        out.dropped_nonfinite = self.dropped_nonfinite + other.dropped_nonfinite
        return out

    __add__ = merge

    def fit(self, trim: str = "mid80") -> WeibullFit:
        """:func:`fit_weibull_histogram` of these counts."""
        fit = fit_weibull_histogram(self.counts, self.edges, trim=trim)
        if self.dropped_nonfinite:
            note = f"dropped {self.dropped_nonfinite} non-finite values"
            fit = replace(fit, message="; ".join(m for m in (fit.message, note) if m))
        return fit


def fit_weibull_histogram(counts: ArrayLike, edges: ArrayLike, *, trim: str = "mid80") -> WeibullFit:
    """The protocol on binned magnitudes: weighted least squares at geometric bin midpoints.

    ``counts`` follows :func:`histogram_counts` (length ``len(edges)+1``: underflow, bins,
    overflow) or holds the bins only (length ``len(edges)-1``).  Bin j holds the ranks
    C_{<j} < i <= C_{<j} + c_j (n = total count, under/overflow included).  Every bin lying inside
    the protocol's rank window (0.1 <= (i-0.5)/n <= 0.9) contributes one point

        x_j = sqrt(e_j e_{j+1})  (geometric midpoint),   F_j = (C_{<j} + c_j/2) / n  (mid-bin CDF),

    with weight c_j, and the least-squares line ln(-ln(1-F)) = k ln x + b is fitted with those
    weights.  The (at most two) bins cut by the window edges contribute only their in-window ranks:
    weight = their number, F = their mean plotting position, x = the matching point of the bin on a
    log-uniform spread.  Selecting whole bins by F_j instead shifts k by about 1e-4 on Gaussian
    data (the probability plot is curved there); the trimming brings it to ~1e-6.

    R² is the weighted R² of the line; KS is max_j |C(<= e_j)/n - F(e_j)| over the edges (a lower
    bound of the sample KS).  Fails (``success=False``) if the under- or overflow bin reaches into
    the window: the fit would then be cut by the range of the edges, not by F.  ``trim`` picks the
    window (:data:`TRIMS`); with ``"full"`` the under/overflow bins must be empty.
    """
    f_lo, f_hi = _trim_bounds(trim)
    e = np.asarray(edges.detach().cpu() if isinstance(edges, torch.Tensor) else edges, dtype=np.float64)
    c = np.asarray(counts.detach().cpu() if isinstance(counts, torch.Tensor) else counts, dtype=np.float64)
    nb = e.size - 1
    if c.shape == (nb,):
        c = np.concatenate([[0.0], c, [0.0]])
    if c.shape != (nb + 2,):
        return _failed("histogram", 0, f"counts has shape {c.shape}, expected ({nb + 2},) or ({nb},)")
    total = float(c.sum())
    n = int(round(total))
    if n < _MIN_N:
        return _failed("histogram", n, f"only {n} positive finite values (need >= {_MIN_N})")
    start, stop = _window(n, f_lo, f_hi)  # in-window ranks, 0-based [start, stop)
    if c[0] > start or total - c[-1] < stop:
        return _failed(
            "histogram",
            n,
            f"under/overflow bins hold {c[0] / total:.1%}/{c[-1] / total:.1%} of values, reaching into "
            f"the {trim} window: edges too narrow",
        )
    cb = c[1:-1]
    after = c[0] + np.cumsum(cb)
    before = after - cb
    lo, hi = np.maximum(before, start), np.minimum(after, stop)
    weight = np.clip(hi - lo, 0.0, None)
    keep = weight > 0
    if np.count_nonzero(keep) < 2:
        return _failed("histogram", n, "fewer than 2 non-empty bins in the middle 80% (no spread?)")
    f = (lo[keep] + hi[keep]) / (2.0 * total)  # mean of (i - 0.5)/n over the in-window ranks
    frac = ((lo[keep] + hi[keep]) / 2.0 - before[keep]) / cb[keep]  # 0.5 for a whole bin
    le = np.log(e)
    lx = le[:-1][keep] + frac * (le[1:][keep] - le[:-1][keep])
    line = _line_fit(lx, np.log(-np.log1p(-f)), weight[keep])
    if line is None:
        return _failed("histogram", n, "degenerate least-squares line")
    k, scale, r2 = line
    emp = np.concatenate([[c[0]], after]) / total  # C(<= e_j)/n for j = 0..nb
    ks = float(np.max(np.abs(emp - weibull_cdf(e, k, scale))))
    return WeibullFit(k, scale, r2, ks, n, "histogram", True, "")


# ----------------------------------------------------------------------------------------------
# σ → λ bridges (docs/weibull.md)
# ----------------------------------------------------------------------------------------------


def gamma_bridge_scale(
    sigma: float | np.ndarray | torch.Tensor, k: float | np.ndarray | torch.Tensor
) -> float | np.ndarray | torch.Tensor:
    """Γ bridge: λ_Γ = σ / sqrt(Γ(1 + 2/k)), exact when |w| is exactly Weibull(k, λ) with RMS σ.

    Because E[x²] = λ² Γ(1 + 2/k) for Weibull(k, λ).  For Gaussian weights at the protocol's
    k0 = 1.2054 it overstates λ: λ0 sqrt(Γ(1 + 2/k0)) = 1.0854 σ (docs/weibull.md).  Accepts floats, numpy
    arrays or torch tensors (the result has the same kind).
    """
    if isinstance(sigma, torch.Tensor) or isinstance(k, torch.Tensor):
        s = torch.as_tensor(sigma, dtype=torch.float64)
        kk = torch.as_tensor(k, dtype=torch.float64, device=s.device)
        return s * torch.exp(-0.5 * torch.lgamma(1.0 + 2.0 / kk))
    if np.ndim(sigma) == 0 and np.ndim(k) == 0:
        return float(sigma) * math.exp(-0.5 * math.lgamma(1.0 + 2.0 / float(k)))
    lg = np.vectorize(math.lgamma, otypes=[np.float64])
    return np.asarray(sigma, dtype=np.float64) * np.exp(-0.5 * lg(1.0 + 2.0 / np.asarray(k, dtype=np.float64)))
