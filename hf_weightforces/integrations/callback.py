"""The Trainer callback: the exact AdamW force budget, logged next to the loss.

Usage::

    from hf_weightforces import WeightForcesCallback
    trainer = Trainer(model, args, train_dataset=ds, callbacks=[WeightForcesCallback()])

At every optimizer step (or every ``every`` steps) it reads the optimizer's own moments, rebuilds
w_t from the post-step weights (no copy of the weights is kept) and adds, per parameter and on
the device, the signed contributions to Δ||w||² (SPEC section 2)::

    A = -2η<w_t, u_t>   I = η²||u_t||²   D = -2ηλ||w_t||²   R = η²λ²||w_t||² + 2η²λ<w_t, u_t>

At each Trainer log event the sums go to the host once and become one row per aggregate
(classes, total, layers): means per optimizer step like ``train/loss``, shares, the observed Δ
and the closure.  Rows go into the W&B row that holds ``train/loss`` (same ``train/global_step``),
optionally into every ``report_to`` integration, and always into
``<output_dir>/weightforces/metrics.jsonl``.

Bad configuration (an optimizer whose moments cannot be read, an unsupported backend) raises at
train start; anything failing mid-run warns once and switches the monitor off: it never stops
training and never touches weights, gradients or optimizer state.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import CallbackHandler

from ..core.groups import Grouping, layer_index
from ..core.monitor import ForceMonitor, ParamInfo
from ..core.optim import check_supported
from ..distributed import ShardContext
from .sinks import JsonlSink, NullSink, Sink, WandbSink

__all__ = ["WeightForcesCallback"]

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


def _find_callback_handler() -> CallbackHandler | None:
    """The CallbackHandler that is calling us (it is our caller's ``self``)."""
    frame = sys._getframe(1)
    for _ in range(6):
        if frame is None:
            return None
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, CallbackHandler):
            return candidate
        frame = frame.f_back
    return None


def _reporter_types() -> tuple[type, ...]:
    try:
        from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK
    except ImportError:  # pragma: no cover
        return ()
    return tuple(INTEGRATION_TO_CALLBACK.values())


