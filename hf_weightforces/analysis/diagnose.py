"""``hf-weightforces diagnose``: what is unusual about a model's weights, in plain words (arXiv:2605.18898).

Per weight matrix (floating point, at least 2-D, or 1-D with at least 65536 elements), read one tensor at a
time and never unpickled:

* the Weibull protocol (docs/weibull.md) on |w| with the paper's mid-80 window, beside the mid-90 and full
  trims (:data:`~hf_weightforces.core.weibull.TRIMS`), and λ/σ;
* distribution-free shape metrics of |w| (the research package's ``npm_weibull/core/distfree.py``, computed
  here exactly from the sorted values instead of a histogram): Q90/Q10, P99.9/P50 (about seven times more
  sensitive to outliers, the paper says) and the Gini coefficient G = Σ(2i - n - 1) x_(i) / (n Σ x);
* Weibull against lognormal and gamma (all two-parameter, location 0) by maximum likelihood on a seeded
  subsample of at most ``sample`` magnitudes: log-likelihood, AIC = 4 - 2 ln L and the KS distance of each
  (``scipy.stats``; the Weibull MLE solves its profile equation with ``scipy.optimize.brentq``);
* a class of k (:data:`K_CLASSES`, thresholds of the research package's ``npm_weibull/core/classify.py``,
  paper §A.7/A.8.3): ``transmission`` band 1.18 <= k <= 1.21 with R² >= 0.95, ``mild_selection``
  0.95 <= k < 1.18 (or in the band with R² < 0.95), ``strong_selection`` k < 0.95, and ``above_band``
  k > 1.21 (the research code files these under mild selection; they are lighter-tailed than Gaussian,
  not heavier, so they are kept apart here).  ``gaussian_like`` marks |k - 1.2054| < 0.01 and λ/σ within 1%
  of 0.8875: indistinguishable from an untrained Gaussian initialisation.

Gaussian references (|w| half-normal; :data:`GAUSSIAN`): k 1.2054, λ/σ 0.8875, Q90/Q10 = Φ⁻¹(0.95)/Φ⁻¹(0.55)
= 13.0896, P99.9/P50 = Φ⁻¹(0.9995)/Φ⁻¹(0.75) = 4.8785, Gini √2 - 1 = 0.4142.

Memory: one matrix at a time, and within it the tensor as read and one float32 (float64 for float64 weights)
copy of |w| while that copy is sorted in place; the tensor is then let go, and every statistic runs on the
sorted copy with temporaries of fixed size (Σw² and the Gini sums in float64 chunks, quantiles read at their
ranks, the family comparison widened to float64 only on its sample).  Peak growth above the import baseline
for one 16384 x 8192 matrix: 2.00x its bytes in float32, 3.00x in bfloat16 (it was 8.0x and 15.0x with
float64 copies of the sorted magnitudes and of the weights); smaller matrices add fixed chunks of about 70 MB
(``tests/test_offline_memory.py``).

What stands out (:func:`stand_outs`), each with its reason: a k far from its class (more than 3 robust
standard deviations, 1.4826·MAD, and 0.05 from the class median), a tail heavier than twice the Gaussian
P99.9/P50 (matrices of at least 10,000 values), a matrix still at its Gaussian initialisation in a model whose
other matrices moved, a poor probability-plot line (R² < 0.95), a body whose k
moves by more than 0.05 between the mid-80 and mid-90 windows, and another family beating Weibull by more than
10 AIC units per 1000 values.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from hf_weightforces.analysis.checkpoints import PathLike, iter_tensors
from hf_weightforces.analysis.fit import MIN_1D_NUMEL, _sum_of_squares
from hf_weightforces.core.groups import GROUPS, Grouping, classify, layer_index
from hf_weightforces.core.weibull import (
    WEIBULL_GAUSSIAN_K0,
    WEIBULL_GAUSSIAN_LAMBDA_RATIO0,
    fit_weibull_sorted,
    sorted_magnitudes,
)

__all__ = ["GAUSSIAN", "K_CLASSES", "Diagnosis", "MatrixDiagnosis", "classify_k", "compare_families",
           "diagnose", "format_diagnosis", "shape_metrics", "sorted_quantiles", "stand_outs"]

#: k classes in order, with the thresholds of npm_weibull/core/classify.py (NPM-Weibull-public).
K_CLASSES = ("transmission", "mild_selection", "strong_selection", "above_band")
BAND = (1.18, 1.21)
MILD_LOW = 0.95
R2_MIN = 0.95
#: Half-normal (Gaussian weights) values of each metric; see the module docstring.
GAUSSIAN = {"k": WEIBULL_GAUSSIAN_K0, "lambda_over_sigma": WEIBULL_GAUSSIAN_LAMBDA_RATIO0, "q90_q10": 13.0896,
            "p999_p50": 4.8785, "gini": math.sqrt(2.0) - 1.0}
DEFAULT_SAMPLE = 1 << 16
MIN_TAIL_NUMEL = 10_000  # a P99.9 needs at least 10 values beyond it to say anything about a tail
FAMILIES = ("weibull", "lognormal", "gamma")
#: Values per float64 chunk of the Gini sums (three 8 MB temporaries); up to this size the sums are the
#: unchunked expression's, bit for bit.
_CHUNK = 1 << 20


def classify_k(k: float, r2: float) -> str:
    """The research package's k classes (module docstring); NaN k gives ``"unfitted"``."""
    if not math.isfinite(k):
        return "unfitted"
    if BAND[0] <= k <= BAND[1]:
        return "transmission" if not (r2 < R2_MIN) else "mild_selection"
    if k > BAND[1]:
        return "above_band"
    return "mild_selection" if k >= MILD_LOW else "strong_selection"


