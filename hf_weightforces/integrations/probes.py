"""Trajectory-geometry probes for :class:`~hf_weightforces.integrations.callback.WeightForcesCallback`
(docs/geometry.md): the AdamW backbone and per-layer rank statistics, in the same rows as the forces.

Usage::

    from hf_weightforces import WeightForcesCallback
    from hf_weightforces.integrations.probes import BackboneProbe, RankProbe

    cb = WeightForcesCallback(probes=[BackboneProbe(every=100), RankProbe(every=500)])

:class:`BackboneProbe` keeps a seeded coordinate subsample of every weight class (at most
``coords`` coordinates per class), the initial sample, the previous one, and a stack of at most
``capacity`` displacement snapshots, all float32 on the weights' device:
4·K·(capacity + 2·(classes + 1) + 3) + 16·K bytes, K = Σ sampled coordinates
(:meth:`BackboneProbe.memory_bytes`): 23 MiB for the tiny demo model (125k of its 130k weights),
39 MiB for the 4 × 256 bench model (210k), at most 64 MiB with the defaults and five classes.
Every optimizer step it gathers the sample of the weights (after the step) and of the gradients
(before it): a few index-selects and one (classes + 1) × K mat-vec each, no host sync; measured
on one CPU thread 2.1 ms a step (tiny) and 4.2 ms (bench, about 1.4% of its 290 ms step).  Each
backbone estimate transfers the small m × m Gram matrices once: 7-9 ms.

:class:`RankProbe` computes, at the first log event at or after every ``every`` steps (and at the
first one), the singular values of each layer's attention and MLP matrices, one matrix at a time,
and of the per-head key-query products: about 3 ms per 256 × 256 float32 matrix on one CPU
thread, 160 ms for the whole bench model.

Sharded and divided runs (FSDP1/2, DeepSpeed ZeRO-1/2/3; DDP, which divides the tensors among
its ranks).  The backbone's coordinate sample is drawn over the full tensors, as in one process,
and each rank keeps the coordinates that fall in its own pieces (K/world of them, the memory
divided alike); everything the probe reports is a sum over coordinates (the m × m Gram matrices,
per-step dot products and squared norms), so the ranks' parts travel in one small all-reduce per
log event and the numbers equal one process's.  The rank probe gathers one matrix at a time (both
projections for a layer's separate q and k), at its sparse interval only: one all-reduce of the
matrix, the memory of one matrix (two for separate q/k) on every rank for that moment; the main
rank computes the spectra.  Under a reduction a probe's hooks never raise: a failure is carried by
the flag of the next log event's all-reduce and the probe switches off on every rank together.
Its checkpoints hold scalars only (each rank has its own share of the tensors), so a resumed
sharded run restarts the backbone trajectory, with a warning.
"""

from __future__ import annotations

import logging
import math
import warnings

import numpy as np
import torch

from ..core.geometry import FUSED_LAYOUTS, BackboneTracker, coordinate_sample, layer_spectra, matrix_role, rank_rows
from ..core.groups import GROUPS, TOTAL

__all__ = ["BackboneProbe", "RankProbe"]

logger = logging.getLogger(__name__)


