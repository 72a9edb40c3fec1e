"""Trajectory-geometry probes for :class:`~hf_weightforces.integrations.callback.WeightForcesCallback`
(SPEC section 7): the AdamW backbone and per-layer rank statistics, in the same rows as the forces.

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
backbone estimate (every ``every`` steps) transfers the m × m Gram matrices once: 7-9 ms.

:class:`RankProbe` computes, at the first log event at or after every ``every`` steps (and at the
first one), the singular values of each layer's attention and MLP matrices, one matrix at a time,
and of the per-head key-query products: about 3 ms per 256 × 256 float32 matrix on one CPU
thread, 160 ms for the whole bench model.

Under a sharded backend (FSDP, DeepSpeed ZeRO) both probes switch themselves off with one warning
for now: they need whole matrices (ranks) or a fixed coordinate sample of the full tensors
(backbone), which the sharded readers do not expose yet.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import warnings

import numpy as np
import torch

from ..core.geometry import FUSED_LAYOUTS, BackboneStats, BackboneTracker, coordinate_sample, layer_spectra, matrix_role, rank_rows
from ..core.groups import GROUPS, TOTAL

__all__ = ["BackboneProbe", "RankProbe"]

logger = logging.getLogger(__name__)


def _positive(label: str, value: int, low: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{label} must be an integer >= {low}, got {value!r}")
    return value


def _warn_sharded(name: str, backend: str) -> None:
    msg = (f"{name}: not available under {backend} yet (needs whole tensors); switched off for this run. "
           "The force budget is unaffected.")
    logger.warning(msg)
    warnings.warn(msg, RuntimeWarning, stacklevel=3)


class BackboneProbe:
    """The AdamW "backbone": the top singular direction of the stacked displacements from the
    start of training, with its null beside every figure (SPEC section 7; Xu, arXiv:2602.23696).

    Args:
        every: estimate the backbone every ``every`` optimizer steps (a multiple of
            ``snapshot_every``).  Per-step |cos| are measured against the latest estimate, so they
            start after the first one.
        snapshot_every: store the displacement from the start every N steps (and at each estimate);
            when ``capacity`` are held every other one is dropped and the interval doubles, so the
            stack always spans the whole run.
        capacity: most snapshots held (even, >= 4).
        coords: most sampled coordinates per weight class (a class with fewer is taken whole).
        seed: seed of the coordinate sample (the same as the offline ``geometry`` command's).

    Keys, per class G present and ``total`` (``weightforces/backbone/G/...``): at the first log
    event after each estimate ``fraction``, ``fraction_null``, ``fraction_score``, ``stability``,
    ``stability_null``, ``msd_ratio``, ``snapshots``, ``coords``; at every log event with measured
    steps ``update_cos``, ``grad_cos`` (mean |cos| per step) and ``cos_floor``;
    ``weightforces/backbone/start_step`` (where displacements are measured from).

    Resuming from a checkpoint continues the trajectory: the initial sample, the previous one, the
    snapshot stack, the step-size record of the null and the latest backbone are saved with each
    checkpoint (:meth:`tensors_state`, written by the callback as safetensors) and ``start_step``
    stays at the run's start.  Without them (an older checkpoint, an unreadable file, another
    coordinate sample) the trajectory restarts at the resume step, with a warning, and
    ``start_step`` says so in the rows.
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
        if ctx.backend.sharded:
            if ctx.is_main:
                _warn_sharded("BackboneProbe", ctx.backend.value)
            return
        if not ctx.computes:
            return
        blocks, parts, scales = [], [], []
        self._device = entries[0].param.device if entries else torch.device("cpu")
        for group in GROUPS:
            members = [(e, i) for e, i in zip(entries, infos) if i.group == group]
            if not members:
                continue
            sample = coordinate_sample([e.name for e, _ in members], [e.numel for e, _ in members],
                                       self.coords, self.seed)
            size = 0
            for (entry, _), (idx, scale) in zip(members, sample):
                if idx.numel() == 0:
                    continue
                parts.append((entry.param, idx.to(entry.param.device)))
                scales.append(torch.full((idx.numel(),), scale, dtype=torch.float32, device=self._device))
                size += idx.numel()
            blocks.append((group, size))
        self._parts = parts
        self.names = [name for name, _ in blocks] + [TOTAL]
        self.sizes = [size for _, size in blocks]
        self._scale = torch.cat(scales)
        device = self._device
        self.tracker = BackboneTracker(blocks, self._scale, self.capacity, total=TOTAL)
        self._block_id = torch.cat([torch.full((s,), b, dtype=torch.long, device=device) for b, s in enumerate(self.sizes)])
        self._x0 = self._gather(p.detach() for p, _ in parts)
        self._x_prev = self._x0.clone()
        self._cumvar = torch.zeros(len(blocks), dtype=torch.float64, device=device)
        nb = len(self.names)
        self._upd = torch.zeros(nb, dtype=torch.float64, device=device)
        self._grad = torch.zeros(nb, dtype=torch.float64, device=device)
        self._n_upd = self._n_grad = 0
        self.start_step = int(state.global_step)
        self._interval = self.snapshot_every
        self._next_snapshot = self.start_step + self._interval
        self._pending: dict | None = None
        self._floor: dict[str, float] = {}
        self._on = True
        logger.info("backbone probe: %d sampled coordinates in %s, %.1f MB", self.tracker.K, self.names[:-1],
                    self.memory_bytes() / 2**20)

    def memory_bytes(self) -> int:
        """Bytes held on the device: stack, directions, samples, scales and indices."""
        if self.tracker is None:
            return 0
        K, nb = self.tracker.K, len(self.names)
        return 4 * K * (self.capacity + 2 * nb + 3) + 16 * K + 8 * self.capacity * nb

    def _gather(self, tensors) -> torch.Tensor:
        """The weighted sample of ``tensors`` (one per part; None for a missing gradient)."""
        pieces = []
        for t, (p, idx) in zip(tensors, self._parts):
            if t is None:
                pieces.append(torch.zeros(idx.numel(), dtype=torch.float32, device=self._device))
            else:  # (a model spread over devices: the sample lives on the first one)
                pieces.append(t.reshape(-1).index_select(0, idx).to(self._device, torch.float32, non_blocking=True))
        return torch.cat(pieces) * self._scale

    def _block_norms2(self, x: torch.Tensor) -> torch.Tensor:
        """||x||² per class, then the total (float64, on the device)."""
        per = torch.zeros(len(self.sizes), dtype=torch.float64, device=x.device)
        per.index_add_(0, self._block_id, x.double() ** 2)
        return torch.cat([per, per.sum().reshape(1)])

    def _abs_cos(self, x: torch.Tensor, n2: torch.Tensor) -> torch.Tensor:
        dots = (self.tracker.directions @ x).double()  # float32 products: ~1e-6 relative, plenty for a cosine
        return dots.abs() / n2.sqrt().clamp_min(1e-300)

    # ------------------------------------------------------------------ hooks
    def on_gradients(self, step_id: int, model, optimizer) -> None:
        if not self._on or self.tracker.directions is None:
            return
        g = self._gather(p.grad for p, _ in self._parts)
        n2 = self._block_norms2(g)
        self._grad += torch.where(n2 > 0, self._abs_cos(g, n2), torch.zeros_like(n2))
        self._n_grad += 1

    def on_step(self, step_id: int, optimizer, skipped: bool) -> None:
        if not self._on or skipped:
            return
        x = self._gather(p.detach() for p, _ in self._parts)
        delta = x - self._x_prev
        self._x_prev = x
        n2 = self._block_norms2(delta)
        self._cumvar += n2[:-1]
        if self.tracker.directions is not None:
            self._upd += torch.where(n2 > 0, self._abs_cos(delta, n2), torch.zeros_like(n2))
            self._n_upd += 1
        due = (step_id - self.start_step) % self.every == 0
        if step_id >= self._next_snapshot or due:
            if self.tracker.add(step_id, x - self._x0, self._cumvar.clone()):
                self._interval *= 2
            self._next_snapshot = step_id + self._interval
        if due:
            stats = self.tracker.estimate()
            self._pending = {"step": step_id, "stats": stats}
            self._floor = {name: s.cos_floor for name, s in stats.items()}

    def collect(self, step: int) -> dict[str, float]:
        if not self._on:
            return {}
        out: dict[str, float] = {"weightforces/backbone/start_step": float(self.start_step)}
        if self._pending is not None:
            for name, stats in self._pending["stats"].items():
                out.update({f"weightforces/backbone/{name}/{k}": v for k, v in stats.to_row().items()})
            for name, size in zip(self.names, self.sizes + [sum(self.sizes)]):
                out[f"weightforces/backbone/{name}/coords"] = float(size)
            self._pending = None
        if self._n_upd or self._n_grad:
            host = torch.cat([self._upd, self._grad]).cpu().tolist()
            nb = len(self.names)
            for b, name in enumerate(self.names):
                if self._n_upd:
                    out[f"weightforces/backbone/{name}/update_cos"] = host[b] / self._n_upd
                if self._n_grad:
                    out[f"weightforces/backbone/{name}/grad_cos"] = host[nb + b] / self._n_grad
                out[f"weightforces/backbone/{name}/cos_floor"] = self._floor.get(name, math.nan)
            self._upd.zero_()
            self._grad.zero_()
            self._n_upd = self._n_grad = 0
        return out

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """Scalars (JSON); the tensors are in :meth:`tensors_state`."""
        if not self._on:
            return {"probe": "backbone", "start_step": getattr(self, "start_step", 0)}
        pending = None
        if self._pending is not None:
            pending = {"step": self._pending["step"],
                       "stats": {name: dataclasses.asdict(st) for name, st in self._pending["stats"].items()}}
        return {
            "probe": "backbone", "start_step": self.start_step, "names": self.names, "sizes": self.sizes,
            "coords": self.coords, "seed": self.seed, "capacity": self.capacity, "interval": self._interval,
            "next_snapshot": self._next_snapshot, "times": list(self.tracker.times), "n_upd": self._n_upd,
            "n_grad": self._n_grad, "floor": dict(self._floor), "pending": pending,
        }

    def tensors_state(self) -> dict[str, torch.Tensor]:
        """What continuing the trajectory exactly needs besides :meth:`state_dict` (copies)."""
        if not self._on:
            return {}
        tr = self.tracker
        m = len(tr.times)
        out = {"x0": self._x0, "x_prev": self._x_prev, "cumvar": self._cumvar, "upd": self._upd,
               "grad": self._grad, "stack": tr.stack[:m], "stack_cumvar": tr.cumvar[:m]}
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
            reason = "initial weights not in the checkpoint"
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
        tr, K, nb = self.tracker, self.tracker.K, len(self.sizes)
        times = [int(t) for t in state["times"]]
        m = len(times)
        if m > self.capacity:
            raise ValueError(f"{m} snapshots, capacity {self.capacity}")
        shapes = {"x0": (K,), "x_prev": (K,), "cumvar": (nb,), "upd": (nb + 1,), "grad": (nb + 1,),
                  "stack": (m, K), "stack_cumvar": (m, nb)}
        if "directions" in tensors:
            shapes["directions"] = (nb + 1, K)
        if "prev_cumvar" in tensors:
            shapes["prev_cumvar"] = (nb + 1, tensors["prev_cumvar"].shape[-1])
        for key, shape in shapes.items():
            if tuple(tensors[key].shape) != shape:
                raise ValueError(f"{key} has shape {tuple(tensors[key].shape)}, expected {shape}")
        pending = state.get("pending")
        if pending is not None:
            pending = {"step": int(pending["step"]),
                       "stats": {name: BackboneStats(**st) for name, st in pending["stats"].items()}}
        floor = {str(k): float(v) for k, v in state.get("floor", {}).items()}
        interval, next_snapshot = int(state["interval"]), int(state["next_snapshot"])
        n_upd, n_grad, start = int(state["n_upd"]), int(state["n_grad"]), int(state["start_step"])

        dev = self._device
        f32 = {k: tensors[k].to(dev, torch.float32) for k in ("x0", "x_prev", "stack")}
        f64 = {k: tensors[k].to(dev, torch.float64) for k in ("cumvar", "upd", "grad", "stack_cumvar")}
        self._x0, self._x_prev = f32["x0"], f32["x_prev"]
        self._cumvar, self._upd, self._grad = f64["cumvar"], f64["upd"], f64["grad"]
        tr.stack.zero_()
        tr.cumvar.zero_()
        tr.stack[:m] = f32["stack"]
        tr.cumvar[:m] = f64["stack_cumvar"]
        tr.times = times
        tr.directions = tensors["directions"].to(dev, torch.float32) if "directions" in tensors else None
        prev = tensors.get("prev_cumvar")
        tr._prev_cumvar = None if prev is None else [row.copy() for row in prev.double().cpu().numpy()]
        self._n_upd, self._n_grad = n_upd, n_grad
        self.start_step, self._interval, self._next_snapshot = start, interval, next_snapshot
        self._pending, self._floor = pending, floor


