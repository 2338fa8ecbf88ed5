"""CT-CHAT kept loaded on one background thread, for a GUI: the model loads once, every later turn reuses it.

    worker = ChatWorker(lambda progress: ChatRuntime.from_registry(..., progress=progress))
    session = worker.session(volume).result()          # Futures: .result() waits, a GUI polls instead
    worker.ask(session, "Is there an effusion?", "short")
    for event in worker.events(): ...                   # polled from the GUI thread (a QTimer)

Events (dicts): {"type": "status", "status": "loading" | "ready" | "busy" | "failed" | "closed", "detail": str},
{"type": "token", "text": str} while an answer streams, {"type": "answer", "answer": ChatAnswer} when it ends,
{"type": "error", "message": str} when a job fails (its Future raises the same error).
The jobs run one at a time in submission order; `stop()` ends the answer being written.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from CTFoundationLib.errors import ChatError, CTFoundationError
from CTFoundationLib.inference.chat import ChatAnswer, ChatRuntime, ChatSession
from CTFoundationLib.io.volume import CTVolume
from CTFoundationLib.models.ctchat.modeling import Progress

Result = TypeVar("Result")
SessionLike = ChatSession | Future  # a session, or the Future of one


def resolved(session: SessionLike) -> ChatSession:
    """The session itself (a Future's result: on the worker thread it is done, the jobs run in order)."""
    return session.result() if isinstance(session, Future) else session


class ChatWorker:
    """One persistent thread that owns a ChatRuntime (built by `loader`) and answers in the background."""

    def __init__(self, loader: Callable[[Progress], ChatRuntime]) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ct-chat")
        self._events: queue.Queue[dict] = queue.Queue()
        self._stop = threading.Event()
        self._runtime: ChatRuntime | None = None
        self.status = "loading"
        self.loaded = self._submit("loading", lambda: self._load(loader))

    def events(self) -> list[dict]:
        """The events since the last call (never waits)."""
        drained = []
        while not self._events.empty():
            drained.append(self._events.get_nowait())
        return drained

    def session(self, volume: CTVolume | None) -> Future[ChatSession]:
        """A new conversation about `volume` (its CT-CLIP token grid cached on disk), once the model is loaded."""
        return self._submit("busy", lambda: self._loaded_runtime().session(volume))

    def ask(self, session: SessionLike, question: str, answer_type: str = "free") -> Future[ChatAnswer]:
        """Answer in the background; the text streams as token events, then an answer event.

        session: a ChatSession, or the Future that `session()` returned (no need to wait for it first).
        """
        return self._submit("busy", lambda: self._answer(lambda on_token: resolved(session).ask(
            question, answer_type, on_token, self._stop)))

    def report(self, session: SessionLike) -> Future[ChatAnswer]:
        return self._submit("busy", lambda: self._answer(lambda on_token: resolved(session).generate_report(
            on_token, self._stop)))

    def stop(self) -> None:
        """End the answer being written (its partial text is kept); jobs queued after it still run."""
        self._stop.set()

    def close(self) -> None:
        """Stop, drop queued jobs and let the thread end (the model is freed with it)."""
        self._stop.set()
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._set_status("closed")

    def _load(self, loader: Callable[[Progress], ChatRuntime]) -> ChatRuntime:
        self._runtime = loader(lambda step: self._set_status("loading", step))
        return self._runtime

    def _loaded_runtime(self) -> ChatRuntime:
        if self._runtime is None:
            raise ChatError("the CT-CHAT model did not load; see the earlier error, fix it and start a new chat")
        return self._runtime

    def _answer(self, ask: Callable[[Callable[[str], None]], ChatAnswer]) -> ChatAnswer:
        self._stop.clear()
        answer = ask(lambda text: self._events.put({"type": "token", "text": text}))
        self._events.put({"type": "answer", "answer": answer})
        return answer

    def _submit(self, status: str, job: Callable[[], Result]) -> Future[Result]:
        def run() -> Result:
            self._set_status(status)
            try:
                result = job()
            except Exception as error:  # a GUI must hear of any failure, not lose it in the thread
                known = isinstance(error, CTFoundationError)
                self._events.put({"type": "error",
                                  "message": str(error) if known else f"{type(error).__name__}: {error}"})
                self._set_status("failed" if self._runtime is None else "ready")
                raise
            self._set_status("ready")
            return result

        return self._executor.submit(run)

    def _set_status(self, status: str, detail: str = "") -> None:
        self.status = status
        self._events.put({"type": "status", "status": status, "detail": detail})
