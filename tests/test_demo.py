"""The demo helpers: real stdlib text, byte blocks, and the Pythia-family configs."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from hf_weightforces.demo import (
    BYTE_VOCAB_SIZE,
    ByteLMDataset,
    make_datasets,
    pythia_config,
    stdlib_corpus,
)

transformers = pytest.importorskip("transformers")


def test_corpus_is_real_deterministic_stdlib_text():
    corpus = stdlib_corpus(200_000)
    assert isinstance(corpus, bytes) and len(corpus) == 200_000
    assert b"def " in corpus and b"import " in corpus and b"# ==== " in corpus
    assert stdlib_corpus(200_000) == corpus
    assert stdlib_corpus(50_000) == corpus[:50_000]
    assert stdlib_corpus(50_000, seed=1) != corpus[:50_000]
    assert stdlib_corpus(0) == b""
    # Only the standard library's own modules, never installed packages.
    assert b"site-packages" not in corpus.split(b"\n# ==== ", 2)[1].split(b"\n", 1)[0]


def test_byte_blocks():
    data = bytes(range(256)) * 3 + b"tail"
    ds = ByteLMDataset(data, block_size=64)
    assert len(ds) == len(data) // 64
    item = ds[5]
    assert set(item) == {"input_ids", "labels"}
    assert item["input_ids"].shape == (64,) and item["input_ids"].dtype == torch.long
    assert torch.equal(item["input_ids"], item["labels"])
    assert item["input_ids"].tolist() == list(data[5 * 64 : 6 * 64])
    item["labels"][0] = -100  # items do not alias each other or the dataset
    assert ds[5]["labels"][0] == data[5 * 64]


def test_make_datasets_split():
    train, eval_ = make_datasets(block_size=128, max_bytes=100_000, eval_fraction=0.1)
    assert len(train) + len(eval_) == 100_000 // 128
    assert len(eval_) == round(len(train + eval_) * 0.1)
    corpus = stdlib_corpus(100_000)
    assert bytes(train[0]["input_ids"].tolist()) == corpus[:128]
    assert bytes(eval_[0]["input_ids"].tolist()) == corpus[len(train) * 128 : (len(train) + 1) * 128]
    assert int(train.blocks.max()) < BYTE_VOCAB_SIZE


@pytest.mark.parametrize(
    "size, hidden, layers, heads, intermediate",
    [("70m", 512, 6, 8, 2048), ("bench", 256, 4, 4, 1024), ("tiny", 64, 2, 4, 256)],
)
def test_config_sizes(size, hidden, layers, heads, intermediate):
    cfg = pythia_config(size)
    assert isinstance(cfg, transformers.GPTNeoXConfig)
    assert (cfg.hidden_size, cfg.num_hidden_layers) == (hidden, layers)
    assert (cfg.num_attention_heads, cfg.intermediate_size) == (heads, intermediate)
    # transformers 5 keeps rotary_pct as rope_parameters["partial_rotary_factor"]
    assert cfg.rope_parameters["partial_rotary_factor"] == 0.25
    assert cfg.use_parallel_residual is True and cfg.tie_word_embeddings is False
    assert cfg.max_position_embeddings == 2048
    assert cfg.vocab_size >= BYTE_VOCAB_SIZE and cfg.vocab_size % 128 == 0


def test_70m_parameter_count_without_allocating():
    with torch.device("meta"):
        model = transformers.GPTNeoXForCausalLM(pythia_config("70m"))
    n_params = sum(p.numel() for p in model.parameters())
    embeddings = 2 * BYTE_VOCAB_SIZE * 512  # untied embed_in and lm_head
    assert n_params - embeddings == 18_915_328  # Pythia-70M's published non-embedding count


def test_tiny_model_forward_and_backward():
    torch.manual_seed(0)
    model = transformers.GPTNeoXForCausalLM(pythia_config("tiny"))
    train, _ = make_datasets(block_size=32, max_bytes=4096, eval_fraction=0.25)
    batch = torch.utils.data.default_collate([train[i] for i in range(2)])
    out = model(**batch)
    assert out.logits.shape == (2, 32, BYTE_VOCAB_SIZE)
    assert torch.isfinite(out.loss) and 4.0 < out.loss.item() < 7.0  # about ln(256) = 5.5
    out.loss.backward()
    assert model.lm_head.weight.grad is not None


def _demo_script():
    path = Path(__file__).resolve().parents[1] / "examples" / "train_pythia.py"
    spec = importlib.util.spec_from_file_location("train_pythia", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("train_pythia", module)  # dataclasses look their module up there
    spec.loader.exec_module(sys.modules["train_pythia"])
    return sys.modules["train_pythia"]


@pytest.mark.parametrize("size", ["tiny", "bench", "70m"])
def test_demo_saves_the_checkpoints_the_offline_tools_need(size):
    """spline, lambda, geometry and report need at least four checkpoints (safetensors: the Trainer's format)."""
    script = _demo_script()
    defaults = script.script_defaults(size)
    assert defaults["save_strategy"] == "steps" and defaults["save_only_model"] is True
    assert defaults["max_steps"] // defaults["save_steps"] >= 4
    _, training, _ = script.parse_args([f"--size={size}", "--report_to", "none"])
    assert training.save_strategy == "steps" and training.save_steps == defaults["save_steps"]


def test_demo_holds_weights_in_the_dtype_asked_for():
    script, _, _ = _demo_script().parse_args(["--tiny", "--report_to", "none", "--weights_dtype", "bfloat16"])
    assert script.weights_dtype == "bfloat16" and getattr(torch, script.weights_dtype) is torch.bfloat16
