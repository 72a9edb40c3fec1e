"""The W&B dashboard of a real run: a 12-layer GPT-NeoX trained with the callback's defaults,
read back from its offline run file.  Sections stay small, per-layer quantities are heat maps and
a table, the report's figures are media, the summary says how the run went, and metrics.jsonl
keeps every key under its old name."""

from __future__ import annotations

import collections
import json

import pytest
from dashboard_run import LOGGING_STEPS, STEPS, dashboard_run
from wandb_reader import find_run_files, read_config, read_history, read_summary

from hf_weightforces.integrations.wandb_layout import Dashboard, place, scalar_keys

pytest.importorskip("wandb")


def charts(history: list[dict]) -> dict[str, str]:
    """Logged key -> kind (``scalar``, or the media ``_type``); a media value reads back as
    nested keys ``<key>/_type``, ``<key>/path``, ... and counts as one chart."""
    keys = set().union(*history)
    media = {k[: -len("/_type")] for k in keys if k.endswith("/_type")}
    out = {}
    for row in history:
        for k in row:
            owner = next((m for m in media if k.startswith(m + "/")), None)
            if owner is not None:
                out[owner] = row.get(owner + "/_type", out.get(owner))
            elif not k.startswith("_"):
                out[k] = "scalar"
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = dashboard_run(tmp_path_factory)
    (run_file,) = find_run_files(folder)
    history = read_history(run_file)
    return folder, history, read_summary(run_file), read_config(run_file)


