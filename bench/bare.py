"""Bare model throughput: ``Predictor.predict`` on batches of the same
640x480 images, called directly (no HTTP, no queue), by batch size.

    python bench/bare.py --model demo --device cpu --batch-sizes 1,2,4,8 --seconds 10
    python bench/bare.py --model r50 --device cuda --precision fp16
    python bench/bare.py --model r50 --device cuda --precision fp16 --graphs

``--model demo`` is the bundled demo model. ``--model r50`` is torchvision's
``maskrcnn_resnet50_fpn`` (91 classes, its default 800/1333 resize unless
``--min-size/--max-size`` say otherwise) with random weights, its classifier's
logits scaled down so that it keeps a realistic number of detections at the
default score threshold (about 10-40 per image instead of 100; the table reports
the count). ``--static on|off`` picks the forward (``Predictor(static=...)``, off by
default), ``--graphs`` turns the fixed-shape one on and captures it in CUDA graphs
for the bench images' size and the batch sizes first. Images are synthetic shapes scenes saved
as JPEG and decoded with Pillow, the same bytes ``bench/served.py`` posts. Each
point warms up, then runs batches for ``--seconds`` (at least one). Writes the
table as its own section of ``bench/RESULTS.md``.
"""

import argparse
import io
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from PIL import Image

import model.inference.fusion
from bench.results import command_line, machine, write_section
from model.inference.images import pil_to_tensor
from model.inference.options import PredictOptions
from model.inference.predictor import Predictor
from model.loading import load_model
from model.training.synthetic import SyntheticConfig, render_image

IMAGE_SIZE = (480, 640)  # height, width
NUM_IMAGES = 8
# Random-weight R50-FPN logits are large enough that almost every proposal scores
# over 0.5 (100 detections an image, the cap); scaling them by this factor gives
# 10-40 on the bench images, the order of a busy COCO scene.
R50_LOGIT_SCALE = 0.75


@dataclass
class Point:
    batch_size: int
    images_per_s: float
    ms_per_batch: float
    detections: float  # per image
    runs: int


def bench_jpegs(count: int = NUM_IMAGES, seed: int = 2024) -> list[bytes]:
    """``count`` 640x480 JPEGs of synthetic shapes (rendered square, cropped)."""
    height, width = IMAGE_SIZE
    jpegs = []
    for index in range(count):
        array, _ = render_image(SyntheticConfig(image_size=width, seed=seed), index)
        top = (width - height) // 2
        buffer = io.BytesIO()
        Image.fromarray(array[top : top + height]).save(buffer, format="JPEG", quality=90)
        jpegs.append(buffer.getvalue())
    return jpegs


def decode_jpegs(jpegs: list[bytes]) -> list[torch.Tensor]:
    images = []
    for data in jpegs:
        with Image.open(io.BytesIO(data)) as image:
            images.append(pil_to_tensor(image))
    return images


def prepare_model(
    model: str, workdir: Path, *, min_size: int | None = None, max_size: int | None = None
) -> str:
    """A model spec ``load_model`` (and ``maskrcnn serve --model``) accepts:
    ``demo``, or a checkpoint of the random-weight R50-FPN written to ``workdir``."""
    if model == "demo":
        return "demo"
    from model.checkpoint import save_checkpoint
    from model.networks import build_network

    kwargs: dict = {"num_classes": 91}
    kwargs |= {"min_size": min_size} if min_size else {}
    kwargs |= {"max_size": max_size} if max_size else {}
    torch.manual_seed(0)
    network = build_network("maskrcnn_resnet50_fpn", **kwargs)
    with torch.no_grad():
        network.roi_heads.box_predictor.cls_score.weight.mul_(R50_LOGIT_SCALE)
        network.roi_heads.box_predictor.cls_score.bias.mul_(R50_LOGIT_SCALE)
    path = Path(workdir) / "r50-random.safetensors"
    classes = [{"id": i, "name": f"class{i}"} for i in range(1, 91)]
    save_checkpoint(
        path, network, architecture="maskrcnn_resnet50_fpn", arch_kwargs=kwargs, classes=classes
    )
    return str(path)


def load_predictor(
    spec: str,
    device: str,
    precision: str,
    *,
    fused: bool | None = None,
    vectorized: bool | None = None,
    static: str = "off",
    runtime: str = "auto",
) -> Predictor:
    """As ``maskrcnn serve`` builds it (``app.serving.loading.load_predictor``);
    ``fused=False`` turns ``model.inference.fusion``'s rewrites off (an experiment);
    ``fused=True, vectorized=True`` runs the CUDA code path on the CPU."""
    loaded = load_model(spec, device=device)
    return Predictor(
        loaded.network,
        loaded.info,
        device=device,
        precision=precision,
        fused=fused,
        vectorized=vectorized,
        static=static == "on",
        runtime=runtime,
    )


