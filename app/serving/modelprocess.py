"""The model in processes of its own (``MASKRCNN_MODEL_PROCESSES=N``).

On a GPU the forward of a batch is host-bound: Python and about a thousand kernel
launches per batch, each launch giving up and taking back the interpreter lock.
In one process the forward thread shares that lock with the event loop, the
decoding threads and the finish thread, and waits for it at every launch.
``ModelProcess`` moves the predictor into a spawned child process, so the HTTP
process's work no longer stands in the forward's way.

* The child (``app.serving.modelchild``) loads the predictor of a ``ModelSpec``
  (resolved here) and runs ``forward`` and ``finish`` in two threads, as the queue does in one
  process: the next batch's forward still overlaps the previous batch's finish.
* ``ModelProcess`` is a ``ServedPredictor`` (``app.serving.predictors``) in the
  HTTP process.
  ``forward`` sends the batch (options pickled, each image's pixels as raw bytes
  written straight into the child's tensor) and returns when the child's forward
  is done; the child keeps the pending batch until ``finish`` asks for its
  results. Images are decoded in the HTTP process on the CPU (``input_device``),
  except, for a model on a GPU (``decodes_jpeg``), the JPEGs nvJPEG decodes: they
  travel encoded (``app.inputs.decoding.EncodedJpeg``; the 640x480 bench JPEGs are 61-119
  KB against 921 KB of pixels) and the child's reading thread decodes them on the
  device as they arrive, as the HTTP process would in one process. An image the
  child cannot decode after all (corrupt past its header) gets its 400 error from
  ``finish`` in its result's place; the rest of the batch is answered.
* An error raised in the child is raised again here, as itself when it pickles
  (``RuntimeError`` with its text otherwise); an out-of-memory error empties the
  child's cache before it is reported, so the queue's split-and-retry is unchanged.
* If the child dies, every waiting call fails with 503 ``model_unavailable`` and
  ``on_exit`` is called (the service stops; the orchestrator restarts the
  replica). ``close`` stops the child (after a model swap, at shutdown).

One child is still one interpreter driving the device (on an H200 it served 0.81
of the bare model's images/s, its core always busy). ``ModelPool`` runs N
children, each with its own copy of the model on the same device; the queue
forwards up to N batches at once (``concurrency``), so one child's host work
overlaps another's device work.
"""

import contextlib
import itertools
import logging
import multiprocessing
import queue
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import torch

from app.errors import UnavailableError
from app.inputs.decoding import EncodedJpeg
from app.serving.loading import ModelSpec
from app.serving.modelchild import ChildOptions, child_main, on_the_wire
from model import ImageResult, ModelInfo, PredictOptions, Predictor

log = logging.getLogger(__name__)

CLOSE_TIMEOUT_S = 30.0  # a closing child finishes its batch in flight, then exits


class PredictInTwoStages:
    """``predict`` as the queue runs it: ``forward``, then ``finish``."""

    def predict(self, images, options=None) -> list[ImageResult]:
        if options is None:
            options = [PredictOptions()] * len(images)
        return self.finish(self.forward(images, options))


@dataclass(frozen=True)
class PendingInChild:
    """A forwarded batch waiting in the child for ``finish``."""

    key: int


