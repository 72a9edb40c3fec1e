"""A malformed ``HF_WEIGHTFORCES*`` setting never stops a script: one stderr line naming the variable, the
monitor off, the script runs on; ``output_subdir`` stays inside the output folder in every spelling.

The subprocess test goes through the real start-up hook (``hf_weightforces.pth`` at interpreter start, then
the one-shot finder around ``transformers.trainer``) once per variable: after the first import it puts the
module back into the finder's path (``del sys.modules[...]``, ``process_startup()`` again) so one interpreter,
which pays for the transformers import once, checks every case.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from hf_weightforces import WeightForcesArguments, WeightForcesCallback
from hf_weightforces.integrations import autostart
from hf_weightforces.integrations.args import env_name, output_subdir_problem, settings

_BAD_TEXT = {  # a malformed value for each kind of setting; choices and paths get their own
    int: "ten", bool: "maybe", "kernel": "fast", "observed_mode": "guess", "patterns": '{"value": [1]}',
    "output_subdir": "../escape_subdir", "offset_rule": "middle",
}


def _bad_cases() -> list[tuple[str, str]]:
    """One malformed value for every variable the switch reads, then the ones the issue names."""
    cases = []
    for setting, kind, _default, _help in settings():
        cases.append((env_name(setting), _BAD_TEXT.get(setting, _BAD_TEXT.get(kind))))
    cases += [("HF_WEIGHTFORCES_EVERY", "0"), ("HF_WEIGHTFORCES_EVERY", "1.5"), ("HF_WEIGHTFORCES_WEIBULL_EVERY", "-1"),
              ("HF_WEIGHTFORCES_PATTERNS", "{"), ("HF_WEIGHTFORCES_PATTERNS", '{"value": null}'),
              ("HF_WEIGHTFORCES_PATTERNS", "nowhere.json"), ("HF_WEIGHTFORCES_OUTPUT_SUBDIR", ""),
              ("HF_WEIGHTFORCES_OUTPUT_SUBDIR", "/tmp/abs_subdir"), ("HF_WEIGHTFORCES_OUTPUT_SUBDIR", "a/../../b"),
              ("HF_WEIGHTFORCES_OBSERVED_SEED", str(1 << 70)), ("HF_WEIGHTFORCES_EVRY", "3")]
    assert all(value is not None for _, value in cases), cases
    return cases


CHILD = textwrap.dedent("""
    import json, os, sys
    import transformers.trainer  # HF_WEIGHTFORCES=garbage, from the interpreter's start
    import hf_weightforces._hook as hook

    def mark(label):
        sys.stderr.flush()
        print(f"@@ {label} {getattr(transformers.trainer.Trainer, '_weightforces_autostart', False)}",
              file=sys.stderr, flush=True)

    mark("HF_WEIGHTFORCES")
    for var, value in json.loads(sys.argv[1]):
        for name in [n for n in os.environ if n.startswith("HF_WEIGHTFORCES")]:
            del os.environ[name]
        os.environ.update({"HF_WEIGHTFORCES": "1", var: value})
        del sys.modules["transformers.trainer"]
        hook._started = False
        hook.process_startup()  # the finder again: the next import runs the hook as at start-up
        import transformers.trainer
        mark(var)
    print("ran on")
