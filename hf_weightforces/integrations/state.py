"""The monitor's state in Trainer checkpoints: written at each save, read back at resume.

``checkpoint-N/weightforces_state.json`` holds the run integrals (:class:`RunIntegral`), the next
Weibull event and each probe's JSON state; a probe's tensors go beside it as
``weightforces_probe_<i>.safetensors`` (safetensors only: nothing here ever unpickles).  Files are
written to a temporary name and renamed, so a reader sees a whole file or none.

Neither direction can stop training: :func:`save_state` raises only for the integrals' own file
(the caller warns: a resume from that checkpoint restarts the integrals); a probe whose state
cannot be saved loses it alone.  :func:`load_state` validates every field it reads (types,
lengths, names) and returns ``None`` (with a warning) for a state it cannot use.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping

import safetensors.torch

from ..core.integral import RunIntegral
from .guard import warn_fault

__all__ = ["PROBE_TENSORS_FILE", "STATE_FILE", "load_state", "restore_probes", "save_state"]

logger = logging.getLogger(__name__)

STATE_FILE = "weightforces_state.json"  # written into each Trainer checkpoint folder
PROBE_TENSORS_FILE = "weightforces_probe_{}.safetensors"  # a probe's tensors_state(), beside STATE_FILE


def _write_atomic(path: str, write) -> None:
    """``write(tmp_path)``, then rename over ``path``; the temporary file never stays behind."""
    tmp = path + ".tmp"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.isfile(tmp) or os.path.islink(tmp):
            os.unlink(tmp)


def _probe_json(probe) -> dict:
    state = probe.state_dict()
    if not isinstance(state, Mapping):
        raise TypeError(f"state_dict() returned {type(state).__name__}, not a dict")
    json.dumps(state)  # serialisable, or this probe's state alone is lost
    return dict(state)


def save_state(folder: str, integral: RunIntegral, next_weibull: int, step: int, all_probes: list, running: list) -> None:
    """Write the state (and the running probes' tensors) into a checkpoint folder.

    A probe whose state cannot be taken or written warns and restarts at a resume from this
    checkpoint; a failure to write the state file itself raises (``OSError``, ...)."""
    data = {"integral": integral.to_dict(), "next_weibull": int(next_weibull), "step": int(step),
            "probes": [{} for _ in all_probes], "probe_tensors": [None] * len(all_probes)}
    for i, probe in enumerate(all_probes):
        if probe not in running:
            continue
        label = f"{type(probe).__name__} (probe {i})"
        try:
            data["probes"][i] = _probe_json(probe)
        except Exception as exc:
            warn_fault(f"saving the state of {label} into {folder}", exc, "it restarts at a resume from there")
            continue
        if not hasattr(probe, "tensors_state"):
            continue
        name = PROBE_TENSORS_FILE.format(i)
        try:  # before the JSON, which names only the files written whole
            tensors = {k: v.detach().cpu().contiguous() for k, v in probe.tensors_state().items()}
            if tensors:
                _write_atomic(os.path.join(folder, name), lambda tmp, t=tensors: safetensors.torch.save_file(t, tmp))
                data["probe_tensors"][i] = name
        except Exception as exc:  # a probe that cannot save restarts at resume; training goes on
            warn_fault(f"writing {name} of {label} into {folder}", exc, "it restarts at a resume from there")

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f)

    _write_atomic(os.path.join(folder, STATE_FILE), write)


def _checked(data: object, names: list[str], default_next: int) -> dict:
    """The parts of a saved state this run can use; raises ValueError/TypeError for the integrals."""
    if not isinstance(data, Mapping):
        raise TypeError(f"a JSON {type(data).__name__}, not an object")
    if "integral" not in data:
        raise KeyError("integral")
    out = {"integral": RunIntegral.from_dict(data["integral"], names)}
    next_weibull = data.get("next_weibull", default_next)
    if not isinstance(next_weibull, int) or isinstance(next_weibull, bool) or next_weibull < 0:
        logger.warning("weight forces: saved next_weibull %r is not a step; the next fit runs at the next log", next_weibull)
        next_weibull = default_next
    out["next_weibull"] = next_weibull
    probes, tensors = data.get("probes", []), data.get("probe_tensors")
    if not isinstance(probes, list) or not all(isinstance(p, Mapping) for p in probes):
        logger.warning("weight forces: saved probe states are not a list of objects; the probes restart")
        probes, tensors = [], None
    if tensors is not None and (not isinstance(tensors, list) or len(tensors) != len(probes)
                                or not all(t is None or _plain_name(t) for t in tensors)):
        logger.warning("weight forces: saved probe tensor file names are malformed; the probes' tensors restart")
        tensors = [None] * len(probes)
    out["probes"], out["probe_tensors"] = probes, tensors
    return out


def _plain_name(name: object) -> bool:
    """A file name inside the checkpoint folder (no folders, no way out of it)."""
    return isinstance(name, str) and name == os.path.basename(name) and name not in ("", ".", "..")


def load_state(args, state, names: list[str]) -> dict | None:
    """The state saved in the checkpoint we resume from; a missing or unusable one warns.

    Returns ``{"integral", "next_weibull", "probes", "probe_tensors", "_folder"}``, every field
    checked, or ``None``: the integrals restart here."""
    folders = [getattr(args, "resume_from_checkpoint", None),
               os.path.join(args.output_dir, f"checkpoint-{state.global_step}")]
    for folder in filter(lambda f: isinstance(f, str) and f, folders):
        path = os.path.join(folder, STATE_FILE)
        if not os.path.isfile(path):
            continue
        try:
            with open(path, encoding="utf-8") as f:
                data = _checked(json.load(f), names, state.global_step)
        except (OSError, ValueError, KeyError, TypeError, RecursionError, OverflowError) as exc:
            logger.warning("weight forces: cannot use %s (%s: %s); the force integrals restart here",
                           path, type(exc).__name__, exc)
            return None
        logger.info("weight forces: resumed run integrals from %s", path)
        data["_folder"] = folder  # where the probes' tensor files are
        return data
    logger.warning(
        "weight forces: resuming at step %d without %s in the checkpoint; the force integrals "
        "(rms_pred, offsets) restart here", state.global_step, STATE_FILE,
    )
    return None


def restore_probes(data: dict, all_probes: list, step: int, running: list | None = None) -> None:
    """Give each probe its saved state (tensors first, from safetensors only).

    A probe that raises while taking its state warns and is removed from ``running`` (the probes
    still on), like a probe failing in any other hook."""
    tensor_files = data.get("probe_tensors")  # absent in older checkpoints: try the usual names
    for i, (probe, probe_state) in enumerate(zip(all_probes, data.get("probes", []))):
        if not probe_state:
            continue
        name = PROBE_TENSORS_FILE.format(i) if tensor_files is None else tensor_files[i]
        if name and hasattr(probe, "load_tensors_state"):
            path = os.path.join(data["_folder"], name)
            try:  # safetensors only: no pickle
                probe.load_tensors_state(safetensors.torch.load_file(path))
            except Exception as exc:  # missing or corrupt: this probe restarts here, training goes on
                logger.warning("weight forces: cannot use %s (%s); %s restarts at step %d",
                               path, exc, type(probe).__name__, step)
        try:
            probe.load_state_dict(dict(probe_state))
        except Exception as exc:
            if running is not None and probe in running:
                running.remove(probe)
            warn_fault(f"restoring {type(probe).__name__} at step {step}", exc, "that probe is switched off")
