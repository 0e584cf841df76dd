"""Our model file format: one ``.safetensors`` file with JSON metadata.

The safetensors header's ``__metadata__`` holds one key, ``maskrcnn``, whose value
is a JSON object with at least:

``format``          ``1``
``architecture``    a name from ``model.networks.ARCHITECTURES``
``arch_kwargs``     its builder arguments (``num_classes`` included)
``classes``         ``[{"id": category_id, "name": str}, ...]`` for labels 1..K
``dataset_id``      what it was trained on (or ``null``)
``metrics``         evaluation results (``{}`` when none)
``created_at``      ISO 8601 UTC
``sha256``          of the tensors (names, dtypes, shapes and bytes, in name order)

No pickle is ever read or written.
"""

import hashlib
import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from model.errors import CheckpointError

METADATA_KEY = "maskrcnn"
FORMAT_VERSION = 1


def hash_tensors(state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_checkpoint(
    path: str | os.PathLike,
    network: nn.Module,
    *,
    architecture: str,
    arch_kwargs: dict[str, Any],
    classes: list[dict[str, Any]],
    dataset_id: str | None = None,
    metrics: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``network``'s weights atomically (temporary name, then rename).

    Returns the metadata written.
    """
    state = {k: v.detach().to("cpu").contiguous() for k, v in network.state_dict().items()}
    metadata = {
        "format": FORMAT_VERSION,
        "architecture": architecture,
        "arch_kwargs": arch_kwargs,
        "classes": classes,
        "dataset_id": dataset_id,
        "metrics": metrics or {},
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "sha256": hash_tensors(state),
        **(extra or {}),
    }
    write_safetensors(path, state, metadata)
    return metadata


def write_safetensors(
    path: str | os.PathLike,
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, Any],
    *,
    key: str = METADATA_KEY,
) -> None:
    """Write ``tensors`` with ``metadata`` as JSON under ``key``, atomically:
    a temporary name beside ``path``, then a rename, so readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata={key: json.dumps(metadata)})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read tensors and metadata; verifies the metadata and the tensor hash."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        state = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
    if METADATA_KEY not in header:
        raise CheckpointError(
            f"{path}: safetensors file has no {METADATA_KEY!r} metadata; "
            "expected a checkpoint written by maskrcnn train"
        )
    try:
        metadata = json.loads(header[METADATA_KEY])
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: metadata is not valid JSON ({e})") from e
    missing = [k for k in ("architecture", "arch_kwargs", "classes") if k not in metadata]
    if missing:
        raise CheckpointError(f"{path}: metadata lacks {', '.join(missing)}")
    expected = metadata.get("sha256")
    if expected and hash_tensors(state) != expected:
        raise CheckpointError(f"{path}: tensors do not match the sha256 in its metadata")
    return state, metadata


def load_state(network: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict`` with an error that names the file and the mismatch."""
    try:
        result = network.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        detail = str(e).strip().splitlines()[-1].strip()
        raise CheckpointError(f"{source}: does not fit the architecture: {detail}") from e
    problems = []
    if result.missing_keys:
        missing = result.missing_keys
        problems.append(f"missing {len(missing)} tensors (e.g. {missing[0]})")
    if result.unexpected_keys:
        problems.append(
            f"{len(result.unexpected_keys)} unexpected tensors (e.g. {result.unexpected_keys[0]})"
        )
    if problems:
        raise CheckpointError(f"{source}: does not fit the architecture: {'; '.join(problems)}")
