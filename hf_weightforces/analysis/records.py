"""Read a training run from disk: its checkpoints and what the callback recorded beside them.

A run folder (a Trainer ``output_dir``) may hold:

* ``checkpoint-N/`` folders (model weights, a step in the name or in ``trainer_state.json``);
* ``weightforces/metrics.jsonl``: the callback's rows, forces as means per optimizer step over the
  interval since the previous row (``weightforces/steps`` budget steps, every ``every``-th step);
* ``weightforces/schedule.jsonl``: lr and weight decay of every optimizer param group at every
  optimizer step (step s takes w(s-1) to w(s) with that row's values);
* ``weightforces/params.json``: every monitored tensor's name, class, layer, shape, numel and
  optimizer group index, and the optimizer's betas and eps.

Everything here is plain JSON or weights read through :mod:`~hf_weightforces.analysis.checkpoints`
(never an arbitrary unpickle).  Problems with a checkpoint list or a record file raise
:class:`RecordError` (a ``ValueError``) whose message names the file and what is wrong.

Schedules without a record come from the user's flags (:func:`schedule_from_flags`), with the
Hugging Face schedulers' formulas: the lr of optimizer step s (1-based) is ``peak * f(s - 1)``.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hf_weightforces.analysis.checkpoints import CheckpointError, PathLike, read_step, weight_files

__all__ = [
    "Checkpoint",
    "ParamRecord",
    "ParamsRecord",
    "RecordError",
    "RunRecords",
    "Schedule",
    "TruthIntervals",
    "find_checkpoints",
    "locate_records",
    "read_metrics",
    "read_params",
    "read_records",
    "read_schedule",
    "schedule_from_flags",
    "truth_intervals",
]

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
SCHEDULE_FILE = "schedule.jsonl"
PARAMS_FILE = "params.json"
RECORDS_SUBDIR = "weightforces"

#: Learning-rate shapes of :func:`schedule_from_flags` (the Trainer's ``lr_scheduler_type`` names).
DECAY_SHAPES = ("constant", "linear", "cosine")


class RecordError(ValueError):
    """A run folder, checkpoint list or record file that cannot be used; the message says why."""


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Checkpoint:
    """One saved model: where it is and after how many optimizer steps it was saved."""

    path: Path
    step: int


def _has_weights(path: Path) -> bool:
    try:
        weight_files(path)
    except CheckpointError:
        return False
    return True


def _scan_folder(folder: Path) -> list[Path]:
    """Sub-folders of ``folder`` that hold weights (``checkpoint-*`` first, else any)."""
    subdirs = sorted(d for d in folder.iterdir() if d.is_dir())
    named = [d for d in subdirs if d.name.startswith("checkpoint-")]
    return named if named else [d for d in subdirs if _has_weights(d)]


def find_checkpoints(paths: Sequence[PathLike], *, min_count: int = 1) -> list[Checkpoint]:
    """The checkpoints named by ``paths``, in step order.

    ``paths`` is either one folder holding checkpoints (a Trainer ``output_dir`` with
    ``checkpoint-N`` folders, whose own final weights are then ignored, or any folder of model
    folders; they are sorted by step), or an
    explicit list of checkpoints (model folders or weight files), which must already be in
    strictly increasing step order.  Each step comes from a ``checkpoint-N`` name or from
    ``trainer_state.json``.  Raises :class:`RecordError` for a missing path, a checkpoint whose
    step cannot be told, duplicated or out-of-order steps, or fewer than ``min_count`` checkpoints.
    """
    if not paths:
        raise RecordError("no checkpoints given")
    items = [Path(p) for p in paths]
    for p in items:
        if not p.exists():
            raise RecordError(f"{p}: no such file or folder")
    scanned = len(items) == 1 and items[0].is_dir() and (
        any(items[0].glob("checkpoint-*")) or not _has_weights(items[0])
    )
    if scanned:
        found = _scan_folder(items[0])
        if not found:
            raise RecordError(f"{items[0]}: holds no checkpoint-N folders and no model folders with weights")
        items = found
    out = []
    for p in items:
        step = read_step(p)
        if step is None:
            raise RecordError(
                f"{p}: cannot tell its training step (name it checkpoint-N or keep its trainer_state.json)"
            )
        out.append(Checkpoint(p, step))
    if scanned:
        out.sort(key=lambda c: c.step)
    for a, b in zip(out, out[1:]):
        if b.step == a.step:
            raise RecordError(f"two checkpoints at step {a.step}: {a.path} and {b.path}")
        if b.step < a.step:
            raise RecordError(
                f"checkpoints out of step order: {a.path} (step {a.step}) comes before {b.path} "
                f"(step {b.step}); list them in increasing step order"
            )
    if len(out) < min_count:
        where = f" in {paths[0]}" if scanned else ""
        raise RecordError(f"found {len(out)} checkpoint(s){where}; need at least {min_count}")
    for c in out:
        weight_files(c.path)  # every checkpoint must hold weights (CheckpointError names it)
    log.info("%d checkpoint(s), steps %d..%d", len(out), out[0].step, out[-1].step)
    return out


# ----------------------------------------------------------------------------------------------
# Record files
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParamRecord:
    """One monitored tensor as ``params.json`` describes it."""

    name: str
    group: str
    layer: int | None
    shape: tuple[int, ...]
    numel: int
    optimizer_group: int


@dataclass(frozen=True)
class ParamsRecord:
    """The optimizer's constants and the monitored tensors (``params.json``)."""

    optimizer: str
    beta1: float
    beta2: float
    eps: float
    every: int
    params: tuple[ParamRecord, ...]

    def optimizer_group_count(self) -> int:
        return 1 + max((p.optimizer_group for p in self.params), default=0)


