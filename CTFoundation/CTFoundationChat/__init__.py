"""CTFoundation's CT-CHAT chat in Slicer: a conversation object for the console and the panel's Chat section.

CT-CHAT runs in the module's long-lived model process (CTFoundationLib.host.server), which keeps the model loaded
between chats; the conversation itself lives there too. This file only turns volume nodes into requests, polls the
process's events (a QTimer in the panel), and keeps the transcript in a text node saved with the scene. Nothing
here imports torch or blocks the main thread unless a console call asks to wait.
"""

from __future__ import annotations

import html
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import qt
import slicer
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLTextNode
from slicer.i18n import tr as _

from CTFoundationLib.errors import WorkerError

TRANSCRIPT_VOLUME_ROLE = "CTFoundationChatVolume"
ANATOMY_ATTRIBUTE = "CTFoundation.chatAnatomy"  # JSON list of the anatomy paths of the latest answer
POLL_INTERVAL_MS = 100
STATUS_TEXT = {"loading": _("loading the model"), "ready": _("ready"), "busy": _("busy"),
               "failed": _("failed"), "closed": _("closed")}


@dataclass
class ChatReply:
    """An answer as the panel needs it: its text, the anatomy paths it mentions, whether Stop ended it."""

    text: str
    anatomy_paths: list[str] = field(default_factory=list)
    stopped: bool = False


def failureMessage(job) -> str:
    """The one-line reason a finished job of the model process failed."""
    try:
        job.outcome()
    except WorkerError as error:
        return str(error)
    return ""


class ChatConversation:
    """A conversation with CT-CHAT about one volume node, held by the model process; the transcript goes into a
    text node.

    Console:  chat = logic.chat(volumeNode, model="ct-chat-llama3.1-8b"); chat.ask("Is there an effusion?")
    ask / generateReport wait for the answer and return its text (waitForCompletion=False: the ModelJob, whose
    events `poll()` turns into the panel's). The questions can be sent before the model has loaded: the process
    takes its requests in order.
    Panel events from `poll()`: {"type": "status", "status": "loading" | "ready" | "busy" | "failed", "detail"},
    {"type": "token", "text"}, {"type": "answer", "answer": ChatReply}, {"type": "error", "message"}.
    """

    def __init__(self, logic, volumeNode: vtkMRMLScalarVolumeNode | None, model: str, options: dict,
                 maxNewTokens: int | None = None) -> None:
        self.transcriptNode = newTranscriptNode(volumeNode)
        self.lastAnswer: ChatReply | None = None
        self.turns: list[dict] = []
        self.status = "loading"
        self._workDir = Path(tempfile.mkdtemp(prefix="CTFoundation-chat-"))
        request = {"model": model, "chat": options, "max_new_tokens": maxNewTokens}
        try:
            if volumeNode is not None:
                request.update(logic._volumeRequest(volumeNode, self._workDir))
            self.process = logic.modelProcess()
            self.startJob = self.process.job("chat_start", request).start()
        except BaseException:
            shutil.rmtree(self._workDir, ignore_errors=True)
            raise
        self.sessionId = self.startJob.id
        self._open = [self.startJob]  # jobs whose events are still to come, in the order they were sent

    def ask(self, question: str, answerType: str = "free", waitForCompletion: bool = True, onToken=None):
        job = self._send({"question": question, "answer_type": answerType})
        return self._run(job, waitForCompletion, onToken)

    def generateReport(self, waitForCompletion: bool = True, onToken=None):
        return self._run(self._send({"report": True}), waitForCompletion, onToken)

    def stop(self) -> None:
        """End the answer being written (its text so far is kept, marked stopped); drop the questions queued."""
        for job in self._open:
            if job is not self.startJob:
                job.cancel()

    def waitUntilReady(self, timeout_s: float | None = None) -> None:
        """Wait for the model and the CT's encoding; raises the WorkerError that says why the chat cannot start."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not self.startJob.finished:
            if deadline is not None and time.monotonic() > deadline:
                raise WorkerError(f"the chat did not start within {timeout_s:g} s")
            self.poll()
            slicer.app.processEvents()
            time.sleep(0.02)
        self.poll()
        self.startJob.outcome()

    def poll(self) -> list[dict]:
        """The panel's events since the last call (never waits)."""
        events = []
        for job in list(self._open):
            for event in job.poll():
                events.extend(self._startEvents(event) if job is self.startJob else self._answerEvents(job, event))
            if job.finished:
                self._open.remove(job)
        return events

    def _send(self, request: dict):
        job = self.process.job("chat_ask", {"session": self.sessionId, **request}).start()
        self._open.append(job)
        return job

    def _startEvents(self, event: dict) -> list[dict]:
        if event["type"] == "step":
            return [self._status("loading", event["name"])]
        if event["type"] == "result":
            shutil.rmtree(self._workDir, ignore_errors=True)
            return [self._status("ready")]
        if event["type"] in ("error", "cancelled"):
            shutil.rmtree(self._workDir, ignore_errors=True)
            return [self._status("failed"), {"type": "error", "message": failureMessage(self.startJob)}]
        return []

    def _answerEvents(self, job, event: dict) -> list[dict]:
        if self.startFailed:  # the questions sent before the start failed: its reason was shown already
            return []
        if event["type"] == "started":
            return [self._status("busy")]
        if event["type"] == "token":
            return [{"type": "token", "text": event["text"]}]
        if event["type"] == "result":
            return [self._status("ready"), {"type": "answer", "answer": self.recordAnswer(event)}]
        if event["type"] == "error":
            return [self._status("ready"), {"type": "error", "message": failureMessage(job)}]
        if event["type"] == "cancelled":
            return [self._status("ready")]
        return []

    @property
    def startFailed(self) -> bool:
        return self.startJob.finished and self.startJob.last("result") is None

    def _status(self, status: str, detail: str = "") -> dict:
        self.status = status
        return {"type": "status", "status": status, "detail": detail}

    def recordAnswer(self, result: dict) -> ChatReply:
        """Keep the answer of a `result` event and write the transcript and its anatomy into the text node."""
        answer = result["answer"]
        self.lastAnswer = ChatReply(answer["text"], list(result["anatomy_paths"]), answer["stopped"])
        self.turns = result["transcript"]
        self.transcriptNode.SetText(transcriptText(self.turns))
        self.transcriptNode.SetAttribute(ANATOMY_ATTRIBUTE, json.dumps(self.lastAnswer.anatomy_paths))
        return self.lastAnswer

    def _run(self, job, waitForCompletion: bool, onToken):
        if not waitForCompletion:
            return job  # the panel's poll() records the answer when its event arrives
        while job in self._open:
            for event in self.poll():
                if event["type"] == "token" and onToken is not None:
                    onToken(event["text"])
            slicer.app.processEvents()
            time.sleep(0.02)
        if self.startFailed:
            self.startJob.outcome()  # the reason the chat could not start, rather than "no such chat"
        job.outcome()  # raises a WorkerError with the one-line reason when the answer failed
        return self.lastAnswer.text


