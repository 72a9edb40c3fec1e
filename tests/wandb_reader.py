"""Read back what a W&B run wrote to its local transaction log (``run-<id>.wandb``).

wandb 0.31 writes that file from its Go core and ships no Python reader (the old
``wandb.sdk.internal.datastore`` is gone), so this is a short reader for tests. The format is the
LevelDB log format with a file header:

* header, 7 bytes: ident ``b":W&B"``, magic ``0xBEE1`` (uint16 LE), version ``0`` (uint8);
* then the file is cut into 32 KiB blocks, counted from the start of the file (the header sits
  in block 0). Each block holds records ``crc32: uint32 LE | length: uint16 LE | type: uint8 |
  data``; ``crc32`` is zlib's crc32 over the type byte then the data. A record that does not fit
  in its block is split into FIRST/MIDDLE/LAST pieces; a block tail shorter than a record header
  is zero padding.
* each reassembled record is a serialized ``wandb.proto.wandb_internal_pb2.Record``. A history
  row is a ``Record.history`` (items with ``key`` or ``nested_key`` plus ``value_json``); summary
  and config changes are ``Record.summary`` / ``Record.config`` updates.

API: :func:`find_run_files`, :func:`iter_records`, :func:`read_history`, :func:`read_summary`,
:func:`read_config`, :func:`wait_until_finished`.

Caution, observed with wandb 0.31 offline: ``wandb.finish()`` can return before wandb-core has
flushed the end of the file (a reader then sees the file cut at a 32 KiB block boundary, without
the last rows). The ``read_*`` functions therefore first wait (up to ``wait`` seconds) for the run's
``exit`` record, which wandb writes last; pass ``wait=0`` to read a live or crashed run as it is.
"""

from __future__ import annotations

import json
import struct
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "find_run_files",
    "is_finished",
    "iter_records",
    "read_config",
    "read_history",
    "read_summary",
    "wait_until_finished",
]

HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)
BLOCK_LEN = 32768
RECORD_HEADER = struct.Struct("<IHB")  # crc32, length, type
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def find_run_files(wandb_dir: str | Path) -> list[Path]:
    """The ``run-*.wandb`` files of every run (offline or online) under ``wandb_dir``.

    ``wandb_dir`` is what ``WANDB_DIR`` was (runs live in its ``wandb/`` subfolder) or that
    ``wandb/`` folder itself. Sorted by path, which is by start time for runs started in
    different seconds.
    """
    root = Path(wandb_dir)
    if (root / "wandb").is_dir():
        root = root / "wandb"
    return sorted(root.glob("*run-*/run-*.wandb"))


def _payloads(data: bytes) -> Iterator[bytes]:
    if not data.startswith(HEADER):
        raise ValueError(f"not a W&B transaction log (header {data[:7]!r})")
    pos, pending = len(HEADER), None
    while pos + RECORD_HEADER.size <= len(data):
        left = BLOCK_LEN - pos % BLOCK_LEN
        if left < RECORD_HEADER.size:  # block trailer: zero padding
            pos += left
            continue
        crc, length, kind = RECORD_HEADER.unpack_from(data, pos)
        start = pos + RECORD_HEADER.size
        chunk = data[start : start + length]
        if kind == 0 and length == 0:  # zero-filled rest of a block (preallocated tail)
            pos += left
            continue
        if len(chunk) < length:  # the writer is still appending this record
            return
        if zlib.crc32(chunk, zlib.crc32(bytes([kind]))) != crc:
            raise ValueError(f"crc mismatch in record at byte {pos}")
        pos = start + length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = [chunk]
        elif kind in (MIDDLE, LAST) and pending is not None:
            pending.append(chunk)
            if kind == LAST:
                yield b"".join(pending)
                pending = None
        else:
            raise ValueError(f"unexpected record type {kind} at byte {pos}")


def iter_records(run_file: str | Path) -> Iterator[Any]:
    """Every ``wandb_internal_pb2.Record`` in the file, in write order."""
    from wandb.proto import wandb_internal_pb2

    for payload in _payloads(Path(run_file).read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        yield record


def is_finished(run_file: str | Path) -> bool:
    """Whether the file already holds the run's ``exit`` record (written when the run ends)."""
    return any(record.WhichOneof("record_type") == "exit" for record in iter_records(run_file))


def wait_until_finished(run_file: str | Path, timeout: float = 30.0) -> Path:
    """Wait until :func:`is_finished`; ``TimeoutError`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not is_finished(run_file):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no exit record in {run_file} after {timeout} s")
        time.sleep(0.05)
    return Path(run_file)


def _key(item) -> str:
    return item.key if item.key else "/".join(item.nested_key)


def read_history(run_file: str | Path, wait: float = 30.0) -> list[dict[str, Any]]:
    """One dict per history row, in order: ``{key: value}`` with values decoded from JSON and
    nested keys joined with ``"/"`` (``{"a": {"b": 1}}`` reads as ``{"a/b": 1}``). Rows include
    W&B's own ``_step``, ``_timestamp``, ``_runtime``. ``wait``: see the module docstring."""
    if wait > 0:
        wait_until_finished(run_file, wait)
    rows = []
    for record in iter_records(run_file):
        if record.WhichOneof("record_type") == "history":
            rows.append({_key(item): json.loads(item.value_json) for item in record.history.item})
    return rows


def _fold_updates(run_file: str | Path, kind: str, wait: float) -> dict[str, Any]:
    if wait > 0:
        wait_until_finished(run_file, wait)
    state: dict[str, Any] = {}
    for record in iter_records(run_file):
        which = record.WhichOneof("record_type")
        if which == kind:
            message = getattr(record, kind)
        elif which == "run" and record.run.HasField(kind):  # values given to wandb.init
            message = getattr(record.run, kind)
        else:
            continue
        for item in message.update:
            state[_key(item)] = json.loads(item.value_json)
        for item in message.remove:
            state.pop(_key(item), None)
    return state


def read_summary(run_file: str | Path, wait: float = 30.0) -> dict[str, Any]:
    """The run's final summary (every summary update and removal applied in order), keys flat as
    in :func:`read_history`."""
    return _fold_updates(run_file, "summary", wait)


def read_config(run_file: str | Path, wait: float = 30.0) -> dict[str, Any]:
    """The run's config: ``wandb.init(config=...)`` then every ``run.config`` update, top-level
    keys as given (values decoded from JSON; W&B adds its own ``_wandb`` key)."""
    return _fold_updates(run_file, "config", wait)
