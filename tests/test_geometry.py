"""Trajectory geometry (docs/geometry.md): spectra, head splits, the backbone and its nulls."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hf_weightforces.core.geometry import (
    BackboneTracker,
    coordinate_sample,
    cos_floor,
    effective_rank,
    expand_kv_heads,
    key_query_singular_values,
    random_walk_null,
    simulate_random_walk,
    spectrum,
    split_qkv,
    stable_rank,
    top_share,
)


# ----------------------------------------------------------------------------- spectra
def _orthogonal(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64)).Q


def _with_spectrum(s: list[float], rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """U diag(s) Vᵀ with random orthogonal U, V: a matrix whose singular values are exactly ``s``."""
    d = torch.zeros(rows, cols, dtype=torch.float64)
    d[range(len(s)), range(len(s))] = torch.tensor(s, dtype=torch.float64)
    return _orthogonal(rows, seed) @ d @ _orthogonal(cols, seed + 1).T


def _reference(s: list[float]) -> tuple[float, float, float]:
    """Stable rank, effective rank (Roy & Vetterli) and top share, written out by hand."""
    s = [x for x in s if x > 0]
    total2 = sum(x * x for x in s)
    p = [x / sum(s) for x in s]
    return total2 / max(s) ** 2, math.exp(-sum(q * math.log(q) for q in p)), max(s) ** 2 / total2


SPECTRA = [
    ("rank one", [3.0], 6, 5, (1.0, 1.0, 1.0)),
    ("identity 5", [1.0] * 5, 5, 5, (5.0, 5.0, 0.2)),
    ("two equal", [2.0, 2.0], 4, 7, (2.0, 2.0, 0.5)),
    ("geometric", [1.0, 0.5, 0.25, 0.125], 6, 4, None),
    ("power law", [1 / (i + 1) for i in range(12)], 12, 20, None),
    ("one dominant", [10.0, 1.0, 1.0, 1.0], 8, 8, (1.03, None, 100 / 103)),
]


@pytest.mark.parametrize("label,s,rows,cols,known", SPECTRA, ids=[t[0] for t in SPECTRA])
def test_spectrum_of_constructed_matrices(label, s, rows, cols, known):
    w = _with_spectrum(s, rows, cols)
    got = spectrum(w)
    ref = _reference(s)
    assert got.stable_rank == pytest.approx(ref[0], rel=1e-10)
    assert got.effective_rank == pytest.approx(ref[1], rel=1e-10)
    assert got.top_share == pytest.approx(ref[2], rel=1e-10)
    assert got.top_share * got.stable_rank == pytest.approx(1.0)
    for value, expected in zip((got.stable_rank, got.effective_rank, got.top_share), known or ()):
        if expected is not None:
            assert value == pytest.approx(expected, rel=1e-10)
    assert got.dim == min(rows, cols)


def test_spectrum_ranks_are_bounded_by_the_rank():
    w = _with_spectrum([5.0, 1.0, 0.1], 9, 9)  # rank 3 in 9 x 9
    got = spectrum(w)
    assert 1 <= got.stable_rank <= got.effective_rank <= 3 + 1e-9  # s_i/s_1 <= 1 puts srank below erank


def test_batched_statistics_match_one_at_a_time():
    s = torch.rand(4, 6, dtype=torch.float64) + 0.01
    for fn in (stable_rank, effective_rank, top_share):
        assert torch.allclose(fn(s), torch.stack([fn(row) for row in s]))


# ----------------------------------------------------------------------------- heads
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (6, 1)])
def test_key_query_singular_values_match_the_dense_product(heads, kv_heads):
    g = torch.Generator().manual_seed(heads * 10 + kv_heads)
    d, hidden = 8, 24
    wq = torch.randn(heads, d, hidden, generator=g, dtype=torch.float64)
    wk = expand_kv_heads(torch.randn(kv_heads, d, hidden, generator=g, dtype=torch.float64), heads)
    got = key_query_singular_values(wq, wk)
    for h in range(heads):
        dense = torch.linalg.svdvals(wq[h].T @ wk[h])  # hidden x hidden, rank <= d
        assert torch.allclose(got[h], dense[:d], rtol=1e-10, atol=1e-10)
        assert dense[d:].abs().max() < 1e-10
    if kv_heads < heads:  # query heads of one group share their key head (Llama's repeat_kv)
        assert torch.equal(wk[0], wk[heads // kv_heads - 1])


def _input_hook(seen: dict):
    """A forward pre-hook that records the hidden states entering a module (once)."""

    def hook(module, args, kwargs):
        seen.setdefault("x", (args[0] if args else kwargs["hidden_states"]).detach())

    return hook


def _capture_neox(model, ids, monkeypatch):
    """Hidden states entering layer 0's attention and its pre-rotary query/key states."""
    from transformers.models.gpt_neox import modeling_gpt_neox

    seen = {}
    real = modeling_gpt_neox.apply_rotary_pos_emb

    def spy(q, k, cos, sin, *args, **kwargs):
        seen.setdefault("q", q.detach().clone())
        seen.setdefault("k", k.detach().clone())
        return real(q, k, cos, sin, *args, **kwargs)

    monkeypatch.setattr(modeling_gpt_neox, "apply_rotary_pos_emb", spy)
    attn = model.gpt_neox.layers[0].attention
    handle = attn.register_forward_pre_hook(_input_hook(seen), with_kwargs=True)
    with torch.no_grad():
        model(ids)
    handle.remove()
    return seen, attn