def static_wanted(args: argparse.Namespace) -> str:
    """``--static``, turned on by ``--graphs`` (graphs capture the static forward)."""
    return "on" if args.graphs else args.static


def capture_graphs(predictor: Predictor, batch_sizes: list[int]) -> None:
    """``--graphs``: the static forward captured for the bench images' size."""
    start = time.perf_counter()
    predictor.capture_graphs([IMAGE_SIZE], batch_sizes)
    print(f"captured CUDA graphs in {time.perf_counter() - start:.1f} s", file=sys.stderr)


def static_note(predictor: Predictor) -> str:
    """How the forward ran: the static path's batches and fallbacks, graph replays."""
    static = predictor.static
    if static is None:
        return "Forward: dynamic (no static shapes)."
    replays = static.graphs.replays if static.graphs is not None else 0
    return (
        f"Forward: static shapes, {static.runs} batches, {static.fallbacks} fell back to the "
        f"dynamic path, {replays} replayed CUDA graphs."
    )


def measure(
    predictor: Predictor, images: list[torch.Tensor], batch_size: int, seconds: float
) -> Point:
    """Images/s of ``predict`` on batches cycling through ``images``."""
    options = [PredictOptions()] * batch_size

    def batch(k: int) -> list[torch.Tensor]:
        return [images[(k * batch_size + i) % len(images)] for i in range(batch_size)]

    # warm-up: on a GPU at least 2 calls and 1 s (clocks rise, the allocator and
    # cuDNN settle on the new shapes)
    on_gpu = predictor.device.type == "cuda"
    calls, until = 0, time.perf_counter() + (1.0 if on_gpu else 0.0)
    while calls < (2 if on_gpu else 1) or time.perf_counter() < until:
        predictor.predict(batch(calls), options)
        calls += 1
    runs, detections = 0, 0
    start = time.perf_counter()
    while runs == 0 or time.perf_counter() - start < seconds:
        results = predictor.predict(batch(runs), options)  # ends on the host: no sync needed
        detections += sum(len(r.detections) for r in results)
        runs += 1
    elapsed = time.perf_counter() - start
    return Point(
        batch_size,
        images_per_s=runs * batch_size / elapsed,
        ms_per_batch=1000 * elapsed / runs,
        detections=detections / (runs * batch_size),
        runs=runs,
    )


class GraphedBackbone(torch.nn.Module):
    """Experiment (``--graph-backbone``): the backbone + FPN replayed as one CUDA
    graph per input shape, captured on first sight. The outputs live in the
    graph's memory and are overwritten by the next call, which is safe only
    because ``Predictor.forward`` is done with them by then (true in this script)."""

    def __init__(self, backbone: torch.nn.Module):
        super().__init__()
        self.backbone = backbone
        self.out_channels = backbone.out_channels
        self.graphs: dict = {}
        self.pool = None

    def forward(self, x: torch.Tensor):
        key = (tuple(x.shape), x.dtype, torch.is_autocast_enabled("cuda"))
        if key not in self.graphs:
            self.graphs[key] = self._capture(x)
        graph, static_in, static_out = self.graphs[key]
        static_in.copy_(x)
        graph.replay()
        return static_out

    def _capture(self, x: torch.Tensor):
        static_in = x.clone()
        dtype = torch.get_autocast_dtype("cuda")
        enabled = torch.is_autocast_enabled("cuda")
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.autocast("cuda", dtype, enabled, cache_enabled=False):
            for _ in range(2):
                self.backbone(static_in)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with (
            torch.cuda.graph(graph, pool=self.pool),
            torch.autocast("cuda", dtype, enabled, cache_enabled=False),
        ):
            static_out = self.backbone(static_in)
        self.pool = graph.pool()
        return graph, static_in, static_out


def section(model: str, device: torch.device, precision: str, extra: str = "") -> str:
    return f"## Bare model throughput: {model} on {device.type}, {precision}{extra}"


def experiments(args: argparse.Namespace) -> str:
    flags = [
        f
        for f in ("cudnn_benchmark", "unfused", "plain_blocks", "loop_selection", "graph_backbone")
        if getattr(args, f, False)
    ]
    if getattr(args, "graphs", False):
        flags.append("cuda graphs")
    elif getattr(args, "static", "off") == "on":
        flags.append("static shapes")
    return "".join(f", {flag}" for flag in flags)


