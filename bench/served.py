"""Served throughput and latency: a real ``maskrcnn serve`` over HTTP
against the bare model, in one run on one machine.

    python bench/served.py --model demo --device cpu --threads 1 \
        --concurrency 1,2,4,8,16,32,64 --seconds 10
    python bench/served.py --model r50 --device cuda --precision fp16 --processes 4
    python bench/served.py --model r50 --device cuda --precision fp16 --processes 4 \
        --model-processes 2
    python bench/served.py --model r50 --device cuda --precision fp16 --processes 4 --graphs

1. The bare model (``bench/bare.py``'s ``measure``) at batch ``--max-batch-size``,
   in this process, on the same images;
2. ``maskrcnn serve`` in a subprocess on the same model (``MAX_BATCH_SIZE`` as
   above, ``MODEL_PROCESSES`` from ``--model-processes``: 0, in process, unless
   given; ``STATIC_SHAPES`` from ``--static`` (on with ``--graphs``); ``CUDA_GRAPHS``
   true only with ``--graphs``, then captured for batches of 1, 2, 4, ... up to
   ``MAX_BATCH_SIZE`` of 640x480 images; the other settings at their defaults),
   ready when ``/readyz`` says so;
3. for each client concurrency, ``bench/loadgen.py`` in its own process posts
   the same 640x480 JPEGs to ``/v1/segment`` (one image a request), and the
   server's ``/metrics`` before and after tell the mean batch size and the time
   per batch in ``forward`` (network and device work) and ``finish`` (strings).

The headline is served/bare: the best served images/s over the bare images/s.
Writes the table as its own section of ``bench/RESULTS.md``.
"""

import argparse
import contextlib
import gc
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx
import torch

from bench.bare import (
    IMAGE_SIZE,
    Point,
    add_model_arguments,
    bench_jpegs,
    capture_graphs,
    decode_jpegs,
    experiments,
    load_predictor,
    measure,
    prepare_model,
    static_wanted,
)
from bench.results import command_line, machine, write_section

