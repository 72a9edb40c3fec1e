"""Start-up hook for ``hf-weightforces run`` when ``hf_weightforces.pth`` is not installed.

The launcher puts this folder first on the child's ``PYTHONPATH``; Python imports
``sitecustomize`` at start.  It calls the same :func:`hf_weightforces._hook.process_startup` as
the ``.pth`` (idempotent), then imports the ``sitecustomize`` it shadows, if there is one, so an
environment's own start-up code still runs.
"""

import os
import sys


def _run() -> None:
    try:
        from hf_weightforces._hook import process_startup

        process_startup()
    except Exception as exc:  # never stop an interpreter from starting
        sys.stderr.write(f"hf-weightforces: start-up hook failed ({type(exc).__name__}: {exc}); monitor off\n")


def _chain() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    mine = sys.modules.pop("sitecustomize", None)
    try:
        import sitecustomize  # noqa: F401  (the next one on the path, if any)
    except ModuleNotFoundError as exc:
        if exc.name != "sitecustomize":
            raise
        if mine is not None:
            sys.modules["sitecustomize"] = mine
    finally:
        sys.path[:] = saved


_run()
_chain()
