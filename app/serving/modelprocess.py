"""The model in processes of its own (``MASKRCNN_MODEL_PROCESSES=N``).

On a GPU the forward of a batch is host-bound: Python and about a thousand kernel
launches per batch, each launch giving up and taking back the interpreter lock.
In one process the forward thread shares that lock with the event loop, the
decoding threads and the finish thread, and waits for it at every launch.
``ModelProcess`` moves the predictor into a spawned child process, so the HTTP
process's work no longer stands in the forward's way.

* The child loads the predictor from the settings (``build_predictor``) and runs
  ``forward`` and ``finish`` in two threads, as the queue does in one process:
  the next batch's forward still overlaps the previous batch's finish.
* ``ModelProcess`` is the queue's ``BatchPredictor`` in the HTTP process.
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
import pickle
import queue
import signal
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import TYPE_CHECKING, Any

import torch

from app.errors import UnavailableError
from app.inputs.decoding import EncodedJpeg, decode_image
from app.serving.stages import is_out_of_memory, release_device_memory
from model.inference.options import PredictOptions

if TYPE_CHECKING:
    from app.settings import Settings
    from model.inference.predictor import ImageResult
    from model.info import ModelInfo

log = logging.getLogger(__name__)

CLOSE_TIMEOUT_S = 30.0  # a closing child finishes its batch in flight, then exits


class TwoStages:
    """``predict`` as the queue runs it: ``forward``, then ``finish``."""

    def predict(self, images, options=None) -> "list[ImageResult]":
        if options is None:
            options = [PredictOptions()] * len(images)
        return self.finish(self.forward(images, options))


@dataclass(frozen=True)
class Remote:
    """A forwarded batch waiting in the child for ``finish``."""

    key: int


class ModelProcess(TwoStages):
    """A predictor running in a child process; see the module docstring.

    ``load`` (picklable, run in the child) builds the predictor from ``settings``;
    default ``app.serving.service.build_predictor``. Blocks until the model is loaded,
    raising the child's error when it cannot be.
    """

    input_device = torch.device("cpu")

    def __init__(
        self,
        settings: "Settings",
        *,
        load: Callable[["Settings"], Any] | None = None,
        on_exit: Callable[[], None] | None = None,
    ):
        self.on_exit = on_exit
        context = multiprocessing.get_context("spawn")  # CUDA does not survive a fork
        requests_out, self._requests = context.Pipe(duplex=False)
        self._replies, replies_in = context.Pipe(duplex=False)
        self.process = context.Process(
            target=child_main,
            args=(settings, load, requests_out, replies_in),
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
    ) -> Remote:
        key = next(self._keys)
        wire = [on_the_wire(image) for image in images]
        described, buffers = [d for d, _ in wire], [b for _, b in wire]
        self._call(key, ("forward", key, described, options), buffers)
        return Remote(key)

    def finish(self, pending: Remote) -> "list[ImageResult | BaseException]":
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

    @property
    def alive(self) -> bool:
        # the sentinel, not is_alive(): that would wait for the child too (see _reap_lock)
        return self._exited is None and not wait([self.process.sentinel], 0)

    def close(self) -> None:
        """Stop the child: it finishes what it was sent, then exits (killed after
        ``CLOSE_TIMEOUT_S``). Calls made after this fail with 503."""
        self._closing = True
        self._stop()
        self._reader.join(CLOSE_TIMEOUT_S)
        self._replies.close()


class ModelPool(TwoStages):
    """``size`` model processes serving one model on one device; see the module
    docstring. The queue's ``BatchPredictor``, forwarding up to ``concurrency``
    batches at once: each ``forward`` takes an idle child (they take turns), and
    ``finish`` asks the child that ran it. Loads the children in parallel; when one
    cannot load, the others are closed and its error is raised. Any child's exit
    calls ``on_exit``."""

    input_device = ModelProcess.input_device

    def __init__(
        self,
        settings: "Settings",
        size: int,
        *,
        load: Callable[["Settings"], Any] | None = None,
        on_exit: Callable[[], None] | None = None,
    ):
        if size < 1:
            raise ValueError(f"a pool needs at least one model process, got {size}")
        self.on_exit = on_exit
        with ThreadPoolExecutor(size, thread_name_prefix="maskrcnn-load") as pool:
            starts = [
                pool.submit(ModelProcess, settings, load=load, on_exit=self._child_exited)
                for _ in range(size)
            ]
        errors = [start.exception() for start in starts if start.exception() is not None]
        self.children = [start.result() for start in starts if start.exception() is None]
        if errors:
            self.close()
            raise errors[0]
        first = self.children[0]
        self.info, self.device, self.precision = first.info, first.device, first.precision
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
    ) -> "tuple[ModelProcess, Remote]":
        child = self._idle.get()  # the queue forwards at most `concurrency` at once
        try:
            return child, child.forward(images, options)
        finally:
            self._idle.put(child)

    def finish(self, pending: "tuple[ModelProcess, Remote]") -> "list[ImageResult | BaseException]":
        child, remote = pending
        return child.finish(remote)

    @property
    def concurrency(self) -> int:
        """Batches forwarded at once: one per child."""
        return len(self.children)

    @property
    def alive(self) -> bool:
        return all(child.alive for child in self.children)

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


def on_the_wire(image: torch.Tensor | EncodedJpeg) -> tuple[tuple, bytes | memoryview]:
    """How ``forward`` sends one image: its description, then its bytes."""
    if isinstance(image, EncodedJpeg):
        return ("jpeg", image.name), image.data
    image = image.contiguous()
    return ("pixels", tuple(image.shape), image.dtype), raw_bytes(image)


def raw_bytes(tensor: torch.Tensor) -> memoryview:
    """A contiguous tensor's memory as flat bytes (no copy)."""
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


