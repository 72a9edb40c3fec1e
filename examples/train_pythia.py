"""Train a Pythia-style GPT-NeoX from scratch with the Hugging Face Trainer and log weight forces.

The data is the Python standard library's own source (byte-level tokens), the model is built from
a config, so nothing is downloaded. Every flag of ``TrainingArguments`` and of
``hf_weightforces.WeightForcesArguments`` works here too:

    python examples/train_pythia.py --tiny                        # CPU, a couple of minutes
    hf-weightforces report runs/pythia-tiny                       # figures from its records and checkpoints
    python examples/train_pythia.py --size 70m --max_steps 2000   # the Pythia-70M architecture
    python examples/train_pythia.py --tiny --weight_forces_every 5 --report_to none
    python examples/train_pythia.py --tiny --weights_dtype bfloat16  # weights held in bf16: rounding
    torchrun --nproc_per_node 2 examples/train_pythia.py --tiny

The script only changes defaults (``script_defaults``, per ``--size``; ``--help`` shows them); any
flag you give wins over them.
Weight forces are on by default (``--weight_forces False`` turns them off). Without a
``WANDB_API_KEY`` (and with ``WANDB_MODE`` unset) W&B runs offline and writes under
``<output_dir>/wandb``; ``wandb sync <that run folder>`` uploads it later.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path
from typing import Literal

import torch
from transformers import (
    GPTNeoXForCausalLM,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
    default_data_collator,
)

from hf_weightforces import WeightForcesArguments
from hf_weightforces.demo import make_datasets, pythia_config


@dataclass
class ScriptArguments:
    size: Literal["70m", "bench", "tiny"] = field(
        default="70m",
        metadata={"help": "Model size: 70m (Pythia-70M architecture), bench (4x256) or tiny (2x64)."},
    )
    tiny: bool = field(default=False, metadata={"help": "Shortcut for --size tiny."})
    block_size: int = field(default=128, metadata={"help": "Tokens (bytes) per training sequence."})
    max_bytes: int | None = field(
        default=None, metadata={"help": "Corpus size in bytes; None: the whole stdlib (about 12 MB)."}
    )
    eval_fraction: float = field(default=0.05, metadata={"help": "Tail of the corpus held out."})
    weights_dtype: Literal["float32", "bfloat16", "float16"] = field(
        default="float32",
        metadata={
            "help": "dtype the model's weights are held in. bfloat16/float16 without a float32 master copy "
            "(not --bf16, which keeps float32 weights): the weights then take only part of each update "
            "(`rounding` in the budget)."
        },
    )


# Defaults per size; any flag the user gives wins (they are argparse defaults).
SIZE_DEFAULTS: dict[str, dict[str, object]] = {
    "tiny": {
        "max_steps": 300,
        "per_device_train_batch_size": 16,
        "eval_steps": 100,
        "save_steps": 50,
        "block_size": 128,
        "max_bytes": 2_000_000,
    },
    "bench": {
        "max_steps": 1000,
        "per_device_train_batch_size": 16,
        "eval_steps": 250,
        "save_steps": 200,
        "block_size": 256,
        "max_bytes": 8_000_000,
    },
    "70m": {
        "max_steps": 5000,
        "per_device_train_batch_size": 16,
        "eval_steps": 500,
        "save_steps": 500,
        "block_size": 512,
    },
}


def script_defaults(size: str) -> dict[str, object]:
    """The script's defaults for ``--size size``, by argparse destination (= field name)."""
    defaults: dict[str, object] = {
        "output_dir": f"runs/pythia-{size}",
        "run_name": f"pythia-{size}",
        "learning_rate": 1e-3,
        "warmup_steps": 0.1,  # a float below 1 is a fraction of max_steps
        "lr_scheduler_type": "cosine",
        "weight_decay": 0.1,
        "adam_beta2": 0.95,
        "max_grad_norm": 1.0,
        "optim": "adamw_torch",
        "logging_steps": 10,
        "eval_strategy": "steps",
        "per_device_eval_batch_size": 32,
        # Checkpoints for the offline tools (spline, lambda, geometry and report need at least four; save_steps
        # per size in SIZE_DEFAULTS gives 5-10): the weights only, as safetensors (the Trainer's format), no
        # optimizer state, so they stay small. `--save_only_model False` keeps what a resume needs.
        "save_strategy": "steps",
        "save_only_model": True,
        "seed": 42,
        "report_to": "wandb" if find_spec("wandb") else "none",
        "weight_forces": True,
        "weight_forces_backbone_every": 50,  # the AdamW backbone (with its random-walk null)
        "weight_forces_rank_every": 100,  # stable/effective ranks, key-query per head
        **SIZE_DEFAULTS[size],
    }
    if not torch.cuda.is_available():
        defaults["use_cpu"] = True
    return defaults


