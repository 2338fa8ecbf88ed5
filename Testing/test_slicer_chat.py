"""The module's CT-CHAT chat against the Slicer stand-in: logic.chat on a volume node with a tiny Llama + CT-CHAT
adapter and a small CT-CLIP, answers through the model process, the transcript text node, model reuse."""

from __future__ import annotations

import json

import pytest
import test_slicer_module
from small_chat_models import make_ctchat_adapter, make_tiny_llm, smollm2_tokenizer_folder
from test_slicer_module import RICORD, configured_logic

from CTFoundationLib.errors import WorkerError

ctf, scene, small = test_slicer_module.ctf, test_slicer_module.scene, test_slicer_module.small  # shared fixtures


@pytest.fixture(scope="module")
def chat_parts(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("slicer-chat")
    llm = make_tiny_llm(root / "llm", smollm2_tokenizer_folder(root))
    make_ctchat_adapter(root / "release" / "8b", llm)
    return {"llm": llm, "lora": root / "release", "template": "chatml_direct"}


def test_console_chat_answers_and_keeps_the_transcript(ctf, scene, small, chat_parts, ct_dir, tmp_path):
    logic = configured_logic(ctf, small, tmp_path)
    node = scene.util.loadVolume(str(ct_dir / RICORD / "ct_3mm_iso.nii.gz"))
    chat = logic.chat(node, model="ct-chat-llama3.1-8b", maxNewTokens=6, **chat_parts)
    try:
        streamed: list[str] = []
        answer = chat.ask("Is there a pleural effusion?", "short", onToken=streamed.append)  # sent before it loaded
        assert answer == chat.turns[0]["answer"] and answer and "".join(streamed).split() == answer.split()
        report = chat.generateReport()
        text = chat.transcriptNode.GetText()
        assert text == (f"You [short]: Is there a pleural effusion?\nCT-CHAT: {answer}\n\n"
                        f"You [report]: Generate the radiology report for this chest CT volume.\nCT-CHAT: {report}\n")
        assert chat.transcriptNode.GetName() == "ct_3mm_iso CT-CHAT transcript"
        assert chat.transcriptNode.GetNodeReference("CTFoundationChatVolume") is node
        assert json.loads(chat.transcriptNode.GetAttribute("CTFoundation.chatAnatomy")) == \
            chat.lastAnswer.anatomy_paths
        assert chat.startJob.outcome()["loads"] == {"ct-chat": 1}

        again = logic.chat(node, model="ct-chat-llama3.1-8b", maxNewTokens=6, **chat_parts)  # the model is reused
        again.waitUntilReady(timeout_s=120)
        assert again.startJob.outcome()["loads"] == {"ct-chat": 1} and again.transcriptNode is not chat.transcriptNode
        assert again.process is chat.process and again.sessionId != chat.sessionId
        logic.getParameterNode().device = "auto"  # another device: the chat model loads again (CPU here too)
        other = logic.chat(None, model="ct-chat-llama3.1-8b", maxNewTokens=6, **chat_parts)
        other.waitUntilReady(timeout_s=120)
        assert other.startJob.outcome()["loads"] == {"ct-chat": 2}
        assert logic.chatModels() == ["ct-chat-demo", "ct-chat-llama3.1-70b", "ct-chat-llama3.1-8b",
                                      "ct-chat-mistral", "ct-chat-vicuna"]
    finally:
        logic.stopModelProcess()


def test_console_chat_reports_a_model_that_cannot_load(ctf, scene, small, chat_parts, tmp_path):
    logic = configured_logic(ctf, small, tmp_path)
    try:
        chat = logic.chat(None, model="ct-chat-llama3.1-8b", **dict(chat_parts, llm=tmp_path))
        with pytest.raises(WorkerError, match="not a Hugging Face model folder") as caught:
            chat.ask("Hello?")  # the reason the chat could not start, not a follow-on "no such chat"
        assert "\n" not in str(caught.value)
        assert chat.status == "failed"
        replaced = logic.chat(None, model="ct-chat-llama3.1-8b", **chat_parts)  # the next chat starts afresh
        replaced.waitUntilReady(timeout_s=120)
        assert replaced.status == "ready"
    finally:
        logic.stopModelProcess()


def test_transcript_html_escapes_and_shows_the_streaming_answer(ctf):
    from CTFoundationChat import transcriptHtml, transcriptText

    turns = [{"question": "Is x < 3 & y?", "answer_type": "short", "answer": "<b>No</b>.", "stopped": True}]
    page = transcriptHtml(turns, "Partial <i>", ["pleura", "lung/right lung"])
    assert "Is x &lt; 3 &amp; y?" in page and "&lt;b&gt;No&lt;/b&gt;." in page and "<b>No</b>" not in page
    assert page.index("&lt;b&gt;No") < page.index("Partial &lt;i&gt;&#9646;") < page.index("pleura, lung/right lung")
    assert transcriptHtml(turns, None, []).count("CT-CHAT") == 1
    assert transcriptText(turns) == "You [short]: Is x < 3 & y?\nCT-CHAT: <b>No</b>. [stopped]\n"
