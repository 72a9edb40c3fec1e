"""Reading AdamW's own moments and hyper-parameters (docs/budget.md), pure torch.

Supported: ``torch.optim.AdamW`` in every implementation (for-loop, ``foreach``, ``fused``,
``capturable``, ``amsgrad``, ``maximize``) and ``torch.optim.Adam`` when its weight decay is
decoupled or zero, which covers the Trainer's ``adamw_torch`` and ``adamw_torch_fused``.
Wrappers that keep the torch optimizer in ``.optimizer`` (Accelerate's ``AcceleratedOptimizer``)
are unwrapped.  :func:`check_supported` refuses anything else with :class:`UnsupportedOptimizerError`.

Every other optimizer gets a plan (:func:`plan_optimizer`, docs/optimizers.md): bitsandbytes
Adam/AdamW and Lion are read before the step, everything else from its observed update, with the
decay factor of :func:`observed_factor` under the rule its class is known to follow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "DECAY_RULES",
    "PATHS",
    "SUPPORTED_OPTIMIZERS",
    "OptimizerPlan",
    "adafactor_lr",
    "declared_decay_rule",
    "observed_factor",
    "plan_optimizer",
    "register_decay_rule",
    "AdamHyper",
    "UnsupportedOptimizerError",
    "check_supported",
    "group_hyper",
    "unwrap_optimizer",
]

SUPPORTED_OPTIMIZERS = (
    "torch.optim.AdamW (for-loop, foreach or fused; Trainer optim='adamw_torch' or "
    "'adamw_torch_fused'), or torch.optim.Adam with decoupled_weight_decay=True or weight_decay=0"
)


class UnsupportedOptimizerError(ValueError):
    """The optimizer's moments cannot be read as AdamW's."""


@dataclass(frozen=True)
class AdamHyper:
    """One parameter group's hyper-parameters at the step just taken."""

    lr: float
    weight_decay: float
    beta1: float
    beta2: float
    eps: float
    amsgrad: bool


def unwrap_optimizer(optimizer: object) -> torch.optim.Optimizer:
    """The torch optimizer inside Accelerate/DeepSpeed-style wrappers."""
    # AcceleratedOptimizer is itself a torch Optimizer subclass holding the real one in .optimizer
    for _ in range(4):
        inner = getattr(optimizer, "optimizer", None)
        if inner is None or inner is optimizer:
            break
        optimizer = inner
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise UnsupportedOptimizerError(
            f"weight forces need the optimizer's AdamW moments, got {type(optimizer).__name__}; "
            f"supported: {SUPPORTED_OPTIMIZERS}"
        )
    return optimizer


def check_supported(optimizer: object) -> torch.optim.Optimizer:
    """Unwrap and validate; raise :class:`UnsupportedOptimizerError` with what is supported."""
    opt = unwrap_optimizer(optimizer)
    name = f"{type(opt).__module__}.{type(opt).__name__}"
    if not isinstance(opt, torch.optim.Adam):
        raise UnsupportedOptimizerError(
            f"weight forces cannot read the moments of {name}; supported: {SUPPORTED_OPTIMIZERS}"
        )
    for i, group in enumerate(opt.param_groups):
        decoupled = bool(group.get("decoupled_weight_decay", isinstance(opt, torch.optim.AdamW)))
        if not decoupled and float(group.get("weight_decay", 0.0)) != 0.0:
            raise UnsupportedOptimizerError(
                f"{name} param group {i} uses L2 (coupled) weight decay {group['weight_decay']}, "
                "which hides the decay inside the moments; use torch.optim.AdamW or "
                f"decoupled_weight_decay=True. Supported: {SUPPORTED_OPTIMIZERS}"
            )
        if group.get("differentiable", False):
            raise UnsupportedOptimizerError(f"{name} param group {i}: differentiable=True is not supported")
    return opt


def _scalar(x: object) -> float:
    return float(x.item()) if isinstance(x, torch.Tensor) else float(x)  # type: ignore[arg-type]


def group_hyper(group: dict) -> AdamHyper:
    """Hyper-parameters of one param group as plain floats (lr may be a tensor)."""
    beta1, beta2 = group["betas"]
    return AdamHyper(
        lr=_scalar(group["lr"]),
        weight_decay=_scalar(group.get("weight_decay", 0.0)),
        beta1=_scalar(beta1),
        beta2=_scalar(beta2),
        eps=_scalar(group["eps"]),
        amsgrad=bool(group.get("amsgrad", False)),
    )


# ---------------------------------------------------------------------------------- every optimizer
#: How each optimizer's budget is computed (docs/optimizers.md):
#: ``moments``  torch Adam/AdamW (and subclasses, and duck-typed ones with ``exp_avg``/``exp_avg_sq``):
#:              rebuilt after the step from the stored moments, nothing copied;
#: ``bnb_adam`` bitsandbytes Adam/AdamW, 8-bit, 32-bit or paged: staged before the step from the
#:              moments the kernel will read (8-bit: the library's own blockwise dequantisation);
#: ``lion``     bitsandbytes Lion: staged before the step, u = sign(β1 m + (1-β1) g);
#: ``observed`` anything else: the observed update η u := c w_t - w_{t+1} (exact or sampled).
PATHS = ("moments", "bnb_adam", "lion", "observed")

