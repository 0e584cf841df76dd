"""Latency of the bundled demo model on one 512x512 image, on the CPU.

    python bench/demo_latency.py [--size 512] [--runs 30] [--threads 2]

Runs the full ``Predictor`` path (network, per-image options, mask pasting and
RLE encoding) on a synthetic shapes image, one image per call, after a warm-up,
and prints a Markdown table with the machine it ran on.
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.results import cpu_name
from model.inference.options import PredictOptions
from model.inference.predictor import Predictor
from model.loading import load_model
from model.training.synthetic import SyntheticConfig, render_image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model(args.model, device="cpu")
    predictor = Predictor(loaded.network, loaded.info, device="cpu")
    array, _ = render_image(SyntheticConfig(image_size=args.size, seed=2024), 0)
    image = torch.from_numpy(array).permute(2, 0, 1).contiguous()
    options = [PredictOptions()]
    for _ in range(args.warmup):
        predictor.predict([image], options)
    times, detections = [], 0
    for _ in range(args.runs):
        start = time.perf_counter()
        result = predictor.predict([image], options)
        times.append(time.perf_counter() - start)
        detections = len(result[0].detections)
    times.sort()
    p90 = times[min(len(times) - 1, round(0.9 * (len(times) - 1)))]
    cores = len(os.sched_getaffinity(0))
    print(f"demo model latency, {args.size}x{args.size} image, batch 1, "
          f"{args.threads} torch threads, {cpu_name()} ({cores} cores available), "
          f"torch {torch.__version__}\n")
    print("| model | image | median ms | p90 ms | min ms | detections |")
    print("|---|---|---|---|---|---|")
    print(f"| {loaded.info.id} | {args.size}x{args.size} | {statistics.median(times) * 1e3:.0f} "
          f"| {p90 * 1e3:.0f} | {times[0] * 1e3:.0f} | {detections} |")


if __name__ == "__main__":
    main()
