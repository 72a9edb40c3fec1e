"""The exact three-force budget of the squared weight norm under AdamW (SPEC sections 1-2).

For one tensor at optimizer step t, with lr η, decoupled weight decay λ and the adaptive update
direction u_t = (m_t / (1-β1^t)) / (sqrt(v_t / (1-β2^t)) + ε), PyTorch's AdamW does

    w_{t+1} = (1 - ηλ) w_t - η u_t

so, exactly, with Δ = ||w_{t+1}||² - ||w_t||²:

    Δ = A + I + D + R
    A = -2η <w_t, u_t>                       alignment (> 0 grows the norm)
    I =  η² ||u_t||²                          injection (≥ 0)
    D = -2ηλ ||w_t||²                         decay (≤ 0)
    R =  η²λ² ||w_t||² + 2η²λ <w_t, u_t>      higher-order rest

Reference: Ding, "Weibull Weight-Scale Parameter Evolution under AdamW Training Dynamics",
arXiv:2606.19367 (the paper logs the magnitudes; we log signed contributions to Δ).

Two layers live here:

* :func:`adamw_direction` and :func:`force_budget`: slow, float64, obviously correct references
  for one tensor (used by tests and by anyone who wants a single number).
* :func:`step_dots` and :func:`budget_from_dots`: the fast path the callback runs every step.
  Nothing copies the weights: w_t is reconstructed from the post-step tensor and the optimizer's
  moments.  Writing ũ = m / (sqrt(v) + ε sqrt(1-β2^t)) so that u = s ũ with s = sqrt(1-β2^t)/(1-β1^t),
  and w' = w_{t+1}, c = 1/(1-ηλ):

      w_t = c (w' + η s ũ)
      <w_t, u>  = c (s <w', ũ> + η s² ||ũ||²)
      ||u||²    = s² ||ũ||²
      ||w_t||²  = c² (||w'||² + 2ηs <w', ũ> + η² s² ||ũ||²)

  so three dot products per tensor (||w'||², <w', ũ>, ||ũ||², accumulated in float64) give every
  term.  The closure Δ_observed - (A + I + D + R) compares the reconstructed ||w_t||² with the
  one *observed* before the step, so it catches a wrong lr, decay, step or moment.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "BUDGET_TERMS",
    "ForceBudget",
    "adamw_direction",
    "budget_from_dots",
    "force_budget",
    "squared_norms",
    "step_dots",
]

#: Per-tensor, per-step columns produced by :func:`budget_from_dots`, in order.
BUDGET_TERMS: tuple[str, ...] = ("align", "inject", "decay", "rest", "delta")


@dataclass(frozen=True)
class ForceBudget:
    """Signed contributions to Δ||w||² of one tensor (or a sum of tensors) at one step."""

    align: float
    inject: float
    decay: float
    rest: float
    norm2_before: float
    norm2_after: float

    @property
    def delta(self) -> float:
        """Observed change of the squared norm."""
        return self.norm2_after - self.norm2_before

    @property
    def closure(self) -> float:
        """Δ - (A + I + D + R); zero up to rounding when the bookkeeping is right."""
        return self.delta - (self.align + self.inject + self.decay + self.rest)


def adamw_direction(
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: float,
    beta1: float,
    beta2: float,
    eps: float,
) -> torch.Tensor:
    """u_t = (m_t/(1-β1^t)) / (sqrt(v_t/(1-β2^t)) + ε) in float64 (SPEC section 1).

    For AMSGrad pass the running maximum ``max_exp_avg_sq`` as ``exp_avg_sq``.
    """
    m = exp_avg.detach().to(torch.float64)
    v = exp_avg_sq.detach().to(torch.float64)
    bc1 = 1.0 - beta1**step
    bc2 = 1.0 - beta2**step
    return (m / bc1) / ((v / bc2).sqrt() + eps)


def force_budget(
    w_before: torch.Tensor,
    u: torch.Tensor,
    lr: float,
    weight_decay: float,
    w_after: torch.Tensor | None = None,
) -> ForceBudget:
    """The budget of one tensor from w_t and u_t, in float64 (SPEC section 2).

    ``w_after`` defaults to the AdamW update (1-ηλ) w_t - η u_t; pass the tensor the optimizer
    really produced to make the closure an observation.
    """
    w = w_before.detach().to(torch.float64)
    u = u.detach().to(torch.float64)
    eta, lam = float(lr), float(weight_decay)
    if w_after is None:
        w_next = (1.0 - eta * lam) * w - eta * u
    else:
        w_next = w_after.detach().to(torch.float64)
    wu = float(torch.sum(w * u))
    uu = float(torch.sum(u * u))
    ww = float(torch.sum(w * w))
    return ForceBudget(
        align=-2.0 * eta * wu,
        inject=eta * eta * uu,
        decay=-2.0 * eta * lam * ww,
        rest=eta * eta * lam * lam * ww + 2.0 * eta * eta * lam * wu,
        norm2_before=ww,
        norm2_after=float(torch.sum(w_next * w_next)),
    )


#: Elements per BLAS dot: float32 accumulation over 2^18 values errs ~1e-6 relative; the chunk
#: results are summed in float64, so the error does not grow with the tensor (a single dot over
#: 1.6e7 values errs ~5e-4).
_DOT_CHUNK = 1 << 18


def _chunked_dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """<x, y> of two flat float32 tensors, float64 result, one read pass (no product written)."""
    n = x.numel()
    if n <= _DOT_CHUNK:
        return torch.dot(x, y).to(torch.float64)
    parts = [torch.dot(x[i : i + _DOT_CHUNK], y[i : i + _DOT_CHUNK]) for i in range(0, n, _DOT_CHUNK)]
    return torch.stack(parts).sum(dtype=torch.float64)


def _dots_loop(
    weights: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    second_moments: Sequence[torch.Tensor],
    eps_terms: Sequence[float | torch.Tensor],
) -> torch.Tensor:
    """CPU path: one tensor at a time through two reusable scratch buffers.

    On CPU a fresh full-size allocation per step costs more than the arithmetic (first-touch page
    faults), so the scratch is sized by the largest tensor, not the model.
    """
    biggest = max(1, max(w.numel() for w in weights))
    dev = weights[0].device
    # two separate (aligned) buffers: the ||w'||² reduction then matches squared_norms bit for bit
    u_buf = torch.empty(biggest, dtype=torch.float32, device=dev)
    prod_buf = torch.empty(biggest, dtype=torch.float32, device=dev)
    rows = []
    for w, m, v, e in zip(weights, exp_avgs, second_moments, eps_terms):
        n = w.numel()
        if n == 0:  # a shard this rank does not hold
            rows.append(torch.zeros(3, dtype=torch.float64, device=dev))
            continue
        w32 = w.detach().reshape(-1).float() if w.dtype != torch.float32 else w.detach().reshape(-1)
        u = u_buf[:n]
        torch.sqrt(v.reshape(-1), out=u)
        u.add_(e)
        torch.div(m.reshape(-1), u, out=u)  # ũ = m / (sqrt(v) + ε')
        prod = prod_buf[:n]
        torch.mul(w32, w32, out=prod)
        a = prod.sum(dtype=torch.float64)  # ||w'||²: the closure needs ~1e-9, so float64 sums
        b = _chunked_dot(w32, u)  # <w', ũ> and ||ũ||² enter the forces linearly: ~1e-6 is plenty
        c = _chunked_dot(u, u)
        rows.append(torch.stack((a, b, c)))
    return torch.stack(rows)


def _dots_foreach(
    weights: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    second_moments: Sequence[torch.Tensor],
    eps_terms: Sequence[float | torch.Tensor],
) -> torch.Tensor:
    """Accelerator path: fused multi-tensor kernels, no per-tensor launches.

    <w', ũ> comes from the polarisation ||w' + ũ||² = ||w'||² + 2<w', ũ> + ||ũ||² with float64
    accumulation; ũ is O(1) per element and w' small, so the float32 rounding of w' + ũ costs
    about 1e-7/sqrt(n) of ||ũ||², far below the forces.
    """
    w32 = [w.detach().float() for w in weights]
    u = torch._foreach_sqrt([v.detach() for v in second_moments])
    if all(isinstance(e, torch.Tensor) for e in eps_terms):
        torch._foreach_add_(u, list(eps_terms))
    else:
        torch._foreach_add_(u, [float(e) for e in eps_terms])
    torch._foreach_reciprocal_(u)
    torch._foreach_mul_(u, [m.detach() for m in exp_avgs])
    a = torch.stack(torch._foreach_norm(w32, 2, dtype=torch.float64)).square()
    c = torch.stack(torch._foreach_norm(u, 2, dtype=torch.float64)).square()
    torch._foreach_add_(u, w32)
    s = torch.stack(torch._foreach_norm(u, 2, dtype=torch.float64)).square()
    b = 0.5 * (s - a - c)
    return torch.stack((a, b, c), dim=1)


def squared_norms(weights: Sequence[torch.Tensor], *, method: str = "auto") -> torch.Tensor:
    """||w||² per tensor, float64 [P], computed exactly as :func:`step_dots` computes ||w'||².

    Using the same arithmetic for the norm observed before a step and the one rebuilt after it
    keeps the closure a comparison of like with like (and a resumed run equal to an unbroken one).
    """
    if not weights:
        return torch.zeros(0, dtype=torch.float64)
    if method == "auto":
        method = "loop" if weights[0].device.type == "cpu" else "foreach"
    if method == "foreach":
        w32 = [w.detach().float() for w in weights]
        return torch.stack(torch._foreach_norm(w32, 2, dtype=torch.float64)).square()
    biggest = max(w.numel() for w in weights)
    prod = torch.empty(biggest, dtype=torch.float32, device=weights[0].device)
    out = []
    for w in weights:
        if w.numel() == 0:
            out.append(torch.zeros((), dtype=torch.float64, device=w.device))
            continue
        w32 = w.detach().reshape(-1).float()
        p = prod[: w32.numel()]
        torch.mul(w32, w32, out=p)
        out.append(p.sum(dtype=torch.float64))
    return torch.stack(out)


def step_dots(
    weights: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    second_moments: Sequence[torch.Tensor],
    eps_terms: Sequence[float | torch.Tensor],
    *,
    method: str = "auto",
) -> torch.Tensor:
    """Per tensor: (||w'||², <w', ũ>, ||ũ||²) as a float64 tensor of shape [P, 3], on the device.

    ``weights`` are the post-step tensors w' (any float dtype; the fp32 master where mixed
    precision keeps one), ``second_moments`` are ``exp_avg_sq`` (or ``max_exp_avg_sq`` under
    AMSGrad), and ``eps_terms[i] = ε sqrt(1-β2^t_i)``.  All tensors must share one device; no
    host synchronisation happens here.  ``method`` is ``"loop"`` (CPU default), ``"foreach"``
    (accelerator default) or ``"auto"``.
    """
    if not weights:
        return torch.zeros(0, 3, dtype=torch.float64)
    if method == "auto":
        method = "loop" if weights[0].device.type == "cpu" else "foreach"
    if method == "loop":
        return _dots_loop(weights, exp_avgs, second_moments, eps_terms)
    if method == "foreach":
        return _dots_foreach(weights, exp_avgs, second_moments, eps_terms)
    raise ValueError(f"unknown method {method!r}; expected 'auto', 'loop' or 'foreach'")


def budget_from_dots(
    dots: torch.Tensor,
    lr: torch.Tensor,
    weight_decay: torch.Tensor,
    u_scale: torch.Tensor,
    norm2_before: torch.Tensor,
) -> torch.Tensor:
    """Per-tensor budget [P, 5] = (A, I, D, R, Δ_observed) from :func:`step_dots` output.

    ``lr``, ``weight_decay``, ``u_scale`` (s = sqrt(1-β2^t)/(1-β1^t)) and ``norm2_before`` (the
    squared norm observed before the step) are float64 vectors of length P on the same device.
    The reconstructed ||w_t||² is the only place the observation enters, through Δ.
    """
    a, b, c = dots.unbind(1)
    eta, lam, s = lr, weight_decay, u_scale
    inv = 1.0 / (1.0 - eta * lam)
    wu = inv * (s * b + eta * s * s * c)  # <w_t, u_t>
    uu = s * s * c  # ||u_t||²
    ww = inv * inv * (a + 2.0 * eta * s * b + eta * eta * s * s * c)  # ||w_t||² (reconstructed)
    align = -2.0 * eta * wu
    inject = eta * eta * uu
    decay = -2.0 * eta * lam * ww
    rest = eta * eta * lam * lam * ww + 2.0 * eta * eta * lam * wu
    delta = a - norm2_before
    return torch.stack((align, inject, decay, rest, delta), dim=1)


def bias_scales(step: float, beta1: float, beta2: float, eps: float) -> tuple[float, float]:
    """(s, ε') for one tensor: s = sqrt(1-β2^t)/(1-β1^t), ε' = ε sqrt(1-β2^t)."""
    bc2_sqrt = math.sqrt(1.0 - beta2**step)
    return bc2_sqrt / (1.0 - beta1**step), eps * bc2_sqrt
