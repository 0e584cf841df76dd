"""What every benchmark script shares: the machine line and its own section of
``bench/RESULTS.md`` (a figure is quoted only with the machine that
produced it, and re-running one script leaves the other scripts' tables alone)."""

import os
import platform
import re
import shlex
import sys
from pathlib import Path

import torch

# BENCH_RESULTS points a rehearsal elsewhere
RESULTS = Path(os.environ.get("BENCH_RESULTS") or Path(__file__).with_name("RESULTS.md"))


def cpu_name() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    names = re.findall(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    return names[0].strip() if names else platform.processor() or platform.machine()


def machine(device: torch.device | str = "cpu") -> str:
    """CPU model and cores, GPU when ``device`` is one, torch and its threads, and
    the load average (other work on the machine skews CPU timings)."""
    device = torch.device(device)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    parts = [f"{cpu_name()} ({cores} logical CPUs)"]
    if device.type == "cuda":
        parts.append(f"GPU {torch.cuda.get_device_name(device)}")
    parts.append(f"torch {torch.__version__} with {torch.get_num_threads()} intra-op threads")
    if hasattr(os, "getloadavg"):
        parts.append(f"1-minute load average {os.getloadavg()[0]:.1f} when it ended")
    return "; ".join(parts)


def command_line(script: str, argv: list[str] | None) -> str:
    args = sys.argv[1:] if argv is None else argv
    return " ".join(["python", script, *map(shlex.quote, args)])


def write_section(heading: str, text: str, path: Path = RESULTS) -> None:
    """Replace the section that starts with the line ``heading`` (up to the next
    ``## `` heading), or append it; ``text`` starts with ``heading``."""
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.MULTILINE | re.DOTALL)
    body = text.rstrip("\n") + "\n\n"
    if pattern.search(old):
        new = pattern.sub(lambda _: body, old, count=1)
    else:
        new = old.rstrip("\n") + "\n\n" + body
    path.write_text(new.rstrip("\n") + "\n")
