"""Peak memory of ``diagnose`` and ``fit`` on one large matrix: what each byte of the matrix costs.

Issue 22 asks ``diagnose`` for at most 3x a float32 matrix's bytes and 4x a bfloat16 one's above the import
baseline (16384 x 8192), and ``fit`` to stay at or below its 2.3x (float32).  What they hold, by arithmetic
(n values, b bytes each as stored):

* while |w| is sorted: the tensor as read (n·b) and one float32 copy of |w| (4n); 2x for float32, 3x for
  bfloat16 (the reader keeps no reference and maps no page of the file, so the tensor leaves when dropped);
* afterwards: the sorted copy (4n), the KS scan's block bounds (about n bytes) and chunks of fixed size
  (the line fit's 2^20 ranks in float64, the Gini sums' 2^20 values, the family comparison's sample).

Growth is measured in a fresh process (``VmHWM`` after ``/proc/self/clear_refs`` reset it, minus ``VmRSS``
then; ``ru_maxrss`` would keep the peak of the pytest process it was forked from) at two sizes, so the fixed
chunks cancel: (growth(big) - growth(small)) / (bytes(big) - bytes(small)) is the cost of one more byte of
matrix.  Measured at these sizes: ``diagnose`` 0.9 (float32) and 2.0 (bfloat16), ``fit`` 1.3 (float32);
before this change 7.7, 14.6 and 2.2.  At these sizes the peak is after the sort (sorted copy, block bounds,
fixed chunks); at 16384 x 8192 it is the sort itself, which holds no fixed chunk: 2.00x (float32) and
3.00x (bfloat16) for both commands, measured with this file as a script (before: ``diagnose`` 8.0x and
15.0x, ``fit`` 2.29x and 3.58x).

As a script, the issue's figure:  ``python tests/test_offline_memory.py [ROWS COLS]`` (default 16384 8192;
about 1.1 GB of memory at peak and a minute of CPU).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}

CHILD = textwrap.dedent("""
    import json, sys, tempfile, torch
    from safetensors.torch import save_file
    from hf_weightforces.analysis.diagnose import diagnose
    from hf_weightforces.analysis.fit import fit_checkpoint

    def status(key):
        return int(open("/proc/self/status").read().split(key + ":")[1].split()[0]) * 1024

    with tempfile.TemporaryDirectory() as warm:  # every lazy import (scipy, safetensors) before the baseline
        save_file({"layers.0.mlp.fc.weight": torch.randn(512, 512)}, warm + "/model.safetensors")
        diagnose(warm)
        fit_checkpoint(warm)
    out = {}
    for key, folder in json.loads(sys.argv[1]).items():
        run = diagnose if key.startswith("diagnose") else fit_checkpoint
        open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
        base = status("VmRSS")
        run(folder)
        out[key] = status("VmHWM") - base
    print(json.dumps(out))
""")


def _matrix(folder: Path, rows: int, cols: int, dtype: str) -> int:
    """A Gaussian matrix (std 0.02, seeded) saved as ``folder/model.safetensors``; returns its bytes."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(0)).mul_(0.02).to(getattr(torch, dtype))
    save_file({"layers.0.mlp.fc.weight": w}, str(folder / "model.safetensors"))
    return w.numel() * w.element_size()


def measure(runs: dict[str, str]) -> dict[str, int]:
    """Peak growth in bytes of each ``{"diagnose ...": folder}`` / ``{"fit ...": folder}``, one fresh process."""
    with tempfile.TemporaryDirectory() as cwd:  # not the checkout: `-c` puts the working folder first on sys.path
        done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(runs)], capture_output=True, text=True,
                              env=ENV, cwd=cwd, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


#: (command, dtype) -> the largest bytes of growth per byte of matrix allowed.
BOUNDS = {("diagnose", "float32"): 3.0, ("diagnose", "bfloat16"): 4.0, ("fit", "float32"): 2.3}


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc (VmHWM reset)")
def test_peak_memory_per_byte_of_matrix(tmp_path):
    """Sizes 2048 x 2048 and 4096 x 4096: both past every fixed chunk (the line fit's 2^20 ranks, the
    sum of squares' 2^22 values), so the difference is the part that grows with the matrix."""
    sizes = {"small": (2048, 2048), "big": (4096, 4096)}
    nbytes, runs = {}, {}
    for dtype in ("float32", "bfloat16"):
        for size, (rows, cols) in sizes.items():
            folder = tmp_path / f"{dtype}_{size}"
            nbytes[dtype, size] = _matrix(folder, rows, cols, dtype)
            for command, kind in BOUNDS:
                if kind == dtype:
                    runs[f"{command} {dtype} {size}"] = str(folder)
    growth = measure(runs)
    for (command, dtype), bound in BOUNDS.items():
        extra = growth[f"{command} {dtype} big"] - growth[f"{command} {dtype} small"]
        slope = extra / (nbytes[dtype, "big"] - nbytes[dtype, "small"])
        assert slope <= bound, f"{command} {dtype}: {slope:.2f} bytes of growth per byte of matrix ({growth})"


