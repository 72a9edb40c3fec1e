"""Backbone and rank probes inside real Trainer runs, the offline ``geometry`` command and the flags."""

from __future__ import annotations

import json
import math
import shutil
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_model, train_tiny
from transformers import HfArgumentParser, TrainingArguments

from hf_weightforces import WeightForcesArguments, WeightForcesCallback
from hf_weightforces.core.geometry import key_query_singular_values, spectrum, split_qkv, stable_rank
from hf_weightforces.core.groups import Grouping, layer_index
from hf_weightforces.core.monitor import ParamInfo
from hf_weightforces.distributed import Backend, ShardContext
from hf_weightforces.integrations.probes import BackboneProbe, RankProbe

B = "weightforces/backbone/"
R = "weightforces/rank/"


@pytest.fixture(scope="module")
def probed_run(tmp_path_factory):
    """40 AdamW steps with both probes, logging and checkpoints every 10 steps."""
    from hf_weightforces.integrations.sinks import read_jsonl

    out = tmp_path_factory.mktemp("probed")
    probes = [BackboneProbe(every=10, snapshot_every=5), RankProbe(every=10)]
    trainer = train_tiny(out, [WeightForcesCallback(per_layer=False, weibull_every=0, probes=probes)],
                         max_steps=40, logging_steps=10, save_strategy="steps", save_steps=10)
    return out, trainer, probes, read_jsonl(out / "weightforces" / "metrics.jsonl")


@pytest.mark.slow
def test_updates_align_with_the_backbone_far_more_than_gradients(probed_run):
    _, _, probes, rows = probed_run
    assert [r["step"] for r in rows] == [10, 20, 30, 40]
    first = rows[0]
    classes = [g for g in ("transmission", "selection", "embedding", "other") if f"{B}{g}/fraction" in first]
    assert classes == ["transmission", "selection", "embedding", "other"]
    for name in classes + ["total"]:
        for key in ("fraction", "fraction_null", "fraction_score", "stability", "stability_null", "msd_ratio",
                    "cos_floor", "snapshots", "coords"):
            assert f"{B}{name}/{key}" in first, (name, key)
    assert first[f"{B}total/snapshots"] == 2 and math.isnan(first[f"{B}total/stability"])
    assert first[f"{B}total/coords"] == sum(first[f"{B}{g}/coords"] for g in classes)
    assert f"{B}total/update_cos" not in first  # no backbone before the first estimate
    for r in rows[1:]:
        upd, grad, floor = r[f"{B}total/update_cos"], r[f"{B}total/grad_cos"], r[f"{B}total/cos_floor"]
        # the published contrast: updates follow the backbone, per-batch gradients barely do
        assert upd > 3 * grad, (r["step"], upd, grad)
        assert grad > 3 * floor  # ... though still above an independent direction
        assert 0 < r[f"{B}total/fraction_null"] < 1
        assert r[f"{B}total/fraction"] > r[f"{B}total/fraction_null"]
        assert r[f"{B}total/msd_ratio"] > 1  # AdamW moves more coherently than a random walk
        assert r[f"{B}start_step"] == 0
    assert probes[0].memory_bytes() < 50 * 2**20


