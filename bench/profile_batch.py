"""Where one served-size batch spends its time: ``torch.profiler`` over
``Predictor.predict`` on ``--batch-size`` bench images, top ops by device time
and by host time, and the operators called from Python per batch (each at least
one kernel launch on a GPU, where the forward is host-bound); and what decoding
one bench JPEG costs (Pillow on the host, nvJPEG on the device), to decide where
uploads should be decoded.

    python bench/profile_batch.py --model r50 --device cuda --precision fp16 [--batch-size 8]
    python bench/profile_batch.py --model r50 --device cuda --precision fp16 --graphs

On a GPU it also counts the host syncs per batch: the CUDA runtime's synchronize
calls the profiler records (each one a wait of the host for the device's queue:
``.item()``, ``.tolist()``, ``nonzero``, a copy to pageable memory), for the whole
``predict`` (forward and postprocessing); ``--static on|off`` and ``--graphs``
compare the forwards (``bench/bare.py``).

``--cuda-path`` runs the CUDA code path (fused network, batched selection, masks
pasted and run-length coded in a GPU's chunks) on the CPU, to count its operators
where there is no GPU. The count is then a GPU's but for the steps cuDNN fuses
(on the CPU each ``model.inference.fusion`` convolution + ReLU is up to three operators).
"""

import argparse
import math
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch.profiler import ProfilerActivity, profile

import model.inference.masks
import model.inference.predictor
import model.inference.rle
from bench.bare import (
    add_model_arguments,
    bench_jpegs,
    capture_graphs,
    decode_jpegs,
    load_predictor,
    prepare_model,
    static_note,
    static_wanted,
)
from bench.results import machine
from model.inference.options import PredictOptions


def profile_batch(predictor, images, batch_size: int, rows: int, stacks: bool = False) -> str:
    """The tables; with ``stacks``, also the top ops by the Python lines that called
    them (a second, slower profile: recording stacks costs host time)."""
    batch, options = images[:batch_size], [PredictOptions()] * batch_size
    for _ in range(3):
        predictor.predict(batch, options)
    activities = [ProfilerActivity.CPU]
    if predictor.device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        for _ in range(3):
            predictor.predict(batch, options)
    calls = len(python_calls(prof.events())) / 3
    syncs = host_syncs(prof.events()) / 3
    keys = ["self_cpu_time_total"]
    if predictor.device.type == "cuda":  # the key's name depends on the torch version
        keys.insert(0, "self_device_time_total")
    what = f"3 batches of {batch_size}"
    tables = [top_ops(prof.key_averages(), key, rows, what) for key in keys]
    tables.append(f"operators called from Python per batch (views excluded): {calls:.0f}")
    if predictor.device.type == "cuda":
        tables.append(f"host syncs per batch (CUDA synchronize calls): {syncs:.1f}")
    else:
        tables.append("host syncs per batch: none to count on the CPU (no device queue)")
    if stacks:
        with profile(activities=activities, with_stack=True) as prof:
            for _ in range(3):
                predictor.predict(batch, options)
        tables.append(top_lines(prof.events(), keys[0], rows, what))
    return "\n".join(table for table in tables if table)


# frames that only pass a call on: the line worth naming is the one that called them
PASSING = ("torch/nn/modules/", "torch/utils/", "torch/_ops.py", "torch/nn/functional.py")


def top_lines(events, key: str, rows: int, what: str) -> str:
    """Self time (``key``) of each operator by the Python line that called it: the
    nearest frame outside torch's pass-through modules."""
    totals: dict[tuple[str, str], list[float]] = {}
    for event in events:
        if ".py(" in event.name:
            continue
        micros = getattr(event, key, None)  # the profiler's times are microseconds
        if micros is None:
            micros = getattr(event, key.replace("device", "cuda"), 0)
        if not micros:
            continue
        caller = event.cpu_parent
        while caller is not None and (
            ".py(" not in caller.name or any(p in caller.name for p in PASSING)
        ):
            caller = caller.cpu_parent
        line = caller.name.split("site-packages/")[-1] if caller is not None else "?"
        total = totals.setdefault((event.name, line), [0, 0.0])
        total[0] += 1
        total[1] += micros
    top = sorted(totals.items(), key=lambda item: -item[1][1])[:rows]
    lines = [f"top {rows} ops by {key}, {what}, by the Python line that called them:"]
    lines += [
        f"{micros / 1000:10.3f} ms {calls:6d} calls  {name:32s} {line}"
        for (name, line), (calls, micros) in top
    ]
    return "\n".join(lines)