class ModelProcess(PredictInTwoStages):
    """A predictor running in a child process; see the module docstring.

    ``load`` (picklable, run in the child) builds the predictor of ``spec``;
    default ``app.serving.loading.load_predictor``. ``options``: the child's
    logging and decoding limit. Blocks until the model is loaded, raising the
    child's error when it cannot be.
    """

    input_device = torch.device("cpu")
    concurrency = 1

    def __init__(
        self,
        spec: ModelSpec,
        options: ChildOptions | None = None,
        *,
        load: Callable[[ModelSpec], Predictor] | None = None,
        on_exit: Callable[[], None] | None = None,
    ):
        self.on_exit = on_exit
        context = multiprocessing.get_context("spawn")  # CUDA does not survive a fork
        requests_out, self._requests = context.Pipe(duplex=False)
        self._replies, replies_in = context.Pipe(duplex=False)
        self.process = context.Process(
            target=child_main,
            args=(spec, options or ChildOptions(), load, requests_out, replies_in),
            name="maskrcnn-model",
            daemon=True,
        )
        self.process.start()
        requests_out.close()
        replies_in.close()
        self._send_lock = threading.Lock()
        # one thread at a time waits for the child's exit: two waiting at once race
        # (the loser's waitpid finds no child, and the process seems alive forever)
        self._reap_lock = threading.Lock()
        self._waiting: dict[int, Future] = {}
        self._keys = itertools.count()
        self._closing = False
        self._exited: str | None = None  # why the child is gone, once it is
        # stops the child at interpreter exit too, before multiprocessing joins it
        self._stop = weakref.finalize(
            self, stop_child, self.process, self._requests, self._send_lock, self._reap_lock
        )
        try:
            ready = self._first_reply()
        except BaseException:
            self._closing = True
            self._stop()
            self._replies.close()
            raise
        self.info: ModelInfo = ready["info"]
        self.device = torch.device(ready["device"])
        self.decodes_jpeg = self.device.type == "cuda"  # leave JPEGs to nvJPEG there
        self.precision: str = ready["precision"]
        self.runtime: str = ready["runtime"]
        self.input_geometry = ready["input_geometry"]
        self._reader = threading.Thread(
            target=self._read_replies, name="maskrcnn-model-replies", daemon=True
        )
        self._reader.start()

    def _first_reply(self) -> dict:
        """The child's model description, or its load error; waits for as long as
        loading takes, but not for a child that died."""
        while not self._replies.poll(0.2):
            if not self.process.is_alive():
                raise RuntimeError(
                    f"the model process exited while loading (exit code {self.process.exitcode})"
                )
        ok, payload = self._replies.recv()
        if not ok:
            raise payload
        return payload

    # -- the queue's stages -------------------------------------------------------

    def forward(
        self, images: list[torch.Tensor | EncodedJpeg], options: list[PredictOptions]
    ) -> PendingInChild:
        key = next(self._keys)
        wire = [on_the_wire(image) for image in images]
        described, buffers = [d for d, _ in wire], [b for _, b in wire]
        self._call(key, ("forward", key, described, options), buffers)
        return PendingInChild(key)

    def finish(self, pending: PendingInChild) -> list[ImageResult | BaseException]:
        """The batch's results; an image the child could not decode has its error."""
        return self._call(pending.key, ("finish", pending.key))

    def _call(self, key: int, header: tuple, buffers: list | None = None) -> Any:
        """Send one request and wait for its reply (blocking)."""
        future: Future = Future()
        with self._send_lock:  # the reader's sweep takes it too: no reply is missed
            if self._exited is not None or self._closing:
                raise self._unavailable()
            self._waiting[key] = future
            try:
                self._requests.send(header)
                for buffer in buffers or ():
                    self._requests.send_bytes(buffer)
            except OSError:
                del self._waiting[key]
                raise self._unavailable() from None
        return future.result()

    # -- replies, exit and closing --------------------------------------------------

    def _read_replies(self) -> None:
        while True:
            try:
                key, ok, payload = self._replies.recv()
            except (EOFError, OSError):
                break
            future = self._waiting.pop(key, None)
            if future is None:  # its call failed while sending
                continue
            if ok:
                future.set_result(payload)
            else:
                future.set_exception(payload)
        with self._reap_lock:
            self.process.join(5)
            exited = f"exit code {self.process.exitcode}"
        with self._send_lock:
            self._exited = exited
            waiting, self._waiting = self._waiting, {}
        for future in waiting.values():
            future.set_exception(self._unavailable())
        if not self._closing:
            log.critical("the model process exited unexpectedly (%s)", self._exited)
            if self.on_exit is not None:
                self.on_exit()

    def _unavailable(self) -> UnavailableError:
        why = "was closed" if self._closing else f"exited ({self._exited})"
        return UnavailableError(f"the model process {why}", code="model_unavailable")

    def watch(self, on_exit: Callable[[], None]) -> None:
        self.on_exit = on_exit

    def close(self) -> None:
        """Stop the child: it finishes what it was sent, then exits (killed after
        ``CLOSE_TIMEOUT_S``). Calls made after this fail with 503."""
        self._closing = True
        self._stop()
        self._reader.join(CLOSE_TIMEOUT_S)
        self._replies.close()


