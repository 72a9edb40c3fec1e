"""The exact three-force budget of the squared weight norm under AdamW (docs/budget.md).

For one tensor at optimizer step t, with lr η, the decay factor c the optimizer really applies
(c = fl32(1 - ηλ), :func:`decay_factor`; write d = 1 - c ≈ ηλ) and the adaptive update direction
u_t = (m_t / (1-β1^t)) / (sqrt(v_t / (1-β2^t)) + ε), PyTorch's AdamW does w_{t+1} = c w_t - η u_t,
so, exactly, with Δ = ||w_{t+1}||² - ||w_t||²:

    Δ = A + I + D + R
    A = -2η <w_t, u_t>                       alignment (> 0 grows the norm)
    I =  η² ||u_t||²                          injection (≥ 0)
    D = -2d ||w_t||²                          decay (≤ 0)
    R =  d² ||w_t||² + 2ηd <w_t, u_t>         higher-order rest

Reference: Ding, "Weibull Weight-Scale Parameter Evolution under AdamW Training Dynamics",
arXiv:2606.19367 (the paper logs the magnitudes; we log signed contributions to Δ).

Three layers live here:

* :func:`adamw_direction` and :func:`force_budget`: slow, float64, obviously correct references
  for one tensor (used by tests and by anyone who wants a single number).
* :func:`step_dots` and :func:`budget_from_dots`: the fast path the callback runs every step
  after the optimizer step.  Nothing copies the weights: w_t is rebuilt from the post-step tensor
  and the optimizer's moments.  Writing ũ = m / (sqrt(v) + ε sqrt(1-β2^t)) so that u = s ũ with
  s = sqrt(1-β2^t)/(1-β1^t), and w' = w_{t+1}:

      w_t = (w' + η s ũ) / c
      <w_t, u>  = (s <w', ũ> + η s² ||ũ||²) / c
      ||u||²    = s² ||ũ||²
      ||w_t||²  = (||w'||² + 2ηs <w', ũ> + η² s² ||ũ||²) / c²

  so three sums per tensor (||w'||² from exact float64 squares, <w', ũ>, ||ũ||², all accumulated
  in float64) give every term.  The closure Δ_observed - (A + I + D + R) compares the rebuilt
  ||w_t||² with the one *observed* before the step, so it catches a wrong lr, decay, step or
  moment; what is left is the float32 rounding of the stored weights (docs/budget.md, section 4).
* :func:`intended_dots` and :func:`budget_from_intended`: before the step, for weights stored in
  low precision (where w_t cannot be rebuilt from the rounded w_{t+1}): the update AdamW intends,
  from the true w_t, the gradients and the moments (docs/budget.md, section 5).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .kernels import KERNELS, _chunk, _Scratch, choose_kernel, squared_norms, step_dots  # noqa: F401  (re-exported)

logger = logging.getLogger(__name__)

__all__ = [
    "BUDGET_TERMS",
    "KERNELS",
    "ForceBudget",
    "adamw_direction",
    "budget_from_dots",
    "budget_from_intended",
    "choose_kernel",
    "decay_factor",
    "force_budget",
    "intended_dots",
    "squared_norms",
    "step_dots",
]

#: Per-tensor, per-step columns produced by :func:`budget_from_dots` and :func:`budget_from_intended`,
#: in order.  ``rounding`` is the part of the observed Δ that rounding of low-precision stored weights
#: took away or added (zero where the budget is rebuilt from the stored weights); ``decay_nominal``
#: is D with the group's nominal weight decay (``decay`` uses the factor the optimizer applied);
#: ``align_post`` is the research code's alignment at the post-step weights, -2η<w_{t+1}, u_t>.
BUDGET_TERMS: tuple[str, ...] = ("align", "inject", "decay", "rest", "delta", "rounding", "decay_nominal", "align_post")


def decay_factor(lr: float, weight_decay: float, dtype: torch.dtype = torch.float32) -> float:
    """The factor c that AdamW really multiplies a parameter by (docs/budget.md).

    PyTorch's AdamW (for-loop, foreach and fused alike, float32, bfloat16 and float16 parameters)
    computes ``1 - lr * weight_decay`` as a Python float and multiplies in float32, so the factor
    applied is fl32(1 - lr·λ): near 1 float32 numbers are 5.96e-8 apart, so at lr 5e-5, λ 0.01 the
    decay really applied is 4.6% weaker than the nominal one.  Float64 parameters keep it exact.
    """
    c = 1.0 - float(lr) * float(weight_decay)
    return c if dtype == torch.float64 else float(np.float32(c))


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
    """u_t = (m_t/(1-β1^t)) / (sqrt(v_t/(1-β2^t)) + ε) in float64 (docs/budget.md).

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
    factor: float | None = None,
) -> ForceBudget:
    """The budget of one tensor from w_t and u_t, in float64 (docs/budget.md).

    ``w_after`` defaults to the AdamW update c w_t - η u_t; pass the tensor the optimizer really
    produced to make the closure an observation.  ``factor`` is the decay factor c the optimizer
    applied (:func:`decay_factor`); by default the nominal 1 - ηλ.
    """
    w = w_before.detach().to(torch.float64)
    u = u.detach().to(torch.float64)
    eta = float(lr)
    d = eta * float(weight_decay) if factor is None else 1.0 - float(factor)  # the decay applied, ηλ
    if w_after is None:
        w_next = (1.0 - d) * w - eta * u
    else:
        w_next = w_after.detach().to(torch.float64)
    wu = float(torch.sum(w * u))
    uu = float(torch.sum(u * u))
    ww = float(torch.sum(w * w))
    return ForceBudget(
        align=-2.0 * eta * wu,
        inject=eta * eta * uu,
        decay=-2.0 * d * ww,
        rest=d * d * ww + 2.0 * eta * d * wu,
        norm2_before=ww,
        norm2_after=float(torch.sum(w_next * w_next)),
    )