def render(points: list[Point], args: argparse.Namespace, command: str) -> str:
    device = torch.device(args.device)
    base = points[0].images_per_s
    lines = [
        section(args.model, device, args.precision, experiments(args)),
        "",
        f"`Predictor.predict` (network, per-image options, mask pasting, RLE strings) on "
        f"{IMAGE_SIZE[1]}x{IMAGE_SIZE[0]} JPEG-decoded images, default options; "
        f"each point {args.seconds:g} s after a warm-up.",
        "",
        f"| batch | images/s | ms/batch | vs batch {points[0].batch_size} | detections/image |",
        "|---:|---:|---:|---:|---:|",
    ]
    for p in points:
        lines.append(
            f"| {p.batch_size} | {p.images_per_s:.2f} | {p.ms_per_batch:.1f} | "
            f"{p.images_per_s / base:.2f}x | {p.detections:.1f} |"
        )
    best = max(points, key=lambda p: p.images_per_s)
    lines += [
        "",
        f"Best: {best.images_per_s:.2f} images/s at batch {best.batch_size}, "
        f"{best.images_per_s / base:.2f}x batch {points[0].batch_size}.",
        "",
        getattr(args, "static_note", ""),
        "",
        f"Machine: {machine(device)}.",
        "",
        f"Command: `{command}`",
    ]
    return "\n".join(lines)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", choices=("demo", "r50"), default="demo")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default="fp32")
    parser.add_argument(
        "--runtime",
        choices=("auto", "torch", "openvino"),
        default="auto",
        help="what runs the dense parts, as MASKRCNN_RUNTIME (auto: OpenVINO on the CPU)",
    )
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--min-size", type=int, help="r50 only: the resize's shorter side")
    parser.add_argument("--max-size", type=int, help="r50 only: the resize's longer side cap")
    parser.add_argument(
        "--static",
        choices=("on", "off"),
        default="off",
        help="the fixed-shape forward (model.inference.static); --graphs turns it on",
    )
    parser.add_argument(
        "--graphs", action="store_true", help="capture the static forward in CUDA graphs"
    )


def main(argv: list[str] | None = None) -> list[Point]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    parser.add_argument("--batch-sizes", default="1,2,4,8,16")
    parser.add_argument("--seconds", type=float, default=5.0, help="timed seconds per point")
    parser.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md")
    parser.add_argument("--cudnn-benchmark", action="store_true", help="experiment")
    parser.add_argument(
        "--unfused",
        action="store_true",
        help="experiment: without model.inference.fusion (norms, weight casts, NCHW layout)",
    )
    parser.add_argument(
        "--plain-blocks",
        action="store_true",
        help="experiment: model.inference.fusion without its fused residual blocks",
    )
    parser.add_argument(
        "--loop-selection",
        action="store_true",
        help="experiment: torchvision's per-image proposal filtering and selection",
    )
    parser.add_argument(
        "--graph-backbone", action="store_true", help="experiment: CUDA graphs, backbone + FPN"
    )
    args = parser.parse_args(argv)
    if (args.graph_backbone or args.graphs) and torch.device(args.device).type != "cuda":
        parser.error("--graph-backbone and --graphs need a CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    images = decode_jpegs(bench_jpegs())
    if args.plain_blocks:  # fuse_network then folds, casts and lays out, fuses no block
        model.inference.fusion.fuse_blocks = lambda module: 0
    with tempfile.TemporaryDirectory() as tmp:
        spec = prepare_model(args.model, Path(tmp), min_size=args.min_size, max_size=args.max_size)
        predictor = load_predictor(
            spec,
            args.device,
            args.precision,
            fused=False if args.unfused else None,
            static=static_wanted(args),
            runtime=args.runtime,
        )
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    if args.loop_selection:
        predictor.vectorized = False
    if args.graph_backbone:
        predictor.network.backbone = GraphedBackbone(predictor.network.backbone)
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    if args.graphs:
        capture_graphs(predictor, sizes)
    points = []
    for size in sizes:
        points.append(measure(predictor, images, size, args.seconds))
        p = points[-1]
        print(
            f"batch {size}: {p.images_per_s:.2f} images/s, {p.detections:.1f} detections/image",
            file=sys.stderr,
        )
    args.static_note = static_note(predictor)
    print(args.static_note, file=sys.stderr)
    text = render(points, args, command_line("bench/bare.py", argv))
    print(text)
    if not args.no_write:
        heading = section(args.model, torch.device(args.device), args.precision, experiments(args))
        write_section(heading, text)
    return points


if __name__ == "__main__":
    main()
