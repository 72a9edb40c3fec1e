"""A step's force pass planned once: everything that does not change from step to step is made at
the first budget step, so a step hands the kernels only one float64 vector of the groups'
hyper-parameters (learning rates, weight decays, betas, ε, decay factors) and the step counters;
the bias corrections are computed from the counters inside the pass (docs/budget.md, section 9).

:class:`StepPlan` holds, for a fixed list of tensors on one device, the index tensors into the
monitor and into the step vector, and the pass itself.  One :meth:`StepPlan.run` gives every tensor's
budget row (:data:`~.budget.BUDGET_TERMS`) and new squared norm for the monitor, with the tensors the
step did not update (counter not moved: no gradient, a GradScaler skip inside a fused kernel) masked
out on the device: no Python work per tensor, no host synchronisation, no host-to-device copy of a
Python list.

The pass (``kernel``):

* ``exact``: :class:`~.kernels.BlockPass`, planned at the first run (small tensors packed, big ones
  read chunk by chunk in place, six or seven operations per chunk) with ε' per tensor from the counters; the
  step is a :class:`~.rows.Pending` one: its budget (:func:`step_terms`, about sixty
  operations on P-vectors) is computed at the log event for all the steps since the last one
  together, on [steps, P] tensors, so a step's own operations are the pass's and a few more;
* ``compiled`` (opt-in): :func:`_chunk_pass` through ``torch.compile``, in process: the three sums
  of every tensor and the budget in one compiled call per :data:`CHUNK` tensors,
  equal to the eager pass within 1e-6 of each sum (``tests/test_plan.py``); the first run waits
  for the compilation (seconds to tens of seconds); a failure warns once and runs ``exact``.
"""

from __future__ import annotations

import functools
import itertools
import logging
import types
from array import array
from collections.abc import Sequence

import numpy as np
import torch

from .budget import Array, budget_from_dots, decay_factor, eps_scale, namespace, unbind
from .kernels import BlockPass, block_pass, to_device
from .rows import Pending, Rows

logger = logging.getLogger(__name__)

__all__ = ["CHUNK", "HYPER_ROWS", "StepPlan", "per_tensor", "planned_terms", "step_terms"]

#: Tensors per compiled call: one graph for a whole small or mid-sized model; a large model is cut
#: into a few graphs so that each compilation stays bounded.
CHUNK = 64


#: Rows of the step vector (:meth:`StepPlan.step_vector`), G entries each: per parameter group
HYPER_ROWS = ("lr", "weight_decay", "beta1", "beta2", "eps", "factor_fl32", "factor_exact")


def per_tensor(hv: Array, gidx: Array, float64: Array | None, t_after: Array) -> Array:
    """[5, ..., P] float64, per tensor: lr, weight decay, decay factor, s = sqrt(1 - β2^t) / (1 - β1^t)
    and ε' = ε sqrt(1 - β2^t), from the step vector ``hv`` [..., 7G], each tensor's group ``gidx``,
    whether it is stored in float64 (its decay factor is exact, not float32-rounded; None: none is) and its step
    counter after the step ``t_after`` [..., P] (a leading dimension: several steps at once).  A
    handful of operations on P-vectors (inside the compiled pass too); torch tensors or, on the
    host, numpy arrays (:func:`step_terms`)."""
    xp = namespace(hv)
    lr, wd, b1, b2, eps, f32, f64 = unbind(hv.reshape(*hv.shape[:-1], len(HYPER_ROWS), -1)[..., gidx], -2)
    bc1, bc2 = 1.0 - xp.stack((b1, b2)) ** t_after  # 1 - β^t, float64 (the float32 counters promoted)
    bc2 = xp.sqrt(bc2)
    return xp.stack((lr, wd, f32 if float64 is None else xp.where(float64, f64, f32), bc2 / bc1, eps * bc2))


