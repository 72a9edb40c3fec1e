"""Thin integrations: the Trainer callback, its arguments dataclass, and sinks."""

from .args import WeightForcesArguments
from .callback import WeightForcesCallback

__all__ = ["WeightForcesArguments", "WeightForcesCallback"]
