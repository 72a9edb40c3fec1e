"""The zero-code switch: HF_WEIGHTFORCES=1 and ``hf-weightforces run`` on scripts that import nothing of ours.

Fast tests patch ``Trainer`` in this process (and undo it); the slow ones run the unmodified
scripts in ``tests/scripts/`` as users would: plain Python, torchrun and accelerate launch with
two CPU ranks, a TRL SFTTrainer, and a wheel and an editable wheel installed into a fresh venv.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from conftest import train_tiny

from hf_weightforces import WeightForcesCallback
from hf_weightforces._hook import PTH_FILE
from hf_weightforces.integrations import autostart
from hf_weightforces.integrations.launcher import child_environment

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = Path(__file__).resolve().parent / "scripts"
HOOK_DIR = ROOT / "hf_weightforces" / "_hook"


# ----------------------------------------------------------------------------- in this process
@pytest.fixture
def patched():
    """``install`` on the real ``transformers.trainer``, undone afterwards."""
    import transformers.trainer as module

    cls = module.Trainer
    saved = cls.__init__, cls.train

    def install(**env):
        return autostart.install(module, environ={"HF_WEIGHTFORCES": "1", **env})

    yield install
    cls.__init__, cls.train = saved
    if "_weightforces_autostart" in cls.__dict__:
        delattr(cls, "_weightforces_autostart")


def _ours(trainer) -> list:
    return [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, WeightForcesCallback)]


def test_every_trainer_gets_one_callback_never_two(patched, tmp_path, wf_rows):
    assert patched(HF_WEIGHTFORCES_EVERY="2", HF_WEIGHTFORCES_PER_LAYER="0", HF_WEIGHTFORCES_QUIET="1")
    assert not patched()  # once per class
    trainer = train_tiny(tmp_path / "auto", max_steps=4, logging_steps=2)
    (cb,) = _ours(trainer)
    assert (cb.every, cb.per_layer, cb.quiet) == (2, False, True)
    rows = wf_rows(tmp_path / "auto")
    assert [(r["step"], r["weightforces/steps"]) for r in rows] == [(2, 1), (4, 1)]
    assert not any(k.startswith("weightforces/layer_") for k in rows[0])

    own = WeightForcesCallback(every=1, quiet=True)  # passed to the constructor: kept alone
    trainer = train_tiny(tmp_path / "own", [own], max_steps=2, logging_steps=2)
    assert _ours(trainer) == [own]

    from conftest import tiny_data, tiny_model
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(str(tmp_path / "late"), max_steps=2, logging_steps=2, report_to=[], use_cpu=True,
                             disable_tqdm=True, save_strategy="no", per_device_train_batch_size=4)
    trainer = Trainer(model=tiny_model(), args=args, train_dataset=tiny_data())
    assert len(_ours(trainer)) == 1
    late = WeightForcesCallback(quiet=True)
    trainer.add_callback(late)  # added after the constructor: the switch's one leaves at train()
    trainer.train()
    assert _ours(trainer) == [late]
    assert [r["weightforces/steps"] for r in wf_rows(tmp_path / "late")] == [2]


def test_a_bad_setting_is_one_line_and_the_monitor_off(patched, capsys):
    """Never an exception out of the script's Trainer import (tests/test_bad_settings.py: every variable)."""
    assert not patched(HF_WEIGHTFORCES_EVERY="0")
    assert capsys.readouterr().err.startswith("hf-weightforces: HF_WEIGHTFORCES_EVERY: must be >= 1, got 0 (the monitor is off")
    assert not patched(HF_WEIGHTFORCES_EVRY="3")
    assert capsys.readouterr().err.startswith(
        "hf-weightforces: HF_WEIGHTFORCES_EVRY: unknown setting; did you mean HF_WEIGHTFORCES_EVERY")


# ----------------------------------------------------------------------------- the launcher
def _run_args(**given) -> argparse.Namespace:
    from hf_weightforces.integrations.args import settings

    return argparse.Namespace(**{**{s: None for s, *_ in settings()}, **given})


