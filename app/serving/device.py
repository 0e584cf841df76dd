"""Memory: the model device's (recognising an out-of-memory error, on which the
queue splits the batch and retries, and giving cached memory back after one and
after a model is retired), and the host's (after large images)."""

import contextlib
import ctypes
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


def release_host_memory() -> None:
    """Give freed heap memory back to the system: glibc keeps the blocks of large
    decoded images in its arenas after they are freed, so the process's RSS would
    stay at its peak."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
