"""The host application's side of the long-lived model process (`host.server`): no torch, no Qt.

    process = ModelProcess(python_command(python) + ["serve"], cwd=..., env=...)
    job = process.job("detect", request).start()     # starts the process on first use, sends the request
    while not job.finished:                          # a GUI polls from a timer instead of looping
        for event in job.poll(): ...                 # never waits
    job.outcome()                                    # the result event, or a WorkerError saying why not

A `ModelJob` has the interface of a one-shot `WorkerProcess` (start, poll, finished, cancelled, cancel, outcome,
last, events, log_tail), so a GUI follows either the same way. Cancel asks the process to end the job at its next
step (the models stay loaded); when the job has not ended `cancel_grace_s` later, the process is killed and the
next request starts a new one. When the process dies (a crash, the system killing it for memory), each job still
open ends with a one-line WorkerError and the next request starts a new process.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from CTFoundationLib.errors import WorkerError
from CTFoundationLib.host.process import FAILURE_PREFIX, LOG_TAIL_LINES, ChildTraceback, Event, WorkerProcess

CANCEL_GRACE_S = 15.0  # a job still running this long after Cancel: the process is killed (models reload later)
STOP_GRACE_S = 5.0


class ModelJob:
    """One request to the model process, followed by polling (see the module docstring)."""

    def __init__(self, process: ModelProcess, op: str, request: Mapping[str, Any]) -> None:
        self.process, self.op, self.request = process, op, dict(request)
        self.id: int | None = None
        self.events: list[Event] = []
        self._new: list[Event] = []
        self.cancelled = False
        self._cancel_at: float | None = None
        self.finished = False

    @property
    def log_tail(self) -> deque[str]:
        return self.process.log_tail

    def start(self) -> ModelJob:
        self.process.submit(self)
        return self

    def deliver(self, event: Event) -> None:
        """An event of this job (from `ModelProcess.pump`); a result, error or cancelled event ends it."""
        if self.finished:
            return
        self._new.append(event)
        self.events.append(event)
        if event["type"] == "cancelled":
            self.cancelled = True
        self.finished = event["type"] in ("result", "error", "cancelled")

    def poll(self) -> list[Event]:
        """The job's events since the last call (never waits)."""
        self.process.pump()
        if self._cancel_at is not None and not self.finished and time.monotonic() > self._cancel_at:
            self.process.kill(f"the model process was stopped to cancel job {self.id}")
            self.process.pump()
        new, self._new = self._new, []
        return new

    def cancel(self) -> None:
        """End the job at its next step; a chat answer stops at its next token (its text so far is kept)."""
        if self.finished or self.id is None:
            return
        self.process.send({"id": next(self.process.ids), "op": "cancel", "job": self.id})
        self.cancelled = True
        self._cancel_at = time.monotonic() + self.process.cancel_grace_s

    def wait(self, timeout_s: float | None = None, poll_s: float = 0.02) -> Event:
        """Block until the job ended; returns its outcome (raises as `outcome` does)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not self.finished:
            if deadline is not None and time.monotonic() > deadline:
                raise WorkerError(f"the model process did not finish job {self.id} ({self.op}) within {timeout_s:g} s")
            self.poll()
            time.sleep(poll_s)
        self.poll()
        return self.outcome()

    def last(self, event_type: str) -> Event | None:
        return next((e for e in reversed(self.events) if e["type"] == event_type), None)

    def outcome(self) -> Event:
        """The `result` event; otherwise a one-line WorkerError (the child's traceback or output chained under it)."""
        if not self.finished:
            raise WorkerError("the model process is still working on this job")
        result, error = self.last("result"), self.last("error")
        if result is not None:
            return result
        if self.cancelled:
            raise WorkerError("cancelled by the user")
        prefix = FAILURE_PREFIX.get(error.get("kind"), "The background task failed")
        details = error.get("details") or "\n".join(self.log_tail)
        raise WorkerError(f"{prefix}: {error.get('message', '')}") from ChildTraceback(details or "(no output)")


class ModelProcess:
    """The long-lived model process: started on the first request, started again after it ended.

    command: e.g. python_command(PythonSlicer) + ["serve"]. on_log: called (on the polling thread) with every
    output line that is not an event. `starts` counts the processes started.
    """

    def __init__(self, command: Sequence[str], cwd: Path | str | None = None, env: Mapping[str, str] | None = None,
                 on_log: Callable[[str], None] | None = None, cancel_grace_s: float = CANCEL_GRACE_S) -> None:
        self.command, self.cwd, self.on_log = [str(part) for part in command], cwd, on_log
        self.env = dict(env) if env is not None else None
        self.cancel_grace_s = cancel_grace_s
        self.ids = itertools.count(1)
        self.starts = 0
        self.log_tail: deque[str] = deque(maxlen=LOG_TAIL_LINES)
        self._worker: WorkerProcess | None = None
        self._jobs: dict[int, ModelJob] = {}
        self._why_killed: str | None = None
        self._lock = threading.Lock()

    @property
    def running(self) -> bool:
        return self._worker is not None and self._worker.returncode is None

    @property
    def pid(self) -> int | None:
        return self._worker.pid if self.running else None

    def job(self, op: str, request: Mapping[str, Any] | None = None) -> ModelJob:
        return ModelJob(self, op, request or {})

    def submit(self, job: ModelJob) -> None:
        """Send the job's request (starting the process when none runs)."""
        with self._lock:
            if self._worker is not None and not self.running:
                self._settle(self._worker)
            if not self.running:
                self._start()
            job.id = next(self.ids)
            self._jobs[job.id] = job
        self.send({**job.request, "id": job.id, "op": job.op})

    def send(self, request: Mapping[str, Any]) -> None:
        try:
            self._worker.stdin.write(json.dumps(request, default=str) + "\n")
            self._worker.stdin.flush()
        except (OSError, ValueError, AttributeError):
            pass  # the process is gone: pump() ends the open jobs with the reason

    def pump(self) -> None:
        """Hand every event that arrived to its job; when the process has ended, end the jobs still open."""
        with self._lock:
            if self._worker is not None:
                self._deliver(self._worker)

    def _deliver(self, worker: WorkerProcess) -> None:
        for event in worker.poll():
            job = self._jobs.get(event.get("job"))
            if job is not None:
                job.deliver(event)
                if job.finished:
                    del self._jobs[job.id]
        self.log_tail.extend(worker.log_tail)
        worker.log_tail.clear()
        if worker.finished:
            self._ended(worker)

    def _settle(self, worker: WorkerProcess, timeout_s: float = STOP_GRACE_S) -> None:
        """A process that has exited: read the rest of its output, end its jobs (before a new one starts)."""
        deadline = time.monotonic() + timeout_s
        while self._worker is worker and not worker.finished and time.monotonic() < deadline:
            self._deliver(worker)
            time.sleep(0.02)
        if self._worker is worker:
            self._deliver(worker)
        if self._worker is worker:
            self._ended(worker)

    def unload(self) -> ModelJob | None:
        """Free every loaded model (None: no process runs, nothing is loaded)."""
        return self.job("unload").start() if self.running else None

    def kill(self, reason: str) -> None:
        """End the process now (its models and chats with it); open jobs end with `reason`."""
        self._why_killed = reason
        if self._worker is not None:
            self._worker.cancel()

    def stop(self) -> None:
        """End the process: stdin closed (it finishes the job at hand quickly), killed if it lingers."""
        worker = self._worker
        if worker is None:
            return
        try:
            worker.stdin.close()
        except OSError:
            pass
        deadline = time.monotonic() + STOP_GRACE_S
        while worker.returncode is None and time.monotonic() < deadline:
            time.sleep(0.05)
        self.kill("the model process was stopped")
        self.pump()

    def _start(self) -> None:
        self._worker = WorkerProcess(self.command, cwd=self.cwd, env=self.env, on_log=self.on_log, stdin=True)
        self._worker.start()
        self._why_killed = None
        self.starts += 1

    def _ended(self, worker: WorkerProcess) -> None:
        """The process is gone: each open job gets a one-line error; the next request starts a new process."""
        reason = self._why_killed or (
            f"the model process stopped unexpectedly (exit code {worker.returncode}); its loaded models are gone "
            "and the next request starts a new one")
        tail = "\n".join(self.log_tail) or "(no output)"
        for job in list(self._jobs.values()):
            if job.cancelled:
                job.deliver({"type": "cancelled", "job": job.id})
            else:
                job.deliver({"type": "error", "job": job.id, "kind": "WorkerError", "message": reason,
                             "details": tail})
        self._jobs.clear()
        self._worker = None