def planned_terms(dots: Array, t_after: Array, t_before: Array, hyper: Array, norm2_before: Array) -> Array:
    """The terms [..., k, len(BUDGET_TERMS)] from the three sums [..., k, 3] and :func:`per_tensor`'s
    rows (any leading dimensions: one step or several).

    A tensor whose step counter did not move (``t_after <= t_before``) was not updated: its row
    is zero (a non-finite row of an updated tensor is the monitor's to count).  Float64 vectors
    throughout."""
    lr, wd, factor, s, _ = hyper
    terms = budget_from_dots(dots, lr, wd, s, norm2_before, factor)
    moved = t_after > t_before
    if isinstance(moved, np.ndarray) and moved.all():  # (on the host: every tensor updated, the usual step)
        return terms
    return namespace(terms).where(moved[..., None], terms, 0.0)


def step_terms(gidx: Array, float64: Array | None, dots: Array, t_after: Array, t_before: Array, hv: Array,
               start: Array, end: Array | None = None) -> tuple[Array, Array]:
    """The terms [S, P, len(BUDGET_TERMS)] of a chain of S steps of a plan's eager pass at once, and
    the squared norms [P] after its last (``gidx`` and ``float64`` the plan's; the others
    :meth:`StepPlan.run`'s inputs stacked over the steps; ``start`` [P] the squared norms before
    the first step, ``end`` [P] those after the last where they were measured, else None).

    The pass reads no ||w'||²: each step's comes from the one before by the budget identity,
    ||w'||² = c² ||w||² - η s (2<w', ũ> + η s ||ũ||²) (w = (w' + η s ũ)/c, section 4), over the
    chain at once (a_t = Q_t (a_0 - Σ_{j<=t} k_j / Q_j), Q_t the product of the c², k_t the
    subtracted term), a tensor the step did not update keeping its norm.  So every step's Δ is its
    A + I + D + R, and the chain's Δ sums to ``end - start``: the observed change when the last
    norms were measured (the monitor does at a log event), with the observed closure (rounding of
    the stored weights, a change from outside the optimizer) on the chain's last step; D and R use
    ||w_t||² from the identity, which differs from the observed by the closure so far (D by about
    2ηλ times it, far below the float32 floor).  :func:`planned_terms` of :func:`per_tensor` then.
    Torch tensors, or numpy arrays of host tensors (the monitor's flush on a CPU: the same float64
    arithmetic, IEEE-rounded alike but for the power's last bit, at a fraction of torch's cost per
    operation)."""
    if isinstance(dots, np.ndarray) and isinstance(gidx, torch.Tensor):
        gidx, float64 = gidx.numpy(), None if float64 is None else float64.numpy()
    xp = namespace(dots)
    hyper = per_tensor(hv, gidx, float64, t_after)
    lr, _, factor, s, _ = hyper
    e1, wu, uu = lr * s, dots[..., 1], dots[..., 2]
    moved = t_after > t_before
    scale = xp.where(moved, factor * factor, 1.0)
    q = xp.cumprod(scale, 0)
    after = q * (start - xp.cumsum(xp.where(moved, e1 * (wu + wu + e1 * uu), 0.0) / q, 0))
    if end is not None:
        after[-1] = end
    before = xp.concatenate((start[None], after[:-1]))
    return planned_terms(xp.stack((after, wu, uu), -1), t_after, t_before, hyper, before), after[-1]