class ModelPool(PredictInTwoStages):
    """``size`` model processes serving one model on one device; see the module
    docstring. A ``ServedPredictor``, forwarding up to ``concurrency``
    batches at once: each ``forward`` takes an idle child (they take turns), and
    ``finish`` asks the child that ran it. Loads the children in parallel; when one
    cannot load, the others are closed and its error is raised. Any child's exit
    calls ``on_exit``."""

    input_device = ModelProcess.input_device

    def __init__(
        self,
        spec: ModelSpec,
        size: int,
        options: ChildOptions | None = None,
        *,
        load: Callable[[ModelSpec], Predictor] | None = None,
        on_exit: Callable[[], None] | None = None,
    ):
        if size < 1:
            raise ValueError(f"a pool needs at least one model process, got {size}")
        self.on_exit = on_exit
        with ThreadPoolExecutor(size, thread_name_prefix="maskrcnn-load") as pool:
            starts = [
                pool.submit(ModelProcess, spec, options, load=load, on_exit=self._child_exited)
                for _ in range(size)
            ]
        errors = [start.exception() for start in starts if start.exception() is not None]
        self.children = [start.result() for start in starts if start.exception() is None]
        if errors:
            self.close()
            raise errors[0]
        first = self.children[0]
        self.info, self.device, self.precision = first.info, first.device, first.precision
        self.runtime = first.runtime
        self.decodes_jpeg = first.decodes_jpeg
        self.input_geometry = first.input_geometry
        self._idle: queue.Queue[ModelProcess] = queue.Queue()
        for child in self.children:
            self._idle.put(child)
        pids = ", ".join(str(child.process.pid) for child in self.children)
        log.info(
            "model %r loaded in %d processes on %s (pids %s)", self.info.id, size, self.device, pids
        )

    def forward(
        self, images: list[torch.Tensor | EncodedJpeg], options: list[PredictOptions]
    ) -> tuple["ModelProcess", PendingInChild]:
        child = self._idle.get()  # the queue forwards at most `concurrency` at once
        try:
            return child, child.forward(images, options)
        finally:
            self._idle.put(child)

    def finish(
        self, pending: tuple["ModelProcess", PendingInChild]
    ) -> list[ImageResult | BaseException]:
        child, remote = pending
        return child.finish(remote)

    @property
    def concurrency(self) -> int:
        """Batches forwarded at once: one per child."""
        return len(self.children)

    def watch(self, on_exit: Callable[[], None]) -> None:
        self.on_exit = on_exit

    def _child_exited(self) -> None:
        if self.on_exit is not None:
            self.on_exit()

    def close(self) -> None:
        """Close every child (each finishes what it was sent)."""
        with ThreadPoolExecutor(max(len(self.children), 1)) as pool:
            list(pool.map(ModelProcess.close, self.children))


def stop_child(
    process, requests: Connection, send_lock: threading.Lock, reap_lock: threading.Lock
) -> None:
    """Ask the child to exit, wait, kill it if it does not."""
    with contextlib.suppress(OSError, ValueError), send_lock:
        requests.send(("close", None))
    with reap_lock:
        process.join(CLOSE_TIMEOUT_S)
        if process.is_alive():
            log.warning("the model process did not exit in %.0f s; killing it", CLOSE_TIMEOUT_S)
            process.kill()
            process.join(5)
    requests.close()
