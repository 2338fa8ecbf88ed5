"""Chat sessions end to end on CPU with the real SmolLM2-135M-Instruct (GGUF) as the LLM, image embeddings from
a small CT-CLIP on the real RICORD 3 mm NIfTI through a projector sized to SmolLM2's width (576)."""

from __future__ import annotations

import io
import json
import threading
import time

import numpy as np
import pytest
import torch
from small_chat_models import save_projector, smollm2_gguf
from small_models import make_small_ctclip

from CTFoundationLib.anatomy.sentences import split_sentences
from CTFoundationLib.cli import main
from CTFoundationLib.cli.chat import interactive
from CTFoundationLib.errors import ChatError
from CTFoundationLib.inference.chat import ChatAnswer, ChatRuntime, volume_sha256
from CTFoundationLib.inference.ctclip import CTCLIPRuntime
from CTFoundationLib.io.reading import read_ct
from CTFoundationLib.io.volume import CTVolume
from CTFoundationLib.models.ctchat.modeling import CTChatModel, GenerationSettings
from CTFoundationLib.models.ctchat.templates import IMAGE_TOKEN_INDEX

RICORD_3MM = "ricord1a_419639-000082_chest_noncontrast/ct_3mm_iso.nii.gz"
SMOLLM2_WIDTH = 576


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("chat-parts")
    checkpoint, constructors, config = make_small_ctclip(folder / "ctclip")
    projector = save_projector(folder / "mm_projector.bin", SMOLLM2_WIDTH, config.vision.dim, seed=0)
    return {"home": folder / "home", "ctclip": checkpoint, "constructors": constructors, "config": config,
            "projector": projector}


@pytest.fixture(scope="module")
def runtime(parts) -> ChatRuntime:
    model = CTChatModel.load(smollm2_gguf(), None, parts["projector"], template="chatml_direct", device="cpu")
    encoder = CTCLIPRuntime(parts["ctclip"], config=parts["config"], device="cpu", cache_dir=parts["home"] / "runtime")
    return ChatRuntime(model, encoder, cache_dir=parts["home"] / "runtime")


@pytest.fixture(scope="module")
def ricord(ct_dir) -> CTVolume:
    return read_ct(ct_dir / RICORD_3MM)


def test_general_question_without_a_ct_gets_the_right_answer(runtime):
    session = runtime.session(None)
    answer = session.ask("What is the capital of France?", settings=GenerationSettings(max_new_tokens=24))
    assert "Paris" in answer.text
    assert session.turns[0].user_text == "What is the capital of France?"  # no image, no <provided>


def test_conversation_about_a_ct_streams_grounds_and_reports(runtime, ricord):
    session = runtime.session(ricord, settings=GenerationSettings(max_new_tokens=12))
    assert session.image.shape == (1, 256, SMOLLM2_WIDTH)
    arrivals: list[tuple[float, str]] = []
    first = session.ask("Describe this image.", "short",
                        on_token=lambda text: arrivals.append((time.perf_counter(), text)))
    assert first.text and first.new_tokens > 3
    pieces = [text for _, text in arrivals]
    times = [t for t, _ in arrivals]
    assert len(pieces) >= 3 and times == sorted(times) and times[-1] > times[0]  # one piece at a time
    assert "".join(pieces).strip() == first.text
    assert first.first_token_s is not None and 0 < first.first_token_s < first.seconds
    assert [sentence.text for sentence in first.sentences] == split_sentences(first.text)
    assert session.turns[0].user_text == "<image>\n<provided>Describe this image. <short_answer>"

    second = session.ask("Is the heart enlarged?", "free", settings=GenerationSettings(max_new_tokens=6))
    prompt = session.prompt("Anything else?", "long")
    assert prompt.count("<image>") == 1 and prompt.count("<provided>") == 1
    assert first.text in prompt and second.text in prompt
    assert prompt.endswith("Anything else? <long_answer><|im_end|><|im_start|>assistant\n")
    ids = runtime.model.prompt_ids(prompt)
    assert ids.count(IMAGE_TOKEN_INDEX) == 1 and runtime.model.sequence_length(ids) == len(ids) + 255
    report = session.generate_report()
    assert session.turns[-1].user_text.endswith(" <report_generation>") and session.turns[-1].answer == report.text
    assert [turn["answer_type"] for turn in session.transcript()] == ["short", "free", "report"]
    json.dumps(session.transcript())
    session.reset()
    assert session.turns == [] and session.prompt("Hi").count("<image>") == 1