@pytest.mark.slow
def test_sections_stay_small_and_layers_are_heat_maps(run):
    folder, history, _, config = run
    logged = charts(history)
    sections = collections.Counter(k.split("/")[0] for k in logged)
    assert max(sections.values()) <= 60, sections
    assert {"forces", "shares", "health", "scale", "weibull", "layers", "figures"} <= set(sections)
    assert "weightforces" not in sections  # every default key has a section
    assert not [k for k in logged if "layer_" in k]  # no per-layer charts by default
    assert logged["layers/align"] == "image-file" and logged["layers/align_share"] == "image-file"
    assert logged["layers/table"] == "table-file"
    assert config["weightforces"]["layer_11/numel"] > 0  # constants in the config, not in charts
    rows = [json.loads(line) for line in (folder / "weightforces" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == STEPS // LOGGING_STEPS and "weightforces/layer_11/align" in rows[-1]  # jsonl complete
    # the loss rows carry the renamed keys at the loss steps
    loss_rows = [r for r in history if "train/loss" in r]
    assert [r["train/global_step"] for r in loss_rows] == list(range(LOGGING_STEPS, STEPS + 1, LOGGING_STEPS))
    for r, jsonl in zip(loss_rows, rows):
        for key in ("weightforces/total/align", "weightforces/selection/closure_rel", "weightforces/total/rms"):
            assert r[place(key).key] == pytest.approx(jsonl[key], rel=1e-12)


@pytest.mark.slow
def test_figures_and_summary_values(run):
    folder, history, summary, _ = run
    logged = charts(history)
    assert {"figures/forces", "figures/shares", "figures/weibull", "figures/layers"} <= set(logged)
    assert all(logged[k] == "image-file" for k in logged if k.startswith("figures/"))
    rows = [json.loads(line) for line in (folder / "weightforces" / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    assert summary["final/total/align_share"] == pytest.approx(last["weightforces/total/align_share"])
    assert summary["final/matrices/weibull_k"] == pytest.approx(last.get("weightforces/matrices/weibull_k")
                                                                 or rows[0]["weightforces/matrices/start_weibull_k"])
    worst = max((abs(r[k]), k.split("/")[1], r["step"]) for r in rows for k in r
                if k.endswith("/closure_rel") and k.count("/") == 2 and "layer_" not in k and r[k] is not None)
    assert summary["final/worst_closure_rel"] == pytest.approx(worst[0])
    assert (summary["final/worst_closure_aggregate"], summary["final/worst_closure_step"]) == worst[1:]
    assert summary["final/budget_steps"] == STEPS and summary["final/skipped_steps"] == 0
    assert not any("coords" in k or k.endswith("/numel") for k in summary)


def test_key_map():
    table = {
        "weightforces/total/align": ("scalar", "forces/total/align"),
        "weightforces/matrices/weibull_k": ("scalar", "weibull/matrices/weibull_k"),
        "weightforces/embedding/offset_total_klock": ("scalar", "offset/embedding/offset_total_klock"),
        "weightforces/other/closure_rel": ("scalar", "health/other/closure_rel"),
        "weightforces/total/rounding": ("scalar", "health/total/rounding"),
        "weightforces/value/inject_share": ("scalar", "shares/value/inject_share"),
        "weightforces/frozen/rms": ("scalar", "scale/frozen/rms"),
        "weightforces/skipped_steps": ("scalar", "health/skipped_steps"),
        "weightforces/backbone/total/fraction_null": ("scalar", "backbone/total/fraction_null"),
        "weightforces/backbone/total/coords": ("config", "backbone/total/coords"),
        "weightforces/rank/all/kq/stable_rank": ("scalar", "ranks/all/kq/stable_rank"),
        "weightforces/total/numel": ("config", "total/numel"),
        "weightforces/layer_07/align": ("grid", "layer_align/layer_07"),
        "weightforces/decoder_layer_03/decay": ("grid", "layer_decay/decoder_layer_03"),
        "weightforces/rank/layer_02/kq/top_share": ("grid", "layer_rank_kq_top_share/layer_02"),
        "weightforces/rank/layer_02/kq/head_01/top_share": ("heads", "layer_rank_kq_heads_top_share/layer_02/head_01"),
        "weightforces/matrix/gpt_neox.layers.0.mlp.dense_h_to_4h.weight/weibull_k":
            ("grid", "matrix_weibull_k/gpt_neox.layers.0.mlp.dense_h_to_4h.weight"),
        "weightforces/total/something_new": ("scalar", "weightforces/total/something_new"),
        "train/loss": ("scalar", "train/loss"),
    }
    for key, (kind, name) in table.items():
        p = place(key)
        assert (p.kind, p.key) == (kind, name), key
    assert place("weightforces/layer_07/align")[2:] == ("layers", "layer_07", "align")


def test_sections_at_24_layers_with_every_optional_key():
    """A row of a 24-layer model with Weibull, offsets, super weights and both probes: no section
    over 60 charts by default; per-layer charts on request, one section per quantity."""
    aggs = ["transmission", "selection", "value", "embedding", "other", "matrices", "adapters", "total"]
    forces = ["align", "inject", "decay", "rest", "delta", "align_post", "closure", "closure_rel", "rounding",
              "decay_ratio", "align_share", "inject_share", "decay_share", "nonfinite_steps", "norm2", "rms", "numel",
              "align_no_super", "align_share_no_super", "super_weights"]
    weibull = ["weibull_k", "weibull_scale", "weibull_r2", "weibull_ks", "weibull_scale_over_rms", "start_weibull_k",
               "start_weibull_scale", "rms_pred", "rms_pred_sampled", "offset_integration", "offset_integration_sampled",
               "offset_bridge_gamma", "offset_bridge_klock", "offset_total_gamma", "offset_total_klock",
               "offset_total_klock_sampled", "weibull_k_no_super", "weibull_scale_no_super"]
    backbone = ["fraction", "fraction_null", "fraction_score", "stability", "stability_null", "msd_ratio", "cos_floor",
                "snapshots", "coords", "update_cos", "grad_cos"]
    row = {f"weightforces/{g}/{f}": 1.0 for g in aggs for f in forces}
    row.update({f"weightforces/{g}/{f}": 1.0 for g in aggs if g not in ("other", "total") for f in weibull})
    classes = ["transmission", "selection", "value", "embedding", "other", "total"]  # the backbone's blocks
    row.update({f"weightforces/backbone/{g}/{f}": 1.0 for g in classes for f in backbone})
    row.update({f"weightforces/rank/all/{k}/{s}": 1.0 for k in ("q", "k", "kq", "outer")
                for s in ("stable_rank", "effective_rank", "top_share")})
    row.update({f"weightforces/layer_{n:02d}/{f}": 1.0 for n in range(24) for f in forces})
    row.update({f"weightforces/rank/layer_{n:02d}/{r}/{s}": 1.0 for n in range(24) for r in ("q", "k", "kq", "kq/head_00")
                for s in ("stable_rank", "top_share")})
    row.update({"weightforces/steps": 1.0, "weightforces/skipped_steps": 0.0, "weightforces/backbone/start_step": 0.0})
    default = collections.Counter(k.split("/")[0] for k in scalar_keys(row))
    assert max(default.values()) <= 60, default
    wide = collections.Counter(k.split("/")[0] for k in scalar_keys(row, layer_scalars=True))
    assert wide["layer_align"] == 24 and max(wide.values()) <= 60, wide


def test_dashboard_settings_fail_fast():
    from hf_weightforces import WeightForcesCallback

    for bad in ({"heatmap_every": -1}, {"max_columns": 1}, {"figures_every": 1.5}):
        with pytest.raises(ValueError, match="Dashboard"):
            Dashboard(**bad)
    with pytest.raises(ValueError, match="dashboard must be a Dashboard"):
        WeightForcesCallback(dashboard={"heatmap_every": 10})
