"""CPU inference by runtime and precision: torchvision's eager model against the
service's torch and OpenVINO runtimes, bare and served, in one run on the same
images.

    python bench/cpu.py --model r50 --batch-size 4 --seconds 30
    python bench/cpu.py --model demo --batch-size 4 --seconds 10 --precisions fp32,bf16,int8

1. torchvision's own ``model(images)`` in eager float32 on batches of
   ``--batch-size`` of the bench's 640x480 images: the baseline, what a service
   wrapping torchvision runs;
2. bare, ``Predictor.predict`` on the same batches, per configuration: the torch
   runtime in fp32 (the service before OpenVINO) and OpenVINO in each of
   ``--precisions`` (bf16 and int8 only on a CPU with the units for them; int8
   calibrated on 32 other scenes of the same kind, ``CALIBRATION_IMAGES`` for the
   server);
3. served, per configuration: ``maskrcnn serve`` (``MAX_BATCH_SIZE`` the batch
   size, ``RUNTIME`` and ``PRECISION`` as configured) started with an empty
   OpenVINO cache (cold start-up: conversion included) and again with it filled
   (warm start-up), each until ``/readyz`` answers 200 (the warm-up inference
   included); then ``bench/loadgen.py`` with ``--clients`` closed-loop clients
   (images/s) and with one client (p50 and p99 latency); the server's peak
   resident memory (``VmHWM``) after both.

Ratios are to the eager baseline of the same run. Writes the table as its own
section of ``bench/RESULTS.md``.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.bare import IMAGE_SIZE, bench_jpegs, decode_jpegs, measure, prepare_model
from bench.results import command_line, machine, write_section
from bench.served import REPO, Server
from model.inference.predictor import Predictor
from model.inference.runtimes.openvino_cpu import UNITS, cpu_flags
from model.loading import load_model


@dataclass
class Row:
    runtime: str
    precision: str
    processes: int = 0  # MODEL_PROCESSES of the served run
    bare: float = float("nan")  # images/s
    served: float = float("nan")
    p50_ms: float = float("nan")
    p99_ms: float = float("nan")
    peak_mb: float = float("nan")
    cold_s: float = float("nan")
    warm_s: float = float("nan")


def eager_images_per_s(network, images: list[torch.Tensor], batch_size: int, seconds: float):
    """torchvision's ``model(images)`` (float images in [0, 1]) on batches cycling
    through ``images``, after one unmeasured batch."""
    floats = [image.float() / 255 for image in images]

    def batch(k: int) -> list[torch.Tensor]:
        return [floats[(k * batch_size + i) % len(floats)] for i in range(batch_size)]

    with torch.inference_mode():
        network(batch(0))
        runs, start = 0, time.perf_counter()
        while runs == 0 or time.perf_counter() - start < seconds:
            network(batch(runs))
            runs += 1
    return runs * batch_size / (time.perf_counter() - start)


def peak_rss_mb(pid: int) -> float:
    """The peak resident memory of ``pid`` and of its child processes (model
    processes), each's own peak added up."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    total = 0.0
    for process in [pid, *map(int, children)]:
        for line in Path(f"/proc/{process}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                total += int(line.split()[1]) / 1024
    return total


def start_server(spec: str, env: dict[str, str], log: Path, timeout: float) -> tuple[Server, float]:
    started = time.perf_counter()
    server = Server(spec, env, log)
    try:
        server.wait_ready(timeout)
    except BaseException:
        server.stop()
        raise
    return server, time.perf_counter() - started


def load(server: Server, images_dir: Path, clients: int, seconds: float, warmup: float) -> dict:
    command = [sys.executable, str(REPO / "bench" / "loadgen.py"), "--url", server.url]
    command += ["--images", str(images_dir), "--concurrency", str(clients)]
    command += ["--seconds", str(seconds), "--warmup", str(warmup)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the load generator failed:\n{done.stderr}")
    point = json.loads(done.stdout)
    if point["errors"]:
        raise RuntimeError(f"the server answered errors: {point['errors']}")
    return point


def serve(row: Row, spec: str, tmp: Path, images_dir: Path, args) -> None:
    """Cold and warm start-up, throughput, one client's latency, peak memory (int8
    calibrates on ``tmp/calibration``, written by ``main``)."""
    env = {
        "MASKRCNN_RUNTIME": row.runtime,
        "MASKRCNN_PRECISION": row.precision,
        "MASKRCNN_DEVICE": "cpu",
        "MASKRCNN_MODEL_PROCESSES": str(row.processes),
        "MASKRCNN_MAX_BATCH_SIZE": str(args.batch_size),
        "MASKRCNN_MAX_QUEUE_SIZE": str(max(64, 2 * args.clients)),
        "MASKRCNN_REQUEST_TIMEOUT_S": "600",
        "MASKRCNN_RUN_WORKER": "false",
        "MASKRCNN_DATA_DIR": str(tmp / f"data-{row.runtime}-{row.precision}"),
        "MASKRCNN_LOG_LEVEL": "WARNING",
        "MASKRCNN_CALIBRATION_IMAGES": str(tmp / "calibration"),
    }
    log = tmp / f"server-{row.runtime}-{row.precision}-{row.processes}.log"
    server, row.cold_s = start_server(spec, env, log, args.ready_timeout)
    server.stop()
    server, row.warm_s = start_server(spec, env, log, args.ready_timeout)
    try:
        busy = load(server, images_dir, args.clients, args.seconds, args.warmup)
        row.served = busy["images_per_s"]
        alone = load(server, images_dir, 1, args.seconds, args.warmup)
        row.p50_ms, row.p99_ms = alone["p50_ms"], alone["p99_ms"]
        row.peak_mb = peak_rss_mb(server.process.pid)
    finally:
        server.stop()


def configurations(precisions: list[str], processes: list[int]) -> list[Row]:
    """The torch runtime, then OpenVINO in each precision in the server's process
    and, for each of ``processes``, in that many model processes."""
    rows = [Row("torch", "fp32")]
    for precision in precisions:
        if precision in UNITS and not cpu_flags() & set(UNITS[precision][1]):
            print(f"{precision} skipped: no {UNITS[precision][0]} units", file=sys.stderr)
            continue
        rows += [Row("openvino", precision, n) for n in [0, *processes]]
    return rows


def render(rows: list[Row], eager: float, args, command: str) -> str:
    lines = [
        section(args),
        "",
        f"Batches of {args.batch_size} {IMAGE_SIZE[1]}x{IMAGE_SIZE[0]} images; bare: "
        "`Predictor.predict` in this process; served: `maskrcnn serve` "
        f"(MAX_BATCH_SIZE={args.batch_size}) with {args.clients} closed-loop clients posting "
        "one JPEG each (images/s), then one client (latency); each point "
        f"{args.seconds:g} s after {args.warmup:g} s of warm-up. Start-up: process start to "
        "`/readyz` 200, with an empty OpenVINO cache (cold) and a filled one (warm). "
        "Ratios: to torchvision's eager `model(images)` in fp32, "
        f"**{eager:.3f} images/s** in the same run.",
        "",
        "| runtime | precision | MODEL_PROCESSES | bare images/s | served images/s "
        "| served / eager | served / bare | 1 client p50 ms | p99 ms | peak RSS MB "
        "| start-up cold s | warm s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.runtime} | {r.precision} | {r.processes} | {r.bare:.3f} | {r.served:.3f} | "
            f"**{r.served / eager:.2f}x** | {r.served / r.bare:.2f} | {r.p50_ms:.0f} | "
            f"{r.p99_ms:.0f} | {r.peak_mb:.0f} | {r.cold_s:.1f} | {r.warm_s:.1f} |"
        )
    lines += [
        "",
        "Peak RSS: the server's process and its model processes, each one's peak added up.",
        "",
        f"Machine: {machine('cpu')}.",
        "",
        f"Command: `{command}`",
    ]
    return "\n".join(lines)


def section(args: argparse.Namespace) -> str:
    return f"## CPU runtimes: {args.model}, batches of {args.batch_size} (bench/cpu.py)"


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("demo", "r50"), default="r50")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument(
        "--precisions", default="fp32,bf16,int8", help="OpenVINO's, comma-separated"
    )
    parser.add_argument(
        "--model-processes",
        default="",
        help="also serve OpenVINO with these MODEL_PROCESSES, comma-separated (e.g. 2)",
    )
    parser.add_argument("--clients", type=int, default=8, help="for the served images/s")
    parser.add_argument("--seconds", type=float, default=30.0, help="measured seconds per point")
    parser.add_argument("--warmup", type=float, default=5.0, help="unmeasured seconds per point")
    parser.add_argument("--ready-timeout", type=float, default=600.0)
    parser.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md")
    args = parser.parse_args(argv)
    jpegs = bench_jpegs()
    images = decode_jpegs(jpegs)
    calibration_jpegs = bench_jpegs(32, seed=77)  # the same kind of scene, not the same
    processes = [int(n) for n in args.model_processes.split(",") if n]
    rows = configurations(args.precisions.split(","), processes)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        spec = prepare_model(args.model, tmp)
        loaded = load_model(spec)
        eager = eager_images_per_s(loaded.network, images, args.batch_size, args.seconds)
        print(f"torchvision eager fp32: {eager:.3f} images/s", file=sys.stderr)
        bare: dict[tuple[str, str], float] = {}
        for row in rows:
            if (row.runtime, row.precision) in bare:  # another MODEL_PROCESSES of one model
                row.bare = bare[row.runtime, row.precision]
                continue
            predictor = Predictor(
                loaded.network,
                loaded.info,
                runtime=row.runtime,
                precision=row.precision,
                cache_dir=tmp / "bare-cache",
                calibration=decode_jpegs(calibration_jpegs),
            )
            row.bare = measure(predictor, images, args.batch_size, args.seconds).images_per_s
            bare[row.runtime, row.precision] = row.bare
            del predictor
            print(f"bare {row.runtime} {row.precision}: {row.bare:.3f} images/s", file=sys.stderr)
        images_dir, calibration_dir = tmp / "images", tmp / "calibration"
        for folder, files in ((images_dir, jpegs), (calibration_dir, calibration_jpegs)):
            folder.mkdir()
            for i, data in enumerate(files):
                (folder / f"{i}.jpg").write_bytes(data)
        for row in rows:
            serve(row, spec, tmp, images_dir, args)
            print(f"served {row}", file=sys.stderr)
    text = render(rows, eager, args, command_line("bench/cpu.py", argv))
    print(text)
    if not args.no_write:
        write_section(section(args), text)
    return rows


if __name__ == "__main__":
    main()
