"""The server's own cost per request (the served/bare gap): a real app
under uvicorn in this process, with a stand-in predictor that answers at once
(14 detections with 640x480 RLE masks, about a bench image's answer), and
``bench/loadgen.py`` posting the bench JPEGs from another process.

    python bench/overhead.py --concurrency 16 --seconds 6

Whatever the server spends per request here (HTTP, multipart, dependencies,
queue, decoding, JSON) is processor time the model's forward thread cannot use
in a real server: they share one interpreter. Pinned to one core (the load
generator to the others) where there are several, so requests/s is that core's
limit; the CPU column is this process's processor time per answered request.
``--no-decode`` hands the queue a ready tensor instead of decoding the upload;
``--keep-jpeg`` reads only the JPEG's header and queues it encoded, as the server
does for model processes on a GPU; ``--model-process`` runs the stand-in in a
model process (``app.serving.modelprocess``, on the other cores), so the pipe's cost is
counted too (the child's own processor time is not).

    python bench/overhead.py --model-process
    python bench/overhead.py --model-process --keep-jpeg
"""

import argparse
import asyncio
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx
import numpy as np
import torch
import uvicorn
from pycocotools import mask as mask_utils

from bench.bare import IMAGE_SIZE, bench_jpegs
from bench.results import command_line, machine, write_section
from model.inference.predictor import Detection, ImageResult
from model.info import ModelInfo

REPO = Path(__file__).resolve().parents[1]
READY_TIMEOUT_S = 120.0  # a model process imports torch before it answers


def canned_result(detections: int = 14, seed: int = 0) -> ImageResult:
    height, width = IMAGE_SIZE
    rng = np.random.default_rng(seed)
    found = []
    for _ in range(detections):
        mask = np.zeros((height, width), np.uint8, order="F")
        y, x = int(rng.integers(0, height - 60)), int(rng.integers(0, width - 60))
        mask[y : y + 60, x : x + 60] = 1
        rle = mask_utils.encode(mask)
        rle["counts"] = rle["counts"].decode()
        found.append(Detection(1, "a", 0.9, (float(x), float(y), x + 60.0, y + 60.0), rle))
    return ImageResult(width, height, found)


class InstantRuntime:
    name = "instant"
    precision = "fp32"


class InstantPredictor:
    """Answers every image with the same canned result, at once."""

    info = ModelInfo("instant", "stand-in", (0, 1), ("background", "a"))
    device = torch.device("cpu")
    precision = "fp32"
    runtime = InstantRuntime()
    input_geometry = None  # batched by exact image size

    def __init__(self):
        self.result = canned_result()

    def forward(self, images, options):
        return len(images)

    def finish(self, count):
        return [self.result] * count

    def predict(self, images, options=None):
        return self.finish(self.forward(images, options))


def load_instant(spec=None) -> InstantPredictor:
    """The stand-in, built in a model process."""
    return InstantPredictor()


def load_predictor(args: argparse.Namespace):
    """The app's ``load_predictor``: the stand-in here or in a model process."""

    def load(spec):
        if args.model_process:
            from app.serving.modelprocess import ModelProcess

            predictor = ModelProcess(spec, load=load_instant)
            if args.others:
                os.sched_setaffinity(predictor.process.pid, args.others)
        else:
            from app.serving.predictors import InProcessPredictor

            predictor = InProcessPredictor(InstantPredictor())
        predictor.decodes_jpeg = args.keep_jpeg
        return predictor

    return load


def skip_decoding() -> None:
    import app.api.routes.segment as segment

    image = torch.zeros((3, *IMAGE_SIZE), dtype=torch.uint8)

    async def ready_tensors(blobs, **_):
        return [image for _ in blobs]

    segment.decode_images = ready_tensors


