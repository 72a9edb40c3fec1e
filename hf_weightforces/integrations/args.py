"""Training-arguments dataclass for ``HfArgumentParser``, and the same settings from the environment.

    parser = HfArgumentParser((TrainingArguments, WeightForcesArguments))
    training_args, wf_args = parser.parse_args_into_dataclasses()
    trainer = Trainer(..., args=training_args, callbacks=wf_args.make_callbacks())

    python train.py --output_dir out --weight_forces --weight_forces_every 10

Every setting has three spellings: the callback argument ``every``, the flag
``--weight_forces_every`` and the environment variable ``HF_WEIGHTFORCES_EVERY`` (read by the
zero-code switch, see ``docs/zero-code.md``).  One set of rules checks them all, when they are
parsed (before the model loads), and an error names the spelling the user wrote.

Setting any ``--weight_forces_*`` flag to a value other than its default turns the monitor on
(``--weight_forces False`` keeps it off, with a warning that the other flags are ignored).
Defaults that depend on another setting follow it unless set: ``offset_sample_every`` is the
smallest multiple of ``every`` that is at least 10, ``backbone_snapshot_every`` the largest
divisor of ``backbone_every`` that is at most 10.

This module imports no torch or transformers at import time (the launcher checks settings with it).
"""

from __future__ import annotations

import difflib
import json
import logging
import typing
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

from .guard import output_subdir_problem  # re-exported: the flag, the variable and the callback check alike

__all__ = ["ENV_PREFIX", "ENV_SWITCH", "WeightForcesArgumentError", "WeightForcesArguments", "env_for", "env_name",
           "flag_name", "output_subdir_problem", "parse_bool", "settings"]

logger = logging.getLogger(__name__)

FIELD_PREFIX = "weight_forces"
ENV_SWITCH = "HF_WEIGHTFORCES"
ENV_PREFIX = ENV_SWITCH + "_"
_TRUE = ("1", "true", "yes", "y", "t", "on")
_FALSE = ("0", "false", "no", "n", "f", "off")


def flag_name(setting: str) -> str:
    """``"every"`` -> ``"--weight_forces_every"``; ``""`` (the switch) -> ``"--weight_forces"``."""
    return f"--{FIELD_PREFIX}_{setting}" if setting else f"--{FIELD_PREFIX}"


def env_name(setting: str) -> str:
    """``"every"`` -> ``"HF_WEIGHTFORCES_EVERY"``; ``""`` (the switch) -> ``"HF_WEIGHTFORCES"``."""
    return f"{ENV_PREFIX}{setting.upper()}" if setting else ENV_SWITCH


def parse_bool(text: str) -> bool:
    """The strings ``transformers.HfArgumentParser`` accepts for a boolean flag (and on/off)."""
    low = text.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ValueError(f"expected a boolean (1/0, true/false, yes/no, on/off), got {text!r}")


class WeightForcesArgumentError(ValueError):
    """A bad setting.  The message names settings through ``spell`` (flags by default), so the
    same check reads ``--weight_forces_every`` on the command line and ``HF_WEIGHTFORCES_EVERY``
    in the environment."""

    def __init__(self, setting: str, describe: Callable[[Callable[[str], str]], str],
                 spell: Callable[[str], str] = flag_name) -> None:
        self.setting = setting
        self.describe = describe
        super().__init__(f"{spell(setting)}: {describe(spell)}")

    def respelled(self, spell: Callable[[str], str]) -> WeightForcesArgumentError:
        return WeightForcesArgumentError(self.setting, self.describe, spell)


class _Auto:
    """The switch's default: on exactly when another setting is given.  Not ``None``, so that
    ``HfArgumentParser`` keeps the bare ``--weight_forces`` form (it allows a missing value only
    for a boolean with a non-None default)."""

    def __repr__(self) -> str:
        return "auto"

    def __bool__(self) -> bool:
        return False


AUTO = _Auto()


def _fail(setting: str, message: str) -> WeightForcesArgumentError:
    return WeightForcesArgumentError(setting, lambda spell: message)


