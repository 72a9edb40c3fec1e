"""Model families built from their configs: T5, BART, Whisper, Marian classes and encoder/decoder
layers; LoRA adapters; frozen parameters reported, never dropped (docs/aggregates.md)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import train_tiny
from float_bounds import rel_sum_tol

from hf_weightforces import WeightForcesCallback
from hf_weightforces.core.aggregates import aggregate_masks, describe

transformers = pytest.importorskip("transformers")

IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=0)
SEQ = dict(d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
           encoder_ffn_dim=32, decoder_ffn_dim=32, vocab_size=256)


def _model(arch: str):
    t = transformers
    torch.manual_seed(0)
    if arch == "t5":
        return t.T5ForConditionalGeneration(t.T5Config(d_model=16, d_kv=4, d_ff=32, num_layers=2, num_decoder_layers=2,
                                                       num_heads=4, vocab_size=256, feed_forward_proj="gated-gelu",
                                                       pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    if arch == "bart":
        return t.BartForConditionalGeneration(t.BartConfig(max_position_embeddings=64, **SEQ, **IDS))
    if arch == "marian":
        return t.MarianMTModel(t.MarianConfig(max_position_embeddings=64, **SEQ, **IDS))
    if arch == "whisper":
        return t.WhisperForConditionalGeneration(t.WhisperConfig(num_mel_bins=8, max_source_positions=16,
                                                                 max_target_positions=32, **SEQ, **IDS))
    if arch == "llama":
        return t.LlamaForCausalLM(t.LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                                intermediate_size=64, num_hidden_layers=2, vocab_size=256))
    raise KeyError(arch)


# per stack: {class: weight matrices per layer}; embeddings outside the layers (and inside, for T5)
EXPECTED = {
    "t5": ({"selection": 2, "value": 1, "transmission": 4},  # q, k | v | o, wi_0, wi_1, wo
           {"selection": 4, "value": 2, "transmission": 5},  # self + cross attention
           1, 2),  # shared (lm_head tied) | relative_attention_bias in block 0 of each stack
    "bart": ({"selection": 2, "value": 1, "transmission": 3}, {"selection": 4, "value": 2, "transmission": 4}, 3, 0),
    "marian": ({"selection": 2, "value": 1, "transmission": 3}, {"selection": 4, "value": 2, "transmission": 4}, 3, 0),
    # conv1, conv2 (audio front-end), encoder/decoder positions, decoder tokens
    "whisper": ({"selection": 2, "value": 1, "transmission": 3}, {"selection": 4, "value": 2, "transmission": 4}, 5, 0),
}


@pytest.mark.parametrize("arch", sorted(EXPECTED))
def test_encoder_decoder_classes_and_layers(arch):
    enc, dec, n_embed, n_embed_in_layers = EXPECTED[arch]
    model = _model(arch)
    infos = [describe(n, p.dim(), p.numel()) for n, p in model.named_parameters()]
    counts: dict[tuple, int] = {}
    for i in infos:
        key = (i.stack if i.layer is not None else None, i.layer, i.group)
        counts[key] = counts.get(key, 0) + 1
    for layer in (0, 1):
        for stack, want in (("encoder", enc), ("decoder", dec)):
            got = {g: n for (s, lyr, g), n in counts.items() if s == stack and lyr == layer and g not in ("other", "embedding")}
            assert got == want, (arch, stack, layer, got)
    assert counts.get((None, None, "embedding"), 0) == n_embed
    assert sum(n for (s, lyr, g), n in counts.items() if lyr is not None and g == "embedding") == n_embed_in_layers
    masks = aggregate_masks(infos)
    layers = [k for k in masks if "layer_" in k]
    assert layers == ["encoder_layer_00", "encoder_layer_01", "decoder_layer_00", "decoder_layer_01"]
    assert masks["total"].sum() == len(infos) and not any(i.adapter for i in infos)


@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_encoder_decoder_run_reports_each_stack(tmp_path, wf_rows, arch):
    """A real seq2seq Trainer run on byte text (labels = inputs): encoder and decoder layer N apart."""
    model = _model(arch)
    train_tiny(tmp_path, [WeightForcesCallback(weibull_every=2)], model=model, max_steps=2, logging_steps=2)
    (row,) = wf_rows(tmp_path)
    params = json.loads((tmp_path / "weightforces" / "params.json").read_text())["params"]
    by_name = dict(model.named_parameters())
    for stack in ("encoder", "decoder"):
        members = [p for p in params if p["stack"] == stack and p["layer"] == 1]
        assert row[f"weightforces/{stack}_layer_01/numel"] == sum(p["numel"] for p in members)
        norm2 = math.fsum(float(by_name[p["name"]].detach().double().square().sum()) for p in members)
        # float64 sums of n exact squares in two orders: 2·n·2^-53 relative (Higham)
        n = sum(p["numel"] for p in members)
        assert row[f"weightforces/{stack}_layer_01/norm2"] == pytest.approx(norm2, rel=rel_sum_tol(n))
        assert math.isfinite(row[f"weightforces/{stack}_layer_01/align"])
    assert not any(k.startswith("weightforces/layer_") for k in row)
    assert row["weightforces/matrices/weibull_k"] > 0
    if arch == "t5":
        groups = {p["name"]: p["group"] for p in params}
        assert groups["decoder.block.1.layer.1.EncDecAttention.k.weight"] == "selection"
        assert groups["encoder.block.0.layer.1.DenseReluDense.wi_1.weight"] == "transmission"
        assert groups["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] == "embedding"


def test_frozen_layer_is_reported_not_dropped(tmp_path, wf_rows):
    """Llama with layer 0 frozen: total covers the trained tensors, frozen/* the rest (float64 sums)."""
    model = _model("llama")
    for p in model.model.layers[0].parameters():
        p.requires_grad_(False)
    frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad}
    trainer = train_tiny(tmp_path, [WeightForcesCallback(weibull_every=0)], model=model, max_steps=2, logging_steps=2)
    (row,) = wf_rows(tmp_path)
    n_frozen = sum(p.numel() for p in frozen.values())
    norm2 = math.fsum(float(p.detach().double().square().sum()) for p in frozen.values())
    assert row["weightforces/frozen/numel"] == n_frozen and row["weightforces/frozen/tensors"] == len(frozen)
    # float64 sums of n exact squares in two orders: 2·n·2^-53 relative (Higham), half that on the root
    assert row["weightforces/frozen/norm2"] == pytest.approx(norm2, rel=rel_sum_tol(n_frozen))
    assert row["weightforces/frozen/rms"] == pytest.approx(math.sqrt(norm2 / n_frozen), rel=rel_sum_tol(n_frozen))
    n_all = sum(p.numel() for p in trainer.model.parameters())
    assert row["weightforces/total/numel"] == n_all - n_frozen
    assert "weightforces/layer_00/numel" not in row and row["weightforces/layer_01/numel"] > 0
    record = json.loads((tmp_path / "weightforces" / "params.json").read_text())
    assert sorted(f["name"] for f in record["frozen"]) == sorted(frozen)


def test_lora_adapters_take_the_class_of_their_module(tmp_path, wf_rows):
    peft = pytest.importorskip("peft")
    base = _model("llama")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
                             init_lora_weights="gaussian")
    model = peft.get_peft_model(base, config)
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    train_tiny(tmp_path, [WeightForcesCallback(weibull_every=2)], model=model, max_steps=2, logging_steps=2,
               learning_rate=1e-2)
    (row,) = wf_rows(tmp_path)
    params = {p["name"]: p for p in json.loads((tmp_path / "weightforces" / "params.json").read_text())["params"]}
    assert all(p["adapter"] for p in params.values()) and len(params) == len(trained)
    want = {"q_proj": "selection", "v_proj": "value", "down_proj": "transmission", "embed_tokens": "embedding"}
    for name, p in params.items():
        module = next(m for m in want if f".{m}." in name)
        assert p["group"] == want[module], name
    assert row["weightforces/adapters/numel"] == row["weightforces/total/numel"] == sum(p.numel() for p in trained.values())
    # the Weibull pool holds the adapter matrices (no longer empty), the frozen base is reported beside
    assert math.isfinite(row["weightforces/matrices/weibull_k"]) and math.isfinite(row["weightforces/selection/weibull_k"])
    assert row["weightforces/frozen/numel"] == sum(p.numel() for n, p in model.named_parameters() if not p.requires_grad)
    assert "weightforces/other/numel" not in row  # LoRA matrices are 2-D: no adapter lands in other


def test_dora_magnitude_is_an_adapter_vector():
    for name, ndim, group in (
        ("base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector.default.weight", 1, "other"),
        ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight", 2, "selection"),
        ("base_model.model.model.embed_tokens.lora_embedding_B.default", 2, "embedding"),
        ("base_model.model.lm_head.modules_to_save.default.weight", 2, "embedding"),
        ("base_model.model.model.layers.1.mlp.up_proj.base_layer.weight", 2, "transmission"),
    ):
        info = describe(name, ndim, 8)
        assert info.group == group, name
        assert info.adapter == ("lora_" in name), name
