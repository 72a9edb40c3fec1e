"""The per-step pass over w, m and v that gives the budget's three sums per tensor (docs/budget.md,
section 9).

:class:`BlockPass` returns (||w'||², <w', ũ>, ||ũ||²) per tensor, :func:`squared_norms` ||w||²,
both float64, on the tensors' device, with no host synchronisation.  One design on every device:

* tensors below :data:`SMALL` elements are packed into a buffer made once (:class:`PackedSmall`):
  about a dozen flat operations for all of them, however many;
* larger tensors are cut, once, into about equal chunks of at most :func:`chunk_size` elements
  (cache-sized on a CPU, large on an accelerator), each viewed as rows; a step is six operations per
  chunk (seven on a CPU, whose square root is two: :func:`root`) in one scratch buffer made once:
  ũ = m / (sqrt(v) + ε') in float32, ||ũ||² as float32 row norms, then <w', ũ> as float32 row sums
  of products, the rows summed in float64 at the end (1e-6 relative: stated and tested);
* ||w'||² is :func:`squared_norms`' (exact squares, float64 sums, one multi-tensor norm over pieces),
  where it is asked for: the planned pass's steps take it from the budget identity instead, and the
  monitor measures it where a chain of them ends (docs/budget.md, section 9).

On a CPU the chunk operations run on one intra-op thread: a parallel region per operation is what
made the previous pass collapse when torch's threads outnumber the free cores (docs/budget.md).

The ways the callback can run the pass (``kernel``): ``exact`` (this pass), ``compiled`` (the same
sums fused by ``torch.compile``, in process: :mod:`.plan`) and ``auto`` (= ``exact``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence

import torch

logger = logging.getLogger(__name__)

__all__ = ["KERNELS", "SMALL", "BlockPass", "PackedSmall", "SquaredNorms", "block_pass", "chunk_size", "choose_kernel", "norm_piece",
           "root", "squared_norms", "step_dots", "to_device"]

#: Tensors below this many elements go through one packed float64 pass (per-tensor work, not
#: arithmetic, is what small tensors cost); larger ones are read in place, chunk by chunk.
SMALL = 1 << 15

#: Elements per chunk (tensors are cut into about equal chunks up to this size): on a CPU the chunk's
#: float32 scratch buffer (16 MiB) stays in the last-level cache between the seven operations
#: (measured at a Pythia-160M layout: 3.1x the floor at 1 Mi elements, 3.5x at 3 Mi, 6.9x from
#: 6 Mi; in a Trainer run 4 Mi and 3 Mi cost the same, and 4 Mi keeps the operations within ten per
#: big tensor, docs/budget.md); an accelerator takes large chunks (fewer launches; 64 MiB of scratch).
CHUNK_CPU = 4 << 20
CHUNK_ACCEL = 1 << 24

#: Longest row of the float32 partial sums (pairwise within a row, rows summed in float64):
#: relative error ~1e-8, far below what <w', ũ> and ||ũ||² need.
ROW = 1024


#: Elements per piece of the float64 norms (||w||², one multi-tensor norm over the pieces): ATen
#: widens each float32 piece to float64 in a temporary of its own before reducing it.  On a CPU a
#: piece of 2^18 elements makes a 2 MiB temporary, in cache and reused from piece to piece; a
#: chunk-sized one (24 MiB) came back from the operating system at each step's first norm, right
#: after a training step had freed its memory: 26,000 page faults a step at the Pythia-160M layout,
#: three times the norm's own time (docs/budget.md, section 9).
NORM_PIECE_CPU = 1 << 18


def chunk_size(device: torch.device | str) -> int:
    return CHUNK_CPU if torch.device(device).type == "cpu" else CHUNK_ACCEL


def norm_piece(device: torch.device | str) -> int:
    """Elements per piece of the float64 norms (:data:`NORM_PIECE_CPU` on a CPU, a chunk elsewhere)."""
    return NORM_PIECE_CPU if torch.device(device).type == "cpu" else CHUNK_ACCEL


def _chunk(device: torch.device) -> int:
    """Elements per chunk of the per-tensor float64 loops (the intended update, the observed
    update): 1 MiB a float64 buffer on a CPU."""
    return 1 << 17 if device.type == "cpu" else 1 << 22


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


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A host tensor on ``device`` without a host synchronisation (pinned, non-blocking copy)."""
    device = torch.device(device)
    if device.type in ("cpu", "meta") or t.device == device:
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