@pytest.mark.slow
def test_rank_rows_and_key_query_collapse(probed_run):
    out, trainer, _, rows = probed_run
    heads = trainer.model.config.num_attention_heads
    head_dim = trainer.model.config.hidden_size // heads
    for r in rows:
        for layer in ("layer_00", "layer_01"):
            for role in ("q", "k", "v", "kq", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"):
                for stat in ("stable_rank", "effective_rank", "top_share"):
                    assert f"{R}{layer}/{role}/{stat}" in r, (layer, role, stat)
            for h in range(heads):
                assert 1 <= r[f"{R}{layer}/kq/head_{h:02d}/stable_rank"] <= head_dim
            assert f"{R}{layer}/qkv/stable_rank" not in r  # split, not reported whole
        for kind in ("q", "k", "kq", "outer"):
            assert f"{R}all/{kind}/stable_rank" in r
    # the last row's values are the final weights'
    attn = trainer.model.gpt_neox.layers[1].attention
    wq, wk, _ = split_qkv(attn.query_key_value.weight.detach().double(), "gpt_neox", heads)
    sv = key_query_singular_values(wq, wk)
    assert rows[-1][f"{R}layer_01/kq/stable_rank"] == pytest.approx(float(stable_rank(sv).mean()), rel=1e-4)
    dense = spectrum(trainer.model.gpt_neox.layers[1].mlp.dense_4h_to_h.weight.detach().double())
    assert rows[-1][f"{R}layer_01/mlp.dense_4h_to_h/effective_rank"] == pytest.approx(dense.effective_rank, rel=1e-4)


@pytest.mark.slow
def test_offline_geometry_reads_the_same_keys_from_checkpoints(probed_run, capsys):
    from hf_weightforces.analysis.geometry import geometry_from_checkpoints
    from hf_weightforces.cli import main

    out, _, _, rows = probed_run
    report = geometry_from_checkpoints([out])
    assert report.steps == [10, 20, 30, 40] and report.reference_step == 10
    assert report.null_schedule == "schedule.jsonl" and report.layout == "gpt_neox" and report.num_heads == 4
    live = {r["step"]: r for r in rows}
    for row in report.rows:  # ranks: the same weights give the same numbers, live or offline
        ranks = {k: v for k, v in row.items() if k.startswith(R)}
        assert ranks
        for key, value in ranks.items():
            assert value == pytest.approx(live[row["step"]][key], rel=1e-4), key
    last = report.rows[-1]
    for key in ("fraction", "fraction_null", "stability", "stability_null", "cos_floor", "interval_cos"):
        assert f"{B}total/{key}" in last
    assert last[f"{B}total/interval_cos"] > 10 * last[f"{B}total/cos_floor"]
    assert main(["geometry", str(out), "--no-ranks"]) == 0
    table = capsys.readouterr().out
    assert "random-walk null schedule: schedule.jsonl" in table and "\n40 | " in table
    assert main(["geometry", str(out), "--json", "--per-head"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert f"{R}layer_00/kq/head_03/stable_rank" in data["rows"][0]
    assert main(["geometry", str(out / "checkpoint-10")]) == 2  # one checkpoint is no trajectory
    assert "at least two checkpoints" in capsys.readouterr().err


@pytest.mark.slow
def test_probes_never_change_training(tmp_path):
    def final(out, probes):
        cb = WeightForcesCallback(weibull_every=0, probes=probes)
        return {k: v.clone() for k, v in train_tiny(out, [cb], max_steps=8, logging_steps=4).model.state_dict().items()}

    plain = final(tmp_path / "plain", [])
    probed = final(tmp_path / "probed", [BackboneProbe(every=4, snapshot_every=2), RankProbe(every=4)])
    assert all(torch.equal(plain[k], probed[k]) for k in plain)


def _probe_setup(probe, model, optimizer):
    ctx = ShardContext(Backend.SINGLE)
    entries = ctx.entries(model, optimizer)
    grouping = Grouping()
    infos = [ParamInfo(e.name, grouping.classify(e.name, len(e.shape)), layer_index(e.name), e.numel) for e in entries]
    probe.setup(entries, infos, ctx, None, SimpleNamespace(global_step=0))


def test_rank_probe_splits_gpt2_heads_from_the_config():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=48, n_head=3, n_layer=2, vocab_size=64, n_positions=16, bos_token_id=None,
                     eos_token_id=None)
    model = GPT2LMHeadModel(cfg)
    probe = RankProbe(every=5)
    _probe_setup(probe, model, torch.optim.AdamW(model.parameters()))
    probe.on_gradients(1, model, None)
    assert (probe.num_heads, probe.layout) == (3, "gpt2")
    row = probe.collect(0)
    wq, wk, _ = split_qkv(model.transformer.h[1].attn.c_attn.weight.detach().double(), "gpt2", 3)
    sv = key_query_singular_values(wq, wk)
    for h in range(3):
        assert row[f"{R}layer_01/kq/head_{h:02d}/stable_rank"] == pytest.approx(float(stable_rank(sv[h])), rel=1e-4)
    assert {f"{R}layer_00/{m}/top_share" for m in ("attn.c_proj", "mlp.c_fc", "mlp.c_proj", "q", "k", "v")} <= row.keys()
    assert probe.collect(3) == {}  # not due before step 5
    assert probe.collect(5)


def test_backbone_probe_memory_is_bounded_by_its_settings():
    model = tiny_model()
    probe = BackboneProbe(coords=1000, capacity=8, every=4, snapshot_every=2)
    _probe_setup(probe, model, torch.optim.AdamW(model.parameters()))
    K = probe.tracker.K
    assert K <= 4 * 1000  # four classes present
    assert probe.tracker.stack.shape == (8, K)
    with torch.no_grad():
        for step in range(1, 5):  # an estimate at step 4 creates the directions
            for p in model.parameters():
                p.add_(0.01)
            probe.on_step(step, None, False)
    assert probe.collect(4)[f"{B}total/snapshots"] == 2  # the estimate is made at the log event
    assert probe.tracker.directions is not None

    def nbytes(obj) -> int:
        return sum(v.nbytes for v in vars(obj).values() if isinstance(v, torch.Tensor))

    held = nbytes(probe) + nbytes(probe.tracker) + sum(idx.nbytes for _, idx in probe._parts)
    assert held <= probe.memory_bytes() <= 110 * K  # the documented bound, about 4·K·(capacity + 2·5 + 3)
    assert json.loads(json.dumps(probe.state_dict()))["probe"] == "backbone"


def test_flags_make_the_probes():
    parser = HfArgumentParser((TrainingArguments, WeightForcesArguments))
    _, wf = parser.parse_args_into_dataclasses(
        ["--output_dir", "x", "--weight_forces", "--weight_forces_backbone_every", "50",
         "--weight_forces_backbone_snapshot_every", "5", "--weight_forces_rank_every", "200",
         "--weight_forces_rank_per_head", "false"]
    )
    (cb,) = wf.make_callbacks()
    backbone, rank = cb.probes
    assert (backbone.every, backbone.snapshot_every, backbone.coords) == (50, 5, 1 << 16)
    assert (rank.every, rank.per_head) == (200, False)
    assert WeightForcesArguments(weight_forces=True).make_callbacks()[0].probes == []
    with pytest.raises(ValueError, match="multiple of"):
        WeightForcesArguments(weight_forces_backbone_every=15, weight_forces_backbone_snapshot_every=10)
    with pytest.raises(ValueError, match="must be >= 0"):
        WeightForcesArguments(weight_forces_rank_every=-1)
    with pytest.raises(ValueError):
        BackboneProbe(every=10, snapshot_every=3)


def _backbone_cb():
    return WeightForcesCallback(per_layer=False, weibull_every=0,
                                probes=[BackboneProbe(every=4, snapshot_every=2, capacity=4)])


@pytest.fixture(scope="module")
def backbone_checkpoints(tmp_path_factory):
    """12 steps, estimates at 4, 8, 12, logs every 3 steps, checkpoints every 4: checkpoint-8 holds
    an estimate not logged yet and |cos| sums of steps 7-8; the stack (capacity 4) was thinned at 10."""
    from hf_weightforces.integrations.sinks import read_jsonl

    full = tmp_path_factory.mktemp("backbone_full")
    train_tiny(full, [_backbone_cb()], max_steps=12, logging_steps=3, save_strategy="steps", save_steps=4)
    return full, read_jsonl(full / "weightforces" / "metrics.jsonl")


def _resume_backbone(full, out):
    from transformers import GPTNeoXForCausalLM

    shutil.copytree(full / "checkpoint-8", out / "checkpoint-8")
    shutil.copytree(full / "weightforces", out / "weightforces")  # holds rows past the resume point
    # GPT-NeoX's head is not restored by resume_from_checkpoint alone (DISTRIBUTED.md): load the model
    model = GPTNeoXForCausalLM.from_pretrained(out / "checkpoint-8")
    train_tiny(out, [_backbone_cb()], model=model, max_steps=12, logging_steps=3, save_strategy="no",
               resume=str(out / "checkpoint-8"))


@pytest.mark.slow
def test_resumed_backbone_continues_the_trajectory(backbone_checkpoints, tmp_path, wf_rows, caplog):
    full, rows = backbone_checkpoints
    assert (full / "checkpoint-8" / "weightforces_probe_0.safetensors").is_file()
    with caplog.at_level("WARNING"):
        _resume_backbone(full, tmp_path)
    assert not [r for r in caplog.records if r.name.endswith(".probes") or "safetensors" in r.getMessage()]
    resumed = wf_rows(tmp_path)
    assert [r["step"] for r in resumed] == [r["step"] for r in rows] == [3, 6, 9, 12]
    for ra, rb in zip(rows[2:], resumed[2:]):
        keys = sorted(k for k in ra if k.startswith(B))
        assert keys == sorted(k for k in rb if k.startswith(B))
        assert f"{B}total/fraction" in keys and f"{B}total/update_cos" in keys
        for k in keys:
            if math.isnan(ra[k]):
                assert math.isnan(rb[k]), k
            else:
                assert rb[k] == pytest.approx(ra[k], rel=1e-6, abs=1e-12), k
        assert rb[f"{B}start_step"] == 0


@pytest.mark.slow
def test_resume_with_a_corrupt_backbone_file_warns_and_trains_on(backbone_checkpoints, tmp_path, wf_rows, caplog):
    full, _ = backbone_checkpoints
    corrupt = tmp_path / "corrupt"
    shutil.copytree(full, corrupt)
    (corrupt / "checkpoint-8" / "weightforces_probe_0.safetensors").write_bytes(b"\x10\x00\x00\x00not a header")
    out = tmp_path / "resumed"
    with caplog.at_level("WARNING"):
        _resume_backbone(corrupt, out)
    messages = [r.getMessage() for r in caplog.records]
    assert any("cannot use" in m and "weightforces_probe_0.safetensors" in m for m in messages)
    assert any("backbone probe: resuming at step 8" in m for m in messages)
    rows = wf_rows(out)
    assert [r["step"] for r in rows] == [3, 6, 9, 12]
    assert rows[-1][f"{B}start_step"] == 8 and math.isfinite(rows[-1][f"{B}total/fraction"])