def sorted_quantiles(xs: np.ndarray, qs) -> np.ndarray:
    """``np.quantile(xs, qs)`` (the default ``linear`` method), bit for bit, for an already sorted ``xs``:
    read at the two ranks around each virtual index instead of partitioning a copy of ``xs`` (which
    ``np.quantile`` makes: 4 bytes per value for float32)."""
    n = xs.size
    virtual = (n - 1) * np.asarray(qs, dtype=np.float64)
    below = np.floor(virtual).astype(np.intp)
    above = np.minimum(below + 1, n - 1)
    gamma = virtual - below
    a, b = xs[below], xs[above]
    diff = b - a
    return np.where(gamma >= 0.5, b - diff * (1 - gamma), a + diff * gamma)  # numpy's _lerp, both branches


def shape_metrics(xs: np.ndarray) -> dict[str, float]:
    """Q90/Q10, P99.9/P50 and Gini of sorted positive magnitudes (numpy's linear quantiles).

    The Gini sums Σ(2i - n - 1) x_(i) and Σ x run in float64 over chunks of :data:`_CHUNK` values, each
    chunk's partial sums added exactly (``math.fsum``): no float64 copy of ``xs`` and no weight vector
    of n values (16 bytes per value before).  Up to :data:`_CHUNK` values this is the one-pass float64
    expression bit for bit; beyond, each sum is rounded over 2^20 terms instead of n, so it differs
    from the one-pass value only by float64 rounding (and its error bound is the smaller one)."""
    if xs.size < 10:
        return {"q90_q10": math.nan, "p999_p50": math.nan, "gini": math.nan}
    q10, q50, q90, q999 = sorted_quantiles(xs, [0.1, 0.5, 0.9, 0.999])
    n = xs.size
    weighted, total = [], []
    for start in range(0, n, _CHUNK):
        x = xs[start : start + _CHUNK].astype(np.float64)
        weights = 2.0 * np.arange(start + 1, start + x.size + 1, dtype=np.float64) - n - 1.0
        weighted.append(float(weights @ x))
        total.append(float(x.sum()))
    gini = math.fsum(weighted) / (n * math.fsum(total))
    return {"q90_q10": float(q90 / q10), "p999_p50": float(q999 / q50), "gini": gini}


def _weibull_mle(x: np.ndarray) -> tuple[float, float]:
    """Weibull MLE with location 0: the root k of Σ x^k ln x / Σ x^k - 1/k - mean(ln x) = 0, then
    λ = (mean x^k)^(1/k) (the profile-likelihood equations)."""
    from scipy.optimize import brentq

    lx = np.log(x)
    lx = lx - lx.max()  # scale-free: x / max(x) keeps x^k in range; λ is rescaled below
    mean_lx = lx.mean()

    def g(k: float) -> float:
        w = np.exp(k * lx)
        return float(w @ lx / w.sum()) - 1.0 / k - mean_lx

    k = brentq(g, 1e-3, 50.0, xtol=1e-12)
    scale = float(np.mean(np.exp(k * lx))) ** (1.0 / k) * float(np.exp(np.log(x).max()))
    return float(k), scale


