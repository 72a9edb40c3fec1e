"""Trajectory geometry (docs/geometry.md): spectra of weight matrices and the AdamW "backbone".

Spectra (condensation and key-query rank collapse; "From Condensation to Rank Collapse"), from the
singular values s_1 >= s_2 >= ... of a matrix W::

    stable_rank    = ||W||_F² / ||W||_2² = Σ s_i² / s_1²
    effective_rank = exp(-Σ p_i ln p_i),  p_i = s_i / Σ s_j      (Roy & Vetterli, EUSIPCO 2007)
    top_share      = s_1² / Σ s_i² = 1 / stable_rank           (condensation: Frobenius energy in
                                                                 the top singular direction)

Key-query products, per head h: a score is q_h·k_h = x^T W_Q,h^T W_K,h x' (weights in the
``nn.Linear`` (out, in) convention), so the bilinear form of the head is M_h = W_Q,h^T W_K,h
(hidden × hidden, rank <= head_dim).  Its singular values are those of the head_dim × head_dim
matrix R_Q R_K^T where W_Q,h^T = A_Q R_Q and W_K,h^T = A_K R_K are reduced QR factorisations (A
with orthonormal columns), so nothing hidden × hidden is formed.  Fused layouts are split as the
models themselves do (:func:`split_qkv`).

Backbone (Xu, arXiv:2602.23696): on a seeded coordinate subsample x of the weights, stack the
displacements d_i = x(t_i) - x(0) as the rows of D; the backbone v is the top right singular vector
of D (from the m × m Gram matrix G = D Dᵀ), oriented so that d_T·v >= 0 for the latest snapshot
d_T.  Reported: the fraction of ||d_T||² it captures, λ_1 u_T² / G_TT (u the top eigenvector of G);
its stability, the cosine between successive estimates; and |cos| of per-step updates and
gradients with it.

Nulls.  An isotropic random walk whose step s has E||Δ_s||² = c_s has, as the sample dimension
k → ∞, the Gram matrix G_ij = C(min(t_i, t_j)) with C(t) = Σ_{s<=t} c_s ("cumvar"): the statistics
above for a random walk with the run's own step sizes and schedule follow in closed form from the
cumulative variances at the snapshot times (:func:`random_walk_null`).  A direction independent of
v has E|cos| = sqrt(2/π) sqrt(Σ s_i² v_i² / Σ s_i²) for per-coordinate weights s (sqrt(2/(π k))
for uniform weights; :func:`cos_floor`).  The finite-k correction is O(sqrt(m / k)); the tests
compare the closed form with a seeded simulation (:func:`simulate_random_walk`).
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "BackboneStats",
    "BackboneTracker",
    "Spectrum",
    "cos_floor",
    "coordinate_sample",
    "effective_rank",
    "expand_kv_heads",
    "key_query_singular_values",
    "layer_spectra",
    "matrix_role",
    "random_walk_null",
    "rank_rows",
    "simulate_random_walk",
    "spectrum",
    "split_heads",
    "split_qkv",
    "stable_rank",
    "top_direction",
    "top_share",
]

#: Fused QKV layouts :func:`split_qkv` knows, by ``config.model_type``.
FUSED_LAYOUTS = {"gpt_neox": "gpt_neox", "bloom": "gpt_neox", "gpt2": "gpt2"}


# ----------------------------------------------------------------------------- spectra
def _svals(w: torch.Tensor) -> torch.Tensor:
    if w.dtype not in (torch.float32, torch.float64):
        w = w.float()
    return torch.linalg.svdvals(w.T if w.shape[-2] < w.shape[-1] else w)  # LAPACK is faster on tall matrices


def stable_rank(s: torch.Tensor) -> torch.Tensor:
    """Σ s_i² / max s_i² over the last dimension of singular values ``s`` (NaN for a zero matrix)."""
    s2 = s.double() ** 2
    return s2.sum(-1) / s2.amax(-1)


def top_share(s: torch.Tensor) -> torch.Tensor:
    """max s_i² / Σ s_i²: the share of Frobenius energy in the top singular direction."""
    s2 = s.double() ** 2
    return s2.amax(-1) / s2.sum(-1)


def effective_rank(s: torch.Tensor) -> torch.Tensor:
    """exp(entropy of p_i = s_i / Σ s_j) over the last dimension (Roy & Vetterli 2007)."""
    s = s.double().clamp_min(0)
    p = s / s.sum(-1, keepdim=True)
    plogp = torch.where(p > 0, p * torch.log(p), torch.zeros_like(p))
    return torch.exp(-plogp.sum(-1))


@dataclass(frozen=True)
class Spectrum:
    """Rank statistics of one matrix (or of one head's key-query product)."""

    stable_rank: float
    effective_rank: float
    top_share: float
    dim: int  # min(rows, cols): the largest rank possible

    def to_row(self) -> dict[str, float]:
        return {"stable_rank": self.stable_rank, "effective_rank": self.effective_rank, "top_share": self.top_share}


def spectrum(w: torch.Tensor, singular_values: bool = False) -> Spectrum:
    """:class:`Spectrum` of a 2-D matrix ``w`` (or of its singular values when ``singular_values``)."""
    s = w if singular_values else _svals(w)
    if s.ndim != 1:
        raise ValueError(f"spectrum expects one matrix or one vector of singular values, got shape {tuple(s.shape)}")
    return Spectrum(float(stable_rank(s)), float(effective_rank(s)), float(top_share(s)), int(s.numel()))


# ----------------------------------------------------------------------------- heads
def split_qkv(weight: torch.Tensor, layout: str, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split a fused QKV weight into (W_Q, W_K, W_V), each [heads, head_dim, hidden], (out, in).

    ``q_h = W_Q[h] @ x`` (plus the bias) is the query the model computes for head h:

    * ``gpt_neox`` (GPT-NeoX ``query_key_value``, also BLOOM): ``nn.Linear`` weight [3H, H]; the
      output is viewed as (heads, 3·head_dim) and chunked q|k|v per head, so rows are interleaved
      head by head: [q_0 k_0 v_0 q_1 k_1 v_1 ...] (``GPTNeoXAttention.forward``).
    * ``gpt2`` (GPT-2 ``c_attn``): ``Conv1D`` weight [H, 3H] with y = x @ W, split into q|k|v along
      the output and each viewed as (heads, head_dim): columns [q_0 .. q_{n-1} | k_0 .. | v_0 ..].

    Works for a bias too (a [3H] vector gives three [heads, head_dim] tensors).
    """
    if layout == "gpt2":
        weight = weight.t() if weight.ndim == 2 else weight
        w = weight.reshape(3, num_heads, -1, *weight.shape[1:])
        return w[0], w[1], w[2]
    if layout == "gpt_neox":
        w = weight.reshape(num_heads, 3, -1, *weight.shape[1:])
        return w[:, 0], w[:, 1], w[:, 2]
    raise ValueError(f"unknown fused QKV layout {layout!r}; known: gpt_neox, gpt2")


def split_heads(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """A separate projection (``q_proj`` [heads·head_dim, H]) as [heads, head_dim, H]."""
    return weight.reshape(num_heads, -1, *weight.shape[1:])


def expand_kv_heads(wk: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Grouped-query attention: query head h reads key head h // (heads / kv_heads) (Llama's
    ``repeat_kv``)."""
    kv = wk.shape[0]
    if num_heads % kv:
        raise ValueError(f"{num_heads} query heads do not divide into {kv} key heads")
    return wk.repeat_interleave(num_heads // kv, dim=0)


def key_query_singular_values(wq: torch.Tensor, wk: torch.Tensor) -> torch.Tensor:
    """Singular values [heads, head_dim] of M_h = W_Q[h]^T W_K[h] (each [heads, head_dim, H]).

    Through reduced QR of W_Q[h]^T and W_K[h]^T: the nonzero spectrum of M_h is that of R_Q R_K^T.
    """
    if wq.shape != wk.shape:
        raise ValueError(f"query and key heads differ in shape: {tuple(wq.shape)} vs {tuple(wk.shape)}")
    dtype = wq.dtype if wq.dtype in (torch.float32, torch.float64) else torch.float32
    rq = torch.linalg.qr(wq.to(dtype).transpose(-1, -2), mode="r").R
    rk = torch.linalg.qr(wk.to(dtype).transpose(-1, -2), mode="r").R
    return torch.linalg.svdvals(rq @ rk.transpose(-1, -2))


_ROLE_PATTERNS = (
    ("qkv", re.compile(r"(^|\.)(query_key_value|c_attn|qkv_proj|Wqkv)\.weight$")),
    ("q", re.compile(r"(^|\.)(q_proj|query|wq)\.weight$")),
    ("k", re.compile(r"(^|\.)(k_proj|key|wk)\.weight$")),
    ("v", re.compile(r"(^|\.)(v_proj|value|wv)\.weight$")),
)
_LAYER_PREFIX = re.compile(r"^.*?(?:^|\.)(?:layers|layer|h|blocks|block|decoder_layers)\.\d+\.")


def matrix_role(name: str, group: str) -> str | None:
    """The role of a 2-D weight inside its layer: ``qkv`` (fused), ``q``, ``k``, ``v``, or, for a
    transmission matrix, its name inside the layer without ``.weight`` (``attention.dense``,
    ``mlp.dense_h_to_4h``, ``attn.c_proj``); ``None`` for anything else."""
    for role, pattern in _ROLE_PATTERNS:
        if pattern.search(name):
            return role
    if group == "transmission":
        inner = _LAYER_PREFIX.sub("", name)
        return inner[: -len(".weight")] if inner.endswith(".weight") else inner
    return None


def _mean_row(prefix: str, sv: torch.Tensor) -> dict[str, float]:
    return {f"{prefix}/{stat}": float(fn(sv).mean()) for stat, fn in
            (("stable_rank", stable_rank), ("effective_rank", effective_rank), ("top_share", top_share))}


def layer_spectra(
    mats: dict[str, torch.Tensor],
    num_heads: int | None,
    num_kv_heads: int | None = None,
    layout: str | None = None,
    per_head: bool = True,
) -> dict[str, float]:
    """Rank statistics of one layer's matrices, keyed ``<role>/<stat>`` (see :func:`matrix_role`).

    ``q``, ``k``, ``v`` are the whole projections (split out of a fused ``qkv`` when ``layout`` is
    known, else ``qkv`` is reported whole); ``kq`` is the mean over heads of the spectrum of
    M_h = W_Q,h^T W_K,h, with ``kq/head_HH/<stat>`` per head when ``per_head``.  Every other role is
    an outer matrix reported whole.  Needs ``num_heads`` for anything per head.
    """
    mats = dict(mats)
    out: dict[str, float] = {}
    heads: tuple[torch.Tensor, torch.Tensor] | None = None
    if "qkv" in mats and layout is not None and num_heads:
        wq, wk, wv = split_qkv(mats.pop("qkv"), layout, num_heads)
        for role, w in (("q", wq), ("k", wk), ("v", wv)):
            mats[role] = w.reshape(-1, w.shape[-1])
        heads = (wq, wk)
    elif "q" in mats and "k" in mats and num_heads:
        wq = split_heads(mats["q"], num_heads)
        wk = split_heads(mats["k"], num_kv_heads or num_heads)
        heads = (wq, expand_kv_heads(wk, num_heads))
    for role, w in mats.items():
        out.update({f"{role}/{k}": v for k, v in spectrum(w).to_row().items()})
    if heads is not None:
        sv = key_query_singular_values(*heads)
        out.update(_mean_row("kq", sv))
        if per_head:
            width = max(2, len(str(sv.shape[0] - 1)))
            for h in range(sv.shape[0]):
                out.update(_mean_row(f"kq/head_{h:0{width}d}", sv[h]))
    return out


def rank_rows(layer_rows: dict[int, dict[str, float]]) -> dict[str, float]:
    """``weightforces/rank/...`` keys from ``{layer: layer_spectra(...)}``: every figure under
    ``layer_NN/``, and ``all/<q|k|kq|outer>/<stat>``, means over layers (``outer``: v and the
    transmission matrices; ``kq``: the per-layer means over heads)."""
    out: dict[str, float] = {}
    width = max(2, len(str(max(layer_rows)))) if layer_rows else 2
    pooled: dict[str, list[float]] = {}
    for layer in sorted(layer_rows):
        for key, value in layer_rows[layer].items():
            out[f"weightforces/rank/layer_{layer:0{width}d}/{key}"] = value
            role, stat = key.rsplit("/", 1)
            kind = role if role in ("q", "k", "kq") else None if "/" in role or role == "qkv" else "outer"
            if kind is not None:
                pooled.setdefault(f"{kind}/{stat}", []).append(value)
    for key, values in pooled.items():
        out[f"weightforces/rank/all/{key}"] = sum(values) / len(values)
    return out


# ----------------------------------------------------------------------------- sampling
def _tensor_seed(seed: int, name: str) -> int:
    return (zlib.crc32(name.encode()) ^ (seed * 0x9E3779B1)) & 0x7FFFFFFF


def _sample_indices(numel: int, k: int, seed: int) -> torch.Tensor:
    """``k`` distinct indices of ``range(numel)``, uniformly at random, sorted (CPU int64)."""
    if k >= numel:
        return torch.arange(numel)
    gen = torch.Generator().manual_seed(seed)
    if 2 * k >= numel:
        return torch.randperm(numel, generator=gen)[:k].sort().values
    picked = torch.empty(0, dtype=torch.long)
    while picked.numel() < k:  # rejection of duplicates: memory O(k), not O(numel)
        draw = torch.randint(numel, (k + k // 8 + 16,), generator=gen)
        picked = torch.unique(torch.cat([picked, draw]))
    return picked[torch.randperm(picked.numel(), generator=gen)[:k]].sort().values


def coordinate_sample(
    names: Sequence[str], numels: Sequence[int], coords: int, seed: int = 0
) -> list[tuple[torch.Tensor, float]]:
    """A seeded uniform coordinate subsample of a group of tensors, at most ``coords`` in all.

    Tensor i gets k_i ≈ coords·n_i / Σ n (largest remainders; every coordinate when the group
    has at most ``coords``), drawn from a generator seeded by ``seed`` and the tensor's name (the
    same coordinates live and offline).  Returns ``(indices, scale)`` per tensor with
    scale = sqrt(n_i / k_i), so that Σ scale² x_j² over the sample estimates ||x||² of the group
    without bias (and equals it when every coordinate is taken).
    """
    total = sum(numels)
    if coords < 1:
        raise ValueError(f"coords must be >= 1, got {coords}")
    if total <= coords:
        ks = list(numels)
    else:
        raw = [coords * n / total for n in numels]
        ks = [int(r) for r in raw]
        for i in sorted(range(len(raw)), key=lambda i: ks[i] - raw[i])[: coords - sum(ks)]:
            ks[i] += 1
    out = []
    for name, n, k in zip(names, numels, ks):
        idx = _sample_indices(n, k, _tensor_seed(seed, name)) if k else torch.empty(0, dtype=torch.long)
        out.append((idx, math.sqrt(n / k) if k else 0.0))
    return out


# ----------------------------------------------------------------------------- backbone maths
def top_direction(gram: np.ndarray) -> tuple[float, np.ndarray]:
    """(λ_1, u) of a symmetric PSD m × m Gram matrix, u oriented so that u[-1] >= 0 (d_T·v >= 0)."""
    lam, vecs = np.linalg.eigh(gram)
    u = vecs[:, -1]
    if u[-1] < 0:
        u = -u
    return float(lam[-1]), u


def _fraction(gram: np.ndarray) -> tuple[float, float, np.ndarray]:
    """(captured fraction of the last row's ||d_T||², λ_1, u); NaN when d_T = 0."""
    lam, u = top_direction(gram)
    last = gram[-1, -1]
    frac = lam * u[-1] ** 2 / last if last > 0 else math.nan
    return float(frac), lam, u


def random_walk_gram(cumvar: np.ndarray, cumvar_prev: np.ndarray | None = None) -> np.ndarray:
    """E[d(t_i)·d(t'_j)] = C(min(t_i, t'_j)) = min(C_i, C'_j) for an isotropic random walk."""
    cumvar = np.asarray(cumvar, dtype=np.float64)
    other = cumvar if cumvar_prev is None else np.asarray(cumvar_prev, dtype=np.float64)
    return np.minimum(cumvar[:, None], other[None, :])


@dataclass(frozen=True)
class RandomWalkNull:
    fraction: float
    stability: float  # NaN without a previous estimate


def random_walk_null(cumvar: Sequence[float], cumvar_prev: Sequence[float] | None = None) -> RandomWalkNull:
    """Captured fraction and stability of an isotropic random walk (k → ∞), closed form.

    ``cumvar``: C(t_i) = Σ_{s<=t_i} E||Δ_s||² at the snapshot times of the estimate (increasing);
    ``cumvar_prev``: the same for the previous estimate's snapshots (same time axis).  Only the
    shape of the schedule matters (both are invariant to a common scale).
    """
    c = np.asarray(cumvar, dtype=np.float64)
    if c.size == 0 or c[-1] <= 0:
        return RandomWalkNull(math.nan, math.nan)
    frac, lam, u = _fraction(random_walk_gram(c))
    stab = math.nan
    if cumvar_prev is not None and len(cumvar_prev) and cumvar_prev[-1] > 0:
        cp = np.asarray(cumvar_prev, dtype=np.float64)
        lam_p, u_p = top_direction(random_walk_gram(cp))
        stab = float(u @ random_walk_gram(c, cp) @ u_p / math.sqrt(lam * lam_p))
    return RandomWalkNull(frac, stab)


def simulate_random_walk(
    step_var: Sequence[float], times: Sequence[int], dim: int, seed: int = 0
) -> np.ndarray:
    """Displacements [len(times), dim] of an isotropic Gaussian random walk whose step s (1-based)
    has E||Δ_s||² = step_var[s-1]: the finite-dimensional reference for :func:`random_walk_null`."""
    rng = np.random.default_rng(seed)
    var = np.asarray(step_var, dtype=np.float64)
    cum = np.concatenate([[0.0], np.cumsum(var)])
    out, pos, t_prev = np.zeros((len(times), dim)), np.zeros(dim), 0
    for i, t in enumerate(times):  # the sum of Gaussian steps between snapshots is one Gaussian
        pos = pos + rng.standard_normal(dim) * math.sqrt((cum[t] - cum[t_prev]) / dim)
        out[i], t_prev = pos, t
    return out


def cos_floor(dim: int) -> float:
    """E|cos| between a fixed direction and an isotropic random one in ``dim`` dimensions:
    Γ(n/2) / (sqrt(π) Γ((n+1)/2)) ≈ sqrt(2 / (π n))."""
    if dim < 1:
        return math.nan
    return math.exp(math.lgamma(dim / 2) - math.lgamma((dim + 1) / 2)) / math.sqrt(math.pi)


# ----------------------------------------------------------------------------- the tracker
@dataclass(frozen=True)
class BackboneStats:
    """One aggregate at one estimate.  ``*_null``: the same statistic for an isotropic random walk
    with the run's own step sizes at the same snapshot times (closed form)."""

    fraction: float  # share of ||d_T||² along the backbone
    fraction_null: float
    stability: float  # cosine with the previous estimate (NaN at the first)
    stability_null: float
    msd_ratio: float  # ||d_T||² / Σ_s ||Δ_s||²: 1 for a random walk, up to T for a straight line
    cos_floor: float  # E|cos| of an independent isotropic direction with this backbone
    snapshots: int

    @property
    def fraction_score(self) -> float:
        """(fraction - null) / (1 - null): 0 for a random walk, 1 for a straight line."""
        if not self.fraction_null < 1:
            return math.nan
        return (self.fraction - self.fraction_null) / (1 - self.fraction_null)

    def to_row(self) -> dict[str, float]:
        return {
            "fraction": self.fraction, "fraction_null": self.fraction_null, "fraction_score": self.fraction_score,
            "stability": self.stability, "stability_null": self.stability_null, "msd_ratio": self.msd_ratio,
            "cos_floor": self.cos_floor, "snapshots": float(self.snapshots),
        }


def _gram(d: torch.Tensor, chunk: int = 1 << 15) -> torch.Tensor:
    """D Dᵀ in float64 from a float32 [m, k] block, ``chunk`` columns at a time (bounded memory)."""
    out = torch.zeros(d.shape[0], d.shape[0], dtype=torch.float64, device=d.device)
    for a in range(0, d.shape[1], chunk):
        part = d[:, a : a + chunk].double()
        out += part @ part.T
    return out


class BackboneTracker:
    """Bounded stack of displacement snapshots on concatenated blocks of sampled coordinates.

    Blocks (e.g. weight classes) are contiguous segments of one vector of K coordinates; a
    ``total`` aggregate spans them all.  ``add`` stores a displacement (K floats, on any device)
    with the cumulative step variance per block; when ``capacity`` snapshots are held, every
    other one is dropped (the newest kept), so the stack always spans the whole trajectory and
    the caller doubles its snapshot interval (``add`` returns True then).  ``estimate`` updates
    the backbone of every aggregate and returns their :class:`BackboneStats` (one host transfer of
    the m × m Gram matrices).  Memory: 4·K·(capacity + 2·(blocks + 1)) bytes in float32.
    """

    def __init__(self, blocks: Sequence[tuple[str, int]], scale: torch.Tensor, capacity: int = 32,
                 total: str = "total") -> None:
        if capacity < 4 or capacity % 2:
            raise ValueError(f"capacity must be an even number >= 4, got {capacity}")
        self.names = [name for name, _ in blocks] + [total]
        self.bounds = np.cumsum([0] + [size for _, size in blocks]).tolist()
        self.K = self.bounds[-1]
        self.scale = scale  # [K] per-coordinate weights (only the floor needs them)
        self.device = scale.device
        self.capacity = capacity
        self.stack = torch.zeros(capacity, self.K, dtype=torch.float32, device=self.device)
        self.cumvar = torch.zeros(capacity, len(blocks), dtype=torch.float64, device=self.device)
        self.times: list[int] = []
        self.directions: torch.Tensor | None = None  # [blocks + 1, K], zero outside each block
        self._prev_cumvar: list[np.ndarray] | None = None

    def segments(self):
        return [slice(a, b) for a, b in zip(self.bounds, self.bounds[1:])] + [slice(0, self.K)]

    def add(self, step: int, displacement: torch.Tensor, cumvar: torch.Tensor) -> bool:
        """Store d(step) (K,) and C(step) per block; True when the stack was thinned to make room."""
        thinned = False
        m = len(self.times)
        if m == self.capacity:
            keep = list(range(m - 1, -1, -2))[::-1]  # every other one, counting back from the newest
            idx = torch.tensor(keep, device=self.device)
            self.stack[: len(keep)] = self.stack[idx]
            self.cumvar[: len(keep)] = self.cumvar[idx]
            self.times = [self.times[i] for i in keep]
            m, thinned = len(keep), True
        self.stack[m] = displacement
        self.cumvar[m] = cumvar
        self.times.append(int(step))
        return thinned

    def estimate(self, reduce=None) -> dict[str, BackboneStats]:
        """Update the backbone of every aggregate; its :class:`BackboneStats` (one host transfer).

        ``reduce`` (optional) sums the flat float64 tensor of :meth:`estimate_sums` over the
        processes that hold the other coordinates and returns it on the host (a sharded run)."""
        if not self.times:
            return {}
        local = self.estimate_sums()
        return self.estimate_finish(reduce(local) if reduce is not None else local.cpu())

    def estimate_sums(self) -> torch.Tensor:
        """Everything an estimate needs from the coordinates, as sums over them (additive over
        disjoint sets of coordinates): per block the Gram matrix G = D Dᵀ and the weighted Gram
        D S² Dᵀ (S the coordinate weights: for the floor), per aggregate D·v_old (v_old the
        previous backbone: for the stability), per block Σ S², then the cumulative variances."""
        m, segs = len(self.times), self.segments()
        d = self.stack[:m]
        s2 = self.scale.double() ** 2
        grams = torch.stack([_gram(d[:, s]) for s in segs[:-1]])
        weighted = torch.stack([_gram(d[:, s] * self.scale[s].float()) for s in segs[:-1]])
        if self.directions is None:
            d_old = torch.zeros(len(segs), m, dtype=torch.float64, device=self.device)
        else:
            d_old = torch.stack([d[:, s].double() @ self.directions[b, s].double() for b, s in enumerate(segs)])
        den = torch.stack([s2[s].sum() for s in segs[:-1]])
        return torch.cat([grams.reshape(-1), weighted.reshape(-1), d_old.reshape(-1), den,
                          self.cumvar[:m].reshape(-1)])

    def estimate_size(self) -> int:
        """Length of :meth:`estimate_sums` with the snapshots held now."""
        m, nb = len(self.times), len(self.names) - 1
        return 2 * nb * m * m + (nb + 1) * m + nb + m * nb

    def estimate_finish(self, sums) -> dict[str, BackboneStats]:
        """The estimate from (reduced) :meth:`estimate_sums` on the host; sets :attr:`directions`."""
        m, segs = len(self.times), self.segments()
        nb = len(segs) - 1
        host = np.asarray(sums, dtype=np.float64)
        parts = np.split(host, np.cumsum([nb * m * m, nb * m * m, (nb + 1) * m, nb]))
        grams_h, weighted_h = parts[0].reshape(nb, m, m), parts[1].reshape(nb, m, m)
        d_old, den, cumvar_h = parts[2].reshape(nb + 1, m), parts[3], parts[4].reshape(m, nb)
        grams_h = np.concatenate([grams_h, grams_h.sum(0, keepdims=True)])  # blocks are disjoint
        weighted_h = np.concatenate([weighted_h, weighted_h.sum(0, keepdims=True)])
        den = np.append(den, den.sum())
        cumvar_h = np.concatenate([cumvar_h, cumvar_h.sum(1, keepdims=True)], axis=1)
        coeff = np.zeros((nb + 1, m))
        out = {}
        for b, name in enumerate(self.names):
            frac, lam, u = _fraction(grams_h[b])
            if lam > 0:
                coeff[b] = u / math.sqrt(lam)  # v = Dᵀ u / sqrt(λ_1), a unit vector
            prev = None if self._prev_cumvar is None else self._prev_cumvar[b]
            null = random_walk_null(cumvar_h[:, b], prev)
            last = grams_h[b][-1, -1]
            msd = last / cumvar_h[-1, b] if cumvar_h[-1, b] > 0 else math.nan
            stab = float(coeff[b] @ d_old[b]) if self.directions is not None else math.nan
            num = float(coeff[b] @ weighted_h[b] @ coeff[b])  # Σ S² v²
            floor = math.sqrt(2 / math.pi * num / den[b]) if den[b] > 0 and num > 0 else math.nan
            out[name] = BackboneStats(frac, null.fraction, stab, null.stability, float(msd), floor, m)
        d = self.stack[:m]
        coeff_t = torch.from_numpy(coeff).to(self.device, torch.float32)
        new = torch.zeros(len(segs), self.K, dtype=torch.float32, device=self.device)
        for b, s in enumerate(segs):
            new[b, s] = coeff_t[b] @ d[:, s]
        self.directions = new
        self._prev_cumvar = [cumvar_h[:, b].copy() for b in range(nb + 1)]
        return out
