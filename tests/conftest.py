"""Shared helpers: a real tiny GPT-NeoX trained by the real Trainer on real stdlib text."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)  # tiny models: threads cost more than they give on a 2-core CI machine


def tiny_model(seed: int = 0, **overrides):
    from transformers import GPTNeoXForCausalLM

    from hf_weightforces.demo import pythia_config

    torch.manual_seed(seed)
    return GPTNeoXForCausalLM(pythia_config("tiny", **overrides))


_DATA = {}


def tiny_data(block_size: int = 32, max_bytes: int = 60_000):
    from hf_weightforces.demo import make_datasets

    key = (block_size, max_bytes)
    if key not in _DATA:
        _DATA[key] = make_datasets(block_size=block_size, max_bytes=max_bytes, eval_fraction=0.02)[0]
    return _DATA[key]


def train_tiny(output_dir, callbacks=(), *, max_steps=12, logging_steps=4, report_to=(), seed=0, model=None,
               resume=None, **kw):
    """A real Trainer run on CPU; returns the trainer after ``train()``."""
    from transformers import Trainer, TrainingArguments

    if report_to:
        os.environ["WANDB_DIR"] = str(output_dir)
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=max_steps,
        per_device_train_batch_size=4,
        learning_rate=kw.pop("learning_rate", 2e-3),
        weight_decay=kw.pop("weight_decay", 0.1),
        warmup_steps=kw.pop("warmup_steps", 3),
        logging_steps=logging_steps,
        report_to=list(report_to),
        use_cpu=True,
        save_strategy=kw.pop("save_strategy", "no"),
        disable_tqdm=True,
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=0,
        **kw,
    )
    trainer = Trainer(model=model if model is not None else tiny_model(seed), args=args,
                      train_dataset=tiny_data(), callbacks=list(callbacks))
    trainer.train(resume_from_checkpoint=resume)
    if "wandb" in report_to:
        import wandb

        wandb.finish()
        wandb.teardown()  # finish() returns before the service has flushed the run file
    return trainer


@pytest.fixture
def wf_rows():
    from hf_weightforces.integrations.sinks import read_jsonl

    def read(output_dir):
        return read_jsonl(os.path.join(str(output_dir), "weightforces", "metrics.jsonl"))

    return read
