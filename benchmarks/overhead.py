"""Training step time with and without the weight-forces callback, side by side in one process.

    python benchmarks/overhead.py                      # tiny and bench models on CPU
    python benchmarks/overhead.py --sizes bench --steps 60 --every 1 10

Each configuration trains the same model (same seed, same data) with the real Trainer for
``--steps`` optimizer steps, alternating plain and monitored runs ``--repeats`` times, and reports
the median time per step after ``--warmup`` steps (measured by a timing callback between
``on_step_begin`` calls, so Trainer start-up is excluded).  Pin threads for stable figures:
``OMP_NUM_THREADS=1`` is what torchrun uses.  Prints a Markdown table for the README.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("WANDB_MODE", "disabled")

import torch
from transformers import GPTNeoXForCausalLM, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback

from hf_weightforces import WeightForcesCallback
from hf_weightforces.demo import make_datasets, pythia_config


class TimedWeightForces(WeightForcesCallback):
    """The real callback, with the wall time spent inside its hooks accumulated: a steadier figure
    than the difference of two step-time medians on a shared machine."""

    hook_seconds = 0.0

    def _timed(name):  # noqa: N805 - a decorator factory in the class body
        def hook(self, *args, **kwargs):
            t0 = time.perf_counter()
            try:
                return getattr(WeightForcesCallback, name)(self, *args, **kwargs)
            finally:
                self.hook_seconds += time.perf_counter() - t0
        return hook

    on_step_begin = _timed("on_step_begin")
    on_pre_optimizer_step = _timed("on_pre_optimizer_step")
    on_optimizer_step = _timed("on_optimizer_step")
    on_log = _timed("on_log")


class StepTimer(TrainerCallback):
    def __init__(self) -> None:
        self.stamps: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.stamps.append(time.perf_counter())


def run(size: str, steps: int, batch: int, block: int, callbacks: list, device_cpu: bool, data) -> list[float]:
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(pythia_config(size))
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, max_steps=steps, per_device_train_batch_size=batch, learning_rate=1e-3,
            weight_decay=0.1, logging_steps=10, report_to=[], save_strategy="no", disable_tqdm=True,
            use_cpu=device_cpu, seed=0, dataloader_num_workers=0,
        )
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[timer, *callbacks])
        trainer.remove_callback(PrinterCallback)  # keep the table readable
        trainer.train()
    return [b - a for a, b in zip(timer.stamps, timer.stamps[1:])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["tiny", "bench"])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--every", type=int, nargs="+", default=[1])
    ap.add_argument("--cpu", action="store_true", help="force CPU even when CUDA is available")
    args = ap.parse_args()

    use_cpu = args.cpu or not torch.cuda.is_available()
    device = "cpu" if use_cpu else torch.cuda.get_device_name()
    data = make_datasets(block_size=args.block, max_bytes=4_000_000, eval_fraction=0.01)[0]
    print(f"device: {device}, threads: {torch.get_num_threads()}, batch {args.batch} x {args.block} tokens\n")
    print("| model | params | every | plain ms/step | with callback ms/step | overhead (medians) | in callback ms/step | overhead (in callback) |")
    print("|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        n_params = sum(p.numel() for p in GPTNeoXForCausalLM(pythia_config(size)).parameters())
        for every in args.every:
            plain, watched, inside = [], [], []
            for _ in range(args.repeats):  # alternate, so drift on a shared machine hits both
                plain += run(size, args.steps, args.batch, args.block, [], use_cpu, data)[args.warmup :]
                cb = TimedWeightForces(every=every)
                watched += run(size, args.steps, args.batch, args.block, [cb], use_cpu, data)[args.warmup :]
                inside.append(cb.hook_seconds / args.steps)
            p, w = statistics.median(plain) * 1e3, statistics.median(watched) * 1e3
            c = statistics.median(inside) * 1e3
            print(f"| {size} | {n_params / 1e6:.2f}M | {every} | {p:.1f} | {w:.1f} | {100 * (w - p) / p:+.1f}% "
                  f"| {c:.2f} | {100 * c / p:.1f}% |")


if __name__ == "__main__":
    main()
