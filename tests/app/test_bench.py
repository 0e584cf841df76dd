"""The benchmark tooling measures what it says: the load generator's counts agree
with what a real server saw, and each script rewrites only its own section of
``bench/RESULTS.md``."""

import io
import json
import subprocess
import sys

from PIL import Image

from bench.results import write_section
from tests.app.conftest import REPO, scene


def test_load_generator_counts_what_the_server_answered(server, tmp_path):
    for i in range(2):
        Image.fromarray(scene(96, 128, i)).save(tmp_path / f"{i}.jpg", format="JPEG")
    before = server.metric("maskrcnn_images_forwarded_total")
    command = [sys.executable, str(REPO / "bench" / "loadgen.py"), "--url", server.url]
    command += ["--images", str(tmp_path), "--concurrency", "2", "--seconds", "4"]
    command += ["--warmup", "1", "--processes", "2"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)
    summary = json.loads(done.stdout)
    forwarded = server.metric("maskrcnn_images_forwarded_total") - before
    assert summary["errors"] == {}, summary
    assert summary["requests"] >= 2, summary
    # the window counts only answers inside it; warm-up and the last replies are extra
    assert summary["requests"] <= forwarded
    assert summary["images_per_s"] == summary["requests"] / 4
    assert 0 < summary["p50_ms"] <= summary["p99_ms"], summary
    assert summary["detections"] is not None and summary["detections"] >= 0


def test_a_script_replaces_only_its_own_section(tmp_path):
    results = tmp_path / "RESULTS.md"
    write_section("## Bare: a", "## Bare: a\n\nold a\n", results)
    write_section("## Served: b", "## Served: b\n\n| b |\n", results)
    write_section("## Bare: a", "## Bare: a\n\nnew a\n", results)
    text = results.read_text()
    assert text.startswith("# Benchmark results\n\n## Bare: a\n\nnew a\n\n## Served: b")
    assert "old a" not in text and text.count("## Bare: a") == 1
    assert text.endswith("| b |\n")


def test_rendered_images_are_the_bench_size():
    from bench.bare import IMAGE_SIZE, bench_jpegs, decode_jpegs

    jpegs = bench_jpegs(count=2)
    assert [Image.open(io.BytesIO(j)).size for j in jpegs] == [IMAGE_SIZE[::-1]] * 2
    assert [tuple(t.shape) for t in decode_jpegs(jpegs)] == [(3, *IMAGE_SIZE)] * 2


def test_the_overhead_script_serves_jpegs_left_for_a_model_process():
    command = [sys.executable, str(REPO / "bench" / "overhead.py"), "--model-process"]
    command += ["--keep-jpeg", "--seconds", "1", "--warmup", "0.5", "--no-write"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)
    [row] = [line for line in done.stdout.splitlines() if line.startswith("| header only")]
    requests_per_s, cpu_ms = (float(cell) for cell in row.split("|")[2:4])
    assert requests_per_s > 0 and cpu_ms > 0, row
    assert row.rstrip(" |").endswith("none"), row  # no errors
