"""The zero-code switch: add :class:`WeightForcesCallback` to every ``Trainer`` of an unmodified script.

    HF_WEIGHTFORCES=1 HF_WEIGHTFORCES_EVERY=10 python train.py ...
    hf-weightforces run --every 10 -- torchrun --nproc_per_node 2 train.py ...

The start-up hook (``hf_weightforces/_hook``) calls :func:`install` right after
``transformers.trainer`` has been executed.  :func:`install` reads the settings
(``HF_WEIGHTFORCES_<SETTING>``, checked by the same rules as the flags).  A bad one never stops
the script: a variable may be set for a diagnostic, even cluster-wide, in an environment whose
every script imports the Trainer, so :func:`install` prints one line on stderr naming the
variable and the problem, leaves the monitor off and returns (``hf-weightforces run`` checks the
same rules before it starts the command, and stops there with status 2).  With good settings it
wraps two methods of ``transformers.Trainer``, which every subclass (TRL's, ``Seq2SeqTrainer``,
...) inherits:

* ``__init__``: after the original, add a callback built from the settings, unless the trainer
  already holds a ``WeightForcesCallback`` (the script added its own);
* ``train``: first drop the added callback if the script has since added its own
  (``trainer.add_callback``), so a run never gets two.

Every rank of a distributed launch does this (each is a Python process that inherits the
environment); rank 0 says once per process that the monitor is on.  Anything unexpected while
adding the callback warns once and training goes on without it.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import warnings
from collections.abc import Mapping

from .args import WeightForcesArguments, env_name, settings

__all__ = ["install"]

logger = logging.getLogger(__name__)

_MARK = "_weightforces_autostart"  # on the patched Trainer class, and on the callbacks we add
_state = {"announced": False, "warned": False}


def install(trainer_module, environ: Mapping[str, str] | None = None) -> bool:
    """Patch ``trainer_module.Trainer`` (once) if the environment turns the monitor on; returns
    whether it did.  A bad setting does not raise: one line on stderr names the variable and the
    problem (rank 0 only, like the announcement), and the monitor stays off."""
    environ = os.environ if environ is None else environ
    try:
        wf = WeightForcesArguments.from_env(environ)
    except Exception as exc:  # the Trainer import is the user's, not ours: never a traceback there
        what = str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"
        _refuse(what, environ)
        return False
    trainer_cls = trainer_module.Trainer
    if not wf.weight_forces or getattr(trainer_cls, _MARK, False):
        return False
    init, train = trainer_cls.__init__, trainer_cls.train

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        _attach(self, wf)

    @functools.wraps(train)
    def train_(self, *args, **kwargs):
        _drop_if_doubled(self)
        return train(self, *args, **kwargs)

    trainer_cls.__init__ = __init__
    trainer_cls.train = train_
    setattr(trainer_cls, _MARK, True)
    return True


def _ours(trainer) -> list:
    from .callback import WeightForcesCallback

    return [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, WeightForcesCallback)]


def _attach(trainer, wf: WeightForcesArguments) -> None:
    try:
        if _ours(trainer):
            logger.info("weight forces: %s already has a WeightForcesCallback; the switch adds none",
                        type(trainer).__name__)
            return
        from .callback import WeightForcesCallback

        callback = WeightForcesCallback(**wf.callback_kwargs(), probes=wf.make_probes())
        setattr(callback, _MARK, True)
        trainer.add_callback(callback)
        _announce(trainer, wf)
    except Exception as exc:  # the switch must never stop a training script
        _warn_once(f"hf-weightforces: the switch could not add the callback to {type(trainer).__name__} "
                   f"({type(exc).__name__}: {exc}); training goes on without it")


def _drop_if_doubled(trainer) -> None:
    try:
        ours = _ours(trainer)
        added = [cb for cb in ours if getattr(cb, _MARK, False)]
        if added and len(added) < len(ours):
            for cb in added:
                trainer.remove_callback(cb)
            logger.info("weight forces: the script added its own WeightForcesCallback; the switch's one is removed")
    except Exception as exc:
        _warn_once(f"hf-weightforces: could not check the trainer's callbacks ({type(exc).__name__}: {exc})")


def _announce(trainer, wf: WeightForcesArguments) -> None:
    """One line per process, on rank 0 only (``RANK`` is set by torchrun and accelerate launch)."""
    if _state["announced"] or os.environ.get("RANK", "0") != "0":
        return
    _state["announced"] = True
    from .console import console_logger

    given = [f"{env_name(s)}={os.environ[env_name(s)]}" for s, *_ in settings() if env_name(s) in os.environ]
    folder = os.path.join(str(trainer.args.output_dir), wf.weight_forces_output_subdir)
    console_logger().info("weight forces on (HF_WEIGHTFORCES%s): a WeightForcesCallback is added to %s; rows go to %s",
                          (", " + ", ".join(given)) if given else "", type(trainer).__name__,
                          os.path.join(folder, "metrics.jsonl"))


def _refuse(problem: str, environ: Mapping[str, str]) -> None:
    """The one stderr line for a setting the switch cannot use (written directly, not logged: no
    logging is configured at a Trainer import, and a script's own handlers may send it elsewhere)."""
    logger.debug("weight forces off: %s", problem)
    if environ.get("RANK", "0") != "0":
        return
    line = " ".join(problem.split())  # a JSON or regex message may hold a newline: keep it one line
    sys.stderr.write(f"hf-weightforces: {line} (the monitor is off; the script runs on without it)\n")
    sys.stderr.flush()


def _warn_once(message: str) -> None:
    if not _state["warned"]:
        _state["warned"] = True
        logger.warning(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)
