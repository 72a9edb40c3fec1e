"""The zero-code switch's start-up hook: runs in every interpreter, so it imports nothing heavy.

``hf_weightforces.pth`` (installed beside the package in site-packages) calls
:func:`process_startup` at interpreter start, and only when ``HF_WEIGHTFORCES`` is in the
environment; ``hf-weightforces run`` also puts this folder's ``sitecustomize.py`` on the child's
``PYTHONPATH``, for installs that did not get the ``.pth``.  As coverage.py's
``process_startup()`` does, it does nothing unless asked, and child processes (torchrun ranks,
accelerate workers) inherit the switch through the environment.

When on, it registers a one-shot import hook: once ``transformers.trainer`` has been executed,
:func:`hf_weightforces.integrations.autostart.install` patches ``Trainer`` there (see
``docs/zero-code.md``); a bad setting, or any failure there, is one line on stderr and the
monitor off, never an exception out of the script's import.  Until a script imports the Trainer
nothing else is imported: no torch, no transformers, not the rest of this package.
"""

from __future__ import annotations

import os
import sys

__all__ = ["PTH_FILE", "TARGET", "process_startup"]

TARGET = "transformers.trainer"
PTH_FILE = "hf_weightforces.pth"
_OFF = ("", "0", "false", "no", "n", "f", "off")
_started = False


def process_startup() -> bool:
    """Arrange for the callback to be added to every Trainer, if ``HF_WEIGHTFORCES`` asks for it.

    Idempotent (the ``.pth`` and ``sitecustomize.py`` may both call it); returns whether it is on.
    A value that is not a boolean counts as on here, so that the Trainer import reports it.
    """
    global _started
    if _started:
        return True
    if os.environ.get("HF_WEIGHTFORCES", "").strip().lower() in _OFF:
        return False
    _started = True
    module = sys.modules.get(TARGET)
    if module is not None:  # called late (not from the start-up hook): patch now
        _patch(module)
    else:
        sys.meta_path.insert(0, _TrainerFinder())
    return True


def _patch(module) -> None:
    """Patch the Trainer; whatever fails here (a broken install, a bug) is one line on stderr and
    the monitor off: this runs inside the script's own ``import transformers``."""
    try:
        from hf_weightforces.integrations.autostart import install

        install(module)
    except Exception as exc:
        text = " ".join(f"{type(exc).__name__}: {exc}".split())
        sys.stderr.write(f"hf-weightforces: the switch failed: {text} (the monitor is off; the script runs on)\n")


class _TrainerFinder:
    """A meta-path finder for ``transformers.trainer`` only: it asks the finders after it for the
    real spec and wraps its loader, so the patch runs right after the module body.  One shot: it
    leaves ``sys.meta_path`` at the first import attempt."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != TARGET:
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find is not None else None
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _PatchingLoader(spec.loader)
        return spec


class _PatchingLoader:
    """Delegates to the real loader (and puts it back on the module), then patches."""

    def __init__(self, loader) -> None:
        self.loader = loader

    def __getattr__(self, name: str):
        return getattr(self.loader, name)

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        module.__loader__ = self.loader
        if getattr(module, "__spec__", None) is not None:
            module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        _patch(module)
