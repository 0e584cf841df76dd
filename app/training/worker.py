"""The training worker: claims queued jobs and runs each in its own process.

Embedded in ``maskrcnn serve`` as a thread (``RUN_WORKER``, on by default) or on
its own as ``maskrcnn worker``. Every ``WORKER_POLL_S`` it marks ``failed`` the
running jobs of any worker, on any replica, that stopped heartbeating for
``JOB_HEARTBEAT_TIMEOUT_S``; when idle, it claims the oldest queued job
(``app.training.jobs.claim_next_job``) and starts its process, or its processes under
torchrun (``app.training.launch``).

While that process trains, the worker heartbeats the job every ``JOB_HEARTBEAT_S``
and stops the process when a cancel is requested or the job stopped being its
own; when it ends, the worker records what the process could not: a crash (exit
code and the tail of its log), a cancel, or its own shutdown. A server with
``RUN_WORKER`` off still runs the stale-job check (``claim_jobs=False``), so a job
is never left ``running`` while any replica is up.

A database outage shorter than ``JOB_HEARTBEAT_TIMEOUT_S`` loses no job: the
training process waits it out (``app.training.runner``), the worker records a
job's end with the same patience, and a worker that could not reach the
database judges no other worker's heartbeats until a whole timeout has passed
since it could again (theirs were cut off too). A longer one fails the job with
the database named.
"""

import logging
import os
import secrets
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError

from app.settings import Settings
from app.store.db import Database, DatabaseUnreachable, SchemaError, TrainingJobRecord, retrying
from app.training import jobs
from app.training.launch import job_command
from app.training.runner import EXIT_DATABASE, EXIT_STOPPED, job_threads

log = logging.getLogger(__name__)

STOP_GRACE_S = 10.0  # between SIGTERM and SIGKILL for a training process
_SOURCE_ROOT = str(Path(__file__).resolve().parents[1])


def default_worker_id() -> str:
    """Host and pid (which process to look at) and a random suffix (two workers
    in one process, e.g. tests, stay apart)."""
    return f"{socket.gethostname()[:80]}:{os.getpid()}:{secrets.token_hex(3)}"


