"""``hf-weightforces run [--every N ...] -- COMMAND ...``: the zero-code switch as a launcher.

Like ``coverage run``: it sets ``HF_WEIGHTFORCES=1`` and one ``HF_WEIGHTFORCES_<SETTING>`` per
option given, checks them with the rules of :class:`WeightForcesArguments` (an error names the
option, exit status 2), puts ``hf_weightforces/_hook`` (its ``sitecustomize.py``) first on
``PYTHONPATH`` so the start-up hook runs even where ``hf_weightforces.pth`` is not installed, and
replaces itself with ``COMMAND`` (``os.execvpe``): signals and the exit status are the command's
own.  ``COMMAND`` may be ``python``, ``torchrun``, ``accelerate launch``, a shell script: every
Python process it starts inherits the environment.

Imports no torch or transformers: ``--help`` and bad options answer at once.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from .args import WeightForcesArguments, env_for, env_name, settings

__all__ = ["add_run_parser", "child_environment", "launch"]


def _option(setting: str) -> str:
    return "--" + setting.replace("_", "-")


def add_run_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "run",
        help="run a training command with the monitor on, without changing its code",
        description="Run COMMAND with WeightForcesCallback added to every transformers Trainer it creates "
        "(every rank of torchrun / accelerate launch). Options become HF_WEIGHTFORCES_<SETTING> variables, the "
        "callback's argument names; variables already set are kept unless an option overrides them. "
        "Rows go to <output_dir>/weightforces/metrics.jsonl.",
        usage="hf-weightforces run [options] -- COMMAND [ARGS ...]",
    )
    for setting, kind, default, text in settings():
        name = _option(setting)
        if kind is bool:
            p.add_argument(name, dest=setting, action=argparse.BooleanOptionalAction, default=None,
                           help=f"{text} (default: {default})")
        else:
            p.add_argument(name, dest=setting, type=kind, default=None, metavar="N" if kind is int else "TEXT",
                           help=text if default is None else f"{text} (default: {default})")
    p.add_argument("command", nargs=argparse.REMAINDER, help="the command to run, after --")
    p.set_defaults(func=launch)


def child_environment(args: argparse.Namespace, environ: Mapping[str, str]) -> dict[str, str]:
    """The command's environment: ``environ`` plus the switch, the options and the hook folder on
    ``PYTHONPATH``; raises ValueError (naming the option or variable) for a bad setting."""
    given = {s: getattr(args, s) for s, *_ in settings() if getattr(args, s, None) is not None}
    env = {**environ, **env_for(given)}
    flags = {env_name(s): _option(s) for s in given}
    WeightForcesArguments.from_env(env, spell=lambda s: flags.get(env_name(s), env_name(s)))
    hook_dir = str(Path(__file__).resolve().parent.parent / "_hook")
    env["PYTHONPATH"] = os.pathsep.join([hook_dir] + [p for p in environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def launch(args: argparse.Namespace) -> int:
    command: Sequence[str] = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise ValueError("run needs a command: hf-weightforces run [options] -- python train.py ...")
    env = child_environment(args, os.environ)
    sys.stdout.flush()
    sys.stderr.flush()
    if os.name != "posix":  # no exec that keeps the process: wait for the child and pass its status on
        import subprocess

        try:
            return subprocess.call(command, env=env)
        except OSError as exc:
            raise ValueError(f"cannot run {command[0]!r}: {exc.strerror or exc}") from None
    try:
        os.execvpe(command[0], command, env)
    except OSError as exc:
        raise ValueError(f"cannot run {command[0]!r}: {exc.strerror or exc}") from None
    return 0  # pragma: no cover (exec does not return)