def _forces(ww, wu, uu, eta, factor, weight_decay):
    """(A, I, D, R, D_nominal) from ||w_t||², <w_t, u_t>, ||u_t||² and the applied decay factor c.

    With d = 1 - c (the decay really applied, η λ_eff): D = -2 d ||w||², R = d² ||w||² + 2 η d <w, u>,
    so A + I + D + R = ||c w - η u||² - ||w||² exactly.
    """
    d = 1.0 - factor
    align = -2.0 * eta * wu
    inject = eta * eta * uu
    decay = -2.0 * d * ww
    rest = d * d * ww + 2.0 * eta * d * wu
    decay_nominal = -2.0 * eta * weight_decay * ww
    return align, inject, decay, rest, decay_nominal


#: A torch tensor or a numpy array: the budget's arithmetic on P-vectors runs on either
#: (:func:`namespace`), one formula for the device and for the host.
Array = torch.Tensor | np.ndarray


def namespace(x: Array):
    """The module whose functions act on ``x``: numpy for a numpy array, else torch."""
    return np if isinstance(x, np.ndarray) else torch


def unbind(x: Array, dim: int) -> tuple[Array, ...]:
    """The slices of ``x`` along ``dim`` (views; one operation on a tensor)."""
    return x.unbind(dim) if isinstance(x, torch.Tensor) else tuple(np.moveaxis(x, dim, 0))


def budget_from_dots(
    dots: Array,
    lr: Array,
    weight_decay: Array,
    u_scale: Array,
    norm2_before: Array,
    factor: Array | None = None,
) -> Array:
    """Per-tensor budget [..., P, len(BUDGET_TERMS)] from :func:`step_dots` output [..., P, 3]
    (post-step weights; any leading dimensions, e.g. several steps).

    ``lr``, ``weight_decay``, ``u_scale`` (s = sqrt(1-β2^t)/(1-β1^t)), ``norm2_before`` (the
    squared norm observed before the step) and ``factor`` (the decay factor c the optimizer
    applied, :func:`decay_factor`; default the nominal 1 - ηλ) are float64 tensors [..., P]
    on one device (or numpy arrays: :func:`namespace`).  w_t = (w' + η u) / c is rebuilt; the observation enters only through Δ.
    """
    xp = namespace(dots)
    a, b, c = unbind(dots, -1)
    eta, s = lr, u_scale
    cf = 1.0 - eta * weight_decay if factor is None else factor
    # the forces of :func:`_forces` from the reconstruction above, written with few operations (the
    # planned pass runs this on P-vectors every step: its cost is the number of operations)
    inv, d, m2 = xp.reciprocal(cf), 1.0 - cf, -2.0 * eta
    e1 = eta * s
    e1c = e1 * c
    wu = (b + e1c) * (s * inv)  # <w_t, u_t>
    ww = (a + e1 * (b + b + e1c)) * xp.square(inv)  # ||w_t||² (reconstructed)
    align = m2 * wu
    dww = d * ww
    rest = d * (dww - align)  # d² ||w||² + 2ηd <w, u>
    return xp.stack((align, e1 * e1c,  # inject = η² s² ||ũ||²
                     -2.0 * dww, rest, a - norm2_before, xp.zeros_like(a), (m2 * weight_decay) * ww,
                     m2 * s * b), -1)  # align_post = -2η<w_{t+1}, u_t>: the research code's convention


