"""The long-lived model process: `python -m CTFoundationLib.host.worker serve` (Slicer starts it with PythonSlicer).

Requests come in on stdin, one JSON object per line: {"id": N, "op": OP, ...the job's request}. Jobs run one at a
time, in order, on a job thread, so that `cancel` (handled at once by the reading thread) can reach the running one.

    detect, ground, report      the requests of `host.jobs` (as the one-shot worker tasks take them)
    chat_start                  load CT-CHAT (kept) and open a conversation about a CT; result: {"session": id}
    chat_ask                    answer in a conversation (or {"report": true}); `token` events stream the text
    chat_close                  forget a conversation
    unload                      free every loaded model; result: {"unloaded": [kinds]}
    cancel                      {"id": N, "op": "cancel", "job": M}: a queued job M is dropped, a running one ends at
                                its next step (a chat answer at its next token, kept and marked stopped)

Events go to stdout as in the one-shot worker (`host.process.format_event`), each with "job": its request id:
`started`, `step`, `warning`, `note`, `token`, then exactly one of `result` (with `loads`, the model loads per kind
since the process started), `error` (kind, one-line message; `details` holds a traceback only for a bug) or
`cancelled`. The process sends `ready` (pid) first, and ends when stdin closes. Models stay loaded between jobs
(`inference.store.ModelStore`); they go with the process when it ends or crashes.
"""

from __future__ import annotations

import json
import os
import queue
import sys
import threading
import traceback
from collections.abc import Callable
from typing import Any, TextIO

from CTFoundationLib.errors import CTFoundationError, WorkerError
from CTFoundationLib.host import jobs
from CTFoundationLib.host.allocator import trim_freed_memory
from CTFoundationLib.host.process import format_event
from CTFoundationLib.inference.store import ModelStore

Request = dict[str, Any]
MODEL_OPS = ("detect", "ground", "report", "similar", "dicom", "chat_start", "chat_ask", "chat_close", "unload")


class ModelServer:
    """Reads requests, runs the jobs on one thread, writes events; keeps the models and chat sessions."""

    def __init__(self, out: TextIO = sys.stdout) -> None:
        self.out = out
        self.models = ModelStore()
        self.sessions = jobs.ChatSessions()
        self._write = threading.Lock()
        self._queue: queue.Queue[Request | None] = queue.Queue()
        self._cancelled: set[Any] = set()
        self._running: tuple[Any, threading.Event] | None = None
        self._closing = False  # stdin closed: the jobs still queued are dropped
        self._state = threading.Lock()

    def emit(self, event_type: str, job: Any = None, **fields) -> None:
        with self._write:
            print(format_event(event_type, job=job, **fields), file=self.out, flush=True)

    def serve(self, lines: TextIO) -> None:
        """Until `lines` ends: take requests; then let the running job stop and return."""
        runner = threading.Thread(target=self._run_jobs, name="ctfoundation-model-jobs", daemon=True)
        runner.start()
        self.emit("ready", pid=os.getpid())
        for line in lines:
            if line.strip():
                self.take(line)
        with self._state:
            self._closing = True
            if self._running is not None:
                self._running[1].set()
        self._queue.put(None)
        runner.join()

    def take(self, line: str) -> None:
        """One request line: a cancel now, a model job into the queue, anything else a one-line error event."""
        try:
            request = parse_request(line)
        except WorkerError as error:
            self.emit("error", job=request_id(line), kind="WorkerError", message=str(error), details="")
            return
        if request["op"] == "cancel":
            self.cancel(request.get("job"))
        else:
            self._queue.put(request)

    def cancel(self, job: Any) -> None:
        with self._state:
            if self._running is not None and self._running[0] == job:
                self._running[1].set()
            else:
                self._cancelled.add(job)

    def _run_jobs(self) -> None:
        while (request := self._queue.get()) is not None:
            job, stop = request["id"], threading.Event()
            with self._state:
                if job in self._cancelled or self._closing:
                    self._cancelled.discard(job)
                    self.emit("cancelled", job=job)
                    continue
                self._running = (job, stop)
            try:
                self._run(request, stop)
            finally:
                with self._state:
                    self._running = None

    def _run(self, request: Request, stop: threading.Event) -> None:
        job, op = request["id"], request["op"]
        context = jobs.JobContext(lambda event_type, **fields: self.emit(event_type, job=job, **fields),
                                  self.models, stop)
        self.emit("started", job=job, op=op)
        try:
            fields = self._operation(op)(request, context)
        except jobs.JobCancelled:
            self.emit("cancelled", job=job)
            return
        except CTFoundationError as error:
            self.emit("error", job=job, kind=type(error).__name__, message=str(error), details="")
            return
        except Exception as error:  # a bug: the process stays up; the traceback goes to the details for engineers
            self.emit("error", job=job, kind=type(error).__name__,
                      message=f"unexpected {type(error).__name__}: {error}", details=traceback.format_exc())
            return
        self.emit("result", job=job, op=op, loads=dict(self.models.loads), **fields)

    def _operation(self, op: str) -> Callable[[Request, jobs.JobContext], dict]:
        return {
            "detect": lambda request, context: {"path": str(jobs.detect(request, context))},
            "ground": lambda request, context: {"path": str(jobs.ground(request, context))},
            "report": lambda request, context: {"path": str(jobs.report(request, context))},
            "similar": lambda request, context: {"path": str(jobs.similar(request, context))},
            "dicom": lambda request, context: {"path": str(jobs.dicom(request, context))},
            "chat_start": lambda request, context: jobs.chat_start(request, context, self.sessions),
            "chat_ask": lambda request, context: jobs.chat_answer(request, context, self.sessions),
            "chat_close": lambda request, context: {"closed": self.sessions.sessions.pop(
                request.get("session"), None) is not None},
            "unload": lambda request, context: self.unload(),
        }[op]

    def unload(self) -> dict:
        """Free every model (and the chats that talk to them); memory goes back to the system."""
        self.sessions.sessions.clear()
        kinds = self.models.unload()
        trim_freed_memory()
        return {"unloaded": kinds}


def parse_request(line: str) -> Request:
    """A request line as a dict with an "id" and a known "op"; otherwise a one-line WorkerError."""
    try:
        request = json.loads(line)
    except ValueError as error:
        raise WorkerError(f"worker request is not JSON ({error}): {line[:80]!r}") from None
    if not isinstance(request, dict):
        raise WorkerError(f"worker request must be a JSON object, got {type(request).__name__}")
    if "id" not in request:
        raise WorkerError("worker request has no 'id'; every request needs one for its events")
    if request.get("op") not in (*MODEL_OPS, "cancel"):
        raise WorkerError(f"worker request {request['id']}: unknown op {request.get('op')!r}; "
                          f"use one of {[*MODEL_OPS, 'cancel']}")
    return request


def request_id(line: str) -> Any:
    """The "id" of a request line that could not be used (None when there is none), for its error event."""
    try:
        request = json.loads(line)
    except ValueError:
        return None
    return request.get("id") if isinstance(request, dict) else None


def serve() -> int:
    """The `serve` task: requests on stdin until it closes."""
    ModelServer().serve(sys.stdin)
    return 0