def compare_families(xs: np.ndarray, *, sample: int = DEFAULT_SAMPLE, seed: int = 0) -> dict[str, object]:
    """Weibull, lognormal and gamma by MLE (location 0) on at most ``sample`` of the magnitudes ``xs``:
    parameters, log-likelihood, AIC, KS; ``best`` has the lowest AIC and ``delta_aic`` is relative to it."""
    from scipy import stats

    x = xs
    if x.size > sample > 0:  # draw first, then widen: the same values as drawing from a float64 copy of xs
        x = np.sort(np.random.default_rng(seed).choice(x, sample, replace=False))
    x = x.astype(np.float64)
    out: dict[str, dict] = {}
    k, scale = _weibull_mle(x)
    dists = {"weibull": stats.weibull_min(k, scale=scale)}
    s, _, sc = stats.lognorm.fit(x, floc=0)
    dists["lognormal"] = stats.lognorm(s, scale=sc)
    a, _, sc = stats.gamma.fit(x, floc=0)
    dists["gamma"] = stats.gamma(a, scale=sc)
    for name, dist in dists.items():
        ll = float(np.sum(dist.logpdf(x)))
        ks = float(stats.kstest(x, dist.cdf).statistic)
        shape, scale_ = dist.args[0], dist.kwds["scale"]
        out[name] = {"shape": float(shape), "scale": float(scale_), "loglik": ll, "aic": 4.0 - 2.0 * ll, "ks": ks}
    best = min(out, key=lambda n: out[n]["aic"])
    for name in out:
        out[name]["delta_aic"] = out[name]["aic"] - out[best]["aic"]
    return {"n": int(x.size), "best": best, "families": out}


@dataclass(frozen=True)
class MatrixDiagnosis:
    name: str
    group: str
    layer: int | None
    numel: int
    k: float
    scale: float
    r2: float
    ks: float
    k_mid90: float
    k_full: float
    lambda_over_sigma: float
    k_class: str
    gaussian_like: bool
    shape: dict[str, float]
    families: dict[str, object]

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "group": self.group, "layer": self.layer, "numel": self.numel, "k": self.k,
                "lambda": self.scale, "r2": self.r2, "ks": self.ks, "k_mid90": self.k_mid90, "k_full": self.k_full,
                "lambda_over_sigma": self.lambda_over_sigma, "k_class": self.k_class,
                "gaussian_like": self.gaussian_like, **self.shape, "families": self.families}


def diagnose_matrix(name: str, tensor, grouping: Grouping | None = None, *, sample: int = DEFAULT_SAMPLE,
                    seed: int = 0) -> MatrixDiagnosis:
    """Every metric of one matrix (module docstring)."""
    sumsq = _sum_of_squares(tensor)
    xs, _ = sorted_magnitudes(tensor)
    return _diagnose_sorted(name, tensor.ndim, int(tensor.numel()), sumsq, xs, grouping, sample, seed)


def _diagnose_sorted(name: str, ndim: int, numel: int, sumsq: float, xs: np.ndarray, grouping: Grouping | None,
                     sample: int, seed: int) -> MatrixDiagnosis:
    """:func:`diagnose_matrix` from what it reads of the tensor: its shape, Σw² (float64) and sorted |w|."""
    sigma = math.sqrt(sumsq / max(1, numel))
    fit = fit_weibull_sorted(xs)
    k90, kfull = fit_weibull_sorted(xs, trim="mid90").k, fit_weibull_sorted(xs, trim="full").k
    ratio = fit.scale / sigma if sigma > 0 else math.nan
    gaussian_like = abs(fit.k - GAUSSIAN["k"]) < 0.01 and abs(ratio / GAUSSIAN["lambda_over_sigma"] - 1) < 0.01
    families = compare_families(xs, sample=sample, seed=seed ^ zlib.crc32(name.encode())) if xs.size >= 100 else {}
    return MatrixDiagnosis(name, classify(name, ndim, grouping), layer_index(name), numel,
                           fit.k, fit.scale, fit.r2, fit.ks, k90, kfull, ratio, classify_k(fit.k, fit.r2),
                           bool(gaussian_like), shape_metrics(xs), families)


