"""Hugging Face Hub revisions as checkpoints: ``REPO_ID --revisions step1000:step143000:1000``.

Suites such as Pythia publish their training checkpoints as revisions of one repository
(``EleutherAI/pythia-160m`` at ``step0`` ... ``step143000``).  :class:`HubCheckpoints` is a sequence of
:class:`HubCheckpoint`, one per revision, whose ``step`` comes from the revision's name and whose
``path`` is the local snapshot folder, fetched only when first read:

* ``huggingface_hub.snapshot_download(repo_id, revision=..., allow_patterns=...)`` with the weights and
  ``config.json`` only (safetensors first; PyTorch ``.bin`` files only when a revision has no safetensors);
  the cache is used first, and with ``HF_HUB_OFFLINE=1`` (read when the revision is resolved) nothing but
  the cache is looked at.  ``HF_HUB_CACHE`` / ``HF_HOME`` are also read at that moment.
* one revision at a time: with ``delete_after=True`` reading revision i+1 first removes revision i from the
  cache (huggingface_hub's cache API, ``scan_cache_dir().delete_revisions``), so the disk holds one
  revision; a revision already read keeps its (now removed) path for the report and is never fetched twice.
  Readers therefore read checkpoints in order, each once (reading the same one again while it is the
  current one is free).

Revision lists (:func:`parse_revisions`): ``step0,step512,step1000`` or a range ``step1000:step143000:1000``
(stop included when it lies on the stride), or both mixed in one comma list.  Errors are
:class:`HubError` (a ``ValueError``), one line naming the repository and revision.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "HubCheckpoint",
    "HubCheckpoints",
    "HubError",
    "WEIGHT_PATTERNS",
    "checkpoint_label",
    "looks_like_repo_id",
    "parse_revisions",
    "resolve_checkpoints",
    "revision_step",
]

#: Files fetched per revision: safetensors weights (single or sharded) and the model config.
WEIGHT_PATTERNS: tuple[str, ...] = ("*.safetensors", "*.safetensors.index.json", "config.json")
#: Fallback for revisions published without safetensors (read with ``torch.load(weights_only=True)``).
TORCH_PATTERNS: tuple[str, ...] = ("pytorch_model*.bin", "pytorch_model.bin.index.json", "config.json")

_REPO_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
_STEP_RE = re.compile(r"step[-_]?(\d+)", re.IGNORECASE)
_NUM_RE = re.compile(r"^(\D*)(\d+)(\D*)$")


class HubError(ValueError):
    """A repository id, revision list or revision that cannot be used; the message says which and why."""


def looks_like_repo_id(text: str) -> bool:
    """``org/name`` that is not an existing local path (a local folder always wins)."""
    return bool(_REPO_RE.fullmatch(text)) and not Path(text).exists()


def revision_step(revision: str) -> int | None:
    """Training step named by a revision: ``step1000`` -> 1000, ``step1000-tokens4B`` (OLMo) -> 1000,
    a plain ``1000`` -> 1000; ``None`` for names without one (``main``)."""
    match = _STEP_RE.search(revision)
    if match:
        return int(match.group(1))
    return int(revision) if revision.isdigit() else None


def _expand_range(item: str) -> list[str]:
    parts = item.split(":")
    if len(parts) != 3 or not all(parts):
        raise HubError(f"revision range {item!r}: expected START:STOP:STRIDE, e.g. step1000:step143000:1000")
    start, stop = _NUM_RE.match(parts[0]), _NUM_RE.match(parts[1])
    if start is None or stop is None or (start.group(1), start.group(3)) != (stop.group(1), stop.group(3)):
        raise HubError(f"revision range {item!r}: START and STOP must be the same name around one number "
                       "(step1000:step143000:1000)")
    if not parts[2].isdigit() or int(parts[2]) < 1:
        raise HubError(f"revision range {item!r}: STRIDE must be a positive integer, got {parts[2]!r}")
    a, b, stride = int(start.group(2)), int(stop.group(2)), int(parts[2])
    if b < a:
        raise HubError(f"revision range {item!r}: STOP comes before START")
    return [f"{start.group(1)}{n}{start.group(3)}" for n in range(a, b + 1, stride)]


def parse_revisions(spec: str) -> list[str]:
    """Revision names from ``a,b,c`` and/or ``START:STOP:STRIDE`` items, in the order given, no repeats."""
    out: list[str] = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            raise HubError(f"--revisions {spec!r}: empty item")
        for rev in _expand_range(item) if ":" in item else [item]:
            if rev in out:
                raise HubError(f"--revisions {spec!r}: revision {rev!r} is listed twice")
            out.append(rev)
    return out


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _cache_dir(cache_dir: str | os.PathLike | None) -> Path:
    """The hub cache, read from the environment now (huggingface_hub reads it once, at import)."""
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


@dataclass(eq=False)
class HubCheckpoint:
    """One revision as a checkpoint: ``step`` from its name, ``path`` fetched on first read."""

    source: HubCheckpoints
    revision: str
    step: int
    resolved: Path | None = None

    @property
    def path(self) -> Path:
        return self.source.materialize(self)

    @property
    def label(self) -> str:
        return f"{self.source.repo_id}@{self.revision}"

    def __repr__(self) -> str:
        return f"HubCheckpoint({self.label!r}, step={self.step})"


class HubCheckpoints(Sequence[HubCheckpoint]):
    """The revisions of one repository as checkpoints in step order, fetched one at a time.

    ``progress`` receives one line per event (resolving, fetched, deleted); the CLI prints it on stderr.
    Call :meth:`close` (or use ``with``) to remove the last revision read when ``delete_after``.
    """

    def __init__(
        self,
        repo_id: str,
        revisions: Sequence[str],
        *,
        delete_after: bool = False,
        cache_dir: str | os.PathLike | None = None,
        progress: Callable[[str], None] | None = None,
        need_steps: bool = True,
        sort: bool = True,
    ) -> None:
        if not _REPO_RE.fullmatch(repo_id):
            raise HubError(f"{repo_id!r} is not a Hub repository id (expected org/name)")
        if not revisions:
            raise HubError(f"{repo_id}: no revisions given")
        items = []
        for rev in revisions:
            step = revision_step(rev)
            if step is None and need_steps:
                raise HubError(f"{repo_id}@{rev}: cannot tell the training step from the revision name "
                               "(expected stepN, as Pythia and OLMo name theirs)")
            items.append(HubCheckpoint(self, rev, -1 if step is None else step))
        if need_steps:
            if sort:
                items.sort(key=lambda c: c.step)
            for a, b in zip(items, items[1:]):
                if a.step == b.step:
                    raise HubError(f"{repo_id}: revisions {a.revision!r} and {b.revision!r} name the same step {a.step}")
        self.repo_id = repo_id
        self.items = items
        self.delete_after = delete_after
        self.cache_dir = cache_dir
        self.progress = progress or (lambda line: None)
        self._current: HubCheckpoint | None = None

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):  # type: ignore[override]
        return self.items[i]

    def __iter__(self) -> Iterator[HubCheckpoint]:
        return iter(self.items)

    def select(self, keep: Callable[[HubCheckpoint], bool]) -> HubCheckpoints:
        """A new sequence over the revisions ``keep`` accepts (nothing fetched)."""
        out = HubCheckpoints.__new__(HubCheckpoints)
        out.__dict__.update(self.__dict__)
        out.items = [c for c in self.items if keep(c)]
        for c in out.items:
            c.source = out
        return out

    def materialize(self, ck: HubCheckpoint) -> Path:
        """The local snapshot of ``ck``: fetched now unless it was read before (then its path is
        returned as is, even if ``delete_after`` has removed it)."""
        if ck.resolved is not None:
            return ck.resolved
        if self._current is not None and self._current is not ck:
            self._release(self._current)
        ck.resolved = self._download(ck)
        self._current = ck
        return ck.resolved

    def close(self) -> None:
        if self._current is not None:
            self._release(self._current)
            self._current = None

    def __enter__(self) -> HubCheckpoints:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _download(self, ck: HubCheckpoint) -> Path:
        from hf_weightforces.analysis.checkpoints import CheckpointError, weight_files

        index = self.items.index(ck) + 1 if ck in self.items else 0
        self.progress(f"[{index}/{len(self.items)}] {ck.label}: resolving")
        folder = self._snapshot(ck, WEIGHT_PATTERNS)
        try:
            weight_files(folder)
        except CheckpointError:
            folder = self._snapshot(ck, TORCH_PATTERNS)  # no safetensors in this revision
            try:
                weight_files(folder)
            except CheckpointError:
                raise HubError(f"{ck.label}: the snapshot holds no weights (looked for *.safetensors and "
                               "pytorch_model*.bin)") from None
        self.progress(f"[{index}/{len(self.items)}] {ck.label}: ready at {folder}")
        return folder

    def _snapshot(self, ck: HubCheckpoint, patterns: Sequence[str]) -> Path:
        try:
            from huggingface_hub import snapshot_download
        except ImportError as exc:
            raise HubError("reading Hub revisions needs huggingface_hub (pip install 'hf-weightforces[hub]')") from exc
        offline = _env_flag("HF_HUB_OFFLINE")
        try:
            return Path(snapshot_download(ck.source.repo_id, revision=ck.revision, allow_patterns=list(patterns),
                                          cache_dir=str(_cache_dir(self.cache_dir)), local_files_only=offline))
        except Exception as exc:  # huggingface_hub's own errors: not found, offline without a cache, network
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            hint = " (HF_HUB_OFFLINE is set: only the local cache is read)" if offline else ""
            raise HubError(f"{ck.label}: cannot fetch this revision{hint}: {type(exc).__name__}: {first}") from exc

    def _release(self, ck: HubCheckpoint) -> None:
        if not self.delete_after or ck.resolved is None:
            return
        from huggingface_hub import scan_cache_dir

        commit = ck.resolved.name
        cache = scan_cache_dir(_cache_dir(self.cache_dir))
        hashes = [r.commit_hash for repo in cache.repos if repo.repo_id == self.repo_id
                  for r in repo.revisions if r.commit_hash == commit]
        if hashes:
            strategy = cache.delete_revisions(*hashes)
            strategy.execute()
            self.progress(f"{ck.label}: removed from the cache ({strategy.expected_freed_size_str} freed)")


def resolve_checkpoints(paths) -> list:
    """The checkpoints of ``paths`` in step order: :class:`HubCheckpoints` as they are (each revision is
    fetched when read), else :func:`~hf_weightforces.analysis.records.find_checkpoints` of local paths."""
    if isinstance(paths, HubCheckpoints):
        return list(paths)
    from hf_weightforces.analysis.records import find_checkpoints

    return find_checkpoints(paths)


def checkpoint_label(ck) -> str:
    """Where a checkpoint came from: ``repo@revision`` for a Hub revision (nothing fetched), else its path."""
    return getattr(ck, "label", None) or str(ck.path)
