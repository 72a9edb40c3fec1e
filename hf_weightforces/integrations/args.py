"""Training-arguments dataclass for ``HfArgumentParser``: switch the monitor on with flags only.

    parser = HfArgumentParser((TrainingArguments, WeightForcesArguments))
    training_args, wf_args = parser.parse_args_into_dataclasses()
    trainer = Trainer(..., args=training_args, callbacks=wf_args.make_callbacks())

    python train.py --output_dir out --weight_forces --weight_forces_every 10
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["WeightForcesArguments"]


@dataclass
class WeightForcesArguments:
    weight_forces: bool = field(
        default=False, metadata={"help": "Log the AdamW force budget (alignment, injection, decay) of the weights."}
    )
    weight_forces_every: int = field(
        default=1, metadata={"help": "Compute the budget every N optimizer steps (1 = every step)."}
    )
    weight_forces_per_layer: bool = field(default=True, metadata={"help": "Also log one row per layer."})
    weight_forces_per_matrix: bool = field(default=False, metadata={"help": "Also log one row per parameter."})
    weight_forces_patterns: str | None = field(
        default=None,
        metadata={"help": 'Own grouping rules: JSON {"class": ["regex", ...]} or a path to such a JSON file.'},
    )
    weight_forces_to_all_integrations: bool = field(
        default=False,
        metadata={"help": "Put the keys into the Trainer's logs so every report_to integration gets them."},
    )
    weight_forces_backbone_every: int = field(
        default=0,
        metadata={"help": "Estimate the AdamW backbone (top direction of the displacements from the start, with "
                  "its random-walk null) every N optimizer steps; 0 = off."},
    )
    weight_forces_backbone_snapshot_every: int = field(
        default=10,
        metadata={"help": "Store a displacement snapshot every N steps (doubled when the stack is full); "
                  "must divide --weight_forces_backbone_every."},
    )
    weight_forces_backbone_coords: int = field(
        default=1 << 16, metadata={"help": "Sampled coordinates per weight class for the backbone."}
    )
    weight_forces_rank_every: int = field(
        default=0,
        metadata={"help": "Stable/effective ranks of every layer's matrices and key-query products every N "
                  "optimizer steps; 0 = off."},
    )
    weight_forces_rank_per_head: bool = field(
        default=True, metadata={"help": "Also log each head's key-query spectrum."}
    )
    weight_forces_weibull_every: int = field(
        default=100, metadata={"help": "Fit Weibull (k, lambda) per class every N steps (0 = off)."}
    )
    weight_forces_weibull_per_matrix: bool = field(
        default=False, metadata={"help": "Also fit every weight matrix at those events."}
    )
    weight_forces_offset_sample_every: int = field(
        default=10, metadata={"help": "Sparse-recording variant of the RMS prediction: forces every N steps."}
    )
    weight_forces_super_weights: int = field(
        default=0, metadata={"help": "Also report shares and fits without the N largest |w| (0 = off)."}
    )

    def __post_init__(self) -> None:
        if self.weight_forces_every < 1:
            raise ValueError(f"--weight_forces_every must be >= 1, got {self.weight_forces_every}")
        if self.weight_forces_backbone_snapshot_every < 1:
            raise ValueError("--weight_forces_backbone_snapshot_every must be >= 1, "
                             f"got {self.weight_forces_backbone_snapshot_every}")
        for flag in ("backbone_every", "rank_every"):
            if getattr(self, f"weight_forces_{flag}") < 0:
                raise ValueError(f"--weight_forces_{flag} must be >= 0, got {getattr(self, f'weight_forces_{flag}')}")
        if self.weight_forces_backbone_every and self.weight_forces_backbone_every % self.weight_forces_backbone_snapshot_every:
            raise ValueError(
                f"--weight_forces_backbone_every ({self.weight_forces_backbone_every}) must be a multiple of "
                f"--weight_forces_backbone_snapshot_every ({self.weight_forces_backbone_snapshot_every})"
            )
        self._patterns = self._load_patterns(self.weight_forces_patterns)

    @staticmethod
    def _load_patterns(spec: str | None) -> dict | None:
        if not spec:
            return None
        text = Path(spec).read_text() if not spec.lstrip().startswith("{") and Path(spec).is_file() else spec
        try:
            patterns = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--weight_forces_patterns is neither JSON nor a JSON file: {exc}") from exc
        if not isinstance(patterns, dict):
            raise ValueError("--weight_forces_patterns must be a JSON object {class: [regex, ...]}")
        return patterns

    def make_callbacks(self) -> list:
        """``[WeightForcesCallback(...)]`` when ``--weight_forces`` is set, else ``[]``."""
        if not self.weight_forces:
            return []
        from .callback import WeightForcesCallback

        return [
            WeightForcesCallback(
                every=self.weight_forces_every,
                per_layer=self.weight_forces_per_layer,
                per_matrix=self.weight_forces_per_matrix,
                patterns=self._patterns,
                to_all_integrations=self.weight_forces_to_all_integrations,
                weibull_every=self.weight_forces_weibull_every,
                weibull_per_matrix=self.weight_forces_weibull_per_matrix,
                offset_sample_every=self.weight_forces_offset_sample_every,
                super_weights=self.weight_forces_super_weights,
                probes=self.make_probes(),
            )
        ]

    def make_probes(self) -> list:
        """The trajectory-geometry probes the flags ask for (``--weight_forces_backbone_every``,
        ``--weight_forces_rank_every``)."""
        from .probes import BackboneProbe, RankProbe

        probes: list = []
        if self.weight_forces_backbone_every:
            probes.append(BackboneProbe(every=self.weight_forces_backbone_every,
                                        snapshot_every=self.weight_forces_backbone_snapshot_every,
                                        coords=self.weight_forces_backbone_coords))
        if self.weight_forces_rank_every:
            probes.append(RankProbe(every=self.weight_forces_rank_every, per_head=self.weight_forces_rank_per_head))
        return probes