#: How weight decay reaches the stored weights, i.e. the factor c the budget's decay D uses:
#: ``mul``      w ← fl32(1 - ηλ) · w (torch AdamW, bitsandbytes, Lomo, GrokAdamW, StableAdamW);
#: ``add``      w ← w + fl32(-ηλ) · w, so c = 1 - fl32(ηλ) (transformers Adafactor, GaLore, APOLLO, torchao);
#: ``coupled``  λ w is added to the gradient (SGD, RMSprop, Adagrad, Adam with L2): c = 1, the
#:              decay's effect is inside align/inject;
#: ``inside``   the decay acts inside a non-multiplicative update (schedule-free): c = 1;
#: ``unknown``  an optimizer this package does not know: c = 1.
DECAY_RULES = ("mul", "add", "coupled", "inside", "unknown")

#: Known optimizers read from their observed update: (module prefix, class name or "*", decay rule).
_OBSERVED_TABLE: tuple[tuple[str, str, str], ...] = (
    ("transformers.optimization", "Adafactor", "add"),
    ("galore_torch", "Adafactor", "add"),
    ("galore_torch", "*", "add"),
    ("apollo_torch", "*", "add"),
    ("torchao", "*", "add"),
    ("grokadamw", "*", "mul"),
    ("optimi", "*", "mul"),
    ("lomo_optim", "*", "mul"),
    ("schedulefree", "*", "inside"),
    ("torch.optim", "SGD", "coupled"),
    ("torch.optim", "RMSprop", "coupled"),
    ("torch.optim", "Adagrad", "coupled"),
    ("torch.optim", "Adamax", "coupled"),
    ("torch.optim", "ASGD", "coupled"),
    ("torch.optim", "Rprop", "coupled"),
    ("torch.optim", "SparseAdam", "coupled"),
    ("torch.optim", "LBFGS", "coupled"),
    ("torch.optim", "Adadelta", "coupled"),
)


#: Decay rules declared with :func:`register_decay_rule`: class (or "module.Class") -> rule.
_DECLARED: dict[type | str, str] = {}

#: The class attribute an optimizer of one's own may set instead of registering.
DECAY_RULE_ATTRIBUTE = "weightforces_decay_rule"


def register_decay_rule(optimizer: type | str, rule: str) -> None:
    """Declare how an optimizer of one's own applies weight decay, so that its observed budget
    (docs/optimizers.md) uses the right decay factor c instead of ``unknown`` (c = 1, the decay
    then counted inside align and inject).

    ``optimizer``: the class (subclasses inherit the rule) or its ``"module.Class"`` name;
    ``rule``: one of :data:`DECAY_RULES` (``mul``: w ← fl32(1 - ηλ)·w before the update; ``add``:
    w ← w + fl32(-ηλ)·w; ``coupled``: λw added to the gradient; ``inside``; ``unknown``).  λ and η
    are read from each parameter group's ``weight_decay`` and ``lr``.  The same can be said on
    the class itself with the attribute ``weightforces_decay_rule = "mul"``.  Call it before
    training starts (the plan is made once, at train start).  A declared optimizer is read from
    its observed update even if it looks like AdamW (``exp_avg``/``exp_avg_sq``); torch Adam and
    AdamW and their subclasses keep being read from their moments, bitsandbytes' from its own.
    """
    if rule not in DECAY_RULES:
        raise ValueError(f"decay rule must be one of {DECAY_RULES}, got {rule!r}")
    if not isinstance(optimizer, (type, str)):
        raise TypeError(f"register_decay_rule takes an optimizer class or its 'module.Class' name, "
                        f"got {type(optimizer).__name__}")
    _DECLARED[optimizer] = rule


def declared_decay_rule(opt: object) -> str | None:
    """The rule declared for ``opt``'s class (registered, on a base class, or its class
    attribute), or None."""
    for cls in type(opt).__mro__:
        for key in (cls, f"{cls.__module__}.{cls.__name__}"):
            if key in _DECLARED:
                return _DECLARED[key]
    rule = getattr(type(opt), DECAY_RULE_ATTRIBUTE, None)
    if rule is None:
        return None
    if rule not in DECAY_RULES:
        raise ValueError(f"{_qualname(opt)}.{DECAY_RULE_ATTRIBUTE} = {rule!r} is not one of {DECAY_RULES}")
    return rule


