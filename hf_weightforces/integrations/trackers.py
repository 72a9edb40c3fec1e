"""TensorBoard, MLflow and trackio as first-class destinations: the aggregates' keys, laid out in
the same sections as on W&B (integrations/wandb_layout.py), at the Trainer's ``global_step``: the
step the loss is written at.

Each sink writes through the run its integration opened (the ``TensorBoardCallback``'s writer, the
active MLflow run, the current trackio run), so our keys land beside ``train/loss``; with no such
run at a log event the row is skipped for that tracker, and ``metrics.jsonl`` still has it.  Only
used when ``to_all_integrations`` is off (otherwise the Trainer hands the keys to every
integration itself).  The trackers' packages are imported inside the sinks.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from .ordering import find_callback_handler
from .wandb_layout import Dashboard, scalar_keys

__all__ = ["MlflowSink", "TensorBoardSink", "TrackioSink", "tracker_sinks"]

logger = logging.getLogger(__name__)


def _numbers(metrics: Mapping[str, float], dashboard: Dashboard) -> dict[str, float]:
    return {k: float(v) for k, v in scalar_keys(metrics, dashboard.layer_scalars).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoardSink:
    """Scalars into the ``TensorBoardCallback``'s own event file, at ``global_step``.  Without that
    callback (a handler we cannot see), into ``<records>/tensorboard`` with a writer of our own."""

    def __init__(self, dashboard: Dashboard, handler, fallback_dir: Path) -> None:
        self.dashboard = dashboard
        self.handler = handler
        self.fallback_dir = Path(fallback_dir)
        self._own = None

    def __repr__(self) -> str:
        return "TensorBoardSink()"

    def _writer(self):
        from transformers.integrations.integration_utils import TensorBoardCallback

        callbacks = getattr(self.handler, "callbacks", [])
        tb = next((cb for cb in callbacks if isinstance(cb, TensorBoardCallback)), None)
        if tb is not None and tb.tb_writer is not None:
            return tb.tb_writer
        if self._own is None:
            from torch.utils.tensorboard import SummaryWriter

            logger.info("weight forces: no TensorBoardCallback writer found; writing to %s", self.fallback_dir)
            self._own = SummaryWriter(log_dir=str(self.fallback_dir))
        return self._own

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        writer = self._writer()
        for key, value in _numbers(metrics, self.dashboard).items():
            writer.add_scalar(key, value, int(step))
        if writer is self._own:
            writer.flush()  # the callback's own writer is flushed by its on_log, right after ours

    def close(self) -> None:
        if self._own is not None:
            self._own.close()
            self._own = None


class MlflowSink:
    """``mlflow.log_metrics(..., step=global_step)`` into the active run (the ``MLflowCallback``'s)."""

    def __init__(self, dashboard: Dashboard) -> None:
        self.dashboard = dashboard

    def __repr__(self) -> str:
        return "MlflowSink()"

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        import mlflow

        if mlflow.active_run() is None:
            return
        values = {k: v for k, v in _numbers(metrics, self.dashboard).items() if math.isfinite(v)}
        if values:
            mlflow.log_metrics(values, step=int(step))

    def close(self) -> None:
        pass


class TrackioSink:
    """``trackio.log`` into the current run with ``train/global_step``, the x axis the
    ``TrackioCallback`` gives the loss."""

    def __init__(self, dashboard: Dashboard) -> None:
        self.dashboard = dashboard

    def __repr__(self) -> str:
        return "TrackioSink()"

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        import trackio

        if trackio.context_vars.current_run.get() is None:
            return
        trackio.log({**_numbers(metrics, self.dashboard), "train/global_step": int(step)})

    def close(self) -> None:
        pass


def tracker_sinks(report_to: Sequence[str], dashboard: Dashboard, records: Path) -> list:
    """The sinks for the trackers named in ``report_to`` (``"all"`` names every one installed)."""
    report_to = list(report_to or [])
    every = "all" in report_to
    sinks: list = []
    if "tensorboard" in report_to or every and _installed("tensorboard"):
        sinks.append(TensorBoardSink(dashboard, find_callback_handler(), records / "tensorboard"))
    if "mlflow" in report_to or every and _installed("mlflow"):
        sinks.append(MlflowSink(dashboard))
    if "trackio" in report_to or every and _installed("trackio"):
        sinks.append(TrackioSink(dashboard))
    return sinks


def _installed(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None
