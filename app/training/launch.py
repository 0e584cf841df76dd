"""How a worker starts one training job: ``python -m app.training.runner`` for a
job of one process; for a job of several, torch's own launcher (torchrun,
``torch.distributed.run --standalone --nproc-per-node N``) starting one runner a
process. They train as one DDP run (nccl on GPUs, gloo on the CPU); rank 0 alone
validates, writes progress and the checkpoint, and registers the model.

``python -m app.training.launch N JOB_ID WORKER_ID`` runs torchrun in this
process, so that it exits as its first failed rank did, with its code or by its
signal (torchrun's own exit code is 1 for any failure): the worker reads a stop, a
database outage or a kill from it as from a lone runner. When the worker goes away
(its pipe on stdin closes) or stops the job (SIGTERM), torchrun stops every rank
before it exits.
"""

import contextlib
import logging
import os
import signal
import sys

from app.logs import configure_logging
from app.settings import Settings, load_settings
from app.training.runner import when_parent_exits

log = logging.getLogger("app.training.launch")

RUNNER = "app.training.runner"


def process_limit(settings: Settings) -> int:
    """The most ``processes`` a job may ask for: ``JOB_MAX_PROCESSES``, or this
    machine's GPUs when jobs train on CUDA, else its cores."""
    if settings.job_max_processes:
        return settings.job_max_processes
    from model import process_capacity, resolve_device

    return process_capacity(resolve_device(settings.device))


def job_command(job_id: str, worker_id: str, processes: int) -> list[str]:
    """The command a worker runs for a job of ``processes`` processes."""
    if processes == 1:
        return [sys.executable, "-m", RUNNER, job_id, worker_id]
    return [sys.executable, "-m", __name__, str(processes), job_id, worker_id]


def torchrun_arguments(processes: int, job_id: str, worker_id: str) -> list[str]:
    # --standalone: a rendezvous of this node alone, on a free port
    return [
        "--standalone",
        f"--nproc-per-node={processes}",
        "--max-restarts=0",
        "--monitor-interval=0.5",
        "-m",
        RUNNER,
        job_id,
        worker_id,
    ]


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    processes, job_id, worker_id = argv if argv is not None else sys.argv[1:]
    settings = load_settings()
    configure_logging(settings.log_level, settings.log_format)
    # each rank watches the pipe too, and exits; this stops the ranks that do not
    when_parent_exits(lambda: os.kill(os.getpid(), signal.SIGTERM))
    args = get_args_parser().parse_args(torchrun_arguments(int(processes), job_id, worker_id))
    try:
        run(args)
        return 0
    except SignalException as e:  # the worker stopped the job: every rank is stopped
        log.info("job %s: stopped by %s", job_id, e.sigval.name)
        return 128 + e.sigval
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        code = failure.exitcode
        how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
        log.error("job %s: rank %d of %s %s", job_id, rank, processes, how)
        if code > 0:
            return code
        die_by(-code)  # so that the worker reads the same signal a lone runner gives
        return 128 - code


def die_by(sig: int) -> None:
    """End this process by signal ``sig``, whatever handler torchrun set for it."""
    with contextlib.suppress(OSError, ValueError):  # SIGKILL takes no handler
        signal.signal(sig, signal.SIG_DFL)
    os.kill(os.getpid(), sig)


if __name__ == "__main__":
    sys.exit(main())
