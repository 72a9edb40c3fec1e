"""Classes of weight matrices (SPEC section 3) and layer indices, from parameter names.

The paper's classes:

* ``transmission``: attention output projection and the MLP matrices,
* ``selection``: query/key projections (fused ``query_key_value`` / ``c_attn`` hold V too and are
  reported as selection),
* ``value``: ``v_proj`` where it is stored separately,
* ``embedding``: token/position embeddings and the LM head,
* ``other``: everything else (biases, norms). Its forces still count in ``total``.

Only weight *matrices* (2-D tensors, or GPT-2 ``Conv1D`` weights) get a matrix class; a bias of
``q_proj`` is ``other``. Users can pass their own ``{class: [regex, ...]}`` patterns, tried before
the built-in ones.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

__all__ = [
    "GROUPS",
    "TOTAL",
    "Grouping",
    "canonical_name",
    "classify",
    "layer_index",
]

#: Matrix classes in reporting order; ``total`` is the sum over every parameter.
GROUPS: tuple[str, ...] = ("transmission", "selection", "value", "embedding", "other")
TOTAL = "total"

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
    ),
    "selection": (
        r"(^|\.)(q_proj|k_proj|query|key|query_key_value|c_attn|qkv_proj|Wqkv|wq|wk)\.weight$",
    ),
    "value": (r"(^|\.)(v_proj|value|wv)\.weight$",),
    "transmission": (
        # GPT-NeoX / Pythia
        r"attention\.dense\.weight$",
        r"(^|\.)(dense_h_to_4h|dense_4h_to_h)\.weight$",
        # Llama / Mistral / Qwen
        r"(^|\.)(o_proj|gate_proj|up_proj|down_proj|out_proj|fc1|fc2|wo|w1|w2|w3)\.weight$",
        # GPT-2 (attn.c_proj, mlp.c_fc, mlp.c_proj)
        r"(^|\.)(c_proj|c_fc)\.weight$",
        # BERT (attention.output.dense, intermediate.dense, output.dense)
        r"(^|\.)attention\.output\.dense\.weight$",
        r"(^|\.)intermediate\.dense\.weight$",
        r"(^|\.)output\.dense\.weight$",
    ),
}

_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block|decoder_layers)\.(\d+)\.")


def canonical_name(name: str) -> str:
    """Strip wrapper parts (``module.``, FSDP/checkpoint/compile wrappers) from a parameter name."""
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    while name.startswith("module."):
        name = name[len("module.") :]
    return name


def layer_index(name: str) -> int | None:
    """The transformer layer a parameter belongs to, parsed from its name (``None`` if none)."""
    match = _LAYER_RE.search(canonical_name(name))
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class Grouping:
    """Name → class rules: user patterns first, then the built-in ones.

    ``patterns`` maps a class in :data:`GROUPS` to regular expressions searched in the canonical
    parameter name.  ``min_ndim`` keeps 1-D tensors (biases, norm scales) in ``other`` unless a
    user pattern says otherwise.
    """

    patterns: Mapping[str, Sequence[str]] | None = None
    use_defaults: bool = True

    def __post_init__(self) -> None:
        for cls, pats in (self.patterns or {}).items():
            if cls not in GROUPS:
                raise ValueError(f"unknown weight class {cls!r} in patterns; expected one of {GROUPS}")
            if isinstance(pats, str):
                raise ValueError(f"patterns for {cls!r} must be a list of regexes, not a string")
            for pat in pats:
                try:
                    re.compile(pat)
                except re.error as exc:
                    raise ValueError(f"bad regex {pat!r} for class {cls!r}: {exc}") from exc

    def classify(self, name: str, ndim: int = 2) -> str:
        """The class of one parameter given its name and number of dimensions."""
        canon = canonical_name(name)
        for cls, pats in (self.patterns or {}).items():
            if any(re.search(p, canon) for p in pats):
                return cls
        if not self.use_defaults or ndim < 2:
            return "other"
        for cls, pats in DEFAULT_PATTERNS.items():
            if any(re.search(p, canon) for p in pats):
                return cls
        return "other"

    def classify_all(self, names_ndims: Iterable[tuple[str, int]]) -> list[str]:
        return [self.classify(n, d) for n, d in names_ndims]


_DEFAULT = Grouping()


def classify(name: str, ndim: int = 2, grouping: Grouping | None = None) -> str:
    """Class of a parameter under ``grouping`` (the built-in rules by default)."""
    return (grouping or _DEFAULT).classify(name, ndim)