def _chunk_pass(ws, ms, vs, t_after, t_before, hyper, norm2_before):
    """One chunk of tensors, written for inductor to fuse: the per-tensor hyper-parameters
    (:func:`per_tensor` of ``hyper`` = (step vector, groups, float64 flags, counters)), per tensor one
    read of w', m, v (exact float64 squares for ||w'||², ũ in float32, its products summed in
    float64, as the eager pass), then the chunk's :func:`planned_terms` and ||w'||².  Each tensor's three sums
    are one row made by ``cat`` of 1-element sums: inductor then computes them in one loop over the
    tensor (one read of w', m, v) and allocates no scalar buffer per sum (a compiled call pays for
    every buffer it allocates).  Measured against the other ways of writing it (three 0-d sums
    stacked; three vectors of k sums): the fastest on both models of
    ``benchmarks/overhead.py`` and the quickest to compile."""
    hyper = per_tensor(*hyper)
    # ε' in float32, made a buffer by a (trivial) reduction: inductor inlines pointwise values into
    # their readers, and would recompute pow and sqrt inside every tensor's loop over its elements
    e = torch.stack((hyper[4], hyper[4])).amin(0).to(torch.float32)
    rows = []
    for k, (w, m, v) in enumerate(zip(ws, ms, vs)):
        w64 = w.to(torch.float64)
        u = (m / (torch.sqrt(v) + e[k])).to(torch.float64)
        rows.append(torch.cat(((w64 * w64).sum(0, keepdim=True), (w64 * u).sum(0, keepdim=True),
                               (u * u).sum(0, keepdim=True))))
    dots = torch.stack(rows)
    return planned_terms(dots, t_after, t_before, hyper, norm2_before), dots[:, 0]


_COMPILE_FAILED = False


