"""A budget step's rows: one optimizer step's budget terms per tensor, made from tensors, handed to
:meth:`.monitor.ForceMonitor.add` (the monitor's one way in).

A :class:`Rows` is the budget of some tensors at one step: their positions in the monitor, the
terms [k, len(BUDGET_TERMS)] and the squared norms observed after the step (and, for a sampled
budget, the sampling variances of A and I).  Each budget source makes them its own way
(integrations/optimizers.py chooses the source once at train start):

* AdamW's moments read after the step: :meth:`.plan.StepPlan.run` (planned once, every tensor in
  one pass; its terms are a :class:`Pending` step, computed with the other steps of the interval)
  or :func:`moment_rows` (per tensor: sharded backends, super weights);
* an update staged before the step (low-precision weights, bitsandbytes Adam, Lion):
  :class:`Staged`, whose :meth:`Staged.rows` adds the observed Δ and ``rounding`` after it;
* the observed update: core/observed.py's budgets, wrapped in a :class:`Rows` by the source.

Every function takes the monitor's ``norm2`` (the squared norms observed before the step, where it
needs them) and returns rows on ``device``; none synchronises with the host.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import torch

from .budget import (
    BUDGET_TERMS,
    bias_scales,
    budget_from_dots,
    budget_from_intended,
    decay_factor,
    squared_norms,
    step_dots,
)
from .kernels import to_device

__all__ = ["Pending", "Rows", "Staged", "index_tensor", "moment_rows", "tensor_rows"]


class Rows(NamedTuple):
    """One step's budget of some tensors (module docstring)."""

    index: Sequence[int] | torch.Tensor  # positions in the monitor (a list, or an index tensor on its device)
    terms: torch.Tensor  # [k, len(BUDGET_TERMS)]; a non-finite row is counted and left out by the monitor
    norm2: torch.Tensor  # [k] the squared norms observed after the step
    var: torch.Tensor | None = None  # [k, 2] sampling variances of A and I (a sampled budget)


class Pending(NamedTuple):
    """One step's budget whose terms are not computed yet: the few tensors the source needs
    (``inputs``), which ``evaluate`` turns into terms [S, k, len(BUDGET_TERMS)] for a chain of S
    such steps at once (each input stacked along a new first dimension), with the squared norms
    after the chain's last step.  The monitor keeps a step's inputs until its next flush (a log
    event), then computes the kept steps of a source together: a fixed number of operations per
    interval instead of per step.

    A chain is a run of consecutive steps of one source, nothing else read or written in between:
    only its first step carries the squared norms observed before it (``start``; None: the step
    continues the chain), and the squared norms after its steps come from the budget identity
    (||w'||² = c² ||w||² - η s (2<w', ũ> + η s ||ũ||²), :func:`~.plan.step_terms`); where the
    weights are still those of the chain's last step (a log event), ``measure`` gives them
    observed, exactly, so the chain's Δ adds up to the observed change and its closure is the
    observed one (docs/budget.md, section 9)."""

    index: torch.Tensor  # positions in the monitor (an index tensor on its device)
    inputs: tuple  # this step's tensors on the monitor's device (on a CPU, plain float64 buffers too)
    start: torch.Tensor | None  # [k] the squared norms before the step (the chain's first), else None
    evaluate: Callable[..., tuple]  # (stacked inputs, start, end or None) -> (terms [S, k, ...], norms after [k])
    measure: Callable[[], torch.Tensor]  # the squared norms [k] of the tensors as they are now, float64
    end: torch.Tensor | None = None  # [k] the measured squared norms after the step, where the chain ended on them

    @property
    def terms(self) -> torch.Tensor:
        """This step's terms alone [k, len(BUDGET_TERMS)] (the step a chain of its own, its weights
        measured now; the monitor computes steps together, as numpy arrays on a CPU: so here, bit
        for bit the same)."""
        if self.start is None:
            raise ValueError("a step that continues a chain has no terms of its own")
        end = self.measure()
        if all(_is_host(x) for x in (*self.inputs, self.start, end)):
            terms, _ = self.evaluate(*(np.asarray(x)[None] for x in self.inputs), self.start.numpy(), end.numpy())
            return torch.from_numpy(terms[0])
        return self.evaluate(*(x.unsqueeze(0) for x in self.inputs), self.start, end)[0][0]


