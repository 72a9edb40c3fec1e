"""The record format shared by the live callback and the offline tools: JSON lines, one row per
event, ``{"step": int, key: number-or-null, ...}`` (strict JSON: non-finite numbers are null)."""

from __future__ import annotations

import json
import logging
import math
import os

__all__ = ["json_safe", "read_jsonl"]

logger = logging.getLogger(__name__)


def read_jsonl(path: str | os.PathLike, strict: bool = True) -> list[dict]:
    """Rows of a metrics.jsonl file; nulls read back as NaN.  ``strict=False`` skips a torn last line."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                if strict:
                    raise ValueError(f"{path}:{lineno}: not a JSON row ({exc})") from exc
                logger.warning("skipping unreadable row %d of %s", lineno, path)
                continue
            rows.append({k: (math.nan if v is None else v) for k, v in row.items()})
    return rows


def json_safe(obj: object) -> object:
    """Strict-JSON copy of nested dicts/lists: non-finite floats become ``None`` (null)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj
