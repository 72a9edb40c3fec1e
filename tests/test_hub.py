"""Hub revisions as input: a local cache in the hub's own layout (refs, snapshots, blobs) holding six
revisions of a tiny GPT-NeoX, read offline by lambda, spline (with the Pythia preset), geometry and fit;
revision lists, steps from names, --delete-after, errors, and the Pythia schedule preset."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from hub_cache import add_revision, train_revisions
from safetensors import safe_open
from test_scale import run_cli

from hf_weightforces.analysis.hub import HubCheckpoints, HubError, parse_revisions, revision_step
from hf_weightforces.analysis.presets import PRESETS, get_preset, preset_for_repo
from hf_weightforces.core.weibull import fit_weibull

REPO = "EleutherAI/pythia-160m"  # tiny weights under a Pythia name: the preset is inferred from it
STEPS = [0, 5, 10, 15, 20, 25]


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """HF_HOME/hub holds the six revisions; HF_HUB_OFFLINE=1 for the whole module."""
    root = tmp_path_factory.mktemp("hub")
    saved = train_revisions(root / "local", STEPS)
    for step, folder in saved.items():
        add_revision(root / "hf_home" / "hub", REPO, f"step{step}", folder)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HOME", str(root / "hf_home"))
        mp.delenv("HF_HUB_CACHE", raising=False)
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield {"root": root, "local": saved, "cache": root / "hf_home" / "hub"}


@pytest.mark.parametrize("spec, expected", [
    ("step0,step512,step1000", ["step0", "step512", "step1000"]),
    ("step1000:step4000:1000", ["step1000", "step2000", "step3000", "step4000"]),
    ("step1000:step3500:1000", ["step1000", "step2000", "step3000"]),
    ("step0,step1000:step2000:1000", ["step0", "step1000", "step2000"]),
    ("1000:3000:1000", ["1000", "2000", "3000"]),
])
def test_parse_revisions(spec, expected):
    assert parse_revisions(spec) == expected


@pytest.mark.parametrize("spec", ["step1000:step143000", "step1000:ckpt2000:1000", "step2000:step1000:1000",
                                  "step0:step10:0", "step0,,step1", "step0,step0"])
def test_parse_revisions_rejects(spec):
    with pytest.raises(HubError):
        parse_revisions(spec)


@pytest.mark.parametrize("name, step", [("step0", 0), ("step143000", 143000), ("step1000-tokens4B", 1000),
                                        ("stage1-step2000-tokens8B", 2000), ("1500", 1500), ("main", None)])
def test_revision_step(name, step):
    assert revision_step(name) == step


def test_lambda_from_repo_equals_local_fits(hub):
    code, out, err = run_cli(["lambda", REPO, "--revisions", "step0:step25:5", "--json"])
    assert code == 0, err
    data = json.loads(out)
    assert [c["step"] for c in data["checkpoints"]] == STEPS
    assert data["checkpoints"][0]["path"] == f"{REPO}@step0"
    assert "step25: resolving" in err  # progress on stderr
    name = "gpt_neox.layers.1.mlp.dense_h_to_4h.weight"
    for step in (0, 15, 25):
        with safe_open(str(hub["local"][step] / "model.safetensors"), framework="pt") as f:
            ref = fit_weibull(f.get_tensor(name))
        point = next(p for p in data["points"] if p["name"] == name and p["step"] == step)
        assert point["k"] == pytest.approx(ref.k, rel=1e-12) and point["lambda"] == pytest.approx(ref.scale, rel=1e-12)


def test_spline_uses_the_pythia_preset_inferred_from_the_repo_id(hub):
    code, out, err = run_cli(["spline", REPO, "--revisions", "step0:step25:5", "--json"])
    assert code == 0, err
    data = json.loads(out)
    assert data["schedule"].startswith("preset pythia-160m: peak lr 0.0006, 1430 warm-up steps")
    assert [c["step"] for c in data["checkpoints"]] == STEPS
    means = data["interval_means"]["transmission"]["spline"]
    assert len(means) == 5 and all(math.isfinite(v) for v in means)
    code, out, _ = run_cli(["spline", REPO, "--revisions", "step0:step25:5", "--preset", "pythia-70m"])
    assert code == 0 and "lr and weight decay: preset pythia-70m" in out


def test_geometry_and_fit_from_repo(hub):
    code, out, err = run_cli(["geometry", REPO, "--revisions", "step0:step25:5", "--json", "--no-ranks"])
    assert code == 0, err
    data = json.loads(out)
    assert data["steps"] == STEPS and data["paths"][-1] == f"{REPO}@step25" and data["layout"] == "gpt_neox"
    code, out, err = run_cli(["fit", REPO, "--revisions", "step0,step25", "--json"])
    assert code == 0, err
    reports = json.loads(out)
    assert [r["revision"] for r in reports] == [f"{REPO}@step0", f"{REPO}@step25"]


def test_delete_after_keeps_one_revision_on_disk(hub, tmp_path):
    from hf_weightforces.analysis.scale import scale_trajectory

    cache = tmp_path / "cache"
    shutil.copytree(hub["cache"], cache, symlinks=True)
    snapshots = cache / ("models--" + REPO.replace("/", "--")) / "snapshots"
    holder: list[HubCheckpoints] = []
    checks = []

    def progress(line: str) -> None:
        if line.endswith("resolving"):  # the revision read before this one is already gone
            read = [c.resolved for c in holder[0] if c.resolved is not None]
            checks.append(len(read))
            assert not any(p.exists() for p in read)

    revs = [f"step{s}" for s in STEPS]
    with HubCheckpoints(REPO, revs, delete_after=True, cache_dir=cache, progress=progress) as source:
        holder.append(source)
        traj = scale_trajectory(source, per_matrix=False)
        read = [c.resolved for c in source]
        assert read[-1].exists() and not any(p.exists() for p in read[:-1])
    assert checks == [0, 1, 2, 3, 4, 5]
    # every revision left the cache after it was read (huggingface_hub drops the emptied repo folder)
    assert not snapshots.exists() or not any(snapshots.iterdir())
    assert not any(p.exists() for p in read)
    kept = scale_trajectory(HubCheckpoints(REPO, revs, cache_dir=hub["cache"]), per_matrix=False)
    assert json.dumps([p.to_dict() for p in traj.points]) == json.dumps([p.to_dict() for p in kept.points])


def test_report_from_repo_draws_lambda_with_the_preset_target(hub, tmp_path):
    code, out, err = run_cli(["report", REPO, "--revisions", "step0:step25:5", "--out", str(tmp_path)])
    assert code == 0, err
    assert (tmp_path / "dynamics.png").stat().st_size > 10_000
    assert "schedule: preset pythia-160m" in out and "transmission phases (checkpoints λ): rise" in out


def test_diagnose_from_repo(hub):
    code, out, err = run_cli(["diagnose", REPO, "--revisions", "step0,step25", "--json", "--sample", "2000"])
    assert code == 0, err
    first, last = json.loads(out)
    assert (first["source"], last["source"]) == (f"{REPO}@step0", f"{REPO}@step25")
    init = [m for m in first["matrices"] if m["group"] == "transmission"]
    assert init and all(abs(m["k"] - 1.2054) < 0.03 for m in init)  # Gaussian initialisation
    code, _, err = run_cli(["diagnose", REPO])  # no --revisions: main, which this cache does not hold
    assert code == 2 and f"{REPO}@main: cannot fetch this revision" in err


@pytest.mark.parametrize("argv, needle", [
    (["lambda", REPO, "--revisions", "step0,step7"], "@step7: cannot fetch this revision (HF_HUB_OFFLINE is set"),
    (["lambda", REPO, "--revisions", "step0:step25"], "expected START:STOP:STRIDE"),
    (["lambda", REPO], "give --revisions"),
    (["lambda", REPO, "--revisions", "main,step5"], "cannot tell the training step"),
    (["spline", REPO, "--revisions", "step0:step25:5", "--preset", "gpt-9"], "unknown schedule preset 'gpt-9'"),
    (["spline", REPO, "--revisions", "step0:step25:5", "--preset", "pythia-70m", "--lr", "1e-3",
      "--total-steps", "30"], "choose one"),
])
def test_bad_input_is_one_error_line(hub, tmp_path, argv, needle):
    code, out, err = run_cli(argv)
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and needle in lines[0], err
    code, _, err = run_cli(["lambda", str(tmp_path), "--revisions", "step0"])
    assert code == 2 and "needs one Hub repository id" in err


def test_cli_process_reads_the_environment(hub):
    """A fresh interpreter: HF_HOME and HF_HUB_OFFLINE come from the environment only."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "hf_weightforces.cli", "lambda", REPO, "--revisions",
                           "step0,step25", "--groups-only", "--json"], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert [c["step"] for c in json.loads(proc.stdout)["checkpoints"]] == [0, 25]


