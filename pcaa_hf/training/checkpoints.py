"""Training checkpoints that load without running code: every file is safetensors or JSON, checked by a manifest.

A checkpoint folder `checkpoints/checkpoint-N` is also a model folder (`config.json`, `preprocessor_config.json`,
`model.safetensors`): `from_pretrained`, `pcaa-evaluate` and `pcaa-predict` read it, `--model_name_or_path`
fine-tunes from it. Beside the model it holds
- `optimizer.safetensors`: the optimiser's per-parameter state tensors (SGD's momentum buffers);
- `trainer_state.json`: the step, the evaluations so far, the run's arguments and settings, the optimiser's
  hyperparameters, the learning-rate schedule and the mixed-precision gradient scaler;
- `rng_state_{process}.json`: each process's torch, CUDA, NumPy and Python random states (dropout draws from them);
- `manifest.json`, written last: each file's size and SHA-256. A checkpoint is resumed only when it matches.

Nothing here unpickles: accelerate's `save_state` writes the scheduler and the random states as pickles, which
would run any code a crafted checkpoint carries when resumed.
"""

import json
import logging
import random
import re
from pathlib import Path

import numpy as np
import safetensors.torch
import torch

from pcaa_hf.utils.atomic_folders import MANIFEST, manifest_problems

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"checkpoint-(\d+)")
MODEL_WEIGHTS = "model.safetensors"
OPTIMIZER_STATE = "optimizer.safetensors"
TRAINER_STATE = "trainer_state.json"


def rng_state_file(process_index):
    return f"rng_state_{process_index}.json"


def checkpoints_in(folder):
    """(step, path) of the `checkpoint-N` folders in `folder`, oldest first (partial ones have another name)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(match[1]), path) for path in folder.iterdir()
             if path.is_dir() and (match := CHECKPOINT_PATTERN.fullmatch(path.name))]
    return sorted(found)


def checkpoint_problems(folder):
    """What keeps `folder` from being resumed exactly, one line each naming the file ([] when it is intact)."""
    if not (Path(folder) / MANIFEST).is_file() and (Path(folder) / "random_states_0.pkl").is_file():
        return [f"{folder} was written by an earlier pcaa_hf with pickled accelerate state, which is not loaded: "
                f"fine-tune from its weights instead"]
    return manifest_problems(folder)


def resolve_checkpoint(resume_from_checkpoint, checkpoint_dir):
    """
    The checkpoint to resume from: the folder `resume_from_checkpoint` names, or with "latest" the newest intact one
    in `checkpoint_dir` (None when there is none yet). A broken newest checkpoint is skipped with a warning naming the
    broken file; a broken named one, or only broken ones, raise a ValueError naming them.
    """
    if resume_from_checkpoint != "latest":
        path = Path(resume_from_checkpoint)
        if not path.is_dir():
            raise FileNotFoundError(f"--resume_from_checkpoint {path} is not a folder.")
        problems = checkpoint_problems(path)
        if problems:
            raise ValueError(f"Cannot resume from {path}: " + "; ".join(problems) + ".")
        return path
    broken = []
    for _, path in reversed(checkpoints_in(checkpoint_dir)):
        problems = checkpoint_problems(path)
        if not problems:
            if broken:
                logger.warning("Resuming from %s, the newest intact checkpoint; skipped: %s", path, "; ".join(broken))
            return path
        logger.warning("Checkpoint %s is broken and is skipped: %s", path.name, "; ".join(problems))
        broken.append(f"{path.name} ({problems[0]})")
    if broken:
        raise ValueError(f"No intact checkpoint in {checkpoint_dir} to resume from: " + "; ".join(broken) + ". Start "
                         "afresh with --overwrite_output_dir, or fine-tune from an export with --model_name_or_path.")
    return None


# ---- writing ------------------------------------------------------------------------------------------------------
def write_json(path, data):
    Path(path).write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")


def save_model_folder(folder, model, image_processor):
    """config.json, preprocessor_config.json and model.safetensors: the folder `from_pretrained` reads."""
    config = model.config.to_dict()
    config["architectures"] = [type(model).__name__]
    write_json(folder / "config.json", config)
    image_processor.to_json_file(folder / "preprocessor_config.json")
    state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    (folder / MODEL_WEIGHTS).write_bytes(safetensors.torch.save(state, metadata={"format": "pt"}))


def optimizer_state(optimizer):
    """The optimiser's state as (tensors by "parameter.name", JSON-ready rest)."""
    state = optimizer.state_dict()
    tensors, numbers = {}, {}
    for index, values in state["state"].items():
        for name, value in values.items():
            target = tensors if isinstance(value, torch.Tensor) else numbers
            target[f"{index}.{name}"] = value.contiguous() if isinstance(value, torch.Tensor) else value
    return tensors, {"param_groups": state["param_groups"], "numbers": numbers}