def _robust(values: np.ndarray) -> tuple[float, float]:
    med = float(np.median(values))
    return med, 1.4826 * float(np.median(np.abs(values - med)))


def stand_outs(matrices: Iterable[MatrixDiagnosis]) -> list[dict[str, object]]:
    """The matrices that stand out, each with every reason in plain words, most reasons first."""
    mats = [m for m in matrices if math.isfinite(m.k)]
    by_class: dict[str, np.ndarray] = {}
    for g in {m.group for m in mats}:
        by_class[g] = np.array([m.k for m in mats if m.group == g])
    trained = sum(not m.gaussian_like for m in mats) > len(mats) / 2
    out = []
    for m in mats:
        reasons = []
        med, mad = _robust(by_class[m.group])
        if by_class[m.group].size >= 4 and abs(m.k - med) > max(3 * mad, 0.05):
            reasons.append(f"k = {m.k:.3f} is far from its class ({m.group} median {med:.3f}): "
                           + ("heavier-tailed" if m.k < med else "lighter-tailed") + " than its peers")
        p = m.shape["p999_p50"]
        if p > 2 * GAUSSIAN["p999_p50"] and m.numel >= MIN_TAIL_NUMEL:
            reasons.append(f"heavy tail: its largest 0.1% of weights are {p:.1f}x the median magnitude "
                           f"(Gaussian weights: {GAUSSIAN['p999_p50']:.1f}x); look for outlier (super) weights")
        if m.r2 < R2_MIN:
            reasons.append(f"|w| is not Weibull-shaped in its body (probability-plot R² = {m.r2:.3f} < {R2_MIN})")
        if math.isfinite(m.k_mid90) and abs(m.k_mid90 - m.k) > 0.05:
            reasons.append(f"its tails bend the probability plot: k = {m.k:.3f} on the middle 80%, "
                           f"{m.k_mid90:.3f} on the middle 90%")
        if m.gaussian_like and trained:
            reasons.append(f"still looks like its random Gaussian initialisation (k = {m.k:.4f}, lambda/sigma = "
                           f"{m.lambda_over_sigma:.4f}) while most matrices moved away: probably never trained "
                           "(unused, or frozen)")
        fam = m.families
        if fam and fam["best"] != "weibull":
            lead = fam["families"]["weibull"]["delta_aic"] / fam["n"] * 1000
            if lead > 10:
                reasons.append(f"{fam['best']} describes |w| better than Weibull (AIC lower by {lead:.0f} per "
                               f"1000 values; KS {fam['families'][fam['best']]['ks']:.3f} vs "
                               f"{fam['families']['weibull']['ks']:.3f})")
        if reasons:
            out.append({"name": m.name, "group": m.group, "layer": m.layer, "k": m.k, "reasons": reasons})
    return sorted(out, key=lambda d: (-len(d["reasons"]), d["name"]))


@dataclass(frozen=True)
class Diagnosis:
    source: str
    matrices: tuple[MatrixDiagnosis, ...]
    skipped: int
    sample: int

    def classes(self) -> dict[str, dict[str, object]]:
        out = {}
        for g in GROUPS:
            ms = [m for m in self.matrices if m.group == g and math.isfinite(m.k)]
            if not ms:
                continue
            k = np.array([m.k for m in ms])
            counts = {c: sum(m.k_class == c for m in ms) for c in K_CLASSES}
            best = {f: sum(bool(m.families) and m.families["best"] == f for m in ms) for f in FAMILIES}
            out[g] = {"matrices": len(ms), "k_median": float(np.median(k)), "k_min": float(k.min()),
                      "k_max": float(k.max()), "k_class": classify_k(float(np.median(k)), 1.0),
                      "k_classes": counts, "gaussian_like": sum(m.gaussian_like for m in ms),
                      "p999_p50_median": float(np.median([m.shape["p999_p50"] for m in ms])),
                      "q90_q10_median": float(np.median([m.shape["q90_q10"] for m in ms])),
                      "gini_median": float(np.median([m.shape["gini"] for m in ms])), "best_family": best}
        return out

    def to_dict(self) -> dict[str, object]:
        from hf_weightforces.core.records import json_safe

        return json_safe({
            "source": self.source, "sample": self.sample, "skipped_tensors": self.skipped,
            "thresholds": {"band": list(BAND), "mild_selection_low": MILD_LOW, "r2_min": R2_MIN,
                           "source": "npm_weibull/core/classify.py (github tiexinding/NPM-Weibull-public), "
                                     "arXiv:2605.18898 §A.7/A.8.3"},
            "gaussian": GAUSSIAN, "classes": self.classes(), "stand_out": stand_outs(self.matrices),
            "matrices": [m.to_dict() for m in self.matrices],
        })


