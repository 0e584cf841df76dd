"""The model device's memory: recognising an out-of-memory error (the queue
splits the batch and retries) and giving cached memory back (after such an
error, and after a model is retired)."""

import gc

import torch


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "out of memory" in str(error).lower()
    )


def release_device_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def free_memory() -> None:
    """Return a retired model's memory: cycles first, then the CUDA cache."""
    gc.collect()
    release_device_memory()
