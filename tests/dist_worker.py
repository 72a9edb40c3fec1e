"""Real Trainer runs of the tiny GPT-NeoX with the callback, under chosen backends, on CPU.

Launched by ``tests/test_distributed.py`` with a plan (a JSON list of runs), once per rank::

    python -m torch.distributed.run --nproc_per_node 2 tests/dist_worker.py OUT \
        '[{"name": "fsdp2", "backend": "fsdp2"}]'
    python tests/dist_worker.py OUT '[{"name": "ref", "backend": "single", "batch": 8}]'   # a reference

The runs of a plan share the processes (the imports cost more than the runs).  For each run,
every rank writes ``OUT/<name>/rank<r>.json`` (which backend really ran, what this rank holds,
the warnings it saw) and rank 0's callback writes ``OUT/<name>/weightforces/metrics.jsonl``.

The Trainer quietly runs DDP on CPU when asked for FSDP and turns DeepSpeed off with
``use_cpu=True``; :class:`TestTrainer` and :func:`deepspeed_setup` get the real thing
(DISTRIBUTED.md).  A run's keys (defaults in :data:`DEFAULTS`):

* ``unused``: add ``gpt_neox.unused_bias`` (2, 8), never used by the forward pass.  Its name puts
  it in the no-decay group, so backends that feed it zero gradients (FSDP1, ZeRO) leave it
  unchanged too (u = 0, λ = 0) and every backend's numbers stay equal to one process's.
* ``skip_at``: the optimizer step with this id is skipped.  ``skip``: ``"emulate"`` (the step is
  not taken and Accelerate's overflow flag is set, the way DeepSpeed skips), ``"nan"`` (a NaN loss:
  a real overflow skip under DeepSpeed), ``"scaler"`` (a GradScaler in the Accelerator and a NaN
  loss: a real skip, reported unless the AdamW is fused).
* ``fail_rank``, ``fail_at``, ``fail_where``: that rank's ``ShardContext.<fail_where>`` raises from
  step ``fail_at`` on.
* ``super``: the callback's ``super_weights``; ``probes``: a :class:`BackboneProbe` (an estimate at
  every log event, a snapshot every step) and a :class:`RankProbe` (at every log event; the
  attention geometry given, since DeepSpeed runs no hook that sees the model before a step).
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).resolve().parent))  # conftest's tiny model and data

DEFAULTS = {
    "backend": "single",
    "batch": 4,  # per device
    "max_steps": 6,
    "logging_steps": 3,
    "every": 1,
    "optim": "adamw_torch_fused",  # the Trainer's default
    "unused": False,
    "skip_at": 0,
    "skip": "emulate",
    "fail_rank": -1,
    "fail_at": 3,
    "fail_where": "views",
    "ds_scheduler": False,  # DeepSpeed: a WarmupLR in the DeepSpeed config instead of the Trainer's
    "super": 0,  # super_weights of the callback
    "probes": False,  # a BackboneProbe and a RankProbe, estimating at every log event
    "probe_fail_rank": -1,  # that rank's BackboneProbe raises in its step hook at optimizer step probe_fail_at
    "probe_fail_at": 4,
    "kernel": "auto",  # the callback's per-step pass
}


# ----------------------------------------------------------------------------- set-ups
def deepspeed_setup(stage: int, scheduler: bool = False) -> dict:
    """DeepSpeed on CPU through the Trainer: a pre-configured gloo state, no ``use_cpu``."""
    import deepspeed.ops
    from accelerate.state import AcceleratorState, PartialState

    # The CPU accelerator would JIT-compile a shared-memory all-reduce op (about a minute) on
    # first use; gloo does that job here.  Setting the probe's result also skips the probe.
    deepspeed.ops.__compatible_ops__ = {}
    AcceleratorState._reset_state(reset_partial_state=True)
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    PartialState(backend="gloo")
    config = {
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,  # keep the Trainer's torch AdamW
    }
    if scheduler:  # stepped inside DeepSpeed's engine.step, i.e. before on_optimizer_step
        config["scheduler"] = {"type": "WarmupLR", "params": {
            "warmup_min_lr": "auto", "warmup_max_lr": "auto", "warmup_num_steps": "auto", "warmup_type": "linear"}}
    return {"deepspeed": config, "accelerator_config": {"use_configured_state": True}}


def deepspeed_teardown() -> None:
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
    unset_hf_deepspeed_config()


def fsdp_args(version: int) -> dict:
    config = {"version": version, "transformer_layer_cls_to_wrap": ["GPTNeoXLayer"]}
    if version == 1:  # the forms FSDP1 accepts on CPU
        config.update(sync_module_states="false", reshard_after_forward="FULL_SHARD", use_orig_params="true")
    return {"fsdp": True, "fsdp_config": config, "use_cpu": True}


def trainer_class(run: dict):
    from transformers import Trainer

    backend, skip_at, skip = run["backend"], run["skip_at"], run["skip"]

    class TestTrainer(Trainer):
        """Forces FSDP on CPU and makes the requested step skip."""

        def create_accelerator_and_postprocess(self):
            super().create_accelerator_and_postprocess()
            if backend.startswith("fsdp"):
                from accelerate.state import PartialState
                from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

                st = self.accelerator.state
                st.fsdp_plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
                st.distributed_type = DistributedType.FSDP  # both states, or the next AcceleratorState() undoes it
                PartialState._shared_state["distributed_type"] = DistributedType.FSDP
                st.device = torch.device("cpu")  # FSDP1: the compute device must equal device_id
                PartialState._shared_state["device"] = torch.device("cpu")
                self.is_fsdp_enabled = True
            if skip_at and skip == "scaler":
                self.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=1.0, growth_interval=10**6)

        def compute_loss(self, model, inputs, *args, **kwargs):
            out = super().compute_loss(model, inputs, *args, **kwargs)
            if skip in ("nan", "scaler") and self.state.global_step + 1 == skip_at:
                nan = torch.tensor(float("nan"))
                out = (out[0] * nan, *out[1:]) if isinstance(out, tuple) else out * nan
            return out

    return TestTrainer


def helper_callbacks(cb, run: dict, rank: int) -> tuple[list, list]:
    """(callbacks before ours, callbacks after ours) for the run's scenario and its facts."""
    from transformers import TrainerCallback

    from hf_weightforces.core.optim import check_supported

    class Breaker(TrainerCallback):
        """This rank's reader raises from step ``fail_at`` on, as a broken backend would."""

        def on_step_begin(self, args, state, control, **kw):
            if state.global_step + 1 == run["fail_at"] and cb.ctx is not None:
                def boom(*a, **k):
                    raise RuntimeError(f"injected failure on rank {rank}")

                setattr(cb.ctx, run["fail_where"], boom)

    class EmulatedSkip(TrainerCallback):
        """Skip one step the way DeepSpeed does: no update, Accelerate's overflow flag set (so the
        Trainer does not step the scheduler either)."""

        def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kw):
            if state.global_step + 1 == run["skip_at"]:
                optimizer.optimizer.step = lambda *a, **k: None
                optimizer._is_overflow = True

        def on_step_end(self, args, state, control, optimizer=None, **kw):
            if state.global_step == run["skip_at"]:
                del optimizer.optimizer.step  # back to the class's method
                optimizer._is_overflow = False

    class Spy(TrainerCallback):
        """Right after each optimizer step: the skips seen, and which monitored parameters this
        rank's reader says were updated (a local piece with state that the step advanced)."""

        def on_optimizer_step(self, args, state, control, optimizer=None, **kw):
            if getattr(optimizer, "step_was_skipped", False):
                cb._test_skipped = getattr(cb, "_test_skipped", []) + [state.global_step + 1]
            if cb.ctx is None or not cb._active:
                return
            opt = check_supported(optimizer)
            cb._test_lrs = getattr(cb, "_test_lrs", []) + [
                [(float(g["lr"]), float(lr)) for g, lr in zip(opt.param_groups, cb.ctx.step_lrs(opt))]]
            views = cb.ctx.views(opt, cb._index_of)
            seen = {v.index for v in views}
            cb._test_views = views
            cb._test_not_updated = [e.name for i, e in enumerate(cb._entries) if i not in seen]

    class ProbeBreaker(TrainerCallback):
        """This rank's backbone probe raises in its step hook from step ``probe_fail_at`` on."""

        def on_step_begin(self, args, state, control, **kw):
            if state.global_step + 1 == run["probe_fail_at"]:
                def boom(*a, **k):
                    raise RuntimeError(f"injected probe failure on rank {rank}")

                cb._all_probes[0]._step = boom

    before = [Breaker()] if rank == run["fail_rank"] else []
    if rank == run["probe_fail_rank"]:
        before.append(ProbeBreaker())
    after = [Spy()]
    if run["skip_at"] and run["skip"] == "emulate":
        after.insert(0, EmulatedSkip())
    return before, after


