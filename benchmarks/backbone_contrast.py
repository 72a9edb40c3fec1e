"""The AdamW backbone against SGD with momentum, and what the geometry probes cost.

    python benchmarks/backbone_contrast.py                       # tiny and bench models, 300 steps
    python benchmarks/backbone_contrast.py --sizes bench --steps 600
    python benchmarks/backbone_contrast.py --skip-cost            # only the contrast

Contrast: the same model, data and seed trained with the real Trainer under AdamW (decoupled
weight decay 0.1, and 0 as a control: decay alone is a steady drift toward zero), and under
SGD with momentum 0.9 (no weight decay) at two learning rates (SGD's loss stays behind
AdamW's at these lengths: the final loss is printed beside the geometry).  The
:class:`~hf_weightforces.integrations.probes.BackboneProbe` runs in every case through a small
probe-only driver callback (the WeightForcesCallback refuses optimizers other than AdamW), so the
figures come from identical code.  Printed for the whole model (``total``): the captured fraction
beside its random-walk null and the null-normalised score, the ratio of the mean squared
displacement to the summed squared steps (1 for a random walk), the stability beside its null,
and the mean |cos| of per-step updates and gradients with the backbone beside the isotropic floor;
each averaged over the log events after the first estimate, and the last one.

Cost: time per training step with no callback, with the WeightForcesCallback alone, and with the
callback plus each probe; and the probes' own time per call (timed around each method), so the
per-step cost and the cost of a backbone estimate or a rank pass are separate.  Pin threads for
stable figures (``OMP_NUM_THREADS=1``).  Output: Markdown tables for the README.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections import defaultdict

os.environ.setdefault("WANDB_MODE", "disabled")

import torch
from transformers import GPTNeoXForCausalLM, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback

from hf_weightforces import WeightForcesCallback
from hf_weightforces.core.groups import Grouping, layer_index
from hf_weightforces.core.monitor import ParamInfo
from hf_weightforces.demo import make_datasets, pythia_config
from hf_weightforces.distributed import ShardContext
from hf_weightforces.integrations.probes import BackboneProbe, RankProbe

T = "weightforces/backbone/total/"


class ProbeDriver(TrainerCallback):
    """Drives probes without the force monitor (any optimizer); rows land in ``self.rows``."""

    def __init__(self, probes) -> None:
        self.probes = list(probes)
        self.rows: list[dict] = []

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        ctx = ShardContext()
        entries = ctx.entries(model, getattr(optimizer, "optimizer", optimizer))
        grouping = Grouping()
        infos = [ParamInfo(e.name, grouping.classify(e.name, len(e.shape)), layer_index(e.name), e.numel)
                 for e in entries]
        for p in self.probes:
            p.setup(entries, infos, ctx, args, state)

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        for p in self.probes:
            p.on_gradients(state.global_step + 1, model, optimizer)

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        for p in self.probes:
            p.on_step(state.global_step + 1, optimizer, bool(getattr(optimizer, "step_was_skipped", False)))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            row = {"step": state.global_step, "loss": logs["loss"]}
            for p in self.probes:
                row.update(p.collect(state.global_step))
            self.rows.append(row)


class StepTimer(TrainerCallback):
    def __init__(self) -> None:
        self.stamps: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.stamps.append(time.perf_counter())


def timed(probe):
    """Wrap a probe's hooks to record seconds per call, by method."""
    probe.timings = defaultdict(list)
    for name in ("on_gradients", "on_step", "collect"):
        method = getattr(probe, name)

        def wrapper(*a, _m=method, _n=name, **k):
            t0 = time.perf_counter()
            out = _m(*a, **k)
            probe.timings[_n].append(time.perf_counter() - t0)
            return out

        setattr(probe, name, wrapper)
    return probe


def train(size: str, steps: int, data, callbacks, optimizer: str = "adamw", lr: float = 1e-3, wd: float = 0.1,
          batch: int = 8, logging_steps: int = 25):
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(pythia_config(size))
    optimizers = (None, None)
    if optimizer == "sgd":
        optimizers = (torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=wd), None)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, max_steps=steps, per_device_train_batch_size=batch, learning_rate=lr,
            weight_decay=wd, warmup_steps=max(1, steps // 10), lr_scheduler_type="cosine", logging_steps=logging_steps,
            report_to=[], save_strategy="no", disable_tqdm=True, use_cpu=True, seed=0, dataloader_num_workers=0,
            optim="adamw_torch",
        )
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=list(callbacks), optimizers=optimizers)
        trainer.remove_callback(PrinterCallback)
        trainer.train()
    return trainer


def _mean(rows, key):
    vals = [r[key] for r in rows if key in r]
    return statistics.fmean(vals) if vals else float("nan")


