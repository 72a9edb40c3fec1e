"""The run's own record files beside ``metrics.jsonl``, for the offline tools.

* ``params.json``: names, classes, layers (and stack), adapter flags, shapes and optimizer group
  of the monitored tensors, the frozen tensors' names and shapes, with the optimizer's betas and
  eps, so a run can be read without the model at hand;
* ``schedule.jsonl``: the lr and weight decay of every parameter group at every optimizer step
  (the lr the step used), and whether the step was skipped.

No row is ever lost: :func:`continue_records` makes the files continue a resumed run (rows up to
the resume step kept, later ones dropped because the run writes those steps again) or start over
for a fresh run, and first copies whatever it drops into ``previous/<n>/`` beside them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from ..core.records import (
    METRICS_FILE,
    PARAMS_FILE,
    PREVIOUS_DIR,
    SCHEDULE_FILE,
    continue_records,
    json_safe,
    replace_file,
)
from .guard import warn_fault
from .sinks import JsonlSink, NullSink

__all__ = ["METRICS_FILE", "PARAMS_FILE", "PREVIOUS_DIR", "SCHEDULE_FILE", "ScheduleLog", "continue_records",
           "open_record_sinks", "write_params_file"]

logger = logging.getLogger(__name__)



def _number(x) -> float:
    """A hyper-parameter as a float, NaN where it is none (Adafactor's eps is a pair, Lion has no betas)."""
    try:
        return float(x)
    except (TypeError, ValueError):
        return float("nan")


def write_params_file(folder: Path, opt, entries, infos, every: int, group_of: dict[int, int], frozen=None,
                      budget: dict | None = None) -> None:
    """What offline tools need to read this run's records without the model at hand; ``frozen``
    (:class:`~hf_weightforces.integrations.frozen.FrozenTensors`) lists the untrained tensors;
    ``budget`` says how the force budget was computed (integrations/optimizers.py)."""
    folder.mkdir(parents=True, exist_ok=True)
    betas = opt.param_groups[0].get("betas") or ()
    beta1, beta2 = (tuple(betas) + (None, None))[:2]
    data = {
        "optimizer": type(opt).__name__,
        "betas": [_number(beta1), _number(beta2)],
        "eps": _number(opt.param_groups[0].get("eps")),
        "every": every,
        "params": [
            {"name": e.name, "group": i.group, "layer": i.layer, "shape": list(e.shape), "numel": e.numel,
             "optimizer_group": group_of.get(id(e.param)), "adapter": bool(getattr(i, "adapter", False)),
             "stack": getattr(i, "stack", None) or None}
            for e, i in zip(entries, infos)
        ],
        "frozen": [] if frozen is None else
        [{"name": n, "shape": list(t.shape), "numel": t.numel()} for n, t in zip(frozen.names, frozen.tensors)],
    }
    if budget is not None:
        data["budget"] = budget
    replace_file(folder / PARAMS_FILE, json.dumps(json_safe(data), indent=1))


def open_record_sinks(folder: Path, resume_step: int) -> tuple[JsonlSink | NullSink, JsonlSink | NullSink]:
    """The sinks of ``schedule.jsonl`` and ``metrics.jsonl``, continuing the run at ``resume_step``.

    Never raises: a file that cannot be prepared (unwritable folder, full disk) warns, naming it,
    and gets a :class:`NullSink`; the run and the other sinks go on."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        continue_records(folder, resume_step)  # both files at once: one previous/<n>/ for the pair
    except Exception as exc:
        warn_fault(f"preparing the records in {folder}", exc, "the files there are left as they are")
    out = []
    for name in (SCHEDULE_FILE, METRICS_FILE):
        try:
            out.append(JsonlSink(folder / name, resume_step))
        except Exception as exc:
            warn_fault(f"opening {folder / name}", exc, "its rows are not written (other sinks go on)")
            out.append(NullSink())
    return out[0], out[1]


class ScheduleLog:
    """Buffers each optimizer step's lr/decay; written at log events (one transfer for device lrs).

    A file that cannot be written warns once and the log goes on without it (the metrics rows
    do not depend on it)."""

    def __init__(self, sink: JsonlSink | NullSink) -> None:
        self.sink = sink
        self._rows: list[tuple[int, list, list, bool]] = []

    @property
    def enabled(self) -> bool:
        return not isinstance(self.sink, NullSink)

    def note(self, step_id: int, lrs: list, groups: list[dict], skipped: bool) -> None:
        if not self.enabled:
            return
        lr = [x if isinstance(x, torch.Tensor) and x.device.type != "cpu" else float(x) for x in lrs]
        self._rows.append((step_id, lr, [float(g.get("weight_decay", 0.0)) for g in groups], skipped))

    def flush(self) -> None:
        """One row a step since the last flush (at a log event: values still on a device come back in
        one transfer)."""
        if not self._rows:
            return
        rows, self._rows = self._rows, []
        try:
            widths = [len(lr) for _, lr, _, _ in rows]
            # device lrs and deferred overflow flags: one transfer for all of them
            values = _host_values([x for _, lr, _, _ in rows for x in lr] + [skipped for _, _, _, skipped in rows])
            lrs, at = [], 0
            for n in widths:
                lrs.append(values[at : at + n])
                at += n
            flags = values[at:]
            self.sink.write_rows([({"lr": lr, "weight_decay": wds, "skipped": bool(skipped)}, step)
                                  for (step, _, wds, _), lr, skipped in zip(rows, lrs, flags)])
        except Exception as exc:  # the schedule file alone is lost; the metrics rows go on
            warn_fault(f"writing {SCHEDULE_FILE}", exc, f"the schedule from step {rows[0][0]} on is not recorded")
            self.sink = NullSink()

    def close(self) -> None:
        self.flush()
        self.sink.close()


def _host_values(values: list) -> list[float]:
    """Numbers, host tensors and device scalars as floats; the device ones in one transfer."""
    on_device = [i for i, x in enumerate(values) if isinstance(x, torch.Tensor) and x.device.type != "cpu"]
    moved = {}
    if on_device:  # one transfer for all of them
        moved = dict(zip(on_device, torch.stack([values[i].reshape(()).to(torch.float64) for i in on_device]).tolist()))
    return [moved[i] if i in moved else float(x) for i, x in enumerate(values)]
