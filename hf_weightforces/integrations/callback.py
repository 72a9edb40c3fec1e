"""The Trainer callback: the exact AdamW force budget, logged next to the loss.

Usage::

    from hf_weightforces import WeightForcesCallback
    trainer = Trainer(model, args, train_dataset=ds, callbacks=[WeightForcesCallback()])

At every optimizer step (or every ``every`` steps) it reads the optimizer's own moments, rebuilds
w_t from the post-step weights (no copy of the weights is kept) and adds, per parameter and on
the device, the signed contributions to Δ||w||² (docs/budget.md)::

    A = -2η<w_t, u_t>   I = η²||u_t||²   D = -2ηλ||w_t||²   R = η²λ²||w_t||² + 2η²λ<w_t, u_t>

At each Trainer log event the sums go to the host once and become one row per aggregate
(classes, ``matrices``, ``total``, layers: docs/aggregates.md): means per optimizer step like
``train/loss``, shares, the observed Δ and the closure; parameters the optimizer does not train
are reported as ``frozen`` (norm and count).  Rows go into the W&B row that holds ``train/loss`` (same ``train/global_step``),
optionally into every ``report_to`` integration, and always into
``<output_dir>/weightforces/metrics.jsonl``.

Bad configuration (an optimizer whose moments cannot be read, an unsupported backend) raises at
train start; anything failing mid-run warns once and switches the monitor off: it never stops
training and never touches weights, gradients or optimizer state.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from transformers import TrainerCallback

from ..core.aggregates import describe
from ..core.budget import KERNELS, choose_kernel
from ..core.groups import Grouping
from ..core.integral import RunIntegral
from ..core.monitor import OFFSET_RULES, ForceMonitor, ParamInfo
from ..core.optim import plan_optimizer, unwrap_optimizer
from ..core.pools import WeibullPools
from ..distributed import ParamEntry, ShardContext, ShardFailureError, UnsupportedBackendError
from .console import ConsoleSink, tracker_shows_keys
from .frozen import find_frozen
from .guard import Faults, output_subdir_problem
from .health import HealthWatch
from .intended import LOW_PRECISION, IntendedStager
from .optimizers import OBSERVED_MODES, budget_info, budget_reader
from .ordering import find_callback_handler, place_before_reporters
from .overflow import OverflowWatch
from .runfiles import PARAMS_FILE, SCHEDULE_FILE, ScheduleLog, open_record_sinks, write_params_file  # noqa: F401
from .sinks import JsonlSink, NullSink, Sink, WandbSink, close_sinks, log_to_sinks  # noqa: F401
from .state import PROBE_TENSORS_FILE, STATE_FILE, load_state, restore_probes, save_state  # noqa: F401
from .superweights import SuperWeightTracker
from .trackers import tracker_sinks
from .wandb_layout import Dashboard

__all__ = ["CONFIG_ERRORS", "WeightForcesCallback"]

#: What bad configuration raises at train start (an optimizer or backend without a reader, a bad
#: argument): these stop the run before any step, on purpose; anything else only switches the monitor off.
CONFIG_ERRORS = (ValueError, UnsupportedBackendError)

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


class Probe(Protocol):
    """An extra live quantity computed inside the monitor's hooks and logged in the same rows.

    Every method is called on every rank; anything collective must run in the same order on all
    of them.  Errors are caught by the callback (warn once, monitor off), like its own.

    Optional, for tensor state that does not belong in JSON: ``tensors_state() -> dict[str,
    torch.Tensor]`` (written with each checkpoint as ``weightforces_probe_<i>.safetensors``, main
    rank only; an empty dict writes nothing) and ``load_tensors_state(tensors) -> None``, called at
    resume before ``load_state_dict`` and only when that file was read; a missing or unreadable
    file warns and the probe gets ``load_state_dict`` alone.  Probes without them are fine.
    """

    def setup(self, entries: list[ParamEntry], infos: list[ParamInfo], ctx: ShardContext, args, state) -> None: ...

    def on_gradients(self, step_id: int, model, optimizer) -> None:
        """Before the optimizer step, gradients in place (not under DeepSpeed, which steps inside backward)."""

    def on_step(self, step_id: int, optimizer, skipped: bool) -> None:
        """After the optimizer step."""

    def collect(self, step: int) -> dict[str, float]:
        """Keys for the row of this log event (full names, e.g. ``weightforces/backbone/...``)."""

    def state_dict(self) -> dict:
        """JSON-serialisable state saved with each checkpoint."""

    def load_state_dict(self, state: dict) -> None: ...


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
        output_subdir: folder under ``args.output_dir`` for ``metrics.jsonl``: relative, without a
            ``..`` component (ValueError otherwise), so records never land outside the run's folder.
        weibull_every: fit Weibull (k, λ) per class (docs/weibull.md) at the first log event at or
            after every ``weibull_every`` optimizer steps, from a mergeable log-spaced histogram
            of |w| (one sort of the weights: docs/budget.md, section 10, for the cost); 0 turns it off.
        weibull_per_matrix: also fit every weight matrix at those events (bigger reduction).
        offset_sample_every: the sparse-recording variant of the σ prediction integrates forces
            recorded every N steps (docs/weibull.md); must be a multiple of ``every`` (default: the
            smallest multiple of ``every`` that is at least 10).
        offset_rule: which step stands for each block of ``offset_sample_every`` steps in that
            integral: ``"right"`` (the default: the block's last step, so a record stands for the
            steps since the previous one, as ``metrics.jsonl`` rows do) or ``"left"`` (its first
            budget step: the research script ``make_predicted_lambda_fig.py``'s rule; with ``every``
            equal to ``offset_sample_every`` both are the same step).
        probes: extra live quantities (see :class:`Probe`) logged in the same rows.
        super_weights: also report the budget shares and Weibull fits without the N largest |w|
            over all weight matrices (re-picked at each log event); 0 = off.  Single process/DDP.
        rounding_split: also split float32 parameters' budgets into the intended update and
            ``rounding`` (computed before each budget step from w_t, the gradients and the moments,
            like low-precision parameters always are): where rounding of the stored weights is the
            story, at fine-tuning learning rates.  Costs a second pass over w, g, m, v per step.
        kernel: how the per-step sums run: ``"auto"`` (the default) and ``"exact"``: the eager pass
            (docs/budget.md, section 9); ``"compiled"`` (opt-in): the same sums fused by
            ``torch.compile`` in process, compiled at the second budget step, which waits for it.
        quiet: no console summary (one line per log event when no tracker shows the keys, a table
            at train end; see ``integrations/console.py``).
        dashboard: what W&B, TensorBoard, MLflow and trackio get beside the aggregates' charts
            (:class:`~hf_weightforces.integrations.wandb_layout.Dashboard`: heat-map interval,
            per-layer charts on request, the report's figures at train end).
    """

    def __init__(
        self,
        every: int = 1,
        per_layer: bool = True,
        per_matrix: bool = False,
        patterns: Mapping[str, Sequence[str]] | None = None,
        to_all_integrations: bool = False,
        output_subdir: str = "weightforces",
        weibull_every: int = 100,
        weibull_per_matrix: bool = False,
        offset_sample_every: int | None = None,
        offset_rule: str = "right",
        probes: Sequence[Probe] = (),
        super_weights: int = 0,
        rounding_split: bool = False,
        kernel: str = "auto",
        quiet: bool = False,
        dashboard: Dashboard | None = None,
        observed_mode: str = "sampled",
        observed_sample_size: int = 1024,
        observed_seed: int = 0,
    ) -> None:
        if observed_mode not in OBSERVED_MODES:
            raise ValueError(f"observed_mode must be one of {OBSERVED_MODES}, got {observed_mode!r}")
        if not isinstance(observed_sample_size, int) or isinstance(observed_sample_size, bool) or observed_sample_size < 2:
            raise ValueError(f"observed_sample_size must be an integer >= 2, got {observed_sample_size!r}")
        self.observed_mode, self.observed_sample_size, self.observed_seed = observed_mode, observed_sample_size, int(observed_seed)
        self._reader = None  # the budget source (integrations/optimizers.py), chosen at train start
        if offset_sample_every is None:  # the smallest multiple of every that is >= 10
            offset_sample_every = every * -(-10 // every) if isinstance(every, int) and every > 0 else 10
        for label, value, low in (("every", every, 1), ("weibull_every", weibull_every, 0),
                                  ("offset_sample_every", offset_sample_every, 1), ("super_weights", super_weights, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{label} must be an integer >= {low}, got {value!r}")
        if offset_sample_every % every:
            raise ValueError(f"offset_sample_every ({offset_sample_every}) must be a multiple of every ({every})")
        if offset_rule not in OFFSET_RULES:
            raise ValueError(f"offset_rule must be one of {OFFSET_RULES}, got {offset_rule!r}")
        self.offset_rule = offset_rule
        self.every = every
        self.weibull_every = weibull_every
        self.weibull_per_matrix = weibull_per_matrix
        self.offset_sample_every = offset_sample_every
        self.probes = list(probes)  # the ones still running; a probe that fails is dropped alone
        self._all_probes = list(probes)
        self.super_weights = super_weights
        self.rounding_split = bool(rounding_split)
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        self.kernel = kernel
        self._stager: IntendedStager | None = None
        self._super: SuperWeightTracker | None = None
        self.per_layer = per_layer
        self.per_matrix = per_matrix
        self.grouping = Grouping(patterns)
        self.to_all_integrations = to_all_integrations
        problem = output_subdir_problem(output_subdir)  # rows stay inside args.output_dir
        if problem:
            raise ValueError(f"output_subdir {problem}")
        self.output_subdir = output_subdir
        self.quiet = bool(quiet)
        self.dashboard = Dashboard() if dashboard is None else dashboard
        if not isinstance(self.dashboard, Dashboard):
            raise ValueError(f"dashboard must be a Dashboard, got {type(dashboard).__name__}")
        self._ordered = False
        self._active = False
        self._warned = False
        self._faults = Faults()  # hooks that lose only their own output (saves, files, sinks) report here
        self._owes_reduction = False  # failed here, the other ranks not told yet (see _reduce)
        self.monitor: ForceMonitor | None = None
        self.ctx: ShardContext | None = None
        self._sinks: list[Sink] = []

    # ------------------------------------------------------------------ set-up
    def _place_before_reporters(self) -> None:
        """Move ourselves before the first reporting integration, so our keys reach its row."""
        ordered = place_before_reporters(self, find_callback_handler())
        if ordered is not None:
            self._ordered = ordered

    def on_init_end(self, args, state, control, **kwargs):
        try:
            self._place_before_reporters()
        except Exception as exc:  # only where our keys land is at stake; on_train_begin tries again
            logger.warning("weight forces: could not reorder the callbacks (%s: %s)", type(exc).__name__, exc)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        """Bad configuration (the errors :data:`CONFIG_ERRORS`) raises here, before any step.  Any
        other failure warns and leaves the monitor off, training goes on; under a multi-process
        run it raises too, since a rank that skipped the set-up's collectives would hang the others."""
        try:
            self._setup(args, state, model, optimizer)
        except CONFIG_ERRORS:
            raise
        except Exception as exc:
            if torch.distributed.is_available() and torch.distributed.is_initialized() \
                    and torch.distributed.get_world_size() > 1:
                raise
            self.monitor = None
            self._owes_reduction = False
            self._fail("on_train_begin", exc)

    def _setup(self, args, state, model, optimizer) -> None:
        self._place_before_reporters()
        if optimizer is None:
            raise ValueError("WeightForcesCallback needs the optimizer at train start; none was passed")
        self._plan = plan_optimizer(optimizer)  # how this optimizer's budget is read (core/optim.py)
        opt = unwrap_optimizer(optimizer)
        if getattr(self, "_overflow", None) is not None:
            self._overflow.close()
        self._overflow = OverflowWatch(optimizer)  # fused AdamW: a GradScaler skip Accelerate misses
        self.ctx = ShardContext()  # raises for a backend without a reader
        entries = self.ctx.entries(model, opt)
        infos = [describe(e.name, len(e.shape), e.numel, self.grouping) for e in entries]
        if not entries:
            raise ValueError("WeightForcesCallback: the optimizer has no parameters to monitor")
        self._entries = entries
        self._index_of = {id(e.param): i for i, e in enumerate(entries)}
        self.monitor = ForceMonitor(infos, device=entries[0].param.device, sample_every=self.offset_sample_every,
                                    sample_at=0 if self.offset_rule == "right" else self.every % self.offset_sample_every)
        self._kernel = choose_kernel(self.kernel)
        if self._kernel == "compiled":
            logger.info("weight forces: the per-step pass is compiled by torch.compile at the second budget step, "
                        "which waits for it (seconds to a minute, once per process)")
        self._norm_step = -1  # global step at which monitor.norm2 matches the weights
        self.pools = WeibullPools(infos, self.monitor.device, per_matrix=self.weibull_per_matrix)
        self._next_weibull = 0
        if self.super_weights and self.ctx.backend.sharded:
            raise ValueError("super_weights needs whole tensors (single process or DDP), "
                             f"not {self.ctx.backend.value}")
        self._super = None
        if self.super_weights and self.ctx.is_main:  # whole tensors on the main rank (DDP: beside the shares)
            self._super = SuperWeightTracker(self.super_weights, infos, [len(e.shape) for e in entries],
                                             self.monitor.device)
            self._super.select(self.ctx.whole_weights(entries))
        self._setup_readers(opt, entries)
        # a fused AdamW's overflow flag on an accelerator stays there: the planned pass masks the step
        self._overflow.defer = (self.monitor.budget_mode == "moments" and self._stager is None and self._super is None
                                and not self.ctx.backend.sharded)
        self.integral = RunIntegral([e.name for e in entries])
        self._skipped = 0
        self._last_logged = state.global_step
        self._active = self.ctx.computes
        self._owes_reduction = False
        self._sinks = self._make_sinks(args, state)
        self._frozen = find_frozen(model, opt, self.ctx.backend.value if self.ctx.backend.sharded else None)
        self._group_of = {id(p): g for g, group in enumerate(opt.param_groups) for p in group["params"]}
        if self._writes(state):
            with self._faults.guard("params", f"writing {PARAMS_FILE}", "offline tools read this run without it"):
                write_params_file(Path(args.output_dir) / self.output_subdir, opt, entries, infos, self.every,
                                  self._group_of, self._frozen, budget=self._budget_info)
        self.probes = list(self._all_probes)
        self._call_probes("setup", entries, infos, self.ctx, args, state)
        if state.global_step > 0:
            with self._faults.guard("restore", f"restoring the state at step {state.global_step}",
                                    "the force integrals restart here"):
                self._restore(args, state)
        logger.info(
            "weight forces: %d tensors, backend %s, every %d step(s), W&B row %s",
            len(entries), self.ctx.backend.value, self.every, "shared with train/loss" if self._ordered else "separate",
        )

    def _setup_readers(self, opt, entries: list[ParamEntry]) -> None:
        """AdamW: the moments after the step (low-precision tensors staged before it); any other
        optimizer: integrations/optimizers.py (bitsandbytes Adam and Lion staged, the rest observed)."""
        if self._reader is not None:
            self._reader.close()
        self._reader, mode = budget_reader(self._plan, opt, self.monitor, entries, self.ctx, self.observed_mode,
                                           self.observed_sample_size, self.observed_seed, self._index_of, self._kernel)
        self.monitor.budget_mode = mode
        self._budget_info = budget_info(self._plan, mode, self.observed_sample_size, self.observed_seed)
        if self._plan.path == "moments":
            self._reader.super_weights = self._super
            self._setup_intended(opt, entries)
            self._reader.stager = self._stager
            return
        if getattr(self, "rounding_split", False):
            raise ValueError(f"rounding_split needs AdamW's moments; {self._plan.name} has none to split")
        if self._super is not None:
            msg = f"weight forces: super_weights needs AdamW's moments; {self._plan.name} has none: switched off"
            logger.warning(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
            self._super = None

    def _setup_intended(self, opt, entries: list[ParamEntry]) -> None:
        """Low-precision parameters (and all of them with ``rounding_split``) get their budget
        from the intended update, staged before each budget step (integrations/intended.py)."""
        if self._stager is not None:
            self._stager.close()
            self._stager = None
        backend = self.ctx.backend
        low = [] if backend.deepspeed else [i for i, e in enumerate(entries) if e.param.dtype in LOW_PRECISION]
        staged = list(range(len(entries))) if self.rounding_split else low
        if not staged:
            return
        if backend.sharded:
            if self.rounding_split:
                raise ValueError(f"rounding_split needs a single process or DDP, not {backend.value}")
            logger.warning("weight forces: %d parameters are held in %s under %s; their forces are rebuilt from "
                           "the rounded post-step weights (approximate) and rounding is not split out",
                           len(low), entries[low[0]].param.dtype, backend.value)
            return
        if low:
            dtypes = sorted({str(entries[i].param.dtype).replace("torch.", "") for i in low})
            logger.warning(
                "weight forces: %d of %d trained parameters are stored in %s and updated with no float32 master: "
                "their forces are those of the update AdamW intended (exact, from w_t before the step), and "
                "weightforces/<aggregate>/rounding is the part of the observed change of ||w||^2 that rounding "
                "the stored weights took away or added (see docs/budget.md)", len(low), len(entries), "/".join(dtypes))
        if self.ctx.computes:
            self._stager = IntendedStager(opt, self.monitor, entries, staged, self.ctx)

    def _start_run_integral(self, state) -> None:
        """At the first step: the observed norms and the start fit (one reduction, all ranks)."""
        flat = self._reduce(
            lambda: torch.cat([self.monitor.norm2] + ([self.pools.counts(self.ctx.local_weights(self._entries))] if self.weibull_every else [])),
            len(self.monitor), bool(self.weibull_every),
        )
        norm2 = flat[: len(self.monitor)]
        self.integral.start(norm2)
        if self.weibull_every:
            self._start_metrics = self.pools.metrics(flat[len(self.monitor) :], norm2, self.integral)
            self._next_weibull = state.global_step + self.weibull_every

    # ------------------------------------------------------------------ checkpoints
    def _restore(self, args, state) -> None:
        """Continue the run's integrals (and the probes' state) from the checkpoint."""
        data = load_state(args, state, self.integral.names)
        if data is None:
            return
        self.integral = data["integral"]
        self._next_weibull = data["next_weibull"]
        restore_probes(data, self._all_probes, state.global_step, self.probes)

    def on_save(self, args, state, control, **kwargs):
        if self.monitor is None or self.ctx is None or not state.is_world_process_zero or not self.ctx.is_main:
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if not os.path.isdir(folder):
            return
        with self._faults.guard("save", f"writing {STATE_FILE} into {folder}",
                                "a resume from that checkpoint restarts the force integrals"):
            save_state(folder, self.integral, self._next_weibull, state.global_step, self._all_probes, self.probes)

    def _writes(self, state) -> bool:
        return bool(state.is_world_process_zero and self.ctx is not None and self.ctx.is_main)

    def _make_sinks(self, args, state) -> list[Sink]:
        if not self._writes(state):
            self._schedule = ScheduleLog(NullSink())
            return [NullSink()]
        schedule, metrics = open_record_sinks(Path(args.output_dir) / self.output_subdir, state.global_step)
        self._schedule = ScheduleLog(schedule)
        sinks: list[Sink] = [metrics]
        report_to = args.report_to or []
        if ("wandb" in report_to or "all" in report_to) and not self.to_all_integrations:
            sinks.append(WandbSink(ordered=self._ordered, dashboard=self.dashboard,
                                   records=Path(args.output_dir) / self.output_subdir))
        if not self.to_all_integrations:
            sinks += tracker_sinks(report_to, self.dashboard, Path(args.output_dir) / self.output_subdir)
        health = HealthWatch(Path(args.output_dir) / self.output_subdir, state.global_step,  # verdicts: docs/health.md
                             decay_rule=getattr(self, "_budget_info", {}).get("decay_rule"))
        if not self.quiet:
            shown = tracker_shows_keys(sinks[1:], self.to_all_integrations, self._ordered)  # sinks[0]: metrics.jsonl
            sinks.append(ConsoleSink(lines=not shown, health=health))
        return sinks + [health]

    # ------------------------------------------------------------------ degrading
    def _fail(self, where: str, exc: BaseException) -> None:
        self._active = False
        # Sharded: the other ranks will wait in the next all-reduce; keep joining it, flagged.
        sharded = self.ctx is not None and self.ctx.reduces
        self._owes_reduction = sharded and not isinstance(exc, ShardFailureError)
        if not self._warned:
            self._warned = True
            msg = f"weight forces switched off after an error in {where}: {type(exc).__name__}: {exc}"
            logger.warning(msg, exc_info=True)
            warnings.warn(msg, RuntimeWarning, stacklevel=2)

    def _reduce(self, local_part, head: int, with_weibull: bool) -> np.ndarray:
        """One all-reduce (of the run's start or of a log event), joined by every rank whatever
        happened to it.  A rank whose local part fails now, or that failed earlier, sends zeros of
        the agreed length with a failure flag; every rank then raises ShardFailureError together
        (see ShardContext.all_reduce_sum), so none is left waiting in a collective."""
        failed = not self._active
        flat = None
        if not failed:
            try:
                flat = local_part()
            except Exception as exc:
                self._fail("the local part of a reduction", exc)
                failed = True
        if flat is None:
            size = head + (self.pools.size if with_weibull else 0)
            flat = torch.zeros(size, dtype=torch.float64, device=self.monitor.device)
        return self.ctx.all_reduce_sum(flat, failed=failed).cpu().numpy()

    def _call_probes(self, method: str, *args) -> list:
        """Call one hook on every running probe; a probe that raises warns once and is dropped
        alone, the force budget goes on."""
        results = []
        for probe in list(self.probes):
            try:
                results.append(getattr(probe, method)(*args))
            except Exception as exc:
                self.probes.remove(probe)
                msg = f"weight-forces probe {type(probe).__name__} switched off after an error in {method}: {exc!r}"
                logger.warning(msg, exc_info=True)
                warnings.warn(msg, RuntimeWarning, stacklevel=2)
        return results

    def _is_budget_step(self, step_id: int) -> bool:
        return step_id % self.every == 0

    # ------------------------------------------------------------------ per step
    def on_step_begin(self, args, state, control, **kwargs):
        if not (self._active or self._owes_reduction):
            return
        first, budget_step = not self.integral.started, False
        try:
            budget_step = self._is_budget_step(state.global_step + 1)
            if self._active and (first or budget_step) and self._norm_step != state.global_step:
                self.monitor.observe_norms(self.ctx.local_weights(self._entries))
                self._norm_step = state.global_step
        except Exception as exc:  # a diagnostic never stops training
            self._fail("on_step_begin", exc)
        try:
            if first:
                self._start_run_integral(state)  # collective: joined even after a failure above
            if self._stager is not None:
                self._stager.due = self._active and budget_step
            if self._reader is not None and self._active and budget_step:
                self._reader.before_step()  # e.g. w_t kept, before any backward of this cycle
            if self._active and self._super is not None and budget_step:
                self._super.observe(self.ctx.whole_weights(self._entries))
        except Exception as exc:  # a diagnostic never stops training
            self._fail("on_step_begin", exc)

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if not self._active:
            return
        step_id = state.global_step + 1  # the Trainer increments global_step after this hook
        try:
            budget_step = self._is_budget_step(step_id)
            skipped = self._overflow.skipped(optimizer, budget_step)
            opt = unwrap_optimizer(optimizer)
            if self._schedule.enabled:  # the lr the step used, whatever a scheduler did since
                self._schedule.note(step_id, self.ctx.step_lrs(opt), opt.param_groups, self._overflow.last)
            if self.probes:
                self._call_probes("on_step", step_id, optimizer, skipped)
            if skipped:
                self._skipped += 1
                if self._norm_step == state.global_step:
                    self._norm_step = step_id  # weights unchanged
                return
            if not budget_step:
                return
            if self._norm_step != state.global_step:
                raise RuntimeError("no norm observed before the step (on_step_begin did not run)")
            self._reader.record(opt, step_id)
            self._norm_step = step_id
            if not self._is_budget_step(step_id + 1):  # no budget step continues this one's chain: it ends on
                self.monitor.end_chain()  # the weights as they are (docs/budget.md, section 9)
        except Exception as exc:
            self._fail("on_optimizer_step", exc)

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        if not self._active or not self.probes:
            return
        try:
            self._call_probes("on_gradients", state.global_step + 1, model, optimizer)
        except Exception as exc:
            self._fail("on_pre_optimizer_step", exc)

    # ------------------------------------------------------------------ per log event
    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or not (self._active or self._owes_reduction):
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
        log_to_sinks(self._sinks, metrics, state.global_step)  # a broken sink is dropped alone

    def _collect(self, state) -> dict[str, float]:
        """One reduction, one host transfer, then plain float64 arithmetic on the host."""
        mon = self.monitor
        weibull_due = bool(self.weibull_every) and state.global_step >= self._next_weibull

        def local_part() -> torch.Tensor:
            if self._norm_step != state.global_step:
                mon.observe_norms(self.ctx.local_weights(self._entries))
                self._norm_step = state.global_step
            return torch.cat([mon.pack()] + ([self.pools.counts(self.ctx.local_weights(self._entries))] if weibull_due else []))

        flat = self._reduce(local_part, mon.packed_size, weibull_due)
        overflows, budget_overflows = self._overflow.drain()  # deferred device flags: their steps added nothing
        self._skipped += overflows
        steps = mon.steps - budget_overflows
        mon.reset()
        packed = mon.unpack(flat[: mon.packed_size])
        self.integral.add(packed.sums[:, :3].sum(axis=1), packed.sampled, self.every)
        metrics = mon.summarize(flat[: mon.packed_size], steps, per_layer=self.per_layer, per_matrix=self.per_matrix)
        if getattr(self, "_start_metrics", None):  # the start fit goes out with the first row
            metrics.update({k.replace("/weibull_", "/start_weibull_"): v for k, v in self._start_metrics.items()
                            if k.endswith(("/weibull_k", "/weibull_scale"))})
            self._start_metrics = None
        if weibull_due:
            metrics.update(self.pools.metrics(flat[mon.packed_size :], packed.norm2, self.integral))
            self._next_weibull = (state.global_step // self.weibull_every + 1) * self.weibull_every
        if self._super is not None:
            metrics.update(self._super_metrics(packed, steps, flat[mon.packed_size :] if weibull_due else None))
        if self._writes(state):  # whole frozen tensors, the same on every rank: read once
            metrics.update(self._frozen.metrics())
        for probe_metrics in self._call_probes("collect", state.global_step):
            metrics.update(probe_metrics)
        self._schedule.flush()
        metrics["weightforces/skipped_steps"] = float(self._skipped)
        self._skipped = 0
        return metrics

    def _super_metrics(self, packed, steps: int, counts: np.ndarray | None) -> dict[str, float]:
        """How much the numbers move without the super weights; then re-pick them."""
        sup = self._super
        metrics = sup.metrics(packed.sums, self.monitor.aggregates(per_layer=False), steps)
        weights = self.ctx.whole_weights(self._entries)
        if counts is not None:
            pools = self.pools
            rows = counts.reshape(len(pools.names), -1) - sup.counts(weights, pools.rows, len(pools.names), pools.edges)
            for name, fit in zip(pools.names, pools.fits(rows)):
                metrics[f"weightforces/{name}/weibull_k_no_super"] = fit.k
                metrics[f"weightforces/{name}/weibull_scale_no_super"] = fit.scale
        sup.select(weights)
        return metrics

    def on_train_end(self, args, state, control, **kwargs):
        close_sinks(self._sinks)  # each one guarded
        if getattr(self, "_schedule", None) is not None:
            with self._faults.guard("close", "closing schedule.jsonl", "its last rows may be missing"):
                self._schedule.close()
        for name in ("_stager", "_reader", "_overflow"):
            hook = getattr(self, name, None)
            if hook is not None:
                with self._faults.guard("close", f"removing the monitor's optimizer hooks ({name[1:]})",
                                        "nothing recorded is affected"):
                    hook.close()
                setattr(self, name, None)
        if self.ctx is not None:
            with self._faults.guard("close", "removing the monitor's optimizer hook", "nothing recorded is affected"):
                self.ctx.close()  # the step hook it put on the optimizer