@contextlib.contextmanager
def one_thread(device: torch.device) -> Iterator[None]:
    """On a CPU, torch's intra-op threads set to one for the block (restored after, also on error):
    no operation of the pass opens a parallel region, so its cost does not explode when the
    threads outnumber the free cores.  Elsewhere nothing changes."""
    n = torch.get_num_threads() if device.type == "cpu" else 1
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _row_length(n: int) -> int:
    """The longest power of two up to :data:`ROW` that divides ``n`` (a chunk is viewed as rows)."""
    r = ROW
    while n % r:
        r //= 2
    return r


def root(v: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """sqrt(v) written into ``out`` (``v`` itself, or a buffer of v's shape).  On a CPU it is
    1 / rsqrt(v): ATen's CPU square root (MKL's vector maths) takes five times longer on zeros and
    thirty times longer on denormals than on other values, and AdamW's second moments hold zeros
    wherever a gradient never reached (the embedding rows of tokens a fine-tune never sees: 38.6M
    of the Pythia-160M layout's 162M, which made the root half of the pass's time); rsqrt does not.
    Within 2.5 float32 rounding errors of the root (2.1 measured), where torch.sqrt is within 1.5;
    0 gives 0, inf inf.  On accelerators ``torch.sqrt`` (one kernel)."""
    if out.device.type != "cpu":
        return torch.sqrt(v, out=out)
    torch.rsqrt(v, out=out)
    return out.reciprocal_()


#: Row length of the packed small tensors: each tensor starts a row and its last row is padded (w' = 0,
#: m = 0, v = 1: ũ = 0 there), so a row never straddles two tensors.
SMALL_ROW = 64


class PackedSmall:
    """The pass over many small tensors at once, the big tensors' design on one packed buffer:
    w', m and v copied by one ``cat`` into rows of :data:`SMALL_ROW` elements of a buffer made
    once, each tensor starting a row, its last row padded (w' = 0, m = 0, v = 1: ũ = 0 there), so a
    step is ten operations however many tensors (eleven on a CPU: :func:`root`), and every sum is
    a row reduction summed per tensor at the end.

    ``dtype`` is the arithmetic: float32 as on the big tensors (ũ in float32, <w', ũ> as float32
    row sums and ||ũ|| as float32 row norms, squared and summed in float64), float64 for tensors
    stored in float64 (nothing rounded).  ``members``: the tensors' positions in the caller's list,
    ``ws``, ``ms``, ``vs`` the flat tensors (the pack keeps them: their values are read at each
    :meth:`dots`), ``size`` the caller's list's length.
    Memory: 3 x the members' size in ``dtype`` (w', m, v) and a few values per row."""

    def __init__(self, members: list[int], ws: list[torch.Tensor], ms: list[torch.Tensor], vs: list[torch.Tensor],
                 device: torch.device, dtype: torch.dtype, size: int) -> None:
        self.members, self.dtype = list(members), dtype
        numels = [w.numel() for w in ws]
        rows = [max(1, -(-n // SMALL_ROW)) for n in numels]
        n_rows = sum(rows)
        pads: dict[tuple[int, float], torch.Tensor] = {}  # one padding tensor per length and value, made once
        self.sources: list[torch.Tensor] = []  # what the cat copies: w', m, v, padded to whole rows
        for xs, fill in ((ws, 0.0), (ms, 0.0), (vs, 1.0)):
            for x, n, r in zip(xs, numels, rows):
                self.sources.append(x)
                if r * SMALL_ROW > n:
                    key = (r * SMALL_ROW - n, fill)
                    if key not in pads:
                        pads[key] = torch.full((key[0],), fill, dtype=dtype, device=device)
                    self.sources.append(pads[key])
        buf = torch.empty(3, n_rows, SMALL_ROW, dtype=dtype, device=device)
        self.packed = buf.view(-1)  # the cat's output: w', m, v
        self.w, self.m, self.v = buf.unbind(0)
        # per row, float64: 0 (the caller's ||w'||² column), <w', ũ>, ||ũ||² (summed in the pack's
        # dtype first, ||ũ|| as a norm, then squared)
        self.row_sums = torch.zeros(3, n_rows, dtype=torch.float64, device=device)
        self.wu_uu, self.squared = self.row_sums[1:], self.row_sums[2]
        self.sums = self.wu_uu if dtype == torch.float64 else torch.empty(2, n_rows, dtype=dtype, device=device)
        self.wu, self.uu = self.sums.unbind(0)
        self.by_row = self.row_sums.t()  # [rows, 3], added into the caller's rows
        # each row's tensor, as a position in the caller's list (and as a column, for ε' per row)
        self.row_of = to_device(torch.repeat_interleave(torch.tensor(self.members), torch.tensor(rows)), device)
        self.row_col = self.row_of[:, None]
        self._zeros = torch.zeros(size, 3, dtype=torch.float64, device=device)  # the caller's rows; never written

    def dots(self, eps: torch.Tensor | Sequence[float], out: torch.Tensor | None) -> torch.Tensor:
        """(0, <w', ũ>, ||ũ||²) of the members added to their rows of ``out`` [P, 3] float64 (the
        caller's list; None: a new one, zero but for them) and returned; ``eps`` one ε' per tensor of
        the caller's list: host numbers, or a tensor on the device in the pack's dtype."""
        torch.cat(self.sources, out=self.packed)
        root(self.v, self.v).add_(self._eps_rows(eps))
        self.m.div_(self.v)  # ũ = m / (sqrt(v) + ε'), in m's slot
        torch.linalg.vector_norm(self.m, dim=1, out=self.uu)
        torch.mul(self.w, self.m, out=self.v)  # w' ũ, over v
        torch.sum(self.v, 1, out=self.wu)
        if self.sums is not self.wu_uu:
            self.wu_uu.copy_(self.sums)
        self.squared.square_()
        if out is None:  # out of place over zeros made once: one operation for the new tensor and the sums
            return torch.index_add(self._zeros, 0, self.row_of, self.by_row)
        return out.index_add_(0, self.row_of, self.by_row)

    def _eps_rows(self, eps: torch.Tensor | Sequence[float] | float) -> torch.Tensor | float:
        """ε' to add to every row: one number where the members share it (host values: the usual
        case, one counter and one group), else a column of one value per row."""
        if isinstance(eps, float):
            return eps
        if isinstance(eps, torch.Tensor):
            return torch.take(eps, self.row_col)
        values = {eps[k] for k in self.members}
        if len(values) == 1:
            return values.pop()
        return torch.take(to_device(torch.tensor(list(eps), dtype=self.dtype), self.w.device), self.row_col)


def _pieces(n: int, chunk: int) -> list[tuple[int, int, int]]:
    """A tensor of ``n`` elements cut into about equal chunks of at most ``chunk`` elements (starts
    on multiples of :data:`ROW`), each as (start, stop, row length): the row length is the longest
    divisor of the chunk's size up to :data:`ROW`; a chunk with no divisor of at least 64 (an odd
    size) leaves its last ``size % ROW`` elements to a one-row piece of their own."""
    ceil = lambda a, b: -(-a // b)  # noqa: E731
    step = ceil(ceil(n, ceil(n, chunk)), ROW) * ROW
    out = []
    for a in range(0, n, step):
        b = min(n, a + step)
        r = next(r for r in range(min(ROW, b - a), 0, -1) if (b - a) % r == 0)
        if r < 64 and b - a > ROW:
            cut = b - (b - a) % ROW
            out += [(a, cut, ROW), (cut, b, b - cut)]
        else:
            out.append((a, b, r))
    return out


class BlockPass:
    """(||w'||², <w', ũ>, ||ũ||²) of a fixed list of tensors, planned once (module docstring).

    ``weights``, ``exp_avgs``, ``second_moments``: the tensors (any float dtype; flattened here),
    on one device; the pass keeps views of them, so it stays valid while their storage does.  Per
    call only ε' (one value per tensor) changes.  ||w'||² is :func:`squared_norms`', the one way
    every exact squared norm is taken (before a step, after it, at a log event); a run without
    ``norms`` leaves its column 0 (the planned pass's steps take it from the budget identity,
    :func:`~.plan.step_terms`, and the monitor measures it where a chain of them ends).  Memory: one
    float32 scratch buffer of one chunk, the packed small tensors (3 x their size in float32), and a
    few floats per row of 1024."""

    def __init__(self, weights: Sequence[torch.Tensor], exp_avgs: Sequence[torch.Tensor],
                 second_moments: Sequence[torch.Tensor], chunk: int | None = None) -> None:
        flat = lambda xs: [x.detach().reshape(-1) for x in xs]  # noqa: E731
        ws, ms, vs = flat(weights), flat(exp_avgs), flat(second_moments)
        dev = ws[0].device
        self.device, self.size = dev, len(ws)
        #: the tensors' squared norms now (the first column of a run: the pieces cut once)
        self.measure = SquaredNorms(ws)
        numels = [w.numel() for w in ws]
        self._small = []  # float32 arithmetic, and float64 for tensors stored in float64
        for wide in (False, True):
            small = [k for k, n in enumerate(numels) if n < SMALL and (ws[k].dtype == torch.float64) == wide]
            if small:
                self._small.append(PackedSmall(small, *([xs[k] for k in small] for xs in (ws, ms, vs)), dev,
                                               torch.float64 if wide else torch.float32, len(ws)))
        chunk = chunk or chunk_size(dev)
        pieces = [(k, *p) for k, n in enumerate(numels) if n >= SMALL for p in _pieces(n, chunk)]
        self._steps: list[tuple] = []
        #: ε' per tensor in float32, when it comes as a tensor (what the float32 arithmetic adds)
        self.eps = torch.zeros(self.size, dtype=torch.float32, device=dev)
        if not pieces:
            return
        s = torch.empty(max(b - a for _, a, b, _ in pieces), dtype=torch.float32, device=dev)
        rows = [(b - a) // r for _, a, b, r in pieces]
        self._rows_wu = torch.empty(sum(rows), dtype=torch.float32, device=dev)  # row sums of w' ũ
        self._rows_uu = torch.empty(sum(rows), dtype=torch.float32, device=dev)  # row norms of ũ
        r0 = 0
        for (k, a, b, r), n in zip(pieces, rows):
            w, m, v = (x[a:b].view(n, r) for x in (ws[k], ms[k], vs[k]))
            self._steps.append((w, m, v, s[: b - a].view(n, r), self._rows_wu[r0 : r0 + n],
                                self._rows_uu[r0 : r0 + n], k, self.eps[k], vs[k].dtype != torch.float32))
            r0 += n
        owner = torch.tensor([k for k, *_ in pieces])
        self._row_of = to_device(torch.repeat_interleave(owner, torch.tensor(rows)), dev)  # each row's tensor

    def run(self, eps: torch.Tensor | Sequence[float] | float, norms: bool = True) -> torch.Tensor:
        """[P, 3] float64 on the device; ``eps``: each tensor's ε' = ε sqrt(1 - β2^t), as host
        numbers (counters on the host: no operation for it), one number that every tensor shares,
        or a float64 [P] tensor on the device; without ``norms`` the first column is 0."""
        out = None if self._small else torch.zeros(self.size, 3, dtype=torch.float64, device=self.device)
        host = not isinstance(eps, torch.Tensor)
        if not host:
            self.eps.copy_(eps)  # the float32 arithmetic's ε' (rounded as a number added to a float32 tensor is)
        for pack in self._small:
            out = pack.dots(eps if host or pack.dtype == torch.float64 else self.eps, out)
        if self._steps:
            self._big(out, eps, host)
        if norms:
            out[:, 0] = self.measure()
        return out

    def _big(self, out: torch.Tensor, eps: torch.Tensor | Sequence[float] | float, host: bool) -> None:
        """The big tensors' chunks, their two sums added into ``out``."""
        shared = eps if isinstance(eps, float) else None
        with one_thread(self.device):
            for w, m, v, s, rows_wu, rows_uu, k, e, widen in self._steps:
                if widen:  # v in bfloat16/float16 (or float64): its square root taken in float32, not in v's dtype
                    s.copy_(v)
                    v = s
                root(v, s).add_(shared if shared is not None else eps[k] if host else e)
                torch.div(m, s, out=s)  # ũ = m / (sqrt(v) + ε'), float32, in the one scratch buffer
                torch.linalg.vector_norm(s, dim=1, out=rows_uu)
                torch.mul(w, s, out=s)  # w' ũ over ũ: its norms are taken
                torch.sum(s, 1, out=rows_wu)
        out[:, 1].index_add_(0, self._row_of, self._rows_wu.to(torch.float64))
        out[:, 2].index_add_(0, self._row_of, self._rows_uu.to(torch.float64).square())


def _eps_values(eps_terms, n: int, device: torch.device) -> torch.Tensor | list[float]:
    """One ε' per tensor for :meth:`BlockPass.run`: numbers stay host numbers; 0-d tensors or a
    vector become one float64 vector on ``device``."""
    if isinstance(eps_terms, torch.Tensor):
        return eps_terms.to(device=device, dtype=torch.float64).reshape(n)
    if all(isinstance(e, torch.Tensor) for e in eps_terms):
        return torch.stack([e.reshape(()).to(device, torch.float64) for e in eps_terms])
    return [float(e) for e in eps_terms]


def _norm_pieces(flats: Sequence[torch.Tensor], device: torch.device) -> tuple[list[torch.Tensor], list[int]]:
    """Views of at most :func:`norm_piece` elements covering each flat tensor (an empty tensor: one
    empty view), and each view's position in ``flats``: the pieces of every float64 norm, so the
    norm observed before a step and the pass's after it are cut, and summed, alike."""
    piece = norm_piece(device)
    views, owner = [], []
    for k, x in enumerate(flats):
        for i in range(0, max(x.numel(), 1), piece):
            views.append(x[i : i + piece])
            owner.append(k)
    return views, owner


def squared_norms(weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """||w||² per tensor, float64 [P]: exact squares, float64 sums, one multi-tensor norm over
    pieces of at most :func:`norm_piece` elements (bounded temporary memory).  Every exact squared
    norm of the budget is this one (before a step, after it, at a log event): compared like with
    like.  :class:`SquaredNorms` cuts the pieces once for tensors read again and again."""
    if not weights:
        return torch.zeros(0, dtype=torch.float64)
    return SquaredNorms(weights)()


class SquaredNorms:
    """:func:`squared_norms` of a fixed list of contiguous tensors, its pieces cut once (the views
    stay valid while the tensors' storage does): a call is one multi-tensor norm and two or three
    more operations, whatever the number of tensors."""

    def __init__(self, weights: Sequence[torch.Tensor]) -> None:
        dev = weights[0].device
        self.device, self.size = dev, len(weights)
        self._pieces, owner = _norm_pieces([w.detach().reshape(-1) for w in weights], dev)
        self._index = None
        if len(self._pieces) != len(weights):
            key = (dev, *owner)  # the pieces' tensors, made once per layout (no host-to-device copy a step)
            self._index = _OWNERS.get(key)
            if self._index is None:
                if len(_OWNERS) >= 16:
                    _OWNERS.clear()
                self._index = _OWNERS[key] = to_device(torch.tensor(owner), dev)

    def __call__(self) -> torch.Tensor:
        with one_thread(self.device):
            norms = torch.stack(torch._foreach_norm(self._pieces, 2, dtype=torch.float64)).square()
        if self._index is None:
            return norms
        return torch.zeros(self.size, dtype=torch.float64, device=self.device).index_add_(0, self._index, norms)


_OWNERS: dict[tuple, torch.Tensor] = {}


def block_pass(weights: Sequence[torch.Tensor], exp_avgs: Sequence[torch.Tensor],
               second_moments: Sequence[torch.Tensor]) -> BlockPass:
    """The :class:`BlockPass` of these tensors, planned once for the memory they are in: kept for the
    next call over the same memory (a sharded backend hands the same local views every step; the
    first budget step's per-tensor pass and the planned pass of later steps read the same tensors),
    so its scratch is made once.  Tensors that are not contiguous get a pass of their own each time
    (flattening copies them: a kept pass would read a stale copy), and so do meta tensors."""
    tensors = [x for xs in (weights, exp_avgs, second_moments) for x in xs]
    if not all(x.is_contiguous() for x in tensors) or tensors[0].device.type == "meta":  # meta: no memory to key on
        return BlockPass(weights, exp_avgs, second_moments)
    key = tuple((x.data_ptr(), x.numel(), x.dtype, x.device) for x in tensors)
    block = _BLOCKS.pop(key, None)
    if block is None:
        block = BlockPass(weights, exp_avgs, second_moments)
    _BLOCKS[key] = block  # the most recently used last
    while len(_BLOCKS) > _BLOCKS_KEPT:
        _BLOCKS.pop(next(iter(_BLOCKS)))
    return block


def step_dots(
    weights: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    second_moments: Sequence[torch.Tensor],
    eps_terms: Sequence[float | torch.Tensor] | torch.Tensor,
) -> torch.Tensor:
    """Per tensor: (||w'||², <w', ũ>, ||ũ||²) as a float64 tensor of shape [P, 3], on the device.

    ``weights`` are the post-step tensors w' (any float dtype; the fp32 master where mixed
    precision keeps one), ``second_moments`` are ``exp_avg_sq`` (or ``max_exp_avg_sq`` under
    AMSGrad), and ``eps_terms[i] = ε sqrt(1-β2^t_i)``.  All tensors must share one device; no
    host synchronisation happens here.  The pass is :func:`block_pass`'s: planned once for the
    same memory, not at every step."""
    if not weights:
        return torch.zeros(0, 3, dtype=torch.float64)
    block = block_pass(weights, exp_avgs, second_moments)
    return block.run(_eps_values(eps_terms, len(weights), block.device))


#: The passes :func:`block_pass` keeps, by the memory they read (a pass holds views, so the memory
#: it reads stays allocated while it is kept: equal pointers mean the same memory): a few, enough
#: for one step's tensor sets (per device, intended and post-step, planned).
_BLOCKS: dict[tuple, BlockPass] = {}
_BLOCKS_KEPT = 4


#: The ways the pass can run (the callback's ``kernel`` argument): ``exact`` (:class:`BlockPass`),
#: ``compiled`` (the same sums fused by ``torch.compile`` in process, opt-in: :mod:`.plan`),
#: ``auto`` (= ``exact``: no compilation, no process, nothing loaded from disk).
KERNELS: tuple[str, ...] = ("auto", "exact", "compiled")


def choose_kernel(kernel: str) -> str:
    """The kernel a run uses: ``auto`` is ``exact``; the others as asked."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    return "exact" if kernel == "auto" else kernel
