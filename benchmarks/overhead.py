"""What watching the weights costs, side by side in one process: the weight-forces budget,
``wandb.watch`` and a per-tensor loop, against the same training with nothing attached.

    OMP_NUM_THREADS=1 python benchmarks/overhead.py                # tiny and bench models on CPU
    OMP_NUM_THREADS=1 python benchmarks/overhead.py --sizes bench --steps 60 --repeats 3

Each configuration trains the same model (same seed, same data, the real Trainer) for ``--steps``
optimizer steps; the configurations take turns ``--repeats`` times, so drift on a shared machine
hits all of them.  Configurations:

* ``none``: nothing attached;
* ``floor``: one read of w, m and v after each step (three multi-tensor float32 norms over lists made
  once): the memory traffic any exact pass must pay, measured in the same run;
* ``budget/1``, ``budget/10``: :class:`WeightForcesCallback` every step / every 10 steps with its
  defaults (``kernel="auto"``, logging every 10, Weibull every 100); ``budget/1/exact`` and
  ``budget/1/compiled`` force the eager or the compiled pass (compiled before the timed steps).
  The Trainer is told the run is :data:`LONG_RUN` steps long (a long run's constant-like schedule)
  and stopped after the timed steps;
* ``wandb.watch``: ``wandb.watch(model, log="all", log_freq=10)`` on an offline W&B run
  (histograms of every parameter and gradient every 10 steps);
* ``per-tensor loop``: the forces computed tensor by tensor after each optimizer step with one host
  transfer per tensor (how research code measures, e.g. the paper's ``three_force_spline.py``).

The verdict is the thread CPU time spent inside the hooks, timed from outside each of them (every
hook method the callback defines and the optimizer pre-hook it registers; every hook ``wandb.watch``
registers; the loop's hook), over the steps after ``--warmup``, divided by the thread CPU time of
the rest of the same steps (the plain step, measured beside the hooks: on a shared machine the
speed of whole steps drifts by 10-40% between runs a minute apart, which would hide a few percent
against another run's plain step); beside it, the median step's time inside the hooks and its ratio
to the floor's (a step whose first touch of memory the allocator gave back to the operating system
pays for faulting it in again, whoever touches it: on a virtual machine that can be seconds, once in
a while).  End-to-end times (median wall and thread CPU time per step)
and the peak memory (resident set size on a CPU, max allocated on CUDA, during the run) are
printed beside.
Prints a Markdown table for the README.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import time

os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from op_count import OpCounter  # noqa: E402  (benchmarks/op_count.py)
from transformers import GPTNeoXForCausalLM, Trainer, TrainerCallback, TrainingArguments  # noqa: E402
from transformers.trainer_callback import PrinterCallback  # noqa: E402

from hf_weightforces import WeightForcesCallback  # noqa: E402
from hf_weightforces.demo import make_datasets, pythia_config  # noqa: E402
from hf_weightforces.distributed import _StepRecorder  # noqa: E402

#: the run length the Trainer is told: its schedule is a long run's
LONG_RUN = 100_000

CONFIGS = ("none", "floor", "budget/1", "budget/1/exact", "budget/1/compiled", "budget/10", "wandb.watch",
           "per-tensor loop")


class HookClock:
    """Thread CPU seconds inside timed hooks, counted only while ``on`` (after the warm-up); with
    ``count`` set, the ATen operations the hooks dispatch instead (:class:`OpCounter`: every
    operation goes through Python then, so no time is taken)."""

    def __init__(self) -> None:
        self.seconds, self.on, self.count, self.ops = 0.0, False, False, 0

    def wrap(self, fn):
        def timed(*args, **kwargs):
            if not self.on:
                return fn(*args, **kwargs)
            if self.count:
                with OpCounter() as counter:
                    try:
                        return fn(*args, **kwargs)
                    finally:
                        self.ops += counter.total
            t0 = time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.thread_time() - t0
        return timed


CLOCK = HookClock()
# the optimizer pre-hook the callback's reader registers: timed from outside, for every instance
_StepRecorder._record = CLOCK.wrap(_StepRecorder._record)


class TimedWeightForces(WeightForcesCallback):
    """The real callback, every hook method it defines timed from outside (the ones it inherits from
    ``TrainerCallback`` do nothing: timing them would time the clock)."""


for _name in ("on_init_end", "on_train_begin", "on_epoch_begin", "on_step_begin", "on_pre_optimizer_step",
              "on_optimizer_step", "on_substep_end", "on_step_end", "on_log", "on_save", "on_epoch_end",
              "on_train_end"):
    if getattr(WeightForcesCallback, _name) is not getattr(TrainerCallback, _name):
        setattr(TimedWeightForces, _name, CLOCK.wrap(getattr(WeightForcesCallback, _name)))


class PerTensorLoop(TrainerCallback):
    """A, I, D of every tensor after each optimizer step (at w_{t+1}, as research code does),
    one host transfer per tensor."""

    def __init__(self) -> None:
        self.sums: dict[int, list[float]] = {}

    @torch.no_grad()
    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        opt = getattr(optimizer, "optimizer", optimizer)
        for group in opt.param_groups:
            lr, wd, (b1, b2), eps = group["lr"], group["weight_decay"], group["betas"], group["eps"]
            for p in group["params"]:
                st = opt.state.get(p)
                if not st or "exp_avg" not in st:
                    continue
                t = float(st["step"])
                u = (st["exp_avg"] / (1 - b1**t)) / ((st["exp_avg_sq"] / (1 - b2**t)).sqrt() + eps)
                w = p.detach()
                a, i, d = torch.stack([(w * u).sum(), (u * u).sum(), (w * w).sum()]).tolist()  # the sync
                acc = self.sums.setdefault(id(p), [0.0, 0.0, 0.0])
                acc[0] += -2 * lr * a
                acc[1] += lr * lr * i
                acc[2] += -2 * lr * wd * d


PerTensorLoop.on_optimizer_step = CLOCK.wrap(PerTensorLoop.on_optimizer_step)


class Floor(TrainerCallback):
    """One read of w, m and v after each step: three multi-tensor float32 norms over lists made once."""

    lists = None

    @torch.no_grad()
    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if self.lists is None:
            opt = getattr(optimizer, "optimizer", optimizer)
            ps = [p for g in opt.param_groups for p in g["params"] if "exp_avg" in opt.state.get(p, {})]
            self.lists = ([p.detach() for p in ps], [opt.state[p]["exp_avg"] for p in ps],
                          [opt.state[p]["exp_avg_sq"] for p in ps])
        for xs in self.lists:
            torch._foreach_norm(xs, 2)


Floor.on_optimizer_step = CLOCK.wrap(Floor.on_optimizer_step)


@contextlib.contextmanager
def timed_hook_registration():
    """Every forward hook and tensor hook registered inside the block is timed (wandb.watch)."""
    mod_reg, ten_reg = torch.nn.Module.register_forward_hook, torch.Tensor.register_hook

    def module_hook(self, hook, *a, **k):
        return mod_reg(self, CLOCK.wrap(hook), *a, **k)

    def tensor_hook(self, hook):
        return ten_reg(self, CLOCK.wrap(hook))

    torch.nn.Module.register_forward_hook, torch.Tensor.register_hook = module_hook, tensor_hook
    try:
        yield
    finally:
        torch.nn.Module.register_forward_hook, torch.Tensor.register_hook = mod_reg, ten_reg


def _rss() -> int:
    try:
        import psutil
    except ImportError:  # pragma: no cover - the peak since start instead
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return psutil.Process().memory_info().rss


class Meter(TrainerCallback):
    """Step stamps (wall, thread CPU), the hook clock's gate, and peak memory."""

    def __init__(self, warmup: int, stop: int, cuda: bool) -> None:
        self.warmup, self.stop, self.cuda = warmup, stop, cuda
        self.wall, self.cpu, self.hooks, self.peak = [], [], [], 0

    def on_step_begin(self, args, state, control, **kwargs):
        if self.cuda:
            torch.cuda.synchronize()
        CLOCK.on = state.global_step >= self.warmup
        if CLOCK.on:
            self.wall.append(time.perf_counter())
            self.cpu.append(time.thread_time())
            self.hooks.append(CLOCK.seconds)
        self._memory()

    def on_step_end(self, args, state, control, **kwargs):
        self._memory()
        if state.global_step >= self.stop:  # the schedule is a long run's; this one stops here
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        if self.cuda:
            torch.cuda.synchronize()
        self.wall.append(time.perf_counter())
        self.cpu.append(time.thread_time())
        self.hooks.append(CLOCK.seconds)
        CLOCK.on = False

    def _memory(self) -> None:
        self.peak = max(self.peak, torch.cuda.max_memory_allocated() if self.cuda else _rss())