_INDEX_CACHE: dict[tuple, torch.Tensor] = {}
_INDEX_CACHE_SIZE = 64


def index_tensor(indices: Sequence[int], device: torch.device) -> torch.Tensor:
    """The index tensor of ``indices`` on ``device``, made once per distinct set (the tensors a step
    updates are the same set step after step): no host-to-device copy per step."""
    key = (torch.device(device), *(int(i) for i in indices))
    idx = _INDEX_CACHE.get(key)
    if idx is None:
        if len(_INDEX_CACHE) >= _INDEX_CACHE_SIZE:
            _INDEX_CACHE.clear()
        idx = _INDEX_CACHE[key] = _vector(key[1:], device, torch.long)
    return idx


def _vector(values: Sequence[float], device: torch.device, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A host list as a device tensor without a host synchronisation (pinned, non-blocking copy)."""
    return to_device(torch.tensor(list(values), dtype=dtype), device)


def _is_host(x: object) -> bool:
    return not isinstance(x, torch.Tensor) or x.device.type == "cpu"


def _bias_scales(steps, betas, eps, dev: torch.device) -> tuple[torch.Tensor, list]:
    """(s [k] on ``dev``, ε' per tensor) of :func:`~.budget.bias_scales` for each tensor's counter
    after the step; counters on an accelerator (fused/capturable AdamW) stay there."""
    if all(_is_host(s) for s in steps):
        scales = [bias_scales(float(s), b1, b2, e) for s, (b1, b2), e in zip(steps, betas, eps)]
        return _vector([s for s, _ in scales], dev), [e for _, e in scales]
    t = torch.stack([torch.as_tensor(s, device=dev).to(torch.float64).reshape(()) for s in steps])
    b1 = _vector([b[0] for b in betas], dev)
    b2 = _vector([b[1] for b in betas], dev)
    bc2_sqrt = torch.sqrt(1.0 - b2**t)
    return bc2_sqrt / (1.0 - b1**t), list((_vector(list(eps), dev) * bc2_sqrt).unbind())


def tensor_rows(
    indices: Sequence[int],
    weights: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    second_moments: Sequence[torch.Tensor],
    steps: Sequence[float | torch.Tensor],
    lrs: Sequence[float],
    weight_decays: Sequence[float],
    betas: Sequence[tuple[float, float]],
    eps: Sequence[float],
    norm2: torch.Tensor,
    factors: Sequence[float] | None = None,
) -> Rows:
    """AdamW's budget of the tensors at ``indices`` from the post-step local weights and the
    optimizer's own moments (nothing copied), on ``norm2``'s device; ``norm2`` is the monitor's
    vector of squared norms observed before the step.  ``factors``: the decay factors the
    optimizer applied (:func:`~.budget.decay_factor`; by default each tensor's dtype's)."""
    dev = norm2.device
    if not indices:
        return Rows([], torch.zeros(0, len(BUDGET_TERMS), dtype=torch.float64, device=dev), torch.zeros(0, dtype=torch.float64, device=dev))
    if factors is None:
        factors = [decay_factor(lr, wd, w.dtype) for lr, wd, w in zip(lrs, weight_decays, weights)]
    u_scale, eps_terms = _bias_scales(steps, betas, eps, weights[0].device)
    dots = step_dots(weights, exp_avgs, second_moments, eps_terms).to(dev)
    idx = index_tensor(indices, dev)
    terms = budget_from_dots(dots, _vector(lrs, dev), _vector(weight_decays, dev), u_scale.to(dev), norm2[idx],
                             _vector(factors, dev))
    return Rows(idx, terms, dots[:, 0])


def moment_rows(views: Sequence, norm2: torch.Tensor,
                pick: Callable[[object, torch.Tensor], torch.Tensor] | None = None) -> list[Rows]:
    """:func:`tensor_rows` from view objects (``index``, ``weight``, ``exp_avg``,
    ``second_moment``, ``step`` and ``hyper`` with lr, weight_decay, beta1, beta2, eps), one
    :class:`Rows` per device the tensors are on; ``pick(view, tensor)`` may select elements of each
    tensor first (super weights)."""
    pick = pick or (lambda view, t: t)
    by_device: dict[torch.device, list] = {}
    for v in views:
        by_device.setdefault(v.weight.device, []).append(v)
    return [tensor_rows([v.index for v in group], [pick(v, v.weight) for v in group],
                        [pick(v, v.exp_avg) for v in group], [pick(v, v.second_moment) for v in group],
                        [v.step for v in group], [v.hyper.lr for v in group], [v.hyper.weight_decay for v in group],
                        [(v.hyper.beta1, v.hyper.beta2) for v in group], [v.hyper.eps for v in group], norm2,
                        [decay_factor(v.hyper.lr, v.hyper.weight_decay, v.weight.dtype) for v in group])
            for group in by_device.values()]


class Staged:
    """The budget of an update computed before the step (docs/budget.md, section 5), kept until
    :meth:`rows` sees which tensors the step really updated: from (||w_t||², <w_t, u_t>, ||u_t||²)
    per tensor (``dots`` [k, 3]: :func:`~.budget.intended_dots` of AdamW's intended update, from the
    true w_t; bitsandbytes Adam and Lion: integrations/optimizers.py), each tensor's lr, weight
    decay and applied decay factor."""

    def __init__(self, indices: Sequence[int], dots: torch.Tensor, lrs: Sequence[float],
                 weight_decays: Sequence[float], factors: Sequence[float], device: torch.device) -> None:
        dots = dots.to(device)
        self.device = torch.device(device)
        self.position = {int(i): k for k, i in enumerate(indices)}
        self.terms = budget_from_intended(dots, _vector(lrs, device), _vector(weight_decays, device),
                                          _vector(factors, device)) if len(indices) else None
        self.before = dots[:, 0]  # ||w_t||², float64

    def rows(self, indices: Sequence[int], weights_after: Sequence[torch.Tensor],
             views: Sequence | None = None) -> tuple[Rows | None, list[int]]:
        """After the step: the staged budget of the tensors in ``indices`` (those the optimizer really
        updated, ``weights_after`` theirs), with the observed Δ and ``rounding`` = Δ - (A + I + D + R);
        and the indices that had nothing staged (to be recorded another way).

        ``views`` (AdamW: the tensors' views, ``index``, ``weight``, ``exp_avg``, ``second_moment``,
        ``step``, ``hyper``): ``align_post`` is then the research code's formula on what is stored
        after the step, -2η s <w_{t+1}, ũ_t> from the stored weights and moments (bf16/fp16-held:
        both rounded), read by the same pass that observes ||w_{t+1}||²; without them (bitsandbytes,
        whose moments are quantised) it is c A + 2I of the intended update (docs/budget.md, section 6)."""
        have = [i for i in indices if i in self.position]
        missing = [i for i in indices if i not in self.position]
        if not have:
            return None, missing
        dev = self.device
        pick = index_tensor([self.position[i] for i in have], dev)
        align, inject, decay, rest, decay_nominal, align_post = self.terms[pick].unbind(1)
        if views is not None:
            vs = [v for v in views if v.index in self.position]
            u_scale, eps_terms = _bias_scales([v.step for v in vs], [(v.hyper.beta1, v.hyper.beta2) for v in vs],
                                              [v.hyper.eps for v in vs], vs[0].weight.device)
            dots = step_dots([v.weight for v in vs], [v.exp_avg for v in vs], [v.second_moment for v in vs],
                             eps_terms).to(dev)
            after = dots[:, 0]
            align_post = -2.0 * _vector([float(v.hyper.lr) for v in vs], dev) * u_scale.to(dev) * dots[:, 1]
        else:
            after = squared_norms([w for i, w in zip(indices, weights_after) if i in self.position]).to(dev)
        delta = after - self.before[pick]
        rounding = delta - (align + inject + decay + rest)
        terms = torch.stack((align, inject, decay, rest, delta, rounding, decay_nominal, align_post), dim=1)
        return Rows(index_tensor(have, dev), terms, after), missing