def _positive(label: str, value: int, low: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{label} must be an integer >= {low}, got {value!r}")
    return value


class _Collective:
    """The failure discipline of a probe whose log events reduce over ranks (docs/distributed.md).

    ``guard`` runs a hook: without a reduction errors propagate (the callback drops the probe);
    with one the first error is remembered and warned about, and the next :meth:`reduce` carries
    it as the failure flag, so every rank raises ShardFailureError there together."""

    def _init_collective(self, ctx) -> None:
        self._ctx = ctx
        self._reduces = bool(ctx.reduces)
        self._error: BaseException | None = None

    def _guard(self, fn, *args):
        if self._error is not None:
            return None
        if not self._reduces:
            return fn(*args)
        try:
            return fn(*args)
        except Exception as exc:  # told to the other ranks at the next log event
            self._error = exc
            msg = f"{type(self).__name__} failed on rank {self._ctx.rank}: {exc!r}; switching off at the next log event"
            logger.warning(msg, exc_info=True)
            warnings.warn(msg, RuntimeWarning, stacklevel=3)
            return None

    def _reduce(self, make_local, size: int, device) -> torch.Tensor:
        """Sum ``make_local()`` (float64, ``size`` long) over ranks; a host tensor."""
        flat = None
        if self._error is None:
            flat = self._guard(make_local)
        if flat is None:
            flat = torch.zeros(size, dtype=torch.float64, device=device)
        elif flat.numel() != size:  # a bug, but never a hang: the other ranks expect ``size``
            self._error = RuntimeError(f"{type(self).__name__}: a local part of {flat.numel()} values, not {size}")
            flat = torch.zeros(size, dtype=torch.float64, device=device)
        return self._ctx.all_reduce_sum(flat, failed=self._error is not None)


def _after_add(m: int, capacity: int) -> int:
    """Snapshots held after :meth:`BackboneTracker.add` (it thins a full stack to every other one)."""
    return len(range(m - 1, -1, -2)) + 1 if m == capacity else m + 1


class BackboneProbe(_Collective):
    """The AdamW "backbone": the top singular direction of the stacked displacements from the
    start of training, with its null beside every figure (docs/geometry.md; Xu, arXiv:2602.23696).

    Args:
        every: estimate the backbone at the first log event at or after every ``every`` optimizer
            steps (a multiple of ``snapshot_every``), from the snapshots held then and the
            displacement at that step.  Per-step |cos| are measured against the latest estimate,
            so they start after the first one.
        snapshot_every: store the displacement from the start every N steps (and at each estimate);
            when ``capacity`` are held every other one is dropped and the interval doubles, so the
            stack always spans the whole run.
        capacity: most snapshots held (even, >= 4).
        coords: most sampled coordinates per weight class (a class with fewer is taken whole).
        seed: seed of the coordinate sample (the same as the offline ``geometry`` command's).

    Keys, per class G present and ``total`` (``weightforces/backbone/G/...``): at each estimate
    ``fraction``, ``fraction_null``, ``fraction_score``, ``stability``, ``stability_null``,
    ``msd_ratio``, ``snapshots``, ``coords``; at every log event with measured steps
    ``update_cos``, ``grad_cos`` (mean |cos| per step with the backbone they were measured
    against) and that backbone's ``cos_floor``; ``weightforces/backbone/start_step`` (where
    displacements are measured from).

    Resuming from a checkpoint continues the trajectory: the initial sample, the previous one, the
    snapshot stack, the step-size record of the null, the latest backbone and the per-step dot
    products since the last log event are saved with each checkpoint (:meth:`tensors_state`,
    written by the callback as safetensors) and ``start_step`` stays at the run's start.  Without
    them (an older checkpoint, an unreadable file, another coordinate sample, a sharded run) the
    trajectory restarts at the resume step, with a warning, and ``start_step`` says so in the rows.
    """

    def __init__(self, every: int = 100, snapshot_every: int = 10, capacity: int = 32, coords: int = 1 << 16,
                 seed: int = 0) -> None:
        self.every = _positive("every", every)
        self.snapshot_every = _positive("snapshot_every", snapshot_every)
        if every % snapshot_every:
            raise ValueError(f"every ({every}) must be a multiple of snapshot_every ({snapshot_every})")
        if capacity < 4 or capacity % 2:
            raise ValueError(f"capacity must be an even integer >= 4, got {capacity!r}")
        self.capacity = capacity
        self.coords = _positive("coords", coords)
        self.seed = seed
        self._on = False
        self.tracker: BackboneTracker | None = None

    # ------------------------------------------------------------------ set-up
    def setup(self, entries, infos, ctx, args, state) -> None:
        self._on = False
        if not ctx.computes:
            return
        self._init_collective(ctx)
        self._entries = entries
        # DeepSpeed steps inside backward: no hook sees its gradients, so no ``grad_cos``
        self._grads = not ctx.backend.deepspeed
        self._device = entries[0].param.device if entries else torch.device("cpu")
        offsets, local = ctx.local_offsets(entries), ctx.local_weights(entries)
        blocks, parts, scales, sizes = [], [], [], []
        for group in GROUPS:
            members = [k for k, info in enumerate(infos) if info.group == group]
            if not members:
                continue
            sample = coordinate_sample([entries[k].name for k in members], [entries[k].numel for k in members],
                                       self.coords, self.seed)
            size = full = 0
            for k, (idx, scale) in zip(members, sample):
                full += idx.numel()
                lo, n = offsets[k], local[k].numel()
                idx = idx[(idx >= lo) & (idx < lo + n)] - lo  # this rank's share of the sample
                if idx.numel() == 0:
                    continue
                parts.append((k, idx.to(local[k].device)))
                scales.append(torch.full((idx.numel(),), scale, dtype=torch.float32, device=self._device))
                size += idx.numel()
            blocks.append((group, size))
            sizes.append(full)
        self._parts = parts
        self.names = [name for name, _ in blocks] + [TOTAL]
        self.sizes = sizes  # sampled coordinates per class, over all ranks
        self._scale = torch.cat(scales) if scales else torch.zeros(0, device=self._device)
        device = self._device
        self.tracker = BackboneTracker(blocks, self._scale, self.capacity, total=TOTAL)
        self._block_id = torch.cat([torch.full((s,), b, dtype=torch.long, device=device) for b, (_, s) in enumerate(blocks)])
        self._x0 = self._sample(local)
        self._x_prev = self._x0.clone()
        self._cumvar = torch.zeros(len(blocks), dtype=torch.float64, device=device)
        self._upd_rows: list[torch.Tensor] = []  # per measured step: dots with each backbone, squared norms
        self._grad_rows: list[torch.Tensor] = []
        self._n_upd = self._n_grad = 0  # host-side counts, equal on every rank whatever failed
        self.start_step = int(state.global_step)
        self._interval = self.snapshot_every
        self._next_snapshot = self.start_step + self._interval
        self._next_estimate = self.start_step + self.every
        self._m, self._last_snapshot = 0, None  # host-side mirror of the tracker's stack
        self._floor: dict[str, float] = {}
        self._on = True
        logger.info("backbone probe: %d sampled coordinates (%d on this rank) in %s, %.1f MB", sum(sizes),
                    self.tracker.K, self.names[:-1], self.memory_bytes() / 2**20)

    def memory_bytes(self) -> int:
        """Bytes held on the device: stack, directions, samples, scales and indices."""
        if self.tracker is None:
            return 0
        K, nb = self.tracker.K, len(self.names)
        return 4 * K * (self.capacity + 2 * nb + 3) + 16 * K + 8 * self.capacity * nb

    def _sample(self, tensors) -> torch.Tensor:
        """The weighted sample of this rank's pieces ``tensors`` (one per entry; None: zeros)."""
        pieces = []
        for k, idx in self._parts:
            t = tensors[k]
            if t is None:
                pieces.append(torch.zeros(idx.numel(), dtype=torch.float32, device=self._device))
            else:  # (a model spread over devices: the sample lives on the first one)
                pieces.append(t.reshape(-1).index_select(0, idx).to(self._device, torch.float32, non_blocking=True))
        if not pieces:
            return torch.zeros(0, dtype=torch.float32, device=self._device)
        return torch.cat(pieces) * self._scale

    def _block_norms2(self, x: torch.Tensor) -> torch.Tensor:
        """||x||² per class, then the total (float64, on the device)."""
        per = torch.zeros(len(self.names) - 1, dtype=torch.float64, device=x.device)
        per.index_add_(0, self._block_id, x.double() ** 2)
        return torch.cat([per, per.sum().reshape(1)])

    def _cos_row(self, x: torch.Tensor, n2: torch.Tensor | None = None) -> torch.Tensor:
        """Dot products of ``x`` with each backbone, then ||x||² per aggregate: additive over
        coordinates, so the |cos| are formed after the reduction (float32 products: ~1e-6
        relative, plenty for a cosine)."""
        n2 = self._block_norms2(x) if n2 is None else n2
        return torch.cat([(self.tracker.directions @ x).double(), n2])

    # ------------------------------------------------------------------ hooks
    def on_gradients(self, step_id: int, model, optimizer) -> None:
        if not self._on or not self._grads or self.tracker.directions is None:
            return
        self._n_grad += 1
        self._guard(lambda: self._grad_rows.append(self._cos_row(self._sample(self._ctx.local_grads(self._entries)))))

    def on_step(self, step_id: int, optimizer, skipped: bool) -> None:
        if not self._on or skipped:
            return
        measured = self.tracker.directions is not None
        self._n_upd += measured
        snapshot = step_id >= self._next_snapshot
        if snapshot:
            self._plan_snapshot(step_id)
        self._guard(self._step, step_id, measured, snapshot)

    def _step(self, step_id: int, measured: bool, snapshot: bool) -> None:
        x = self._sample(self._ctx.local_weights(self._entries))
        delta = x - self._x_prev
        self._x_prev = x
        n2 = self._block_norms2(delta)
        self._cumvar += n2[:-1]
        if measured:
            self._upd_rows.append(self._cos_row(delta, n2))
        if snapshot:
            self.tracker.add(step_id, x - self._x0, self._cumvar.clone())

    def _plan_snapshot(self, step: int) -> None:
        """The host-side bookkeeping of a snapshot (the tensors are written under the guard)."""
        if self._m == self.capacity:
            self._interval *= 2
        self._m = _after_add(self._m, self.capacity)
        self._last_snapshot = step
        self._next_snapshot = step + self._interval

    def collect(self, step: int) -> dict[str, float]:
        if not self._on:
            return {}
        estimate = step >= self._next_estimate
        snapshot = estimate and self._last_snapshot != step
        if snapshot:  # the estimate ends at the displacement of this step
            self._plan_snapshot(step)
        nb = len(self.names)
        n_upd, n_grad, m = self._n_upd, self._n_grad, self._m
        size = 2 * nb * (n_upd + n_grad) + (2 * (nb - 1) * m * m + nb * m + (nb - 1) + m * (nb - 1) if estimate else 0)

        def local_part() -> torch.Tensor:
            if snapshot:
                self.tracker.add(step, self._x_prev - self._x0, self._cumvar.clone())
            parts = [torch.stack(rows).reshape(-1) for rows in (self._upd_rows, self._grad_rows) if rows]
            if estimate:
                parts.append(self.tracker.estimate_sums())
            return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64, device=self._device)

        host = self._reduce(local_part, size, self._device).numpy()  # every rank raises together on a failure
        self._upd_rows, self._grad_rows = [], []
        self._n_upd = self._n_grad = 0
        out: dict[str, float] = {"weightforces/backbone/start_step": float(self.start_step)}
        for key, n, a in (("update_cos", n_upd, 0), ("grad_cos", n_grad, n_upd)):
            if not n:
                continue
            rows = host[2 * nb * a : 2 * nb * (a + n)].reshape(n, 2 * nb)
            dots, n2 = np.abs(rows[:, :nb]), rows[:, nb:]
            cos = np.where(n2 > 0, dots / np.sqrt(np.where(n2 > 0, n2, 1.0)), 0.0).mean(axis=0)
            for b, name in enumerate(self.names):
                out[f"weightforces/backbone/{name}/{key}"] = float(cos[b])
                out[f"weightforces/backbone/{name}/cos_floor"] = self._floor.get(name, math.nan)
        if estimate:
            self._next_estimate = self.start_step + ((step - self.start_step) // self.every + 1) * self.every
            stats = self.tracker.estimate_finish(host[2 * nb * (n_upd + n_grad) :])
            self._floor = {name: s.cos_floor for name, s in stats.items()}
            for name, s in stats.items():
                out.update({f"weightforces/backbone/{name}/{k}": v for k, v in s.to_row().items()})
            for name, size in zip(self.names, self.sizes + [sum(self.sizes)]):
                out[f"weightforces/backbone/{name}/coords"] = float(size)
        return out

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """Scalars (JSON); the tensors are in :meth:`tensors_state`."""
        if not self._on:
            return {"probe": "backbone", "start_step": getattr(self, "start_step", 0)}
        return {
            "probe": "backbone", "start_step": self.start_step, "names": self.names, "sizes": self.sizes,
            "coords": self.coords, "seed": self.seed, "capacity": self.capacity, "interval": self._interval,
            "next_snapshot": self._next_snapshot, "next_estimate": self._next_estimate,
            "times": list(self.tracker.times), "n_upd": self._n_upd, "n_grad": self._n_grad,
            "floor": dict(self._floor),
        }

    def tensors_state(self) -> dict[str, torch.Tensor]:
        """What continuing the trajectory exactly needs besides :meth:`state_dict` (copies).
        Nothing under a reduction: each rank holds its own share of the sample."""
        if not self._on or self._reduces:
            return {}
        tr = self.tracker
        m = len(tr.times)
        out = {"x0": self._x0, "x_prev": self._x_prev, "cumvar": self._cumvar, "stack": tr.stack[:m],
               "stack_cumvar": tr.cumvar[:m]}
        if self._upd_rows:
            out["upd_rows"] = torch.stack(self._upd_rows)
        if self._grad_rows:
            out["grad_rows"] = torch.stack(self._grad_rows)
        if tr.directions is not None:
            out["directions"] = tr.directions
        if tr._prev_cumvar is not None:
            out["prev_cumvar"] = torch.from_numpy(np.stack(tr._prev_cumvar))
        return {k: v.detach().clone() for k, v in out.items()}

    def load_tensors_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Keep ``tensors`` for :meth:`load_state_dict` (called after this), which applies both."""
        self._saved_tensors = dict(tensors)

    def load_state_dict(self, state: dict) -> None:
        tensors, self._saved_tensors = getattr(self, "_saved_tensors", None), None
        if not self._on or state.get("probe") != "backbone":
            return
        if tensors is not None and "times" in state:
            try:
                self._continue(state, tensors)
                logger.info("backbone probe: continuing the trajectory from step %d at step %d",
                            self.start_step, self.tracker.times[-1] if self.tracker.times else self.start_step)
                return
            except (KeyError, ValueError, TypeError, RuntimeError) as exc:
                reason = f"saved state unusable: {exc}"
        else:
            reason = "initial weights not in the checkpoint" + (" (sharded: not saved)" if self._reduces else "")
        logger.warning(
            "backbone probe: resuming at step %d; displacements are measured from here (the run "
            "started its trajectory at step %s; %s)", self.start_step, state.get("start_step"), reason,
        )

    def _continue(self, state: dict, tensors: dict[str, torch.Tensor]) -> None:
        """Validate everything, then replace the fresh state of :meth:`setup` with the saved one."""
        if list(state["names"]) != self.names or list(state["sizes"]) != self.sizes:
            raise ValueError(f"classes {state['names']} {state['sizes']} != {self.names} {self.sizes}")
        if (state.get("coords"), state.get("seed")) != (self.coords, self.seed):
            raise ValueError("a different coordinate sample (coords, seed)")
        tr, K, nb = self.tracker, self.tracker.K, len(self.names) - 1
        times = [int(t) for t in state["times"]]
        m = len(times)
        if m > self.capacity:
            raise ValueError(f"{m} snapshots, capacity {self.capacity}")
        n_upd, n_grad, start = int(state["n_upd"]), int(state["n_grad"]), int(state["start_step"])
        shapes = {"x0": (K,), "x_prev": (K,), "cumvar": (nb,), "stack": (m, K), "stack_cumvar": (m, nb)}
        if n_upd:
            shapes["upd_rows"] = (n_upd, 2 * (nb + 1))
        if n_grad:
            shapes["grad_rows"] = (n_grad, 2 * (nb + 1))
        if "directions" in tensors:
            shapes["directions"] = (nb + 1, K)
        if "prev_cumvar" in tensors:
            shapes["prev_cumvar"] = (nb + 1, tensors["prev_cumvar"].shape[-1])
        for key, shape in shapes.items():
            if tuple(tensors[key].shape) != shape:
                raise ValueError(f"{key} has shape {tuple(tensors[key].shape)}, expected {shape}")
        floor = {str(k): float(v) for k, v in state.get("floor", {}).items()}
        interval, next_snapshot = int(state["interval"]), int(state["next_snapshot"])
        next_estimate = int(state["next_estimate"])

        dev = self._device
        f32 = {k: tensors[k].to(dev, torch.float32) for k in ("x0", "x_prev", "stack")}
        f64 = {k: tensors[k].to(dev, torch.float64) for k in ("cumvar", "stack_cumvar")}
        self._x0, self._x_prev, self._cumvar = f32["x0"], f32["x_prev"], f64["cumvar"]
        tr.stack.zero_()
        tr.cumvar.zero_()
        tr.stack[:m] = f32["stack"]
        tr.cumvar[:m] = f64["stack_cumvar"]
        tr.times = times
        tr.directions = tensors["directions"].to(dev, torch.float32) if "directions" in tensors else None
        prev = tensors.get("prev_cumvar")
        tr._prev_cumvar = None if prev is None else [row.copy() for row in prev.double().cpu().numpy()]
        self._upd_rows = list(tensors["upd_rows"].to(dev, torch.float64).unbind()) if n_upd else []
        self._grad_rows = list(tensors["grad_rows"].to(dev, torch.float64).unbind()) if n_grad else []
        self._n_upd, self._n_grad = n_upd, n_grad
        self._m, self._last_snapshot = m, (times[-1] if times else None)
        self.start_step, self._interval, self._next_snapshot = start, interval, next_snapshot
        self._next_estimate, self._floor = next_estimate, floor


class RankProbe(_Collective):
    """Condensation and key-query rank collapse per attention layer (docs/geometry.md).

    Args:
        every: compute at the first log event at or after every ``every`` optimizer steps (and at
            the first log event of the run).
        per_head: also log every head's key-query spectrum (``kq/head_HH/...``).
        num_heads, num_kv_heads, layout: the attention geometry; read from the model's config at
            the first step when not given (``layout`` is ``gpt_neox`` or ``gpt2`` for fused QKV
            weights, from ``config.model_type``).  Without them fused weights are reported whole
            (``qkv``) and no key-query products are formed.  Under DeepSpeed no hook sees the model
            before a step (it steps inside backward): pass them.

    Keys ``weightforces/rank/layer_NN/<role>/<stat>`` with stat in ``stable_rank``,
    ``effective_rank``, ``top_share`` and role ``q``, ``k``, ``v``, ``kq`` (mean over heads),
    ``kq/head_HH`` and each outer matrix by its name in the layer (``attention.dense``,
    ``mlp.dense_h_to_4h``, ...); ``weightforces/rank/all/<q|k|kq|outer>/<stat>``: means over layers
    (``outer``: v and the transmission matrices).

    Under sharding each matrix is gathered whole, one at a time (a layer's separate q and k
    together), at this probe's interval only; the main rank computes the spectra.
    """

    def __init__(self, every: int = 500, per_head: bool = True, num_heads: int | None = None,
                 num_kv_heads: int | None = None, layout: str | None = None) -> None:
        self.every = _positive("every", every)
        self.per_head = per_head
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        if layout is not None and layout not in ("gpt_neox", "gpt2"):
            raise ValueError(f"layout must be 'gpt_neox' or 'gpt2', got {layout!r}")
        self.layout = layout
        self._on = False
        self._warned = False

    def setup(self, entries, infos, ctx, args, state) -> None:
        self._on = False
        if not ctx.computes:
            return
        self._init_collective(ctx)
        self._gathers = ctx.backend.sharded  # pieces on every rank: gather a matrix at a time
        self._main = ctx.is_main
        if not (self._gathers or self._main):
            return  # whole matrices (DDP): the main rank alone computes, nothing is reduced
        self._entries = entries
        self.layers: dict[int, dict[str, int]] = {}
        for k, (entry, info) in enumerate(zip(entries, infos)):
            if info.layer is None or len(entry.shape) != 2 or info.group not in ("selection", "value", "transmission"):
                continue
            role = matrix_role(entry.name, info.group)
            if role is not None:
                self.layers.setdefault(info.layer, {})[role] = k
        self._next = 0
        self._on = bool(self.layers)

    def on_gradients(self, step_id: int, model, optimizer) -> None:
        if not self._on or self.num_heads is not None or model is None:
            return
        model = getattr(model, "module", model)
        config = getattr(model, "config", None)
        if config is None:
            return
        self.num_heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
        self.num_kv_heads = getattr(config, "num_key_value_heads", None)
        if self.layout is None:
            self.layout = FUSED_LAYOUTS.get(getattr(config, "model_type", ""))

    def on_step(self, step_id: int, optimizer, skipped: bool) -> None:
        pass

    def collect(self, step: int) -> dict[str, float]:
        if not self._on or step < self._next:
            return {}
        self._next = (step // self.every + 1) * self.every
        fused = any("qkv" in roles for roles in self.layers.values())
        if (fused and self.layout is None or not self.num_heads) and not self._warned and self._main:
            self._warned = True
            logger.warning("rank probe: attention heads unknown (num_heads=%s, layout=%s); no key-query "
                           "products, fused QKV weights reported whole", self.num_heads, self.layout)
        pieces = None
        if self._gathers:
            pieces = self._guard(lambda: (self._ctx.local_weights(self._entries), self._ctx.local_offsets(self._entries)))
            if self._reduces:  # agree that every rank can gather (or raise together) before the gathers
                device = self._entries[0].param.device
                self._reduce(lambda: torch.zeros(0, dtype=torch.float64, device=device), 0, device)
        layer_rows: dict[int, dict[str, float]] = {}
        with torch.no_grad():
            for layer, roles in self.layers.items():
                row: dict[str, float] = {}
                for group in self._matrix_groups(roles):
                    mats = {role: self._matrix(roles[role], pieces) for role in group}  # collective when sharded
                    if self._main:
                        row.update(self._guard(layer_spectra, mats, self.num_heads, self.num_kv_heads, self.layout,
                                               self.per_head) or {})
                    del mats
                layer_rows[layer] = row
        if not self._main or self._error is not None:
            return {}
        return rank_rows(layer_rows)

    @staticmethod
    def _matrix_groups(roles: dict[str, int]) -> list[list[str]]:
        """The matrices of one layer in the sets spectra are computed from: one at a time, but a
        layer's separate q and k together (their key-query products)."""
        pair = ["q", "k"] if "q" in roles and "k" in roles else []
        return ([pair] if pair else []) + [[role] for role in roles if role not in pair]

    def _matrix(self, k: int, pieces) -> torch.Tensor:
        entry = self._entries[k]
        if not self._gathers:
            return entry.param.detach()
        local, offsets = pieces
        return self._ctx.full_weight(entry, local[k], offsets[k])

    def state_dict(self) -> dict:
        return {"probe": "rank", "next": getattr(self, "_next", 0)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("probe") == "rank":
            self._next = int(state.get("next", 0))
