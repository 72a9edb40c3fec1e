"""Where each metric key goes on a tracker's dashboard: a handful of sections that stay readable at
any depth, per-layer quantities as heat maps.

W&B's automatic workspace makes one chart per key and groups charts by the text before the first
``/``.  ``metrics.jsonl`` keeps every key under ``weightforces/...`` (its names never change); the
W&B sink and the other trackers rename the keys of the aggregates (classes, ``matrices``,
``adapters``, ``total``, ``frozen``) by topic, replacing the leading ``weightforces`` with the
section of the field::

    weightforces/total/align          -> forces/total/align
    weightforces/selection/weibull_k  -> weibull/selection/weibull_k
    weightforces/backbone/total/...   -> backbone/total/...
    weightforces/steps                -> health/steps

Per-index quantities (layers ``layer_NN``, ``encoder_layer_NN``/``decoder_layer_NN``, per-tensor
``matrix/<name>``, per-layer and per-head rank statistics) are not charts by default: they become
one heat map per quantity (row = layer or tensor, column = step) and a table, at a sparse interval
(:class:`Dashboard`); ``layer_scalars=True`` also logs them as single charts, one section per
quantity (``layer_align/layer_03``).  Constants (``numel``, the backbone's ``coords``) go to the
run's config instead of charts.  A key this map does not know keeps its name.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

__all__ = ["SECTIONS", "Dashboard", "Placement", "place", "scalar_keys", "section_of"]

PREFIX = "weightforces"

#: section -> what it holds (in the order a reader wants them).
SECTIONS: dict[str, str] = {
    "forces": "A, I, D, R and the observed Δ per aggregate, means per optimizer step",
    "shares": "shares |A|, |I|, |D| of the absolute budget per aggregate",
    "health": "closure, rounding, decay ratio, non-finite and skipped steps, bookkeeping",
    "scale": "‖w‖² and the RMS σ per aggregate",
    "weibull": "Weibull shape k, scale λ, λ/σ, fit quality per pool",
    "offset": "the RMS-to-Weibull offset components and the predicted σ",
    "backbone": "the AdamW backbone beside its random-walk nulls",
    "ranks": "layer means of stable and effective ranks, top shares",
    "layers": "heat maps (row = layer, column = step) and the per-layer table",
    "matrix": "heat maps and table per tensor (per_matrix=True)",
    "figures": "the report's figures (at train end)",
    "final": "summary values of the run (W&B summary only)",
}

_FIELD_SECTION: dict[str, str] = {
    **dict.fromkeys(("align", "inject", "decay", "rest", "delta", "align_post", "align_no_super"), "forces"),
    **dict.fromkeys(("align_share", "inject_share", "decay_share", "align_share_no_super"), "shares"),
    **dict.fromkeys(("closure", "closure_rel", "rounding", "rounding_rel", "nonfinite_steps", "decay_ratio",
                     "super_weights", "align_se", "inject_se"), "health"),
    **dict.fromkeys(("norm2", "rms"), "scale"),
    **dict.fromkeys(("rms_pred", "rms_pred_sampled"), "offset"),
}
_CONSTANTS = frozenset({"numel", "coords"})
_LAYER = re.compile(r"^(?:(?:encoder|decoder)_)?layer_\d+$")
_HEAD = re.compile(r"^(.*)/(head_\d+)/([^/]+)$")


def section_of(field: str) -> str | None:
    """The section of an aggregate's field (``align`` -> ``forces``), ``None`` when unknown."""
    if field in _FIELD_SECTION:
        return _FIELD_SECTION[field]
    if field.startswith(("weibull_", "start_weibull_")):
        return "weibull"
    if field.startswith("offset_"):
        return "offset"
    return None


class Placement(NamedTuple):
    """Where one ``metrics.jsonl`` key goes.

    ``kind`` is ``"scalar"`` (a chart named ``key``), ``"config"`` (a constant: run config
    ``weightforces.<key>``), ``"grid"`` (a cell of a heat map: ``family``, ``row``, ``quantity``,
    and ``key`` is its single-chart name when per-layer scalars are asked for) or ``"heads"`` (a
    per-head cell at the latest event: ``row`` is ``layer_NN/head_HH``).
    """

    kind: str
    key: str
    family: str = ""
    row: str = ""
    quantity: str = ""


