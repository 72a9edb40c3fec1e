"""A saved W&B workspace with the panels a researcher wants first (``hf-weightforces wandb-view``).

:func:`view_sections` decides the panels from the set of keys a run logged (pure Python: every
panel names only keys in that set); :func:`build_workspace` turns them into a
``wandb_workspaces`` :class:`Workspace` (the maintained library, imported here only), which
``--dry-run`` prints as JSON and otherwise saves.  The keys come from the run's
``weightforces/wandb_keys.json`` (written by the W&B sink, no network) or from the W&B API.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from ..core.groups import GROUPS, TOTAL
from .wandb_media import KEYS_FILE

__all__ = ["Panel", "build_workspace", "keys_from_api", "keys_from_run_dir", "view_sections"]

X = "train/global_step"
_AGGS = (*GROUPS, "matrices", "adapters", TOTAL)


class Panel(dict):
    """``{"kind": "line" | "stacked" | "media", "title": str, "keys": [...], ...}``."""


def _line(title: str, keys: list[str], logged: set[str], kind: str = "line", **extra) -> list[Panel]:
    present = [k for k in keys if k in logged]
    return [Panel(kind=kind, title=title, keys=present, **extra)] if present else []


def view_sections(logged: Iterable[str]) -> list[tuple[str, list[Panel]]]:
    """(section name, panels) in reading order (README, "What to look at first": who moves the norm, the
    forces over time, the bookkeeping; the saved workspace opens these three); only keys in ``logged``,
    empty sections left out."""
    logged = set(logged)
    aggs = [g for g in _AGGS if f"forces/{g}/align" in logged]
    pools = [g for g in _AGGS if f"weibull/{g}/weibull_k" in logged or f"weibull/{g}/start_weibull_k" in logged]
    backbone = [g for g in _AGGS if f"backbone/{g}/fraction" in logged or f"backbone/{g}/update_cos" in logged]
    sections: list[tuple[str, list[Panel]]] = [
        ("Shares of |A| + |I| + |D|", [p for g in aggs for p in _line(
            f"{g}: shares (stacked)", [f"shares/{g}/{k}_share" for k in ("align", "inject", "decay")], logged,
            kind="stacked")]),
        ("Forces: A, I and D per class", [p for g in aggs for p in _line(
            f"{g}: alignment, injection, decay per optimizer step",
            [f"forces/{g}/{k}" for k in ("align", "inject", "decay", "rest")], logged)]),
        ("Health: closure and rounding", [
            *_line("closure / (|A| + |I| + |D|) per aggregate", [f"health/{g}/closure_rel" for g in aggs], logged),
            *_line("rounding per aggregate (stored weights vs intended update)", [f"health/{g}/rounding" for g in aggs],
                   logged),
            *_line("decay really applied / nominal", [f"health/{g}/decay_ratio" for g in aggs], logged),
            *_line("skipped and non-finite steps", ["health/skipped_steps", f"health/{TOTAL}/nonfinite_steps"], logged),
        ]),
        ("A + D balance", [p for g in aggs for p in _line(
            f"{g}: alignment against decay (A + D → 0 at balance)", [f"forces/{g}/align", f"forces/{g}/decay"],
            logged)]),
        ("Weibull k and λ/σ per class", [
            *_line("Weibull shape k (Gaussian weights: 1.2054)",
                   [f"weibull/{g}/{k}" for g in pools for k in ("weibull_k", "start_weibull_k")], logged),
            *_line("Weibull scale λ", [f"weibull/{g}/{k}" for g in pools for k in ("weibull_scale", "start_weibull_scale")],
                   logged),
            *_line("λ / σ (Gaussian weights: 0.8875)", [f"weibull/{g}/weibull_scale_over_rms" for g in pools], logged),
            *_line("σ = RMS of w", [f"scale/{g}/rms" for g in pools], logged),
        ]),
        ("RMS-to-Weibull offset", [p for g in pools for p in _line(
            f"{g}: offset components (relative to the fitted λ)",
            [f"offset/{g}/offset_{k}" for k in ("integration", "integration_sampled", "bridge_klock", "bridge_gamma",
                                                 "total_klock", "total_gamma")], logged)]),
        ("Per-layer heat maps", _media("layer x step heat maps", sorted(k for k in logged if k.startswith("layers/")
                                                                        and k != "layers/table"))),
        ("Backbone and rank collapse, with their nulls", [
            *[p for g in backbone for p in _line(
                f"{g}: backbone fraction beside its random-walk null",
                [f"backbone/{g}/fraction", f"backbone/{g}/fraction_null"], logged)],
            *[p for g in backbone for p in _line(
                f"{g}: per-step |cos| with the backbone, and the independent floor",
                [f"backbone/{g}/update_cos", f"backbone/{g}/grad_cos", f"backbone/{g}/cos_floor"], logged)],
            *_line("stable rank, mean over layers", [f"ranks/all/{k}/stable_rank" for k in ("q", "k", "kq", "outer")],
                   logged),
            *_line("top-direction share, mean over layers", [f"ranks/all/{k}/top_share" for k in ("q", "k", "kq", "outer")],
                   logged),
        ]),
        ("Report figures", _media("the report's figures", sorted(k for k in logged if k.startswith("figures/")))),
    ]
    return [(name, panels) for name, panels in sections if panels]


def _media(title: str, keys: list[str]) -> list[Panel]:
    return [Panel(kind="media", title=title, keys=keys)] if keys else []


def build_workspace(entity: str, project: str, logged: Iterable[str], *, run: str | None = None,
                    name: str = "weight forces"):
    """The ``wandb_workspaces`` Workspace of :func:`view_sections` (no network until ``.save()``)."""
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws

    sections = []
    for i, (title, panels) in enumerate(view_sections(logged)):
        made = []
        for p in panels:
            if p["kind"] == "media":
                made.append(wr.MediaBrowser(title=p["title"], media_keys=p["keys"], num_columns=2))
            else:
                made.append(wr.LinePlot(title=p["title"], x=X, y=p["keys"],
                                        plot_type="stacked-area" if p["kind"] == "stacked" else "line"))
        sections.append(ws.Section(name=title, panels=made, is_open=i < 3))
    runset = ws.RunsetSettings(filters=ws.And(ws.Metric("ID") == run)) if run else ws.RunsetSettings()
    return ws.Workspace(entity=entity, project=project, name=name, sections=sections,
                        settings=ws.WorkspaceSettings(x_axis=X), runset_settings=runset)


def workspace_json(workspace) -> str:
    """The workspace as W&B stores it (its internal view model), without network access."""
    return json.dumps(json.loads(workspace._to_model().model_dump_json(by_alias=True)), indent=1)


def keys_from_run_dir(path: str | Path) -> set[str]:
    """The W&B keys a run logged, from ``<run>/weightforces/wandb_keys.json`` (or that file or its folder)."""
    path = Path(path)
    for candidate in (path, path / KEYS_FILE, path / "weightforces" / KEYS_FILE):
        if candidate.is_file():
            try:
                data = json.loads(candidate.read_text())
                return set(data["keys"])
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{candidate}: not a {KEYS_FILE} ({exc})") from exc
    raise ValueError(f"{path}: no {KEYS_FILE} (train with report_to wandb and this version of the callback)")


def keys_from_api(entity: str, project: str, run: str | None) -> set[str]:
    """The keys of ``run`` (or of the project's most recent runs) from the W&B API (network)."""
    import wandb

    api = wandb.Api()
    runs = [api.run(f"{entity}/{project}/{run}")] if run else list(api.runs(f"{entity}/{project}", per_page=20))[:20]
    keys: set[str] = set()
    for r in runs:
        keys |= set(r.summary.keys())
        keys |= set((getattr(r, "history_keys", None) or {}).get("keys", {}))
    return keys