@pytest.mark.parametrize("should_match", [True, False], ids=["interleaved", "misread-as-concatenated"])
def test_neox_fused_qkv_split_matches_the_modules_own_queries_and_scores(should_match, monkeypatch):
    from conftest import tiny_model

    model = tiny_model(3).eval()
    heads = model.config.num_attention_heads
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    seen, attn = _capture_neox(model, ids, monkeypatch)
    x = seen["x"].double()
    w, b = attn.query_key_value.weight.detach().double(), attn.query_key_value.bias.detach().double()
    if should_match:
        wq, wk, _ = split_qkv(w, "gpt_neox", heads)
        bq, bk, _ = split_qkv(b, "gpt_neox", heads)
    else:  # the classic mistake: rows read as q|k|v blocks (GPT-2's order) instead of per head
        wq, wk, _ = split_qkv(w.t(), "gpt2", heads)
        bq, bk, _ = split_qkv(b, "gpt2", heads)
    q = torch.einsum("bsi,hdi->bhsd", x, wq) + bq[None, :, None]
    k = torch.einsum("bsi,hdi->bhsd", x, wk) + bk[None, :, None]
    match = torch.allclose(q, seen["q"].double(), atol=1e-5) and torch.allclose(k, seen["k"].double(), atol=1e-5)
    assert match == should_match  # the wrong layout must fail, or this test proves nothing
    if not should_match:
        return
    # scores q·k through the bilinear form M_h = W_Q,h^T W_K,h (plus the bias terms)
    scores_module = seen["q"].double() @ seen["k"].double().transpose(-1, -2)
    m = wq.transpose(-1, -2) @ wk  # [heads, hidden, hidden]
    scores = (torch.einsum("bsi,hij,btj->bhst", x, m, x)
              + torch.einsum("hd,bhtd->bht", bq, k - bk[None, :, None])[:, :, None, :]
              + torch.einsum("bhsd,hd->bhs", q - bq[None, :, None], bk)[:, :, :, None]
              + (bq * bk).sum(-1)[None, :, None, None])
    assert torch.allclose(scores, scores_module, rtol=1e-5, atol=1e-5)
    sv = key_query_singular_values(wq, wk)
    assert torch.allclose(sv, torch.linalg.svdvals(m)[:, : sv.shape[1]], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("should_match", [True, False], ids=["concatenated", "misread-as-interleaved"])
def test_gpt2_conv1d_qkv_split_reproduces_the_attention_probabilities(should_match):
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(1)
    cfg = GPT2Config(n_embd=32, n_head=4, n_layer=1, vocab_size=64, n_positions=16, attn_implementation="eager",
                     bos_token_id=None, eos_token_id=None)
    model = GPT2Model(cfg).eval()
    with torch.no_grad():
        model.h[0].attn.c_attn.bias.normal_(0, 0.5)  # GPT-2 starts with zero biases: make them count
    seen = {}
    attn = model.h[0].attn
    handle = attn.register_forward_pre_hook(_input_hook(seen), with_kwargs=True)
    with torch.no_grad():
        probs = model(torch.randint(0, 64, (2, 7)), output_attentions=True).attentions[0].double()
    handle.remove()
    x = seen["x"].double()
    w, b = attn.c_attn.weight.detach().double(), attn.c_attn.bias.detach().double()
    if should_match:
        wq, wk, _ = split_qkv(w, "gpt2", cfg.n_head)
        bq, bk, _ = split_qkv(b, "gpt2", cfg.n_head)
    else:  # the Conv1D weight transposed but read per head (GPT-NeoX's order)
        wq, wk, _ = split_qkv(w.t(), "gpt_neox", cfg.n_head)
        bq, bk, _ = split_qkv(b, "gpt_neox", cfg.n_head)
    q = torch.einsum("bsi,hdi->bhsd", x, wq) + bq[None, :, None]
    k = torch.einsum("bsi,hdi->bhsd", x, wk) + bk[None, :, None]
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    causal = torch.ones(7, 7, dtype=torch.bool).tril()
    mine = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    assert torch.allclose(mine, probs, atol=1e-5) == should_match


# ----------------------------------------------------------------------------- sampling
def test_coordinate_sample_is_seeded_uniform_and_unbiased():
    names, numels = ["a", "b", "c"], [10_000, 30_000, 500]
    sample = coordinate_sample(names, numels, 4_000, seed=7)
    again = coordinate_sample(names, numels, 4_000, seed=7)
    other = coordinate_sample(names, numels, 4_000, seed=8)
    assert sum(idx.numel() for idx, _ in sample) == 4_000
    for (idx, scale), (idx2, _), (idx3, _), n in zip(sample, again, other, numels):
        assert torch.equal(idx, idx2) and not torch.equal(idx, idx3)
        assert idx.unique().numel() == idx.numel() and 0 <= idx.min() and idx.max() < n
        assert torch.all(idx[1:] > idx[:-1])
        assert scale == pytest.approx(math.sqrt(n / idx.numel()))
    assert [idx.numel() for idx, _ in sample] == [988, 2963, 49]  # 4000·n/40500, largest remainders
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(n, generator=g, dtype=torch.float64) * (i + 1) for i, n in enumerate(numels)]
    estimate = sum(float((x[idx] ** 2).sum()) * scale**2 for x, (idx, scale) in zip(xs, sample))
    exact = sum(float((x**2).sum()) for x in xs)
    assert estimate == pytest.approx(exact, rel=0.05)
    whole = coordinate_sample(names, numels, 10**6)  # a group smaller than the budget: every coordinate
    assert all(torch.equal(idx, torch.arange(n)) and s == 1.0 for (idx, s), n in zip(whole, numels))


