"""What images cost in memory, decoding and served: the figures behind
``MAX_DECODE_MEMORY_MB`` and ``app.inputs.decoding``'s bytes per pixel.

    python bench/decode_memory.py

1. Decoding alone: for each Pillow mode, a 6000x6000 image decoded by
   ``decode_image`` in a fresh process; the peak resident memory over the
   process's before (``VmHWM``, reset first), and what stays (the tensor), in
   bytes per pixel, against what ``Probe.decoding_bytes`` reserves; and an RGB
   JPEG decoded reduced for R50-FPN's input.
2. Served: ``maskrcnn serve`` on the demo model at the defaults. Its resident
   memory idle; its peak while four clients each post three 6000x6000 PNGs at
   once (108 M pixels a request; repeated ``--rounds`` times), with the answers'
   statuses; the peak and what stays after eight requests of six 5500x5500 PNGs
   (refused from their headers) and how long each took; how long a request
   waits for its 503 ``busy`` while others keep the budget full.

Writes its section of ``bench/RESULTS.md``.
"""

import argparse
import concurrent.futures
import io
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.results import command_line, write_section  # noqa: E402
from bench.served import Server  # noqa: E402

MODES = [("RGB", "JPEG"), ("RGB", "PNG"), ("L", "PNG"), ("P", "PNG"), ("RGBA", "PNG")]
MODES += [("CMYK", "JPEG"), ("I;16", "PNG"), ("RGB", "JPEG", "r50")]

DECODE_ONE = """
import io, sys
import numpy as np
from PIL import Image
import time
from app.inputs.decoding import decode_image, probe_image, reduction
from model import InputGeometry

mode, fmt, side = sys.argv[1], sys.argv[2], int(sys.argv[3])
geometry = InputGeometry(800, 1333, 32) if sys.argv[4:] == ["r50"] else None
array = np.random.default_rng(0).integers(0, 255, (side, side, 3), dtype=np.uint8)
image = Image.fromarray(array)
if mode == "I;16":
    image = Image.fromarray((array[..., 0].astype(np.uint16) * 257))
elif mode != "RGB":
    image = image.convert(mode)
buffer = io.BytesIO()
image.save(buffer, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
data = buffer.getvalue()
del array, image, buffer

def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))

import ctypes
ctypes.CDLL("libc.so.6").malloc_trim(0)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # VmHWM := VmRSS
before = status("VmRSS:")
started = time.perf_counter()
probe = probe_image(data, max_pixels=10**9, reduce_for=geometry)
scale, draft = reduction(probe, geometry)
tensor = decode_image(data, max_pixels=10**9, draft=draft if scale > 1 else None)
seconds = time.perf_counter() - started
pixels = side * side
print(f"{probe.mode}/{scale}", (status("VmHWM:") - before) / pixels,
      (status("VmRSS:") - before) / pixels, probe.decoding_bytes() / pixels, seconds)
"""


