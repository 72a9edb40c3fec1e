"""One real Trainer run shared by the dashboard tests: a 12-layer GPT-NeoX (tiny width) trained
with the callback's defaults, reporting to an offline W&B run, TensorBoard and a local MLflow store."""

from __future__ import annotations

import os
from pathlib import Path

_RUNS: dict[str, Path] = {}
STEPS, LOGGING_STEPS = 8, 4


def dashboard_run(tmp_path_factory) -> Path:
    """The run folder (trained once per test session)."""
    if "run" not in _RUNS:
        from conftest import tiny_model, train_tiny

        from hf_weightforces import WeightForcesCallback

        folder = tmp_path_factory.mktemp("dashboard")
        report_to = ["wandb", "tensorboard"]
        try:
            import mlflow  # noqa: F401

            os.environ["MLFLOW_TRACKING_URI"] = (folder / "mlruns").as_uri()
            os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
            os.environ["MLFLOW_EXPERIMENT_NAME"] = "weightforces-test"
            report_to.append("mlflow")
        except ImportError:
            pass
        model = tiny_model(0, num_hidden_layers=12, hidden_size=32, intermediate_size=64)
        train_tiny(folder, [WeightForcesCallback()], max_steps=STEPS, logging_steps=LOGGING_STEPS,
                   report_to=report_to, model=model)
        _RUNS["run"] = folder
    return _RUNS["run"]