def test_answers_are_grounded_to_anatomy(runtime):
    session = runtime.session(None)
    text = "Ground-glass opacities in the right lower lobe. No pleural effusion. The heart size is normal. Hello."
    sentences = session.ground(text)
    assert [(s.path, s.laterality, s.negated) for s in sentences] == [
        ("lung/right lung/right lung lower lobe", "right", False), ("pleura", None, True), ("heart", None, False),
        (None, None, False),
    ]
    answer = ChatAnswer(text, "free", False, False, 20, 0.1, 1.0, 19.0, sentences)
    assert answer.anatomy_paths == ["lung/right lung/right lung lower lobe", "pleura", "heart"]
    assert json.loads(json.dumps(answer.to_dict()))["sentences"][1]["region"] == "pleura"


def test_image_is_encoded_once_and_cached_by_volume_hash(runtime, ricord, parts, ct_dir):
    first = runtime.image_embeddings(ricord)
    cached = list((parts["home"] / "runtime" / "ctchat_tokens").glob("*.safetensors"))
    assert len(cached) == 1 and cached[0].name.startswith(volume_sha256(ricord)[:32])
    runtime.encoder.timings_s.clear()
    again = runtime.image_embeddings(read_ct(ct_dir / RICORD_3MM))  # the same CT read again: no CT-CLIP pass
    assert "encode_image" not in runtime.encoder.timings_s
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    _, fresh = runtime.encoder.encode_volume(ricord, return_tokens=True)
    torch.testing.assert_close(runtime.model.image_embeddings(fresh), first, rtol=0, atol=0)
    changed = CTVolume(ricord.hu.copy(), ricord.affine_ras, ricord.source)
    changed.hu[60, 60, 50] += 1
    assert volume_sha256(changed) != volume_sha256(ricord)
    assert volume_sha256(CTVolume(np.asfortranarray(ricord.hu), ricord.affine_ras)) == volume_sha256(ricord)


def test_stop_busy_and_bad_requests(runtime):
    session = runtime.session(None, settings=GenerationSettings(max_new_tokens=40))
    stop = threading.Event()
    refused: list[str] = []

    def on_token(text: str) -> None:
        try:
            session.ask("A second question at the same time?")
        except ChatError as error:
            refused.append(str(error))
        stop.set()

    answer = session.ask("Explain what a chest CT shows.", on_token=on_token, stop_event=stop)
    assert answer.stopped and not answer.hit_limit and answer.new_tokens < 10
    assert refused and "still answering" in refused[0]
    assert session.turns[-1].stopped and session.turns[-1].answer == answer.text
    with pytest.raises(ChatError, match="empty"):
        session.ask("   ")
    with pytest.raises(ChatError, match="needs a CT"):
        session.generate_report()


def test_interactive_prompt(runtime, ricord, monkeypatch, capsys):
    session = runtime.session(ricord, settings=GenerationSettings(max_new_tokens=6))
    monkeypatch.setattr("sys.stdin",
                        io.StringIO("/type short\nDescribe this image.\n/type essay\n/report\n/reset\n/quit\n"))
    interactive(session, "free")
    assert session.turns == []  # /reset emptied it after two answers
    out = capsys.readouterr()
    assert out.out.count("ct-chat> ") == 2 and "answer types: free, short" in out.err


@pytest.mark.slow
def test_cli_chat_runs_smollm2_end_to_end_on_the_ricord_scan(parts, ct_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CTFOUNDATION_HOME", str(parts["home"]))
    transcript = tmp_path / "chat.json"
    code = main([
        "chat", str(ct_dir / RICORD_3MM), "--llm", str(smollm2_gguf()), "--no-lora", "--projector",
        str(parts["projector"]), "--ctclip", str(parts["ctclip"]), "--ctclip-config", str(parts["constructors"]),
        "--template", "chatml_direct", "--device", "cpu", "--max-new-tokens", "4", "--question", "Describe this image.",
        "--transcript", str(transcript),
    ])
    out = capsys.readouterr()
    assert code == 0, out.err
    [turn] = json.loads(transcript.read_text())["turns"]
    assert turn["user_text"] == "<image>\n<provided>Describe this image." and turn["answer"] in out.out
    assert "tokens in" in out.err
