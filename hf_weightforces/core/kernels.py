"""The per-step passes over w, m and v that give the budget's three sums per tensor (docs/budget.md).

:func:`step_dots` returns (||w'||², <w', ũ>, ||ũ||²) per tensor, :func:`squared_norms` ||w||², both
float64, on the tensors' device, with no host synchronisation.  How they run is the ``kernel``:

* ``exact`` (eager): tensors below :data:`_SMALL` elements packed into one float64 pass, larger
  ones read chunk by chunk in place (exact float64 squares for ||w'||², float32 ũ and products
  summed in float64 rows for the other two: 1e-6 relative, stated and tested);
* ``compiled``: the same sums fused by ``torch.compile`` (one kernel per big tensor, one for all
  the small ones with segment sums), cached on disk; falls back to ``exact`` if compiling fails;
* ``foreach``: multi-tensor kernels with float32-rounded norms (pre-training learning rates only);
* ``auto``: :func:`choose_kernel` at train start.

The maths that turns the sums into forces is in :mod:`hf_weightforces.core.budget`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

logger = logging.getLogger(__name__)

__all__ = ["BACKGROUND_FROM_STEPS", "COMPILE_FROM", "KERNELS", "PackedSmall", "choose_kernel", "squared_norms", "step_dots", "to_device"]


#: Elements converted to float64 at a time by the exact passes (1 MiB a float64 buffer on CPU):
#: memory stays bounded by a few chunks whatever the tensor size, and the working set stays in
#: cache.  Accelerators take larger chunks (fewer launches).
_CHUNK_CPU = 1 << 17
_CHUNK_ACCEL = 1 << 22


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A host tensor on ``device`` without a host synchronisation (pinned, non-blocking copy)."""
    device = torch.device(device)
    if device.type == "cpu" or t.device == device:
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _chunk(device: torch.device) -> int:
    return _CHUNK_CPU if device.type == "cpu" else _CHUNK_ACCEL


class _Scratch:
    """``k`` reusable float64 buffers of one chunk each, allocated once per pass."""

    def __init__(self, k: int, size: int, device: torch.device) -> None:
        self.bufs = [torch.empty(size, dtype=torch.float64, device=device) for _ in range(k)]

    def load(self, slot: int, src: torch.Tensor) -> torch.Tensor:
        """``src`` (any float dtype, flat) as float64 in buffer ``slot``: exact for float32,
        bfloat16 and float16 values."""
        buf = self.bufs[slot][: src.numel()]
        buf.copy_(src)
        return buf


#: Row length of the float32 partial sums in :func:`_rowdot` (pairwise-summed within a row, rows
#: summed in float64): relative error ~1e-8, far below what <w', ũ> and ||ũ||² need.
_ROW = 1024


def _rowdot(x: torch.Tensor, y: torch.Tensor, prod: torch.Tensor) -> torch.Tensor:
    """<x, y> of two flat float32 tensors, float64 result, through the scratch ``prod``."""
    n = x.numel()
    p = prod[:n]
    torch.mul(x, y, out=p)
    full = n - n % _ROW
    total = p[:full].view(-1, _ROW).sum(1).sum(dtype=torch.float64) if full else p.new_zeros((), dtype=torch.float64)
    return total + p[full:].sum(dtype=torch.float64) if full < n else total


#: Tensors below this many elements go through one packed pass (a handful of kernels for all of
#: them: per-tensor Python work, not arithmetic, is what small tensors cost); larger ones are
#: read chunk by chunk in place.
_SMALL = 1 << 15

_SEGMENTS: dict[tuple, torch.Tensor] = {}  # planned once per set of small tensors and device


