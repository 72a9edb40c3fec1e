"""TensorBoard and MLflow get the aggregates' keys natively (no ``to_all_integrations``), at the
steps the Trainer writes the loss at, read back from the event files and the MLflow store."""

from __future__ import annotations

import json

import pytest
from dashboard_run import LOGGING_STEPS, STEPS, dashboard_run

from hf_weightforces.integrations.wandb_layout import place


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = dashboard_run(tmp_path_factory)
    rows = [json.loads(line) for line in (folder / "weightforces" / "metrics.jsonl").read_text().splitlines()]
    return folder, rows


AGGREGATE_KEYS = ("weightforces/total/align", "weightforces/transmission/inject_share",
                  "weightforces/selection/closure_rel", "weightforces/embedding/rms")


@pytest.mark.slow
def test_tensorboard_event_files_hold_the_aggregates_at_the_loss_steps(run):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder, rows = run
    (events,) = [p for p in (folder / "runs").iterdir() if p.is_dir()]
    acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    loss_steps = [e.step for e in acc.Scalars("train/loss")]
    assert loss_steps == list(range(LOGGING_STEPS, STEPS + 1, LOGGING_STEPS))
    for key in AGGREGATE_KEYS:
        name = place(key).key
        assert [e.step for e in acc.Scalars(name)] == loss_steps
        assert [e.value for e in acc.Scalars(name)] == pytest.approx([r[key] for r in rows], rel=1e-6, abs=1e-12)
    assert not [t for t in tags if "layer_" in t]  # per-layer values only on request
    assert not [t for t in tags if t.startswith("train/weightforces")]  # not via to_all_integrations


@pytest.mark.slow
def test_mlflow_run_holds_the_aggregates_at_the_loss_steps(run):
    pytest.importorskip("mlflow")
    import mlflow

    folder, rows = run
    client = mlflow.tracking.MlflowClient(tracking_uri=(folder / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("weightforces-test")
    (found,) = client.search_runs([experiment.experiment_id])
    loss_steps = [m.step for m in client.get_metric_history(found.info.run_id, "loss")]
    assert loss_steps == list(range(LOGGING_STEPS, STEPS + 1, LOGGING_STEPS))
    for key in AGGREGATE_KEYS:
        history = client.get_metric_history(found.info.run_id, place(key).key)
        assert [m.step for m in history] == loss_steps
        assert [m.value for m in history] == pytest.approx([r[key] for r in rows], rel=1e-12)
