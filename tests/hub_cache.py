"""A local Hugging Face Hub cache in the hub's own layout, for offline tests of Hub revisions.

``models--org--name/blobs/<sha256>`` hold the file contents, ``snapshots/<commit>/<file>`` are relative
symlinks to them and ``refs/<revision>`` holds the commit hash, exactly as ``snapshot_download`` leaves a
cache, so ``HF_HUB_OFFLINE=1`` reads it with no network.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path


def add_revision(cache: Path, repo_id: str, revision: str, folder: Path) -> Path:
    """Put every file of ``folder`` into ``cache`` as revision ``revision`` of ``repo_id``; returns the snapshot."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for file in sorted(p for p in folder.iterdir() if p.is_file()):
        digest = hashlib.sha256(file.read_bytes()).hexdigest()
        blob = repo / "blobs" / digest
        if not blob.exists():
            shutil.copyfile(file, blob)
        link = snapshot / file.name
        if not link.exists():
            os.symlink(os.path.relpath(blob, snapshot), link)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    return snapshot


def train_revisions(local: Path, steps: list[int], *, lr: float = 2e-3, weight_decay: float = 0.1, seed: int = 0) -> dict[int, Path]:
    """A tiny GPT-NeoX trained with torch AdamW on stdlib bytes, saved (safetensors) at each of ``steps``."""
    import torch
    from transformers import GPTNeoXForCausalLM

    from hf_weightforces.demo import make_datasets, pythia_config

    torch.manual_seed(seed)
    model = GPTNeoXForCausalLM(pythia_config("tiny"))
    data = make_datasets(block_size=32, max_bytes=40_000, eval_fraction=0.0)[0]
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    rest = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95))
    saved: dict[int, Path] = {}
    step = 0
    for target in steps:
        while step < target:
            batch = torch.stack([data[(step * 4 + i) % len(data)]["input_ids"] for i in range(4)])
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            step += 1
        out = local / f"step{target}"
        model.save_pretrained(out, safe_serialization=True)
        saved[target] = out
    return saved
