"""The closure against the float32 rounding floor, per learning rate (docs/budget.md, issue 9).

For a tiny GPT-NeoX trained from scratch and the shipped all-MiniLM-L6-v2 fine-tuned (a real
pretrained BERT), at lr 1e-3, 5e-5 and 1e-5 with weight decay 0.01 and 0.1 (constant schedule),
prints per aggregate the median (and 90th percentile) of |closure_rel| the monitor logged, beside
the floor: the closure an exact float64 evaluation leaves (true w_t copied before the step, u from
the optimizer's moments, the decay factor as PyTorch rounds it).  The monitor at most twice the
floor is the target.

    OMP_NUM_THREADS=1 python benchmarks/closure_floor.py [--steps 20] [--json out.json]

Runs against whatever ``hf_weightforces`` is importable (point PYTHONPATH at an older checkout to
measure it the same way).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
os.environ.setdefault("WANDB_MODE", "disabled")

from conftest import train_tiny  # noqa: E402
from precision_reference import Reference, closure_and_floor, minilm_classifier  # noqa: E402

from hf_weightforces import WeightForcesCallback  # noqa: E402
from hf_weightforces.integrations.sinks import read_jsonl  # noqa: E402


def _rows(folder: str) -> dict:
    return {r["step"]: r for r in read_jsonl(os.path.join(folder, "weightforces", "metrics.jsonl"))}


def run(model_name: str, lr: float, wd: float, steps: int) -> dict:
    ref = Reference(intended=False)
    cb = WeightForcesCallback(weibull_every=0, per_layer=False)
    with tempfile.TemporaryDirectory() as out:
        if model_name == "gpt-neox":
            train_tiny(out, [cb, ref], max_steps=steps, logging_steps=1, learning_rate=lr, weight_decay=wd,
                       warmup_steps=0, lr_scheduler_type="constant")
        else:
            from transformers import Trainer, TrainingArguments

            model, data = minilm_classifier(n_examples=8 * steps, max_length=32)
            args = TrainingArguments(out, max_steps=steps, per_device_train_batch_size=8, learning_rate=lr,
                                     weight_decay=wd, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
                                     disable_tqdm=True, lr_scheduler_type="constant", seed=0)
            Trainer(model=model, args=args, train_dataset=data, callbacks=[cb, ref]).train()
        result = closure_and_floor(_rows(out), ref.rows)
    return {agg: {"closure_median": float(np.median(g)), "closure_p90": float(np.percentile(g, 90)),
                  "floor_median": float(np.median(f)), "floor_p90": float(np.percentile(f, 90))}
            for agg, (g, f) in result.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--models", default="gpt-neox,minilm")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    out = []
    print(f"{'model':9} {'lr':>7} {'wd':>5} {'aggregate':13} {'|closure_rel| med':>18} {'p90':>9} {'floor med':>10} "
          f"{'p90':>9} {'ratio':>6}")
    for model_name in args.models.split(","):
        for lr in (1e-3, 5e-5, 1e-5):
            for wd in (0.01, 0.1):
                for agg, r in run(model_name, lr, wd, args.steps).items():
                    ratio = r["closure_median"] / r["floor_median"] if r["floor_median"] > 0 else float("nan")
                    print(f"{model_name:9} {lr:7.0e} {wd:5.2f} {agg:13} {r['closure_median']:18.2e} {r['closure_p90']:9.2e} "
                          f"{r['floor_median']:10.2e} {r['floor_p90']:9.2e} {ratio:6.2f}", flush=True)
                    out.append({"model": model_name, "lr": lr, "wd": wd, "aggregate": agg, **r})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