@dataclass(frozen=True)
class OptimizerPlan:
    """What the monitor does for one optimizer: ``path`` (:data:`PATHS`), ``decay`` (the rule
    of :data:`DECAY_RULES` for the observed path), ``name`` (module.Class) and a ``note``."""

    name: str
    path: str
    decay: str
    note: str


def _qualname(opt: object) -> str:
    return f"{type(opt).__module__}.{type(opt).__name__}"


def _bnb_name(opt: object) -> str | None:
    """bitsandbytes' own optimizer name ('adam', 'lion', 'momentum', ...) or None."""
    if not type(opt).__module__.startswith("bitsandbytes"):
        return None
    return str(getattr(opt, "optimizer_name", "") or type(opt).__name__.lower())


def _adam_like_groups(opt: torch.optim.Optimizer) -> bool:
    for g in opt.param_groups:
        betas = g.get("betas")
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and "eps" in g and "lr" in g):
            return False
    return True


def plan_optimizer(optimizer: object) -> OptimizerPlan:
    """Decide, at train start, how the budget of ``optimizer`` (wrappers unwrapped) is computed.

    Raises :class:`UnsupportedOptimizerError` only for an object that is no torch optimizer.
    """
    opt = unwrap_optimizer(optimizer)
    name = _qualname(opt)
    bnb = _bnb_name(opt)
    if bnb is not None:
        unorm = float(getattr(getattr(opt, "args", None), "max_unorm", 0.0) or 0.0)
        if bnb == "adam" and unorm == 0.0:
            return OptimizerPlan(name, "bnb_adam", "mul", "bitsandbytes Adam/AdamW: the moments the kernel reads, "
                                 "dequantised by bitsandbytes before the step")
        if bnb == "lion":
            return OptimizerPlan(name, "lion", "mul", "bitsandbytes Lion: u = sign(b1 m + (1-b1) g) before the step")
        rule = "mul" if bnb in ("adam", "lamb", "ademamix") else "coupled"
        return OptimizerPlan(name, "observed", rule, f"bitsandbytes {bnb}: the observed update")
    if isinstance(opt, torch.optim.Adam):  # AdamW is a subclass of Adam; so are user subclasses
        try:
            check_supported(opt)
            return OptimizerPlan(name, "moments", "mul", "AdamW moments read after the step")
        except UnsupportedOptimizerError:
            return OptimizerPlan(name, "observed", "coupled", "Adam with L2 (coupled) weight decay: the observed update")
    declared = declared_decay_rule(opt)
    if declared is not None:
        return OptimizerPlan(name, "observed", declared, f"{type(opt).__name__}: the observed update, decay rule "
                             f"{declared!r} as declared (register_decay_rule)")
    for module, cls, rule in _OBSERVED_TABLE:
        if type(opt).__module__.startswith(module) and cls in ("*", type(opt).__name__):
            return OptimizerPlan(name, "observed", rule, f"{type(opt).__name__}: the observed update")
    if isinstance(opt, (torch.optim.NAdam, torch.optim.RAdam)):
        decoupled = all(g.get("decoupled_weight_decay", False) for g in opt.param_groups)
        return OptimizerPlan(name, "observed", "mul" if decoupled else "coupled", f"{type(opt).__name__}: the observed update")
    if _adam_like_groups(opt) and not any(g.get("amsgrad") for g in opt.param_groups):
        return OptimizerPlan(name, "moments", "mul", "read as torch AdamW from exp_avg/exp_avg_sq (duck-typed): "
                             "a different update rule shows in the closure")
    return OptimizerPlan(name, "observed", "unknown", f"{type(opt).__name__} is not known here: the observed update, "
                         "weight decay (if any) counted inside align/inject")


def adafactor_lr(group: dict, step: float, rms: float) -> float:
    """The lr transformers' (and GaLore's) Adafactor uses for one tensor at ``step`` (1-based),
    as its ``_get_lr``: relative step and parameter scaling when switched on."""
    lr = _scalar(group["lr"])
    if group.get("relative_step"):
        min_step = 1e-6 * step if group.get("warmup_init") else 1e-2
        lr = min(min_step, 1.0 / math.sqrt(step))
    if group.get("scale_parameter"):
        lr *= max(float(group["eps"][1]), rms)
    return lr


def observed_factor(decay: str, lr: float, weight_decay: float, dtype: torch.dtype) -> float:
    """The factor c the optimizer multiplies w_t by, under rule ``decay`` (:data:`DECAY_RULES`).

    ``mul``: fl32(1 - lr·λ) (float64 parameters: exact), as :func:`~.budget.decay_factor`;
    ``add``: 1 - fl32(lr·λ) (the product is rounded, then added); else 1.
    """
    if decay == "mul" and weight_decay > 0.0:
        c = 1.0 - lr * weight_decay
        return c if dtype == torch.float64 else float(np.float32(c))
    if decay == "add" and weight_decay > 0.0:
        d = lr * weight_decay
        return 1.0 - (d if dtype == torch.float64 else float(np.float32(d)))
    return 1.0
