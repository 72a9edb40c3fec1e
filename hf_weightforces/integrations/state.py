"""The monitor's state in Trainer checkpoints: written at each save, read back at resume.

``checkpoint-N/weightforces_state.json`` holds the run integrals (:class:`RunIntegral`), the next
Weibull event and each probe's JSON state; a probe's tensors go beside it as
``weightforces_probe_<i>.safetensors`` (safetensors only: nothing here ever unpickles).  Files are
written to a temporary name and renamed, so a reader sees a whole file or none.
"""

from __future__ import annotations

import json
import logging
import os

import safetensors.torch

from ..core.integral import RunIntegral

__all__ = ["PROBE_TENSORS_FILE", "STATE_FILE", "load_state", "restore_probes", "save_state"]

logger = logging.getLogger(__name__)

STATE_FILE = "weightforces_state.json"  # written into each Trainer checkpoint folder
PROBE_TENSORS_FILE = "weightforces_probe_{}.safetensors"  # a probe's tensors_state(), beside STATE_FILE


def save_state(folder: str, integral: RunIntegral, next_weibull: int, step: int, all_probes: list, running: list) -> None:
    """Write the state (and the running probes' tensors) into a checkpoint folder."""
    data = {"integral": integral.to_dict(), "next_weibull": next_weibull, "step": step,
            "probes": [probe.state_dict() if probe in running else {} for probe in all_probes],
            "probe_tensors": [None] * len(all_probes)}
    for i, probe in enumerate(all_probes):
        if probe not in running or not hasattr(probe, "tensors_state"):
            continue
        name = PROBE_TENSORS_FILE.format(i)
        try:  # before the JSON, which names only the files written whole
            tensors = {k: v.detach().cpu().contiguous() for k, v in probe.tensors_state().items()}
            if tensors:
                safetensors.torch.save_file(tensors, os.path.join(folder, name + ".tmp"))
                os.replace(os.path.join(folder, name + ".tmp"), os.path.join(folder, name))
                data["probe_tensors"][i] = name
        except Exception as exc:  # a probe that cannot save restarts at resume; training goes on
            logger.warning("weight forces: cannot save %s of %s (%s)", name, type(probe).__name__, exc)
    tmp = os.path.join(folder, STATE_FILE + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f)
    os.replace(tmp, os.path.join(folder, STATE_FILE))


def load_state(args, state, names: list[str]) -> dict | None:
    """The state saved in the checkpoint we resume from; a missing or unreadable one warns."""
    folders = [getattr(args, "resume_from_checkpoint", None),
               os.path.join(args.output_dir, f"checkpoint-{state.global_step}")]
    for folder in filter(None, folders):
        path = os.path.join(folder, STATE_FILE)
        if not os.path.isfile(path):
            continue
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            data["integral"] = RunIntegral.from_dict(data["integral"], names)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.warning("weight forces: cannot use %s (%s); the force integrals restart here", path, exc)
            return None
        logger.info("weight forces: resumed run integrals from %s", path)
        data["_folder"] = folder  # where the probes' tensor files are
        return data
    logger.warning(
        "weight forces: resuming at step %d without %s in the checkpoint; the force integrals "
        "(rms_pred, offsets) restart here", state.global_step, STATE_FILE,
    )
    return None


def restore_probes(data: dict, all_probes: list, step: int) -> None:
    """Give each probe its saved state (tensors first, from safetensors only)."""
    tensor_files = data.get("probe_tensors")  # absent in older checkpoints: try the usual names
    for i, (probe, probe_state) in enumerate(zip(all_probes, data.get("probes", []))):
        if not probe_state:
            continue
        name = PROBE_TENSORS_FILE.format(i) if tensor_files is None else (tensor_files[i:i + 1] or [None])[0]
        if name and hasattr(probe, "load_tensors_state"):
            path = os.path.join(data["_folder"], name)
            try:  # safetensors only: no pickle
                probe.load_tensors_state(safetensors.torch.load_file(path))
            except Exception as exc:  # missing or corrupt: this probe restarts here, training goes on
                logger.warning("weight forces: cannot use %s (%s); %s restarts at step %d",
                               path, exc, type(probe).__name__, step)
        probe.load_state_dict(probe_state)
