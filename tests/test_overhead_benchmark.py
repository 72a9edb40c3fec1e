"""``benchmarks/overhead.py`` stays runnable: a few steps of some configurations, one table out."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "overhead.py"


def test_overhead_benchmark_prints_its_table(tmp_path):
    configs = ["none", "floor", "budget/1/exact", "per-tensor loop", "wandb.watch"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "WANDB_MODE": "offline"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--sizes", "tiny", "--configs", *configs, "--steps", "4",
                           "--warmup", "2", "--repeats", "1", "--batch", "2", "--block", "32"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in proc.stdout.splitlines() if line.startswith("| tiny")]
    assert [r[2].strip() for r in rows] == configs
    floor, floor_step = float(rows[1][3]), float(rows[1][5])
    for r in rows[1:]:  # in-hook time and its median step, their ratios to the floor's, the share of the rest
        # of the step, end-to-end times
        hook, step, share, wall, cpu = float(r[3]), float(r[5]), float(r[7].strip().rstrip("%")), float(r[9]), float(r[10])
        assert hook > 0 and step > 0 and share > 0 and wall > 0 and cpu > 0, r
        if r[2].strip() != "floor":  # the ratios of the unrounded times, printed to one decimal
            assert abs(float(r[4]) - hook / floor) <= _ratio_slack(hook, floor), r
            assert abs(float(r[6]) - step / floor_step) <= _ratio_slack(step, floor_step), r


def _ratio_slack(h: float, f: float) -> float:
    """How far a ratio printed to one decimal can be from h / f when h and f are the times printed to
    two decimals (each within 0.005 of its true value): 0.05 for the ratio's rounding, plus
    |H/F - h/f| <= 0.005 (1 + h/f) / (f - 0.005), and a hair for the float arithmetic."""
    return 0.05 + 0.005 * (1 + h / f) / (f - 0.005) + 1e-9