def _scalar_name(family: str, quantity: str, row: str) -> str:
    prefix = "layer" if family == "layers" else family
    return f"{prefix}_{quantity.replace('/', '_')}/{row}"


def place(key: str) -> Placement:
    """Where ``key`` (a ``metrics.jsonl`` name) goes on a dashboard; see the module docstring."""
    parts = key.split("/")
    if parts[0] != PREFIX or len(parts) < 2:
        return Placement("scalar", key)
    rest = parts[1:]
    head = rest[0]
    if len(rest) == 1:  # weightforces/steps, weightforces/skipped_steps
        return Placement("scalar", f"health/{head}")
    if _LAYER.match(head):
        quantity = "/".join(rest[1:])
        if quantity in _CONSTANTS:
            return Placement("config", "/".join(rest))
        return Placement("grid", _scalar_name("layers", quantity, head), "layers", head, quantity)
    if head == "matrix" and len(rest) >= 3:
        name, quantity = "/".join(rest[1:-1]), rest[-1]
        if quantity in _CONSTANTS:
            return Placement("config", "/".join(rest))
        return Placement("grid", _scalar_name("matrix", quantity, name), "matrix", name, quantity)
    if head == "rank" and len(rest) >= 3:
        if _LAYER.match(rest[1]):
            quantity = "rank/" + "/".join(rest[2:])
            m = _HEAD.match(quantity)
            if m:  # rank/kq/head_03/stable_rank: a layer x head map at the latest event
                q = f"{m.group(1)}/heads/{m.group(3)}"
                return Placement("heads", f"{_scalar_name('layers', q, rest[1])}/{m.group(2)}", "layers",
                                 f"{rest[1]}/{m.group(2)}", q)
            return Placement("grid", _scalar_name("layers", quantity, rest[1]), "layers", rest[1], quantity)
        return Placement("scalar", "ranks/" + "/".join(rest[1:]))
    if head == "backbone":
        field = rest[-1]
        if field in _CONSTANTS:
            return Placement("config", "/".join(rest))
        if field in ("snapshots", "start_step"):
            return Placement("scalar", "health/" + "/".join(rest))
        return Placement("scalar", "/".join(rest))
    if len(rest) == 2:  # an aggregate's field
        if rest[1] in _CONSTANTS:
            return Placement("config", "/".join(rest))
        section = section_of(rest[1])
        if section is not None:
            return Placement("scalar", f"{section}/{head}/{rest[1]}")
    return Placement("scalar", key)


@dataclass(frozen=True)
class Dashboard:
    """What the trackers get beyond the aggregates' charts.

    Args:
        layer_scalars: also log every per-layer, per-head and per-tensor value as its own chart
            (one section per quantity; 24 layers x 15 quantities is 360 charts).
        heatmap_every: heat maps and tables of the per-layer (and per-tensor) quantities every N
            optimizer steps, and always at train end; 0: at train end only.
        figures: the report's figures (``hf-weightforces report`` without checkpoints) at train end.
        figures_every: also every N optimizer steps (0: at train end only).
        max_columns: steps kept per heat map; beyond it every second column is dropped, so memory
            and table size stay bounded on long runs.
    """

    layer_scalars: bool = False
    heatmap_every: int = 500
    figures: bool = True
    figures_every: int = 0
    max_columns: int = 256

    def __post_init__(self) -> None:
        for label, low in (("heatmap_every", 0), ("figures_every", 0), ("max_columns", 2)):
            value = getattr(self, label)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"Dashboard.{label} must be an integer >= {low}, got {value!r}")


def scalar_keys(metrics: Mapping[str, float], layer_scalars: bool = False) -> dict[str, float]:
    """The charts of one row: the renamed aggregate keys (and the per-index ones on request)."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        p = place(key)
        if p.kind == "scalar" or (layer_scalars and p.kind in ("grid", "heads")):
            out[p.key] = value
    return out
