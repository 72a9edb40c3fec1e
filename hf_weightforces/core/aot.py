"""The planned pass compiled ahead of time with AOTInductor (docs/budget.md, section 9).

``torch.compile`` puts Python around every call of a compiled function (dynamo's frame hook and
guards, the AOT-autograd runtime wrapper, the output code's argument handling): on the tiny model
that is as much time as the pass itself.  ``torch.export`` + ``torch._inductor.aoti_compile_and_package``
make the same inductor kernel a shared library whose loader is called with the flat list of tensors
directly, and the package is kept on disk, keyed by the graph's code and its inputs' shapes, so a
later run of the same model loads it (seconds, most of them importing inductor) instead of tracing
and compiling again.

:class:`AOTChunk` has the call signature of a ``torch.compile``d :func:`~.plan._chunk_pass`: it builds
(or loads) the library at its first call, from that call's tensors.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import logging
import marshal
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

__all__ = ["AOTChunk", "package_dir"]


def package_dir() -> Path:
    """Where the compiled packages are kept: beside inductor's own cache (``TORCHINDUCTOR_CACHE_DIR``
    moves both), the same trust as inductor's compiled code."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return Path(cache_dir()) / "hf_weightforces"


@functools.lru_cache(maxsize=1)
def _source_key() -> str:
    """The code the graph is made of, as loaded (the compiled code objects of every function of the
    modules it comes from, not their files, which may have changed since), and the torch that
    compiles it."""
    from . import budget, plan

    digest = hashlib.sha256(torch.__version__.encode())
    for module in (plan, budget):
        for name, fn in sorted(vars(module).items()):
            if inspect.isfunction(fn) and fn.__module__ == module.__name__:
                digest.update(name.encode() + marshal.dumps(fn.__code__))
    return digest.hexdigest()


def _flat(args) -> list[torch.Tensor]:
    return [x for x in torch.utils._pytree.tree_leaves(args) if isinstance(x, torch.Tensor)]


class AOTChunk:
    """``fn`` (a function of tensors and lists/tuples of tensors that returns a tensor and may
    update some of its inputs in place) compiled ahead of time at the first call.  If exporting or
    compiling it fails, ``fallback()`` (a ``torch.compile``d ``fn``) takes over, once."""

    def __init__(self, fn: Callable, fallback: Callable[[], Callable] | None = None) -> None:
        self.fn, self.fallback = fn, fallback
        self._run: Callable[[list], list] | None = None
        self._instead: Callable | None = None

    def __call__(self, *args):
        if self._run is None and self._instead is None:
            try:
                self._run = self._build(args)
            except Exception as exc:
                if self.fallback is None:
                    raise
                logger.info("weight forces: ahead-of-time compilation failed (%s: %s); torch.compile instead",
                            type(exc).__name__, exc)
                self._instead = self.fallback()
        if self._run is not None:
            return self._run(_flat(args))[0]
        return self._instead(*args)

    def _build(self, args) -> Callable[[list], list]:
        from torch._inductor import aoti_compile_and_package, aoti_load_package

        flat = _flat(args)
        shapes = [(tuple(x.shape), x.stride(), x.storage_offset(), str(x.dtype), str(x.device)) for x in flat]
        key = hashlib.sha256(repr((_source_key(), self.fn.__name__, shapes)).encode()).hexdigest()[:40]
        path = package_dir() / f"{key}.pt2"
        if not path.exists():
            fn = self.fn

            class Graph(torch.nn.Module):
                def forward(self, *a):
                    return fn(*a)

            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{key}.{os.getpid()}.partial.pt2")
            try:
                with warnings.catch_warnings():  # torch's own deprecation notices while it packages
                    warnings.simplefilter("ignore", FutureWarning)
                    program = torch.export.export(Graph(), args, strict=False)
                    aoti_compile_and_package(program, package_path=str(tmp))
                os.replace(tmp, path)  # whole or absent: another process (rank) may be writing the same
            finally:
                tmp.unlink(missing_ok=True)
            logger.info("weight forces: compiled the planned pass ahead of time (%s)", path.name)
        loader = aoti_load_package(str(path)).loader
        # the loader's own entry point: the flat inputs in the exported order (it empties the list)
        return loader.boxed_run