def local_facts(cb, trainer) -> dict:
    """What this rank holds: the proof that the intended backend ran, and the edge cases seen."""
    from accelerate.state import AcceleratorState

    st = AcceleratorState()
    ctx = cb.ctx
    facts = {
        "distributed_type": str(st.distributed_type).split(".")[-1],
        "fsdp_version": getattr(getattr(st, "fsdp_plugin", None), "fsdp_version", None),
        "zero_stage": getattr(getattr(st, "deepspeed_plugin", None), "zero_stage", None),
        "model_wrapped": type(trainer.model_wrapped).__name__,
        "backend": ctx.backend.value if ctx else None,
        "rank": ctx.rank if ctx else None,
        "world_size": ctx.world_size if ctx else None,
        "active": cb._active,
        "skipped": getattr(cb, "_test_skipped", []),
        "not_updated_last_step": getattr(cb, "_test_not_updated", None),
        "lrs": getattr(cb, "_test_lrs", []),  # per step and group: (lr at on_optimizer_step, lr the step used)
    }
    if ctx is None:
        return facts
    try:
        weights = ctx.local_weights(cb._entries)
    except RuntimeError:  # the failure test broke this rank's reader on purpose
        return facts
    facts["empty_local"] = [e.name for e, w in zip(cb._entries, weights) if w.numel() == 0]
    facts["local_numel"] = int(sum(w.numel() for w in weights))
    facts["total_numel"] = int(sum(e.numel for e in cb._entries))
    views = getattr(cb, "_test_views", [])  # what this rank's budget read at the last step
    facts["view_numel"] = int(sum(v.weight.numel() for v in views))
    facts["view_tensors"] = len(views)
    for probe in cb._all_probes:
        if hasattr(probe, "tracker") and probe.tracker is not None:
            facts["backbone_local_coords"] = int(probe.tracker.K)
    facts["param_type"] = type(cb._entries[0].param).__name__
    if ctx.backend.value == "zero3":
        from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_optimizer_state

        mismatch = []  # our slices must be the very ones DeepSpeed's public helpers return
        for v in getattr(cb, "_test_views", []):
            p = cb._entries[v.index].param
            n = v.weight.numel()
            if not (torch.equal(safe_get_local_fp32_param(p)[:n], v.weight)
                    and torch.equal(safe_get_local_optimizer_state(p, "exp_avg")[:n], v.exp_avg)):
                mismatch.append(cb._entries[v.index].name)
        facts["helper_mismatch"] = mismatch
    return facts


