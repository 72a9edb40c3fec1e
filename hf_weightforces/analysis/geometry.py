"""Trajectory geometry from a folder of checkpoints (docs/geometry.md): the backbone and rank rows.

``geometry_from_checkpoints(paths)`` reads the checkpoints in step order, one tensor at a time
(:func:`~hf_weightforces.analysis.checkpoints.iter_tensors`), and builds one row per checkpoint
with the same keys as the live probes (:mod:`hf_weightforces.integrations.probes`), so the same
plots read both:

* backbone (``weightforces/backbone/<class|total>/...``): the seeded coordinate sample of each
  weight class (the live probe's sampler, same seed, same coordinates per tensor name), the
  displacement of every checkpoint from the first one (``checkpoint-0`` if it was saved, else the
  trajectory starts at the earliest checkpoint: ``reference_step``), the backbone of the
  displacements up to each checkpoint, ``fraction`` / ``fraction_null`` / ``fraction_score``,
  ``stability`` / ``stability_null`` against the previous checkpoint's estimate, and
  ``interval_cos``: |cos| of the displacement since the previous checkpoint with the backbone
  estimated there (the checkpoint-interval analogue of the live ``update_cos``; the null is
  ``cos_floor``).  The random-walk null's step sizes follow the run's lr schedule when
  ``<run>/weightforces/schedule.jsonl`` is found (E||Δ_s||² ∝ η_s²), else a flat schedule;
  ``null_schedule`` says which.  No gradients offline, so no ``grad_cos``; no per-step sizes,
  so no ``msd_ratio``.
* ranks (``weightforces/rank/...``): every checkpoint's per-layer spectra; the attention geometry
  (heads, fused layout) comes from the checkpoint's ``config.json`` unless given.

Memory: the samples (4 bytes × coordinates × checkpoints) and, for ranks, one layer's query and
key matrices at a time.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from hf_weightforces.analysis.checkpoints import CheckpointError, PathLike, iter_tensors, read_step
from hf_weightforces.core.geometry import (
    FUSED_LAYOUTS,
    BackboneTracker,
    coordinate_sample,
    layer_spectra,
    matrix_role,
    rank_rows,
)
from hf_weightforces.core.groups import GROUPS, TOTAL, Grouping, canonical_name, layer_index

__all__ = ["GeometryReport", "checkpoint_paths", "format_table", "geometry_from_checkpoints"]


@dataclass(frozen=True)
class GeometryReport:
    """Rows (one per checkpoint, ``{"step": N, key: value}``) and how they were made."""

    paths: list[str]
    steps: list[int]
    reference_step: int
    null_schedule: str  # "schedule.jsonl" or "flat"
    coords: dict[str, int]
    num_heads: int | None
    layout: str | None
    rows: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "paths": self.paths, "steps": self.steps, "reference_step": self.reference_step,
            "null_schedule": self.null_schedule, "coords": self.coords, "num_heads": self.num_heads,
            "layout": self.layout, "rows": [{k: _json_float(v) for k, v in r.items()} for r in self.rows],
        }


def _json_float(v: float) -> float | None:
    return None if isinstance(v, float) and not math.isfinite(v) else v


def checkpoint_paths(paths: Sequence[PathLike]) -> list[tuple[int, Path]]:
    """``(step, folder)`` sorted by step: each path a checkpoint, or a run folder of ``checkpoint-N``."""
    found: list[tuple[int, Path]] = []
    for path in paths:
        p = Path(path)
        if not p.exists():
            raise CheckpointError(f"{p}: no such file or folder")
        subdirs = sorted(d for d in p.glob("checkpoint-*") if d.is_dir()) if p.is_dir() else []
        for c in subdirs or [p]:
            step = read_step(c)
            if step is None:
                raise CheckpointError(f"{c}: cannot tell its training step (no checkpoint-N name or trainer_state.json)")
            found.append((step, c))
    found.sort(key=lambda x: x[0])
    for (step, a), (next_step, b) in zip(found, found[1:]):
        if step == next_step:
            raise CheckpointError(f"{a} and {b}: both at step {step}; pass one of them")
    return found


def _schedule_cumvar(run_dirs: Sequence[Path], steps: Sequence[int]) -> tuple[np.ndarray, str]:
    """C(t_i) at the checkpoint steps, relative to the first: Σ η_s² from ``schedule.jsonl`` if
    one is found beside the checkpoints, else Σ 1 (a flat schedule)."""
    for folder in run_dirs:
        file = folder / "weightforces" / "schedule.jsonl"
        if file.is_file():
            lr2 = _read_lr2(file)
            if all(s in lr2 for t0, t1 in zip(steps, steps[1:]) for s in range(t0 + 1, t1 + 1)):
                cum = np.cumsum([0.0] + [lr2[s] for s in range(steps[0] + 1, steps[-1] + 1)])
                return cum[np.asarray(steps) - steps[0]], "schedule.jsonl"
    return np.asarray(steps, dtype=np.float64) - steps[0], "flat"


def _read_lr2(file: Path) -> dict[int, float]:
    """η² of each step of a ``schedule.jsonl`` (0 for a skipped step); CheckpointError naming the file
    and line for anything else."""
    lr2: dict[int, float] = {}
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{file}: cannot be read ({getattr(exc, 'strerror', None) or exc})") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            lr = row.get("lr") or [0.0]
            lr2[int(row["step"])] = 0.0 if row.get("skipped") else float(lr[0]) ** 2
        except (ValueError, KeyError, TypeError, AttributeError, IndexError, OverflowError, RecursionError) as exc:
            raise CheckpointError(f"{file}:{lineno}: not a schedule row ({type(exc).__name__}: {exc})") from None
    return lr2


def _config(folder: Path) -> dict:
    file = folder / "config.json" if folder.is_dir() else folder.parent / "config.json"
    try:
        return json.loads(file.read_text()) if file.is_file() else {}
    except (OSError, ValueError):
        return {}


class _Layers:
    """Per-layer spectra from a stream of tensors, keeping only a pending query (or key) matrix."""

    def __init__(self, num_heads, num_kv_heads, layout, per_head) -> None:
        self.args = (num_heads, num_kv_heads, layout, per_head)
        self.rows: dict[int, dict[str, float]] = {}
        self.pending: dict[int, dict[str, torch.Tensor]] = {}

    def add(self, layer: int, role: str, w: torch.Tensor, source: str) -> None:
        row = self.rows.setdefault(layer, {})
        if role in ("q", "k") and self.args[0]:
            pend = self.pending.setdefault(layer, {})
            pend[role] = w
            if len(pend) == 2:
                row.update(self._spectra(self.pending.pop(layer), source))
            return
        row.update(self._spectra({role: w}, source))

    def finish(self, source: str) -> dict[str, float]:
        for layer, pend in self.pending.items():  # a query without its key (or the reverse)
            self.rows[layer].update(self._spectra(pend, source))
        return rank_rows(self.rows)

    def _spectra(self, mats: dict[str, torch.Tensor], source: str) -> dict[str, float]:
        """:func:`layer_spectra`, its errors (heads that do not divide a matrix, ...) naming the file."""
        try:
            return layer_spectra(mats, *self.args)
        except (RuntimeError, ValueError) as exc:
            heads, kv, layout, _ = self.args
            shapes = ", ".join(f"{role} {'x'.join(map(str, w.shape))}" for role, w in mats.items())
            given = f"{heads} heads" + (f", {kv} key/value heads" if kv else "") + (f", layout {layout}" if layout else "")
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"{source}: cannot split its attention matrices ({shapes}) with {given}: {first} "
                                  "(check --num-heads / --layout, or pass --no-ranks)") from None


def geometry_from_checkpoints(
    paths: Sequence[PathLike],
    coords: int = 1 << 16,
    seed: int = 0,
    ranks: bool = True,
    per_head: bool = False,
    num_heads: int | None = None,
    num_kv_heads: int | None = None,
    layout: str | None = None,
    grouping: Grouping | None = None,
) -> GeometryReport:
    """Backbone and rank rows for checkpoints (``checkpoint-N`` folders, or run folders holding
    them), in step order; the first is the reference of every displacement."""
    from hf_weightforces.analysis.hub import HubCheckpoints, checkpoint_label

    hub = isinstance(paths, HubCheckpoints)  # Hub revisions: each fetched when read, in step order
    found = [(c.step, c) for c in paths] if hub else checkpoint_paths(paths)
    if len(found) < 2:
        given = paths.repo_id if hub else ", ".join(str(p) for p in paths)
        raise CheckpointError(f"{given}: need at least two checkpoints for a trajectory, found {len(found)}")
    steps = [s for s, _ in found]
    grouping = grouping or Grouping()
    config = _config(found[0][1].path if hub else found[-1][1])
    if num_heads is None:
        num_heads = config.get("num_attention_heads") or config.get("n_head")
        num_kv_heads = num_kv_heads or config.get("num_key_value_heads")
    if layout is None:
        layout = FUSED_LAYOUTS.get(config.get("model_type", ""))

    plan = None
    tracker = None
    x0 = x_prev = None
    run_dirs = [] if hub else list(dict.fromkeys(c.parent for _, c in found))
    cumvar, null_schedule = _schedule_cumvar(run_dirs, steps)
    rows: list[dict[str, float]] = []
    for i, (step, ck) in enumerate(found):
        folder = ck.path if hub else ck
        tensors: dict[str, torch.Tensor] = {}
        layers = _Layers(num_heads, num_kv_heads, layout, per_head) if ranks else None
        sample_of: dict[str, torch.Tensor] = {}
        for raw_name, t in iter_tensors(folder):
            if not t.is_floating_point():
                continue
            name = canonical_name(raw_name)
            cls = grouping.classify(name, t.ndim)
            if plan is None:
                tensors[name] = (cls, t.numel())
            elif name in plan["index"]:
                if t.numel() != plan["numel"][name]:
                    raise CheckpointError(f"{folder}: {raw_name} has {t.numel()} values, {plan['numel'][name]} at "
                                          f"the first checkpoint ({found[0][1].path if hub else found[0][1]})")
                sample_of[name] = t.reshape(-1).index_select(0, plan["index"][name]).float()
            if layers is not None and t.ndim == 2 and (layer := layer_index(name)) is not None:
                role = matrix_role(name, cls)
                if role is not None and cls in ("selection", "value", "transmission"):
                    layers.add(layer, role, t.float(), str(folder))
            del t
        if plan is None:  # the first checkpoint fixes the sample; read it again to gather
            if not tensors:
                raise CheckpointError(f"{folder}: no floating-point tensors to sample")
            plan = _plan(tensors, coords, seed)
            for raw_name, t in iter_tensors(folder):
                name = canonical_name(raw_name)
                if name in plan["index"]:
                    sample_of[name] = t.reshape(-1).index_select(0, plan["index"][name]).float()
            blocks = [(g, plan["sizes"][g]) for g in plan["groups"]]
            tracker = BackboneTracker(blocks, plan["scale"], capacity=max(4, len(found) + len(found) % 2), total=TOTAL)
        missing = [n for n in plan["order"] if n not in sample_of]
        if missing:
            raise CheckpointError(f"{folder}: tensors of the first checkpoint are missing: {missing[:5]}")
        x = torch.cat([sample_of[n] for n in plan["order"]]) * plan["scale"]
        row: dict[str, float] = {"step": step}
        if x0 is None:
            x0 = x
        else:
            if tracker.directions is not None:
                delta = x - x_prev
                dots = (tracker.directions.double() @ delta.double()).abs()
                norms = _block_norms(delta, plan)
                for b, name in enumerate(tracker.names):
                    if norms[b] > 0:
                        row[f"weightforces/backbone/{name}/interval_cos"] = float(dots[b]) / math.sqrt(norms[b])
            cv = torch.full((len(plan["groups"]),), float(cumvar[i]), dtype=torch.float64)
            tracker.add(step, x - x0, cv)
            for name, stats in tracker.estimate().items():
                stats_row = stats.to_row()
                stats_row.pop("msd_ratio")  # per-step sizes are unknown offline
                row.update({f"weightforces/backbone/{name}/{k}": v for k, v in stats_row.items()})
        x_prev = x
        if layers is not None:
            row.update(layers.finish(str(folder)))
        rows.append(row)
    sizes = {g: plan["sizes"][g] for g in plan["groups"]}
    sizes[TOTAL] = sum(sizes.values())
    return GeometryReport(
        paths=[checkpoint_label(c) if hub else str(c) for _, c in found], steps=steps, reference_step=steps[0], null_schedule=null_schedule,
        coords=sizes, num_heads=num_heads, layout=layout, rows=rows,
    )


def _plan(tensors: dict[str, tuple[str, int]], coords: int, seed: int) -> dict:
    """The coordinate sample per class (the live probe's sampler) and the concatenation order."""
    index, order, scales, sizes, groups = {}, [], [], {}, []
    for group in GROUPS:
        members = [(n, numel) for n, (cls, numel) in tensors.items() if cls == group]
        if not members:
            continue
        sample = coordinate_sample([n for n, _ in members], [k for _, k in members], coords, seed)
        size = 0
        for (name, _), (idx, scale) in zip(members, sample):
            if idx.numel():
                index[name] = idx
                order.append(name)
                scales.append(torch.full((idx.numel(),), scale, dtype=torch.float32))
                size += idx.numel()
        groups.append(group)
        sizes[group] = size
    return {"index": index, "order": order, "scale": torch.cat(scales), "sizes": sizes, "groups": groups,
            "numel": {name: numel for name, (_, numel) in tensors.items()}}


def _block_norms(x: torch.Tensor, plan: dict) -> list[float]:
    bounds = np.cumsum([0] + [plan["sizes"][g] for g in plan["groups"]])
    per = [float((x[a:b].double() ** 2).sum()) for a, b in zip(bounds, bounds[1:])]
    return per + [sum(per)]


def _num(v: float | None, spec: str) -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def format_table(report: GeometryReport) -> str:
    """A plain-text table: the total backbone beside its nulls, and the mean ranks, per checkpoint."""
    b, r = "weightforces/backbone/total/", "weightforces/rank/all/"
    header = ["step", "fraction", "null", "score", "stability", "null", "interval_cos", "floor",
              "kq srank", "q srank", "outer srank"]
    lines = [
        f"checkpoints: {len(report.steps)} (steps {report.steps[0]}..{report.steps[-1]}), displacements from step "
        f"{report.reference_step}; random-walk null schedule: {report.null_schedule}",
        "sampled coordinates: " + ", ".join(f"{k} {v}" for k, v in report.coords.items()),
        "",
        " | ".join(header),
        " | ".join("---" for _ in header),
    ]
    for row in report.rows:
        g = row.get
        lines.append(" | ".join([
            str(row["step"]), _num(g(b + "fraction"), ".3f"), _num(g(b + "fraction_null"), ".3f"),
            _num(g(b + "fraction_score"), ".3f"), _num(g(b + "stability"), ".3f"),
            _num(g(b + "stability_null"), ".3f"), _num(g(b + "interval_cos"), ".4f"), _num(g(b + "cos_floor"), ".4f"),
            _num(g(r + "kq/stable_rank"), ".2f"), _num(g(r + "q/stable_rank"), ".2f"),
            _num(g(r + "outer/stable_rank"), ".2f"),
        ]))
    return "\n".join(lines)
