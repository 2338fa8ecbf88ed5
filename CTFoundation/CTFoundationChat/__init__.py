"""CTFoundation's CT-CHAT chat in Slicer: a conversation object for the console and the panel's Chat section.

CT-CHAT runs in the library's ChatWorker (one background thread that keeps the model loaded); this file only
turns volume nodes into library volumes, polls the worker's events with a QTimer, and keeps the transcript
in a text node saved with the scene. Nothing here blocks the main thread unless a console call asks to wait.
"""

from __future__ import annotations

import html
import json
import time
from collections.abc import Callable

import qt
import slicer
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLTextNode
from slicer.i18n import tr as _

TRANSCRIPT_VOLUME_ROLE = "CTFoundationChatVolume"
ANATOMY_ATTRIBUTE = "CTFoundation.chatAnatomy"  # JSON list of the anatomy paths of the latest answer
POLL_INTERVAL_MS = 100
STATUS_TEXT = {"loading": _("loading the model"), "ready": _("ready"), "busy": _("busy"),
               "failed": _("failed"), "closed": _("closed")}


class ChatConversation:
    """A conversation with CT-CHAT about one volume node; the transcript goes into a text node.

    Console:  chat = logic.chat(volumeNode, model="ct-chat-llama3.1-8b"); chat.ask("Is there an effusion?")
    ask / generateReport wait for the answer and return its text (waitForCompletion=False: the Future).
    """

    def __init__(self, worker, volume, volumeNode: vtkMRMLScalarVolumeNode | None) -> None:
        self.worker = worker
        self.sessionFuture = worker.session(volume)
        self.transcriptNode = newTranscriptNode(volumeNode)
        self.lastAnswer = None

    def ask(self, question: str, answerType: str = "free", waitForCompletion: bool = True, onToken=None):
        return self._run(self.worker.ask(self.sessionFuture, question, answerType), waitForCompletion, onToken)

    def generateReport(self, waitForCompletion: bool = True, onToken=None):
        return self._run(self.worker.report(self.sessionFuture), waitForCompletion, onToken)

    def stop(self) -> None:
        self.worker.stop()

    def recordAnswer(self, answer) -> None:
        """Write the transcript and the answer's anatomy into the text node (main thread)."""
        self.lastAnswer = answer
        self.transcriptNode.SetText(transcriptText(self.sessionFuture.result().transcript()))
        self.transcriptNode.SetAttribute(ANATOMY_ATTRIBUTE, json.dumps(answer.anatomy_paths))

    def _run(self, future, waitForCompletion: bool, onToken):
        if not waitForCompletion:
            return future  # the panel records the answer when its event arrives
        while not future.done():
            self._forwardTokens(onToken)
            slicer.app.processEvents()
            time.sleep(0.02)
        self._forwardTokens(onToken)
        answer = future.result()  # raises the worker's error (a CTFoundationError with its message)
        self.recordAnswer(answer)
        return answer.text

    def _forwardTokens(self, onToken) -> None:
        for event in self.worker.events():
            if event["type"] == "token" and onToken is not None:
                onToken(event["text"])


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
                from CTFoundationLib.inference.chat import ANSWER_TYPES

                for answerType in ANSWER_TYPES:
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
        events = self.conversation.worker.events()
        for event in events:
            if event["type"] == "status":
                self.updateButtons(event["status"], event["detail"])
            elif event["type"] == "token" and self.streaming is not None:
                self.streaming += event["text"]
            elif event["type"] == "answer":
                self.streaming = None
                self.conversation.recordAnswer(event["answer"])
            elif event["type"] == "error":
                self.streaming = None
                slicer.util.errorDisplay(event["message"])
        if not events:  # redrawing resets the view's scroll position and selection: only on news
            return
        turns = self.conversation.sessionFuture.result().transcript() if self.conversation.sessionFuture.done() \
            and self.conversation.sessionFuture.exception() is None else []
        self.showTranscript(turns)

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
