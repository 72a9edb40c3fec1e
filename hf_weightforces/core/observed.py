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
* **sampled**: keep w_t only at ``n`` coordinates per tensor, drawn uniformly with replacement
  (seeded, redrawn at every budget step, so steps are independent).  With e = c w_t - w_{t+1},
  I is estimated by Î = N mean(e_j²) (unbiased, variance N² var(e²)/n), and A from the exact
  identity c A + I = Δ - (c² - 1)||w_t||² =: T:  Â = (T - Î)/c, so se(Â) = se(Î)/c and the
  budget still closes.  The direct estimate N mean(-2 w_j e_j) is unbiased too but about
  2||w||/(η||u||) times noisier (measured on a tiny GPT-NeoX under Adafactor: 5-20 times the
  error of Â at equal n).  Heavy tails of e² (kurtosis 10-140 measured there) make the
  sample variance optimistic at small n: at n = 64 the z-scores of one tensor had standard
  deviation up to 2.7, at n = 1024 1.0-1.3.  A sparse update (embedding rows without gradient)
  that the sample misses entirely reads as se = 0.  The variances are reported as
  ``align_se``/``inject_se`` (standard errors of the logged means).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .kernels import _Scratch, _chunk

__all__ = ["budget_from_observed", "observed_dots", "sample_indices", "sampled_budget"]


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


def sample_indices(numel: int, size: int, generator: torch.Generator, device: torch.device | str = "cpu") -> torch.Tensor:
    """``size`` flat coordinates of a tensor of ``numel`` elements, uniform with replacement."""
    idx = torch.randint(0, numel, (size,), generator=generator, dtype=torch.int64)
    return idx.to(device)


def sampled_budget(
    pre: torch.Tensor,
    post: torch.Tensor,
    numel: torch.Tensor,
    factor: torch.Tensor,
    lr: torch.Tensor,
    weight_decay: torch.Tensor,
    norm2_before: torch.Tensor,
    norm2_after: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Budget [P, 8] and variances [P, 2] (of A and I) from a coordinate sample of each tensor.

    ``pre``/``post`` are [P, n] (n ≥ 2) values of w_t and w_{t+1} at the same sampled coordinates;
    ``numel`` N, ``factor`` c, ``lr``, ``weight_decay``, ``norm2_before`` (||w_t||², observed) and
    ``norm2_after`` (||w_{t+1}||², observed) are float64 vectors [P].  See the module docstring.
    """
    x, y = pre.to(torch.float64), post.to(torch.float64)
    n = x.shape[1]
    cf = factor
    e = cf[:, None] * x - y
    i = e * e
    big_n = numel.to(torch.float64)
    inject = big_n * i.mean(1)
    var_i = big_n * big_n * i.var(1, correction=1) / n
    ww, delta = norm2_before, norm2_after - norm2_before
    target = delta - (cf * cf - 1.0) * ww  # c A + I, known exactly
    align = (target - inject) / cf
    var_a = var_i / (cf * cf)
    d = 1.0 - cf
    terms = torch.stack((align, inject, -2.0 * d * ww, d * d * ww - d * align, delta, torch.zeros_like(ww),
                         -2.0 * lr * weight_decay * ww, cf * align + 2.0 * inject), dim=1)
    return terms, torch.stack((var_a, var_i), dim=1)