# ------------------------------------------------------------------ the same numbers as the float64 forms
def test_sorted_quantiles_are_numpys_bit_for_bit():
    import numpy as np

    from hf_weightforces.analysis.diagnose import sorted_quantiles

    rng = np.random.default_rng(0)
    qs = [0.0, 0.1, 0.5, 0.9, 0.999, 1.0]
    for n in (1, 2, 3, 10, 11, 999, 1000, 1001, 12_345):
        for dtype in (np.float32, np.float64):
            xs = np.sort(np.abs(rng.standard_t(3, n))).astype(dtype)
            ref = np.quantile(xs, qs)
            got = sorted_quantiles(xs, qs)
            assert got.dtype == ref.dtype and np.array_equal(got, ref), (n, dtype, got, ref)


def test_diagnose_matches_the_one_pass_float64_forms(tmp_path):
    """A matrix of 3 * 2^20 + 1024 values (chunked sums: several chunks, a ragged last one) against the
    forms the chunked code replaced: quantiles bit for bit, the family comparison bit for bit (same
    sample), σ and Gini within the rounding bound of float64 sums of n terms computed two ways."""
    import math

    import numpy as np
    import torch
    from safetensors.torch import save_file

    from hf_weightforces.analysis.diagnose import compare_families, diagnose
    from hf_weightforces.core.weibull import sorted_magnitudes

    g = torch.Generator().manual_seed(1)
    w = (torch.randn(3 * 1024 + 1, 1024, generator=g) * 0.02).to(torch.bfloat16)
    save_file({"layers.0.mlp.fc.weight": w}, str(tmp_path / "model.safetensors"))
    (m,) = diagnose(tmp_path, sample=4096).matrices
    xs, _ = sorted_magnitudes(w)
    n, eps = xs.size, 2.0 ** -53
    x = xs.astype(np.float64)
    q10, q50, q90, q999 = np.quantile(xs, [0.1, 0.5, 0.9, 0.999])
    assert (m.shape["q90_q10"], m.shape["p999_p50"]) == (float(q90 / q10), float(q999 / q50))
    weights = 2.0 * np.arange(1, n + 1, dtype=np.float64) - n - 1.0
    gini = float(weights @ x / (n * x.sum()))
    # each sum of n terms is off by at most (n - 1) eps sum|t| (any order); twice that between two orders,
    # relative to |sum t|: sum|t| / |sum t| is 1 for x and about 1 / gini for the weighted sum
    tol = 2 * (n - 1) * eps * (float(np.abs(weights) @ x) / abs(float(weights @ x)) + 1.0)
    assert m.shape["gini"] == pytest.approx(gini, rel=tol, abs=0)
    flat = w.reshape(-1).double()
    sigma = math.sqrt(float(flat @ flat) / flat.numel())
    assert m.scale / m.lambda_over_sigma == pytest.approx(sigma, rel=2 * (n - 1) * eps + 4 * eps)
    wide = x.copy()  # the old compare_families drew its sample from a float64 copy of xs
    import zlib

    seed = 0 ^ zlib.crc32(b"layers.0.mlp.fc.weight")
    assert compare_families(xs, sample=4096, seed=seed) == compare_families(wide, sample=4096, seed=seed) == m.families


def main(rows: int = 16384, cols: int = 8192) -> None:
    """The issue's figure: peak growth above the import baseline, as a multiple of the matrix's bytes."""
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in ("float32", "bfloat16"):
            folder = Path(tmp) / dtype
            size = _matrix(folder, rows, cols, dtype)
            growth = measure({f"{command} {dtype}": str(folder) for command in ("diagnose", "fit")})
            for key, value in growth.items():
                print(f"{key:18s} {rows} x {cols}: {value / 2**20:7.0f} MiB = {value / size:.2f}x the matrix "
                      f"({size / 2**20:.0f} MiB)", flush=True)
            (folder / "model.safetensors").unlink()


if __name__ == "__main__":
    main(*map(int, sys.argv[1:3]))