def contrast(sizes, steps, data, every, snapshot_every, sgd_lrs) -> None:
    configs = [("AdamW wd=0.1", "adamw", 1e-3, 0.1), ("AdamW wd=0", "adamw", 1e-3, 0.0)]
    configs += [(f"SGD m=0.9 lr={lr:g}", "sgd", lr, 0.0) for lr in sgd_lrs]
    print(f"## Backbone contrast ({steps} steps, estimate every {every}, snapshot every {snapshot_every}; "
          "mean over log events after the first estimate / last event)\n")
    print("| model | optimizer | final loss | fraction | null | score | msd ratio | stability | null | "
          "update \\|cos\\| | grad \\|cos\\| | floor |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for size in sizes:
        for label, opt, lr, wd in configs:
            driver = ProbeDriver([BackboneProbe(every=every, snapshot_every=snapshot_every)])
            train(size, steps, data, [driver], optimizer=opt, lr=lr, wd=wd)
            rows = [r for r in driver.rows if r["step"] > every]
            last = driver.rows[-1]

            def both(key, spec, rows=rows, last=last):
                return f"{_mean(rows, T + key):{spec}} / {last.get(T + key, float('nan')):{spec}}"

            print(f"| {size} | {label} | {last['loss']:.3f} | {both('fraction', '.3f')} | {both('fraction_null', '.3f')} "
                  f"| {both('fraction_score', '.2f')} | {both('msd_ratio', '.1f')} | {both('stability', '.4f')} "
                  f"| {both('stability_null', '.4f')} | {both('update_cos', '.3f')} | {both('grad_cos', '.3f')} "
                  f"| {last.get(T + 'cos_floor', float('nan')):.4f} |")


def cost(sizes, steps, data, warmup: int, every: int) -> None:
    print(f"\n## Cost ({steps} steps, median ms per step after {warmup}; probes timed per call)\n")
    print("| model | params | plain | callback | + backbone | + rank | backbone per step (on_gradients + on_step) "
          "| backbone estimate | rank pass | backbone memory |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for size in sizes:
        n = sum(p.numel() for p in GPTNeoXForCausalLM(pythia_config(size)).parameters())
        times = {}
        probes = {}
        for label, make in (("plain", lambda: []), ("callback", lambda: [WeightForcesCallback(weibull_every=0)]),
                            ("backbone", lambda: [WeightForcesCallback(weibull_every=0, probes=[
                                timed(BackboneProbe(every=every, snapshot_every=10))])]),
                            ("rank", lambda: [WeightForcesCallback(weibull_every=0, probes=[
                                timed(RankProbe(every=every))])])):
            timer = StepTimer()
            cbs = make()
            train(size, steps, data, [timer, *cbs])
            steps_s = [b - a for a, b in zip(timer.stamps, timer.stamps[1:])][warmup:]
            times[label] = statistics.median(steps_s) * 1e3
            if cbs:
                probes[label] = cbs[0].probes
        bb = probes["backbone"][0]
        per_step = statistics.median(bb.timings["on_step"]) + statistics.median(bb.timings["on_gradients"])
        estimate = max(bb.timings["on_step"])  # the steps that estimate are the slowest on_step calls
        rank_pass = max(probes["rank"][0].timings["collect"])
        print(f"| {size} | {n / 1e6:.2f}M | {times['plain']:.1f} | {times['callback']:.1f} | {times['backbone']:.1f} "
              f"| {times['rank']:.1f} | {per_step * 1e3:.2f} ms | {estimate * 1e3:.1f} ms | {rank_pass * 1e3:.1f} ms "
              f"| {bb.memory_bytes() / 2**20:.1f} MB ({bb.tracker.K} coords) |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["tiny", "bench"])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--every", type=int, default=50, help="backbone estimate interval")
    ap.add_argument("--snapshot-every", type=int, default=10)
    ap.add_argument("--sgd-lr", type=float, nargs="+", default=[0.1, 0.3])
    ap.add_argument("--cost-steps", type=int, default=120)
    ap.add_argument("--skip-cost", action="store_true")
    ap.add_argument("--skip-contrast", action="store_true")
    args = ap.parse_args()
    data = make_datasets(block_size=128, max_bytes=4_000_000, eval_fraction=0.01)[0]
    print(f"device: cpu, threads: {torch.get_num_threads()}, batch 8 x 128 tokens\n")
    if not args.skip_contrast:
        contrast(args.sizes, args.steps, data, args.every, args.snapshot_every, args.sgd_lr)
    if not args.skip_cost:
        cost(args.sizes, args.cost_steps, data, warmup=5, every=args.every)


if __name__ == "__main__":
    main()
