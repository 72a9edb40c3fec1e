"""Stream the weights of a saved model, one tensor at a time, without unpickling arbitrary objects.

Accepted inputs (:func:`iter_tensors`):

* a model folder or a Trainer ``checkpoint-N`` folder holding, in this order of preference,
  ``model.safetensors``, ``model.safetensors.index.json`` (sharded), ``pytorch_model.bin`` or
  ``pytorch_model.bin.index.json`` (sharded); failing those, every ``*.safetensors`` file in it;
* a single ``.safetensors`` file, a ``.bin`` / ``.pt`` / ``.pth`` file, or an index ``.json``.

safetensors files are read with ``safe_open`` (one tensor materialised at a time).  torch files are
read with ``torch.load(..., weights_only=True, mmap=True)`` (``mmap`` only for the zip format), so a
file that pickles anything other than tensors and plain containers is refused, never executed.
Every problem with the input (missing path, no weights, corrupt or truncated file, a non-weights
pickle, an index naming a missing shard) raises one error type, :class:`CheckpointError`, whose
message names the path.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Union

import torch

__all__ = ["WEIGHT_FILES", "CheckpointError", "iter_tensors", "read_step", "weight_files"]

log = logging.getLogger(__name__)

PathLike = Union[str, Path]

#: Weight files looked for in a folder, in order of preference (the Hugging Face names).
WEIGHT_FILES: tuple[str, ...] = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_TORCH_SUFFIXES = (".bin", ".pt", ".pth")
_CHECKPOINT_RE = re.compile(r"checkpoint-(\d+)")


class CheckpointError(ValueError):
    """A weights path that cannot be read; the message names the path and the reason."""


def weight_files(path: PathLike) -> list[Path]:
    """The weight files (or the one index file) that :func:`iter_tensors` reads for ``path``."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or folder")
    if p.is_file():
        return [p]
    for name in WEIGHT_FILES:
        if (p / name).is_file():
            return [p / name]
    loose = sorted(f for f in p.glob("*.safetensors") if not f.name.startswith("weightforces_"))  # not our probe state
    if loose:
        return loose
    hint = ""
    subdirs = sorted(d.name for d in p.glob("checkpoint-*") if d.is_dir())
    if subdirs:
        more = ", ..." if len(subdirs) > 3 else ""
        hint = f"; it holds Trainer checkpoints ({', '.join(subdirs[:3])}{more}): pass one of them"
    looked = ", ".join(WEIGHT_FILES)
    raise CheckpointError(f"{p}: no weights found (looked for {looked} or *.safetensors){hint}")


