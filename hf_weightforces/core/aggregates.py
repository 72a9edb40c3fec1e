"""Aggregates: which tensors each reported name covers (docs/aggregates.md).

:class:`ParamInfo` holds the static facts about one monitored tensor, made once at train start by
:func:`describe`; :func:`aggregate_masks` turns a list of them into name -> boolean mask, the one
place the aggregate key names are made, live and offline:

* the classes present (``transmission``, ``selection``, ``value``, ``embedding``, ``other``),
* ``matrices``: every class but ``other`` (also the pool of the Weibull fits and offsets),
* ``adapters``: the LoRA/DoRA tensors, when there are any,
* ``total``: every monitored (trained) tensor,
* ``layer_NN``, or ``encoder_layer_NN`` and ``decoder_layer_NN`` in a model with both stacks,
* ``matrix/<name>`` per tensor on request.

Every key of an aggregate's row describes exactly its mask's tensors.  Parameters the optimizer
does not train are not monitored; they are reported as ``frozen`` (norm2, numel, rms) beside.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .groups import ADAPTERS, GROUPS, MATRICES, TOTAL, Grouping, classify, is_adapter, layer_index, layer_stack

__all__ = ["ParamInfo", "aggregate_masks", "describe", "layer_keys"]


@dataclass(frozen=True)
class ParamInfo:
    """Static facts about one monitored parameter (full, unsharded sizes).

    ``adapter``: a LoRA/DoRA adapter tensor (its ``group`` is the adapted module's class);
    ``stack``: ``"encoder"``/``"decoder"`` for a layer of an encoder or decoder stack, ``""`` for
    none (``None``: not known, parsed from the name when needed).
    """

    name: str
    group: str
    layer: int | None
    numel: int
    adapter: bool = False
    stack: str | None = None


def describe(name: str, ndim: int, numel: int, grouping: Grouping | None = None) -> ParamInfo:
    """The :class:`ParamInfo` of one parameter from its name and shape (compiled rules, once)."""
    return ParamInfo(name, classify(name, ndim, grouping), layer_index(name), numel, is_adapter(name),
                     layer_stack(name) or "")


def _attr(info, field: str, parse):
    value = getattr(info, field, None)
    return parse(info.name) if value is None else value


def layer_keys(infos: Sequence) -> list[str | None]:
    """The layer aggregate of each tensor (``None`` outside layers): ``layer_NN``, or
    ``encoder_layer_NN``/``decoder_layer_NN`` when the model has both an encoder and a decoder
    stack (a decoder-only or encoder-only model keeps ``layer_NN``).  NN is zero-padded to the
    widest layer index."""
    layers = [i.layer for i in infos]
    stacks = [_attr(i, "stack", layer_stack) if lyr is not None else None for i, lyr in zip(infos, layers)]
    split = {"encoder", "decoder"} <= set(stacks)
    found = [lyr for lyr in layers if lyr is not None]
    width = max(2, len(str(max(found)))) if found else 2
    return [None if lyr is None else
            f"{stack}_layer_{lyr:0{width}d}" if split and stack else f"layer_{lyr:0{width}d}"
            for lyr, stack in zip(layers, stacks)]


def aggregate_masks(infos: Sequence, per_layer: bool = True, per_matrix: bool = False) -> dict[str, np.ndarray]:
    """Name → boolean mask over tensors (anything with ``group``, ``layer``, ``name``; ``adapter``
    and ``stack`` are parsed from the name where absent): the classes present, ``matrices``,
    ``adapters``, ``total``, then the layers and ``matrix/<name>``."""
    groups = np.array([i.group for i in infos])
    out: dict[str, np.ndarray] = {g: groups == g for g in GROUPS if (groups == g).any()}
    matrices = groups != "other"
    if matrices.any():
        out[MATRICES] = matrices
    adapters = np.array([bool(_attr(i, "adapter", is_adapter)) for i in infos], dtype=bool)
    if adapters.any():
        out[ADAPTERS] = adapters
    out[TOTAL] = np.ones(len(infos), dtype=bool)
    if per_layer:
        keys = np.array(layer_keys(infos), dtype=object)
        order = {"encoder": 0, "decoder": 1}
        for key in sorted({k for k in keys if k is not None}, key=lambda k: (order.get(k.split("_")[0], 2), k)):
            out[key] = keys == key
    if per_matrix:
        for k, info in enumerate(infos):
            mask = np.zeros(len(infos), dtype=bool)
            mask[k] = True
            out[f"matrix/{info.name}"] = mask
    return out