@dataclass
class WeightForcesArguments:
    weight_forces: bool | None = field(
        default=AUTO,
        metadata={"help": "Log the AdamW force budget (alignment, injection, decay) of the weights.  Any other "
                  "--weight_forces_* flag set to a non-default value turns it on too; False keeps it off."},
    )
    weight_forces_every: int = field(
        default=1, metadata={"help": "Compute the budget every N optimizer steps (1 = every step)."}
    )
    weight_forces_per_layer: bool = field(default=True, metadata={"help": "Also log one row per layer."})
    weight_forces_per_matrix: bool = field(default=False, metadata={"help": "Also log one row per parameter."})
    weight_forces_patterns: str | None = field(
        default=None,
        metadata={"help": 'Own grouping rules: JSON {"class": ["regex", ...]} or a path to such a JSON file.'},
    )
    weight_forces_to_all_integrations: bool = field(
        default=False,
        metadata={"help": "Put the keys into the Trainer's logs so every report_to integration gets them."},
    )
    weight_forces_output_subdir: str = field(
        default="weightforces", metadata={"help": "Folder under --output_dir for metrics.jsonl."}
    )
    weight_forces_weibull_every: int = field(
        default=100, metadata={"help": "Fit Weibull (k, lambda) per class every N steps (0 = off)."}
    )
    weight_forces_weibull_per_matrix: bool = field(
        default=False, metadata={"help": "Also fit every weight matrix at those events."}
    )
    weight_forces_offset_sample_every: int | None = field(
        default=None,
        metadata={"help": "Sparse-recording variant of the RMS prediction: forces every N steps (a multiple of "
                  "--weight_forces_every; default the smallest such multiple >= 10)."},
    )
    weight_forces_offset_rule: str = field(
        default="right",
        metadata={"help": "The step that stands for each block of that integral: 'right' (its last step, the default) "
                  "or 'left' (its first budget step: the research script's rule)."},
    )
    weight_forces_super_weights: int = field(
        default=0, metadata={"help": "Also report shares and fits without the N largest |w| (0 = off)."}
    )
    weight_forces_rounding_split: bool = field(
        default=False,
        metadata={"help": "Also split float32 parameters' budgets into the intended update and its rounding "
                  "(a second pass over the weights and moments per budget step)."},
    )
    weight_forces_kernel: str = field(
        default="auto",
        metadata={"help": "How the per-step sums run: 'auto' (the default) and 'exact' run the eager pass; "
                  "'compiled' (opt-in) fuses it with torch.compile in process (the second budget step waits for "
                  "the compilation)."},
    )
    weight_forces_observed_mode: str = field(
        default="sampled",
        metadata={"help": "Optimizers whose moments cannot be read: A and I of the observed update from a seeded "
                  "sketch of each tensor with standard errors ('sampled') or from a copy of the trained parameters "
                  "('exact')."},
    )
    weight_forces_observed_sample_size: int = field(
        default=1024, metadata={"help": "'sampled' mode: signed bucket sums kept per tensor (the smallest prime at "
                                "least this; tensors no larger are copied whole)."}
    )
    weight_forces_observed_seed: int = field(default=0, metadata={"help": "Seed of that sketch's signs."})
    weight_forces_quiet: bool = field(
        default=False, metadata={"help": "No console summary lines and no end-of-training table."}
    )
    weight_forces_backbone_every: int = field(
        default=0,
        metadata={"help": "Estimate the AdamW backbone (top direction of the displacements from the start, with "
                  "its random-walk null) every N optimizer steps; 0 = off."},
    )
    weight_forces_backbone_snapshot_every: int | None = field(
        default=None,
        metadata={"help": "Store a displacement snapshot every N steps (doubled when the stack is full); must "
                  "divide --weight_forces_backbone_every (default its largest divisor <= 10)."},
    )
    weight_forces_backbone_coords: int = field(
        default=1 << 16, metadata={"help": "Sampled coordinates per weight class for the backbone."}
    )
    weight_forces_rank_every: int = field(
        default=0,
        metadata={"help": "Stable/effective ranks of every layer's matrices and key-query products every N "
                  "optimizer steps; 0 = off."},
    )
    weight_forces_rank_per_head: bool = field(
        default=True, metadata={"help": "Also log each head's key-query spectrum."}
    )

    def __post_init__(self) -> None:
        explicit = [s for s, default in _DEFAULTS.items() if s and getattr(self, _field(s)) != default]
        self._check_types()
        for setting, low in _LOWER_BOUNDS.items():
            value = getattr(self, _field(setting))
            if value is not None and value < low:
                raise _fail(setting, f"must be >= {low}, got {value}")
        for setting, high in _UPPER_BOUNDS.items():
            value = getattr(self, _field(setting))
            if value is not None and value > high:
                raise _fail(setting, f"must be <= {high}, got {value}")
        self._resolve_dependent_defaults()
        problem = output_subdir_problem(self.weight_forces_output_subdir)
        if problem:
            raise _fail("output_subdir", problem)
        for setting in _CHOICE_SETTINGS:
            value = getattr(self, _field(setting))
            if value != _DEFAULTS[setting] and value not in (choices := _choices(setting)):
                raise _fail(setting, f"must be one of {', '.join(choices)}, got {value!r}")
        self._patterns = _load_patterns(self.weight_forces_patterns)
        if self.weight_forces is AUTO or self.weight_forces is None:
            self.weight_forces = bool(explicit)
            if explicit:
                logger.info("weight forces: on, because %s set", ", ".join(flag_name(s) for s in explicit))
        elif not self.weight_forces and explicit:
            warnings.warn(f"{flag_name('')} is False: {', '.join(flag_name(s) for s in explicit)} ignored",
                          UserWarning, stacklevel=3)
        self.weight_forces = bool(self.weight_forces)

    def _check_types(self) -> None:
        for setting, kind in _KINDS.items():
            value = getattr(self, _field(setting))
            if value is AUTO or value is None and _DEFAULTS[setting] in (None, AUTO):
                continue
            if kind is int and (not isinstance(value, int) or isinstance(value, bool)):
                raise _fail(setting, f"must be an integer, got {value!r}")
            if kind is bool and not isinstance(value, bool):
                raise _fail(setting, f"must be a boolean, got {value!r}")
            if kind is str and not isinstance(value, str):
                raise _fail(setting, f"must be a string, got {value!r}")

    def _resolve_dependent_defaults(self) -> None:
        every = self.weight_forces_every
        if self.weight_forces_offset_sample_every is None:
            self.weight_forces_offset_sample_every = every * -(-10 // every)
        elif self.weight_forces_offset_sample_every % every:
            offset = self.weight_forces_offset_sample_every
            raise WeightForcesArgumentError(
                "offset_sample_every", lambda n: f"{offset} is not a multiple of {n('every')} ({every})")
        backbone = self.weight_forces_backbone_every
        if self.weight_forces_backbone_snapshot_every is None:
            self.weight_forces_backbone_snapshot_every = max(d for d in range(1, 11) if not backbone % d)
        elif backbone % self.weight_forces_backbone_snapshot_every:
            snap = self.weight_forces_backbone_snapshot_every
            raise WeightForcesArgumentError(
                "backbone_every", lambda n: f"{backbone} is not a multiple of {n('backbone_snapshot_every')} ({snap})")

    # ------------------------------------------------------------------ the environment
    @classmethod
    def from_env(cls, environ: Mapping[str, str], spell: Callable[[str], str] = env_name) -> WeightForcesArguments:
        """The settings in ``HF_WEIGHTFORCES`` and ``HF_WEIGHTFORCES_<SETTING>`` (the callback's
        argument names, upper-cased); errors name the variable (or what ``spell`` calls it)."""
        values: dict[str, object] = {}
        names = {env_name(s): s for s in _DEFAULTS}
        for var, text in environ.items():
            if var != ENV_SWITCH and not var.startswith(ENV_PREFIX):
                continue
            if var not in names:
                close = difflib.get_close_matches(var, list(names), n=1)
                hint = f"; did you mean {close[0]}?" if close else f"; known: {', '.join(sorted(names))}"
                raise ValueError(f"{var}: unknown setting{hint}")
            setting = names[var]
            if not setting and not text.strip():
                continue  # HF_WEIGHTFORCES= (empty): as if unset
            try:
                values[_field(setting)] = _convert(text, _KINDS[setting], _DEFAULTS[setting] is None)
            except ValueError as exc:
                raise ValueError(f"{spell(setting)}: {exc}") from None
        try:
            return cls(**values)
        except WeightForcesArgumentError as exc:
            raise exc.respelled(spell) from None

    # ------------------------------------------------------------------ what they make
    def callback_kwargs(self) -> dict:
        """The :class:`WeightForcesCallback` arguments these settings give (probes separately)."""
        return {s: (self._patterns if s == "patterns" else getattr(self, _field(s))) for s in _CALLBACK_SETTINGS}

    def make_callbacks(self) -> list:
        """``[WeightForcesCallback(...)]`` when the monitor is on, else ``[]``."""
        if not self.weight_forces:
            return []
        from .callback import WeightForcesCallback

        return [WeightForcesCallback(**self.callback_kwargs(), probes=self.make_probes())]

    def make_probes(self) -> list:
        """The trajectory-geometry probes the flags ask for (``--weight_forces_backbone_every``,
        ``--weight_forces_rank_every``)."""
        from .probes import BackboneProbe, RankProbe

        probes: list = []
        if self.weight_forces_backbone_every:
            probes.append(BackboneProbe(every=self.weight_forces_backbone_every,
                                        snapshot_every=self.weight_forces_backbone_snapshot_every,
                                        coords=self.weight_forces_backbone_coords))
        if self.weight_forces_rank_every:
            probes.append(RankProbe(every=self.weight_forces_rank_every, per_head=self.weight_forces_rank_per_head))
        return probes


def _field(setting: str) -> str:
    return f"{FIELD_PREFIX}_{setting}" if setting else FIELD_PREFIX


def _setting(field_name: str) -> str:
    return field_name[len(FIELD_PREFIX) + 1:]


def _kind(hint) -> type:
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    return args[0]


_HINTS = typing.get_type_hints(WeightForcesArguments)
#: setting -> default (``""`` is the switch itself).
_DEFAULTS: dict[str, object] = {_setting(f.name): f.default for f in fields(WeightForcesArguments)}
_KINDS: dict[str, type] = {_setting(f.name): _kind(_HINTS[f.name]) for f in fields(WeightForcesArguments)}
_HELP: dict[str, str] = {_setting(f.name): f.metadata.get("help", "") for f in fields(WeightForcesArguments)}
_LOWER_BOUNDS = {"every": 1, "weibull_every": 0, "offset_sample_every": 1, "super_weights": 0, "backbone_every": 0,
                 "backbone_snapshot_every": 1, "backbone_coords": 1, "rank_every": 0,
                 "observed_sample_size": 2, "observed_seed": 0}
#: Upper bounds: the observed sample's seed becomes ``seed * 1000003 + rank`` in a 64-bit generator
#: seed (integrations/optimizers.py); 2**32 - 1 keeps that in range for any rank count.
_UPPER_BOUNDS = {"observed_seed": (1 << 32) - 1}
_CHOICE_SETTINGS = ("observed_mode", "kernel", "offset_rule")


def _choices(setting: str) -> tuple[str, ...]:
    """The accepted values of a choice setting.  The kernels are ``core.kernels.KERNELS`` itself,
    so the flag, the variable and the callback accept the same list; that import brings torch,
    so ``__post_init__`` asks only for a value other than the default (the launcher stays light)."""
    if setting == "kernel":
        from ..core.kernels import KERNELS

        return tuple(KERNELS)
    if setting == "offset_rule":
        return _OFFSET_RULES
    return _OBSERVED_MODES


_OFFSET_RULES = ("right", "left")  # core/monitor.py OFFSET_RULES (that module imports torch)
_OBSERVED_MODES = ("sampled", "exact")  # integrations/optimizers.py OBSERVED_MODES (tested equal; that module imports torch)
_CALLBACK_SETTINGS = ("every", "per_layer", "per_matrix", "patterns", "to_all_integrations", "output_subdir",
                      "weibull_every", "weibull_per_matrix", "offset_sample_every", "offset_rule", "super_weights",
                      "rounding_split",
                      "kernel", "quiet", "observed_mode", "observed_sample_size", "observed_seed")

def settings() -> list[tuple[str, type, object, str]]:
    """``(setting, kind, default, help)`` for every setting but the switch, in declaration order."""
    return [(s, _KINDS[s], _DEFAULTS[s], _HELP[s]) for s in _DEFAULTS if s]


def env_for(values: Mapping[str, object]) -> dict[str, str]:
    """``HF_WEIGHTFORCES=1`` and one ``HF_WEIGHTFORCES_<SETTING>`` per given setting (``None``: left out)."""
    env = {ENV_SWITCH: "1"}
    for setting, value in values.items():
        if value is not None:
            env[env_name(setting)] = str(int(value)) if isinstance(value, bool) else str(value)
    return env


def _convert(text: str, kind: type, optional: bool):
    if optional and not text.strip():
        return None
    if kind is bool:
        return parse_bool(text)
    if kind is int:
        try:
            return int(text.strip())
        except ValueError:
            raise ValueError(f"expected an integer, got {text!r}") from None
    return text


def _load_patterns(spec: str | None) -> dict | None:
    """``{class: [regex, ...]}`` from JSON text or a JSON file, checked like the callback checks it
    (known classes, valid regexes)."""
    if not spec:
        return None
    if spec.lstrip().startswith("{"):
        source = "is not valid JSON"
        text = spec
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise _fail("patterns", f"no such file: {spec} (give JSON text starting with '{{' or a JSON file)")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise _fail("patterns", f"cannot read {spec}: {exc}") from None
        source = f"file {spec} is not valid JSON"
    try:
        patterns = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _fail("patterns", f"{source}: {exc}") from None
    if not isinstance(patterns, dict):
        raise _fail("patterns", 'must be a JSON object {"class": ["regex", ...]}')
    for cls, regexes in patterns.items():  # Grouping would raise a TypeError naming nothing on [1] or null
        if not isinstance(regexes, str) and not (isinstance(regexes, list) and all(isinstance(r, str) for r in regexes)):
            raise _fail("patterns", f"patterns for {cls!r} must be a list of regex strings, got {regexes!r}")
    from ..core.groups import Grouping

    try:
        Grouping(patterns)
    except ValueError as exc:
        raise _fail("patterns", str(exc)) from None
    return patterns
