"""A step's force pass planned once: everything that does not change from step to step is made at
the first budget step, so a step hands the kernels only one float64 vector (learning rates, weight
decays, β1, decay factors, bias corrections) and the step counters (docs/budget.md, section 9).

:class:`StepPlan` holds, for a fixed list of tensors on one device, the index tensors into the
monitor and into the step vector, and the pass itself.  One :meth:`StepPlan.run` adds every tensor's
budget row (:data:`~.budget.BUDGET_TERMS`) to the monitor's sums, flags non-finite rows and sets the
new squared norms, with the tensors the step did not update (counter not moved: no gradient, a
GradScaler skip inside a fused kernel) masked out on the device: no Python work per tensor, no host
synchronisation, no host-to-device copy of a Python list.

The pass (``kernel``):

* ``exact``: the eager reference (small tensors packed into float64 buffers made once, big ones
  through :func:`~.kernels.step_dots`), then the budget;
* ``compiled``: :func:`_chunk_pass` through ``torch.compile``: the three sums of every tensor, the
  budget and the accumulation in one compiled call per chunk of :data:`CHUNK` tensors (one call a
  step up to 64 tensors), equal to the eager pass within 1e-6 of each sum (``tests/test_plan.py``);
* ``foreach``: :func:`~.kernels.step_dots`'s multi-tensor pass.
"""

from __future__ import annotations

import itertools
import logging
import math
import types
from collections.abc import Sequence

import torch

from .budget import budget_from_dots, decay_factor
from .kernels import _SMALL as SMALL
from .kernels import PackedSmall, step_dots, to_device

logger = logging.getLogger(__name__)

__all__ = ["CHUNK", "StepPlan", "planned_terms"]

#: Tensors per compiled call: one graph for a whole small or mid-sized model; a large model is cut
#: into a few graphs so that each compilation stays bounded.
CHUNK = 64


