"""Checkpoints: an HF model directory that loads anywhere, plus everything needed to resume exactly.

Layout of ``dir``::

    config.json, generation_config.json, model*.safetensors   the full policy (LoRA merged), HF format
    tokenizer/processor files                                 so AutoProcessor.from_pretrained(dir) works
    adapter/                                                  LoRA only: the adapters in PEFT format
    resume/learner_state.json                                 step, skipped steps, objective state, caller's data position
    resume/rng_rank<r>.pt                                     python / numpy / torch RNG states of rank r
    resume/ds_state/                                          DeepSpeed: fp32 master weights and optimizer state, per rank

Loading never unpickles arbitrary objects: the model is safetensors, JSON is JSON, and every
``.pt`` file (ours and DeepSpeed's) is read with ``torch.load(weights_only=True)``; DeepSpeed's
reader is patched to do so (see ``engine.make_loads_weights_only``), allowing exactly the few plain
DeepSpeed classes its optimizer state holds. The learning-rate schedule needs no state: it is a
function of the step.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from raylign.learner.model import export_name, hf_model
from raylign.learner.weights import gathered as _gathered

DS_TAG = "state"
STATE_FILE = "learner_state.json"
EXPORT_BUCKET_MB = 512.0


def _is_main(learner) -> bool:
    return learner.rank == 0


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _persistent_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Buffers that belong in a state dict (not partitioned by ZeRO), under their HF names."""
    out = {}
    for module_name, module in model.named_modules():
        for name, buf in module.named_buffers(recurse=False):
            if name not in module._non_persistent_buffers_set:
                out[export_name(f"{module_name}.{name}" if module_name else name)] = (
                    buf.detach().cpu().clone()
                )
    return out


def save_model(learner, directory: str | Path) -> Path:
    """Write the policy as an HF model directory (full weights, LoRA merged) plus its processor.

    A collective under ZeRO-3 (weights are gathered a bucket at a time); rank 0 writes.
    """
    directory = Path(directory)
    state: dict[str, torch.Tensor] = {}
    for bucket in learner.iter_weight_buckets(EXPORT_BUCKET_MB):
        if _is_main(learner):
            state.update({name: t.cpu() for name, t in bucket})
    if _is_main(learner):
        directory.mkdir(parents=True, exist_ok=True)
        state.update(_persistent_buffers(learner.policy))
        # save_pretrained maps our (module) names back to the checkpoint format of the model class.
        hf_model(learner.policy).save_pretrained(directory, state_dict=state)
        learner.processor.save_pretrained(directory)
    if learner.is_lora:
        _save_adapter(learner, directory / "adapter")
    _barrier()
    return directory


def _save_adapter(learner, directory: Path) -> None:
    """The LoRA adapters in PEFT format (gathered under ZeRO-3: a collective; rank 0 writes)."""
    adapters = [p for p in learner.policy.parameters() if p.requires_grad]
    with _gathered(adapters, learner.learner_cfg.zero_stage == 3):
        if _is_main(learner):
            learner.policy.save_pretrained(directory)


def _rng_state() -> dict[str, Any]:
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python_version": torch.tensor(version),
        "python_mt": torch.tensor(mt, dtype=torch.int64),
        "python_gauss": torch.tensor(float("nan") if gauss is None else gauss, dtype=torch.float64),
        "numpy_keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "numpy_pos": torch.tensor(pos),
        "numpy_has_gauss": torch.tensor(has_gauss),
        "numpy_cached": torch.tensor(cached, dtype=torch.float64),
        "torch": torch.get_rng_state(),
    }
    if kind != "MT19937":
        raise RuntimeError(f"numpy's global generator is {kind}, not MT19937; cannot save its state")
    if torch.cuda.is_available():
        state["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return state


def _set_rng_state(state: Mapping[str, torch.Tensor]) -> None:
    gauss = float(state["python_gauss"])
    random.setstate(
        (
            int(state["python_version"]),
            tuple(int(x) for x in state["python_mt"]),
            None if math.isnan(gauss) else gauss,
        )
    )
    keys = state["numpy_keys"].numpy().astype(np.uint32)
    np.random.set_state(
        (
            "MT19937",
            keys,
            int(state["numpy_pos"]),
            int(state["numpy_has_gauss"]),
            float(state["numpy_cached"]),
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


def save(learner, directory: str | Path, data_state: Mapping[str, Any] | None = None) -> Path:
    """Save an HF model directory plus the exact-resume state (all ranks must call it).

    ``data_state`` is the caller's position in its data (JSON-serialisable); ``restore`` returns it.
    """
    directory = Path(directory)
    save_model(learner, directory)
    resume = directory / "resume"
    if _is_main(learner):
        resume.mkdir(parents=True, exist_ok=True)
    _barrier()
    learner.engine.save_checkpoint(str(resume / "ds_state"), tag=DS_TAG, save_latest=False)
    torch.save(_rng_state(), resume / f"rng_rank{learner.rank}.pt")
    if _is_main(learner):
        objective = (
            learner.objective.state_dict()
            if learner.objective is not None
            else learner.pending_objective_state
        )
        state = {
            "step": learner.step,
            "skipped_steps": learner.skipped_steps,
            "world_size": learner.world_size,
            "zero_stage": learner.learner_cfg.zero_stage,
            "objective": objective or {},
            "data_state": dict(data_state or {}),
        }
        (resume / STATE_FILE).write_text(json.dumps(state, indent=2))
    _barrier()
    return directory


def restore(learner, directory: str | Path) -> dict[str, Any]:
    """Load the state saved by ``save`` into a freshly built learner; returns the caller's data position.

    The learner must be built from the same config (model path, ZeRO stage, LoRA) and world size.
    """
    resume = Path(directory) / "resume"
    state_file = resume / STATE_FILE
    if not state_file.is_file():
        raise FileNotFoundError(f"{directory} is not a raylign checkpoint (no resume/{STATE_FILE})")
    state = json.loads(state_file.read_text())
    if state["world_size"] != learner.world_size or state["zero_stage"] != learner.learner_cfg.zero_stage:
        raise ValueError(
            f"checkpoint was saved by {state['world_size']} learners at ZeRO stage {state['zero_stage']}; this run has "
            f"{learner.world_size} at stage {learner.learner_cfg.zero_stage}. Resume with the same learner settings"
        )
    path, _ = learner.engine.load_checkpoint(
        str(resume / "ds_state"), tag=DS_TAG, load_optimizer_states=True, load_lr_scheduler_states=False
    )
    if path is None:
        raise RuntimeError(f"DeepSpeed found no optimizer state under {resume / 'ds_state'}")
    rng_file = resume / f"rng_rank{learner.rank}.pt"
    _set_rng_state(torch.load(rng_file, weights_only=True))
    learner.step = int(state["step"])
    learner.skipped_steps = int(state["skipped_steps"])
    if learner.objective is not None:
        learner.objective.load_state_dict(state["objective"])
    else:
        learner.pending_objective_state = dict(state["objective"])
    _barrier()
    return dict(state["data_state"])