def _load_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise RecordError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    except (ValueError, RecursionError) as exc:
        raise RecordError(f"{path}: not valid JSON ({exc})") from exc


def read_params(path: PathLike) -> ParamsRecord:
    """Parse ``params.json``; raises :class:`RecordError` naming the file for anything malformed."""
    path = Path(path)
    data = _load_json(path)
    try:
        beta1, beta2 = (float(b) for b in data["betas"])
        params = tuple(
            ParamRecord(
                name=str(p["name"]),
                group=str(p["group"]),
                layer=None if p.get("layer") is None else int(p["layer"]),
                shape=tuple(int(d) for d in p["shape"]),
                numel=int(p["numel"]),
                optimizer_group=int(p["optimizer_group"]) if p.get("optimizer_group") is not None else 0,
            )
            for p in data["params"]
        )
        record = ParamsRecord(str(data.get("optimizer", "")), beta1, beta2, float(data.get("eps", 1e-8)),
                              int(data.get("every", 1)), params)
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
        raise RecordError(f"{path}: malformed params record ({type(exc).__name__}: {exc})") from exc
    for p in record.params:
        if math.prod(p.shape) != p.numel:
            raise RecordError(f"{path}: {p.name} has shape {list(p.shape)} but numel {p.numel}")
    if not 0.0 <= record.beta1 < 1.0 or record.every < 1:
        raise RecordError(f"{path}: beta1 {record.beta1} or every {record.every} out of range")
    return record


@dataclass(frozen=True)
class Schedule:
    """lr and weight decay of every optimizer step, per optimizer param group.

    ``lr[j, g]`` and ``weight_decay[j, g]`` are the values optimizer step ``first_step + j`` used for
    param group ``g`` (step s takes w(s-1) to w(s)).  A step the optimizer skipped (overflow) has lr
    and weight decay 0 here: the weights did not move.  ``source`` says where the numbers came from.
    """

    first_step: int
    lr: np.ndarray
    weight_decay: np.ndarray
    source: str
    skipped: np.ndarray | None = None  # bool per step; None: no step was skipped

    @property
    def last_step(self) -> int:
        return self.first_step + self.lr.shape[0] - 1

    @property
    def groups(self) -> int:
        return self.lr.shape[1]

    def covers(self, first: int, last: int) -> bool:
        return self.first_step <= first and last <= self.last_step

    def skipped_rows(self, first: int, last: int) -> np.ndarray:
        """Whether the optimizer skipped each step first..last (overflow): bool [last-first+1]."""
        if self.skipped is None:
            return np.zeros(last - first + 1, dtype=bool)
        return self.skipped[first - self.first_step : last - self.first_step + 1]

    def rows(self, first: int, last: int) -> tuple[np.ndarray, np.ndarray]:
        """(lr, weight_decay) of steps first..last inclusive, shape [last-first+1, groups]."""
        if not self.covers(first, last):
            raise RecordError(
                f"the schedule ({self.source}) covers steps {self.first_step}..{self.last_step}, "
                f"not {first}..{last}"
            )
        a, b = first - self.first_step, last - self.first_step + 1
        return self.lr[a:b], self.weight_decay[a:b]