def newTranscriptNode(volumeNode: vtkMRMLScalarVolumeNode | None) -> vtkMRMLTextNode:
    name = f"{volumeNode.GetName()} CT-CHAT transcript" if volumeNode is not None else "CT-CHAT transcript"
    node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTextNode", slicer.mrmlScene.GenerateUniqueName(name))
    node.SetNodeReferenceID(TRANSCRIPT_VOLUME_ROLE, volumeNode.GetID() if volumeNode is not None else None)
    return node


def transcriptText(turns: list[dict]) -> str:
    """Plain-text transcript: 'You [type]: question' then 'CT-CHAT: answer', a blank line between turns."""
    blocks = []
    for turn in turns:
        stopped = " [stopped]" if turn["stopped"] else ""
        blocks.append(f"You [{turn['answer_type']}]: {turn['question']}\nCT-CHAT: {turn['answer']}{stopped}")
    return "\n\n".join(blocks) + "\n"


def transcriptHtml(turns: list[dict], streaming: str | None, anatomy: list[str]) -> str:
    """The panel's transcript: the turns, the answer being written (streaming), the latest answer's anatomy."""
    parts = []
    for turn in turns:
        parts.append(f"<p><b>{_('You')}</b> <i>[{html.escape(turn['answer_type'])}]</i>: "
                     f"{html.escape(turn['question'])}</p>")
        parts.append(f"<p><b>CT-CHAT</b>: {html.escape(turn['answer'])}</p>")
    if streaming is not None:
        parts.append(f"<p><b>CT-CHAT</b>: {html.escape(streaming)}&#9646;</p>")
    if anatomy:
        parts.append(f"<p><i>{_('Anatomy mentioned')}: {html.escape(', '.join(anatomy))}</i></p>")
    return "".join(parts)


