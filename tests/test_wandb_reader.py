"""The test helper ``wandb_reader`` reads back a real offline W&B run exactly as it was logged."""

from __future__ import annotations

import pytest
from wandb_reader import (
    find_run_files,
    is_finished,
    iter_records,
    read_config,
    read_history,
    read_summary,
)

wandb = pytest.importorskip("wandb")


@pytest.fixture
def offline_env(tmp_path, monkeypatch):
    """An offline W&B setup writing under ``tmp_path``.

    wandb reads ``WANDB_DIR``/``WANDB_MODE`` once per process (when its singleton is set up), so a
    later run in the same process would otherwise land in the first test's folder:
    ``wandb.teardown()`` before and after makes each test start fresh.
    """
    wandb.teardown()
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))
    yield tmp_path
    wandb.teardown()


def _user_keys(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith("_")}


def test_reads_back_offline_run(offline_env):
    big = "x" * 70_000  # one record longer than two 32 KiB blocks: FIRST/MIDDLE/LAST pieces
    run = wandb.init(project="wandb-reader-test", config={"lr": 0.5, "name": "demo"})
    run.log({"loss": 2.0, "acc": 0.25})
    run.log({"extra": 7, "group": {"inner": 1.5}}, commit=False)
    run.log({"loss": 1.0})
    run.log({"text": big, "loss": 0.5})
    run.log({"loss": 0.25, "flag": True, "items": [1, 2, 3]})
    run.summary["best"] = 0.125
    run.config.update({"later": "yes"})
    wandb.finish()

    files = find_run_files(offline_env)
    assert len(files) == 1
    assert files[0].name == f"run-{run.id}.wandb"
    assert files[0].parent.name.startswith("offline-run-")
    assert find_run_files(offline_env / "wandb") == files

    rows = read_history(files[0])
    assert [row["_step"] for row in rows] == [0, 1, 2, 3]
    assert [_user_keys(row) for row in rows] == [
        {"loss": 2.0, "acc": 0.25},
        # the commit=False keys landed in the row of the next committing call
        {"extra": 7, "group/inner": 1.5, "loss": 1.0},
        {"text": big, "loss": 0.5},
        {"loss": 0.25, "flag": True, "items": [1, 2, 3]},
    ]
    assert all(isinstance(row["_timestamp"], float) for row in rows)

    summary = read_summary(files[0])
    assert summary["best"] == 0.125
    assert summary["loss"] == 0.25
    assert summary["group/inner"] == 1.5

    config = read_config(files[0])
    assert {k: config[k] for k in ("lr", "name", "later")} == {
        "lr": 0.5,
        "name": "demo",
        "later": "yes",
    }

    assert is_finished(files[0])
    kinds = {record.WhichOneof("record_type") for record in iter_records(files[0])}
    assert {"run", "history", "summary", "exit"} <= kinds


def test_rejects_corruption(offline_env):
    run = wandb.init(project="wandb-reader-test")
    run.log({"loss": 1.0})
    wandb.finish()
    (path,) = find_run_files(offline_env)
    assert len(read_history(path)) == 1  # waits until wandb-core has written the whole file
    data = bytearray(path.read_bytes())

    bad = offline_env / "bad.wandb"
    data[20] ^= 0xFF  # inside the first record's payload
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="crc"):
        read_history(bad)

    truncated = offline_env / "truncated.wandb"  # a run cut short: no exit record
    truncated.write_bytes(path.read_bytes()[:200])
    assert not is_finished(truncated)
    assert read_history(truncated, wait=0) == []
    with pytest.raises(TimeoutError):
        read_history(truncated, wait=0.2)

    bad.write_bytes(b"not a wandb file")
    with pytest.raises(ValueError, match="header"):
        read_history(bad)

    assert find_run_files(offline_env / "nothing-here") == []
