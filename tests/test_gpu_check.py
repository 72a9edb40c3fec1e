"""``benchmarks/gpu_check.py`` end to end in its CPU smoke mode: every section runs and reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def test_gpu_check_smoke_mode_writes_one_table_and_one_json(tmp_path):
    out = tmp_path / "check.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--out", str(out)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    sections = data["sections"]
    assert list(sections) == ["pass/tiny", "overhead/tiny", "sync", "scaler_skip", "fsdp2"]
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert table[0] == "| section | status | result |" and len(table) == 1 + len(sections)

    one = sections["pass/tiny"]
    assert one["status"] == "ok", one
    assert one["exact_ms"] > 0 and one["compiled_ms"] > 0 and one["floor_ms"] > 0 and one["exact_ops"] <= 100
    assert one["compiled_vs_exact_rel"] < 1e-6  # the compiled pass's stated tolerance
    over = sections["overhead/tiny"]
    assert over["status"] == "ok", over
    assert over["plain_ms"] > 0 and over["watched_ms"] > 0 and over["hook_ms"] > 0 and over["hook_cpu_ms"] > 0
    assert 0 < over["force_pass_ms"] <= over["hook_ms"]  # the force pass is inside the hook
    assert over["bytes_12"] == 12 * over["params"] and over["floor_ms"] > 0
    assert sections["sync"]["status"] == "skip"  # no CUDA here
    skip = sections["scaler_skip"]
    assert skip["status"] == "ok" and skip["skipped_step_counted_as_budget_step"] is False  # host counters
    assert skip["align"] == 0.0 and abs(skip["delta"]) < 1e-9
    fsdp = sections["fsdp2"]
    assert fsdp["status"] == "ok" and fsdp["backend"] == "fsdp2" and fsdp["max_rel_diff_vs_plain"] < 1e-6


def test_gpu_check_refuses_cuda_without_a_device(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cuda", "--out", str(tmp_path / "x.json")],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error:")
