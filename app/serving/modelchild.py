"""The model process's side of ``app.serving.modelprocess``: the wire format of a
batch's images, and the loop that loads the predictor and serves forwards and
finishes until the HTTP process closes it.

* ``on_the_wire`` (the HTTP process) describes each image, then sends its bytes:
  raw pixels written straight into the child's tensor, or an encoded JPEG the
  child decodes on its device (nvJPEG) as it arrives.
* ``child_main`` loads the predictor a ``ModelSpec`` describes
  (``app.serving.loading.load_predictor`` by default; the spec was resolved by the
  HTTP process: the child reads neither the settings nor the database), replies
  with the model's description, then runs ``ChildLoop``: the main thread reads
  requests, a forward thread and a finish thread run them, as the queue does in
  one process.
* Errors travel back as themselves when they pickle (``portable``).
"""

import pickle
import queue
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import torch

from app.inputs.decoding import EncodedJpeg, decode_image
from app.logs import configure_logging
from app.serving.device import is_out_of_memory, release_device_memory
from app.serving.loading import ModelSpec, load_predictor
from model import ImageResult, Predictor


@dataclass(frozen=True)
class ChildOptions:
    """What a model process needs besides its model: how to log, and the most
    pixels a JPEG it decodes may have (``MAX_IMAGE_PIXELS``)."""

    log_level: str = "INFO"
    log_format: str = "text"
    max_pixels: int = 40_000_000


def on_the_wire(image: torch.Tensor | EncodedJpeg) -> tuple[tuple, bytes | memoryview]:
    """How ``forward`` sends one image: its description, then its bytes."""
    if isinstance(image, EncodedJpeg):
        return ("jpeg", image.name), image.data
    image = image.contiguous()
    return ("pixels", tuple(image.shape), image.dtype), raw_bytes(image)


def raw_bytes(tensor: torch.Tensor) -> memoryview:
    """A contiguous tensor's memory as flat bytes (no copy)."""
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


def child_main(
    spec: ModelSpec,
    options: ChildOptions,
    load: Callable[[ModelSpec], Predictor] | None,
    requests: Connection,
    replies: Connection,
) -> None:
    """The model process: load, describe the model, then serve requests until
    ``close`` or until the HTTP process goes away (its pipe closes)."""
    # the HTTP process owns shutdown (it drains, then closes us): a Ctrl-C or a
    # SIGTERM sent to the whole process group must not kill the model mid-drain
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    configure_logging(options.log_level, options.log_format)
    try:
        predictor = (load or load_predictor)(spec)
        ready = {
            "info": predictor.info,
            "device": str(predictor.device),
            "precision": predictor.precision,
            "runtime": predictor.runtime.name,
            "input_geometry": predictor.input_geometry,
        }
    except BaseException as e:
        replies.send((False, portable(e)))
        return
    replies.send((True, ready))
    ChildLoop(predictor, requests, replies, max_pixels=options.max_pixels).serve()


class ChildLoop:
    """The child's loop: the main thread reads requests (and decodes the JPEGs
    among their images), a forward thread and a finish thread run them, replies go
    back under one lock."""

    def __init__(
        self, predictor: Predictor, requests: Connection, replies: Connection, *, max_pixels: int
    ):
        self.predictor = predictor
        self.requests = requests
        self.replies = replies
        self.max_pixels = max_pixels
        self.pending: dict[int, Any] = {}
        self._reply_lock = threading.Lock()
        self._forwards: queue.Queue = queue.Queue()
        self._finishes: queue.Queue = queue.Queue()

    def serve(self) -> None:
        threads = [
            threading.Thread(target=self._run_stage, args=stage, name=name)
            for stage, name in [
                ((self._forwards, self._forward), "maskrcnn-forward"),
                ((self._finishes, self._finish), "maskrcnn-finish"),
            ]
        ]
        for thread in threads:
            thread.start()
        try:
            while True:
                try:
                    message = self.requests.recv()
                except (EOFError, OSError):
                    break  # the HTTP process is gone
                if message[0] == "forward":
                    _, key, described, options = message
                    images = [self._receive_image(*description) for description in described]
                    self._forwards.put((key, images, options))
                elif message[0] == "finish":
                    self._finishes.put((message[1],))
                else:  # close
                    break
        finally:
            self._forwards.put(None)
            self._finishes.put(None)
            for thread in threads:
                thread.join()

    def _receive_image(self, kind: str, *described: Any) -> torch.Tensor | BaseException:
        """One image of a batch (see ``on_the_wire``); the error of a JPEG that
        does not decode."""
        if kind == "jpeg":
            (name,) = described
            data = self.requests.recv_bytes()
            try:
                device = self.predictor.device
                return decode_image(data, max_pixels=self.max_pixels, name=name, device=device)
            except Exception as e:
                return portable(e)
        shape, dtype = described
        image = torch.empty(shape, dtype=dtype)
        self.requests.recv_bytes_into(raw_bytes(image))
        return image

    def _run_stage(self, jobs: queue.Queue, run: Callable) -> None:
        while (job := jobs.get()) is not None:
            key = job[0]
            try:
                reply = (key, True, run(*job))
            except BaseException as e:
                if is_out_of_memory(e):
                    release_device_memory()
                reply = (key, False, portable(e))
            with self._reply_lock:
                try:
                    self.replies.send(reply)
                except OSError:
                    return  # the HTTP process is gone
                except Exception as e:  # the result does not pickle: say so instead
                    error = RuntimeError(f"cannot send the model's reply: {e!r}")
                    self.replies.send((key, False, error))

    def _forward(self, key: int, images: list, options: list) -> None:
        """Forward the batch's decoded images; keep the others' errors for ``_finish``."""
        failed = {i: image for i, image in enumerate(images) if isinstance(image, BaseException)}
        kept = [i for i in range(len(images)) if i not in failed]
        pending = None
        if kept:
            pending = self.predictor.forward([images[i] for i in kept], [options[i] for i in kept])
        self.pending[key] = (pending, failed, len(images))

    def _finish(self, key: int) -> list[ImageResult | BaseException]:
        pending, failed, count = self.pending.pop(key)
        results = iter(self.predictor.finish(pending) if pending is not None else [])
        return [failed[i] if i in failed else next(results) for i in range(count)]


def portable(error: BaseException) -> BaseException:
    """``error`` if it survives pickling as itself, else a ``RuntimeError`` with its
    type and message (an out-of-memory text still reads as one)."""
    try:
        copy = pickle.loads(pickle.dumps(error))
        if type(copy) is type(error) and str(copy) == str(error):
            return error
    except Exception:
        pass
    return RuntimeError(f"{type(error).__name__}: {error}")