def top_ops(averages, key: str, rows: int, what: str) -> str:
    for name in (key, key.replace("device", "cuda")):
        try:
            table = averages.table(sort_by=name, row_limit=rows, max_name_column_width=60)
        except (AttributeError, KeyError, ValueError):
            continue
        return f"top {rows} ops by {name}, {what}:\n{table}"
    return ""


# operators that only make a view or read metadata: no kernel
VIEWS = {
    f"aten::{name}"
    for name in (  # noqa: SIM905
        "view as_strided reshape _reshape_alias select slice unsqueeze squeeze permute t "
        "transpose expand expand_as view_as split unbind chunk narrow flatten unflatten "
        "size detach alias lift_fresh empty result_type"
    ).split()
}


# the CUDA runtime calls that block the host until the device catches up
SYNC_CALLS = {"cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize"}


def host_syncs(events) -> int:
    """How many times the host waited for the device, by the runtime calls recorded."""
    return sum(1 for event in events if event.name in SYNC_CALLS)


def python_calls(events) -> list:
    """The aten and torchvision operators Python called (not those they called)."""

    def operator(event) -> bool:
        return event is not None and event.name.startswith(("aten::", "torchvision::"))

    return [e for e in events if operator(e) and not operator(e.cpu_parent) and e.name not in VIEWS]


def plan_memory_as_on_a_gpu() -> None:
    """Paste masks and find their runs in the chunks a GPU uses: the CPU splits
    them finer to stay in its caches (more operators), a GPU only by memory."""
    model.inference.masks._CPU_MAX_WASTE = math.inf
    model.inference.rle._CPU_CHUNK_BYTES = 2**62  # every mask at once
    model.inference.predictor._GROUP_BYTES_CPU = model.inference.predictor._GROUP_BYTES_DEVICE


def time_decoders(jpegs: list[bytes], device: torch.device, repeats: int = 50) -> str:
    """ms per image: Pillow alone and with 8 threads; nvJPEG likewise."""
    lines = []

    def pillow(data):
        return decode_jpegs([data])[0]

    decoders = {"Pillow": pillow}
    if device.type == "cuda":
        from torchvision.io import ImageReadMode, decode_jpeg

        def nvjpeg(data):
            encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)

        decoders["nvJPEG"] = nvjpeg
    for name, decode in decoders.items():
        for threads in (1, 8):
            work = [jpegs[i % len(jpegs)] for i in range(repeats)]
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(decode, work[:threads]))  # warm-up
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                list(pool.map(decode, work))
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
            ms = 1000 * (time.perf_counter() - start) / repeats
            lines.append(f"{name}, {threads} thread(s): {ms:.2f} ms per 640x480 image")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rows", type=int, default=15)
    parser.add_argument(
        "--cuda-path",
        action="store_true",
        help="fused network, batched selection, a GPU's mask chunks on any device",
    )
    parser.add_argument("--stacks", action="store_true", help="also top ops by calling line")
    args = parser.parse_args(argv)
    if args.graphs and torch.device(args.device).type != "cuda":
        parser.error("--graphs needs a CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    jpegs = bench_jpegs()
    images = decode_jpegs(jpegs)
    with tempfile.TemporaryDirectory() as tmp:
        spec = prepare_model(args.model, Path(tmp), min_size=args.min_size, max_size=args.max_size)
        path = {"fused": True, "vectorized": True} if args.cuda_path else {}
        if args.cuda_path:
            plan_memory_as_on_a_gpu()
        predictor = load_predictor(
            spec,
            args.device,
            args.precision,
            static=static_wanted(args),
            runtime=args.runtime,
            **path,
        )
    if args.graphs:
        capture_graphs(predictor, [args.batch_size])
    images = (images * args.batch_size)[: max(args.batch_size, len(images))]
    print(f"{args.model}, {args.precision}, batch {args.batch_size}; {machine(args.device)}\n")
    print(profile_batch(predictor, images, args.batch_size, args.rows, args.stacks))
    print(static_note(predictor))
    print(time_decoders(jpegs, predictor.device))


if __name__ == "__main__":
    main()