# ----------------------------------------------------------------------------- one run
def run_one(run: dict, out: Path) -> None:
    from conftest import tiny_data, tiny_model
    from transformers import TrainingArguments

    from hf_weightforces import WeightForcesCallback

    backend = run["backend"]
    kw: dict = {}
    if backend.startswith("zero"):
        kw.update(deepspeed_setup(int(backend[-1]), run["ds_scheduler"]))
    elif backend.startswith("fsdp"):
        kw.update(fsdp_args(int(backend[-1])))
    else:
        kw["use_cpu"] = True
        if run["unused"]:
            kw["ddp_find_unused_parameters"] = True
    model = tiny_model(0)
    if run["unused"]:
        torch.manual_seed(1)
        model.gpt_neox.register_parameter("unused_bias", torch.nn.Parameter(torch.randn(2, 8)))
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=run["max_steps"],
        per_device_train_batch_size=run["batch"],
        learning_rate=2e-3,
        weight_decay=0.1,
        warmup_steps=2,
        logging_steps=run["logging_steps"],
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        data_seed=0,
        train_sampling_strategy="sequential",  # global batch k = blocks [kB, (k+1)B) at any world size
        dataloader_num_workers=0,
        optim=run["optim"],
        **kw,
    )
    probes = []
    if run["probes"]:
        from hf_weightforces.integrations.probes import BackboneProbe, RankProbe

        n = run["logging_steps"]
        probes = [BackboneProbe(every=n, snapshot_every=1, capacity=4, coords=20_000),
                  RankProbe(every=n, num_heads=model.config.num_attention_heads, layout="gpt_neox")]
    cb = WeightForcesCallback(per_matrix=True, every=run["every"], weibull_every=run["logging_steps"],
                              offset_sample_every=run["every"], super_weights=run["super"], probes=probes,
                              kernel=run["kernel"])
    rank = int(os.environ.get("RANK", "0"))
    before, after = helper_callbacks(cb, run, rank)
    trainer = trainer_class(run)(model=model, args=args, train_dataset=tiny_data(), callbacks=before + [cb] + after)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    facts = local_facts(cb, trainer)
    facts["warnings"] = [str(w.message) for w in caught if "weight forces" in str(w.message)]
    facts["probe_warnings"] = [str(w.message) for w in caught if "Probe" in str(w.message)]
    facts["probes_running"] = [type(p).__name__ for p in cb.probes]
    facts["global_step"] = trainer.state.global_step
    # processes this rank started (the default pass starts none)
    import psutil

    facts["children"] = len(psutil.Process().children(recursive=True))
    (out / f"rank{rank}.json").write_text(json.dumps(facts, indent=1))
    if backend.startswith("zero"):
        deepspeed_teardown()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    out, plan = Path(argv[0]), json.loads(argv[1])
    for run in plan:
        run = {**DEFAULTS, **run}
        folder = out / run["name"]
        folder.mkdir(parents=True, exist_ok=True)
        try:
            run_one(run, folder)
        except Exception as exc:  # the test names the run that broke
            (folder / f"error{os.environ.get('RANK', '0')}.txt").write_text(f"{type(exc).__name__}: {exc}")
            raise
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