def measure(args: argparse.Namespace, port: int, folder: Path) -> dict:
    from app.main import create_app
    from app.settings import Settings

    data = Path(tempfile.mkdtemp())
    settings = Settings(data_dir=data, database_url=f"sqlite:///{data / 'db.sqlite'}")
    app = create_app(settings, load_predictor=load_predictor(args))
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    summary: dict = {}

    def load() -> None:
        try:
            wait_ready(f"http://127.0.0.1:{port}", READY_TIMEOUT_S)
            run_load()
        except BaseException as e:
            summary["error"] = e
        finally:
            server.should_exit = True

    def run_load() -> None:
        command = [sys.executable, str(REPO / "bench" / "loadgen.py")]
        command += ["--url", f"http://127.0.0.1:{port}", "--images", str(folder)]
        command += ["--concurrency", str(args.concurrency), "--seconds", str(args.seconds)]
        command += ["--warmup", str(args.warmup)]
        pin = (lambda: os.sched_setaffinity(0, args.others)) if args.others else None
        before = time.monotonic() + args.warmup  # the window starts after the warm-up
        child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, preexec_fn=pin)
        while time.monotonic() < before:
            time.sleep(0.01)
        start = resource.getrusage(resource.RUSAGE_SELF)
        time.sleep(args.seconds)
        end = resource.getrusage(resource.RUSAGE_SELF)
        out, _ = child.communicate(timeout=120)
        summary.update(json.loads(out))
        summary["cpu_s"] = (end.ru_utime + end.ru_stime) - (start.ru_utime + start.ru_stime)

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    asyncio.run(server.serve())
    thread.join()
    if "error" in summary:
        raise summary["error"]
    return summary


def wait_ready(url: str, timeout: float) -> None:
    """Until the service's ``/readyz`` answers 200: its start-up (database, the
    model, in a model process too, and its warm-up) goes on after the socket opens,
    and requests meanwhile get 503."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        time.sleep(0.1)
    raise TimeoutError(f"the service at {url} was not ready in {timeout:g} s")


def render(summary: dict, args: argparse.Namespace, command: str) -> str:
    requests = summary["requests"]
    cpu_ms = 1000 * summary["cpu_s"] / max(requests, 1)
    decoding = (
        "none (a ready tensor)"
        if args.no_decode
        else "header only (the JPEG queued encoded)"
        if args.keep_jpeg
        else "Pillow, in worker threads"
    )
    return "\n".join(
        [
            heading(args),
            "",
            "A real app under uvicorn with a stand-in predictor that answers at once; "
            f"{args.concurrency} closed-loop clients (`bench/loadgen.py`, another process"
            f"{' and core' if args.pin else ''}) POST 640x480 JPEGs to `/v1/segment`; "
            f"{args.seconds:g} s after {args.warmup:g} s of warm-up"
            f"{'; the stand-in in a model process' if args.model_process else ''}. "
            "CPU: this process's processor time per answered request (the server's own "
            "cost).",
            "",
            "| decoding | requests/s | server CPU ms/request | p50 ms | errors |",
            "|---|---:|---:|---:|---|",
            f"| {decoding} | {summary['images_per_s']:.1f} | {cpu_ms:.2f} | "
            f"{summary['p50_ms']:.0f} | {summary['errors'] or 'none'} |",
            "",
            f"Machine: {machine('cpu')}.",
            "",
            f"Command: `{command}`",
        ]
    )


def heading(args: argparse.Namespace) -> str:
    variant = ", no decoding" * args.no_decode + ", JPEGs left encoded" * args.keep_jpeg
    variant += ", in a model process" * args.model_process
    return f"## Server overhead per request: stand-in model{variant}"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--port", type=int, default=0, help="default: a free one")
    parser.add_argument("--no-decode", action="store_true", help="skip decoding the uploads")
    parser.add_argument(
        "--keep-jpeg", action="store_true", help="queue JPEGs encoded (header checks only)"
    )
    parser.add_argument(
        "--model-process", action="store_true", help="the stand-in in a model process"
    )
    parser.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md")
    args = parser.parse_args(argv)
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [0]
    args.pin, args.others = len(cores) > 1, cores[1:]
    if args.pin:  # the server on the first core, the load generator on the others
        os.sched_setaffinity(0, {cores[0]})
    if args.no_decode:
        skip_decoding()
    from bench.served import free_port

    with tempfile.TemporaryDirectory() as tmp:
        for i, data in enumerate(bench_jpegs()):
            (Path(tmp) / f"{i}.jpg").write_bytes(data)
        summary = measure(args, args.port or free_port(), Path(tmp))
    if args.pin:
        os.sched_setaffinity(0, cores)
    text = render(summary, args, command_line("bench/overhead.py", argv))
    print(text)
    if not args.no_write:
        write_section(heading(args), text)
    return summary


if __name__ == "__main__":
    main()
