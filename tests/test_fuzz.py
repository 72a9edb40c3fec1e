"""Fuzzed files into every reader: each must answer with its own error type (or a result), never
another exception, never NaN written back, never a hang.

The CI run is short and seeded.  A longer one, by hand: ``HF_WEIGHTFORCES_FUZZ_SECONDS=600 python -m
pytest tests/test_fuzz.py -q`` (that many seconds per reader; ``HF_WEIGHTFORCES_FUZZ_SEED`` picks the seed).
"""

from __future__ import annotations

import io
import json
import os
import random
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import save

from hf_weightforces.analysis.checkpoints import CheckpointError, iter_tensors, read_step
from hf_weightforces.analysis.records import RecordError, read_metrics, read_params, read_schedule
from hf_weightforces.core.integral import RunIntegral
from hf_weightforces.core.records import read_rows
from hf_weightforces.integrations.runfiles import continue_records
from hf_weightforces.integrations.state import STATE_FILE, load_state

SECONDS = float(os.environ.get("HF_WEIGHTFORCES_FUZZ_SECONDS", "0"))
SEED = int(os.environ.get("HF_WEIGHTFORCES_FUZZ_SEED", "0"))
CASES = 40  # per reader in the short run


def _state_dict() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"layers.0.attn.q_proj.weight": torch.randn(8, 8, generator=g),
            "layers.0.mlp.fc.bias": torch.randn(8, generator=g).bfloat16(),
            "step": torch.tensor([3], dtype=torch.int64)}


def _torch_bytes(zipped: bool) -> bytes:
    buf = io.BytesIO()
    torch.save(_state_dict(), buf, _use_new_zipfile_serialization=zipped)
    return buf.getvalue()


_NAMES = ["a.weight", "b.weight"]


def _seeds() -> dict[str, bytes]:
    integral = RunIntegral(_NAMES)
    integral.start(np.array([1.0, 2.0]))
    rows = [{"step": s, "weightforces/total/align": 0.1 * s, "weightforces/total/weibull_k": None} for s in (2, 4, 6)]
    schedule = [{"step": s, "lr": [1e-3, 1e-3], "weight_decay": [0.1, 0.0], "skipped": False} for s in (1, 2, 3)]
    params = {"optimizer": "AdamW", "betas": [0.9, 0.999], "eps": 1e-8, "every": 1,
              "params": [{"name": "a.weight", "group": "transmission", "layer": 0, "shape": [8, 8], "numel": 64,
                          "optimizer_group": 0}]}
    return {
        "safetensors": save(_state_dict()),
        "bin_zip": _torch_bytes(True),
        "bin_legacy": _torch_bytes(False),
        "index": json.dumps({"metadata": {}, "weight_map": {"a": "shard.safetensors", "b": "shard.safetensors"}}).encode(),
        "metrics": "".join(json.dumps(r) + "\n" for r in rows).encode(),
        "schedule": "".join(json.dumps(r) + "\n" for r in schedule).encode(),
        "params": json.dumps(params).encode(),
        "state": json.dumps({"integral": integral.to_dict(), "next_weibull": 8, "step": 4,
                             "probes": [{}], "probe_tensors": [None]}).encode(),
        "trainer_state": json.dumps({"global_step": 40, "log_history": []}).encode(),
    }


_TOKENS = [b"null", b"NaN", b"-Infinity", b"1e999", b'"x"', b"[]", b"{}", b"true", b"-1", b"0", b"\x00", b"\xff",
           b"\n", b"[" * 3000, b"9" * 5000, b'"step"', b",", b":"]


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One to four random edits: flipped bytes, cuts, inserted junk or JSON tokens, repeated slices."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        kind = rng.randrange(6)
        at = rng.randrange(len(out) + 1)
        if kind == 0 and out:
            for _ in range(rng.randint(1, 8)):
                out[rng.randrange(len(out))] = rng.randrange(256)
        elif kind == 1:
            del out[at:at + rng.randint(1, max(1, len(out) // 4))]
        elif kind == 2:
            out[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        elif kind == 3:
            out[at:at] = rng.choice(_TOKENS)
        elif kind == 4 and out:
            a = rng.randrange(len(out))
            out[at:at] = out[a:a + rng.randint(1, 64)]
        else:
            out = out[:at]
    return bytes(out)


def _read_weights(folder: Path, name: str, data: bytes) -> None:
    (folder / name).write_bytes(data)
    try:
        for _, tensor in iter_tensors(folder / name):
            assert isinstance(tensor, torch.Tensor)
    except CheckpointError:
        pass


def _run(kind: str, folder: Path, data: bytes) -> None:
    if kind == "safetensors":
        _read_weights(folder, "model.safetensors", data)
    elif kind in ("bin_zip", "bin_legacy"):
        _read_weights(folder, "pytorch_model.bin", data)
    elif kind == "index":
        (folder / "shard.safetensors").write_bytes(save({"a": torch.ones(2), "b": torch.zeros(2)}))
        _read_weights(folder, "model.safetensors.index.json", data)
    elif kind == "metrics":
        (folder / "metrics.jsonl").write_bytes(data)
        try:
            read_metrics(folder / "metrics.jsonl")
        except RecordError:
            pass
        if continue_records(folder, 4) is not None:  # the resume path: never raises on content
            lines = (folder / "metrics.jsonl").read_text(encoding="utf-8").split("\n")[:-1]
            for line in lines:  # what it rewrote is strict JSON, one usable row a line
                json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} written back"))
            assert len(read_rows(folder / "metrics.jsonl").rows) == len(lines)
    elif kind == "schedule":
        (folder / "schedule.jsonl").write_bytes(data)
        try:
            read_schedule(folder / "schedule.jsonl")
        except RecordError:
            pass
    elif kind == "params":
        (folder / "params.json").write_bytes(data)
        try:
            read_params(folder / "params.json")
        except RecordError:
            pass
    elif kind == "state":
        ckpt = folder / "checkpoint-4"
        ckpt.mkdir(exist_ok=True)
        (ckpt / STATE_FILE).write_bytes(data)
        got = load_state(SimpleNamespace(output_dir=str(folder), resume_from_checkpoint=str(ckpt)),
                         SimpleNamespace(global_step=4), _NAMES)
        assert got is None or (isinstance(got["next_weibull"], int) and got["integral"].dense.shape == (2,))
    elif kind == "trainer_state":
        ckpt = folder / "run"
        ckpt.mkdir(exist_ok=True)
        (ckpt / "trainer_state.json").write_bytes(data)
        step = read_step(ckpt)
        assert step is None or isinstance(step, int)


KINDS = list(_seeds())


@pytest.mark.parametrize("kind", KINDS)
def test_fuzzed_files_raise_only_the_readers_errors(kind, tmp_path, caplog):
    seed = _seeds()[kind]
    rng = random.Random(f"{SEED}-{kind}")
    deadline = time.monotonic() + SECONDS
    cases = 0
    while cases < CASES or time.monotonic() < deadline:
        data = mutate(seed, rng)
        folder = tmp_path / str(cases % 4)  # a few folders, rewritten: no disk growth on long runs
        folder.mkdir(exist_ok=True)
        try:
            _run(kind, folder, data)
        except Exception as exc:  # anything else is a finding: keep the input to reproduce it
            keep = tmp_path / f"finding-{kind}-{cases}.bin"
            keep.write_bytes(data)
            raise AssertionError(f"{kind}: {type(exc).__name__}: {exc} (input kept in {keep})") from exc
        cases += 1
        caplog.clear()
    print(f"{kind}: {cases} fuzzed files, no finding")
