"""CUDA graphs of the static forward (``model.inference.static``), one per input
shape, replayed instead of launching the forward's kernels one by one.

* Captured per (batch size, canvas, detection slots, dtype) into one memory pool
  shared by all the graphs: they never run at once (a lock), and each replay's
  outputs are copied out before the next, so a graph may reuse the memory of
  another's intermediate tensors. The pool holds about one forward's activations
  for the largest captured shape, plus each graph's outputs.
* Each graph reads static input buffers: a batch is copied into them (device to
  device), padded with blank images up to the smallest captured batch size that
  holds it, and only its own images' outputs are read.
* Warm-up runs (which fill the anchor and constant caches and let cuDNN pick its
  algorithms) run on a side stream before the capture, as ``torch.cuda.graphs``
  asks.
* ``Uploader``: images reach the device from pinned host memory on a copy stream,
  so their transfer does not wait for, nor hold up, the compute stream.

``torch.compile(mode="reduce-overhead")`` would capture graphs too (CUDA graph
trees); it is not used: torchvision's detection code and the NMS iteration break
the compiled graph into pieces, each captured apart, with a recompilation per
shape at serving time, where explicit capture at start-up is predictable.
"""

import threading
from collections.abc import Callable
from typing import Any

import torch

# model.inference.static's StaticInputs (not imported: static imports this module)
StaticInputs = Any
Forward = Callable[[StaticInputs, int], dict[str, torch.Tensor]]


def graph_key(inputs: StaticInputs, slots: int) -> tuple:
    return (tuple(inputs.images.shape), inputs.images.dtype, inputs.classes.shape[1], slots)


class GraphedForward:
    """``forward(inputs, slots)`` replayed from CUDA graphs captured by ``capture``;
    ``run`` returns ``None`` for shapes not captured."""

    def __init__(self, forward: Forward, *, warmup: int = 3, pool: tuple | None = None):
        self.forward = forward
        self.warmup = warmup
        self.pool = pool if pool is not None else torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, StaticInputs, dict]] = {}
        self._lock = threading.Lock()
        self.replays = 0

    @property
    def batch_sizes(self) -> list[int]:
        return sorted({key[0][0] for key in self.graphs})

    def capture(self, inputs: StaticInputs, slots: int) -> None:
        """Capture the forward for ``inputs``' shapes; run under the autocast and
        inference mode the replays will run under."""
        key = graph_key(inputs, slots)
        if key in self.graphs:
            return
        static = inputs.clone()
        side = torch.cuda.Stream(device=static.images.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.forward(static, slots)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with self._lock, torch.cuda.graph(graph, pool=self.pool):
            outputs = self.forward(static, slots)
        self.graphs[key] = (graph, static, outputs)

    def run(self, inputs: StaticInputs, slots: int) -> dict[str, torch.Tensor] | None:
        """The forward's outputs for ``inputs`` (copies: a later replay overwrites
        the graph's), from the graph of the smallest captured batch that holds
        them; ``None`` if no graph fits."""
        count = len(inputs.images)
        for size in self.batch_sizes:
            if size < count:
                continue
            padded = inputs.padded(size)
            entry = self.graphs.get(graph_key(padded, slots))
            if entry is None:
                continue
            graph, static, outputs = entry
            with self._lock:
                static.copy_(padded)
                graph.replay()
                self.replays += 1
                return {name: value[:count].clone() for name, value in outputs.items()}
        return None


class Uploader:
    """Host images to the device through pinned memory on a copy stream; the
    current stream waits for the copies (an event), not the host."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device=device)

    def upload(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        """``images`` on the device; those already on a GPU (decoded there) as they are."""
        on_host = [i for i, image in enumerate(images) if image.device.type == "cpu"]
        if not on_host:
            return images
        pinned = [images[i] if images[i].is_pinned() else images[i].pin_memory() for i in on_host]
        with torch.cuda.stream(self.stream):
            moved = [image.to(self.device, non_blocking=True) for image in pinned]
            done = torch.cuda.Event()
            done.record(self.stream)
        current = torch.cuda.current_stream(self.device)
        current.wait_event(done)
        result = list(images)
        for i, tensor in zip(on_host, moved, strict=True):
            tensor.record_stream(current)  # made on the copy stream, used on this one
            result[i] = tensor
        return result
