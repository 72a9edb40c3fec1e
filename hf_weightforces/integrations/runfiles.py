"""The run's own record files beside ``metrics.jsonl``, for the offline tools.

* ``params.json``: names, classes, layers (and stack), adapter flags, shapes and optimizer group
  of the monitored tensors, the frozen tensors' names and shapes, with the optimizer's betas and
  eps, so a run can be read without the model at hand;
* ``schedule.jsonl``: the lr and weight decay of every parameter group at every optimizer step
  (the lr the step used), and whether the step was skipped.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .sinks import JsonlSink, NullSink

__all__ = ["PARAMS_FILE", "SCHEDULE_FILE", "ScheduleLog", "write_params_file"]

SCHEDULE_FILE = "schedule.jsonl"  # lr and weight decay per param group at every optimizer step
PARAMS_FILE = "params.json"  # names, classes, shapes and optimizer group of the monitored tensors


def write_params_file(folder: Path, opt, entries, infos, every: int, group_of: dict[int, int], frozen=None) -> None:
    """What offline tools need to read this run's records without the model at hand; ``frozen``
    (:class:`~hf_weightforces.integrations.frozen.FrozenTensors`) lists the untrained tensors."""
    folder.mkdir(parents=True, exist_ok=True)
    beta1, beta2 = opt.param_groups[0].get("betas", (float("nan"), float("nan")))
    data = {
        "optimizer": type(opt).__name__,
        "betas": [float(beta1), float(beta2)],
        "eps": float(opt.param_groups[0].get("eps", float("nan"))),
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
    (folder / PARAMS_FILE).write_text(json.dumps(data, indent=1))


class ScheduleLog:
    """Buffers each optimizer step's lr/decay; written at log events (one transfer for device lrs)."""

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
        """One row a step since the last flush."""
        if not self._rows:
            return
        lrs = [lr for _, lr, _, _ in self._rows]
        if any(isinstance(x, torch.Tensor) for row in lrs for x in row):  # device lr: one transfer
            lrs = torch.stack([torch.stack([torch.as_tensor(x, dtype=torch.float64).cpu() for x in row])
                               for row in lrs]).tolist()
        rows, self._rows = self._rows, []
        for (step, _, wds, skipped), lr in zip(rows, lrs):
            self.sink.log({"lr": lr, "weight_decay": wds, "skipped": skipped}, step)

    def close(self) -> None:
        self.flush()
        self.sink.close()
