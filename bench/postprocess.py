"""Mask postprocessing benchmark: ours against torchvision + pycocotools.

For 100 detections with 28x28 mask probabilities at 640x480 and 1920x1080, times

* ours: ``model.inference.masks.paste_masks`` + ``model.inference.rle.encode_rle``;
* reference: ``paste_masks_in_image`` + ``>= threshold`` + ``pycocotools.mask.encode``
  of the Fortran-ordered uint8 masks,

both ending with JSON-ready ``{"size", "counts": str}`` dicts, checks that they
give the same strings, prints a Markdown table and writes it as the
"## Postprocessing on DEVICE" section of ``bench/RESULTS.md``.

    python bench/postprocess.py --device cpu --repeats 10
"""

import argparse
import math
import statistics
import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torchvision.models.detection.roi_heads import paste_masks_in_image

from bench.results import command_line, machine, write_section
from model.inference.masks import paste_masks
from model.inference.rle import encode_rle

SIZES = ((480, 640), (1080, 1920))
DETECTIONS = 100
MASK_SIZE = 28
THRESHOLD = 0.5


def make_detections(height: int, width: int, device: torch.device, seed: int = 0):
    """Boxes with log-uniform sides from 16 px to 60% of the image, and blob-shaped
    mask probabilities (a noisy ellipse), like a trained mask head's output."""
    g = torch.Generator().manual_seed(seed)
    n = DETECTIONS

    def log_uniform(high):
        return torch.exp(torch.empty(n).uniform_(math.log(16), math.log(high), generator=g))

    box_w, box_h = log_uniform(0.6 * width), log_uniform(0.6 * height)
    x1 = torch.rand(n, generator=g) * (width - box_w)
    y1 = torch.rand(n, generator=g) * (height - box_h)
    boxes = torch.stack([x1, y1, x1 + box_w, y1 + box_h], 1)
    grid = (torch.arange(MASK_SIZE) + 0.5) / MASK_SIZE
    centre = 0.5 + 0.1 * torch.randn(n, 2, 1, 1, generator=g)
    radius = 0.25 + 0.2 * torch.rand(n, 2, 1, 1, generator=g)
    dist = ((grid[None, :, None] - centre[:, 1]) / radius[:, 1]) ** 2 + (
        (grid[None, None, :] - centre[:, 0]) / radius[:, 0]
    ) ** 2
    noise = 0.5 * torch.randn(n, MASK_SIZE, MASK_SIZE, generator=g)
    probs = torch.sigmoid(6 * (1 - dist) + noise)
    return probs.to(device), boxes.to(device)


def run_ours(probs, boxes, size):
    return encode_rle(paste_masks(probs, boxes, size, THRESHOLD))


def run_reference(probs, boxes, size):
    masks = paste_masks_in_image(probs[:, None], boxes, size, padding=1)[:, 0] >= THRESHOLD
    array = np.asfortranarray(masks.cpu().numpy().transpose(1, 2, 0).astype(np.uint8))
    return [
        {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
        for rle in mask_utils.encode(array)
    ]


def time_ms(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()  # both paths end on the host with strings: no sync needed after
    return 1000 * (time.perf_counter() - start)


def measure(device: torch.device, repeats: int) -> list[dict]:
    rows = []
    for height, width in SIZES:
        probs, boxes = make_detections(height, width, device)
        ours = partial(run_ours, probs, boxes, (height, width))
        reference = partial(run_reference, probs, boxes, (height, width))
        same = ours() == reference()  # also the warm-up
        times = {"ours": [], "reference": []}
        for _ in range(repeats):  # interleaved, so both see the same machine load
            times["ours"].append(time_ms(ours, device))
            times["reference"].append(time_ms(reference, device))
        rows.append(
            {"size": f"{width}x{height}", "same": same}
            | {name: statistics.median(values) for name, values in times.items()}
        )
    return rows


def section(device: torch.device) -> str:
    return f"## Postprocessing on {device.type}"


def render(rows: list[dict], device: torch.device, repeats: int, command: str) -> str:
    lines = [
        section(device),
        "",
        f"{DETECTIONS} detections, {MASK_SIZE}x{MASK_SIZE} mask probabilities, threshold "
        f"{THRESHOLD}, device `{device}`; median of {repeats} runs, ms per image.",
        "Ours: `paste_masks` + `encode_rle`. Reference: torchvision `paste_masks_in_image` "
        "+ threshold + `pycocotools.mask.encode` (Fortran-ordered uint8).",
        "",
        "| image | ours (ms) | reference (ms) | speed-up | same RLE strings |",
        "|---|---:|---:|---:|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['size']} | {row['ours']:.1f} | {row['reference']:.1f} | "
            f"{row['reference'] / row['ours']:.1f}x | {'yes' if row['same'] else 'NO'} |"
        )
    lines += ["", f"Machine: {machine(device)}.", "", f"Command: `{command}`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per path and size")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = measure(device, args.repeats)
    text = render(rows, device, args.repeats, command_line("bench/postprocess.py", argv))
    print(text)
    if not args.no_write:
        write_section(section(device), text)


if __name__ == "__main__":
    main()