class ChatPanel:
    """The Chat section: model, start, transcript, answer type, question line, Send, Stop, Generate report,
    Show on anatomy (hands the latest answer to `placeOnAnatomy`, which puts its sentences on the segments)."""

    def __init__(self, logic, ui, currentVolume: Callable[[], vtkMRMLScalarVolumeNode | None],
                 placeOnAnatomy: Callable[[str], None]) -> None:
        self.logic, self.currentVolume, self.placeOnAnatomy = logic, currentVolume, placeOnAnatomy
        self.conversation = None
        self.streaming: str | None = None
        self.timer = qt.QTimer()
        self.timer.setInterval(POLL_INTERVAL_MS)
        self.timer.timeout.connect(self.poll)
        self._build(ui)

    def _build(self, ui) -> None:
        """Take the Chat section's widgets from the panel's .ui (the layout is there) and connect them."""
        self.modelSelector, self.startButton, self.statusLabel = ui.chatModelSelector, ui.chatStartButton, \
            ui.chatStatusLabel
        self.transcriptView, self.answerTypeSelector, self.questionEdit = ui.chatTranscriptView, \
            ui.chatAnswerTypeSelector, ui.chatQuestionEdit
        self.sendButton, self.stopButton, self.reportButton, self.anatomyButton = ui.chatSendButton, \
            ui.chatStopButton, ui.chatReportButton, ui.chatAnatomyButton
        for model in self.logic.chatModels():
            self.modelSelector.addItem(model)
        self.startButton.connect("clicked(bool)", self.onStart)
        self.questionEdit.connect("returnPressed()", self.onSend)
        self.sendButton.connect("clicked(bool)", self.onSend)
        self.stopButton.connect("clicked(bool)", self.onStop)
        self.reportButton.connect("clicked(bool)", self.onReport)
        self.anatomyButton.connect("clicked(bool)", self.onShowOnAnatomy)
        self.updateButtons("")

    def onStart(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("The chat could not start."), waitCursor=True):
            if self.conversation is not None:
                self.conversation.stop()
            self.conversation = self.logic.chat(self.currentVolume(), model=self.modelSelector.currentText)
            if not self.answerTypeSelector.count:
                from CTFoundationLib.models.ctchat.templates import ANSWER_SUFFIXES  # no torch in Slicer

                for answerType in ANSWER_SUFFIXES:
                    self.answerTypeSelector.addItem(answerType)
            self.streaming = None
            self.showTranscript([])
            self.timer.start()

    def onSend(self) -> None:
        question = self.questionEdit.text.strip()
        if self.conversation is None or not question:
            return
        self.questionEdit.text = ""
        self.conversation.ask(question, self.answerTypeSelector.currentText, waitForCompletion=False)
        self.streaming = ""

    def onReport(self) -> None:
        if self.conversation is not None:
            self.conversation.generateReport(waitForCompletion=False)
            self.streaming = ""

    def onShowOnAnatomy(self) -> None:
        if self.conversation is not None and self.conversation.lastAnswer is not None:
            self.placeOnAnatomy(self.conversation.lastAnswer.text)

    def onStop(self) -> None:
        if self.conversation is not None:
            self.conversation.stop()

    def poll(self) -> None:
        """Apply the worker's events: status, streamed text, finished answers, errors."""
        if self.conversation is None:
            return
        events = self.conversation.poll()
        for event in events:
            if event["type"] == "status":
                self.updateButtons(event["status"], event["detail"])
            elif event["type"] == "token" and self.streaming is not None:
                self.streaming += event["text"]
            elif event["type"] == "answer":
                self.streaming = None
            elif event["type"] == "error":
                self.streaming = None
                slicer.util.errorDisplay(event["message"])
        if not events:  # redrawing resets the view's scroll position and selection: only on news
            return
        self.showTranscript(self.conversation.turns)

    def showTranscript(self, turns: list[dict]) -> None:
        answer = self.conversation.lastAnswer if self.conversation is not None else None
        anatomy = answer.anatomy_paths if answer is not None else []
        self.transcriptView.setHtml(transcriptHtml(turns, self.streaming, anatomy))

    def updateButtons(self, status: str, detail: str = "") -> None:
        ready = status == "ready"
        self.statusLabel.text = STATUS_TEXT.get(status, _("not started")) + (f": {detail}" if detail else "")
        for widget in (self.sendButton, self.reportButton, self.questionEdit, self.anatomyButton):
            widget.enabled = ready
        self.stopButton.enabled = status == "busy"

    def cleanup(self) -> None:
        self.timer.stop()
        if self.conversation is not None:
            self.conversation.stop()