def test_pythia_preset_schedule():
    p = get_preset("pythia-160m")
    sched = p.schedule()
    assert sched.first_step == 1 and sched.last_step == 143_000 and sched.groups == 2
    lr = sched.lr[:, 0]
    ref = {1: 0.0, 2: 6e-4 / 1430, 1431: 6e-4, 1432: 3e-4 * (1 + math.cos(math.pi / 143_000)), 143_000: 6e-5}
    for step, value in ref.items():
        assert lr[step - 1] == pytest.approx(value, rel=1e-12, abs=1e-18), step
    assert np.all(np.diff(lr[1430:]) <= 0) and lr[1430:].min() == pytest.approx(6e-5)  # cosine, clipped
    assert np.array_equal(sched.weight_decay[0], [0.1, 0.0])
    assert {n: PRESETS[n].peak_lr for n in ("pythia-70m", "pythia-410m", "pythia-1b", "pythia-12b")} == {
        "pythia-70m": 1e-3, "pythia-410m": 3e-4, "pythia-1b": 2.5e-4, "pythia-12b": 1.2e-4}


@pytest.mark.parametrize("repo, preset", [("EleutherAI/pythia-160m", "pythia-160m"),
                                          ("EleutherAI/pythia-1.4b-deduped", "pythia-1.4b"),
                                          ("EleutherAI/pythia-160m-v0", None), ("allenai/OLMo-1B", None)])
def test_preset_for_repo(repo, preset):
    assert preset_for_repo(repo) == preset