def read_schedule(path: PathLike) -> Schedule:
    """Parse ``schedule.jsonl`` (one row per optimizer step); steps must be consecutive."""
    path = Path(path)
    steps, lrs, wds, skips = [], [], [], []
    with open(path, encoding="utf-8", errors="replace") as f:  # bad bytes: a bad row, named below
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                step = row["step"]
                if not isinstance(step, int) or isinstance(step, bool):
                    raise TypeError(f"step {step!r} is not an integer")
                lr = [float(x) for x in row["lr"]]
                wd = [float(x) for x in row["weight_decay"]]
                skipped = bool(row.get("skipped", False))
            except (ValueError, KeyError, TypeError, AttributeError, RecursionError, OverflowError) as exc:
                raise RecordError(f"{path}:{lineno}: not a schedule row ({type(exc).__name__}: {exc})") from exc
            if lrs and (len(lr) != len(lrs[0]) or len(wd) != len(wds[0])):
                raise RecordError(f"{path}:{lineno}: {len(lr)} param groups, earlier rows have {len(lrs[0])}")
            if len(lr) != len(wd) or not all(math.isfinite(x) for x in lr + wd):
                raise RecordError(f"{path}:{lineno}: lr and weight_decay must be finite lists of one length")
            if skipped:
                lr, wd = [0.0] * len(lr), [0.0] * len(wd)
            steps.append(step)
            lrs.append(lr)
            wds.append(wd)
            skips.append(skipped)
    if not steps:
        raise RecordError(f"{path}: empty schedule")
    for a, b in zip(steps, steps[1:]):
        if b != a + 1:
            kind = "duplicated" if b == a else ("out of order" if b < a else "missing")
            raise RecordError(f"{path}: steps {kind} after step {a} (next row is step {b})")
    return Schedule(steps[0], np.array(lrs, dtype=np.float64), np.array(wds, dtype=np.float64), f"record {path.name}",
                    np.array(skips, dtype=bool))


def schedule_from_flags(
    lr: float,
    total_steps: int,
    *,
    warmup_steps: int = 0,
    decay: str = "constant",
    weight_decay: float = 0.0,
) -> Schedule:
    """The lr of every step from the Trainer's scheduler formulas, for runs without a record.

    Two param groups, as the Trainer builds them: group 0 with ``weight_decay`` (weight matrices
    and embeddings), group 1 without (biases and norms).  Step s (1-based) uses lr = peak·f(s-1):
    warm-up f(k) = k / warmup for k < warmup, then ``constant`` 1, ``linear`` (T - k)/(T - warmup),
    ``cosine`` (1 + cos(π (k - warmup)/(T - warmup)))/2 with T = ``total_steps``
    (``transformers.get_*_schedule_with_warmup``).
    """
    if decay not in DECAY_SHAPES:
        raise RecordError(f"unknown lr decay {decay!r}; choose one of {DECAY_SHAPES}")
    if not (lr > 0 and math.isfinite(lr)) or total_steps < 1 or not 0 <= warmup_steps <= total_steps:
        raise RecordError(
            f"schedule flags need lr > 0, total steps >= 1 and 0 <= warmup <= total "
            f"(got lr={lr}, total={total_steps}, warmup={warmup_steps})"
        )
    if weight_decay < 0:
        raise RecordError(f"weight decay must be >= 0, got {weight_decay}")
    k = np.arange(total_steps, dtype=np.float64)  # scheduler step count before optimizer step k+1
    frac = np.ones_like(k)
    if warmup_steps:
        frac = np.where(k < warmup_steps, k / warmup_steps, 1.0)
    span = max(1, total_steps - warmup_steps)
    progress = np.clip((k - warmup_steps) / span, 0.0, 1.0)
    if decay == "linear":
        frac = np.where(k < warmup_steps, frac, np.maximum(0.0, 1.0 - progress))
    elif decay == "cosine":
        frac = np.where(k < warmup_steps, frac, 0.5 * (1.0 + np.cos(math.pi * progress)))
    lrs = np.stack([lr * frac, lr * frac], axis=1)
    wds = np.tile(np.array([weight_decay, 0.0]), (total_steps, 1))
    source = f"flags: peak lr {lr:g}, {warmup_steps} warm-up steps, {decay} decay over {total_steps} steps, " \
             f"weight decay {weight_decay:g} on >= 2-D tensors"
    return Schedule(1, lrs, wds, source)


def read_metrics(path: PathLike) -> list[dict]:
    """Rows of ``metrics.jsonl``, read leniently: numbers (nulls as NaN) under an integer step.

    Lines that are not JSON objects with a non-negative integer ``step``, and rows whose step does
    not increase, are skipped; values that are not numbers (text, lists, booleans) are left out of
    their row.  One warning gives the counts.  Raises :class:`RecordError` when the file cannot be
    read or holds lines but no usable row.
    """
    from hf_weightforces.core.records import read_rows

    path = Path(path)
    try:
        read = read_rows(path)
    except OSError as exc:
        raise RecordError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    rows, last, skipped, dropped = [], -1, read.skipped, 0
    for raw in read.rows:
        if raw["step"] <= last:
            skipped += 1
            continue
        row = {"step": raw["step"]}
        for key, value in raw.items():
            if key == "step":
                continue
            if value is None:
                row[key] = math.nan
            elif isinstance(value, (int, float)) and not isinstance(value, bool) and _as_float(value) is not None:
                row[key] = value
            else:
                dropped += 1
        rows.append(row)
        last = raw["step"]
    if skipped or dropped:
        log.warning("%s: skipped %d unusable or out-of-order row(s) and %d value(s) that are not numbers%s",
                    path, skipped, dropped, f" (first: {read.first_problem})" if read.first_problem else "")
    if not rows and skipped:
        raise RecordError(f"{path}: no usable row ({read.first_problem or 'steps do not increase'})")
    return [_renamed_pool_keys(row) for row in rows]


