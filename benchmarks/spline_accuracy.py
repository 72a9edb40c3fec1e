"""Accuracy of the alignment force recovered from sparse checkpoints, against the callback's truth.

    python benchmarks/spline_accuracy.py                          # trains the demo, then the table
    python benchmarks/spline_accuracy.py --run runs/pythia-tiny   # an existing run with checkpoints
    python benchmarks/spline_accuracy.py --spacings 50 100 --max-steps 600

Trains ``examples/train_pythia.py --tiny`` (the CPU demo: logging every 10 steps, cosine lr with
10% warm-up, weight decay 0.1) with a checkpoint every ``--save-steps`` steps, then runs
``hf-weightforces spline`` on the checkpoints whose step is a multiple of each spacing and prints,
per class and estimator, estimate / true A as Markdown: the median over checkpoint intervals (the
resolution the checkpoints carry), the median over the logged rows, and the pooled ratio
Σ estimate / Σ true.  ``interval_oracle`` (the true sum of each checkpoint interval spread over its
rows by lr) is the best any estimator that only sees the checkpoints can do per row.
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hf_weightforces.analysis.spline import ESTIMATORS, ORACLE, analyze

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("transmission", "selection", "embedding", "total")


def train(out: Path, max_steps: int, save_steps: int) -> float:
    cmd = [sys.executable, str(REPO / "examples" / "train_pythia.py"), "--tiny", "--report_to", "none",
           "--output_dir", str(out), "--max_steps", str(max_steps), "--save_strategy", "steps",
           "--save_steps", str(save_steps), "--save_only_model", "True", "--disable_tqdm", "True"]
    print("$", " ".join(cmd[1:]), file=sys.stderr)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def fmt(x: float) -> str:
    return "–" if not math.isfinite(x) else f"{x:.3f}"


def table(run: Path, spacing: int, sample: int) -> list[str]:
    t0 = time.perf_counter()
    report = analyze([run], keep_every=spacing, sample_size=sample)
    wall = time.perf_counter() - t0
    f = report.forces
    acc = {(a.aggregate, a.estimator, a.resolution): a for a in report.accuracy}
    names = [*ESTIMATORS, ORACLE]
    lines = [
        f"**Checkpoints every {spacing} steps** ({', '.join(map(str, f.checkpoint_steps))}); "
        f"{f.sampled:,} of {f.total:,} coordinates; {f.schedule_source}; "
        f"read {f.seconds_read:.2f} s, estimated {f.seconds_compute:.2f} s, analyze() {wall:.2f} s wall.",
        "",
        "| class | resolution | " + " | ".join(names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for g in CLASSES:
        for label, res, stat in (("median per checkpoint interval", "checkpoint", "median"),
                                 ("median per logged row", "row", "median"),
                                 ("pooled Σest/Σtrue", "row", "pooled")):
            cells = []
            for e in names:
                a = acc.get((g, e, res))
                if a is None and e == ORACLE and res == "checkpoint":
                    cells.append("1 (def.)")
                else:
                    cells.append(fmt(getattr(a, stat)) if a is not None else "–")
            lines.append(f"| {g} | {label} | " + " | ".join(cells) + " |")
    return lines + [""]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, help="analyse this run instead of training the demo")
    p.add_argument("--max-steps", type=int, default=300)
    p.add_argument("--save-steps", type=int, default=25)
    p.add_argument("--spacings", type=int, nargs="+", default=[25, 50, 75])
    p.add_argument("--sample", type=int, default=0, help="coordinates per checkpoint (0: all)")
    args = p.parse_args()
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        run = args.run
        if run is None:
            run = Path(tmp) / "pythia-tiny"
            seconds = train(run, args.max_steps, args.save_steps)
            lines.append(f"Demo: `examples/train_pythia.py --tiny --max_steps {args.max_steps} --save_steps "
                         f"{args.save_steps}` trained in {seconds:.1f} s.\n")
        for spacing in args.spacings:
            lines += table(run, spacing, args.sample)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
