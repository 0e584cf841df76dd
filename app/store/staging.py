"""Folders made whole before anyone sees them: filled under ``DATA_DIR/tmp`` (swept
after a crash, ``app.training.datasets.sweep_staging``), then renamed into place."""

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def staging(data_dir: Path, prefix: str) -> Iterator[Path]:
    """A new empty folder under ``DATA_DIR/tmp``, removed after the block unless
    ``publish`` moved it away."""
    root = data_dir / "tmp"
    root.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=root))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def publish(staged: Path, final: Path) -> None:
    """Rename ``staged`` to ``final`` whole (``OSError`` when ``final`` is a folder
    that is not empty), readable by other users of the volume: mkdtemp's 0o700
    would hide it from a worker run as another user."""
    staged.chmod(0o755)
    final.parent.mkdir(parents=True, exist_ok=True)
    os.rename(staged, final)
