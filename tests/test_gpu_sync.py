"""No host synchronisation between log events on CUDA (issue 12): steps of the real callback with
``torch.cuda.set_sync_debug_mode("error")`` inside every hook and the optimizer pre-hook it
registers.  Skipped without a GPU; ``benchmarks/gpu_check.py`` runs the same check."""

from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _gpu_check():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("precision", ["bf16", None])
def test_no_host_sync_between_log_events(precision):
    from hf_weightforces.demo import make_datasets

    gc = _gpu_check()
    data = make_datasets(block_size=64, max_bytes=200_000, eval_fraction=0.01)[0]
    cb = gc.sync_checked_callback(every=1)
    with tempfile.TemporaryDirectory() as out:
        gc._train(SimpleNamespace(device="cuda"), "tiny", out, [cb], steps=10, batch=8, data=data, logging_steps=5,
                  precision=precision)
    assert cb.sync_failures == [] and cb._active