""")


def test_every_malformed_variable_is_one_line_and_the_script_runs_on(tmp_path):
    cases = _bad_cases() + [("HF_WEIGHTFORCES_EVERY", "2")]  # a good one last: the switch still works
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_WEIGHTFORCES")}
    env.update(HF_WEIGHTFORCES="garbage", PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cases)], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.splitlines()[-1:] == ["ran on"], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    segments, lines = [], []
    for line in proc.stderr.splitlines():
        if line.startswith("@@ "):
            _, var, patched = line.split()
            segments.append((var, lines, patched == "True"))
            lines = []
        else:
            lines.append(line)
    assert [v for v, *_ in segments] == ["HF_WEIGHTFORCES"] + [v for v, _ in cases], proc.stderr[-3000:]
    first_var, first, patched = segments[0]  # transformers may print its own notices at its first import
    ours = [line for line in first if line.startswith("hf-weightforces")]
    assert ours == ["hf-weightforces: HF_WEIGHTFORCES: expected a boolean (1/0, true/false, yes/no, on/off), got "
                    "'garbage' (the monitor is off; the script runs on without it)"] and not patched
    for (var, value), (_, seen, patched) in zip(cases[:-1], segments[1:-1]):
        assert len(seen) == 1, (var, value, seen)
        assert seen[0].startswith(f"hf-weightforces: {var}: "), (var, value, seen)
        assert seen[0].endswith(" (the monitor is off; the script runs on without it)"), seen
        assert not patched, (var, value)
    assert segments[-1][1:] == ([], True)  # HF_WEIGHTFORCES_EVERY=2: patched, nothing said at import
    assert not (tmp_path / "escape_subdir").exists()


@pytest.fixture
def trainer_module():
    """The real ``transformers.trainer``, its Trainer restored afterwards."""
    import transformers.trainer as module

    cls = module.Trainer
    saved = cls.__init__, cls.train
    yield module
    cls.__init__, cls.train = saved
    if "_weightforces_autostart" in cls.__dict__:
        delattr(cls, "_weightforces_autostart")


def test_install_reports_a_bad_setting_on_rank_0_only(trainer_module, capsys):
    assert not autostart.install(trainer_module, environ={"HF_WEIGHTFORCES": "1", "HF_WEIGHTFORCES_EVERY": "0"})
    err = capsys.readouterr().err
    assert err == ("hf-weightforces: HF_WEIGHTFORCES_EVERY: must be >= 1, got 0 (the monitor is off; the script "
                   "runs on without it)\n")
    assert "_weightforces_autostart" not in trainer_module.Trainer.__dict__
    assert not autostart.install(trainer_module, environ={"HF_WEIGHTFORCES": "1", "HF_WEIGHTFORCES_EVERY": "0",
                                                          "RANK": "3"})
    assert capsys.readouterr().err == ""
    multi = '{"value": ["v_proj("]}'  # a regex error: its message stays on one line
    assert not autostart.install(trainer_module, environ={"HF_WEIGHTFORCES": "1", "HF_WEIGHTFORCES_PATTERNS": multi})
    assert len(capsys.readouterr().err.splitlines()) == 1


@pytest.mark.parametrize("subdir, ok", [
    ("weightforces", True), ("runs/a", True), ("./wf", True), ("a..b", True), ("..", False), ("../x", False),
    ("a/../../b", False), ("a\\..\\b", False), ("/abs", False), ("\\\\server\\share", False), ("C:\\wf", False),
    ("C:wf", False), ("", False), ("  ", False), ("a\x00b", False),
])
def test_output_subdir_is_confined_in_every_spelling(subdir, ok):
    assert (output_subdir_problem(subdir) is None) is ok
    if ok:
        assert WeightForcesCallback(output_subdir=subdir).output_subdir == subdir
        return
    with pytest.raises(ValueError, match=r"^output_subdir must "):
        WeightForcesCallback(output_subdir=subdir)
    with pytest.raises(ValueError, match=r"^HF_WEIGHTFORCES_OUTPUT_SUBDIR: must "):
        WeightForcesArguments.from_env({"HF_WEIGHTFORCES": "1", "HF_WEIGHTFORCES_OUTPUT_SUBDIR": subdir})
    if "\x00" not in subdir:
        from transformers import HfArgumentParser

        with pytest.raises(ValueError, match=r"^--weight_forces_output_subdir: must "):
            HfArgumentParser((WeightForcesArguments,)).parse_args_into_dataclasses(
                ["--weight_forces_output_subdir", subdir])


def test_kernel_choices_are_the_kernels_module_list():
    """The flag and the variable accept exactly core.kernels.KERNELS (what the callback checks)."""
    from hf_weightforces.core.kernels import KERNELS

    for kernel in KERNELS:
        assert WeightForcesArguments(weight_forces_kernel=kernel).weight_forces_kernel == kernel
    with pytest.raises(ValueError, match=r"--weight_forces_kernel: must be one of " + ", ".join(KERNELS) + ", got 'fast'"):
        WeightForcesArguments(weight_forces_kernel="fast")


def test_a_failing_hook_is_one_line_too(trainer_module, monkeypatch, capsys):
    """Whatever goes wrong inside the hook (here: install itself raising) stays out of the import."""
    import hf_weightforces._hook as hook

    def broken(module):
        raise RuntimeError("broken\ninstall")

    monkeypatch.setattr(autostart, "install", broken)
    hook._patch(trainer_module)
    assert capsys.readouterr().err == ("hf-weightforces: the switch failed: RuntimeError: broken install (the monitor "
                                       "is off; the script runs on)\n")
