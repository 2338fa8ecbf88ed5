"""The long-lived model process (`python -m CTFoundationLib.host.worker serve`, host.server / host.client) as a real
subprocess with real small checkpoints: a request served, the second reusing the loaded model, a weights change
reloading, cancel keeping the models, a crash ending in a one-line error and a new process, unload, malformed
requests, CT-CHAT streaming."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
from small_chat_models import make_ctchat_adapter, make_tiny_llm, smollm2_tokenizer_folder
from small_models import bert_vocab, make_small_ctclip

from CTFoundationLib.errors import WorkerError
from CTFoundationLib.host.client import ModelProcess
from CTFoundationLib.host.process import ChildTraceback, python_command

REPO = Path(__file__).resolve().parents[1]
RICORD_3MM = "ricord1a_419639-000082_chest_noncontrast/ct_3mm_iso.nii.gz"


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    checkpoint, config, _ = make_small_ctclip(tmp_path_factory.mktemp("small"))
    return checkpoint, config


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """One model process for the module's tests (they run in order and build on each other's loaded models)."""
    home = tmp_path_factory.mktemp("home")
    process = ModelProcess(python_command() + ["serve"], cwd=REPO, env={**os.environ, "CTFOUNDATION_HOME": str(home)},
                           cancel_grace_s=60)
    yield process
    process.stop()
    assert not process.running


def detect_request(ct: Path, out: Path, small, **ctclip) -> dict:
    checkpoint, config = small
    return {"ct": str(ct), "out": str(out), "ctclip": {
        "weights": str(checkpoint), "model_config": str(config), "text_encoder": str(bert_vocab()), "device": "cpu",
        **ctclip}}


def steps_of(job) -> list[str]:
    return [event["name"] for event in job.events if event["type"] == "step"]


def detect_loads(served, small, ct: Path, out: Path, **ctclip) -> int:
    """Detect once; the CT-CLIP loads of the process so far."""
    job = served.job("detect", detect_request(ct, out, small, **ctclip)).start()
    return job.wait(timeout_s=600)["loads"]["ct-clip"]


def test_the_second_detection_reuses_the_loaded_model(served, small, ct_dir, tmp_path) -> None:
    first = served.job("detect", detect_request(ct_dir / RICORD_3MM, tmp_path / "1.json", small)).start()
    assert first.wait(timeout_s=600)["loads"] == {"ct-clip": 1}
    pid = served.pid
    second = served.job("detect", detect_request(ct_dir / RICORD_3MM, tmp_path / "2.json", small)).start()
    assert second.wait(timeout_s=300)["loads"] == {"ct-clip": 1} and served.pid == pid and served.starts == 1

    assert "load model" in steps_of(first) and "load model" not in steps_of(second)
    assert {"preprocess", "encode image", "score"} <= set(steps_of(second))
    one, two = (json.loads((tmp_path / name).read_text())["detection"] for name in ("1.json", "2.json"))
    assert "load_model" in one["timings_s"] and set(two["timings_s"]) == {"preprocess", "encode_image", "score",
                                                                           "detect_total"}
    assert [f["probability"] for f in one["findings"]] == [f["probability"] for f in two["findings"]]
    assert one["checkpoint_sha256"] == two["checkpoint_sha256"]


def test_a_new_weights_file_or_device_loads_again(served, small, ct_dir, tmp_path) -> None:
    ct, out = ct_dir / RICORD_3MM, tmp_path / "r.json"
    loads = detect_loads(served, small, ct, out)
    checkpoint = small[0]
    stat = checkpoint.stat()
    os.utime(checkpoint, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the file was replaced
    job = served.job("detect", detect_request(ct, out, small)).start()
    assert job.wait(timeout_s=300)["loads"] == {"ct-clip": loads + 1} and "load model" in steps_of(job)
    assert detect_loads(served, small, ct, out, dtype="bf16") == loads + 2


def wait_for_step(job, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not steps_of(job):
        assert time.monotonic() < deadline and not job.finished, job.events
        job.poll()
        time.sleep(0.02)


def test_cancel_ends_the_job_and_keeps_the_models(served, small, ct_dir, tmp_path) -> None:
    loads = detect_loads(served, small, ct_dir / RICORD_3MM, tmp_path / "before.json")
    pid = served.pid
    job = served.job("detect", detect_request(ct_dir / RICORD_3MM, tmp_path / "c.json", small)).start()
    queued = served.job("detect", detect_request(ct_dir / RICORD_3MM, tmp_path / "q.json", small)).start()
    wait_for_step(job)
    job.cancel()
    queued.cancel()  # still waiting its turn: dropped without starting
    for cancelled in (job, queued):
        with pytest.raises(WorkerError, match="cancelled by the user"):
            cancelled.wait(timeout_s=60)
        assert cancelled.last("cancelled") is not None
    assert queued.last("started") is None
    assert not (tmp_path / "c.json").exists() and not (tmp_path / "q.json").exists()
    after = served.job("detect", detect_request(ct_dir / RICORD_3MM, tmp_path / "a.json", small)).start()
    assert after.wait(timeout_s=300)["loads"] == {"ct-clip": loads}
    assert served.pid == pid and "load model" not in steps_of(after)


def test_malformed_requests_are_one_line_errors(served, small, ct_dir, tmp_path) -> None:
    pid = served.pid
    cases = {
        "detect": ({"out": str(tmp_path / "x.json")}, "'ct' must be a non-empty string"),
        "ground": ({**detect_request(ct_dir / RICORD_3MM, tmp_path / "g", small), "report": 3},
                   "'report' must be text"),
        "report": ({"inputs": "ct.nii", "out": str(tmp_path)}, "'inputs' must be a non-empty list"),
        "chat_ask": ({"session": 999, "question": "?"}, "no chat 999 in the model process"),
    }
    for op, (request, message) in cases.items():
        job = served.job(op, request).start()
        with pytest.raises(WorkerError, match=message) as caught:
            job.wait(timeout_s=60)
        assert "\n" not in str(caught.value) and "Traceback" not in str(caught.value.__cause__)
    unknown = detect_request(ct_dir / RICORD_3MM, tmp_path / "x.json", small, precision="fp8")
    job = served.job("detect", unknown).start()
    with pytest.raises(WorkerError, match=r"unknown 'ctclip' options \['precision'\]") as caught:
        job.wait(timeout_s=60)
    assert job.last("error")["details"] == ""
    job = served.job("explode").start()
    with pytest.raises(WorkerError, match="unknown op 'explode'"):
        job.wait(timeout_s=60)
    served.send({"no": "id"})  # an error event of no job: the process goes on
    assert served.job("chat_close", {"session": 999}).start().wait(timeout_s=60)["closed"] is False
    assert served.pid == pid


def test_unload_frees_the_models_and_the_next_job_loads_again(served, small, ct_dir, tmp_path) -> None:
    loads = detect_loads(served, small, ct_dir / RICORD_3MM, tmp_path / "u.json")
    assert served.job("unload").start().wait(timeout_s=60)["unloaded"] == ["ct-clip"]
    assert served.job("unload").start().wait(timeout_s=60)["unloaded"] == []
    job = served.job("detect", detect_request(ct_dir / RICORD_3MM, tmp_path / "u.json", small)).start()
    assert job.wait(timeout_s=300)["loads"] == {"ct-clip": loads + 1} and "load model" in steps_of(job)


def test_a_crash_is_a_one_line_error_and_the_next_request_starts_a_new_process(served, small, ct_dir,
                                                                               tmp_path) -> None:
    starts, pid = served.starts, served.pid
    job = served.job("detect", detect_request(ct_dir / RICORD_3MM, tmp_path / "k.json", small)).start()
    wait_for_step(job)
    os.kill(pid, signal.SIGKILL)  # what the system's out-of-memory killer does
    with pytest.raises(WorkerError, match=r"model process stopped unexpectedly \(exit code -9\).*next request "
                                          "starts a new one") as caught:
        job.wait(timeout_s=60)
    assert "\n" not in str(caught.value) and isinstance(caught.value.__cause__, ChildTraceback)
    assert not served.running
    job = served.job("detect", detect_request(ct_dir / RICORD_3MM, tmp_path / "k.json", small)).start()
    assert job.wait(timeout_s=600)["loads"] == {"ct-clip": 1}
    assert served.starts == starts + 1 and served.pid != pid


@pytest.fixture(scope="module")
def chat_parts(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("chat")
    llm = make_tiny_llm(root / "llm", smollm2_tokenizer_folder(root))
    make_ctchat_adapter(root / "release" / "8b", llm)
    return {"llm": str(llm), "lora": str(root / "release"), "template": "chatml_direct"}


def test_chat_streams_tokens_and_stops(served, small, chat_parts, ct_dir, tmp_path) -> None:
    options = {**chat_parts, "ctclip": str(small[0]), "ctclip_config": str(small[1]), "device": "cpu"}
    start = served.job("chat_start", {"model": "ct-chat-llama3.1-8b", "chat": options, "ct": str(ct_dir / RICORD_3MM),
                                      "max_new_tokens": 12}).start()
    ask = served.job("chat_ask", {"session": start.id, "question": "Is there a pleural effusion?",
                                  "answer_type": "short"}).start()  # sent before the model has loaded
    assert start.wait(timeout_s=600)["session"] == start.id
    result = ask.wait(timeout_s=300)
    tokens = [event["text"] for event in ask.events if event["type"] == "token"]
    assert len(tokens) > 1 and "".join(tokens).strip() == result["answer"]["text"].strip()
    assert result["transcript"][0]["question"] == "Is there a pleural effusion?" and not result["answer"]["stopped"]
    assert result["loads"]["ct-chat"] == 1

    again = served.job("chat_start", {"model": "ct-chat-llama3.1-8b", "chat": options, "max_new_tokens": 4000}).start()
    assert again.wait(timeout_s=300)["loads"]["ct-chat"] == 1  # the same model, a new conversation
    long = served.job("chat_ask", {"session": again.id, "question": "Describe the lungs."}).start()
    deadline = time.monotonic() + 300
    while not any(event["type"] == "token" for event in long.events):
        assert time.monotonic() < deadline and not long.finished
        long.poll()
        time.sleep(0.01)
    long.cancel()
    stopped = long.wait(timeout_s=60)
    assert stopped["answer"]["stopped"] and stopped["transcript"][-1]["stopped"]
    assert stopped["answer"]["new_tokens"] < 4000