# ----------------------------------------------------------------------------- backbone and nulls
def _lr_schedule(steps: int, warmup: int = 20) -> np.ndarray:
    t = np.arange(1, steps + 1)
    return np.where(t <= warmup, t / warmup, np.cos(0.5 * math.pi * (t - warmup) / (steps - warmup)) + 1e-3)


def _track(steps_matrix: np.ndarray, times: list[int], capacity: int = 32) -> tuple[BackboneTracker, dict]:
    """Feed a trajectory given by its per-step moves [T, k] to a tracker (one block)."""
    k = steps_matrix.shape[1]
    tracker = BackboneTracker([("w", k)], torch.ones(k), capacity=capacity)
    pos, cum = np.zeros(k), 0.0
    stats = {}
    for t in range(1, steps_matrix.shape[0] + 1):
        pos = pos + steps_matrix[t - 1]
        cum += float(steps_matrix[t - 1] @ steps_matrix[t - 1])
        if t in times:
            tracker.add(t, torch.tensor(pos, dtype=torch.float32), torch.tensor([cum], dtype=torch.float64))
            stats = tracker.estimate()
    return tracker, stats


def test_planted_drift_is_recovered_and_beats_its_null():
    rng = np.random.default_rng(0)
    T, k = 200, 2000
    lr = _lr_schedule(T)
    e = rng.standard_normal(k)
    e /= np.linalg.norm(e)
    # each step: a drift of 0.3·lr along e plus isotropic noise of norm ~lr (the drift is 8% of a
    # step's energy, but it adds up coherently while the noise does not)
    moves = lr[:, None] * (0.3 * e[None, :] + rng.standard_normal((T, k)) / math.sqrt(k))
    times = list(range(10, T + 1, 10))
    tracker, stats = _track(moves, times)
    total = stats["total"]
    assert total.snapshots == len(times)
    direction = tracker.directions[-1].double().numpy()
    assert abs(direction @ e) > 0.9  # the planted direction
    assert total.fraction > 0.95
    assert total.fraction_score > 0.5  # well above the random walk with the same schedule
    assert total.msd_ratio > 3
    assert 1 - total.stability < 0.5 * (1 - total.stability_null)  # turns less than a random walk


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pure_random_walk_is_not_a_backbone_once_the_null_is_applied(seed):
    rng = np.random.default_rng(seed)
    T, k = 200, 2000
    lr = _lr_schedule(T)
    moves = lr[:, None] * rng.standard_normal((T, k)) / math.sqrt(k)
    times = list(range(10, T + 1, 10))
    _, stats = _track(moves, times)
    total = stats["total"]
    assert total.fraction > 0.85  # the raw fraction alone would "find" a backbone ...
    assert abs(total.fraction - total.fraction_null) < 0.03  # ... its null says it is a random walk
    assert abs(total.fraction_score) < 0.25
    assert total.msd_ratio == pytest.approx(1.0, abs=0.15)
    assert 0.5 < (1 - total.stability) / (1 - total.stability_null) < 2