def save_training_state(folder, *, model, image_processor, optimizer, scheduler, scaler, trainer_state):
    """The files every process shares (written by the main process): model folder, optimiser, trainer state."""
    folder = Path(folder)
    save_model_folder(folder, model, image_processor)
    tensors, optimizer_rest = optimizer_state(optimizer)
    (folder / OPTIMIZER_STATE).write_bytes(safetensors.torch.save(tensors))
    write_json(folder / TRAINER_STATE, {**trainer_state, "optimizer": optimizer_rest,
                                        "scheduler": scheduler.state_dict(),
                                        "scaler": scaler.state_dict() if scaler is not None else None})


def save_rng_state(folder, process_index):
    """This process's random states (each process has its own: written by every process)."""
    numpy_state = np.random.get_state()
    state = {"torch": torch.get_rng_state().tolist(),
             "numpy": [numpy_state[0], numpy_state[1].tolist(), *map(float, numpy_state[2:])],
             "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    write_json(Path(folder) / rng_state_file(process_index), state)


# ---- reading ------------------------------------------------------------------------------------------------------
def read_json(path):
    """The contents of a JSON file; a ValueError naming it when it is not JSON (binary, truncated)."""
    try:
        return json.loads(Path(path).read_bytes())
    except ValueError as error:
        raise ValueError(f"{path} is not valid JSON ({error}).") from error


def load_training_state(folder, *, model, optimizer, scheduler, scaler, process_index):
    """
    Restore what `save_training_state` and `save_rng_state` wrote into `model`, `optimizer`, `scheduler`, `scaler`
    and this process's random generators; return the trainer state (steps, evaluations, arguments, settings).
    Every failure is a ValueError naming the file.
    """
    folder = Path(folder)
    state = read_json(folder / TRAINER_STATE)
    weights = folder / MODEL_WEIGHTS
    try:
        model.load_state_dict(safetensors.torch.load_file(weights, device=str(next(model.parameters()).device)))
    except (RuntimeError, safetensors.SafetensorError) as error:
        raise ValueError(f"{weights} does not fit this model: {str(error).splitlines()[0]}") from error
    optimizer_file = folder / OPTIMIZER_STATE
    try:
        tensors = safetensors.torch.load_file(optimizer_file)
        per_parameter = {}
        for key, value in {**tensors, **state["optimizer"]["numbers"]}.items():
            index, name = key.split(".", 1)
            per_parameter.setdefault(int(index), {})[name] = value
        optimizer.load_state_dict({"state": per_parameter, "param_groups": state["optimizer"]["param_groups"]})
        if set(state["scheduler"]) != set(scheduler.state_dict()):  # load_state_dict would take any attribute
            raise ValueError(f"the schedule's state has the entries {sorted(state['scheduler'])}")
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state["scaler"]:
            scaler.load_state_dict(state["scaler"])
    except (RuntimeError, KeyError, ValueError, TypeError, safetensors.SafetensorError) as error:
        raise ValueError(f"The optimiser state in {optimizer_file} and {folder / TRAINER_STATE} does not fit this "
                         f"model and optimiser ({str(error).splitlines()[0]}).") from error
    load_rng_state(folder / rng_state_file(process_index))
    return {key: value for key, value in state.items() if key not in ("optimizer", "scheduler", "scaler")}


def load_rng_state(path):
    state = read_json(path)
    try:
        torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
        name, keys, position, has_gauss, cached_gaussian = state["numpy"]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), int(position), int(has_gauss), cached_gaussian))
        version, internal, gauss_next = state["python"]
        random.setstate((version, tuple(internal), gauss_next))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))
    except (KeyError, ValueError, TypeError, RuntimeError) as error:
        raise ValueError(f"{path} does not hold the random states of a checkpoint ({error}).") from error


__all__ = ["CHECKPOINT_PATTERN", "TRAINER_STATE", "checkpoint_problems", "checkpoints_in", "load_training_state",
           "read_json", "resolve_checkpoint", "save_rng_state", "save_training_state"]