def diagnose(path: PathLike, *, label: str | None = None, grouping: Grouping | None = None,
             sample: int = DEFAULT_SAMPLE, seed: int = 0) -> Diagnosis:
    """Diagnose every weight matrix under ``path`` (streamed one tensor at a time)."""
    mats, skipped = [], 0
    for name, tensor in iter_tensors(path):
        if not tensor.is_floating_point() or not (tensor.ndim >= 2 or tensor.numel() >= MIN_1D_NUMEL):
            skipped += 1
            continue
        ndim, numel, sumsq = tensor.ndim, int(tensor.numel()), _sum_of_squares(tensor)
        xs, _ = sorted_magnitudes(tensor)
        del tensor  # the statistics read only the sorted copy: the tensor as read leaves first (the reader keeps none)
        mats.append(_diagnose_sorted(name, ndim, numel, sumsq, xs, grouping, sample, seed))
        del xs
    mats.sort(key=lambda m: (-1 if m.layer is None else m.layer, m.name))
    return Diagnosis(label or str(path), tuple(mats), skipped, sample)


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def _band_note(name: str, c: dict) -> str:
    below = c["k_classes"]["mild_selection"] + c["k_classes"]["strong_selection"]
    if name == "transmission" and below:
        return (f" {below} of {c['matrices']} sit below the band [{BAND[0]}, {BAND[1]}] where the paper finds trained "
                "transmission matrices: they have specialised like selection matrices.")
    if name == "selection" and c["k_classes"]["transmission"] == c["matrices"]:
        return " All sit in the transmission band: the query/key matrices have not specialised (as in GQA models)."
    return ""


def format_diagnosis(d: Diagnosis, *, limit: int = 12) -> str:
    """Plain words: one paragraph per class, then the matrices that stand out and why."""
    g = GAUSSIAN
    lines = [f"{d.source}: {len(d.matrices)} weight matrices ({d.skipped} small 1-D tensors skipped). "
             f"Gaussian weights give k {g['k']:.4f}, lambda/sigma {g['lambda_over_sigma']:.4f}, "
             f"P99.9/P50 {g['p999_p50']:.2f}, Q90/Q10 {g['q90_q10']:.2f}, Gini {g['gini']:.3f}.", ""]
    for name, c in d.classes().items():
        spread = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in c["k_classes"].items() if v)
        fams = ", ".join(f"{f} {v}" for f, v in c["best_family"].items() if v)
        tail = c["p999_p50_median"] / g["p999_p50"]
        lines.append(
            f"{name} ({c['matrices']} matrices): median k {c['k_median']:.3f} (range {c['k_min']:.3f}-{c['k_max']:.3f}), "
            f"{_article(c['k_class'])} {c['k_class'].replace('_', ' ')} value; by matrix: {spread}. "
            f"Tails: median P99.9/P50 {c['p999_p50_median']:.2f} ({tail:.1f}x Gaussian), Gini {c['gini_median']:.3f}. "
            f"Best family by AIC: {fams or 'n/a'}."
            + (f" {c['gaussian_like']} still look like their Gaussian initialisation." if c["gaussian_like"] else "")
            + _band_note(name, c))
    outs = stand_outs(d.matrices)
    lines += ["", f"Matrices that stand out ({len(outs)}):" if outs else "No matrix stands out."]
    for o in outs[:limit]:
        lines.append(f"- {o['name']} ({o['group']}):")
        lines += [f"    {r}" for r in o["reasons"]]
    if len(outs) > limit:
        lines.append(f"... and {len(outs) - limit} more (--json lists them all)")
    return "\n".join(lines)
