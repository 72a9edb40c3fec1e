"""Pure-torch core: force budgets, groups, monitors, Weibull fits.  Never imports transformers,
accelerate, wandb or matplotlib."""

from .budget import BUDGET_TERMS, ForceBudget, adamw_direction, budget_from_dots, force_budget, step_dots
from .groups import GROUPS, TOTAL, Grouping, classify, layer_index
from .monitor import ForceMonitor, ParamInfo

__all__ = [
    "BUDGET_TERMS",
    "GROUPS",
    "TOTAL",
    "ForceBudget",
    "ForceMonitor",
    "Grouping",
    "ParamInfo",
    "adamw_direction",
    "budget_from_dots",
    "classify",
    "force_budget",
    "layer_index",
    "step_dots",
]
