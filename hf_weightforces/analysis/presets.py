"""Published training schedules, for checkpoints of runs that have no schedule record of their own.

``spline`` needs the lr and weight decay of every optimizer step between the checkpoints; a run trained
with the callback has them in ``weightforces/schedule.jsonl``.  For public suites the schedule is
published instead: :data:`PRESETS` holds them, each number cited in ``docs/offline.md`` (Presets).

Pythia (EleutherAI, arXiv:2304.01373), every size from the suite's own GPT-NeoX configs
(``EleutherAI/pythia`` repository, ``models/<size>/pythia-<size>.yml``; the ``-deduped`` configs are
identical in these fields): Adam betas (0.9, 0.95), eps 1e-8, ``weight-decay`` 0.1, ``train-iters`` =
``lr-decay-iters`` = 143000, ``warmup`` 0.01 (of the decay iterations: 1430 steps), cosine decay,
``min_lr`` = lr / 10, and per size the peak lr.  The lr follows GPT-NeoX's ``AnnealingLR``
(``megatron/learning_rates.py``) at iteration n = s - 1 for optimizer step s (the scheduler steps after
each optimizer step, as the Hugging Face schedulers do)::

    n <= W:  lr = peak · n / W                                   (W = 1430)
    n >  W:  lr = max(min_lr, peak/2 · (1 + cos(π (min(n, T - W) - W) / T)))      (T = 143000)

Note the cosine runs over T, not T - W, and is clipped at ``min_lr`` (reached near step 115,000), unlike
the ``min_lr + (peak - min_lr)/2 (1 + cos)`` form some re-implementations use.  Weight decay applies to
every parameter but biases and norms (GPT-NeoX's ``get_params_for_weight_decay_optimization``): optimizer
group 0 here; group 1 (biases, norms) has none, as :func:`~hf_weightforces.analysis.records.schedule_from_flags`
builds it.  The ``-v0`` models (160m, 410m, 1.4b) were trained differently (4M-token batches, 71500
steps, renamed revisions) and get no preset.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from hf_weightforces.analysis.records import RecordError, Schedule

__all__ = ["PRESETS", "Preset", "get_preset", "preset_for_repo"]


@dataclass(frozen=True)
class Preset:
    """A published AdamW schedule (warm-up, cosine to a floor) and the optimizer's constants."""

    name: str
    peak_lr: float
    min_lr: float
    warmup_steps: int
    decay_steps: int  # T of the cosine (GPT-NeoX lr-decay-iters)
    train_steps: int
    weight_decay: float
    betas: tuple[float, float]
    eps: float
    source: str

    def lr(self, steps: np.ndarray) -> np.ndarray:
        """lr of optimizer steps ``steps`` (1-based): GPT-NeoX ``AnnealingLR`` at n = step - 1."""
        n = np.asarray(steps, dtype=np.float64) - 1.0
        w, t = float(self.warmup_steps), float(self.decay_steps)
        warm = self.peak_lr * np.minimum(n, t - w) / w if w > 0 else np.full_like(n, self.peak_lr)
        decayed = self.peak_lr / 2.0 * (np.cos(math.pi * (np.minimum(n, t - w) - w) / t) + 1.0)
        return np.where(n <= w, warm, np.maximum(decayed, self.min_lr))

    def schedule(self, weight_decay: float | None = None) -> Schedule:
        """The :class:`~hf_weightforces.analysis.records.Schedule` of every training step (2 groups:
        decayed matrices and embeddings, undecayed biases and norms)."""
        wd = self.weight_decay if weight_decay is None else weight_decay
        lr = self.lr(np.arange(1, self.train_steps + 1))
        wds = np.tile(np.array([wd, 0.0]), (self.train_steps, 1))
        note = "" if weight_decay is None else f" (weight decay overridden: {wd:g})"
        source = (f"preset {self.name}: peak lr {self.peak_lr:g}, {self.warmup_steps} warm-up steps, cosine to "
                  f"{self.min_lr:g} over {self.decay_steps} steps, weight decay {wd:g}, betas {self.betas}{note} "
                  f"[{self.source}]")
        return Schedule(1, np.stack([lr, lr], axis=1), wds, source)


_PYTHIA_LR = {  # size -> peak lr, from models/<size>/pythia-<size>.yml ("lr"; "min_lr" is a tenth of it)
    "14m": 1e-3, "31m": 1e-3, "70m": 1e-3, "160m": 6e-4, "410m": 3e-4, "1b": 2.5e-4,
    "1.4b": 2e-4, "2.8b": 1.6e-4, "6.9b": 1.2e-4, "12b": 1.2e-4,
}

PRESETS: dict[str, Preset] = {
    f"pythia-{size}": Preset(
        name=f"pythia-{size}", peak_lr=lr, min_lr=lr / 10, warmup_steps=1430, decay_steps=143_000,
        train_steps=143_000, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8,
        source=f"EleutherAI/pythia models/{size.upper()}/pythia-{size}.yml",
    )
    for size, lr in _PYTHIA_LR.items()
}

_PYTHIA_REPO = re.compile(r"EleutherAI/pythia-([0-9.]+[mb])(-deduped)?", re.IGNORECASE)


def preset_for_repo(repo_id: str) -> str | None:
    """The preset of a repository id (``EleutherAI/pythia-160m-deduped`` -> ``pythia-160m``), else None."""
    match = _PYTHIA_REPO.fullmatch(repo_id)
    if not match:
        return None
    name = f"pythia-{match.group(1).lower()}"
    return name if name in PRESETS else None


def get_preset(name: str) -> Preset:
    """The preset called ``name``; a :class:`RecordError` listing the known ones otherwise."""
    try:
        return PRESETS[name.lower()]
    except KeyError:
        raise RecordError(f"unknown schedule preset {name!r}; known: {', '.join(PRESETS)}") from None