def _as_float(value: int | float) -> float | None:
    try:
        return float(value)
    except OverflowError:  # an integer beyond float range: not a usable number
        return None


# Rows written before the ``matrices`` aggregate carried the Weibull pool's keys under ``total``
# (over weight matrices only, while the row's forces and rms covered every parameter).
_POOL_KEYS = ("weibull_", "start_weibull_", "rms_pred", "offset_")
_OLD_POOL = "weightforces/total/"


def _renamed_pool_keys(row: dict) -> dict:
    """Map an older row's ``weightforces/total/<Weibull or offset key>`` to ``weightforces/matrices/``
    (docs/aggregates.md), so that one name means one set of tensors in every run read."""
    old = [k for k in row if k.startswith(_OLD_POOL) and k[len(_OLD_POOL):].startswith(_POOL_KEYS)]
    if not old or any(k.startswith("weightforces/matrices/") for k in row):
        return row
    out = {k: v for k, v in row.items() if k not in old}
    out.update({"weightforces/matrices/" + k[len(_OLD_POOL):]: row[k] for k in old})
    return out


@dataclass(frozen=True)
class RunRecords:
    """What the callback wrote for a run; each part is ``None`` when its file is absent."""

    folder: Path | None
    metrics: list[dict] | None
    schedule: Schedule | None
    params: ParamsRecord | None

    @property
    def has_truth(self) -> bool:
        return bool(self.metrics) and any(k.endswith("/align") for k in self.metrics[0])


def read_records(folder: PathLike | None) -> RunRecords:
    """Read ``metrics.jsonl``, ``schedule.jsonl`` and ``params.json`` from ``folder`` (a records
    folder, or a run folder with a ``weightforces/`` sub-folder); absent files give ``None``."""
    if folder is None:
        return RunRecords(None, None, None, None)
    folder = Path(folder)
    if (folder / RECORDS_SUBDIR).is_dir() and not (folder / PARAMS_FILE).exists():
        folder = folder / RECORDS_SUBDIR
    if not folder.is_dir():
        raise RecordError(f"{folder}: no such records folder")
    metrics = read_metrics(folder / METRICS_FILE) if (folder / METRICS_FILE).is_file() else None
    schedule = read_schedule(folder / SCHEDULE_FILE) if (folder / SCHEDULE_FILE).is_file() else None
    params = read_params(folder / PARAMS_FILE) if (folder / PARAMS_FILE).is_file() else None
    return RunRecords(folder, metrics, schedule, params)


def locate_records(paths: Sequence[PathLike], checkpoints: Sequence[Checkpoint]) -> Path | None:
    """The records folder of a run given as a folder, or shared by the checkpoints' parent folder."""
    candidates = []
    if len(paths) == 1 and Path(paths[0]).is_dir():
        candidates.append(Path(paths[0]) / RECORDS_SUBDIR)
    parents = {c.path.parent if c.path.is_dir() else c.path.parent.parent for c in checkpoints}
    if len(parents) == 1:
        candidates.append(next(iter(parents)) / RECORDS_SUBDIR)
    for c in candidates:
        if c.is_dir() and any((c / f).is_file() for f in (METRICS_FILE, SCHEDULE_FILE, PARAMS_FILE)):
            return c
    return None


# ----------------------------------------------------------------------------------------------
# The logged truth
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TruthIntervals:
    """Logged means per budget step of one metric, per log interval ``(start, end]``."""

    start: np.ndarray  # int, exclusive
    end: np.ndarray  # int, inclusive (the row's step)
    value: np.ndarray  # float, mean per budget step over the interval
    steps: np.ndarray  # float, budget steps averaged (``weightforces/steps``)


def truth_intervals(metrics: Sequence[dict], key: str) -> TruthIntervals:
    """The logged intervals of ``key`` (e.g. ``weightforces/total/align``): row j covers the steps
    after the previous row's step up to its own.  Rows without the key are skipped (their
    interval joins nothing: the next row's interval starts at that row's step anyway)."""
    start, end, value, steps = [], [], [], []
    prev = 0
    for row in metrics:
        step = int(row["step"])
        if key in row:
            start.append(prev)
            end.append(step)
            value.append(float(row[key]))
            steps.append(float(row.get("weightforces/steps", step - prev)))
        prev = step
    return TruthIntervals(np.array(start, dtype=np.int64), np.array(end, dtype=np.int64),
                          np.array(value, dtype=np.float64), np.array(steps, dtype=np.float64))
