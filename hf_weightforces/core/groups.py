"""Classes of weight matrices (docs/aggregates.md), layers and adapters, from parameter names.

The paper's classes:

* ``transmission``: attention output projection and the MLP matrices,
* ``selection``: query/key projections (fused ``query_key_value`` / ``c_attn`` hold V too and are
  reported as selection),
* ``value``: ``v_proj`` where it is stored separately,
* ``embedding``: token/position embeddings and the LM head,
* ``other``: everything else (biases, norms).

Only weight *matrices* (2-D tensors, or GPT-2 ``Conv1D`` weights) get a matrix class; a bias of
``q_proj`` is ``other``.  Users can pass their own ``{class: [regex, ...]}`` patterns, tried
before the built-in ones.  What each aggregate name covers (``total``, ``matrices``, ``adapters``,
``frozen``, layers) is in ``docs/aggregates.md``.

Model families beyond the decoder-only ones:

* T5: ``SelfAttention``/``EncDecAttention`` ``q``, ``k`` (selection), ``v`` (value), ``o`` and
  ``DenseReluDense`` ``wi``/``wi_0``/``wi_1``/``wo`` (transmission); ``shared``, ``lm_head`` and the
  ``relative_attention_bias`` tables (learned position embeddings, looked up by distance bucket)
  are embedding.
* Whisper: the ``conv1``/``conv2`` front-end that embeds the audio features is embedding.
* LoRA/DoRA (PEFT): ``lora_A``/``lora_B``/``lora_embedding_A``/``lora_embedding_B`` matrices take
  the class of the module they adapt and are marked as adapters (:func:`is_adapter`); a DoRA
  ``lora_magnitude_vector`` is a vector of column norms: an adapter, class ``other`` like every
  1-D tensor.  PEFT's ``base_layer``/``modules_to_save``/``original_module`` wrappers are seen
  through.
* Encoder-decoders (T5 ``encoder.block.N``, BART/Marian/Whisper ``model.encoder.layers.N``): the
  stack a layer belongs to (:func:`layer_stack`) keeps encoder and decoder layer N apart.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

__all__ = [
    "ADAPTERS",
    "FROZEN",
    "GROUPS",
    "MATRICES",
    "TOTAL",
    "Grouping",
    "adapted_name",
    "canonical_name",
    "classify",
    "is_adapter",
    "layer_index",
    "layer_stack",
]

#: Matrix classes in reporting order.
GROUPS: tuple[str, ...] = ("transmission", "selection", "value", "embedding", "other")
#: Every trained parameter (the optimizer's): forces, norms, rms, numel.
TOTAL = "total"
#: Every class but ``other``: the full row, and the pool of the Weibull fits and offsets.
MATRICES = "matrices"
#: The trained adapter tensors (LoRA/DoRA), whatever their class.
ADAPTERS = "adapters"
#: Parameters of the model the optimizer does not train: norm2, numel, rms only.
FROZEN = "frozen"

# Wrapper prefixes/infixes that distributed wrappers and torch.compile put into names.
_WRAPPER_PARTS = (
    "_fsdp_wrapped_module.",
    "_checkpoint_wrapped_module.",
    "_orig_mod.",
    "_forward_module.",
)

# Built-in patterns, matched with re.search against the canonical name.  Order matters: the
# first class whose pattern matches wins.  Each entry names the architectures it covers.
DEFAULT_PATTERNS: dict[str, tuple[str, ...]] = {
    "embedding": (
        r"(^|\.)(embed_in|embed_out|lm_head|wte|wpe|embed_tokens|word_embeddings)\.weight$",
        r"(^|\.)(position_embeddings|token_type_embeddings|embed_positions)\.weight$",
        r"(^|\.)shared\.weight$",
        # T5 relative position buckets; Whisper's convolutional audio front-end
        r"(^|\.)relative_attention_bias\.weight$",
        r"(^|\.)encoder\.conv[12]\.weight$",
    ),
    "selection": (
        r"(^|\.)(q_proj|k_proj|query|key|query_key_value|c_attn|qkv_proj|Wqkv|wq|wk)\.weight$",
        r"(^|\.)(SelfAttention|EncDecAttention)\.(q|k)\.weight$",  # T5
    ),
    "value": (
        r"(^|\.)(v_proj|value|wv)\.weight$",
        r"(^|\.)(SelfAttention|EncDecAttention)\.v\.weight$",  # T5
    ),
    "transmission": (
        # GPT-NeoX / Pythia
        r"attention\.dense\.weight$",
        r"(^|\.)(dense_h_to_4h|dense_4h_to_h)\.weight$",
        # Llama / Mistral / Qwen; BART / Marian / Whisper (out_proj, fc1, fc2)
        r"(^|\.)(o_proj|gate_proj|up_proj|down_proj|out_proj|fc1|fc2|wo|w1|w2|w3)\.weight$",
        # T5 (attention output o, feed-forward wi or gated wi_0/wi_1, wo)
        r"(^|\.)(SelfAttention|EncDecAttention)\.o\.weight$",
        r"(^|\.)DenseReluDense\.(wi|wi_0|wi_1|wo)\.weight$",
        # GPT-2 (attn.c_proj, mlp.c_fc, mlp.c_proj)
        r"(^|\.)(c_proj|c_fc)\.weight$",
        # BERT (attention.output.dense, intermediate.dense, output.dense)
        r"(^|\.)attention\.output\.dense\.weight$",
        r"(^|\.)intermediate\.dense\.weight$",
        r"(^|\.)output\.dense\.weight$",
    ),
}
_DEFAULT_RES = {cls: re.compile("|".join(f"(?:{p})" for p in pats)) for cls, pats in DEFAULT_PATTERNS.items()}

_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block|decoder_layers)\.(\d+)\.")
_STACK_RE = re.compile(r"(?:^|\.)(encoder|decoder)\.(?:layers|layer|blocks|block)\.\d+\.")

# PEFT: an adapter tensor ends in one of these (then the adapter's name, then maybe ``.weight``);
# what precedes it is the adapted module.
_ADAPTER_RE = re.compile(
    r"\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)(?:\.[^.]+)?(?:\.weight)?$"
)
# PEFT wrappers around the base model's own tensors.
_PEFT_WRAPPER_RE = re.compile(r"\.(?:base_layer|original_module|modules_to_save\.[^.]+)(?=\.)")


def canonical_name(name: str) -> str:
    """Strip wrapper parts (``module.``, FSDP/checkpoint/compile wrappers) from a parameter name."""
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    while name.startswith("module."):
        name = name[len("module.") :]
    return name


def is_adapter(name: str) -> bool:
    """Whether ``name`` is a PEFT LoRA/DoRA adapter tensor (``lora_A``, ``lora_B``,
    ``lora_embedding_A/B``, ``lora_magnitude_vector``)."""
    return _ADAPTER_RE.search(name) is not None


def adapted_name(name: str) -> str:
    """The name the built-in rules classify: an adapter's adapted module (``...q_proj.weight`` for
    ``...q_proj.lora_A.default.weight``), PEFT wrappers (``base_layer``, ``modules_to_save.X``,
    ``original_module``) removed."""
    name = canonical_name(name)
    match = _ADAPTER_RE.search(name)
    if match:
        name = name[: match.start()] + ".weight"
    return _PEFT_WRAPPER_RE.sub("", name)


def layer_index(name: str) -> int | None:
    """The transformer layer a parameter belongs to, parsed from its name (``None`` if none)."""
    match = _LAYER_RE.search(canonical_name(name))
    return int(match.group(1)) if match else None


def layer_stack(name: str) -> str | None:
    """``"encoder"`` or ``"decoder"`` for a layer of an encoder or decoder stack (T5
    ``encoder.block.N``, BART/Marian/Whisper ``model.decoder.layers.N``, also BERT's
    ``encoder.layer.N``), else ``None``.  Aggregates name the stack only where a model has both."""
    match = _STACK_RE.search(canonical_name(name))
    return match.group(1) if match else None


@dataclass(frozen=True)
class Grouping:
    """Name → class rules: user patterns first, then the built-in ones.

    ``patterns`` maps a class in :data:`GROUPS` to regular expressions searched in the canonical
    parameter name (adapters included: a user pattern may name ``lora_A``).  The built-in rules
    see the adapted module's name (:func:`adapted_name`) and keep 1-D tensors (biases, norm
    scales, DoRA magnitudes) in ``other``.
    """

    patterns: Mapping[str, Sequence[str]] | None = None
    use_defaults: bool = True
    _compiled: tuple = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        compiled = []
        for cls, pats in (self.patterns or {}).items():
            if cls not in GROUPS:
                raise ValueError(f"unknown weight class {cls!r} in patterns; expected one of {GROUPS}")
            if isinstance(pats, str):
                raise ValueError(f"patterns for {cls!r} must be a list of regexes, not a string")
            for pat in pats:
                try:
                    compiled.append((cls, re.compile(pat)))
                except re.error as exc:
                    raise ValueError(f"bad regex {pat!r} for class {cls!r}: {exc}") from exc
        object.__setattr__(self, "_compiled", tuple(compiled))

    def classify(self, name: str, ndim: int = 2) -> str:
        """The class of one parameter given its name and number of dimensions."""
        canon = canonical_name(name)
        for cls, pat in self._compiled:
            if pat.search(canon):
                return cls
        if not self.use_defaults or ndim < 2:
            return "other"
        base = adapted_name(canon)
        for cls, pat in _DEFAULT_RES.items():
            if pat.search(base):
                return cls
        return "other"

    def classify_all(self, names_ndims: Iterable[tuple[str, int]]) -> list[str]:
        return [self.classify(n, d) for n, d in names_ndims]


_DEFAULT = Grouping()


def classify(name: str, ndim: int = 2, grouping: Grouping | None = None) -> str:
    """Class of a parameter under ``grouping`` (the built-in rules by default)."""
    return (grouping or _DEFAULT).classify(name, ndim)