class Worker:
    def __init__(
        self,
        db: Database,
        settings: Settings,
        *,
        worker_id: str | None = None,
        claim_jobs: bool = True,
        paused: Callable[[], bool] | None = None,
    ):
        """``paused()`` true: claim nothing for now (a draining server)."""
        self.db = db
        self.settings = settings
        self.worker_id = worker_id or default_worker_id()
        self.claim_jobs = claim_jobs
        self.paused = paused
        self.error: str | None = None  # why it gave up (a database it cannot use)
        self.unreachable_at: float | None = None  # monotonic: its last failed database call
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- life cycle -------------------------------------------------------------

    def start(self) -> None:
        """Run in a background thread (embedded mode)."""
        self._thread = threading.Thread(target=self.run, name="maskrcnn-worker", daemon=True)
        self._thread.start()

    def request_stop(self) -> None:
        """Stop claiming; a running job's process is stopped and the job failed."""
        self._stop.set()

    def stop(self, timeout: float = STOP_GRACE_S + 20) -> None:
        self.request_stop()
        self.join(timeout)

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def run(self) -> None:
        """Poll until ``request_stop``; database outages are logged and waited out."""
        if not self._wait_for_schema():
            return
        log.info("training worker %s started (claims jobs: %s)", self.worker_id, self.claim_jobs)
        poll = self.settings.worker_poll_s
        while not self._stop.is_set():
            try:
                self.fail_stale_jobs()
                job = jobs.claim_next_job(self.db, self.worker_id) if self._claiming() else None
            except SQLAlchemyError as e:
                self.unreachable_at = time.monotonic()
                log.warning("job store unavailable (%s); retrying in %g s", e, poll)
                job = None
            except Exception:  # e.g. a dead job's file on the shared volume; never give up
                log.exception("training worker %s: sweep or claim failed", self.worker_id)
                job = None
            if job is None:
                self._stop.wait(poll)
                continue
            try:
                self.run_job(job)
            except Exception:  # keep serving the queue; the stale check ends the job
                log.exception("training job %s: the worker failed to run it", job.id)
        log.info("training worker %s stopped", self.worker_id)

    def _claiming(self) -> bool:
        return self.claim_jobs and not (self.paused and self.paused())

    def _wait_for_schema(self) -> bool:
        """Create the schema (idempotent), retrying while the database is not up yet
        or another process creates it at the same moment (the API server beside an
        embedded worker: that collision is expected, so only repeats are logged)."""
        attempt = 0
        while not self._stop.is_set():
            try:
                self.db.create_schema()
                return True
            except SchemaError as e:
                self.error = str(e)
                log.critical("training worker %s cannot start: %s", self.worker_id, e)
                return False
            except SQLAlchemyError as e:
                attempt += 1
                level = logging.WARNING if attempt > 2 else logging.DEBUG
                log.log(level, "job store not ready (%s); retrying", e)
                self._stop.wait(min(0.1 * attempt, self.settings.worker_poll_s))
        return False

    def fail_stale_jobs(self) -> None:
        """Fail the jobs of workers silent for ``JOB_HEARTBEAT_TIMEOUT_S``, unless this
        worker itself could not reach the database within that time: the others'
        heartbeats may have been cut off as well, and get a timeout to resume."""
        timeout = self.settings.job_heartbeat_timeout_s
        if self.unreachable_at is not None and time.monotonic() - self.unreachable_at < timeout:
            return
        try:
            failed = jobs.fail_stale_jobs(self.db, timeout)
        except SQLAlchemyError:
            self.unreachable_at = time.monotonic()
            raise
        for job_id in failed:
            log.warning("training job %s failed: its worker stopped heartbeating", job_id)

    # -- one job -----------------------------------------------------------------

    def run_job(self, job: TrainingJobRecord) -> None:
        """Run a claimed job's process to its end and leave the job in a final state."""
        log.info("training job %s claimed by %s", job.id, self.worker_id)
        try:
            process = self._spawn(job.id, job.config.get("processes", 1))
        except OSError as e:
            jobs.finish_job(
                self.db, job.id, self.worker_id, "failed", f"cannot start training: {e}"
            )
            return
        ended_by = self._supervise(process, job.id)
        process.stdin.close()  # ranks a stopped launcher left behind see it and exit
        try:
            retrying(
                lambda: self._settle(job.id, process.returncode, ended_by),
                within_s=self.settings.job_heartbeat_timeout_s,
                what="recording the end of the job",
            )
        except (DatabaseUnreachable, SQLAlchemyError) as e:  # the stale check settles it
            self.unreachable_at = time.monotonic()
            log.error("cannot record the end of training job %s: %s", job.id, e)

    def _spawn(self, job_id: str, processes: int) -> subprocess.Popen:
        threads = str(max(1, job_threads(self.settings) // processes))  # each process's
        env = {
            **os.environ,
            # what the runner's load_settings() reads (app.training.runner)
            **self.settings.as_environment(
                "device",
                "runtime",
                "job_heartbeat_s",  # the timeout is checked against it
                "job_heartbeat_timeout_s",
                "log_level",
                "log_format",
                database_url=self.db.url,
                data_dir=self.db.data_dir,
                storage_url=self.db.objects.url if self.db.objects.remote else "",
                job_threads=threads,
            ),
            "OMP_NUM_THREADS": threads,
            "PYTHONPATH": os.pathsep.join(
                filter(None, [_SOURCE_ROOT, os.environ.get("PYTHONPATH")])
            ),
        }
        log_file = jobs.log_path(self.db, job_id)
        log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(log_file, "ab") as out:
            return subprocess.Popen(
                job_command(job_id, self.worker_id, processes),
                stdin=subprocess.PIPE,  # closes when this process ends: the child follows
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # a terminal's Ctrl-C reaches the worker only
            )

    def _supervise(self, process: subprocess.Popen, job_id: str) -> str:
        """Heartbeat until the process ends; returns why it ended: ``exited``,
        ``cancel``, ``drop`` (the job is no longer ours) or ``shutdown``."""
        every = self.settings.job_heartbeat_s
        next_beat = time.monotonic() + every
        while True:
            try:
                process.wait(timeout=min(every, 0.25))
                return "exited"
            except subprocess.TimeoutExpired:
                pass
            if self._stop.is_set():
                _end(process)
                return "shutdown"
            if time.monotonic() < next_beat:
                continue
            next_beat = time.monotonic() + every
            try:
                action = jobs.heartbeat(self.db, job_id, self.worker_id)
            except SQLAlchemyError as e:
                self.unreachable_at = time.monotonic()
                log.warning("heartbeat of training job %s failed: %s", job_id, e)
                continue
            if action != "run":
                _end(process)
                return action
            # the sweep goes on while a job runs: this may be the only worker, and a
            # job of its crashed predecessor must not wait for this one to end
            try:
                self.fail_stale_jobs()
            except Exception as e:  # the job at hand keeps its heartbeat
                log.warning("cannot fail the jobs of dead workers: %s", e)

    def _settle(self, job_id: str, code: int, ended_by: str) -> None:
        job = jobs.get_job(self.db, job_id)
        if job.state == "running" and job.worker_id == self.worker_id:
            if job.cancel_requested:
                jobs.finish_job(self.db, job_id, self.worker_id, "cancelled")
            else:
                reason = self._failure_reason(job_id, code, ended_by)
                jobs.finish_job(self.db, job_id, self.worker_id, "failed", reason)
        job = jobs.get_job(self.db, job_id)
        if job.state != "succeeded":
            jobs.remove_checkpoint(self.db, job_id)
        log.info("training job %s %s%s", job_id, job.state, f": {job.error}" if job.error else "")

    def _failure_reason(self, job_id: str, code: int, ended_by: str) -> str:
        if ended_by == "shutdown":
            return f"worker {self.worker_id} shut down while the job ran"
        if code == 0 or code == EXIT_STOPPED:
            return "the training process exited without a result"
        if code == EXIT_DATABASE:
            timeout = self.settings.job_heartbeat_timeout_s
            return f"the database was unreachable for more than {timeout:g} s while the job ran"
        how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
        tail = _tail(jobs.log_path(self.db, job_id))
        return f"the training process {how}" + (f": {tail}" if tail else "")


def _end(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _tail(path: Path, lines: int = 3, limit: int = 1000) -> str:
    """The last lines of a training log (the end of a traceback says what broke)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 8192))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    kept = [line.strip() for line in text.splitlines() if line.strip()][-lines:]
    return " | ".join(kept)[-limit:]
