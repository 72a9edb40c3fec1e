"""The planned pass compiled ahead of time with AOTInductor (docs/budget.md, section 9).

``torch.compile`` puts Python around every call of a compiled function (dynamo's frame hook and
guards, the AOT-autograd runtime wrapper, the output code's argument handling): on the tiny model
that is as much time as the pass itself.  ``torch.export`` + ``torch._inductor.aoti_compile_and_package``
make the same inductor kernel a shared library whose loader is called with the flat list of tensors
directly, and the package is kept on disk, keyed by the graph's code and its inputs' shapes, so a
later run of the same model loads it (milliseconds, through the C++ loader torch carries) instead of
tracing and compiling again.  :class:`BackgroundBuild` compiles it in a child process instead, while
the training goes on.

:class:`AOTChunk` has the call signature of a ``torch.compile``d :func:`~.plan._chunk_pass`: it builds
(or loads) the library at its first call, from that call's tensors.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import inspect
import json
import logging
import marshal
import os
import subprocess
import sys
import tempfile
import time
import warnings
import weakref
from collections.abc import Callable
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

__all__ = ["AOTChunk", "BackgroundBuild", "compile_package", "package_dir", "prune_packages", "wait_background"]


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
    """The tensors of ``args`` in the order ``torch.export`` takes them (depth first).  Lists and
    tuples the short way (a call pays for this every step: ~14 µs for the tiny model's 97 tensors
    against ~90 µs through ``torch.utils._pytree``); anything else through pytree."""
    out: list[torch.Tensor] = []
    for x in args:
        if isinstance(x, torch.Tensor):
            out.append(x)
        elif type(x) in (list, tuple):
            out.extend(_flat(x))
        else:
            out.extend(t for t in torch.utils._pytree.tree_leaves(x) if isinstance(t, torch.Tensor))
    return out


class AOTChunk:
    """``fn`` (a function of tensors and lists/tuples of tensors that returns a tensor and may
    update some of its inputs in place) compiled ahead of time at the first call.  If exporting or
    compiling it fails, ``fallback()`` (a ``torch.compile``d ``fn``) takes over, once."""

    def __init__(self, fn: Callable, fallback: Callable[[], Callable] | None = None) -> None:
        self.fn, self.fallback = fn, fallback
        self._run: Callable[[list], list] | None = None  # the package's entry point, once loaded
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

    def package_path(self, args) -> Path:
        """Where the package of ``fn`` for tensors like ``args`` is kept (see :func:`_source_key`)."""
        shapes = [(tuple(x.shape), x.stride(), x.storage_offset(), str(x.dtype), str(x.device)) for x in _flat(args)]
        # inductor writes the thread count into its CPU kernels: a package made under 1 thread runs on 1
        threads = torch.get_num_threads()
        key = hashlib.sha256(repr((_source_key(), self.fn.__name__, shapes, threads)).encode()).hexdigest()[:40]
        return package_dir() / f"{key}.pt2"

    def load(self, path: Path) -> None:
        """Run the package at ``path`` from now on: through the C++ loader torch itself carries, not
        ``torch._inductor.aoti_load_package``, which imports inductor first (measured: 2 ms against
        5 s here, the step that switches to the compiled pass would wait for it)."""
        # (path, model name, run_single_threaded: False as inductor's default, one runner, default device)
        loader = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, -1)
        with contextlib.suppress(OSError):  # used now (prune_packages keeps the recently used ones)
            os.utime(path)
        # the loader's own entry point: the flat inputs in the exported order (it empties the list)
        self._run = loader.boxed_run

    def _build(self, args) -> Callable[[list], list]:
        path = self.package_path(args)
        if not path.exists():
            compile_package(self.fn, args, path)
        self.load(path)
        return self._run


def compile_package(fn: Callable, args, path: Path) -> None:
    """Export ``fn`` on ``args`` and compile it with AOTInductor into the package ``path``, written
    under a temporary name and renamed: whole or absent (another process, a rank, may be writing
    the same; a compiler that dies midway leaves nothing)."""
    from torch._inductor import aoti_compile_and_package

    class Graph(torch.nn.Module):
        def forward(self, *a):
            return fn(*a)

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.partial.pt2")
    try:
        with warnings.catch_warnings():  # torch's own deprecation notices while it packages
            warnings.simplefilter("ignore", FutureWarning)
            program = torch.export.export(Graph(), tuple(args), strict=False)
            aoti_compile_and_package(program, package_path=str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    logger.info("weight forces: compiled the planned pass ahead of time (%s)", path.name)
    prune_packages(path.parent)


#: Packages kept beyond the most recently used ones only while used within a day (2-4 MB each)
KEEP_PACKAGES = 32


def prune_packages(folder: Path, keep: int | None = None, now: float | None = None) -> list[Path]:
    """Remove from ``folder`` the packages beyond the ``keep`` (:data:`KEEP_PACKAGES`) most recently
    used (:meth:`AOTChunk.load` touches a package) that were not used for a day, and temporary ones an
    hour old (a compiler killed outright leaves one).  A package in use by another process is at least
    that recent; a file that cannot be removed stays.  Returns what was removed."""
    keep = KEEP_PACKAGES if keep is None else keep
    now = time.time() if now is None else now
    removed = []
    entries = []
    for f in folder.glob("*.pt2"):
        with contextlib.suppress(OSError):
            entries.append((f.stat().st_mtime, f))
    done = sorted((e for e in entries if ".partial" not in e[1].name), reverse=True)
    stale = [f for t, f in done[keep:] if now - t > 86400]
    stale += [f for t, f in entries if ".partial" in f.name and now - t > 3600]
    for f in stale:
        with contextlib.suppress(OSError):
            f.unlink()
            removed.append(f)
    return removed


# ----------------------------------------------------------------------------------- in the background
def describe(args) -> dict:
    """``args`` (CPU tensors in lists and tuples) as JSON: their structure and, per tensor, its
    storage (tensors sharing one share it again), shape, strides, offset and dtype: what the graph
    is compiled for, none of the values."""
    leaves, spec = torch.utils._pytree.tree_flatten(args)
    storages: dict[int, int] = {}
    sizes: list[int] = []
    tensors = []
    for x in leaves:
        if not isinstance(x, torch.Tensor) or x.device.type != "cpu":
            raise TypeError(f"only CPU tensors can be described, not {type(x).__name__}")
        storage = x.untyped_storage()
        i = storages.setdefault(storage.data_ptr(), len(storages))
        if i == len(sizes):
            sizes.append(0)
        sizes[i] = max(sizes[i], storage.nbytes())
        tensors.append({"storage": i, "shape": list(x.shape), "stride": list(x.stride()),
                        "offset": x.storage_offset(), "dtype": str(x.dtype).removeprefix("torch.")})
    return {"tree": torch.utils._pytree.treespec_dumps(spec), "storages": sizes, "tensors": tensors}


def rebuild(desc: dict):
    """Tensors laid out as :func:`describe` recorded them (uninitialised memory, never touched)."""
    buffers = [torch.empty(int(n), dtype=torch.uint8) for n in desc["storages"]]
    leaves = []
    for t in desc["tensors"]:
        dtype = getattr(torch, t["dtype"])
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"not a dtype: {t['dtype']!r}")
        buf = buffers[t["storage"]]
        typed = buf[: buf.numel() // dtype.itemsize * dtype.itemsize].view(dtype)
        leaves.append(typed.as_strided(t["shape"], t["stride"], t["offset"]))
    return torch.utils._pytree.tree_unflatten(leaves, torch.utils._pytree.treespec_loads(desc["tree"]))


_RUNNING: weakref.WeakSet = weakref.WeakSet()


class BackgroundBuild:
    """Packages compiled by a child process while training goes on.

    ``jobs``: (fn, args, path) — ``fn`` a function of this package, ``args`` CPU tensors like the
    ones it will be called with (only their layout travels, as JSON), ``path`` where its package
    goes (:meth:`AOTChunk.package_path`).  The child runs at a lower priority with the parent's
    thread count (inductor writes it into the kernels) and one compile worker, refuses to build if
    its code or the layout would give another package than ``path``, and is stopped by
    :meth:`close` (the end of training, or this object's end).  Threads are not an option: tracing
    shares module-level state with the training thread's own optimizer step (docs/budget.md, §9)."""

    def __init__(self, jobs: list[tuple[Callable, tuple, Path]]) -> None:
        spec = {"threads": torch.get_num_threads(),
                "jobs": [{"fn": f"{fn.__module__}:{fn.__name__}", "path": str(path), "args": describe(args)}
                         for fn, args, path in jobs]}
        fd, spec_path = tempfile.mkstemp(prefix="hf_weightforces_build_", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(spec, f)
        log = tempfile.TemporaryFile()
        root = str(Path(__file__).resolve().parents[2])  # the same hf_weightforces as this process
        env = {k: v for k, v in os.environ.items() if k != "HF_WEIGHTFORCES"}  # no monitor in the child
        env["TORCHINDUCTOR_COMPILE_THREADS"] = "1"
        try:
            proc = subprocess.Popen([sys.executable, "-c", _CHILD, root, spec_path], stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=log, env=env)
        except BaseException:
            log.close()
            os.unlink(spec_path)
            raise
        self.paths = [path for _, _, path in jobs]
        self.error: str | None = None
        self._proc, self._log = proc, log
        self._finalizer = weakref.finalize(self, _stop, proc, spec_path, log)
        _RUNNING.add(self)

    def poll(self) -> bool | None:
        """None while the child runs; then True if every package was built, False if not (the
        reason in :attr:`error`)."""
        rc = self._proc.poll()
        if rc is None:
            return None
        if self._finalizer.alive:
            if rc != 0:
                self._log.seek(0)
                lines = self._log.read().decode(errors="replace").strip().splitlines()
                self.error = lines[-1] if lines else f"exit status {rc}"
            elif not all(p.exists() for p in self.paths):
                self.error = "a package is missing after the build"
            self._finalizer()
        return self.error is None

    def wait(self, timeout: float | None = None) -> bool | None:
        """Block until the child ends (or ``timeout`` seconds); :meth:`poll`'s answer."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(timeout)
        return self.poll()

    def close(self) -> None:
        """Stop the child if it still runs (its package is not written: nothing half-made stays)."""
        self._finalizer()


def _stop(proc: subprocess.Popen, spec_path: str, log) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    with contextlib.suppress(OSError):
        os.unlink(spec_path)
    log.close()


def wait_background(timeout: float | None = None) -> bool:
    """Wait for every background build of this process; True if each one built its packages
    (benchmarks and tests: time the steps after it)."""
    return all(build.wait(timeout) for build in list(_RUNNING))


#: The child's command (``python -c _CHILD ROOT SPEC.json``): the folder holding this package replaces
#: the working directory at the head of ``sys.path`` (a ``torch.py`` or ``json.py`` lying in the training
#: script's working directory must not be imported), then :func:`_main`.
_CHILD = ("import sys; sys.path[0] = sys.argv.pop(1); "
          "from hf_weightforces.core.aot import _main; sys.exit(_main(sys.argv[1:]))")


def _main(argv: list[str]) -> int:
    """The child of :class:`BackgroundBuild` (:data:`_CHILD`): builds the packages SPEC.json asks for."""
    spec = json.loads(Path(argv[0]).read_text())
    with contextlib.suppress(OSError, AttributeError):
        os.nice(10)  # the training process comes first
    torch.set_num_threads(int(spec["threads"]))
    for job in spec["jobs"]:
        module, name = job["fn"].split(":")
        if module.split(".")[0] != __name__.split(".")[0]:  # never import what a file names
            print(f"refusing to compile {job['fn']}: not a function of this package", file=sys.stderr)
            return 2
        fn = getattr(importlib.import_module(module), name)
        args, path = rebuild(job["args"]), Path(job["path"])
        if AOTChunk(fn).package_path(args).name != path.name:
            print("the code or the tensors' layout changed since the run started: no package", file=sys.stderr)
            return 3
        if not path.exists():
            compile_package(fn, args, path)
    return 0