def iter_tensors(path: PathLike) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` for every tensor stored under ``path``, one at a time, on CPU.

    Tensors keep their stored dtype (integer buffers included; callers skip what they do not
    want).  Raises :class:`CheckpointError` for any unreadable input, also midway through.
    """
    for file in weight_files(path):
        yield from _iter_file(file)


def _iter_file(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    name = file.name
    if name.endswith(".index.json") or file.suffix == ".json":
        yield from _iter_index(file)
    elif file.suffix == ".safetensors":
        yield from _iter_safetensors(file)
    elif file.suffix in _TORCH_SUFFIXES:
        yield from _iter_torch(file)
    else:
        raise CheckpointError(
            f"{file}: unrecognised weights file (expected .safetensors, .bin, .pt, .pth or an index .json)"
        )


def _iter_safetensors(
    file: Path, names: list[str] | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            keys = list(f.keys())
            if names is not None:
                missing = sorted(set(names) - set(keys))
                if missing:
                    raise CheckpointError(
                        f"{file}: index names tensors missing from this shard: {missing[:5]}"
                    )
                keys = names
            for key in keys:
                tensor = f.get_tensor(key)
                yield key, tensor
    except CheckpointError:
        raise
    except Exception as exc:  # safetensors raises its own SafetensorError, plus OSError
        raise CheckpointError(f"{file}: not a readable safetensors file ({_first_line(exc)})") from exc


def _load_torch(file: Path) -> object:
    """``torch.load`` restricted to tensors and plain containers (``weights_only=True``)."""
    mmap = zipfile.is_zipfile(file)  # mmap needs the zip format; legacy files load eagerly
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pickle-protocol notices: the error, if any, says it all
            return torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:
        if isinstance(exc, pickle.UnpicklingError) and "weights only" in str(exc).lower():
            reason = _unpickler_reason(str(exc))
            raise CheckpointError(
                f"{file}: not a weights-only torch file; refused to load it ({reason})"
            ) from exc
        raise CheckpointError(f"{file}: not a readable torch weights file ({_first_line(exc)})") from exc


def _flatten(obj: object, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors of a loaded state dict; nested dicts (``{"state_dict": {...}}``) get dotted names."""
    if isinstance(obj, torch.Tensor):
        yield prefix.rstrip("."), obj
    elif isinstance(obj, Mapping):
        for key, value in obj.items():
            yield from _flatten(value, f"{prefix}{key}.")


def _iter_torch(file: Path, names: list[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    tensors = dict(_flatten(_load_torch(file)))
    if not tensors:
        raise CheckpointError(f"{file}: holds no tensors (expected a state dict)")
    if names is not None:
        missing = sorted(set(names) - set(tensors))
        if missing:
            raise CheckpointError(f"{file}: index names tensors missing from this shard: {missing[:5]}")
        tensors = {n: tensors[n] for n in names}
    while tensors:  # pop as we go so a memory-mapped file's pages can be released
        name = next(iter(tensors))
        yield name, tensors.pop(name)


def _iter_index(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    try:
        index = json.loads(file.read_text())
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except Exception as exc:
        raise CheckpointError(f"{file}: not a valid weights index ({_first_line(exc)})") from exc
    shards: dict[str, list[str]] = {}
    for tensor_name, shard in weight_map.items():
        shards.setdefault(str(shard), []).append(str(tensor_name))
    for shard in shards:  # check every shard before yielding anything
        if not (file.parent / shard).is_file():
            raise CheckpointError(f"{file}: index names shard {shard!r}, which does not exist")
    for shard, names in shards.items():
        shard_file = file.parent / shard
        if shard_file.suffix == ".safetensors":
            yield from _iter_safetensors(shard_file, names)
        elif shard_file.suffix in _TORCH_SUFFIXES:
            yield from _iter_torch(shard_file, names)
        else:
            raise CheckpointError(f"{file}: shard {shard!r} has an unrecognised type")


def read_step(path: PathLike) -> int | None:
    """Training step of a checkpoint: from a ``checkpoint-N`` folder name, else ``global_step`` in
    its ``trainer_state.json``; ``None`` when neither exists (a file's folder is looked at)."""
    p = Path(path)
    folder = p if p.is_dir() else p.parent
    match = _CHECKPOINT_RE.fullmatch(folder.name)
    if match:
        return int(match.group(1))
    state = folder / "trainer_state.json"
    if state.is_file():
        try:
            step = json.loads(state.read_text()).get("global_step")
        except (OSError, ValueError, AttributeError) as exc:
            log.warning("%s: unreadable trainer_state.json (%s)", state, exc)
            return None
        if isinstance(step, int) and not isinstance(step, bool):
            return step
    return None


def _unpickler_reason(text: str) -> str:
    """The specific complaint inside torch's long weights-only error (which goes on to suggest
    ``weights_only=False``: advice this reader must not pass on)."""
    marker = "WeightsUnpickler error:"
    at = text.find(marker)
    if at < 0:
        return "corrupt, or holds objects other than tensors"
    rest = text[at + len(marker) :].strip()
    reason = rest.split(". ")[0].splitlines()[0].strip() if rest else ""
    return reason or "corrupt, or holds objects other than tensors"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
