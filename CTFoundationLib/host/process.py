"""Run a library task in a separate process and follow it without blocking (the Slicer GUI polls it).

The child (`python -m CTFoundationLib.host.worker TASK ...`, see worker.py) prints one JSON event per line,
prefixed with `EVENT_PREFIX`, in between any other output (warnings, logs) on the same stdout/stderr stream.
`WorkerProcess.poll()` returns the events that arrived so far without waiting; `cancel()` ends the whole
process tree: in Slicer the command is the `PythonSlicer` launcher, which starts the real Python as a child.

Nothing here imports slicer, qt or torch.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from CTFoundationLib.errors import WorkerError

EVENT_PREFIX = "@ctfoundation-event "
LOG_TAIL_LINES = 200  # non-event output lines kept for error reports
KILL_GRACE_S = 3.0  # between SIGTERM and SIGKILL on cancel
FAILURE_PREFIX = {  # error kind -> what it means for the person at the screen
    "CTInputError": "The CT cannot be used",
    "WeightsError": "The model weights are not ready",
    "CheckpointError": "The model file cannot be used",
    "DependencyError": "A required Python package is missing",
}

Event = dict


def format_event(event_type: str, **fields) -> str:
    """One event line: the prefix and a JSON object with "type" plus `fields` (JSON-serialisable)."""
    return EVENT_PREFIX + json.dumps({"type": event_type, **fields}, default=str)


def parse_event(line: str) -> Event | None:
    """The event of a worker output line, or None for an ordinary log line."""
    if not line.startswith(EVENT_PREFIX):
        return None
    try:
        event = json.loads(line[len(EVENT_PREFIX):])
    except ValueError:
        return None
    return event if isinstance(event, dict) and "type" in event else None


class ChildTraceback(Exception):
    """The traceback text of a failure inside the worker process (chained under WorkerError for engineers)."""


class WorkerProcess:
    """One running worker: start it, poll its events, cancel it, collect its result.

    command: the full command line, e.g. [PythonSlicer, "-m", "CTFoundationLib.host.worker", "detect", ...].
    cwd: working directory; `python -m` finds CTFoundationLib there when it is not otherwise on the path.
    env: environment for the child (default: this process's).
    on_log: called (on the polling thread) with every non-event output line.
    stdin: give the child a pipe to write requests into (`stdin`; the long-lived model process reads it).
    """

    def __init__(
        self,
        command: Sequence[str],
        cwd: Path | str | None = None,
        env: Mapping[str, str] | None = None,
        on_log: Callable[[str], None] | None = None,
        stdin: bool = False,
    ) -> None:
        self.command = [str(part) for part in command]
        self.with_stdin = stdin
        self.cwd, self.env, self.on_log = cwd, dict(env) if env is not None else None, on_log
        self.log_tail: deque[str] = deque(maxlen=LOG_TAIL_LINES)
        self.events: list[Event] = []
        self.cancelled = False
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._eof = False
        self._process: subprocess.Popen | None = None

    def start(self) -> WorkerProcess:
        """Launch the child in its own process group (so cancel reaches its children too)."""
        options: dict = {"start_new_session": True}
        if os.name == "nt":
            options = {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.CREATE_NO_WINDOW}
        try:
            self._process = subprocess.Popen(
                self.command, cwd=self.cwd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                stdin=subprocess.PIPE if self.with_stdin else subprocess.DEVNULL, text=True, encoding="utf-8",
                errors="replace", bufsize=1, **options,
            )
        except OSError as error:
            raise WorkerError(
                f"cannot start the background process {self.command[0]} ({error.strerror or error}); "
                "check that the program exists and can be run"
            ) from error
        threading.Thread(target=self._read, name="ctfoundation-worker-reader", daemon=True).start()
        return self

    def _read(self) -> None:
        for line in self._process.stdout:
            self._lines.put(line.rstrip("\r\n"))
        self._lines.put(None)

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def stdin(self):
        """The child's stdin (a text pipe) when started with `stdin=True`."""
        return self._process.stdin if self._process else None

    @property
    def returncode(self) -> int | None:
        return self._process.poll() if self._process else None

    @property
    def finished(self) -> bool:
        """All output read and the process has exited."""
        return self._eof and self.returncode is not None

    def poll(self) -> list[Event]:
        """Events that arrived since the last call (never blocks); other lines go to `log_tail`/`on_log`."""
        new: list[Event] = []
        while True:
            try:
                line = self._lines.get_nowait()
            except queue.Empty:
                break
            if line is None:
                self._eof = True
                continue
            event = parse_event(line)
            if event is None:
                self.log_tail.append(line)
                if self.on_log:
                    self.on_log(line)
            else:
                new.append(event)
        self.events.extend(new)
        return new

    def wait(self, timeout_s: float | None = None, poll_s: float = 0.05) -> int:
        """Block until the process ended and its output was read; returns the exit code."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not self.finished:
            if deadline is not None and time.monotonic() > deadline:
                raise WorkerError(f"the background process did not finish within {timeout_s:g} s")
            self.poll()
            time.sleep(poll_s)
        self.poll()
        return self.returncode

    def cancel(self) -> None:
        """End the process and everything it started (SIGTERM to the group, SIGKILL after a grace period)."""
        if self._process is None or self._process.poll() is not None:
            return
        self.cancelled = True
        if os.name == "nt":
            subprocess.run(["taskkill", "/F", "/T", "/PID", str(self._process.pid)], capture_output=True, check=False)
            return
        _signal_group(self._process.pid, signal.SIGTERM)
        try:
            self._process.wait(KILL_GRACE_S)
        except subprocess.TimeoutExpired:
            pass
        _signal_group(self._process.pid, signal.SIGKILL)  # children that outlived their parent, if any

    def last(self, event_type: str) -> Event | None:
        """The most recent event of this type, if any."""
        return next((e for e in reversed(self.events) if e["type"] == event_type), None)

    def outcome(self) -> Event:
        """The `result` event of a finished, successful run; otherwise a WorkerError that says why."""
        if not self.finished:
            raise WorkerError("the background process is still running")
        if self.cancelled:
            raise WorkerError("cancelled by the user")
        result, error = self.last("result"), self.last("error")
        if self.returncode == 0 and result is not None:
            return result
        if error is not None:
            prefix = FAILURE_PREFIX.get(error.get("kind"), "The background task failed")
            details = error.get("details") or "\n".join(self.log_tail)
            raise WorkerError(f"{prefix}: {error.get('message', '')}") from ChildTraceback(details)
        tail = "\n".join(self.log_tail)
        raise WorkerError(
            f"the background process ended with exit code {self.returncode} and no result; "
            "see the details for its output"
        ) from ChildTraceback(tail or "(no output)")


def _signal_group(pid: int, signum: int) -> None:
    try:
        os.killpg(pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def python_command(python: Path | str | None = None) -> list[str]:
    """The command prefix that runs the worker module with `python` (default: this interpreter)."""
    return [str(python or sys.executable), "-m", "CTFoundationLib.host.worker"]
