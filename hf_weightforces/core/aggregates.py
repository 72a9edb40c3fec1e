"""Aggregates: which tensors each reported name covers (SPEC sections 3 and 11).

:class:`ParamInfo` holds the static facts about one monitored tensor; :func:`aggregate_masks`
turns a list of them into name -> boolean mask, the one place the aggregate key names
(classes, ``total``, ``layer_NN``, ``matrix/<name>``) are made, live and offline.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .groups import GROUPS, TOTAL

__all__ = ["ParamInfo", "aggregate_masks"]


@dataclass(frozen=True)
class ParamInfo:
    """Static facts about one monitored parameter (full, unsharded sizes)."""

    name: str
    group: str
    layer: int | None
    numel: int


def aggregate_masks(infos: Sequence, per_layer: bool = True, per_matrix: bool = False) -> dict[str, np.ndarray]:
    """Name → boolean mask over tensors (anything with ``group``, ``layer``, ``name``): the classes
    present, ``total``, then ``layer_NN`` and ``matrix/<name>``.  The one place these key names
    are made, live and offline."""
    groups = np.array([i.group for i in infos])
    out: dict[str, np.ndarray] = {g: groups == g for g in GROUPS if (groups == g).any()}
    out[TOTAL] = np.ones(len(infos), dtype=bool)
    if per_layer:
        layers = sorted({i.layer for i in infos if i.layer is not None})
        width = max(2, len(str(layers[-1]))) if layers else 2
        for layer in layers:
            out[f"layer_{layer:0{width}d}"] = np.array([i.layer == layer for i in infos])
    if per_matrix:
        for k, info in enumerate(infos):
            mask = np.zeros(len(infos), dtype=bool)
            mask[k] = True
            out[f"matrix/{info.name}"] = mask
    return out
