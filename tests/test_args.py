"""Flags and environment settings: one set of rules, checked when parsed, errors that name what the user wrote."""

from __future__ import annotations

import inspect
import json
import warnings

import pytest
from transformers import HfArgumentParser, TrainingArguments

from hf_weightforces import WeightForcesArguments, WeightForcesCallback
from hf_weightforces.integrations.args import env_for, settings


def _parse(*argv: str) -> WeightForcesArguments:
    (wf,) = HfArgumentParser((WeightForcesArguments,)).parse_args_into_dataclasses(list(argv))
    return wf


@pytest.mark.parametrize("argv, on", [
    ((), False),
    (("--weight_forces",), True),
    (("--weight_forces", "true"), True),
    (("--weight_forces_every", "10"), True),
    (("--weight_forces_per_matrix",), True),
    (("--no_weight_forces_per_layer",), True),
    (("--weight_forces_quiet",), True),
    (("--weight_forces_patterns", '{"value": ["v_proj"]}'), True),
])
def test_any_setting_turns_it_on(argv, on):
    wf = _parse(*argv)
    assert wf.weight_forces is on
    assert len(wf.make_callbacks()) == int(on)


def test_explicit_false_wins_and_says_what_it_ignores():
    with pytest.warns(UserWarning, match="--weight_forces is False: --weight_forces_every ignored"):
        wf = _parse("--weight_forces", "False", "--weight_forces_every", "10")
    assert wf.weight_forces is False and wf.make_callbacks() == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _parse("--weight_forces", "False").make_callbacks() == []


@pytest.mark.parametrize("every, offset", [(1, 10), (3, 12), (10, 10), (20, 20), (7, 14)])
def test_offset_interval_follows_every_unless_set(every, offset):
    wf = _parse("--weight_forces", "--weight_forces_every", str(every))
    assert wf.weight_forces_offset_sample_every == offset
    (cb,) = wf.make_callbacks()
    assert (cb.every, cb.offset_sample_every) == (every, offset)
    assert WeightForcesCallback(every=every).offset_sample_every == offset  # the callback's own default agrees


@pytest.mark.parametrize("backbone, snapshot", [(0, 10), (50, 10), (25, 5), (12, 6), (7, 7)])
def test_snapshot_interval_follows_backbone_unless_set(backbone, snapshot):
    wf = _parse("--weight_forces_backbone_every", str(backbone))
    assert wf.weight_forces_backbone_snapshot_every == snapshot
    if backbone:
        (cb,) = wf.make_callbacks()
        assert cb.probes[0].snapshot_every == snapshot


@pytest.mark.parametrize("argv, message", [
    (("--weight_forces_every", "0"), "--weight_forces_every: must be >= 1, got 0"),
    (("--weight_forces_weibull_every", "-1"), "--weight_forces_weibull_every: must be >= 0, got -1"),
    (("--weight_forces_every", "10", "--weight_forces_offset_sample_every", "15"),
     "--weight_forces_offset_sample_every: 15 is not a multiple of --weight_forces_every (10)"),
    (("--weight_forces_backbone_every", "15", "--weight_forces_backbone_snapshot_every", "10"),
     "--weight_forces_backbone_every: 15 is not a multiple of --weight_forces_backbone_snapshot_every (10)"),
    (("--weight_forces_output_subdir", ""), "--weight_forces_output_subdir: must not be empty"),
    (("--weight_forces_observed_mode", "guess"),
     "--weight_forces_observed_mode: must be one of sampled, exact, got 'guess'"),
    (("--weight_forces_observed_sample_size", "1"), "--weight_forces_observed_sample_size: must be >= 2, got 1"),
    (("--weight_forces_patterns", '{"vale": ["v_proj"]}'), "--weight_forces_patterns: unknown weight class 'vale'"),
    (("--weight_forces_patterns", '{"value": ["v_proj("]}'), "--weight_forces_patterns: bad regex 'v_proj('"),
    (("--weight_forces_patterns", '{"value": "v_proj"}'), "--weight_forces_patterns: patterns for 'value' must be a list"),
    (("--weight_forces_patterns", '{"value": ["v_proj"]'), "--weight_forces_patterns: is not valid JSON"),
    (("--weight_forces_patterns", '["v_proj"]'), "--weight_forces_patterns: no such file"),
    (("--weight_forces_patterns", "groups.json"), "--weight_forces_patterns: no such file: groups.json"),
])
def test_errors_name_the_flag_when_parsed(argv, message):
    """Raised by parse_args_into_dataclasses itself: before a script loads its model."""
    with pytest.raises(ValueError) as info:
        HfArgumentParser((TrainingArguments, WeightForcesArguments)).parse_args_into_dataclasses(
            ["--output_dir", "unused", *argv])
    assert str(info.value).startswith(message), str(info.value)


