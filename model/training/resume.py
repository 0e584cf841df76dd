"""The training loop's resume state: one ``.safetensors`` file, no pickle.

Tensors: ``model.<name>`` (weights), ``optim.<index>.<key>`` (optimizer state,
e.g. SGD momentum), ``rng.cpu`` (and ``rng.cuda.<i>``). Metadata key
``maskrcnn_resume``: JSON with ``epoch`` and ``step`` done, ``history``, the
optimizer's param groups and non-tensor state, and the training ``config``.
"""

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from model.checkpoint import load_state, write_safetensors
from model.errors import CheckpointError

METADATA_KEY = "maskrcnn_resume"
# settings a resumed run may change; any other difference makes it a different run
_MAY_CHANGE = {"epochs", "num_workers"}


def save_resume_state(
    path: str | Path, network: nn.Module, optimizer: torch.optim.Optimizer, *,
    epoch: int, step: int, history: list, config: dict[str, Any],
) -> None:
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in network.state_dict().items()}
    opt = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for index, state in opt["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    meta = {"epoch": epoch, "step": step, "history": history, "config": config,
            "param_groups": opt["param_groups"], "scalars": scalars}
    write_safetensors(path, tensors, meta, key=METADATA_KEY)


def load_resume_state(
    path: str | Path, network: nn.Module, optimizer: torch.optim.Optimizer, *,
    config: dict[str, Any],
) -> dict[str, Any]:
    """Restore weights, optimizer and RNG in place; returns the metadata."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})[METADATA_KEY])
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: not a resume state written by maskrcnn train ({e})") from e
    config = json.loads(json.dumps(config))  # tuples become lists, as in the file
    changed = sorted(
        k for k in set(config) | set(meta["config"])
        if k not in _MAY_CHANGE and config.get(k) != meta["config"].get(k)
    )
    if changed:
        raise CheckpointError(
            f"{path}: was written with different training settings ({', '.join(changed)}); "
            "use the same settings or start a new run"
        )
    load_state(network, {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, str(path))
    state: dict[int, dict[str, Any]] = {}
    for index, values in meta["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    for name, tensor in tensors.items():
        if name.startswith("optim."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = tensor
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    torch.set_rng_state(tensors["rng.cpu"])
    cuda_states = [tensors[f"rng.cuda.{i}"] for i in range(torch.cuda.device_count())
                   if f"rng.cuda.{i}" in tensors]
    if cuda_states and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)
    return meta
