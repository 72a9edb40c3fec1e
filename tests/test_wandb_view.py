"""``hf-weightforces wandb-view --dry-run``: the workspace of a real offline run, every panel naming
only keys that run logged (read back from its W&B run file), without network access."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
from dashboard_run import dashboard_run
from test_wandb_layout import charts
from wandb_reader import find_run_files, read_history

from hf_weightforces.cli import main

pytest.importorskip("wandb_workspaces")


def run_cli(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def panel_keys(view: dict) -> list[tuple[str, str, list[str]]]:
    """(section, viewType, keys) of every panel in the workspace JSON."""
    out = []
    for section in view["spec"]["section"]["panelBankConfig"]["sections"]:
        for panel in section["panels"]:
            cfg = panel["config"]
            out.append((section["name"], panel["viewType"], cfg.get("metrics") or cfg.get("mediaKeys") or []))
    return out


@pytest.mark.slow
def test_dry_run_refers_only_to_logged_keys(tmp_path_factory):
    folder = dashboard_run(tmp_path_factory)
    (run_file,) = find_run_files(folder)
    logged = charts(read_history(run_file))
    code, out, err = run_cli(["wandb-view", "me/proj", "--run", "abc123", "--keys-from", str(folder), "--dry-run"])
    assert code == 0, err
    view = json.loads(out)
    assert view["entity"] == "me" and view["project"] == "proj"
    panels = panel_keys(view)
    sections = {name for name, _, _ in panels}
    assert {"Forces: A, I and D per class", "Shares of |A| + |I| + |D|", "A + D balance",
            "Health: closure and rounding", "Weibull k and λ/σ per class", "Per-layer heat maps",
            "Report figures"} <= sections
    for name, kind, keys in panels:
        assert keys, (name, kind)
        assert set(keys) <= set(logged), (name, set(keys) - set(logged))
        assert all(logged[k] == ("image-file" if kind == "Media Browser" else "scalar") for k in keys), name
    line = next(p for p in panels if p[0].startswith("Forces") and "forces/total/align" in p[2])
    assert line[2] == ["forces/total/align", "forces/total/inject", "forces/total/decay", "forces/total/rest"]
    stacked = [p for s in view["spec"]["section"]["panelBankConfig"]["sections"] for p in s["panels"]
               if s["name"].startswith("Shares")]
    assert all(p["config"]["plotType"] == "stacked-area" and p["config"]["xAxis"] == "train/global_step" for p in stacked)
    runset = view["spec"]["section"]["runSets"][0]["filters"]["filters"]
    assert runset[0]["value"] == "abc123"  # --run: this run only


def test_bad_input_is_one_error_line(tmp_path):
    for argv, message in ((["wandb-view", "noslash", "--dry-run", "--keys-from", str(tmp_path)], "ENTITY/PROJECT"),
                          (["wandb-view", "a/b", "--dry-run"], "--keys-from"),
                          (["wandb-view", "a/b", "--dry-run", "--keys-from", str(tmp_path)], "wandb_keys.json")):
        code, out, err = run_cli(argv)
        assert code == 2 and err.startswith("error:") and message in err and err.count("\n") == 1, err
    (tmp_path / "wandb_keys.json").write_text(json.dumps({"keys": ["train/loss"]}))
    code, _, err = run_cli(["wandb-view", "a/b", "--dry-run", "--keys-from", str(tmp_path)])
    assert code == 2 and "no weight-forces keys" in err