# -- the child ------------------------------------------------------------------------


def child_main(
    settings: "Settings",
    load: Callable[["Settings"], Any] | None,
    requests: Connection,
    replies: Connection,
) -> None:
    """The model process: load, describe the model, then serve requests until
    ``close`` or until the HTTP process goes away (its pipe closes)."""
    # the HTTP process owns shutdown (it drains, then closes us): a Ctrl-C or a
    # SIGTERM sent to the whole process group must not kill the model mid-drain
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from app.logs import configure_logging

    configure_logging(settings.log_level, settings.log_format)
    try:
        if load is None:
            from app.serving.service import build_predictor as load
        predictor = load(settings.model_copy(update={"model_processes": 0}))
        ready = {
            "info": predictor.info,
            "device": str(predictor.device),
            "precision": predictor.precision,
            "input_geometry": predictor.input_geometry,
        }
    except BaseException as e:
        replies.send((False, portable(e)))
        return
    replies.send((True, ready))
    Child(predictor, requests, replies, max_pixels=settings.max_image_pixels).serve()


class Child:
    """The child's loop: the main thread reads requests (and decodes the JPEGs
    among their images), a forward thread and a finish thread run them, replies go
    back under one lock."""

    def __init__(
        self, predictor: Any, requests: Connection, replies: Connection, *, max_pixels: int
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
        workers = [
            threading.Thread(target=self._work, args=jobs, name=name)
            for jobs, name in [
                ((self._forwards, self._forward), "maskrcnn-forward"),
                ((self._finishes, self._finish), "maskrcnn-finish"),
            ]
        ]
        for worker in workers:
            worker.start()
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
            for worker in workers:
                worker.join()

    def _receive_image(self, kind: str, *described: Any) -> torch.Tensor | BaseException:
        """One image of a batch (see ``on_the_wire``); the error of a JPEG that
        does not decode."""
        if kind == "jpeg":
            (name,) = described
            data = self.requests.recv_bytes()
            try:
                device = getattr(self.predictor, "device", None)
                return decode_image(data, max_pixels=self.max_pixels, name=name, device=device)
            except Exception as e:
                return portable(e)
        shape, dtype = described
        image = torch.empty(shape, dtype=dtype)
        self.requests.recv_bytes_into(raw_bytes(image))
        return image

    def _work(self, jobs: queue.Queue, run: Callable) -> None:
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

    def _finish(self, key: int) -> "list[ImageResult | BaseException]":
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