def _segments(numels: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Tensor id of every element of the packed small tensors (cached: no per-step host copy)."""
    key = (numels, str(device))
    seg = _SEGMENTS.get(key)
    if seg is None:
        if len(_SEGMENTS) > 64:
            _SEGMENTS.clear()
        seg = to_device(torch.repeat_interleave(torch.arange(len(numels)), torch.tensor(numels)), device)
        _SEGMENTS[key] = seg
    return seg


_SPLITS: dict[tuple, tuple] = {}  # planned once per set of tensor sizes and device


def _split(numels: tuple[int, ...], device: torch.device) -> tuple[list[int], list[int], torch.Tensor, torch.Tensor]:
    """(small, big) positions and their index tensors on ``device`` (cached: no per-step host copy)."""
    key = (numels, str(device))
    hit = _SPLITS.get(key)
    if hit is None:
        if len(_SPLITS) > 64:
            _SPLITS.clear()
        small = [k for k, n in enumerate(numels) if n < _SMALL]
        big = [k for k, n in enumerate(numels) if n >= _SMALL]
        hit = _SPLITS[key] = (small, big, to_device(torch.tensor(small, dtype=torch.long), device),
                              to_device(torch.tensor(big, dtype=torch.long), device))
    return hit


class PackedSmall:
    """The eager pass over many small tensors, float64 throughout: packed into float64 buffers made
    once (with their per-tensor views), so a step is a dozen multi-tensor and flat operations
    (converting copies, ũ, three multi-tensor norms; <w', ũ> by polarisation, harmless in float64)
    with no allocation of the packed size.  ``members``: the tensors' positions in the caller's
    list (``index`` on the device)."""

    def __init__(self, members: list[int], numels: list[int], device: torch.device) -> None:
        self.members = members
        self.index = to_device(torch.tensor(members, dtype=torch.long), device)
        total = sum(numels)
        self.seg = _segments(tuple(numels), device)
        self.w, self.m, self.u, self.e = (torch.empty(total, dtype=torch.float64, device=device) for _ in range(4))
        self.views = [list(b.split(numels)) for b in (self.w, self.m, self.u)]

    def dots(self, ws, ms, vs, eps: torch.Tensor) -> torch.Tensor:
        """(||w'||², <w', ũ>, ||ũ||²) per tensor [k, 3]; ``ws``, ``ms``, ``vs`` flat, ``eps`` one
        float64 ε' per tensor on the device."""
        wv, mv, uv = self.views
        torch._foreach_copy_(wv, ws)
        torch._foreach_copy_(mv, ms)
        torch._foreach_copy_(uv, vs)
        torch.index_select(eps, 0, self.seg, out=self.e)
        self.u.sqrt_().add_(self.e)
        self.m.div_(self.u)  # ũ = m / (sqrt(v) + ε'), in m's buffer
        a = torch.stack(torch._foreach_norm(wv, 2)).square()
        c = torch.stack(torch._foreach_norm(mv, 2)).square()
        torch.add(self.w, self.m, out=self.u)  # w' + ũ: <w', ũ> by polarisation (float64)
        s = torch.stack(torch._foreach_norm(uv, 2)).square()
        return torch.stack((a, 0.5 * (s - a - c), c), dim=1)


_PACKED: dict[tuple, PackedSmall] = {}  # the per-tensor path's packed buffers, per set of sizes and device


def _dots_packed(weights, exp_avgs, second_moments, eps_terms) -> torch.Tensor:
    """:class:`PackedSmall` for the per-tensor path (buffers cached per set of tensor sizes and
    device).  ``eps_terms``: one ε' per tensor (numbers, 0-d tensors, or one float64 vector)."""
    dev = weights[0].device
    lens = tuple(w.numel() for w in weights)
    packed = _PACKED.get((lens, str(dev)))
    if packed is None:
        if len(_PACKED) >= 4:
            _PACKED.clear()
        packed = _PACKED[(lens, str(dev))] = PackedSmall(list(range(len(lens))), list(lens), dev)
    if isinstance(eps_terms, torch.Tensor):
        eps = eps_terms.to(torch.float64)
    elif all(isinstance(e, torch.Tensor) for e in eps_terms):
        eps = torch.stack([x.reshape(()).to(dev, torch.float64) for x in eps_terms])
    else:
        eps = to_device(torch.tensor([float(x) for x in eps_terms], dtype=torch.float64), dev)
    flat = lambda xs: [x.detach().reshape(-1) for x in xs]  # noqa: E731
    return packed.dots(flat(weights), flat(exp_avgs), flat(second_moments), eps)


def _dots_exact(
    weights: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    second_moments: Sequence[torch.Tensor],
    eps_terms: Sequence[float | torch.Tensor] | torch.Tensor,
) -> torch.Tensor:
    """(||w'||², <w', ũ>, ||ũ||²), one read of w, m, v, every sum accumulated in float64.

    ||w'||² decides Δ, which at fine-tuning learning rates is ~1e-8 of ||w||²: its squares are
    taken in float64 (exact for float32 values) and summed there.  <w', ũ> and ||ũ||² enter the
    forces linearly and need ~1e-8: ũ and the products stay float32 (each rounded to 6e-8,
    unbiased), summed in rows of :data:`_ROW` and the rows in float64.  Tensors below
    :data:`_SMALL` elements are packed into one pass.  Memory: chunk-sized scratch buffers (and
    the packed small tensors); no host synchronisation (sums stay on the device).
    """
    dev = weights[0].device
    small, big, small_index, big_index = _split(tuple(w.numel() for w in weights), dev)
    vector = isinstance(eps_terms, torch.Tensor)
    out = torch.zeros(len(weights), 3, dtype=torch.float64, device=dev)
    if small:
        pick = lambda xs: [xs[k] for k in small]  # noqa: E731
        eps_small = eps_terms.index_select(0, small_index) if vector else pick(eps_terms)
        out.index_copy_(0, small_index, _dots_packed(pick(weights), pick(exp_avgs), pick(second_moments), eps_small))
    if not big:
        return out
    if vector:
        eps_terms = eps_terms.to(torch.float32).unbind()
    step = _chunk(dev)
    size = min(max(weights[k].numel() for k in big), step)
    scratch = _Scratch(1, size, dev)
    u_buf = torch.empty(size, dtype=torch.float32, device=dev)
    prod = torch.empty(size, dtype=torch.float32, device=dev)
    rows = []
    for k in big:
        wf, mf, vf, e = (weights[k].detach().reshape(-1), exp_avgs[k].detach().reshape(-1),
                         second_moments[k].detach().reshape(-1), eps_terms[k])
        acc = [torch.zeros((), dtype=torch.float64, device=dev) for _ in range(3)]
        for i in range(0, wf.numel(), step):
            x = scratch.load(0, wf[i : i + step])
            acc[0] = acc[0] + torch.dot(x, x)
            n = x.numel()
            u = u_buf[:n]
            torch.sqrt(vf[i : i + step], out=u)
            u.add_(e)
            torch.div(mf[i : i + step], u, out=u)  # ũ = m / (sqrt(v) + ε')
            acc[1] = acc[1] + _rowdot(wf[i : i + step], u, prod)
            acc[2] = acc[2] + _rowdot(u, u, prod)
        rows.append(torch.stack(acc))
    out.index_copy_(0, big_index, torch.stack(rows))
    return out


#: The ways :func:`step_dots` can run (the callback's ``kernel`` argument; ``auto`` is resolved by
#: :func:`choose_kernel` at train start).
KERNELS: tuple[str, ...] = ("auto", "exact", "compiled", "background", "foreach")

#: ``auto`` compiles the pass on CPU, in a background process (``"background"``), for models of at
#: least this many trained elements (in runs of at least ``BACKGROUND_FROM_STEPS[0]`` budget steps)
#: and for any model in runs of at least ``BACKGROUND_FROM_STEPS[1]``: below that the eager pass
#: costs little in all, and the child (tens of seconds of another core) would not finish or not pay.
COMPILE_FROM = 2_000_000
BACKGROUND_FROM_STEPS = (100, 1000)

_COMPILED = None
_COMPILE_FAILED = False


def choose_kernel(kernel: str, numel: int, device: torch.device, budget_steps: int | None = None) -> str:
    """``auto``: on CPU, ``background`` (the compiled pass, built by a child process while the
    steps run eager; then the same as ``compiled``) where :data:`COMPILE_FROM` and
    :data:`BACKGROUND_FROM_STEPS` say it pays (``budget_steps`` None: not known, long enough);
    else ``exact``.  Accelerators keep the eager pass until the compiled one is measured there
    (``background`` there too: its child builds CPU packages)."""
    if torch.device(device).type != "cpu" and kernel in ("auto", "background"):
        return "exact"
    if kernel != "auto":
        return kernel
    steps = float("inf") if budget_steps is None else budget_steps
    big = numel >= COMPILE_FROM and steps >= BACKGROUND_FROM_STEPS[0]
    return "background" if big or steps >= BACKGROUND_FROM_STEPS[1] else "exact"


def _dots_one(w: torch.Tensor, m: torch.Tensor, v: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """The three sums of one flat tensor, written for ``torch.compile`` to fuse into one pass:
    exact float64 squares for ||w'||², ũ in float32, its products summed in float64."""
    w64 = w.to(torch.float64)
    u = (m / (torch.sqrt(v) + e)).to(torch.float64)
    return torch.stack(((w64 * w64).sum(), (w64 * u).sum(), (u * u).sum()))


def _dots_compiled(weights, exp_avgs, second_moments, eps_terms) -> torch.Tensor:
    """:func:`_dots_exact` through ``torch.compile``: each big tensor in one fused kernel (dynamic
    shapes: one compilation for every size), the small ones packed into one fused kernel with
    segment sums; cached on disk between runs.  ||w'||² stays exact (float64 squares); ũ is
    float32, as on the eager path's big tensors (1e-6 on <w', ũ> and ||ũ||²).  The first
    compilation costs seconds to tens of seconds, at the first budget step."""
    global _COMPILED, _COMPILE_FAILED
    if _COMPILE_FAILED:
        return _dots_exact(weights, exp_avgs, second_moments, eps_terms)
    if _COMPILED is None:
        _COMPILED = torch.compile(_dots_one, dynamic=True, fullgraph=True)
    try:
        return _run_compiled(weights, exp_avgs, second_moments, eps_terms)
    except Exception as exc:  # no compiler, an unsupported backend: the eager pass gives the same sums
        _COMPILE_FAILED = True
        logger.warning("weight forces: torch.compile of the force pass failed (%s: %s); using the eager pass",
                       type(exc).__name__, exc)
        return _dots_exact(weights, exp_avgs, second_moments, eps_terms)


def _packed_one(w: torch.Tensor, m: torch.Tensor, v: torch.Tensor, e: torch.Tensor, seg: torch.Tensor,
                n: int) -> torch.Tensor:
    """The three sums of ``n`` small tensors packed into flat ``w``, ``m``, ``v`` (``seg``: each
    element's tensor), written for ``torch.compile`` to fuse into one pass with segment sums."""
    w64 = w.to(torch.float64)
    u = (m / (torch.sqrt(v) + e)).to(torch.float64)
    z = torch.zeros(n, dtype=torch.float64, device=w.device)
    return torch.stack((z.index_add(0, seg, w64 * w64), z.index_add(0, seg, w64 * u), z.index_add(0, seg, u * u)), 1)


_COMPILED_PACKED = None


def _run_compiled(weights, exp_avgs, second_moments, eps_terms) -> torch.Tensor:
    global _COMPILED_PACKED
    dev = weights[0].device
    out = torch.zeros(len(weights), 3, dtype=torch.float64, device=dev)
    small = [k for k, w in enumerate(weights) if w.numel() < _SMALL]
    if small:
        if _COMPILED_PACKED is None:
            _COMPILED_PACKED = torch.compile(_packed_one, dynamic=False, fullgraph=True)
        flat = lambda xs: torch.cat([xs[k].detach().reshape(-1).float() for k in small])  # noqa: E731
        seg = _segments(tuple(weights[k].numel() for k in small), dev)
        e = torch.stack([torch.as_tensor(eps_terms[k], dtype=torch.float32, device=dev).reshape(()) for k in small])
        e = e[0] if all(not isinstance(eps_terms[k], torch.Tensor) for k in small) and len({eps_terms[k] for k in small}) == 1 \
            else e.index_select(0, seg)
        out[small] = _COMPILED_PACKED(flat(weights), flat(exp_avgs), flat(second_moments), e, seg, len(small))
    for k in (k for k, w in enumerate(weights) if w.numel() >= _SMALL):
        e = eps_terms[k]
        e = e.reshape(()).to(device=dev, dtype=torch.float32) if isinstance(e, torch.Tensor) else torch.tensor(float(e), device=dev)
        out[k] = _COMPILED(weights[k].detach().reshape(-1), exp_avgs[k].detach().reshape(-1),
                           second_moments[k].detach().reshape(-1), e)
    return out


def _dots_foreach(
    weights: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    second_moments: Sequence[torch.Tensor],
    eps_terms: Sequence[float | torch.Tensor],
) -> torch.Tensor:
    """Approximate accelerator path: fused multi-tensor kernels, no per-tensor launches.

    <w', ũ> comes from the polarisation ||w' + ũ||² = ||w'||² + 2<w', ũ> + ||ũ||².  The kernels
    square in the input precision, so norms carry float32 rounding (~1e-7 relative): fine at
    pre-training learning rates, not at fine-tuning ones (use the default exact path there).
    """
    if isinstance(eps_terms, torch.Tensor):
        eps_terms = list(eps_terms.to(torch.float32).unbind())
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
    """||w||² per tensor, float64 [P]: exact squares, float64 sums, bounded memory.

    The same arithmetic as the ``||w'||²`` column of :func:`step_dots`, so the norm observed
    before a step and the one after it are compared like with like.
    """
    if not weights:
        return torch.zeros(0, dtype=torch.float64)
    if method == "foreach":
        return torch.stack(torch._foreach_norm([w.detach().float() for w in weights], 2, dtype=torch.float64)).square()
    dev = weights[0].device
    step = _chunk(dev)
    scratch = _Scratch(1, min(max(1, max(w.numel() for w in weights)), step), dev)
    out = []
    for w in weights:
        wf = w.detach().reshape(-1)
        acc = torch.zeros((), dtype=torch.float64, device=w.device)
        for i in range(0, wf.numel(), step):
            x = scratch.load(0, wf[i : i + step])
            acc += torch.dot(x, x)
        out.append(acc)
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
    host synchronisation happens here.  ``method``: ``"exact"`` (the default, ``"auto"``),
    ``"compiled"`` (the same sums, one fused kernel per big tensor through ``torch.compile``) or
    ``"foreach"`` (fewer kernels, float32-rounded norms; see :func:`_dots_foreach`).
    """
    if not weights:
        return torch.zeros(0, 3, dtype=torch.float64)
    if method in ("auto", "exact", "loop", "background"):  # "auto" here: resolve it with choose_kernel first
        return _dots_exact(weights, exp_avgs, second_moments, eps_terms)
    if method == "compiled":
        return _dots_compiled(weights, exp_avgs, second_moments, eps_terms)
    if method == "foreach":
        return _dots_foreach(weights, exp_avgs, second_moments, eps_terms)
    raise ValueError(f"unknown method {method!r}; expected 'auto', 'exact', 'compiled' or 'foreach'")
