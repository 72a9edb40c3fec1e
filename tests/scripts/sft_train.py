"""An ordinary TRL script that knows nothing of hf-weightforces: SFTConfig and SFTTrainer only.

A byte-level tokenizer and a tiny GPT-NeoX built here (no download), trained on lines of the
Python standard library's source.  The tests turn the monitor on from outside.
"""

import sysconfig
from pathlib import Path

import torch
from datasets import Dataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, HfArgumentParser, PreTrainedTokenizerFast
from trl import SFTConfig, SFTTrainer


def byte_tokenizer() -> PreTrainedTokenizerFast:
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")


def main() -> None:
    (args,) = HfArgumentParser((SFTConfig,)).parse_args_into_dataclasses()
    tokenizer = byte_tokenizer()
    lines = (Path(sysconfig.get_paths()["stdlib"]) / "argparse.py").read_text().splitlines()
    texts = [line for line in lines if len(line.strip()) > 20][:64]
    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=128,
                           bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    trainer = SFTTrainer(model=GPTNeoXForCausalLM(config), args=args, processing_class=tokenizer,
                         train_dataset=Dataset.from_dict({"text": texts}))
    trainer.train()


if __name__ == "__main__":
    main()