def _compile_chunk(tag: str, device: torch.device):
    """:func:`_chunk_pass` through ``torch.compile``.  Each chunk gets its own code object, so
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
    over are flat).  Per step, :meth:`step_vector` turns the groups' hyper-parameters into one float64
    vector, and :meth:`run` adds the step's budget to the accumulators."""

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
        self.n_groups = n_groups
        n = len(indices)
        vec = lambda xs, dtype=torch.float64: to_device(torch.tensor(list(xs), dtype=dtype), dev)  # noqa: E731
        self.index = vec(indices, torch.long)
        self._groups = [int(g) for g in groups]
        self.gidx = vec(groups, torch.long)  # each tensor's group: its column of the step vector
        self.f64 = vec(float64, torch.bool)  # stored in float64: the exact decay factor
        #: a pending step's terms (:func:`step_terms` of this plan): what a step the monitor keeps holds
        #: of the plan (not the plan, its pass and the tensors it reads, which a new plan may replace)
        host = dev.type == "cpu"  # (the monitor evaluates a CPU plan's pending steps in numpy)
        flags = (self.f64.numpy() if host else self.f64) if any(float64) else None
        self.terms = functools.partial(step_terms, self.gidx.numpy() if host else self.gidx, flags)
        # each tensor's β2 and ε in the step vector (rows 3 and 4 of HYPER_ROWS): ε' for the pass
        self._b2_eps = vec([3 * n_groups + g for g in groups] + [4 * n_groups + g for g in groups], torch.long)
        # contiguous chunks of at most CHUNK tensors, their slices of every per-tensor vector
        self.chunks = []
        for a in range(0, n, CHUNK):
            sl = slice(a, min(a + CHUNK, n))
            self.chunks.append((sl, self.gidx[sl], self.f64[sl]))
        self._fns: list | None = None  # the compiled chunks, made at the first compiled step
        # step_vector on CPU: the last hyper-parameters, learning rates and vector, the groups' weight
        # decays and fixed rows
        self._hv_hypers: list | None = None
        self._hv_lrs: list | None = None
        self._hv: array | None = None
        self._hv_wd: list | None = None
        self._hv_fixed: list | None = None
        # the eager pass: planned at its first run over the weights it is handed (the caller's
        # planned lists, the same objects step after step)
        self._block: BlockPass | None = None
        self._block_of: Sequence[torch.Tensor] | None = None

    def step_vector(self, lrs: Sequence[float | torch.Tensor],
                    hypers: Sequence[tuple[float, float, float, float]]) -> torch.Tensor | array:
        """[7G] float64 on the plan's device (rows :data:`HYPER_ROWS`): each group's lr, weight decay,
        β1, β2, ε, read at this step (a schedule may move any of them), and its decay factor
        rounded to float32 and exact; ``hypers`` are the groups' (weight decay, β1, β2, ε).  Per
        group, not per tensor: the bias corrections come from the counters inside the pass.  Host
        lrs: computed in Python and sent as one tensor (pinned, non-blocking on an accelerator);
        an lr tensor on the accelerator: computed there, no host synchronisation.  On CPU with float
        lrs the vector wraps a plain buffer (no torch operation: making a tensor from a list costs
        more than the rest of the step's bookkeeping right after a training step), and while no
        hyper-parameter moved the last one is handed out again.  A vector is never written after it
        is handed out (a pending step keeps it until the log event).

        That plain buffer is what a CPU step returns (``array("d")``, no tensor: the monitor's flush
        reads the pending steps' vectors as numpy arrays, :meth:`eps_now` as numbers); elsewhere a
        tensor."""
        if self.device.type == "cpu" and all(type(x) is float for x in lrs):
            if hypers != self._hv_hypers:  # (rare) a schedule moved a decay, a beta or ε: the fixed rows again
                self._hv_hypers, self._hv_lrs = list(hypers), None
                self._hv_wd = [float(h[0]) for h in hypers]
                self._hv_fixed = [float(h[j]) for j in range(4) for h in hypers]  # weight decay, β1, β2, ε
            if lrs != self._hv_lrs:
                exact = [1.0 - x * w for x, w in zip(lrs, self._hv_wd)]  # decay_factor's, all groups at once
                # a plain buffer the tensor keeps, no numpy call: right after a training step each call
                # into numpy costs ~10 µs
                values = array("d", [*lrs, *self._hv_fixed, *array("f", exact), *exact])  # "f": rounded to float32
                self._hv_lrs, self._hv = list(lrs), values
            return self._hv
        hypers = [tuple(float(x) for x in h) for h in hypers]
        columns = list(zip(*hypers))  # weight decay, β1, β2, ε: G each
        if not any(isinstance(x, torch.Tensor) and x.device.type != "cpu" for x in lrs):
            lr = [float(x) for x in lrs]
            f32 = [decay_factor(x, wd, torch.float32) for x, wd in zip(lr, columns[0])]
            f64 = [decay_factor(x, wd, torch.float64) for x, wd in zip(lr, columns[0])]
            return to_device(torch.tensor([*lr, *(x for c in columns for x in c), *f32, *f64], dtype=torch.float64),
                             self.device)
        lr = torch.stack([x.to(self.device, torch.float64).reshape(()) if isinstance(x, torch.Tensor)
                          else to_device(torch.tensor(float(x), dtype=torch.float64), self.device) for x in lrs])
        per_group = to_device(torch.tensor(columns, dtype=torch.float64), self.device)  # [4, G]
        exact = 1.0 - lr * per_group[0]
        return torch.cat((lr, per_group.reshape(-1), exact.to(torch.float32).to(torch.float64), exact))

    def run(
        self,
        weights: Sequence[torch.Tensor],
        exp_avgs: Sequence[torch.Tensor],
        second_moments: Sequence[torch.Tensor],
        t_after: torch.Tensor,
        t_before: torch.Tensor,
        hv: torch.Tensor | array,
        norm2_before: torch.Tensor | None,
    ) -> Rows | Pending:
        """The step's budget of the planned tensors; ``norm2_before`` [P] are their squared norms
        observed before the step, in the planned order, on the plan's device, or None where the step
        continues the monitor's chain of this plan's steps (the monitor's
        :meth:`~.monitor.ForceMonitor.before` of :attr:`index`; the compiled pass always gets them).

        ``weights``, ``exp_avgs``, ``second_moments`` are flat, in the planned order;
        ``t_after`` and ``t_before`` the tensors' step counters stacked after and before the step
        (on the device), ``hv`` the :meth:`step_vector`.  The eager pass returns a
        :class:`~.rows.Pending` step: its three sums now, its terms (:func:`step_terms`) with the
        interval's other steps at the monitor's flush; the compiled pass, whose budget comes out
        of the same fused call, returns the :class:`~.rows.Rows`."""
        if self.kernel == "compiled" and not _COMPILE_FAILED:
            try:
                if self._fns is None:  # compiled here, at this first call (the step waits)
                    tag = next(_PLANS)
                    self._fns = [_compile_chunk(f"{tag}_{i}", self.device) for i in range(len(self.chunks))]
                if isinstance(hv, array):
                    hv = torch.frombuffer(hv, dtype=torch.float64)
                return Rows(self.index, *self._call(self._fns, weights, exp_avgs, second_moments, t_after, t_before,
                                                    hv, norm2_before))
            except Exception as exc:  # no compiler, an unsupported backend: the eager pass gives the same sums
                _compile_failed(exc)
        dots = self.dots(weights, exp_avgs, second_moments, self.eps_now(hv, t_after))
        return Pending(self.index, (dots, t_after, t_before, hv), norm2_before, self.terms, self._block.measure)

    def eps_now(self, hv: torch.Tensor | array, t_after: torch.Tensor) -> torch.Tensor | list[float] | float:
        """ε' = ε sqrt(1 - β2^t) per tensor (what the pass needs of the step vector), where the
        step vector and the counters are: on the host, host numbers, as the per-tensor path computes
        them (:func:`~.budget.eps_scale`; no torch operation: right after a training step each kind
        of operation costs 8-20 µs the first time, docs/budget.md), one number when every tensor
        has it (one counter, every group the same β2 and ε: the usual step), else one per tensor
        (one value per group and counter); on a device, a float64 [P] vector, as
        :func:`per_tensor`."""
        if isinstance(hv, array) or (hv.device.type == "cpu" and t_after.device.type == "cpu"):
            h = hv if isinstance(hv, array) else hv.tolist()
            ts, g_rows = t_after.tolist(), self.n_groups
            b2s, epss = h[3 * g_rows : 4 * g_rows], h[4 * g_rows : 5 * g_rows]
            if ts.count(ts[0]) == len(ts) and b2s.count(b2s[0]) == g_rows and epss.count(epss[0]) == g_rows:
                return eps_scale(ts[0], b2s[0], epss[0])
            memo, eps = {}, []
            for g, t in zip(self._groups, ts):
                e = memo.get((g, t))
                if e is None:
                    e = memo[g, t] = eps_scale(t, b2s[g], epss[g])
                eps.append(e)
            return eps
        b2, eps = hv.index_select(0, self._b2_eps).view(2, -1)
        return eps * (1.0 - b2**t_after).sqrt()  # float64: the counters are promoted

    def _chunk_args(self, weights, exp_avgs, second_moments, t_after, t_before, hv, norm2_before) -> list[tuple]:
        """Each chunk's arguments of :func:`_chunk_pass`."""
        if len(self.chunks) == 1:
            return [(weights, exp_avgs, second_moments, t_after, t_before, (hv, self.gidx, self.f64, t_after),
                     norm2_before)]
        return [(weights[sl], exp_avgs[sl], second_moments[sl], t_after[sl], t_before[sl], (hv, g, f, t_after[sl]),
                 norm2_before[sl]) for sl, g, f in self.chunks]

    def _call(self, fns, *step) -> tuple[torch.Tensor, torch.Tensor]:
        args = self._chunk_args(*step)
        if len(fns) == 1:
            return fns[0](*args[0])
        terms, norm2 = zip(*(fn(*a) for fn, a in zip(fns, args)))
        return torch.cat(terms), torch.cat(norm2)

    def dots(self, weights, exp_avgs, second_moments, eps: torch.Tensor | list[float] | float) -> torch.Tensor:
        """The eager pass: (0, <w', ũ>, ||ũ||²) per tensor [P, 3] float64 (||w'||² comes from the
        budget identity: :func:`step_terms`); ``eps`` the tensors' ε' (:meth:`eps_now`).  Planned at
        the first call, again only when handed other lists."""
        if self._block is None or self._block_of is not weights:  # the first budget step's pass, where it read these
            self._block, self._block_of = block_pass(weights, exp_avgs, second_moments), weights
        return self._block.run(eps, norms=False)


def _compile_failed(exc: Exception) -> None:
    global _COMPILE_FAILED
    _COMPILE_FAILED = True
    logger.warning("weight forces: torch.compile of the planned force pass failed (%s: %s); using the eager pass",
                   type(exc).__name__, exc)
