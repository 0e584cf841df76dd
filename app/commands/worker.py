"""``maskrcnn worker``: the training worker on its own, for
deployments whose API replicas run with ``MASKRCNN_RUN_WORKER=false``.

It uses the same settings as ``maskrcnn serve`` (``DATABASE_URL``, ``DATA_DIR``,
``DEVICE``, ``JOB_*``). SIGTERM or Ctrl-C stops it gracefully: no new claims; a
running job's training process is stopped and the job marked ``failed`` with the
reason. A second signal exits at once (the stale-job check of another worker or
server then fails the job).
"""

import argparse
import logging
import signal
import sys

from app.logs import configure_logging
from app.settings import SettingsError, load_settings

log = logging.getLogger(__name__)


def add_parser(subparsers: argparse._SubParsersAction, summary: str) -> None:
    parser = subparsers.add_parser(
        "worker",
        help=summary,
        description="Claim queued training jobs from the job store (MASKRCNN_DATABASE_URL) "
        "and run each in its own process. Settings come from MASKRCNN_* variables.",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from app.store.db import Database
    from app.training.datasets import sweep_staging
    from app.training.worker import Worker

    try:
        settings = load_settings()
    except SettingsError as e:
        print(f"maskrcnn worker: {e}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    db = Database.from_settings(settings, background=True)
    # what a killed job left half-fetched from the object store (old entries only)
    sweep_staging(settings.data_dir)
    worker = Worker(db, settings)

    def stop(signum: int, _frame) -> None:
        log.info("%s: stopping the worker", signal.Signals(signum).name)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second signal ends it at once
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        worker.request_stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    worker.start()
    while worker.alive:  # the main thread stays free for the signal handlers
        worker.join(0.5)
    db.dispose()
    if worker.error:
        print(f"maskrcnn worker: error: {worker.error}", file=sys.stderr)
        return 1
    return 0