def decoding_costs(side: int) -> list[str]:
    rows = []
    for mode, fmt, *reduced in MODES:
        out = subprocess.run(
            [sys.executable, "-c", DECODE_ONE, mode, fmt, str(side), *reduced],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        found, peak, kept, reserved, seconds = out[0], *map(float, out[1:])
        found, scale = found.split("/")
        what = f"{mode} {fmt} ({found})" + (f", reduced 1/{scale} for R50-FPN" if reduced else "")
        rows.append(f"| {what} | {peak:.1f} | {kept:.1f} | {reserved:.1f} | {seconds * 1000:.0f} |")
    return rows


def flat_png(side: int) -> bytes:
    """Large in pixels, small on the wire (one colour compresses well)."""
    buffer = io.BytesIO()
    Image.fromarray(np.full((side, side, 3), 90, dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def status_mb(pid: int, field: str) -> float:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith(field))


def reset_peak(pid: int) -> None:
    with open(f"/proc/{pid}/clear_refs", "w", encoding="ascii") as f:
        f.write("5")


def post(url: str, pngs: list[bytes]) -> tuple[int, float]:
    files = [("images", (f"{i}.png", png, "image/png")) for i, png in enumerate(pngs)]
    started = time.monotonic()
    with httpx.Client(base_url=url, timeout=120) as client:
        status = client.post("/v1/segment", files=files).status_code
    return status, time.monotonic() - started


def served(rounds: int) -> list[str]:
    big, huge, small = flat_png(6000), flat_png(5500), flat_png(64)
    with tempfile.TemporaryDirectory() as tmp:
        env = {"MASKRCNN_DATA_DIR": str(Path(tmp) / "data")}
        server = Server("demo", env, Path(tmp) / "server.log")
        try:
            server.wait_ready(120)
            pid = server.process.pid
            post(server.url, [small])
            post(server.url, [big])  # the first large request's allocations
            idle = status_mb(pid, "VmRSS:")
            peaks, statuses = [], []
            for _ in range(rounds):
                reset_peak(pid)
                with concurrent.futures.ThreadPoolExecutor(4) as pool:
                    answers = list(pool.map(lambda _: post(server.url, [big] * 3), range(4)))
                statuses += [status for status, _ in answers]
                peaks.append(status_mb(pid, "VmHWM:"))
            after_admitted = status_mb(pid, "VmRSS:")
            reset_peak(pid)
            refused = [post(server.url, [huge] * 6) for _ in range(8)]
            refused_peak, refused_after = status_mb(pid, "VmHWM:"), status_mb(pid, "VmRSS:")
            busy = busy_answers(server.url, big)
        finally:
            server.stop()
    counts = {s: statuses.count(s) for s in sorted(set(statuses))}
    return [
        f"- idle, warmed up: {idle:.0f} MB resident",
        f"- four clients at once, three 6000x6000 PNGs each, {rounds} rounds: peak "
        f"{max(peaks):.0f} MB (rounds: {', '.join(f'{p:.0f}' for p in peaks)}); answers "
        f"{counts}; {after_admitted:.0f} MB after",
        f"- eight requests of six 5500x5500 PNGs: {sorted({s for s, _ in refused})}, the slowest "
        f"in {max(t for _, t in refused) * 1000:.0f} ms; peak {refused_peak:.0f} MB, "
        f"{refused_after:.0f} MB after",
        f"- three 6000x6000 PNGs while three clients keep sending as many: {busy}",
    ]


def busy_answers(url: str, big: bytes) -> str:
    """Keep the budget full with requests of three 6000x6000 PNGs, and time another
    such request's answers."""
    stop = threading.Event()

    def fill() -> None:
        while not stop.is_set():
            post(url, [big] * 3)

    fillers = [threading.Thread(target=fill) for _ in range(3)]
    for thread in fillers:
        thread.start()
    seen = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len([s for s, _ in seen if s == 503]) < 5:
        seen.append(post(url, [big] * 3))
    stop.set()
    for thread in fillers:
        thread.join()
    busy = [t for s, t in seen if s == 503]
    if not busy:
        return f"never busy in {len(seen)} tries"
    return f"{len(busy)} of {len(seen)} answered 503, the slowest in {max(busy) * 1000:.0f} ms"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--side", type=int, default=6000, help="decoding alone: image side")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    lines = [
        "## Decode memory",
        "",
        f"`{command_line('bench/decode_memory.py', argv)}`",
        "",
        f"Decoding alone, {args.side}x{args.side}, bytes per pixel of the file (a JPEG"
        " reduced for R50-FPN's 800/1333 input is decoded at a quarter of each side),"
        " and the time of probing and decoding:",
        "",
        "| mode | peak | kept | reserved | ms |",
        "|---|---|---|---|---|",
        *decoding_costs(args.side),
        "",
        "Served, the demo model at the defaults:",
        "",
        *served(args.rounds),
    ]
    text = "\n".join(lines)
    print(text)
    write_section("## Decode memory", text)


if __name__ == "__main__":
    main()
