"""One prepared check of the weight-forces callback on one GPU: one table, one JSON.

    python benchmarks/gpu_check.py                          # one CUDA device: under 8 minutes
    python benchmarks/gpu_check.py --device cpu --out x.json  # smoke mode: tiny sizes, under a minute

Needs torch, transformers and accelerate only (no wandb, no deepspeed, no network: models are
built from configs, the data is the Python standard library's source).  Sections, each catching
its own failure and reporting it in the table:

* ``overhead/<size>``: GPT-NeoX at Pythia-160M and -410M sizes (Pythia's vocabulary, so the real
  parameter counts), bf16 autocast, ``adamw_torch_fused``, a batch sized to fill most of the GPU;
  runs without and with the callback (budget every step, logging every 10) interleaved, every
  step timed with CUDA events; the median step time of each, the GPU time inside the callback's
  ``on_optimizer_step`` and the force pass (the budget source's ``record``) (CUDA events), the force pass's achieved
  bandwidth against its floor of one read of w, m and v (12 bytes a parameter, also timed as
  three ``torch._foreach_norm`` passes), the thread CPU time inside every hook, and the peak extra
  GPU memory (run peak with vs without, and the allocation peak inside the optimizer-step hook).
* ``pass/<size>``: the force pass alone on the model's real layout (its parameters, AdamW-like
  moments): the default eager pass (``exact``), the opt-in ``compiled`` one (``torch.compile``,
  compiled before timing) and the floor (three ``torch._foreach_norm`` passes over w, m, v), side
  by side, each the median of repeated runs (CUDA events); the operations one step dispatches, and
  the largest difference of the compiled sums from the exact ones.
* ``sync``: steps of the callback with ``torch.cuda.set_sync_debug_mode("error")`` switched on
  inside every hook of the callback and the optimizer pre-hook it registers, between log events;
  pass/fail with the offending operation.
* ``scaler_skip``: fp16 with a GradScaler and the fused AdamW (step counters on the device), a
  NaN loss at one step: is the skipped step counted as a budget step?
* ``fsdp2``: FSDP2 at world size 1 (forced as in ``tests/dist_worker.py``) against one plain
  process: the callback's backend and the largest relative difference of the forces.

``--device cpu`` runs the same code on tiny sizes (what CI runs; the sync check is skipped).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

# model sizes: name -> (hidden, layers, heads, intermediate, vocab); Pythia's own for 160m and 410m
SIZES = {
    "160m": (768, 12, 12, 3072, 50304),
    "410m": (1024, 24, 16, 4096, 50304),
    "1.4b": (2048, 24, 16, 8192, 50304),
    "tiny": (64, 2, 4, 256, 256),
}
FORCE_KEYS = ("align", "inject", "decay", "rest", "delta")


# ----------------------------------------------------------------------------- plumbing
class Clock:
    """Step stamps and intervals: CUDA events on a GPU, ``perf_counter`` on a CPU (milliseconds)."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda

    def stamp(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def ms(self, a, b) -> float:
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


def _model(size: str, seed: int = 0):
    from transformers import GPTNeoXForCausalLM

    from hf_weightforces.demo import pythia_config

    hidden, layers, heads, inter, vocab = SIZES[size]
    torch.manual_seed(seed)
    return GPTNeoXForCausalLM(pythia_config("70m", vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                                            num_attention_heads=heads, intermediate_size=inter))


def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def _train(cfg, size: str, out: str, callbacks: list, *, steps: int, batch: int, data, logging_steps: int = 10,
           trainer_cls=None, **kw):
    """A real Trainer run; returns the trainer after ``train()``."""
    from transformers import Trainer, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    _reset_accelerate()
    gpu = cfg.device == "cuda"
    precision = kw.pop("precision", "bf16" if gpu else None)
    args = TrainingArguments(
        output_dir=out, max_steps=steps, per_device_train_batch_size=batch, learning_rate=kw.pop("learning_rate", 3e-4),
        weight_decay=0.1, warmup_steps=kw.pop("warmup_steps", 2), logging_steps=logging_steps, report_to="none",
        save_strategy="no", disable_tqdm=True, seed=0, data_seed=0, dataloader_num_workers=0,
        optim=kw.pop("optim", "adamw_torch_fused"), use_cpu=kw.pop("use_cpu", not gpu),
        bf16=precision == "bf16", fp16=precision == "fp16", **kw,
    )
    trainer = (trainer_cls or Trainer)(model=_model(size), args=args, train_dataset=data, callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    return trainer


def _callback_class():
    """The real callback, with every hook (and the optimizer pre-hook of its reader) timed from
    outside: thread CPU time, and GPU time and allocation peak around ``on_optimizer_step`` and
    the force pass (the budget source's ``record``: planned or per-tensor)."""
    from transformers import TrainerCallback

    from hf_weightforces import WeightForcesCallback

    class Timed(WeightForcesCallback):
        clock: Clock

        def setup_timing(self, clock: Clock) -> Timed:
            self.clock, self.cpu_s, self.opt_events, self.rv_events = clock, 0.0, [], []
            self.hook_peak, self.run_peak = 0, 0
            return self

        def _cpu(name):  # noqa: N805 - a decorator factory in the class body
            def hook(self, *a, **k):
                t0 = time.thread_time()
                try:
                    return getattr(WeightForcesCallback, name)(self, *a, **k)
                finally:
                    self.cpu_s += time.thread_time() - t0
            return hook

        on_step_begin = _cpu("on_step_begin")
        on_pre_optimizer_step = _cpu("on_pre_optimizer_step")
        on_log = _cpu("on_log")
        on_save = _cpu("on_save")

        def on_train_begin(self, args, state, control, **kw):
            t0 = time.thread_time()
            try:
                return WeightForcesCallback.on_train_begin(self, args, state, control, **kw)
            finally:
                self.cpu_s += time.thread_time() - t0
                self._time_reader()
                if self._reader is not None:  # the force pass: planned or per-tensor, and its rows added
                    self._reader.record = self._timed_pass(self._reader.record)

        def _timed_pass(self, inner):
            def timed(*a, **k):
                start = self.clock.stamp()
                try:
                    return inner(*a, **k)
                finally:
                    self.rv_events.append((start, self.clock.stamp()))
            return timed

        def _time_reader(self) -> None:
            rec = getattr(getattr(self.ctx, "_reader", None), "rec", None)
            if rec is None or not hasattr(rec, "_handle"):
                return
            rec._handle.remove()  # re-register the same pre-hook, timed
            inner = rec._record

            def timed(*a, **k):
                t0 = time.thread_time()
                try:
                    return inner(*a, **k)
                finally:
                    self.cpu_s += time.thread_time() - t0
            opt = self._opt_for_timing
            rec._handle = opt.register_step_pre_hook(timed)

        def on_optimizer_step(self, args, state, control, **kw):
            cuda = self.clock.cuda
            if cuda:
                self.run_peak = max(self.run_peak, torch.cuda.max_memory_allocated())
                before = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            t0, start = time.thread_time(), self.clock.stamp()
            try:
                return WeightForcesCallback.on_optimizer_step(self, args, state, control, **kw)
            finally:
                self.opt_events.append((start, self.clock.stamp()))
                self.cpu_s += time.thread_time() - t0
                if cuda:
                    self.hook_peak = max(self.hook_peak, torch.cuda.max_memory_allocated() - before)

    class Grab(TrainerCallback):
        """Hands the torch optimizer to the timed callback before its on_train_begin."""

        def __init__(self, cb) -> None:
            self.cb = cb

        def on_train_begin(self, args, state, control, optimizer=None, **kw):
            from hf_weightforces.core.optim import check_supported

            self.cb._opt_for_timing = check_supported(optimizer)

    return Timed, Grab


class StepClock:
    def __init__(self, clock: Clock) -> None:
        from transformers import TrainerCallback

        outer = self

        class _Cb(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                outer.stamps.append(outer.clock.stamp())

            def on_train_end(self, args, state, control, **kw):
                outer.stamps.append(outer.clock.stamp())

        self.clock, self.stamps, self.callback = clock, [], _Cb()

    def steps_ms(self) -> list[float]:
        self.clock.sync()
        return [self.clock.ms(a, b) for a, b in zip(self.stamps, self.stamps[1:])]


# ----------------------------------------------------------------------------- sections
def _fill_batch(cfg, size: str, data) -> int:
    """The batch that fills about 70% of the GPU: two probe steps at a small batch, then linear
    in the activations (capped so that a step stays well under a second)."""
    if cfg.device != "cuda":
        return cfg.batch or 8
    if cfg.batch:
        return cfg.batch
    probe = 4
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as out:
        trainer = _train(cfg, size, out, [], steps=2, batch=probe, data=data)
        n = sum(p.numel() for p in trainer.model.parameters())
        del trainer
    peak = torch.cuda.max_memory_allocated()
    static = 16 * n  # fp32 weights, gradients and the two moments
    total = torch.cuda.get_device_properties(0).total_memory
    per_sample = max(1.0, (peak - static) / probe)
    return int(max(probe, min(cfg.max_batch, (0.7 * total - static) // per_sample)))


def _foreach_floor_ms(opt, clock: Clock, repeats: int = 5) -> tuple[float, int]:
    """Time of three ``torch._foreach_norm`` passes over the fp32 w, m, v of the optimizer: a
    practical floor for one read of 12 bytes a parameter.  Returns (ms, bytes)."""
    ws, ms, vs = [], [], []
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p, {})
            if "exp_avg" in st:
                ws.append(p.detach())
                ms.append(st["exp_avg"])
                vs.append(st["exp_avg_sq"])
    nbytes = sum(t.numel() * t.element_size() for t in ws + ms + vs)
    times = []
    for _ in range(repeats):
        a = clock.stamp()
        for ts in (ws, ms, vs):
            torch._foreach_norm(ts)
        b = clock.stamp()
        clock.sync()
        times.append(clock.ms(a, b))
    return statistics.median(times), nbytes


def section_overhead(cfg, size: str, data) -> dict:
    Timed, Grab = _callback_class()
    clock = Clock(cfg.device == "cuda")
    batch = _fill_batch(cfg, size, data)
    plain, watched, inside_gpu, rv_gpu, cpu, peaks, hook_peak = [], [], [], [], [], {"plain": 0, "watched": 0}, 0
    floor = None
    for _ in range(cfg.repeats):  # interleaved: drift hits both
        for kind in ("plain", "watched"):
            sc = StepClock(clock)
            cbs = [sc.callback]
            if kind == "watched":
                cb = Timed(every=1).setup_timing(clock)
                cbs = [Grab(cb), sc.callback, cb]
            if clock.cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            with tempfile.TemporaryDirectory() as out:
                trainer = _train(cfg, size, out, cbs, steps=cfg.steps, batch=batch, data=data)
                steps = sc.steps_ms()[cfg.warmup:]
                (plain if kind == "plain" else watched).extend(steps)
                if clock.cuda:
                    peaks[kind] = max(peaks[kind], torch.cuda.max_memory_allocated())
                if kind == "watched":
                    clock.sync()
                    n_steps = len(cb.opt_events)
                    inside_gpu.append(sum(clock.ms(a, b) for a, b in cb.opt_events[cfg.warmup:]) / max(1, n_steps - cfg.warmup))
                    rv = cb.rv_events[cfg.warmup:]
                    rv_gpu.append(sum(clock.ms(a, b) for a, b in rv) / max(1, len(rv)))
                    cpu.append(cb.cpu_s * 1e3 / max(1, n_steps))
                    peaks["watched"] = max(peaks["watched"], cb.run_peak)
                    hook_peak = max(hook_peak, cb.hook_peak)
                    if floor is None:
                        from hf_weightforces.core.optim import check_supported

                        floor = _foreach_floor_ms(check_supported(trainer.optimizer), clock)
                n_params = sum(p.numel() for p in trainer.model.parameters())
                del trainer
    p, w = statistics.median(plain), statistics.median(watched)
    rv, hook = statistics.median(rv_gpu), statistics.median(inside_gpu)
    floor_ms, floor_bytes = floor
    bytes_12 = 12 * n_params
    return {
        "params": n_params, "batch": batch, "seq": cfg.seq, "steps": cfg.steps, "repeats": cfg.repeats,
        "plain_ms": p, "watched_ms": w, "overhead_pct": 100 * (w - p) / p,
        "hook_ms": hook, "hook_pct": 100 * hook / p, "force_pass_ms": rv, "hook_cpu_ms": statistics.median(cpu),
        "bytes_12": bytes_12, "force_pass_GBps": bytes_12 / (rv * 1e-3) / 1e9 if rv > 0 else math.nan,
        "floor_ms": floor_ms, "floor_GBps": floor_bytes / (floor_ms * 1e-3) / 1e9 if floor_ms > 0 else math.nan,
        "force_pass_over_floor": rv / floor_ms if floor_ms > 0 else math.nan,
        "peak_plain_MiB": peaks["plain"] / 2**20, "peak_watched_MiB": peaks["watched"] / 2**20,
        "peak_extra_MiB": (peaks["watched"] - peaks["plain"]) / 2**20, "hook_alloc_peak_MiB": hook_peak / 2**20,
    }


@contextlib.contextmanager
def sync_errors():
    """``set_sync_debug_mode("error")`` inside the block, the previous mode after it."""
    prev = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(prev)


def sync_checked_callback(**kw):
    """A WeightForcesCallback whose hooks (and the optimizer pre-hook of its reader) run with
    synchronising CUDA operations raising, except ``on_log`` (a log event may synchronise) and the
    first ``on_step_begin`` (the run's start reduces the initial norms once).
    The callback catches its own errors (warns once and switches off), so failures are kept in
    ``cb.sync_failures`` as (hook, message, innermost project frame)."""
    from hf_weightforces import WeightForcesCallback

    class SyncChecked(WeightForcesCallback):
        sync_failures: list

        def _fail(self, where, exc):
            frames = [f for f in traceback.extract_tb(exc.__traceback__) if "hf_weightforces" in f.filename]
            at = f"{Path(frames[-1].filename).name}:{frames[-1].lineno} {frames[-1].line}" if frames else "?"
            self.sync_failures.append((where, f"{type(exc).__name__}: {exc}".splitlines()[0], at))
            return WeightForcesCallback._fail(self, where, exc)

        def _checked(name):  # noqa: N805
            def hook(self, args, state, control, **k):
                if name == "on_step_begin" and state.global_step == 0:  # the run's start: one reduction, allowed
                    return getattr(WeightForcesCallback, name)(self, args, state, control, **k)
                with sync_errors():
                    return getattr(WeightForcesCallback, name)(self, args, state, control, **k)
            return hook

        on_step_begin = _checked("on_step_begin")
        on_pre_optimizer_step = _checked("on_pre_optimizer_step")
        on_optimizer_step = _checked("on_optimizer_step")

        def on_train_begin(self, args, state, control, **k):
            out = WeightForcesCallback.on_train_begin(self, args, state, control, **k)
            rec = getattr(getattr(self.ctx, "_reader", None), "rec", None)
            if rec is not None:  # the pre-hook, checked too
                inner = rec._record

                def checked(*a, **kk):
                    with sync_errors():
                        return inner(*a, **kk)
                rec._handle.remove()
                from hf_weightforces.core.optim import check_supported

                rec._handle = check_supported(k["optimizer"]).register_step_pre_hook(checked)
            return out

    cb = SyncChecked(**kw)
    cb.sync_failures = []
    return cb


def section_sync(cfg, data) -> dict:
    if cfg.device != "cuda":
        return {"status": "skip", "detail": "no CUDA device"}
    cb = sync_checked_callback(every=1)
    with tempfile.TemporaryDirectory() as out, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _train(cfg, "tiny", out, [cb], steps=12, batch=8, data=data, logging_steps=6)
    ok = not cb.sync_failures and cb._active
    first = cb.sync_failures[0] if cb.sync_failures else None
    return {"status": "ok" if ok else "fail", "passed": ok,
            "detail": "no host sync between log events" if ok else f"{first[0]}: {first[1]} at {first[2]}",
            "failures": cb.sync_failures}


def section_scaler_skip(cfg, data) -> dict:
    """fp16 + GradScaler + fused AdamW, a NaN loss at step SKIP: logged every step, is that step
    a budget step (forces and a broken closure) or left out (no forces, Δ = 0)?"""
    from transformers import Trainer

    from hf_weightforces import WeightForcesCallback
    from hf_weightforces.integrations.sinks import read_jsonl

    skip = 3

    class NanTrainer(Trainer):
        def create_accelerator_and_postprocess(self):
            super().create_accelerator_and_postprocess()
            if cfg.device != "cuda":  # a CPU GradScaler, as tests/dist_worker.py does
                self.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=1.0, growth_interval=10**6)

        def compute_loss(self, model, inputs, *a, **k):
            out = super().compute_loss(model, inputs, *a, **k)
            if self.state.global_step + 1 == skip:
                out = (out[0] * float("nan"), *out[1:]) if isinstance(out, tuple) else out * float("nan")
            return out

    cb = WeightForcesCallback(every=1, weibull_every=0)
    with tempfile.TemporaryDirectory() as out:
        _train(cfg, "tiny", out, [cb], steps=5, batch=8, data=data, logging_steps=1, trainer_cls=NanTrainer,
               precision="fp16" if cfg.device == "cuda" else None)
        rows = {r["step"]: r for r in read_jsonl(Path(out) / "weightforces" / "metrics.jsonl")}
    r = rows[skip]
    t = "weightforces/total/"
    # a step left out has no budget (the row then has no forces at all, or zeros)
    budget = sum(abs(r.get(f"{t}{k}", 0.0)) for k in ("align", "inject", "decay"))
    counted = budget > 0
    step_dev = "cuda" if cfg.device == "cuda" else "cpu"
    return {
        "status": "ok", "step_counters_on": step_dev, "skipped_step_counted_as_budget_step": counted,
        "reported_skipped": r.get("weightforces/skipped_steps"), "budget_steps": r.get("weightforces/steps"),
        "align": r.get(f"{t}align", 0.0), "delta": r.get(f"{t}delta", 0.0),
        "closure_rel": r.get(f"{t}closure_rel"),
        "detail": ("counted: forces of a step not taken (closure broken)" if counted
                   else "left out: no forces, no change (correct)"),
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def section_fsdp2(cfg, data) -> dict:
    """FSDP2 at world size 1 against one plain process: the same forces."""
    from transformers import Trainer

    from hf_weightforces import WeightForcesCallback
    from hf_weightforces.integrations.sinks import read_jsonl

    class FSDPTrainer(Trainer):
        def create_accelerator_and_postprocess(self):
            super().create_accelerator_and_postprocess()
            from accelerate.state import PartialState
            from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

            st = self.accelerator.state
            st.fsdp_plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
            st.distributed_type = DistributedType.FSDP
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            self.is_fsdp_enabled = True

    size, steps = ("tiny", 6) if cfg.device != "cuda" else ("160m", 6)
    batch = 8
    rows = {}
    with tempfile.TemporaryDirectory() as out:
        cb = WeightForcesCallback(every=1, per_layer=False, weibull_every=0)
        # fp32 on both sides: the comparison is of the bookkeeping, not of bf16 noise
        _train(cfg, size, f"{out}/plain", [cb], steps=steps, batch=batch, data=data, logging_steps=3, precision=None)
        rows["plain"] = read_jsonl(Path(out) / "plain" / "weightforces" / "metrics.jsonl")
        env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0", "WORLD_SIZE": "1",
               "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            if not torch.distributed.is_initialized():
                torch.distributed.init_process_group("nccl" if cfg.device == "cuda" else "gloo")
            cb = WeightForcesCallback(every=1, per_layer=False, weibull_every=0)
            fsdp = {"fsdp": True, "fsdp_config": {"version": 2, "transformer_layer_cls_to_wrap": ["GPTNeoXLayer"]}}
            if cfg.device != "cuda":
                fsdp["use_cpu"] = True
            trainer = _train(cfg, size, f"{out}/fsdp2", [cb], steps=steps, batch=batch, data=data, logging_steps=3,
                             trainer_cls=FSDPTrainer, precision=None, **fsdp)
            backend = cb.ctx.backend.value if cb.ctx is not None else None
            wrapped = type(trainer.model_wrapped).__name__
            rows["fsdp2"] = read_jsonl(Path(out) / "fsdp2" / "weightforces" / "metrics.jsonl")
        finally:
            if torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
            for k, v in old.items():
                os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
            _reset_accelerate()
    worst = 0.0
    for a, b in zip(rows["plain"], rows["fsdp2"]):
        for k in FORCE_KEYS:
            key = f"weightforces/total/{k}"
            budget = sum(abs(a[f"weightforces/total/{f}"]) for f in ("align", "inject", "decay"))
            worst = max(worst, abs(a[key] - b[key]) / max(budget, 1e-30))
    same_steps = [r["step"] for r in rows["plain"]] == [r["step"] for r in rows["fsdp2"]]
    ok = backend == "fsdp2" and same_steps and worst < 1e-3
    return {"status": "ok" if ok else "fail", "backend": backend, "model_wrapped": wrapped, "rows": len(rows["fsdp2"]),
            "max_rel_diff_vs_plain": worst,
            "detail": f"backend {backend} ({wrapped}), forces within {worst:.1e} of the budget of one plain process"}


def section_pass(cfg, size: str) -> dict:
    """The planned pass alone, ``exact`` and ``compiled`` against the floor, on one layout."""
    from op_count import OpCounter  # benchmarks/op_count.py, beside this script

    from hf_weightforces.core.plan import StepPlan

    dev = torch.device(cfg.device)
    clock = Clock(dev.type == "cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    ws = [p.detach().to(dev).reshape(-1) for p in _model(size).parameters()]
    ms = [torch.randn(w.shape, generator=gen, device=dev) * 1e-3 for w in ws]
    vs = [torch.rand(w.shape, generator=gen, device=dev) * 1e-6 for w in ws]
    n = len(ws)
    t_before, t_after = torch.zeros(n, device=dev), torch.ones(n, device=dev)

    def timed(fn) -> float:
        for _ in range(3):  # warm-up (the compiled pass compiles here)
            fn()
        stamps = []
        for _ in range(cfg.pass_repeats):
            a = clock.stamp()
            fn()
            stamps.append((a, clock.stamp()))
        clock.sync()
        return statistics.median(clock.ms(a, b) for a, b in stamps)

    out: dict = {"params": sum(w.numel() for w in ws), "tensors": n}
    sums = {}
    # the compiled pass on the first size only: each layout compiles its own graphs (tens of seconds each)
    kernels = ("exact", "compiled") if size == cfg.sizes[0] else ("exact",)
    for kernel in kernels:
        plan = StepPlan(list(range(n)), [0] * n, 1, [False] * n, [w.numel() for w in ws], dev, kernel)
        norm2 = torch.zeros(n, dtype=torch.float64, device=dev)
        hv = plan.step_vector([1e-4], [(0.01, 0.9, 0.999, 1e-8)])
        # the step's terms computed alone (a run computes the eager pass's at the log event), as the compiled pass does
        step = lambda plan=plan, norm2=norm2, hv=hv: plan.run(ws, ms, vs, t_after, t_before, hv, norm2).terms  # noqa: E731
        out[f"{kernel}_ms"] = timed(step)
        with OpCounter() as counter:
            sums[kernel] = step()
        out[f"{kernel}_ops"] = counter.total
    out["floor_ms"] = timed(lambda: [torch._foreach_norm(xs) for xs in (ws, ms, vs)])
    for kernel in kernels:
        out[f"{kernel}_over_floor"] = out[f"{kernel}_ms"] / out["floor_ms"]
    if "compiled" in sums:
        scale = sums["exact"].abs()[:, :4].sum(1, keepdim=True).clamp_min(1e-300)
        out["compiled_vs_exact_rel"] = float(((sums["compiled"] - sums["exact"])[:, :4].abs() / scale).max())
    return out


# ----------------------------------------------------------------------------- driver
def _run_section(name: str, fn, results: dict, *args) -> None:
    t0 = time.perf_counter()
    try:
        res = fn(*args)
        res.setdefault("status", "ok")
    except Exception as exc:  # one failure must not lose the other sections
        res = {"status": "fail", "detail": f"{type(exc).__name__}: {exc}".splitlines()[0][:300],
               "traceback": traceback.format_exc()[-3000:]}
    res["seconds"] = round(time.perf_counter() - t0, 1)
    results[name] = res
    logging.getLogger("gpu_check").info("%s: %s (%.0f s)", name, res["status"], res["seconds"])


def _summary(name: str, r: dict) -> str:
    if r["status"] != "ok" or name.startswith(("sync", "scaler", "fsdp")):
        return r.get("detail", "")
    if name.startswith("pass/"):
        compiled = (f", compiled {r['compiled_ms']:.2f} ms ({r['compiled_over_floor']:.1f}x, {r['compiled_ops']} ops, "
                    f"{r['compiled_vs_exact_rel']:.1e} from exact)" if "compiled_ms" in r else "")
        return (f"{r['params'] / 1e6:.1f}M params, {r['tensors']} tensors: exact {r['exact_ms']:.2f} ms "
                f"({r['exact_over_floor']:.1f}x floor, {r['exact_ops']} ops){compiled}, floor {r['floor_ms']:.2f} ms")
    return (f"{r['params'] / 1e6:.1f}M params, batch {r['batch']}x{r['seq']}: plain {r['plain_ms']:.1f} ms, "
            f"with {r['watched_ms']:.1f} ms ({r['overhead_pct']:+.1f}%); hook {r['hook_ms']:.2f} ms "
            f"({r['hook_pct']:.2f}%), CPU {r['hook_cpu_ms']:.2f} ms; force pass {r['force_pass_ms']:.2f} ms = "
            f"{r['force_pass_GBps']:.0f} GB/s vs floor {r['floor_GBps']:.0f} GB/s "
            f"({r['force_pass_over_floor']:.1f}x); peak extra {r['peak_extra_MiB']:.0f} MiB, "
            f"in hook {r['hook_alloc_peak_MiB']:.0f} MiB")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="gpu_check.json")
    ap.add_argument("--sizes", nargs="+", default=None, help="default: 160m 410m on a GPU, tiny on a CPU")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--batch", type=int, default=0, help="0: fill the GPU")
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--pass-repeats", type=int, default=None)
    ap.add_argument("--sections", nargs="+", default=["pass", "overhead", "sync", "scaler_skip", "fsdp2"])
    cfg = ap.parse_args(argv)
    if cfg.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is available (use --device cpu)", file=sys.stderr)
        return 2
    gpu = cfg.device == "cuda"
    cfg.sizes = cfg.sizes or (["160m", "410m"] if gpu else ["tiny"])
    cfg.steps = cfg.steps or (30 if gpu else 8)
    cfg.warmup = cfg.warmup if cfg.warmup is not None else (8 if gpu else 2)
    cfg.repeats = cfg.repeats or (2 if gpu else 1)
    cfg.seq = cfg.seq or (1024 if gpu else 64)
    cfg.pass_repeats = cfg.pass_repeats or (20 if gpu else 3)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "0")) or torch.get_num_threads())
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("transformers", "accelerate", "hf_weightforces", "torch"):
        logging.getLogger(noisy).setLevel(logging.ERROR)

    from hf_weightforces.demo import make_datasets

    t0 = time.perf_counter()
    data = make_datasets(block_size=cfg.seq, max_bytes=12_000_000 if gpu else 400_000, eval_fraction=0.01)[0]
    small = make_datasets(block_size=64, max_bytes=400_000, eval_fraction=0.01)[0]
    import accelerate
    import transformers

    results: dict[str, dict] = {}
    env = {"torch": torch.__version__, "transformers": transformers.__version__, "accelerate": accelerate.__version__,
           "python": platform.python_version(), "device": torch.cuda.get_device_name() if gpu else platform.processor() or "cpu",
           "threads": torch.get_num_threads()}
    if "pass" in cfg.sections:
        for size in cfg.sizes + (["1.4b"] if gpu and cfg.sizes == ["160m", "410m"] else []):
            _run_section(f"pass/{size}", section_pass, results, cfg, size)
    if "overhead" in cfg.sections:
        for size in cfg.sizes:
            _run_section(f"overhead/{size}", section_overhead, results, cfg, size, data)
    if "sync" in cfg.sections:
        _run_section("sync", section_sync, results, cfg, small)
    if "scaler_skip" in cfg.sections:
        _run_section("scaler_skip", section_scaler_skip, results, cfg, small)
    if "fsdp2" in cfg.sections:  # last: it leaves a process group and FSDP state behind
        _run_section("fsdp2", section_fsdp2, results, cfg, data if gpu else small)
    total = time.perf_counter() - t0

    print(f"\nweight-forces GPU check on {env['device']} (torch {env['torch']}, transformers {env['transformers']}), "
          f"{total:.0f} s\n")
    print("| section | status | result |")
    print("|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['status']} | {_summary(name, r)} |")
    Path(cfg.out).write_text(json.dumps({"env": env, "device": cfg.device, "seconds": total, "sections": results},
                                        indent=1, default=str))
    print(f"\nJSON: {cfg.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
