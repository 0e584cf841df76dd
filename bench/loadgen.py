"""HTTP load generator for ``bench/served.py``: ``--concurrency`` clients, each
posting one JPEG at a time to ``/v1/segment`` in a closed loop, for a warm-up and
then a measured window. Run as its own process (``--processes`` more of them for
fast servers), so that it takes no CPU time from the server's event loop.

    python bench/loadgen.py --url http://127.0.0.1:8000 --images DIR \
        --concurrency 16 --seconds 10 [--warmup 2] [--processes 1]

Prints one JSON object: images/s over the window (responses completed in it),
latency percentiles of the requests sent in it, errors by status, and the
detections per image of the first answers.
"""

import argparse
import asyncio
import json
import multiprocessing
import statistics
import sys
import time
from pathlib import Path

import httpx


async def _client(
    url: str, jpegs: list[bytes], concurrency: int, offset: int, start: float, stop: float
) -> list[tuple[float, float, int, int]]:
    """``(sent, answered, status, detections or -1)`` of each request; clients
    begin at ``start`` and send nothing after ``stop`` (``time.time()``)."""
    records = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as http:
        await asyncio.sleep(max(0.0, start - time.time()))

        async def worker(index: int) -> None:
            count = 0
            while time.time() < stop:
                data = jpegs[(offset + index + count) % len(jpegs)]
                files = {"images": ("bench.jpg", data, "image/jpeg")}
                sent = time.time()
                response = await http.post("/v1/segment", files=files)
                answered = time.time()
                detections = -1
                if count == 0 and response.status_code == 200:  # parse only a sample
                    detections = len(response.json()["results"][0]["detections"])
                records.append((sent, answered, response.status_code, detections))
                count += 1

        await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return records


def _run_process(args: tuple) -> list[tuple[float, float, int, int]]:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    return asyncio.run(_client(*args))


def run_load(
    url: str,
    jpegs: list[bytes],
    *,
    concurrency: int,
    seconds: float,
    warmup: float,
    processes: int = 1,
) -> dict:
    """Drive the server and summarise; the window is ``[start + warmup, + seconds]``."""
    processes = max(1, min(processes, concurrency))
    start = time.time() + 1.0  # every process connected and waiting
    window = (start + warmup, start + warmup + seconds)
    shares = [concurrency // processes + (i < concurrency % processes) for i in range(processes)]
    jobs = [(url, jpegs, n, sum(shares[:i]), start, window[1]) for i, n in enumerate(shares)]
    if processes == 1:
        records = _run_process(jobs[0])
    else:
        with multiprocessing.get_context("spawn").Pool(processes) as pool:
            records = [r for part in pool.map(_run_process, jobs) for r in part]
    done = [r for r in records if window[0] <= r[1] <= window[1]]
    ok = [r for r in done if r[2] == 200]
    latencies = sorted(r[1] - r[0] for r in records if window[0] <= r[0] and r[2] == 200)
    errors: dict[str, int] = {}
    for r in done:
        if r[2] != 200:
            errors[str(r[2])] = errors.get(str(r[2]), 0) + 1
    sampled = [r[3] for r in records if r[3] >= 0]
    return {
        "concurrency": concurrency,
        "seconds": seconds,
        "images_per_s": len(ok) / seconds,
        "requests": len(done),
        "p50_ms": 1000 * _percentile(latencies, 0.50),
        "p99_ms": 1000 * _percentile(latencies, 0.99),
        "errors": errors,
        "detections": statistics.mean(sampled) if sampled else None,
    }


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--images", type=Path, required=True, help="a folder of .jpg files")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--processes", type=int, default=1)
    args = parser.parse_args(argv)
    jpegs = [p.read_bytes() for p in sorted(args.images.glob("*.jpg"))]
    if not jpegs:
        sys.exit(f"no .jpg files in {args.images}")
    summary = run_load(
        args.url,
        jpegs,
        concurrency=args.concurrency,
        seconds=args.seconds,
        warmup=args.warmup,
        processes=args.processes,
    )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
