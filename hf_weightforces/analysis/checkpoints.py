"""Stream the weights of a saved model, one tensor at a time, without unpickling arbitrary objects.

Accepted inputs (:func:`iter_tensors`):

* a model folder or a Trainer ``checkpoint-N`` folder holding, in this order of preference,
  ``model.safetensors``, ``model.safetensors.index.json`` (sharded), ``pytorch_model.bin`` or
  ``pytorch_model.bin.index.json`` (sharded); failing those, every ``*.safetensors`` file in it;
* a single ``.safetensors`` file, a ``.bin`` / ``.pt`` / ``.pth`` file, or an index ``.json``.

safetensors files are checked with ``safe_open`` (it validates the header) and each tensor is then read
with a plain file read into memory of its own, one at a time: a tensor the caller lets go is freed at
once.  (``safe_open``'s tensors are views of a map of the whole file, and every page a caller has read
stays in the process's resident memory until the file is closed: a 0.5 GB matrix read, sorted and
dropped still counted 0.5 GB while the next statistics ran.)  torch files are
read with ``torch.load(..., weights_only=True, mmap=True)`` (``mmap`` only for the zip format), so a
file that pickles anything other than tensors and plain containers is refused, never executed.
Every problem with the input (missing or unreadable path, no weights, corrupt or truncated file, a
non-weights pickle, a file or index holding no tensors, an index naming a missing shard or one
outside its folder) raises one error
type, :class:`CheckpointError`, whose message names the path and the cause.  Only regular files
are opened (a FIFO or device named ``*.safetensors`` is refused, never waited on), and an index
reads shards only from its own folder (symlinks there, as in the Hub cache, are followed).
torch is imported when the first tensor is read, not before.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import pickle
import re
import stat
import sys
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["WEIGHT_FILES", "CheckpointError", "iter_tensors", "read_step", "weight_files"]

log = logging.getLogger(__name__)

PathLike = str | Path

#: Weight files looked for in a folder, in order of preference (the Hugging Face names).
WEIGHT_FILES: tuple[str, ...] = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_TORCH_SUFFIXES = (".bin", ".pt", ".pth")
#: safetensors dtype names -> torch dtype names (the format stores every dtype little-endian).
_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                       "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
                       "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "U16": "uint16", "U32": "uint32",
                       "U64": "uint64"}
_CHECKPOINT_RE = re.compile(r"checkpoint-(\d+)")


class CheckpointError(ValueError):
    """A weights path that cannot be read; the message names the path and the reason."""


def _kind(p: Path) -> str:
    """``"file"``, ``"folder"`` or ``"other"`` (FIFO, device, socket); CheckpointError naming the
    cause when ``p`` cannot be looked at (missing is not the same as unreadable)."""
    try:
        mode = os.stat(p).st_mode
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            raise CheckpointError(f"{p}: no such file or folder") from None
        raise CheckpointError(f"{p}: cannot be read ({exc.strerror or exc})") from None
    if stat.S_ISREG(mode):
        return "file"
    return "folder" if stat.S_ISDIR(mode) else "other"


def _regular(p: Path) -> bool:
    try:
        return stat.S_ISREG(os.stat(p).st_mode)
    except OSError:
        return False


def weight_files(path: PathLike) -> list[Path]:
    """The weight files (or the one index file) that :func:`iter_tensors` reads for ``path``."""
    p = Path(path)
    kind = _kind(p)
    if kind == "file":
        return [p]
    if kind == "other":
        raise CheckpointError(f"{p}: not a regular file or folder (a FIFO, device or socket is never read)")
    if not os.access(p, os.R_OK | os.X_OK):
        raise CheckpointError(f"{p}: cannot be read (permission denied)")
    for name in WEIGHT_FILES:
        if _regular(p / name):
            return [p / name]
    loose = sorted(f for f in p.glob("*.safetensors")
                   if not f.name.startswith("weightforces_") and _regular(f))  # not our probe state
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
        log.info("reading %s", file)
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

    if not _regular(file):
        raise CheckpointError(f"{file}: not a regular file")
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f, open(file, "rb", buffering=0) as raw:
            keys = list(f.keys())
            if names is not None:
                missing = sorted(set(names) - set(keys))
                if missing:
                    raise CheckpointError(
                        f"{file}: index names tensors missing from this shard: {missing[:5]}"
                    )
                keys = names
            if not keys:
                raise CheckpointError(f"{file}: holds no tensors")
            layout = _safetensors_layout(raw)
            for key in keys:  # no local keeps a tensor: one the caller lets go is freed at once
                yield key, _read_safetensor(raw, layout, key, f)
    except CheckpointError:
        raise
    except Exception as exc:  # safetensors raises its own SafetensorError, plus OSError
        raise CheckpointError(f"{file}: not a readable safetensors file ({_first_line(exc)})") from exc


def _safetensors_layout(raw) -> tuple[int, dict] | None:
    """(where the data buffer starts, the header) of a safetensors file ``safe_open`` has accepted
    (so the header is valid: offsets inside the file, no overlaps); ``None`` on a big-endian host,
    whose tensors are then read through ``safe_open`` (it converts the byte order)."""
    if sys.byteorder != "little":
        return None
    raw.seek(0)
    size = int.from_bytes(raw.read(8), "little")
    header = json.loads(raw.read(size))
    return 8 + size, header if isinstance(header, dict) else {}


def _read_safetensor(raw, layout: tuple[int, dict] | None, key: str, handle) -> torch.Tensor:
    """Tensor ``key`` read from the open file ``raw`` into a buffer of its own (no map of the file, so
    no page of it stays resident after the tensor is freed).  Anything this plain read does not
    handle (a big-endian host, a dtype this torch lacks, an entry that does not add up) is read
    through the ``safe_open`` ``handle`` instead."""
    import torch

    info = layout[1].get(key) if layout is not None else None
    dtype = getattr(torch, _SAFETENSORS_DTYPES.get(info.get("dtype"), ""), None) if isinstance(info, dict) else None
    if not isinstance(dtype, torch.dtype):
        return handle.get_tensor(key)
    shape, (begin, end) = info["shape"], info["data_offsets"]
    if math.prod(shape) * dtype.itemsize != end - begin:
        return handle.get_tensor(key)
    start = layout[0]
    buffer = torch.empty(end - begin, dtype=torch.uint8)
    view, done = memoryview(buffer.numpy()), 0
    raw.seek(start + begin)
    while done < view.nbytes:
        got = raw.readinto(view[done:])
        if not got:
            raise EOFError(f"the file ends inside tensor {key!r}")
        done += got
    return buffer.view(dtype).reshape(shape)


def _load_torch(file: Path) -> object:
    """``torch.load`` restricted to tensors and plain containers (``weights_only=True``)."""
    import torch

    if not _regular(file):
        raise CheckpointError(f"{file}: not a regular file")
    try:  # mmap needs the zip format; legacy files load eagerly
        mmap = zipfile.is_zipfile(file)
    except Exception as exc:  # BadZipFile and others, raised while telling the format
        raise CheckpointError(f"{file}: not a readable torch weights file ({_first_line(exc)})") from exc
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


def _flatten(obj: object, prefix: str = "", depth: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors of a loaded state dict; nested dicts (``{"state_dict": {...}}``) get dotted names."""
    import torch

    if isinstance(obj, torch.Tensor):
        yield prefix.rstrip("."), obj
    elif isinstance(obj, Mapping) and depth < 32:  # deeper nesting is no state dict
        for key, value in obj.items():
            yield from _flatten(value, f"{prefix}{key}.", depth + 1)


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
    if not _regular(file):
        raise CheckpointError(f"{file}: not a regular file")
    try:
        index = json.loads(file.read_text(encoding="utf-8"))
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError("weight_map is not an object of tensor name -> shard file name")
    except Exception as exc:
        raise CheckpointError(f"{file}: not a valid weights index ({_first_line(exc)})") from exc
    if not weight_map:
        raise CheckpointError(f"{file}: the index's weight_map is empty (it names no tensors)")
    shards: dict[str, list[str]] = {}
    for tensor_name, shard in weight_map.items():
        shards.setdefault(shard, []).append(str(tensor_name))
    for shard in shards:  # check every shard before yielding anything
        if not _inside(shard):
            raise CheckpointError(f"{file}: index names shard {shard!r}, outside the index's folder; refused")
        if not os.path.exists(file.parent / shard):  # False for any OSError (a name too long, ...)
            raise CheckpointError(f"{file}: index names shard {shard!r}, which does not exist")
        if not _regular(file.parent / shard):
            raise CheckpointError(f"{file}: index names shard {shard!r}, which is not a regular file")
    for shard, names in shards.items():
        shard_file = file.parent / shard
        if shard_file.suffix == ".safetensors":
            yield from _iter_safetensors(shard_file, names)
        elif shard_file.suffix in _TORCH_SUFFIXES:
            yield from _iter_torch(shard_file, names)
        else:
            raise CheckpointError(f"{file}: shard {shard!r} has an unrecognised type")


def _inside(shard: str) -> bool:
    """A relative path that stays in the index's folder (no absolute path, drive or ``..``)."""
    if not shard or "\x00" in shard:
        return False
    for pure in (PurePosixPath(shard), PureWindowsPath(shard)):
        if pure.is_absolute() or pure.drive or pure.root or ".." in pure.parts:
            return False
    return True


def read_step(path: PathLike) -> int | None:
    """Training step of a checkpoint: from a ``checkpoint-N`` folder name, else ``global_step`` in
    its ``trainer_state.json``; ``None`` when neither exists (a file's folder is looked at)."""
    p = Path(path)
    folder = p if p.is_dir() else p.parent
    match = _CHECKPOINT_RE.fullmatch(folder.name)
    if match:
        return int(match.group(1))
    state = folder / "trainer_state.json"
    if _regular(state):
        try:
            step = json.loads(state.read_text(encoding="utf-8")).get("global_step")
        except (OSError, ValueError, AttributeError, RecursionError) as exc:
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
