"""Weight classes from real model layouts built from configs (no downloads)."""

from __future__ import annotations

import pytest

from hf_weightforces.core.groups import Grouping, canonical_name, classify, layer_index

transformers = pytest.importorskip("transformers")


def _tiny(name):
    t = transformers
    common = dict(hidden_size=32, num_attention_heads=4, intermediate_size=64, vocab_size=100)
    if name == "gpt_neox":
        return t.GPTNeoXForCausalLM(t.GPTNeoXConfig(num_hidden_layers=2, **common))
    if name == "llama":
        return t.LlamaForCausalLM(t.LlamaConfig(num_hidden_layers=2, num_key_value_heads=2, **common))
    if name == "mistral":
        return t.MistralForCausalLM(t.MistralConfig(num_hidden_layers=2, num_key_value_heads=2, **common))
    if name == "qwen2":
        return t.Qwen2ForCausalLM(t.Qwen2Config(num_hidden_layers=2, num_key_value_heads=2, **common))
    if name == "gpt2":
        return t.GPT2LMHeadModel(t.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64))
    if name == "bert":
        return t.BertModel(t.BertConfig(num_hidden_layers=2, **common))
    raise KeyError(name)


# per architecture: per layer {class: count of weight matrices}, plus the whole-model embedding count
EXPECTED = {
    "gpt_neox": ({"selection": 1, "transmission": 3}, 2),  # fused query_key_value; embed_in + lm_head
    "llama": ({"selection": 2, "value": 1, "transmission": 4}, 2),
    "mistral": ({"selection": 2, "value": 1, "transmission": 4}, 2),
    "qwen2": ({"selection": 2, "value": 1, "transmission": 4}, 2),
    "gpt2": ({"selection": 1, "transmission": 3}, 2),  # c_attn fused; wte + wpe (lm_head tied to wte)
    "bert": ({"selection": 2, "value": 1, "transmission": 3}, 3),  # word, position, token type
}


@pytest.mark.parametrize("arch", sorted(EXPECTED))
def test_classes_of_real_layouts(arch):
    per_layer, n_embed = EXPECTED[arch]
    model = _tiny(arch)
    counts: dict[tuple[int | None, str], int] = {}
    for name, p in model.named_parameters():
        cls = classify(name, p.dim())
        if p.dim() < 2:
            assert cls == "other", name  # biases and norms
        counts[(layer_index(name), cls)] = counts.get((layer_index(name), cls), 0) + 1
    for layer in (0, 1):
        got = {c: n for (lyr, c), n in counts.items() if lyr == layer and c != "other"}
        assert got == per_layer, (arch, layer, got)
    assert counts.get((None, "embedding"), 0) == n_embed
    assert not any(c in ("selection", "value", "transmission") for (lyr, c) in counts if lyr is None)


def test_wrapper_prefixes_and_checkpoint_names():
    wrapped = "module._fsdp_wrapped_module.gpt_neox.layers.3._checkpoint_wrapped_module.mlp.dense_h_to_4h.weight"
    assert canonical_name(wrapped) == "gpt_neox.layers.3.mlp.dense_h_to_4h.weight"
    assert layer_index("module.gpt_neox.layers.11.attention.dense.weight") == 11
    assert classify("embed_out.weight") == "embedding"  # GPT-NeoX head as saved in checkpoints
    assert classify("model.layers.0.self_attn.q_proj.bias", 1) == "other"


def test_user_patterns_win_and_are_validated():
    g = Grouping({"value": [r"query_key_value"], "other": [r"embed_in"]})
    assert g.classify("gpt_neox.layers.0.attention.query_key_value.weight") == "value"
    assert g.classify("gpt_neox.embed_in.weight") == "other"
    assert g.classify("gpt_neox.layers.0.attention.dense.weight") == "transmission"  # defaults still apply
    assert Grouping({"selection": ["dense"]}, use_defaults=False).classify("x.mlp.fc1.weight") == "other"
    with pytest.raises(ValueError, match="unknown weight class"):
        Grouping({"attn": ["q"]})
    with pytest.raises(ValueError, match="bad regex"):
        Grouping({"value": ["("]})
    with pytest.raises(ValueError, match="list"):
        Grouping({"value": "v_proj"})