def bias_scales(step: float, beta1: float, beta2: float, eps: float) -> tuple[float, float]:
    """(s, ε') for one tensor: s = sqrt(1-β2^t)/(1-β1^t), ε' = ε sqrt(1-β2^t) (:func:`eps_scale`)."""
    return math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step), eps_scale(step, beta2, eps)


def eps_scale(step: float, beta2: float, eps: float) -> float:
    """ε' = ε sqrt(1-β2^t): what the pass adds to sqrt(v) (host numbers)."""
    return eps * math.sqrt(1.0 - beta2**step)


# ------------------------------------------------------------------ the intended update (pre-step)
def intended_dots(
    weights: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor | None],
    exp_avg_sqs: Sequence[torch.Tensor | None],
    max_exp_avg_sqs: Sequence[torch.Tensor | None],
    steps: Sequence[float],
    betas: Sequence[tuple[float, float]],
    eps: Sequence[float],
    maximize: Sequence[bool],
    grad_scale: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Before the step: (||w_t||², <w_t, u_t>, ||u_t||²) of the update AdamW is about to make, [P, 3].

    For parameters the optimizer stores in low precision (bfloat16/float16 with no float32
    master), where the stored w_{t+1} is rounded and w_t cannot be rebuilt from it (docs/budget.md).
    From the true w_t, the final gradients (after clipping) and the moments before the step, in
    float64 (exact squares, float64 sums), the moments advanced the way AdamW advances them:
    m_t = β1 m + (1-β1) g,  v_t = β2 v + (1-β2) g² (AMSGrad: max with the running max),
    u_t = (m_t/(1-β1^t)) / (sqrt(v_t/(1-β2^t)) + ε), ``steps[i]`` = t, the step about to be
    taken (a number, or a 0-d tensor on the accelerator, which is never read on the host).
    ``maximize`` flips g; ``grad_scale`` divides it (a fused AdamW under a GradScaler
    unscales inside its kernel).  Missing moments (the first step) are zeros.
    """
    if not weights:
        return torch.zeros(0, 3, dtype=torch.float64)
    dev = weights[0].device
    step = _chunk(dev)
    biggest = max(1, max(w.numel() for w in weights))
    scratch = _Scratch(5, min(biggest, step), dev)
    rows = []
    for k, w in enumerate(weights):
        b1, b2 = betas[k]
        t = steps[k] if isinstance(steps[k], torch.Tensor) and steps[k].device.type != "cpu" else float(steps[k])
        if isinstance(t, torch.Tensor):  # a device counter: the corrections stay 0-d device tensors (no sync)
            t = t.to(device=dev, dtype=torch.float64)
        bc1, bc2 = 1.0 - b1**t, 1.0 - b2**t
        n = w.numel()
        flat = [x.detach().reshape(-1) if x is not None else None
                for x in (w, grads[k], exp_avgs[k], exp_avg_sqs[k], max_exp_avg_sqs[k])]
        acc = torch.zeros(3, dtype=torch.float64, device=dev)
        for i in range(0, n, step):
            x = scratch.load(0, flat[0][i : i + step])
            g = scratch.load(1, flat[1][i : i + step])
            if maximize[k]:
                g.neg_()
            if grad_scale is not None:
                g.div_(grad_scale)
            m = scratch.load(2, flat[2][i : i + step]) if flat[2] is not None else scratch.bufs[2][: x.numel()].zero_()
            v = scratch.load(3, flat[3][i : i + step]) if flat[3] is not None else scratch.bufs[3][: x.numel()].zero_()
            m.mul_(b1).add_(g, alpha=1.0 - b1)
            v.mul_(b2).addcmul_(g, g, value=1.0 - b2)
            if flat[4] is not None:
                torch.maximum(v, scratch.load(4, flat[4][i : i + step]), out=v)
            v.div_(bc2).sqrt_().add_(eps[k])
            m.div_(bc1).div_(v)  # u_t
            acc += torch.stack((torch.dot(x, x), torch.dot(x, m), torch.dot(m, m)))
        rows.append(acc)
    return torch.stack(rows)


def budget_from_intended(
    dots: torch.Tensor, lr: torch.Tensor, weight_decay: torch.Tensor, factor: torch.Tensor
) -> torch.Tensor:
    """Per tensor [P, 6] = (A, I, D, R, D_nominal, A_post) of the intended update, from
    :func:`intended_dots`; A_post = -2η<c w_t - η u_t, u_t> = c A + 2 I."""
    ww, wu, uu = dots.unbind(1)
    align, inject, decay, rest, decay_nominal = _forces(ww, wu, uu, lr, factor, weight_decay)
    return torch.stack((align, inject, decay, rest, decay_nominal, factor * align + 2.0 * inject), dim=1)
