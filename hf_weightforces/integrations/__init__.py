"""Thin integrations: the Trainer callback, its arguments dataclass, and sinks."""

from __future__ import annotations

from typing import TYPE_CHECKING

__all__ = ["WeightForcesArguments", "WeightForcesCallback"]

if TYPE_CHECKING:
    from .args import WeightForcesArguments
    from .callback import WeightForcesCallback


def __getattr__(name: str):
    # The callback imports torch and transformers: load it only when asked, so that the settings
    # (args.py) can be checked by the launcher and the start-up hook without them.
    if name == "WeightForcesArguments":
        from .args import WeightForcesArguments

        return WeightForcesArguments
    if name == "WeightForcesCallback":
        from .callback import WeightForcesCallback

        return WeightForcesCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
