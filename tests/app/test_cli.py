"""``maskrcnn --help`` and every command's ``--help`` answer without importing
torch (commands are imported lazily), and list what they should."""

import subprocess
import sys

import pytest

from app.cli import COMMANDS, command_in
from tests.app.conftest import REPO

HELP_WITHOUT_TORCH = """
import contextlib, io, sys
from app.cli import main
out = io.StringIO()
with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
    main(sys.argv[1:])
print(out.getvalue())
print("torch imported:", "torch" in sys.modules)
"""


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_answers_without_importing_torch(command):
    argv = ["--help"] if command is None else [command, "--help"]
    result = subprocess.run(
        [sys.executable, "-c", HELP_WITHOUT_TORCH, *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "torch imported: False" in result.stdout
    if command is None:
        assert all(name in result.stdout for name in COMMANDS)
    else:
        assert f"usage: maskrcnn {command}" in result.stdout


def test_the_command_is_the_first_positional_argument():
    assert command_in(["--log-level", "DEBUG", "train", "--dataset", "serve"]) == "train"
    assert command_in(["--help"]) is None
    assert command_in(["nope"]) is None


def test_an_unknown_command_is_refused_by_name():
    result = subprocess.run(
        [sys.executable, "-m", "app.cli", "nope"], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "invalid choice: 'nope'" in result.stderr
