"""hf-weightforces: what AdamW does to your weights, live, inside the Hugging Face Trainer."""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"

__all__ = [
    "BackboneProbe",
    "ForceBudget",
    "RankProbe",
    "Grouping",
    "WeightForcesArguments",
    "WeightForcesCallback",
    "adamw_direction",
    "force_budget",
]

if TYPE_CHECKING:
    from .core import ForceBudget, Grouping, adamw_direction, force_budget
    from .integrations import WeightForcesArguments, WeightForcesCallback
    from .integrations.probes import BackboneProbe, RankProbe


def __getattr__(name: str):
    # Nothing here imports torch until it is asked for: `hf-weightforces --help` and the startup hook stay fast.
    if name in ("ForceBudget", "Grouping", "adamw_direction", "force_budget"):
        from . import core

        return getattr(core, name)
    # The integrations import transformers; load them only when asked, so the core stays light.
    if name in ("WeightForcesCallback", "WeightForcesArguments"):
        from . import integrations

        return getattr(integrations, name)
    if name in ("BackboneProbe", "RankProbe"):
        from .integrations import probes

        return getattr(probes, name)
    raise AttributeError(f"module 'hf_weightforces' has no attribute {name!r}")