def test_launcher_environment():
    env = child_environment(_run_args(every=4, per_layer=False), {"PYTHONPATH": "/x", "HF_WEIGHTFORCES_WEIBULL_EVERY": "0"})
    assert env["HF_WEIGHTFORCES"] == "1" and env["HF_WEIGHTFORCES_EVERY"] == "4"
    assert env["HF_WEIGHTFORCES_PER_LAYER"] == "0" and env["HF_WEIGHTFORCES_WEIBULL_EVERY"] == "0"  # kept
    assert env["PYTHONPATH"].split(os.pathsep) == [str(HOOK_DIR), "/x"]
    with pytest.raises(ValueError, match=r"^--offset-sample-every: 15 is not a multiple of --every \(10\)"):
        child_environment(_run_args(every=10, offset_sample_every=15), {})
    with pytest.raises(ValueError, match=r"^HF_WEIGHTFORCES_OFFSET_SAMPLE_EVERY: 15 is not a multiple of --every"):
        child_environment(_run_args(every=10), {"HF_WEIGHTFORCES_OFFSET_SAMPLE_EVERY": "15"})


def _clean_env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_WEIGHTFORCES")}
    return {**env, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore", **extra}


def test_launcher_execs_the_command_and_chains_sitecustomize(tmp_path):
    """The exit status is the command's; the command sees the settings and a started hook; an
    environment's own sitecustomize (here on PYTHONPATH after ours) still runs."""
    (tmp_path / "sitecustomize.py").write_text("import os\nos.environ['THEIRS'] = 'ran'\n")
    probe = ("import os, sys; import hf_weightforces._hook as h; "
             "print(os.environ['HF_WEIGHTFORCES_EVERY'], os.environ.get('THEIRS'), h._started, 'torch' in sys.modules); "
             "sys.exit(7)")
    proc = subprocess.run([sys.executable, "-m", "hf_weightforces.cli", "run", "--every", "3", "--", sys.executable,
                           "-c", probe], env=_clean_env(PYTHONPATH=str(tmp_path)), capture_output=True, text=True)
    assert proc.returncode == 7, proc.stderr
    assert proc.stdout.split() == ["3", "ran", "True", "False"]
    bad = subprocess.run([sys.executable, "-m", "hf_weightforces.cli", "run", "--every", "0", "--", "true"],
                         env=_clean_env(), capture_output=True, text=True)
    assert (bad.returncode, bad.stderr) == (2, "error: --every: must be >= 1, got 0\n")


def _pth_path() -> Path:
    return Path(sysconfig.get_paths()["purelib"]) / PTH_FILE


def test_pth_is_installed_and_import_light():
    """`pip install -e .` put the .pth into site-packages; with the switch on, interpreter start
    imports neither torch nor transformers (only the hook, until a Trainer is imported)."""
    assert _pth_path().read_text() == (HOOK_DIR / PTH_FILE).read_text(), "reinstall: pip install -e ."
    code = "import sys; print(sorted(m for m in ('torch', 'transformers', 'hf_weightforces._hook') if m in sys.modules))"
    on = subprocess.run([sys.executable, "-c", code], env=_clean_env(HF_WEIGHTFORCES="1"), capture_output=True, text=True)
    off = subprocess.run([sys.executable, "-c", code], env=_clean_env(), capture_output=True, text=True)
    assert on.stdout.strip() == "['hf_weightforces._hook']" and off.stdout.strip() == "[]", (on.stderr, off.stderr)


# ----------------------------------------------------------------------------- real scripts (slow)
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_LAUNCH = {
    "python": lambda: [sys.executable],
    "torchrun": lambda: [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                         "127.0.0.1", "--master_port", str(_free_port())],
    "accelerate": lambda: [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                           "--main_process_port", str(_free_port())],
}
_ARGS = ["--max_steps", "4", "--logging_steps", "2", "--use_cpu", "--report_to", "none", "--save_strategy", "no",
         "--per_device_train_batch_size", "4", "--disable_tqdm", "true", "--learning_rate", "1e-3"]


@pytest.mark.slow
@pytest.mark.parametrize("script, switch, launcher", [
    ("plain_train.py", "env", "python"),
    ("plain_train.py", "run", "torchrun"),
    ("sft_train.py", "run", "python"),
    ("sft_train.py", "env", "accelerate"),
])
def test_unmodified_script_writes_rows(tmp_path, script, switch, launcher):
    out = tmp_path / "out"
    cmd = _LAUNCH[launcher]() + [str(SCRIPTS / script), "--output_dir", str(out)] + _ARGS
    cmd += ["--max_length", "64"] if script == "sft_train.py" else []
    if switch == "run":
        cmd = [sys.executable, "-m", "hf_weightforces.cli", "run", "--every", "2", "--"] + cmd
        env = _clean_env()
    else:
        env = _clean_env(HF_WEIGHTFORCES="1", HF_WEIGHTFORCES_EVERY="2")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert log.count("weight forces on (HF_WEIGHTFORCES") == 1, log[-4000:]  # rank 0 says it, once
    rows = [json.loads(line) for line in (out / "weightforces" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["weightforces/steps"]) for r in rows] == [(2, 1), (4, 1)]
    params = json.loads((out / "weightforces" / "params.json").read_text())
    # every rank took part: DDP divides the tensors among the ranks and sums their parts
    assert rows[-1]["weightforces/total/numel"] == sum(p["numel"] for p in params["params"])
    assert "weight forces step 4 (1 budget step): total align" in log  # report_to none: the console line


@pytest.mark.slow
def test_bad_setting_lets_the_script_train_without_the_monitor(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(SCRIPTS / "plain_train.py"), "--output_dir", str(out)] + _ARGS,
                          env=_clean_env(HF_WEIGHTFORCES="1", HF_WEIGHTFORCES_OFFSET_SAMPLE_EVERY="x"),
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours = [line for line in proc.stderr.splitlines() if "HF_WEIGHTFORCES" in line]
    assert ours == ["hf-weightforces: HF_WEIGHTFORCES_OFFSET_SAMPLE_EVERY: expected an integer, got 'x' (the monitor "
                    "is off; the script runs on without it)"], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert out.is_dir() and not (out / "weightforces").exists()  # trained, no monitor


@pytest.mark.slow
def test_wheel_and_editable_install_put_the_pth_in_site_packages(tmp_path):
    """Build both wheels from a copy of the project with setuptools' PEP 517 hooks and install each
    into a fresh venv (no torch there: the hook must not need it to start)."""
    project = tmp_path / "project"
    project.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        (project / name).write_bytes((ROOT / name).read_bytes())
    for src in (ROOT / "hf_weightforces").rglob("*.py"):
        dst = project / src.relative_to(ROOT)
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(src.read_bytes())
    (project / "hf_weightforces" / "_hook" / PTH_FILE).write_bytes((HOOK_DIR / PTH_FILE).read_bytes())
    dist = tmp_path / "dist"
    build = ("import sys; from pathlib import Path; from setuptools import build_meta as b; "
             "out, record = sys.argv[1:3]; "  # the hooks rewrite sys.argv
             "Path(record).write_text(b.build_wheel(out) + ' ' + b.build_editable(out))")
    proc = subprocess.run([sys.executable, "-c", build, str(dist), str(tmp_path / "names")], cwd=project,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    wheel, editable = (dist / name for name in (tmp_path / "names").read_text().split())
    for whl in (wheel, editable):
        assert zipfile.ZipFile(whl).read(PTH_FILE) == (HOOK_DIR / PTH_FILE).read_bytes()

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    pip = [sys.executable, "-m", "pip", "--python", str(python), "--disable-pip-version-check", "-q"]
    probe = "import sys; h = sys.modules.get('hf_weightforces._hook'); print(h is not None and h._started, h and h.__file__)"
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    for whl, home in ((wheel, Path(purelib)), (editable, project)):
        subprocess.run(pip + ["install", "--no-deps", "--no-index", str(whl)], check=True)
        assert (Path(purelib) / PTH_FILE).is_file()
        on = subprocess.run([python, "-c", probe], env=_clean_env(HF_WEIGHTFORCES="1"), capture_output=True, text=True)
        started, where = on.stdout.split()
        assert started == "True" and Path(where).is_relative_to(home), on.stderr
        off = subprocess.run([python, "-c", probe], env=_clean_env(), capture_output=True, text=True)
        assert off.stdout.split()[0] == "False"
        subprocess.run(pip + ["uninstall", "-y", "hf-weightforces"], check=True)
        assert not (Path(purelib) / PTH_FILE).exists()  # uninstall takes it away again
