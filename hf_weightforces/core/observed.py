"""The force budget of the observed update, for optimizers whose moments cannot be read (docs/optimizers.md).

For any optimizer that multiplies the weights by a decay factor c (1 where it has no decoupled
decay, or couples it into the gradient) and then subtracts an update, define the update from
what really happened to the stored tensor:

    η u := c w_t - w_{t+1}

Then, exactly (docs/budget.md with d = 1 - c, the decay really applied):

    Δ = ||w_{t+1}||² - ||w_t||² = A + I + D + R
    A = -2 <w_t, η u>          I = ||η u||²
    D = -2 d ||w_t||²          R = d² ||w_t||² + 2 d <w_t, η u> = d² ||w_t||² - d A

Δ and D need only the squared norms before and after the step (observed, float64); A and I need
the cross term <w_t, w_{t+1}>, i.e. the weights before the step.  Two ways to get it:

* **exact**: keep a copy of w_t (one copy of the trained parameters in their dtype) and take
  every product in float64 (:func:`observed_dots`, :func:`budget_from_observed`).  The budget
  closes by construction: the closure checks nothing here.
* **sampled** (a sketch): keep of w_t only ``R`` signed bucket sums per tensor, R the smallest
  prime ≥ the sample size n.  Each coordinate j gets a random sign σ_j (seeded, redrawn at every
  budget step, so steps are independent) and the bucket j mod R; S_b = Σ_{j in b} σ_j w_j is kept
  before the step and taken again from w_{t+1} after it, so B_b = c S_b - S'_b = Σ_{j in b} σ_j e_j
  with e = c w_t - w_{t+1}.  Then Î = Σ_b B_b² is unbiased for I = ||e||² (the cross terms have
  mean 0), with Var(Î) = 2 Σ_b (I_b² - Σ_{j in b} e_j⁴) ≤ 2 I²/R whatever the distribution of e,
  and A comes from the exact identity c A + I = Δ - (c² - 1)||w_t||² =: T:  Â = (T - Î)/c, so
  se(Â) = se(Î)/c and the budget still closes.  The variance is estimated by (2/3) Σ_b B_b⁴,
  never low on average: E B_b⁴ = 3 I_b² - 2 Σ e_j⁴, so (2/3) E B_b⁴ = Var(B_b²) + (2/3) Σ e_j⁴
  (equal for a Gaussian bucket sum, conservative where one coordinate dominates).  Every coordinate enters some bucket, so an update concentrated
  on a few coordinates (embedding rows of the batch's tokens, a bias that moves by ±lr) is
  measured, not missed: a uniform coordinate sample, used before, left the reference up to 19
  standard errors away there (SGD with momentum, LOMO, Adagrad's first step at n = 64) and its
  sample variance read 0 where every sampled coordinate moved by the same ±lr (docs/optimizers.md).
  A prime R keeps a column of a matrix (stride a power of two) spread over many buckets.  Cost: one
  pass over w_t before the step and one over w_{t+1} after it (that one also gives ||w_{t+1}||²),
  with R float64 numbers kept per tensor.  The variances are reported as ``align_se``/``inject_se``
  (standard errors of the logged means).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .kernels import _chunk, _Scratch

__all__ = ["budget_from_observed", "observed_dots", "signed_bucket_sums", "sketch_buckets", "sketched_budget"]


def observed_dots(befores: Sequence[torch.Tensor], afters: Sequence[torch.Tensor], factors: Sequence[float]) -> torch.Tensor:
    """Per tensor (||w_t||², <w_t, e>, ||e||², ||w_{t+1}||²), e = c w_t - w_{t+1}, float64 [P, 4].

    Every product and sum in float64 (squares of float32/bfloat16 values are exact there), in
    bounded chunks, on the tensors' device, without a host synchronisation.
    """
    if not befores:
        return torch.zeros(0, 4, dtype=torch.float64)
    dev = befores[0].device
    step = _chunk(dev)
    scratch = _Scratch(3, min(max(1, max(w.numel() for w in befores)), step), dev)
    rows = []
    for w0, w1, c in zip(befores, afters, factors):
        a, b = w0.detach().reshape(-1), w1.detach().reshape(-1)
        acc = torch.zeros(4, dtype=torch.float64, device=dev)
        for i in range(0, a.numel(), step):
            x = scratch.load(0, a[i : i + step])
            y = scratch.load(1, b[i : i + step])
            e = scratch.bufs[2][: x.numel()]
            torch.mul(x, float(c), out=e).sub_(y)
            acc += torch.stack((torch.dot(x, x), torch.dot(x, e), torch.dot(e, e), torch.dot(y, y)))
        rows.append(acc)
    return torch.stack(rows)


def budget_from_observed(
    dots: torch.Tensor, lr: torch.Tensor, weight_decay: torch.Tensor, factor: torch.Tensor, norm2_before: torch.Tensor
) -> torch.Tensor:
    """Per tensor [P, 8] in the columns of :data:`~.budget.BUDGET_TERMS` from :func:`observed_dots`.

    Δ uses ``norm2_before`` (the norm observed before the step); ``decay_nominal`` is
    -2 η λ ||w_t||² with the group's lr and weight decay; ``align_post`` = -2<w_{t+1}, η u> = c A + 2 I.
    """
    ww, we, ee, w2 = dots.unbind(1)
    d = 1.0 - factor
    align = -2.0 * we
    inject = ee
    decay = -2.0 * d * ww
    rest = d * d * ww + 2.0 * d * we
    return torch.stack((align, inject, decay, rest, w2 - norm2_before, torch.zeros_like(ww),
                        -2.0 * lr * weight_decay * ww, factor * align + 2.0 * inject), dim=1)


def sketch_buckets(sample_size: int) -> int:
    """R for a sample size n: the smallest prime ≥ max(n, 2) (module docstring)."""
    r = max(2, int(sample_size))
    while any(r % k == 0 for k in range(2, int(r**0.5) + 1)):
        r += 1
    return r


def signed_bucket_sums(flat: torch.Tensor, buckets: int, seed: int, with_norm: bool = False) -> torch.Tensor:
    """S_b = Σ_{j ≡ b mod R} σ_j x_j of a flat tensor, float64 [R] (followed by ||x||² when
    ``with_norm``), σ_j = ±1 from a generator on the tensor's device seeded with ``seed``: the
    same seed gives the same signs, so the sums before and after a step pair up.  In bounded
    chunks whose starts are multiples of R, every product and sum in float64."""
    dev = flat.device
    n = flat.numel()
    span = buckets * max(1, _chunk(dev) // buckets)
    scratch = _Scratch(1, min(max(n, 1), span) + buckets, dev)
    gen = torch.Generator(device=dev).manual_seed(int(seed))
    sums = torch.zeros(buckets, dtype=torch.float64, device=dev)
    norm = torch.zeros(1, dtype=torch.float64, device=dev)
    for i in range(0, n, span):
        x = scratch.load(0, flat[i : i + span])
        if with_norm:
            norm += torch.dot(x, x)
        signs = torch.randint(0, 2, (x.numel(),), generator=gen, device=dev, dtype=torch.int8).bool()
        x = torch.where(signs, x, -x)
        pad = -x.numel() % buckets
        if pad:
            x = torch.cat((x, x.new_zeros(pad)))
        sums += x.view(-1, buckets).sum(0)
    return torch.cat((sums, norm)) if with_norm else sums


#: One-sided normal quantile of the skew correction: a 0.25% tail on the low side of Î.
_TAIL_Z = 2.807033768343811


def skew_inflation(dof: torch.Tensor) -> torch.Tensor:
    """κ ≥ 1 by which the plug-in standard error of Î = Σ_b B_b² is widened for its skew.

    Î is a sum of squares: about I·χ²_k/k with k = (Σ I_b)²/Σ I_b² (Satterthwaite; estimated as
    3 Î²/Σ B_b⁴), and its plug-in variance 2 Î²/k shrinks with Î, so a low draw reads as many
    standard errors too low.  With Wilson-Hilferty, (χ²_k/k)^(1/3) ≈ N(1 - h, h), h = 2/(9k), the
    draw X = Î/I stays above q³, q = 1 - h - z sqrt(h), except with probability Φ(-z) = 0.25%;
    |Î - I| ≤ 3 κ sqrt(2/k) Î then holds there when κ = (1/q³ - 1) / (3 sqrt(2/k)).  κ → 0.94 for
    large k (so 1 is kept) and grows as k falls: 1.02 at k = 1031 (the buckets of n = 1024 evenly
    filled), 1.38 at k = 67 (n = 64), 3.5 at k = 10.
    """
    k = torch.nan_to_num(dof, nan=math.inf).clamp(min=1.0)
    h = 2.0 / (9.0 * k)
    q = (1.0 - h - _TAIL_Z * h.sqrt()).clamp(min=0.1)
    kappa = (q.pow(-3) - 1.0) / (3.0 * (2.0 / k).sqrt())
    return torch.where(torch.isfinite(kappa), kappa.clamp(min=1.0), torch.ones_like(kappa))


def sketched_budget(
    pre: torch.Tensor,
    post: torch.Tensor,
    factor: torch.Tensor,
    lr: torch.Tensor,
    weight_decay: torch.Tensor,
    norm2_before: torch.Tensor,
    norm2_after: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Budget [P, 8] and variances [P, 2] (of A and I) from the signed bucket sums of each tensor
    before (``pre``) and after (``post``) the step, [P, R] float64, drawn with the same signs
    (:func:`signed_bucket_sums`); ``factor`` c, ``lr``, ``weight_decay``, ``norm2_before``
    (||w_t||², observed) and ``norm2_after`` (||w_{t+1}||², observed) are float64 vectors [P].
    Î = Σ_b B_b², Var = (2/3) Σ_b B_b⁴, B = c S - S' (module docstring)."""
    cf = factor.to(torch.float64)
    b2 = (cf[:, None] * pre.to(torch.float64) - post.to(torch.float64)) ** 2
    inject = b2.sum(1)
    b4 = (b2 * b2).sum(1)
    var_i = (2.0 / 3.0) * b4 * skew_inflation(3.0 * inject * inject / b4) ** 2
    ww, delta = norm2_before, norm2_after - norm2_before
    target = delta - (cf * cf - 1.0) * ww  # c A + I, known exactly
    align = (target - inject) / cf
    var_a = var_i / (cf * cf)
    d = 1.0 - cf
    terms = torch.stack((align, inject, -2.0 * d * ww, d * d * ww - d * align, delta, torch.zeros_like(ww),
                         -2.0 * lr * weight_decay * ww, cf * align + 2.0 * inject), dim=1)
    return terms, torch.stack((var_a, var_i), dim=1)