class RankProbe:
    """Condensation and key-query rank collapse per attention layer (SPEC section 7).

    Args:
        every: compute at the first log event at or after every ``every`` optimizer steps (and at
            the first log event of the run).
        per_head: also log every head's key-query spectrum (``kq/head_HH/...``).
        num_heads, num_kv_heads, layout: the attention geometry; read from the model's config at
            the first step when not given (``layout`` is ``gpt_neox`` or ``gpt2`` for fused QKV
            weights, from ``config.model_type``).  Without them fused weights are reported whole
            (``qkv``) and no key-query products are formed.

    Keys ``weightforces/rank/layer_NN/<role>/<stat>`` with stat in ``stable_rank``,
    ``effective_rank``, ``top_share`` and role ``q``, ``k``, ``v``, ``kq`` (mean over heads),
    ``kq/head_HH`` and each outer matrix by its name in the layer (``attention.dense``,
    ``mlp.dense_h_to_4h``, ...); ``weightforces/rank/all/<q|k|kq|outer>/<stat>``: means over layers
    (``outer``: v and the transmission matrices).
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
        if ctx.backend.sharded:
            if ctx.is_main:
                _warn_sharded("RankProbe", ctx.backend.value)
            return
        if not ctx.computes:
            return
        self.layers: dict[int, dict[str, torch.Tensor]] = {}
        for entry, info in zip(entries, infos):
            if info.layer is None or len(entry.shape) != 2 or info.group not in ("selection", "value", "transmission"):
                continue
            role = matrix_role(entry.name, info.group)
            if role is not None:
                self.layers.setdefault(info.layer, {})[role] = entry.param
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
        fused = any("qkv" in mats for mats in self.layers.values())
        if (fused and self.layout is None or not self.num_heads) and not self._warned:
            self._warned = True
            logger.warning("rank probe: attention heads unknown (num_heads=%s, layout=%s); no key-query "
                           "products, fused QKV weights reported whole", self.num_heads, self.layout)
        with torch.no_grad():
            return rank_rows({
                layer: layer_spectra({role: p.detach() for role, p in mats.items()}, self.num_heads,
                                     self.num_kv_heads, self.layout, self.per_head)
                for layer, mats in self.layers.items()
            })

    def state_dict(self) -> dict:
        return {"probe": "rank", "next": getattr(self, "_next", 0)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("probe") == "rank":
            self._next = int(state.get("next", 0))