def test_closed_form_null_matches_a_seeded_simulation():
    T = 300
    lr2 = _lr_schedule(T) ** 2
    times = list(range(15, T + 1, 15))
    prev_times = times[:-4]
    cum = np.cumsum(lr2)
    null = random_walk_null(cum[np.array(times) - 1], cum[np.array(prev_times) - 1])
    fracs, stabs = [], []
    for seed in range(6):
        d = simulate_random_walk(lr2, times, dim=4096, seed=seed)
        tracker = BackboneTracker([("w", 4096)], torch.ones(4096), capacity=32)
        for i, t in enumerate(times):
            tracker.add(t, torch.tensor(d[i], dtype=torch.float32), torch.tensor([cum[t - 1]]))
            if t == prev_times[-1] or t == times[-1]:
                stats = tracker.estimate()["w"]
        fracs.append(stats.fraction)
        stabs.append(stats.stability)
        assert stats.fraction_null == pytest.approx(null.fraction, rel=1e-12)
        assert stats.stability_null == pytest.approx(null.stability, rel=1e-12)
    assert np.mean(fracs) == pytest.approx(null.fraction, abs=0.01)
    assert np.mean(stabs) == pytest.approx(null.stability, abs=0.01)
    flat = random_walk_null(np.arange(1, 17, dtype=float))
    assert 0.8 < flat.fraction < 0.86  # docs/geometry.md prototype: 0.82 with a flat schedule


@pytest.mark.parametrize("n", [2, 10, 1000, 65536])
def test_cos_floor(n):
    assert cos_floor(n) == pytest.approx(math.sqrt(2 / (math.pi * n)), rel=0.3 if n == 2 else 0.03)
    if n <= 1000:
        rng = np.random.default_rng(n)
        x = rng.standard_normal((20000, n))
        mc = np.mean(np.abs(x[:, 0]) / np.linalg.norm(x, axis=1))
        assert cos_floor(n) == pytest.approx(mc, rel=0.02)


def test_tracker_thins_the_stack_and_keeps_the_newest():
    tracker = BackboneTracker([("w", 3)], torch.ones(3), capacity=4)
    thinned = [tracker.add(t, torch.full((3,), float(t)), torch.tensor([float(t)])) for t in (1, 2, 3, 4, 5)]
    assert thinned == [False, False, False, False, True]
    assert tracker.times == [2, 4, 5]
    assert tracker.stack[:3, 0].tolist() == [2.0, 4.0, 5.0]
    assert tracker.cumvar[:3, 0].tolist() == [2.0, 4.0, 5.0]


def test_total_backbone_spans_blocks():
    """Two blocks moving along their own fixed directions: each block's backbone is its direction,
    and the total one captures both (additive Gram matrices)."""
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal(50), rng.standard_normal(30)
    a, b = a / np.linalg.norm(a), b / np.linalg.norm(b)
    tracker = BackboneTracker([("a", 50), ("b", 30)], torch.ones(80), capacity=8)
    for t in range(1, 7):
        x = np.concatenate([t * a, 2 * t * b]) + 0.01 * rng.standard_normal(80)
        tracker.add(t, torch.tensor(x, dtype=torch.float32), torch.tensor([1.0 * t, 1.0 * t], dtype=torch.float64))
    stats = tracker.estimate()
    v = tracker.directions.double().numpy()
    assert abs(v[0, :50] @ a) > 0.999 and np.abs(v[0, 50:]).max() == 0
    assert abs(v[1, 50:] @ b) > 0.999
    expected = np.concatenate([a, 2 * b]) / math.sqrt(5)
    assert abs(v[2] @ expected) > 0.999
    assert stats["total"].fraction > 0.999 and set(stats) == {"a", "b", "total"}