def test_patterns_from_a_file(tmp_path):
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps({"value": ["query_key_value"]}))
    bad.write_text('{"value": ["query_key_value"]')
    (cb,) = _parse("--weight_forces_patterns", str(good)).make_callbacks()
    assert cb.grouping.classify("gpt_neox.layers.0.attention.query_key_value.weight") == "value"
    with pytest.raises(ValueError, match=f"--weight_forces_patterns: file {bad} is not valid JSON: Expecting"):
        _parse("--weight_forces_patterns", str(bad))


@pytest.mark.parametrize("env, message", [
    ({"HF_WEIGHTFORCES_EVERY": "0"}, "HF_WEIGHTFORCES_EVERY: must be >= 1, got 0"),
    ({"HF_WEIGHTFORCES_EVERY": "ten"}, "HF_WEIGHTFORCES_EVERY: expected an integer, got 'ten'"),
    ({"HF_WEIGHTFORCES_PER_LAYER": "maybe"}, "HF_WEIGHTFORCES_PER_LAYER: expected a boolean"),
    ({"HF_WEIGHTFORCES": "yes please"}, "HF_WEIGHTFORCES: expected a boolean"),
    ({"HF_WEIGHTFORCES_EVRY": "10"}, "HF_WEIGHTFORCES_EVRY: unknown setting; did you mean HF_WEIGHTFORCES_EVERY?"),
    ({"HF_WEIGHTFORCES_EVERY": "10", "HF_WEIGHTFORCES_OFFSET_SAMPLE_EVERY": "15"},
     "HF_WEIGHTFORCES_OFFSET_SAMPLE_EVERY: 15 is not a multiple of HF_WEIGHTFORCES_EVERY (10)"),
    ({"HF_WEIGHTFORCES_PATTERNS": "nowhere.json"}, "HF_WEIGHTFORCES_PATTERNS: no such file: nowhere.json"),
])
def test_environment_errors_name_the_variable(env, message):
    with pytest.raises(ValueError) as info:
        WeightForcesArguments.from_env({"HF_WEIGHTFORCES": "1", "PATH": "/bin", **env})
    assert str(info.value).startswith(message), str(info.value)


def test_environment_round_trip():
    given = {"every": 4, "per_layer": False, "weibull_every": 0, "patterns": '{"value": ["v_proj"]}', "quiet": True,
             "backbone_every": 8}
    env = env_for(given)
    assert env["HF_WEIGHTFORCES"] == "1" and env["HF_WEIGHTFORCES_PER_LAYER"] == "0"
    wf = WeightForcesArguments.from_env({**env, "HOME": "/root"})
    assert wf.weight_forces is True
    for setting, value in given.items():
        assert getattr(wf, f"weight_forces_{setting}") == value
    assert (wf.weight_forces_offset_sample_every, wf.weight_forces_backbone_snapshot_every) == (12, 8)
    assert WeightForcesArguments.from_env({"HF_WEIGHTFORCES": "0", "HF_WEIGHTFORCES_EVERY": "3"}).weight_forces is False


def test_every_callback_argument_has_a_setting():
    """The same names everywhere: each scalar argument of the callback is a flag and a variable."""
    names = {s for s, *_ in settings()}
    params = set(inspect.signature(WeightForcesCallback.__init__).parameters) - {"self", "probes", "dashboard"}
    assert params <= names, f"callback arguments without a --weight_forces_* flag: {sorted(params - names)}"
    kwargs = WeightForcesArguments(weight_forces=True).callback_kwargs()
    assert set(kwargs) <= params
    from hf_weightforces.integrations.args import _choices
    from hf_weightforces.integrations.optimizers import OBSERVED_MODES

    assert set(_choices("observed_mode")) == set(OBSERVED_MODES)
    from hf_weightforces.core.kernels import KERNELS

    assert _choices("kernel") == tuple(KERNELS)