def planned_terms(
    dots: torch.Tensor,
    t_after: torch.Tensor,
    t_before: torch.Tensor,
    lr: torch.Tensor,
    factor: torch.Tensor,
    weight_decay: torch.Tensor,
    beta1: torch.Tensor,
    norm2_before: torch.Tensor,
    bc2_sqrt: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(terms [k, len(BUDGET_TERMS)], not finite [k], new squared norm [k]) from the three sums.

    A tensor whose step counter did not move (``t_after <= t_before``) was not updated: its row
    is zero, its norm stays.  A non-finite row is zero and flagged.  Float64 vectors throughout."""
    t = t_after.to(torch.float64)
    s = bc2_sqrt / (1.0 - beta1**t)
    terms = budget_from_dots(dots, lr, weight_decay, s, norm2_before, factor)
    keep = t_after > t_before
    finite = torch.isfinite(terms).all(dim=1)
    good = keep & finite
    terms = torch.where(good[:, None], terms, torch.zeros_like(terms))
    bad = (keep & ~finite).to(torch.float64)
    norm2 = torch.where(keep, dots[:, 0], norm2_before)
    return terms, bad, norm2


def _accumulate(dots, t_after, t_before, hv, gidx, widx, b1idx, fidx, bidx, idx, sums, nonfinite, norm2) -> torch.Tensor:
    """The budget of ``dots`` added to the accumulators at ``idx`` (in place); returns the terms."""
    terms, bad, norm2_new = planned_terms(dots, t_after, t_before, hv[gidx], hv[fidx], hv[widx], hv[b1idx], norm2[idx],
                                          hv[bidx])
    sums.index_add_(0, idx, terms)
    nonfinite.index_add_(0, idx, bad)
    norm2.index_copy_(0, idx, norm2_new)
    return terms


def _chunk_pass(ws, ms, vs, t_after, t_before, hv, gidx, widx, b1idx, fidx, bidx, eidx, idx, sums, nonfinite, norm2):
    """One chunk of tensors, written for ``torch.compile`` to fuse: per tensor one read of w', m, v
    (exact float64 squares for ||w'||², ũ in float32 with ε' = ``hv[eidx[k]]``, its products
    summed in float64, as the eager pass), then the budget of the chunk, added to the monitor's
    accumulators in place."""
    e = hv[eidx].to(torch.float32)
    rows = []
    for k, (w, m, v) in enumerate(zip(ws, ms, vs)):
        w64 = w.to(torch.float64)
        u = (m / (torch.sqrt(v) + e[k])).to(torch.float64)
        rows.append(torch.stack(((w64 * w64).sum(), (w64 * u).sum(), (u * u).sum())))
    return _accumulate(torch.stack(rows), t_after, t_before, hv, gidx, widx, b1idx, fidx, bidx, idx, sums, nonfinite,
                       norm2)


_COMPILE_FAILED = False


def _compile_chunk(tag: str, device: torch.device):
    """:func:`_chunk_pass` compiled for one chunk of one plan.  Each gets its own code object, so
    dynamo keeps exactly one compiled entry per chunk (no recompile limit is ever reached however
    many plans a process makes, and a call checks one set of guards); on CPU the wrapper around
    the kernel is C++ (``cpp_wrapper``: a third less time per call than the Python wrapper on the
    tiny model).  Identical graphs come back from inductor's on-disk cache."""
    code = _chunk_pass.__code__.replace(co_name=f"_chunk_pass_{tag}")
    fn = types.FunctionType(code, _chunk_pass.__globals__, code.co_name)
    options = {"cpp_wrapper": True} if device.type == "cpu" else {}
    return torch.compile(fn, dynamic=False, fullgraph=True, options=options)


_PLANS = itertools.count()


class StepPlan:
    """The per-step pass over a fixed list of tensors on one device, planned once.

    ``groups[k]`` is tensor k's parameter group number, of ``n_groups`` (their hyper-parameters come
    with each step: schedules may move them); ``float64[k]`` says whether tensor k is stored in float64
    (its decay factor is not rounded to float32); ``numels[k]`` its size (the tensors a step hands
    over are flat).  Per step, :meth:`step_vector` turns the groups' hyper-parameters and the step
    counters into one float64 vector, and :meth:`run` adds the step's budget to the accumulators."""

    def __init__(
        self,
        indices: Sequence[int],
        groups: Sequence[int],
        n_groups: int,
        float64: Sequence[bool],
        numels: Sequence[int],
        device: torch.device,
        kernel: str = "exact",
    ) -> None:
        dev = torch.device(device)
        self.device, self.kernel, self.size = dev, kernel, len(indices)
        self.groups, self.float64 = list(groups), list(float64)
        self.n_groups = n_groups
        n = len(indices)
        vec = lambda xs, dtype=torch.float64: to_device(torch.tensor(list(xs), dtype=dtype), dev)  # noqa: E731
        # the step vector (step_vector), G groups, P tensors: lr, weight decay, β1 of group g at g, G + g,
        # 2G + g; its decay factors at 3G + 2g (float32-rounded) and 3G + 2g + 1 (exact); sqrt(1 - β2^t)
        # of tensor k at 5G + k, its ε' at 5G + P + k
        self.index = vec(indices, torch.long)
        self.gidx = vec(groups, torch.long)
        self.widx = self.gidx + n_groups
        self.b1idx = self.gidx + 2 * n_groups
        self.fidx = vec([3 * n_groups + 2 * g + int(f) for g, f in zip(groups, float64)], torch.long)
        self.bidx = vec(range(5 * n_groups, 5 * n_groups + n), torch.long)
        self.eidx = self.bidx + n
        # contiguous chunks of at most CHUNK tensors, their slices of every per-tensor vector
        self.chunks = []
        for a in range(0, n, CHUNK):
            sl = slice(a, min(a + CHUNK, n))
            self.chunks.append((sl, *(x[sl] for x in (self.gidx, self.widx, self.b1idx, self.fidx, self.bidx,
                                                     self.eidx, self.index))))
        self._fns: list | None = None  # the compiled chunks, made at the first compiled step
        # the eager pass: small tensors packed (buffers made at its first step), big ones read in place
        self._numels = list(numels)
        self._small: PackedSmall | None = None
        self._big = [k for k, n in enumerate(numels) if n >= SMALL]
        self._big_index = vec(self._big, torch.long)

    def step_vector(self, lrs: Sequence[float | torch.Tensor], hypers: Sequence[tuple[float, float, float, float]],
                    t_after: torch.Tensor) -> torch.Tensor:
        """[5G + 2P] float64 on the plan's device from each group's lr and (weight decay, β1, β2, ε),
        read at this step (a schedule may move any of them), and the tensors' step counters after
        the step: the groups' lr, weight decay, β1 and two decay factors, the tensors'
        sqrt(1 - β2^t) and ε' = ε sqrt(1 - β2^t).  Host counters and host lrs: computed in Python
        and sent as one tensor (pinned, non-blocking on an accelerator); counters or an lr on the
        accelerator: computed there, no host synchronisation."""
        hypers = [tuple(float(x) for x in h) for h in hypers]
        wd, b1 = [h[0] for h in hypers], [h[1] for h in hypers]
        if t_after.device.type == "cpu" and not any(isinstance(x, torch.Tensor) and x.device.type != "cpu" for x in lrs):
            lr = [float(x) for x in lrs]
            factors = [f for x, h in zip(lr, hypers)
                       for f in (decay_factor(x, h[0], torch.float32), decay_factor(x, h[0], torch.float64))]
            memo: dict[tuple, float] = {}
            bc2 = [memo.get((t, g)) or memo.setdefault((t, g), math.sqrt(1.0 - hypers[g][2] ** t))
                   for t, g in zip(t_after.tolist(), self.groups)]
            eps = [hypers[g][3] * b for g, b in zip(self.groups, bc2)]
            return to_device(torch.tensor(lr + wd + b1 + factors + bc2 + eps, dtype=torch.float64), self.device)
        lr = torch.stack([x.to(self.device, torch.float64).reshape(()) if isinstance(x, torch.Tensor)
                          else to_device(torch.tensor(float(x), dtype=torch.float64), self.device) for x in lrs])
        per_group = to_device(torch.tensor(hypers, dtype=torch.float64).T.contiguous(), self.device)  # [4, G]
        exact = 1.0 - lr * per_group[0]
        factors = torch.stack((exact.to(torch.float32).to(torch.float64), exact), dim=1).reshape(-1)
        bc2 = torch.sqrt(1.0 - per_group[2][self.gidx] ** to_device(t_after, self.device).to(torch.float64))
        return torch.cat((lr, per_group[0], per_group[1], factors, bc2, per_group[3][self.gidx] * bc2))

    def run(
        self,
        weights: Sequence[torch.Tensor],
        exp_avgs: Sequence[torch.Tensor],
        second_moments: Sequence[torch.Tensor],
        t_after: torch.Tensor,
        t_before: torch.Tensor,
        hv: torch.Tensor,
        sums: torch.Tensor,
        nonfinite: torch.Tensor,
        norm2: torch.Tensor,
    ) -> torch.Tensor:
        """Add the step's budget to ``sums`` [N, len(BUDGET_TERMS)], ``nonfinite`` [N] and set
        ``norm2`` [N] (the monitor's accumulators, on the plan's device) at the planned indices;
        returns the step's terms [P, len(BUDGET_TERMS)].

        ``weights``, ``exp_avgs``, ``second_moments`` are flat, in the planned order;
        ``t_after`` and ``t_before`` the tensors' step counters stacked after and before the step
        (on the device), ``hv`` the :meth:`step_vector`."""
        acc = (sums, nonfinite, norm2)
        if self.kernel == "compiled" and not _COMPILE_FAILED:
            try:
                return self._run_compiled(weights, exp_avgs, second_moments, t_after, t_before, hv, acc)
            except Exception as exc:  # no compiler, an unsupported backend: the eager pass gives the same sums
                _compile_failed(exc)
        return self._run_eager(weights, exp_avgs, second_moments, t_after, t_before, hv, acc)

    def _run_compiled(self, weights, exp_avgs, second_moments, t_after, t_before, hv, acc):
        if self._fns is None:
            tag = next(_PLANS)
            self._fns = [_compile_chunk(f"{tag}_{i}", self.device) for i in range(len(self.chunks))]
        if len(self.chunks) == 1:
            return self._fns[0](weights, exp_avgs, second_moments, t_after, t_before, hv, *self.chunks[0][1:], *acc)
        out = [fn(weights[c[0]], exp_avgs[c[0]], second_moments[c[0]], t_after[c[0]], t_before[c[0]], hv, *c[1:], *acc)
               for fn, c in zip(self._fns, self.chunks)]
        return torch.cat(out)

    def _packed_small(self) -> PackedSmall | None:
        if self._small is None:
            small = [k for k, n in enumerate(self._numels) if n < SMALL]
            self._small = PackedSmall(small, [self._numels[k] for k in small], self.device) if small else False
        return self._small or None

    def dots(self, weights, exp_avgs, second_moments, hv: torch.Tensor) -> torch.Tensor:
        """The eager reference pass: (||w'||², <w', ũ>, ||ũ||²) per tensor [P, 3] float64."""
        eps = hv[self.eidx]  # ε' per tensor
        if self.kernel == "foreach":
            return step_dots(weights, exp_avgs, second_moments, eps, method="foreach")
        dots = torch.empty(self.size, 3, dtype=torch.float64, device=self.device)
        small, big = self._packed_small(), self._big
        if small is not None:
            pick = lambda xs: [xs[k] for k in small.members]  # noqa: E731
            dots.index_copy_(0, small.index, small.dots(pick(weights), pick(exp_avgs), pick(second_moments),
                                                        eps.index_select(0, small.index)))
        if big:
            pick = lambda xs: [xs[k] for k in big]  # noqa: E731
            dots.index_copy_(0, self._big_index, step_dots(pick(weights), pick(exp_avgs), pick(second_moments),
                                                           eps.index_select(0, self._big_index), method="exact"))
        return dots

    def _run_eager(self, weights, exp_avgs, second_moments, t_after, t_before, hv, acc):
        dots = self.dots(weights, exp_avgs, second_moments, hv)
        return _accumulate(dots, t_after, t_before, hv, self.gidx, self.widx, self.b1idx, self.fidx, self.bidx,
                           self.index, *acc)


def _compile_failed(exc: Exception) -> None:
    global _COMPILE_FAILED
    _COMPILE_FAILED = True
    logger.warning("weight forces: torch.compile of the planned force pass failed (%s: %s); using the eager pass",
                   type(exc).__name__, exc)