class WeightForcesCallback(TrainerCallback):
    """Log the exact alignment / injection / decay budget of AdamW next to the loss.

    Args:
        every: compute the budget every ``every`` optimizer steps (1 = every step, the default).
            Logged forces are means over the budget steps since the previous log event.
        per_layer: also log one row per transformer layer (``weightforces/layer_NN/...``).
        per_matrix: also log one row per parameter (``weightforces/matrix/<name>/...``); many keys.
        patterns: your own ``{class: [regex, ...]}`` rules, tried before the built-in ones; classes
            are ``transmission``, ``selection``, ``value``, ``embedding``, ``other``.
        to_all_integrations: put the keys into the Trainer's ``logs`` so that every ``report_to``
            integration (TensorBoard, MLflow, ...) receives them; W&B then shows them under
            ``train/weightforces/...`` and the console progress bar prints them.  Default: W&B gets
            them under their own names in the ``train/loss`` row, other integrations do not.
        output_subdir: folder under ``args.output_dir`` for ``metrics.jsonl``.
    """

    def __init__(
        self,
        every: int = 1,
        per_layer: bool = True,
        per_matrix: bool = False,
        patterns: Mapping[str, Sequence[str]] | None = None,
        to_all_integrations: bool = False,
        output_subdir: str = "weightforces",
    ) -> None:
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"every must be a positive integer, got {every!r}")
        self.every = every
        self.per_layer = per_layer
        self.per_matrix = per_matrix
        self.grouping = Grouping(patterns)
        self.to_all_integrations = to_all_integrations
        self.output_subdir = output_subdir
        self._ordered = False
        self._active = False
        self._warned = False
        self.monitor: ForceMonitor | None = None
        self.ctx: ShardContext | None = None
        self._sinks: list[Sink] = []

    # ------------------------------------------------------------------ set-up
    def _place_before_reporters(self) -> None:
        """Move ourselves before the first reporting integration, so our keys reach its row."""
        handler = _find_callback_handler()
        if handler is None or self not in handler.callbacks:
            return
        cbs = handler.callbacks
        reporters = _reporter_types()
        first = next((i for i, cb in enumerate(cbs) if isinstance(cb, reporters)), None)
        me = cbs.index(self)
        if first is not None and first < me:
            cbs.remove(self)  # moving backwards keeps call_event's iteration intact
            cbs.insert(first, self)
            me = first
        self._ordered = not any(isinstance(cb, reporters) for cb in cbs[:me])

    def on_init_end(self, args, state, control, **kwargs):
        self._place_before_reporters()

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._place_before_reporters()
        if optimizer is None:
            raise ValueError("WeightForcesCallback needs the optimizer at train start; none was passed")
        opt = check_supported(optimizer)  # raises with what is supported
        self.ctx = ShardContext()  # raises for a backend without a reader
        entries = self.ctx.entries(model, opt)
        infos = [ParamInfo(e.name, self.grouping.classify(e.name, len(e.shape)), layer_index(e.name), e.numel) for e in entries]
        if not entries:
            raise ValueError("WeightForcesCallback: the optimizer has no parameters to monitor")
        self._entries = entries
        self._index_of = {id(e.param): i for i, e in enumerate(entries)}
        self.monitor = ForceMonitor(infos, device=entries[0].param.device)
        self._norm_step = -1  # global step at which monitor.norm2 matches the weights
        self._skipped = 0
        self._last_logged = state.global_step
        self._active = self.ctx.computes
        self._sinks = self._make_sinks(args, state)
        logger.info(
            "weight forces: %d tensors, backend %s, every %d step(s), W&B row %s",
            len(entries), self.ctx.backend.value, self.every, "shared with train/loss" if self._ordered else "separate",
        )

    def _make_sinks(self, args, state) -> list[Sink]:
        if not (state.is_world_process_zero and self.ctx is not None and self.ctx.is_main):
            return [NullSink()]
        sinks: list[Sink] = [JsonlSink(Path(args.output_dir) / self.output_subdir / METRICS_FILE, state.global_step)]
        report_to = args.report_to or []
        if ("wandb" in report_to or "all" in report_to) and not self.to_all_integrations:
            sinks.append(WandbSink(ordered=self._ordered))
        return sinks

    # ------------------------------------------------------------------ degrading
    def _fail(self, where: str, exc: BaseException) -> None:
        self._active = False
        if not self._warned:
            self._warned = True
            msg = f"weight forces switched off after an error in {where}: {type(exc).__name__}: {exc}"
            logger.warning(msg, exc_info=True)
            warnings.warn(msg, RuntimeWarning, stacklevel=2)

    def _is_budget_step(self, step_id: int) -> bool:
        return step_id % self.every == 0

    # ------------------------------------------------------------------ per step
    def on_step_begin(self, args, state, control, **kwargs):
        if not self._active:
            return
        try:
            if self._is_budget_step(state.global_step + 1) and self._norm_step != state.global_step:
                self.monitor.observe_norms(self.ctx.local_weights(self._entries))
                self._norm_step = state.global_step
        except Exception as exc:  # a diagnostic never stops training
            self._fail("on_step_begin", exc)

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if not self._active:
            return
        step_id = state.global_step + 1  # the Trainer increments global_step after this hook
        try:
            if getattr(optimizer, "step_was_skipped", False):
                self._skipped += 1
                if self._norm_step == state.global_step:
                    self._norm_step = step_id  # weights unchanged
                return
            if not self._is_budget_step(step_id):
                return
            if self._norm_step != state.global_step:
                raise RuntimeError("no norm observed before the step (on_step_begin did not run)")
            self._record(optimizer)
            self._norm_step = step_id
        except Exception as exc:
            self._fail("on_optimizer_step", exc)

    def _record(self, optimizer) -> None:
        views = self.ctx.views(check_supported(optimizer), self._index_of)
        by_device: dict[torch.device, list] = {}
        for v in views:
            by_device.setdefault(v.weight.device, []).append(v)
        if not by_device:
            self.monitor.record_step([], [], [], [], [], [], [], [], [])
            return
        for group in by_device.values():
            self.monitor.record_step(
                [v.index for v in group],
                [v.weight for v in group],
                [v.exp_avg for v in group],
                [v.second_moment for v in group],
                [v.step for v in group],
                [v.hyper.lr for v in group],
                [v.hyper.weight_decay for v in group],
                [(v.hyper.beta1, v.hyper.beta2) for v in group],
                [v.hyper.eps for v in group],
            )
        if len(by_device) > 1:
            self.monitor.steps -= len(by_device) - 1  # one optimizer step, however many devices

    # ------------------------------------------------------------------ per log event
    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self._active or logs is None:
            return
        is_train_row = "loss" in logs or "train_runtime" in logs
        if not is_train_row or (state.global_step == self._last_logged and self.monitor.steps == 0):
            return
        try:
            metrics = self._collect(state)
        except Exception as exc:
            self._fail("on_log", exc)
            return
        self._last_logged = state.global_step
        if self.to_all_integrations and self._ordered:
            logs.update(metrics)
        for sink in self._sinks:
            try:
                sink.log(metrics, state.global_step)
            except Exception as exc:  # a broken sink must not take the others down
                self._fail(f"{type(sink).__name__}.log", exc)

    def _collect(self, state) -> dict[str, float]:
        """One reduction, one host transfer, then plain float64 arithmetic on the host."""
        mon = self.monitor
        if self._norm_step != state.global_step:
            mon.observe_norms(self.ctx.local_weights(self._entries))
            self._norm_step = state.global_step
        flat = self.ctx.all_reduce_sum(mon.pack()).cpu().numpy()
        steps = mon.steps
        mon.reset()
        metrics = mon.summarize(flat, steps, per_layer=self.per_layer, per_matrix=self.per_matrix)
        metrics["weightforces/skipped_steps"] = float(self._skipped)
        self._skipped = 0
        return metrics

    def on_train_end(self, args, state, control, **kwargs):
        for sink in self._sinks:
            sink.close()
        self._sinks = []