REPO = Path(__file__).resolve().parents[1]
# Prometheus samples read before and after each point
SAMPLES = (
    "maskrcnn_forwards_total",
    "maskrcnn_images_forwarded_total",
    "maskrcnn_inference_seconds_sum",
    "maskrcnn_postprocess_seconds_sum",
    "maskrcnn_postprocess_seconds_count",
    "maskrcnn_queue_wait_seconds_sum",
    "maskrcnn_queue_wait_seconds_count",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``maskrcnn serve`` on a free loopback port, its output in ``log_path``."""

    def __init__(self, spec: str, env: dict[str, str], log_path: Path):
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log_path = log_path
        base = {k: v for k, v in os.environ.items() if not k.startswith("MASKRCNN_")}
        base["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), base.get("PYTHONPATH")]))
        command = [sys.executable, "-m", "app.cli", "serve", "--host", "127.0.0.1"]
        command += ["--port", self.url.rsplit(":", 1)[1], "--model", spec]
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            command, cwd=REPO, env=base | env, stdout=self._log, stderr=subprocess.STDOUT
        )
        self.http = httpx.Client(base_url=self.url, timeout=30)

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited:\n{self.log_path.read_text()}")
            with contextlib.suppress(httpx.TransportError):
                if self.http.get("/readyz", timeout=2).status_code == 200:
                    return
            time.sleep(0.2)
        log = self.log_path.read_text()
        raise TimeoutError(f"the server was not ready in {timeout:g} s:\n{log}")

    def samples(self) -> dict[str, float]:
        values = dict.fromkeys(SAMPLES, 0.0)
        for line in self.http.get("/metrics").text.splitlines():
            name, _, value = line.partition(" ")
            if name in values:
                values[name] = float(value)
        return values

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.http.close()
        self._log.close()


def server_env(args: argparse.Namespace, data_dir: Path, max_concurrency: int) -> dict[str, str]:
    env = {
        "MASKRCNN_DEVICE": args.device,
        "MASKRCNN_PRECISION": args.precision,
        "MASKRCNN_RUNTIME": args.runtime,
        "MASKRCNN_MAX_BATCH_SIZE": str(args.max_batch_size),
        "MASKRCNN_MAX_QUEUE_SIZE": str(max(64, 2 * max_concurrency)),
        "MASKRCNN_REQUEST_TIMEOUT_S": "300",
        "MASKRCNN_RUN_WORKER": "false",
        "MASKRCNN_DATA_DIR": str(data_dir),
        "MASKRCNN_LOG_LEVEL": "WARNING",
    }
    if args.batch_delay_ms is not None:
        env["MASKRCNN_MAX_BATCH_DELAY_MS"] = str(args.batch_delay_ms)
    env["MASKRCNN_MODEL_PROCESSES"] = str(args.model_processes)
    env["MASKRCNN_STATIC_SHAPES"] = "true" if static_wanted(args) == "on" else "false"
    env["MASKRCNN_CUDA_GRAPHS"] = "true" if args.graphs else "false"
    env["MASKRCNN_GRAPH_BATCH_SIZES"] = ",".join(map(str, graph_batch_sizes(args.max_batch_size)))
    env["MASKRCNN_GRAPH_IMAGE_SIZES"] = f"{IMAGE_SIZE[1]}x{IMAGE_SIZE[0]}"
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)  # torch's intra-op threads, as in bare
    return env


def graph_batch_sizes(largest: int) -> list[int]:
    """1, 2, 4, ... and ``largest``: a batch pads to the next captured size."""
    sizes = [1 << k for k in range(largest.bit_length()) if 1 << k < largest]
    return [*sizes, largest]


def run_point(server: Server, images_dir: Path, concurrency: int, args) -> dict:
    before = server.samples()
    command = [sys.executable, str(REPO / "bench" / "loadgen.py"), "--url", server.url]
    command += ["--images", str(images_dir), "--concurrency", str(concurrency)]
    command += ["--seconds", str(args.seconds), "--warmup", str(args.warmup)]
    command += ["--processes", str(args.processes)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the load generator failed:\n{done.stderr}")
    point = json.loads(done.stdout)
    after = server.samples()
    delta = {k: after[k] - before[k] for k in SAMPLES}
    forwards = max(delta["maskrcnn_forwards_total"], 1)
    point["mean_batch"] = delta["maskrcnn_images_forwarded_total"] / forwards
    point["forward_ms"] = 1000 * delta["maskrcnn_inference_seconds_sum"] / forwards
    finishes = max(delta["maskrcnn_postprocess_seconds_count"], 1)
    point["finish_ms"] = 1000 * delta["maskrcnn_postprocess_seconds_sum"] / finishes
    waits = max(delta["maskrcnn_queue_wait_seconds_count"], 1)
    point["queue_ms"] = 1000 * delta["maskrcnn_queue_wait_seconds_sum"] / waits
    return point


def section(args: argparse.Namespace) -> str:
    device = torch.device(args.device).type
    return (
        f"## Served throughput: {args.model} on {device}, {args.precision}, "
        f"MAX_BATCH_SIZE={args.max_batch_size}{model_processes(args)}{experiments(args)}"
    )


def model_processes(args: argparse.Namespace) -> str:
    """The heading's and text's model-process part; says so when the processes run
    under NVIDIA MPS (``CUDA_MPS_PIPE_DIRECTORY`` set, as ``bench/gpu_suite.sh``
    sets it), so such a run gets a section of its own."""
    text = f", MODEL_PROCESSES={args.model_processes}" if args.model_processes else ""
    return text + (" under NVIDIA MPS" if os.environ.get("CUDA_MPS_PIPE_DIRECTORY") else "")


def render(points: list[dict], bare: Point, args: argparse.Namespace, command: str) -> str:
    device = torch.device(args.device)
    best = max(points, key=lambda p: p["images_per_s"])
    ratio = best["images_per_s"] / bare.images_per_s
    lines = [
        section(args),
        "",
        f"`maskrcnn serve` (MAX_BATCH_SIZE={args.max_batch_size}, "
        f"MAX_BATCH_DELAY_MS={args.batch_delay_ms if args.batch_delay_ms is not None else 5:g}"
        f"{model_processes(args)}) "
        f"over HTTP on loopback; closed-loop clients in {args.processes} separate "
        f"process(es) each POST one {IMAGE_SIZE[1]}x{IMAGE_SIZE[0]} JPEG to `/v1/segment`; "
        f"each point {args.seconds:g} s after {args.warmup:g} s of warm-up. "
        "Batch, forward, finish and queue columns come from the server's `/metrics`.",
        "",
        "| clients | images/s | p50 ms | p99 ms | mean batch | forward ms/batch "
        "| finish ms/batch | queue wait ms | errors |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for p in points:
        errors = ", ".join(f"{n}x {code}" for code, n in p["errors"].items()) or "none"
        lines.append(
            f"| {p['concurrency']} | {p['images_per_s']:.2f} | {p['p50_ms']:.0f} | "
            f"{p['p99_ms']:.0f} | {p['mean_batch']:.1f} | {p['forward_ms']:.1f} | "
            f"{p['finish_ms']:.1f} | {p['queue_ms']:.1f} | {errors} |"
        )
    detections = [p["detections"] for p in points if p["detections"] is not None]
    lines += [
        "",
        f"Bare model in the same run: {bare.images_per_s:.2f} images/s at batch "
        f"{bare.batch_size} ({bare.detections:.1f} detections/image; served answers had "
        f"{sum(detections) / max(len(detections), 1):.1f}).",
        f"**Served/bare at saturation: {ratio:.2f}** ({best['images_per_s']:.2f} images/s "
        f"with {best['concurrency']} clients).",
        "",
        f"Machine: {machine(device)}.",
        "",
        f"Command: `{command}`",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    parser.add_argument("--concurrency", default="1,2,4,8,16,32,64")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per point")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds per point")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--batch-delay-ms", type=float, help="MAX_BATCH_DELAY_MS (default: 5)")
    parser.add_argument("--processes", type=int, default=1, help="load generator processes")
    parser.add_argument(
        "--model-processes",
        type=int,
        default=0,
        help="MASKRCNN_MODEL_PROCESSES (default 0: in the server's process, whatever the device)",
    )
    parser.add_argument("--bare-seconds", type=float, help="bare point's seconds (--seconds)")
    parser.add_argument("--ready-timeout", type=float, default=600.0)
    parser.add_argument("--server-log", type=Path, help="keep the server's output here")
    parser.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md")
    args = parser.parse_args(argv)
    if args.graphs and torch.device(args.device).type != "cuda":
        parser.error("--graphs needs a CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    concurrency = [int(c) for c in args.concurrency.split(",")]
    jpegs = bench_jpegs()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        spec = prepare_model(args.model, tmp, min_size=args.min_size, max_size=args.max_size)
        predictor = load_predictor(
            spec, args.device, args.precision, static=static_wanted(args), runtime=args.runtime
        )
        if args.graphs:
            capture_graphs(predictor, [args.max_batch_size])
        bare = measure(
            predictor, decode_jpegs(jpegs), args.max_batch_size, args.bare_seconds or args.seconds
        )
        print(f"bare: {bare.images_per_s:.2f} images/s at batch {bare.batch_size}", file=sys.stderr)
        del predictor  # give the device's memory to the server
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        images_dir = tmp / "images"
        images_dir.mkdir()
        for i, data in enumerate(jpegs):
            (images_dir / f"{i}.jpg").write_bytes(data)
        env = server_env(args, tmp / "data", max(concurrency))
        server = Server(spec, env, args.server_log or tmp / "server.log")
        points = []
        try:
            server.wait_ready(args.ready_timeout)
            for c in concurrency:
                points.append(run_point(server, images_dir, c, args))
                p = points[-1]
                print(
                    f"{c} clients: {p['images_per_s']:.2f} images/s, p50 {p['p50_ms']:.0f} ms, "
                    f"batch {p['mean_batch']:.1f}",
                    file=sys.stderr,
                )
        finally:
            server.stop()
    text = render(points, bare, args, command_line("bench/served.py", argv))
    print(text)
    if not args.no_write:
        write_section(section(args), text)
    best = max(points, key=lambda p: p["images_per_s"])
    return {"bare": bare.images_per_s, "served": best["images_per_s"], "points": points}


if __name__ == "__main__":
    main()