def parse_args(argv: list[str]):
    parser = HfArgumentParser((ScriptArguments, TrainingArguments, WeightForcesArguments))
    # First pass: only the size decides which defaults apply (no -h here: the full parser has it).
    first, _ = HfArgumentParser(
        ScriptArguments, add_help=False, allow_abbrev=False
    ).parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    size = "tiny" if first.tiny else first.size
    parser.set_defaults(**script_defaults(size))  # also what --help shows
    script, training, wf = parser.parse_args_into_dataclasses(args=argv)
    script.size = size
    return script, training, wf


def setup_wandb_env(output_dir: str) -> None:
    """Offline W&B unless the user has a key or chose a mode; the run lands in ``output_dir``.
    Must happen before the Trainer's ``WandbCallback`` starts the run."""
    if "WANDB_API_KEY" not in os.environ and "WANDB_MODE" not in os.environ:
        os.environ["WANDB_MODE"] = "offline"
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("WANDB_DIR", str(Path(output_dir).resolve()))
    os.environ.setdefault("WANDB_PROJECT", "hf-weightforces")


def main(argv: list[str] | None = None) -> None:
    script, training_args, wf_args = parse_args(sys.argv[1:] if argv is None else argv)
    if "wandb" in training_args.report_to:
        setup_wandb_env(training_args.output_dir)

    train_ds, eval_ds = make_datasets(
        script.block_size, script.max_bytes, script.eval_fraction, seed=training_args.seed
    )
    if len(eval_ds) == 0:
        training_args.eval_strategy = "no"
    torch.manual_seed(training_args.seed)
    model = GPTNeoXForCausalLM(pythia_config(script.size)).to(getattr(torch, script.weights_dtype))

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_ds,
        eval_dataset=eval_ds if len(eval_ds) else None,
        data_collator=default_data_collator,
        callbacks=wf_args.make_callbacks(),
    )
    if trainer.is_world_process_zero():
        n_params = sum(p.numel() for p in model.parameters())
        print(
            f"pythia-{script.size}: {n_params / 1e6:.2f}M parameters, "
            f"{len(train_ds)} train / {len(eval_ds)} eval blocks of {script.block_size} bytes"
        )
    trainer.train()
    if training_args.save_strategy != "no":
        trainer.save_model()

    if not trainer.is_world_process_zero():
        return
    run_dir = None
    if "wandb" in training_args.report_to:
        import wandb

        if wandb.run is not None:
            run_dir = Path(wandb.run.dir).parent  # .../wandb/<offline-run-...>/files -> run folder
            wandb.finish()
    print(f"output dir: {training_args.output_dir}")
    if run_dir is not None:
        print(f"W&B run:    {run_dir} (mode {os.environ.get('WANDB_MODE', 'online')})")
    metrics = Path(training_args.output_dir) / "weightforces" / "metrics.jsonl"
    if metrics.exists():
        print(f"forces:     {metrics}")
    elif wf_args.weight_forces:
        print(f"forces:     (no {metrics} was written)")


if __name__ == "__main__":
    main()
