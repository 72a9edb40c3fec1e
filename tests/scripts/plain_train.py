"""An ordinary training script that knows nothing of hf-weightforces: TrainingArguments only.

A tiny GPT-NeoX built from a config, trained on bytes of the Python standard library's source.
The tests turn the monitor on from outside (HF_WEIGHTFORCES=1, ``hf-weightforces run``).
"""

import sysconfig
from pathlib import Path

import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, HfArgumentParser, Trainer, TrainingArguments

BLOCK, BLOCKS = 32, 64


class StdlibBytes(torch.utils.data.Dataset):
    def __init__(self) -> None:
        text = (Path(sysconfig.get_paths()["stdlib"]) / "argparse.py").read_bytes()[: BLOCK * BLOCKS]
        self.blocks = torch.tensor(list(text)).view(BLOCKS, BLOCK)

    def __len__(self) -> int:
        return BLOCKS

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


def main() -> None:
    (args,) = HfArgumentParser((TrainingArguments,)).parse_args_into_dataclasses()
    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=256, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=64, bos_token_id=None, eos_token_id=None)
    Trainer(model=GPTNeoXForCausalLM(config), args=args, train_dataset=StdlibBytes()).train()


if __name__ == "__main__":
    main()
