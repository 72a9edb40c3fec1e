"""Small, self-contained pieces for the demo, the tests and the benchmarks.

Nothing here downloads anything: the text is the Python standard library's own source code, which
every machine that runs this package already has, the "tokenizer" is the identity on bytes, and
the models are Pythia-style GPT-NeoX networks built from a config with random initial weights.

* :func:`stdlib_corpus`: the stdlib ``.py`` files as one byte string.
* :class:`ByteLMDataset` / :func:`make_datasets`: fixed-length byte blocks for causal LM training.
* :func:`pythia_config`: ``"70m"`` (the Pythia-70M architecture), ``"bench"`` and ``"tiny"``.
"""

from __future__ import annotations

import functools
import os
import random
import sysconfig
from pathlib import Path

import torch
from torch.utils.data import Dataset

__all__ = [
    "BYTE_VOCAB_SIZE",
    "PYTHIA_SIZES",
    "ByteLMDataset",
    "make_datasets",
    "pythia_config",
    "stdlib_corpus",
]

#: Byte-level tokens: token id == byte value, no special tokens. Files in the corpus are separated
#: by a Python comment line (see :func:`stdlib_corpus`), so no EOS token is needed and the vocab is
#: exactly 256 (already a multiple of 128).
BYTE_VOCAB_SIZE = 256

# Folders under the stdlib that are not the standard library's own modules (installed packages)
# or that hold deliberately odd test data (bad encodings, huge generated files).
_SKIP_DIRS = frozenset(
    {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
)


@functools.lru_cache(maxsize=1)
def _stdlib_files() -> tuple[tuple[str, Path], ...]:
    """``(relative posix path, path)`` of every stdlib ``.py`` file, sorted by relative path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _SKIP_DIRS]  # prune: never walk site-packages
        for name in names:
            if name.endswith(".py"):
                path = Path(folder, name)
                files.append((path.relative_to(root).as_posix(), path))
    return tuple(sorted(files))


def stdlib_corpus(max_bytes: int | None = None, seed: int = 0) -> bytes:
    """The Python standard library's ``.py`` sources as one byte string.

    Files are listed in sorted order of their path relative to the stdlib folder, then put in a
    pseudo-random order drawn from ``seed`` (so a short corpus mixes many modules instead of being
    all ``__future__``/``_aix_support``...). Each file is preceded by the separator line
    ``# ==== <relative path> ====`` and the result is cut to ``max_bytes``. The same seed and the
    same Python version give the same bytes on every call and every machine.
    """
    if max_bytes is not None and max_bytes < 0:
        raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
    files = list(_stdlib_files())
    random.Random(seed).shuffle(files)
    parts: list[bytes] = []
    size = 0
    for rel, path in files:
        if max_bytes is not None and size >= max_bytes:
            break
        chunk = f"\n# ==== {rel} ====\n".encode() + path.read_bytes()
        parts.append(chunk)
        size += len(chunk)
    corpus = b"".join(parts)
    return corpus if max_bytes is None else corpus[:max_bytes]


class ByteLMDataset(Dataset):
    """Non-overlapping ``block_size`` windows of byte tokens for a causal LM.

    Token ids are byte values (0..255, see :data:`BYTE_VOCAB_SIZE`). Item ``i`` is bytes
    ``[i * block_size, (i + 1) * block_size)``; a trailing partial block is dropped. Items are
    ``{"input_ids": LongTensor[block_size], "labels": LongTensor[block_size]}`` with
    ``labels == input_ids``: Hugging Face causal LMs shift the labels internally.
    """

    def __init__(self, data: bytes, block_size: int):
        if block_size < 2:
            raise ValueError(f"block_size must be >= 2, got {block_size}")
        self.block_size = block_size
        n_blocks = len(data) // block_size
        if n_blocks == 0:  # e.g. an empty eval split
            self.blocks = torch.zeros(0, block_size, dtype=torch.long)
            return
        tokens = torch.frombuffer(bytearray(data[: n_blocks * block_size]), dtype=torch.uint8)
        self.blocks = tokens.long().view(n_blocks, block_size)

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.blocks[i]
        return {"input_ids": ids.clone(), "labels": ids.clone()}


def make_datasets(
    block_size: int = 128,
    max_bytes: int | None = 2_000_000,
    eval_fraction: float = 0.05,
    seed: int = 0,
) -> tuple[ByteLMDataset, ByteLMDataset]:
    """``(train, eval)`` datasets from :func:`stdlib_corpus`: the last ``eval_fraction`` of the
    corpus (rounded to whole blocks, at least one block when ``eval_fraction > 0``) is eval."""
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    corpus = stdlib_corpus(max_bytes, seed=seed)
    n_blocks = len(corpus) // block_size
    n_eval = 0 if eval_fraction == 0 else max(1, round(n_blocks * eval_fraction))
    if n_blocks - n_eval < 1:
        raise ValueError(f"corpus of {len(corpus)} bytes is too short for block_size {block_size}")
    cut = (n_blocks - n_eval) * block_size
    return ByteLMDataset(corpus[:cut], block_size), ByteLMDataset(corpus[cut:], block_size)


#: ``size -> (hidden_size, num_hidden_layers, num_attention_heads, intermediate_size)``.
PYTHIA_SIZES: dict[str, tuple[int, int, int, int]] = {
    "70m": (512, 6, 8, 2048),  # EleutherAI Pythia-70M
    "bench": (256, 4, 4, 1024),  # benchmarks: ~80 ms a step on one CPU thread
    "tiny": (64, 2, 4, 256),  # tests and the CPU demo: a few hundred steps in a minute or two
}


def pythia_config(size: str, vocab_size: int = BYTE_VOCAB_SIZE, **overrides):
    """A :class:`transformers.GPTNeoXConfig` of the Pythia family at ``size`` (see
    :data:`PYTHIA_SIZES`).

    Shared by every size, as in Pythia: rotary embeddings on 25% of each head
    (``rotary_pct=0.25``, base 10000), parallel residual, GeLU, LayerNorm eps 1e-5, biases on,
    untied input and output embeddings, 2048 positions, init std 0.02. ``vocab_size`` defaults to
    the byte vocab (256) instead of Pythia's 50304. ``overrides`` go to the config as is.
    """
    from transformers import GPTNeoXConfig

    if size not in PYTHIA_SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {sorted(PYTHIA_SIZES)}")
    hidden, layers, heads, intermediate = PYTHIA_SIZES[size]
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate,
        hidden_act="gelu",
        rotary_pct=0.25,
        rotary_emb_base=10000,
        max_position_embeddings=2048,
        initializer_range=0.02,
        layer_norm_eps=1e-5,
        use_parallel_residual=True,
        tie_word_embeddings=False,
        attention_bias=True,
        bos_token_id=None,
        eos_token_id=None,
    )
    kwargs.update(overrides)
    return GPTNeoXConfig(**kwargs)