#: sizes beyond the demo's: a Pythia-160M-shaped GPT-NeoX (12 x 768, vocab 50304)
SIZES = {"160m": dict(vocab_size=50304, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                      intermediate_size=3072)}


def make_config(size: str):
    return pythia_config("70m", **SIZES[size]) if size in SIZES else pythia_config(size)


def run(config: str, size: str, args, data, cuda: bool) -> dict:
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(make_config(size))
    # the warm-up holds three budget steps: the pass is planned at the first, and the opt-in compiled
    # pass compiled at the second, before timing
    every = int(config.split("/")[1]) if config.startswith("budget/") else 1
    warmup = max(args.warmup, 3 * every + 1)
    watched = None
    if config.startswith("budget/"):
        parts = config.split("/")  # budget/<every>[/<kernel>]
        watched = TimedWeightForces(every=int(parts[1]), kernel=parts[2] if len(parts) > 2 else "auto")
    meter = Meter(warmup, args.steps + warmup - args.warmup, cuda)
    callbacks: list = [meter] + ([watched] if watched is not None else [])
    wandb_run = None
    if config == "floor":
        callbacks.append(Floor())
    elif config == "per-tensor loop":
        callbacks.append(PerTensorLoop())
    CLOCK.seconds, CLOCK.ops = 0.0, 0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as out:
        if config == "wandb.watch":
            import wandb

            wandb_run = wandb.init(mode="offline", dir=out, project="overhead", reinit="finish_previous")
            with timed_hook_registration():
                wandb.watch(model, log="all", log_freq=10)
        targs = TrainingArguments(
            # a long run's settings (``auto`` picks what it would pick there; lr ~constant), stopped by the meter
            output_dir=out, max_steps=LONG_RUN, per_device_train_batch_size=args.batch,
            learning_rate=1e-3,
            weight_decay=0.1, logging_steps=10, report_to=["wandb"] if wandb_run else [], save_strategy="no",
            disable_tqdm=True, use_cpu=not cuda, seed=0, dataloader_num_workers=0,
        )
        trainer = Trainer(model=model, args=targs, train_dataset=data, callbacks=callbacks)
        trainer.remove_callback(PrinterCallback)
        trainer.train()
        if wandb_run is not None:
            wandb_run.finish()
    steps = len(meter.wall) - 1
    hook_ms = CLOCK.seconds * 1e3 / steps
    return {
        "hook_ms": hook_ms,
        # the median step's: robust to a step whose first touch of freed memory faults it back in
        # from the operating system (docs/budget.md, section 10)
        "hook_median_ms": statistics.median(b - a for a, b in zip(meter.hooks, meter.hooks[1:])) * 1e3,
        "ops": CLOCK.ops / steps,
        # the hooks over the rest of the same steps: drift on a shared machine moves both alike
        "overhead": hook_ms / ((meter.cpu[-1] - meter.cpu[0]) * 1e3 / steps - hook_ms),
        "wall_ms": statistics.median(b - a for a, b in zip(meter.wall, meter.wall[1:])) * 1e3,
        "cpu_ms": statistics.median(b - a for a, b in zip(meter.cpu, meter.cpu[1:])) * 1e3,
        "peak_mib": meter.peak / 2**20,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["tiny", "bench"])
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    ap.add_argument("--steps", type=int, default=50, help="optimizer steps per run, the warm-up included")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--cpu", action="store_true", help="force CPU even when CUDA is available")
    ap.add_argument("--count-ops", action="store_true",
                    help="count the ATen operations dispatched inside the hooks per step instead of timing them")
    args = ap.parse_args()
    if args.steps <= args.warmup:
        ap.error(f"--steps counts the warm-up: it must exceed --warmup ({args.warmup})")
    CLOCK.count = args.count_ops
    if "none" not in args.configs:
        args.configs.insert(0, "none")

    cuda = torch.cuda.is_available() and not args.cpu
    device = torch.cuda.get_device_name() if cuda else "CPU"
    data = make_datasets(block_size=args.block, max_bytes=4_000_000, eval_fraction=0.01)[0]
    memory = "max allocated" if cuda else "peak RSS"
    print(f"device: {device}, threads: {torch.get_num_threads()}, batch {args.batch} x {args.block} tokens, "
          f"{args.steps} steps ({args.warmup} warm-up, two budget steps at least) x {args.repeats} repeats\n")
    print(f"| model | params | watcher | in hooks, ms/step | x floor | median step, ms | x floor | overhead "
          f"| operations/step | step wall ms (median) | step CPU ms (median) | {memory} MiB (vs none) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        n_params = sum(p.numel() for p in GPTNeoXForCausalLM(make_config(size)).parameters())
        results: dict[str, list[dict]] = {c: [] for c in args.configs}
        for _ in range(args.repeats):  # take turns, so drift hits every configuration
            for config in args.configs:
                results[config].append(run(config, size, args, data, cuda))
        base_mem = max(r["peak_mib"] for r in results["none"])
        floors = [statistics.median(r[k] for r in results["floor"]) if "floor" in results else float("nan")
                  for k in ("hook_ms", "hook_median_ms")]
        for config, rs in results.items():
            hook = statistics.median(r["hook_ms"] for r in rs)
            step = statistics.median(r["hook_median_ms"] for r in rs)
            wall = statistics.median(r["wall_ms"] for r in rs)
            cpu = statistics.median(r["cpu_ms"] for r in rs)
            mem = max(r["peak_mib"] for r in rs)
            over = "-" if config == "none" else f"{100 * statistics.median(r['overhead'] for r in rs):.1f}%"
            ops = statistics.median(r["ops"] for r in rs)
            ratio, step_ratio = (x / f if config not in ("none", "floor") and f > 0 else float("nan")
                                 for x, f in zip((hook, step), floors))
            print(f"| {size} | {n_params / 1e6:.2f}M | {config} | {hook:.2f} | {ratio:.1f} | {step:.2f} | {step_ratio:.1f} "
                  f"| {over} | {ops:.0f} "
                  f"| {wall:.1f} | {cpu:.1f} "
                  f"| {mem:.0f} ({mem - base_mem:+.0f}) |", flush=True)


if __name__ == "__main__":
    main()
