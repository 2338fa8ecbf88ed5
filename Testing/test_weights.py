"""Weights manager: registry, verified resumable downloads, offline import, cache state and the CLI.

Every network test talks to a real HTTP server on 127.0.0.1 (Testing/fake_hub.py) that behaves like the
Hugging Face Hub; the registry override and the mirror variable point the manager at it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import fixtures_root  # noqa: E402
from fake_hub import FakeHub, SilentServer  # noqa: E402
from small_models import fullsize_layout  # noqa: E402

from CTFoundationLib import cli  # noqa: E402
from CTFoundationLib.errors import WeightsError  # noqa: E402
from CTFoundationLib.weights import (  # noqa: E402
    INSTALLED,
    MISSING,
    PARTIAL,
    DownloadOptions,
    Manifest,
    download_model,
    import_model,
    load_registry,
    model_dir,
    model_status,
    remove_model,
    resolve_weights,
    verify_model,
)
from CTFoundationLib.weights import download as download_module  # noqa: E402
from CTFoundationLib.weights import registry as registry_module  # noqa: E402
from CTFoundationLib.weights.cache import FileRecord  # noqa: E402
from CTFoundationLib.weights.registry import BUILTIN_REGISTRY, SCHEMA_PATH  # noqa: E402

SECRET = "hf_TESTsecretTOKEN_0123456789"
CTRATE = "test/CT-RATE"


def blob(size: int, seed: int) -> bytes:
    """Deterministic pseudo-random bytes (a torch-zip-looking header so format checks pass)."""
    out = bytearray(b"PK\x03\x04")
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}-{counter}".encode()).digest() * 64
        counter += 1
    return bytes(out[:size])


CLIP = blob(3 * 2**20 + 123, 1)
PINNED = blob(200_000, 2)
ENC_BIN = blob(500_000, 3)
ENC_CONFIG = b'{"hidden_size": 8}'
ENC_VOCAB = b"[PAD]\n[UNK]\nlung\n"
LLM_SHARDS = [blob(300_000 + i, 10 + i) for i in range(3)]
LLM_JSON = {"config.json": b'{"a": 1}', "generation_config.json": b"{}", "tokenizer.json": b'{"t": 2}'}
LORA = {"adapter_config.json": b'{"r": 8}', "adapter_model.safetensors": b"\x02\x00\x00\x00\x00\x00\x00\x00{}",
        "non_lora_trainables.bin": blob(100_000, 20)}
PLAIN = blob(150_000, 30)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def hf(repo: str, path: str, repo_type: str = "dataset", **extra) -> dict:
    return {"type": "hf", "repo": repo, "repo_type": repo_type, "revision": "main", "path": path, **extra}


def site_registry_data() -> dict:
    """Models that mirror the real entries' shapes, pointed at the fake Hub.

    The single-file models that serve blobs (t-clip, t-pinned, t-plain) are of a family checked by format only,
    as their bytes are no real checkpoints; the structural checks are tested with real layouts (t-small-clip and
    the built-in ct-clip-v2 and fvlm entries).
    """
    model = {"license": "CC-BY-NC-SA-4.0", "gated": True, "page": "https://example.org/ct-rate",
             "depends_on": [], "resources": {"approx_ram_gb": 1}}
    return {
        "schema_version": 1,
        "licenses": {"TEST-OPEN": {"name": "Open test licence", "url": "https://example.org/l",
                                   "summary": "anything goes", "acknowledge": False}},
        "models": {
            "t-clip": {**model, "title": "test clip", "family": "text-encoder",
                       "files": [{"name": "clip.pt", "format": "torch", "source": hf(CTRATE, "models/clip.pt")}]},
            "t-pinned": {**model, "title": "pinned", "family": "text-encoder", "files": [
                {"name": "pinned.pt", "format": "torch", "source": hf(CTRATE, "models/pinned.pt"),
                 "size": len(PINNED), "sha256": sha(PINNED)}]},
            "t-encoder": {**model, "title": "encoder", "family": "text-encoder", "license": "TEST-OPEN",
                          "gated": False, "entry": ".", "files": [
                {"name": "config.json", "format": "json", "source": hf("test/bert", "config.json", "model")},
                {"name": "vocab.txt", "format": "text", "source": hf("test/bert", "vocab.txt", "model")},
                {"name": "extra.json", "optional": True, "source": hf("test/bert", "extra.json", "model")},
                {"name": "pytorch_model.bin", "format": "torch",
                 "source": hf("test/bert", "pytorch_model.bin", "model")}]},
            "t-llm": {**model, "title": "llm", "family": "llm", "license": "TEST-OPEN", "gated": False,
                      "entry": ".", "files": [{"name": ".", "folder": True, "source": hf(
                          "test/llm", "", "model", include=["*.json", "model-*.safetensors"])}]},
            "t-chat": {**model, "title": "chat", "family": "ct-chat", "depends_on": ["t-clip", "t-llm"],
                       "entry": "lora", "files": [{"name": "lora", "folder": True,
                                                   "source": hf(CTRATE, "models/CT-CHAT", select="*llama*8b*")}]},
            "t-manual": {**model, "title": "manual", "family": "fvlm", "files": [
                {"name": "m.pth", "format": "torch", "source": {
                    "type": "manual", "url": "https://example.org/drive", "instructions": "ask the authors"}}]},
            "t-plain": {**model, "title": "plain", "family": "text-encoder", "license": "TEST-OPEN", "gated": False,
                        "files": [{"name": "plain.pt", "sha256": sha(PLAIN),
                                   "source": {"type": "url", "url": "http://127.0.0.1:1/plain/plain.pt"}}]},
            "t-small-clip": {**model, "title": "small clip", "family": "ct-clip", "entry": "small.pt",
                             "runtime": {"constructors": "constructors.json"}, "files": [
                {"name": "small.pt", "format": "torch", "source": hf(CTRATE, "models/small.pt")},
                {"name": "constructors.json", "format": "json", "source": hf(CTRATE, "models/constructors.json")}]},
        },
    }


@pytest.fixture
def hub(tmp_path: Path):
    server = FakeHub(tmp_path / "hub-storage", page_size=2).start()
    server.add(CTRATE, "models/clip.pt", CLIP, repo_type="dataset")
    server.add(CTRATE, "models/pinned.pt", PINNED, repo_type="dataset")
    server.add("test/bert", "config.json", ENC_CONFIG, lfs=False)
    server.add("test/bert", "vocab.txt", ENC_VOCAB, lfs=False)
    server.add("test/bert", "pytorch_model.bin", ENC_BIN)
    for i, shard in enumerate(LLM_SHARDS):
        server.add("test/llm", f"model-0000{i + 1}-of-00003.safetensors", shard)
    server.add("test/llm", "pytorch_model-00001-of-00001.bin", blob(1000, 99))  # excluded by include
    server.add("test/llm", "original/consolidated.00.pth", blob(1000, 98))  # sub-folder: not taken
    for name, data in LLM_JSON.items():
        server.add("test/llm", name, data, lfs=False)
    for name, data in LORA.items():
        server.add(CTRATE, f"models/CT-CHAT/llava-lora-llama_3.1_8B/{name}", data, repo_type="dataset",
                   lfs=name.endswith((".bin", ".safetensors")))
    server.add(CTRATE, "models/CT-CHAT/llava-lora-llama_3.1_70b/adapter_config.json", b"{}", repo_type="dataset",
               lfs=False)
    server.add_plain("plain.pt", PLAIN)
    yield server
    server.stop()


@pytest.fixture
def env(tmp_path: Path, hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Cache in tmp_path, registry override + mirror pointing at the fake Hub, no token. Returns the cache root."""
    data = site_registry_data()
    data["models"]["t-plain"]["files"][0]["source"]["url"] = f"{hub.url}/plain/plain.pt"
    override = tmp_path / "site-registry.json"
    override.write_text(json.dumps(data))
    home = tmp_path / "cache"
    monkeypatch.setenv("CTFOUNDATION_HOME", str(home))
    monkeypatch.setenv("CTFOUNDATION_REGISTRY", str(override))
    monkeypatch.setenv("CTFOUNDATION_MIRROR", hub.url)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    return home


@pytest.fixture
def run_cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    """Run `ctfoundation ...` in-process; returns (exit code, stdout, stderr)."""

    def run(*argv: str) -> tuple[int, str, str]:
        code = cli.main(list(argv))
        out, err = capsys.readouterr()
        return code, out, err

    return run


def fast(**kwargs) -> DownloadOptions:
    return DownloadOptions(backoff_s=0.01, **kwargs)


def get(model_id: str, **kwargs) -> Path:
    kwargs.setdefault("options", fast())
    return download_model(model_id, accept_licenses=True, **kwargs)


# --- registry ---------------------------------------------------------------------------------------------


def test_registry_files_validate_against_schema(tmp_path: Path) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(SCHEMA_PATH.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.Draft202012Validator(schema).validate(json.loads(BUILTIN_REGISTRY.read_text()))
    jsonschema.Draft202012Validator(schema).validate(site_registry_data())
    bad = site_registry_data()
    bad["models"]["t-clip"]["files"][0]["sha256"] = "not-a-hash"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(schema).validate(bad)


def test_builtin_registry_content() -> None:
    registry = load_registry()
    expected = {"ct-clip-v2", "ct-clip-vocabfine", "ct-clip-lipro", "cxr-bert", "fvlm", "ct-chat-llama3.1-8b",
                "ct-chat-llama3.1-70b", "ct-chat-vicuna", "ct-chat-mistral", "llama3.1-8b-instruct",
                "llama3.1-70b-instruct", "vicuna-13b-v1.5", "mistral-7b-instruct-v0.2"}
    assert expected <= set(registry.models)
    clip = registry.get("ct-clip-v2")
    assert clip.files[0].source.path == "models/CT-CLIP-Related/CT-CLIP_v2.pt"
    assert clip.files[0].source.repo_type == "dataset" and clip.license.id == "CC-BY-NC-SA-4.0"
    assert clip.license.acknowledge and clip.gated
    assert registry.get("fvlm").manual
    chat = [s.id for s in registry.closure("ct-chat-llama3.1-8b")]
    assert chat == ["cxr-bert", "ct-clip-v2", "llama3.1-8b-instruct", "ct-chat-llama3.1-8b"]
    for spec in registry.models.values():  # no invented hashes in the built-in registry
        assert all(f.sha256 is None for f in spec.files)


def test_broken_override_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    override = tmp_path / "bad.json"
    data = site_registry_data()
    data["models"]["t-chat"]["depends_on"] = ["nope"]
    override.write_text(json.dumps(data))
    monkeypatch.setenv("CTFOUNDATION_REGISTRY", str(override))
    with pytest.raises(WeightsError, match="unknown model 'nope'"):
        load_registry()
    override.write_text("{not json")
    with pytest.raises(WeightsError, match="bad.json"):
        load_registry()
    data = site_registry_data()
    data["models"]["t-chat"]["runtime"] = {"tokeniser": "vocab.txt"}
    override.write_text(json.dumps(data))
    with pytest.raises(WeightsError, match="tokeniser"):  # the schema (jsonschema installed) ...
        load_registry()
    monkeypatch.setattr(registry_module, "_schema_check", lambda data, path: None)
    with pytest.raises(WeightsError, match=r"'runtime' takes the keys \[.*'tokenizer'"):  # ... or the loader
        load_registry()


# --- downloads --------------------------------------------------------------------------------------------


def test_full_download_hash_and_manifest(env: Path, hub: FakeHub) -> None:
    calls: list[tuple[int, int | None]] = []
    path = get("t-clip", options=fast(progress=lambda done, total: calls.append((done, total))))
    assert path == model_dir("t-clip", env) / "clip.pt"
    assert path.read_bytes() == CLIP
    assert hub.served["models/clip.pt"] == len(CLIP)
    assert calls[-1] == (len(CLIP), len(CLIP))
    record = Manifest("t-clip", env).files["clip.pt"]
    assert (record.sha256, record.size, record.hash_origin) == (sha(CLIP), len(CLIP), "hub")
    assert record.source.endswith("/datasets/test/CT-RATE/resolve/main/models/clip.pt")
    assert not list(path.parent.glob("*.part*"))
    assert resolve_weights("t-clip") == path.resolve()
    get("t-clip")  # second run: nothing fetched again
    assert hub.served["models/clip.pt"] == len(CLIP)


def test_resume_after_cut_in_a_later_run(env: Path, hub: FakeHub) -> None:
    hub.behave("models/clip.pt", "cut")
    with pytest.raises(WeightsError, match="run the same command again to resume"):
        get("t-clip", options=fast(retries=0))
    part = model_dir("t-clip", env) / "clip.pt.part"
    assert part.stat().st_size == len(CLIP) // 2
    assert model_status(load_registry().get("t-clip")).state == PARTIAL
    get("t-clip", options=fast(retries=0))
    assert (model_dir("t-clip", env) / "clip.pt").read_bytes() == CLIP
    assert hub.served["models/clip.pt"] == len(CLIP)  # no byte fetched twice
    ranges = [h.get("Range") for m, p, h in hub.requests_seen if p.startswith("/cdn/") and m == "GET"]
    assert ranges == [None, f"bytes={len(CLIP) // 2}-"]


def test_ctrl_c_then_rerun_resumes(env: Path, hub: FakeHub) -> None:
    """A download interrupted with Ctrl-C (SIGINT) keeps its part file; the next run fetches only the rest."""
    hub.behave("models/clip.pt", "stall")
    part = model_dir("t-clip", env) / "clip.pt.part"
    command = [sys.executable, "-m", "CTFoundationLib", "weights", "download", "t-clip", "--yes"]
    # SIGINT as at a terminal, whatever an earlier test of this pytest process left its disposition at
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    # the bytes of the read under way when a connection dies are lost (urllib3), so "about half" is up to one
    # network read short of it; they are fetched again on resume
    lost_at_most = 64 * 1024
    deadline = time.monotonic() + 60
    while not (part.is_file() and part.stat().st_size >= len(CLIP) // 2 - lost_at_most) and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130 and "Traceback" not in stderr, stderr
    assert len(CLIP) // 2 - lost_at_most <= part.stat().st_size <= len(CLIP) // 2
    hub.behave("models/clip.pt", None)
    get("t-clip", options=fast(retries=0))
    assert (model_dir("t-clip", env) / "clip.pt").read_bytes() == CLIP
    assert hub.served["models/clip.pt"] - len(CLIP) <= lost_at_most  # the first half was not fetched again


def test_resume_within_one_run_by_retrying(env: Path, hub: FakeHub) -> None:
    hub.behave("models/clip.pt", "cut")
    get("t-clip", options=fast(retries=2))
    assert (model_dir("t-clip", env) / "clip.pt").read_bytes() == CLIP
    assert hub.served["models/clip.pt"] == len(CLIP)


def test_server_errors_are_retried(env: Path, hub: FakeHub) -> None:
    hub.behave("models/clip.pt", "500_once")
    events: list[str] = []
    get("t-clip", options=fast(retries=1, on_event=events.append))
    assert any("retrying" in e for e in events)
    assert (model_dir("t-clip", env) / "clip.pt").read_bytes() == CLIP


def test_server_that_ignores_range_restarts_cleanly(env: Path, hub: FakeHub) -> None:
    hub.behave("models/clip.pt", "cut")
    with pytest.raises(WeightsError):
        get("t-clip", options=fast(retries=0))
    hub.behave("models/clip.pt", "no_range")
    get("t-clip", options=fast(retries=0))
    assert (model_dir("t-clip", env) / "clip.pt").read_bytes() == CLIP


def test_checksum_mismatch_sets_the_file_aside(env: Path, hub: FakeHub) -> None:
    hub.behave("models/clip.pt", "corrupt")
    with pytest.raises(WeightsError, match="checksum mismatch") as info:
        get("t-clip")
    folder = model_dir("t-clip", env)
    assert "clip.pt.corrupt" in str(info.value)
    assert not (folder / "clip.pt").exists() and (folder / "clip.pt.corrupt").is_file()
    assert model_status(load_registry().get("t-clip")).state == MISSING
    with pytest.raises(WeightsError, match="not installed"):
        resolve_weights("t-clip")


@pytest.mark.parametrize(("model_id", "path", "mode", "why"), [
    ("t-clip", "models/clip.pt", "short", f"expected {len(CLIP)} bytes, got {len(CLIP) - 1} bytes"),
    ("t-llm", "model-00002-of-00003.safetensors", "corrupt", f"expected sha256 {sha(LLM_SHARDS[1])}"),
], ids=["size from HEAD", "sha256 from the folder listing"])
def test_bytes_that_differ_from_what_the_hub_publishes_are_refused(env: Path, hub: FakeHub, model_id: str, path: str,
                                                                   mode: str, why: str) -> None:
    """The Hub's LFS sha256 and size (HEAD headers, or the folder listing) are checked; no registry hash needed."""
    hub.behave(path, mode)
    with pytest.raises(WeightsError, match=f"checksum mismatch .*{why}"):
        get(model_id, options=fast(retries=0))
    name = path.rsplit("/", 1)[-1]
    folder = model_dir(model_id, env)
    assert not (folder / name).exists() and (folder / f"{name}.corrupt").is_file()
    assert name not in Manifest(model_id, env).files
    assert model_status(load_registry().get(model_id)).state != INSTALLED


def test_registry_sha256_wins_over_the_server(env: Path, hub: FakeHub, tmp_path: Path) -> None:
    get("t-pinned")
    assert Manifest("t-pinned", env).files["pinned.pt"].hash_origin == "registry"
    remove_model("t-pinned")
    hub.add(CTRATE, "models/pinned.pt", blob(len(PINNED), 77), repo_type="dataset")  # upstream changed
    with pytest.raises(WeightsError, match="checksum mismatch"):
        get("t-pinned")


@pytest.mark.parametrize("code", ["401", "403"])
def test_gated_errors_say_what_to_do(env: Path, hub: FakeHub, code: str, monkeypatch: pytest.MonkeyPatch) -> None:
    hub.behave("models/clip.pt", code)
    if code == "403":
        monkeypatch.setenv("HF_TOKEN", SECRET)
    with pytest.raises(WeightsError) as info:
        get("t-clip")
    message = str(info.value)
    assert "gated" in message and "https://example.org/ct-rate" in message and SECRET not in message
    assert ("HF_TOKEN" in message) if code == "401" else ("no access" in message)


def test_rejected_token(env: Path, hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", SECRET)
    hub.behave("models/clip.pt", "bad_token")
    with pytest.raises(WeightsError, match="token was rejected.*settings/tokens") as info:
        get("t-clip")
    assert SECRET not in str(info.value)


def test_404_error(env: Path, hub: FakeHub) -> None:
    hub.behave("models/clip.pt", "404")
    with pytest.raises(WeightsError, match="not found .*HTTP 404.*weights import t-clip"):
        get("t-clip")


def test_connection_refused_means_offline(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("CTFOUNDATION_MIRROR", f"http://127.0.0.1:{port}")
    with pytest.raises(WeightsError, match=r"cannot reach 127\.0\.0\.1.*offline\?.*weights import t-clip"):
        get("t-clip", options=fast(retries=1))


@pytest.fixture
def silent(monkeypatch: pytest.MonkeyPatch):
    """A server that accepts connections and never answers, as the mirror."""
    server = SilentServer()
    monkeypatch.setenv("CTFOUNDATION_MIRROR", server.url)
    yield server
    server.stop()


@pytest.mark.parametrize(("model_id", "what", "gave_up"), [
    ("t-pinned", "t-pinned/pinned.pt", "could not get 'pinned.pt' of model 't-pinned': "),  # sha256 pinned: GET
    ("t-clip", "t-clip/clip.pt", "model 't-clip': "),  # asks the Hub for the sha256 first: HEAD
])
def test_a_server_that_never_answers_is_given_up_within_the_deadline(
    env: Path, silent: SilentServer, monkeypatch: pytest.MonkeyPatch, model_id: str, what: str, gave_up: str
) -> None:
    monkeypatch.setenv("CTFOUNDATION_DOWNLOAD_DEADLINE_S", "2")
    events: list[str] = []
    options = DownloadOptions(read_timeout_s=0.3, backoff_s=0.1, retries=50, on_event=events.append)
    assert options.deadline_s == 2
    started = time.monotonic()
    with pytest.raises(WeightsError) as info:
        download_model(model_id, accept_licenses=True, options=options)
    elapsed = time.monotonic() - started
    assert events[:2] == [
        f"{what}: no answer from 127.0.0.1 within 0.3 s (read timeout); retrying in 0.1 s (retry 1 of 50)",
        f"{what}: no answer from 127.0.0.1 within 0.3 s (read timeout); retrying in 0.2 s (retry 2 of 50)",
    ]
    message = str(info.value)
    assert message.startswith(f"{gave_up}no answer from 127.0.0.1 within 0.3 s (read timeout); gave up after ")
    assert message.endswith("s without progress; CTFOUNDATION_DOWNLOAD_DEADLINE_S allows 2 s; try again later")
    assert elapsed < 2 + 1  # the deadline, plus a little to start
    assert silent.accepted.is_set()


def test_deadline_from_the_environment_must_be_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CTFOUNDATION_DOWNLOAD_DEADLINE_S", "soon")
    with pytest.raises(WeightsError, match="CTFOUNDATION_DOWNLOAD_DEADLINE_S='soon' is not a positive number"):
        DownloadOptions()


def _interrupt_download(model_id: str, when: Callable[[str], bool]) -> tuple[subprocess.Popen, str, float]:
    """Run `ctfoundation weights download MODEL`, send SIGINT once `when(stderr line)`: (process, stderr, seconds
    from the signal to the end)."""
    command = [sys.executable, "-m", "CTFoundationLib", "weights", "download", model_id, "--yes"]
    # SIGINT as at a terminal, whatever an earlier test of this pytest process left its disposition at
    process = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines = []
    for line in process.stderr:
        lines.append(line)
        if when(line):
            break
    sent = time.monotonic()
    process.send_signal(signal.SIGINT)
    _, rest = process.communicate(timeout=60)
    return process, "".join(lines) + rest, time.monotonic() - sent


def test_ctrl_c_ends_a_download_waiting_for_an_answer_at_once(env: Path, silent: SilentServer) -> None:
    """Ctrl-C while the server holds the request (the read timeout is 30 s): 'interrupted', exit 130 at once."""
    process, stderr, took = _interrupt_download("t-pinned", lambda line: silent.accepted.wait(60))
    assert process.returncode == 130 and stderr.rstrip().endswith("interrupted") and "Traceback" not in stderr
    assert took < 10, f"{took:.1f} s"


def test_ctrl_c_ends_the_pause_before_a_retry_at_once(env: Path, hub: FakeHub) -> None:
    hub.behave("models/clip.pt", "500")
    process, stderr, took = _interrupt_download("t-clip", lambda line: "retrying in 4 s (retry 3 of 5)" in line)
    assert "t-clip/clip.pt: HTTP 500 from http://127.0.0.1:" in stderr and "retrying in 4 s" in stderr
    assert process.returncode == 130 and stderr.rstrip().endswith("interrupted") and "Traceback" not in stderr
    assert took < 3, f"{took:.1f} s"  # the pause was 4 s


def test_disk_full_is_reported_and_the_part_kept(env: Path, hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    class FillingDisk:
        """A file handle on a disk that fills up after 1 MiB."""

        def __init__(self, handle):
            self.handle = handle

        def write(self, data) -> int:
            if self.handle.tell() + len(data) > 2**20:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.handle.write(data)

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            self.handle.close()

    def fake_open(path, mode="r", **kwargs):
        handle = open(path, mode, **kwargs)
        return FillingDisk(handle) if mode == "ab" else handle

    monkeypatch.setattr(download_module, "open", fake_open, raising=False)
    with pytest.raises(WeightsError, match="disk full while writing .*clip.pt.part.*resume"):
        get("t-clip", options=fast(chunk_bytes=2**18))
    assert 0 < (model_dir("t-clip", env) / "clip.pt.part").stat().st_size <= 2**20


def test_multi_file_model_with_small_git_files_and_optional_file(env: Path, hub: FakeHub) -> None:
    events: list[str] = []
    folder = get("t-encoder", options=fast(on_event=events.append))
    assert folder == model_dir("t-encoder", env).resolve()
    assert (folder / "config.json").read_bytes() == ENC_CONFIG
    files = Manifest("t-encoder", env).files
    assert files["config.json"].hash_origin == "computed" and files["config.json"].sha256 == sha(ENC_CONFIG)
    assert files["pytorch_model.bin"].hash_origin == "hub"
    assert any("optional file extra.json" in e for e in events)
    assert model_status(load_registry().get("t-encoder")).state == INSTALLED


def test_folder_models_with_dependencies(env: Path, hub: FakeHub) -> None:
    lora = get("t-chat")
    assert lora == (model_dir("t-chat", env) / "lora").resolve()
    assert {p.name: p.read_bytes() for p in lora.iterdir()} == LORA
    llm = model_dir("t-llm", env)
    names = sorted(p.name for p in llm.iterdir() if p.name not in ("manifest.json", ".lock"))
    assert names == sorted([*LLM_JSON, *(f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3))])
    assert (model_dir("t-clip", env) / "clip.pt").read_bytes() == CLIP
    assert any("cursor=" in p for _, p, _ in hub.requests_seen if "/tree/" in p)  # paginated listing followed
    manifest = Manifest("t-chat", env)
    assert manifest.folders["lora"]["source"].endswith("models/CT-CHAT/llava-lora-llama_3.1_8B")
    assert manifest.files["lora/non_lora_trainables.bin"].hash_origin == "hub"


def test_folder_select_that_matches_nothing(env: Path, hub: FakeHub, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    data = json.loads(Path(os.environ["CTFOUNDATION_REGISTRY"]).read_text())
    data["models"]["t-chat"]["files"][0]["source"]["select"] = "*vicuna*"
    data["models"]["t-chat"]["depends_on"] = []
    Path(os.environ["CTFOUNDATION_REGISTRY"]).write_text(json.dumps(data))
    with pytest.raises(WeightsError, match="no sub-folder .*llava-lora-llama_3.1_8B"):
        get("t-chat")


def test_plain_url_source(env: Path, hub: FakeHub) -> None:
    assert get("t-plain").read_bytes() == PLAIN
    assert Manifest("t-plain", env).files["plain.pt"].hash_origin == "registry"


def test_manual_model_explains_itself(env: Path) -> None:
    with pytest.raises(WeightsError, match="cannot be downloaded automatically: ask the authors.*example.org/drive"):
        get("t-manual")
    with pytest.raises(WeightsError, match="not installed: missing m.pth; get it from https://example.org/drive"):
        resolve_weights("t-manual")


def test_licence_must_be_acknowledged(env: Path, hub: FakeHub) -> None:
    with pytest.raises(WeightsError, match="licence not yet acknowledged"):
        download_model("t-clip", options=fast())
    assert hub.served["models/clip.pt"] == 0
    download_model("t-clip", options=fast(), accept_licenses=True)
    download_model("t-pinned", options=fast())  # same licence: acknowledged once is enough


# --- import, verify, status, remove -----------------------------------------------------------------------


def test_import_copies_so_damage_to_the_cache_spares_the_source(env: Path, tmp_path: Path, run_cli) -> None:
    source = tmp_path / "download" / "whatever-name.pt"
    source.parent.mkdir()
    source.write_bytes(PINNED)
    path = import_model("t-pinned", source, accept_licenses=True)
    assert path.read_bytes() == PINNED and path.name == "pinned.pt"
    assert Manifest("t-pinned", env).files["pinned.pt"].hash_origin == "registry"
    with open(path, "r+b") as cached:  # the disk damages the cached copy in place
        cached.seek(1000)
        cached.write(b"\xff" * 16)
    assert source.read_bytes() == PINNED
    assert list(verify_model(load_registry().get("t-pinned")).bad) == ["pinned.pt"]
    code, _, err = run_cli("weights", "import", "t-clip", str(_write(tmp_path / "c.pt", CLIP)), "--yes", "--link")
    assert code == 0 and os.stat(model_dir("t-clip", env) / "clip.pt").st_ino == os.stat(tmp_path / "c.pt").st_ino
    assert Manifest("t-clip", env).files["clip.pt"].sha256 == sha(CLIP)


def test_a_verified_checkpoint_is_not_hashed_again_until_it_changes(env: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The runtimes take the sha256 the weights manager recorded; a file changed since is hashed again."""
    from CTFoundationLib.inference import common

    path = import_model("t-pinned", _write(tmp_path / "p.pt", PINNED), accept_licenses=True)
    hashed: list[Path] = []
    monkeypatch.setattr(common, "sha256_file", lambda file: hashed.append(file) or sha(file.read_bytes()))
    assert common.file_sha256(path, tmp_path / "hashes.json") == sha(PINNED) and hashed == []
    with open(path, "r+b") as cached:  # changed in place after verification: the record no longer holds
        cached.write(b"\xff" * 16)
    assert common.file_sha256(path, tmp_path / "hashes.json") == sha(path.read_bytes()) != sha(PINNED)
    assert hashed == [path]


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_import_rejects_wrong_files(env: Path, tmp_path: Path) -> None:
    wrong = _write(tmp_path / "wrong.pt", blob(len(PINNED), 5))
    with pytest.raises(WeightsError, match="not the 'pinned.pt' file .*sha256"):
        import_model("t-pinned", wrong, accept_licenses=True)
    short = _write(tmp_path / "short.pt", PINNED[:-1])
    with pytest.raises(WeightsError, match="has 199999 bytes"):
        import_model("t-pinned", short, accept_licenses=True)
    text = _write(tmp_path / "notes.pt", b"these are not weights")
    with pytest.raises(WeightsError, match="not a PyTorch checkpoint"):
        import_model("t-clip", text, accept_licenses=True)
    assert not (model_dir("t-pinned", env) / "pinned.pt").exists()
    assert not (model_dir("t-clip", env) / "clip.pt").exists()
    with pytest.raises(WeightsError, match="needs several files"):
        import_model("t-encoder", wrong)


def test_rejected_import_keeps_the_installed_file(env: Path, tmp_path: Path) -> None:
    import_model("t-pinned", _write(tmp_path / "good.pt", PINNED), accept_licenses=True)
    wrong = _write(tmp_path / "wrong.pt", blob(len(PINNED), 5))
    with pytest.raises(WeightsError, match="sha256"):
        import_model("t-pinned", wrong, accept_licenses=True)
    assert (model_dir("t-pinned", env) / "pinned.pt").read_bytes() == PINNED


def test_import_folders(env: Path, tmp_path: Path) -> None:
    bert = tmp_path / "bert"
    bert.mkdir()
    for name, data in {"config.json": ENC_CONFIG, "vocab.txt": ENC_VOCAB, "pytorch_model.bin": ENC_BIN}.items():
        _write(bert / name, data)
    assert import_model("t-encoder", bert) == model_dir("t-encoder", env).resolve()
    (bert / "config.json").unlink()
    with pytest.raises(WeightsError, match="lacks config.json"):
        import_model("t-encoder", bert, home=tmp_path / "other")
    llm = tmp_path / "llm"
    llm.mkdir()
    _write(llm / "config.json", b"{}")
    _write(llm / "model-00001-of-00001.safetensors", LORA["adapter_model.safetensors"])
    _write(llm / "notes.md", b"skip me")
    import_model("t-llm", llm)
    assert sorted(Manifest("t-llm", env).files) == ["config.json", "model-00001-of-00001.safetensors"]
    assert model_status(load_registry().get("t-llm")).state == INSTALLED


@pytest.fixture
def checkpoints(tmp_path: Path) -> dict[str, Path]:
    """Real state-dict files: the full-size CT-CLIP v2 and fVLM layouts and the small reference fixtures."""
    if not (fixtures_root() / "ctclip_v2_fullsize_keys.json").is_file():
        pytest.skip(f"golden fixtures not found at {fixtures_root()}; set CTFOUNDATION_FIXTURES")
    return {
        "ct-clip": fullsize_layout("ctclip_v2", tmp_path / "CT-CLIP_v2.pt"),
        "fvlm": fullsize_layout("fvlm", tmp_path / "fvlm_checkpoint.pth"),
        "small ct-clip": fixtures_root() / "ctclip_v2_small" / "state_dict.pt",
        "small fvlm": fixtures_root() / "fvlm_small" / "state_dict.pt",
    }


def _error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_import_refuses_a_checkpoint_of_another_model(env: Path, checkpoints: dict[str, Path], run_cli) -> None:
    code, _, err = run_cli("weights", "import", "ct-clip-v2", str(checkpoints["fvlm"]), "--yes")
    line = _error_line(err)
    assert code == 2 and f"{checkpoints['fvlm']} looks like an fVLM checkpoint (keys visual_encoder.*), " \
                         "not model 'ct-clip-v2'" in line and "nothing was imported" in line
    code, _, err = run_cli("weights", "import", "fvlm", str(checkpoints["ct-clip"]), "--yes")
    assert code == 2 and "looks like a CT-CLIP checkpoint (keys visual_transformer.*), not model 'fvlm'" in err
    code, _, err = run_cli("weights", "import", "ct-clip-v2", str(checkpoints["small ct-clip"]), "--yes")
    line = _error_line(err)  # the right family at other sizes: the loader's own reason, without its advice
    assert code == 2 and "model 'ct-clip-v2' cannot load" in line and "wrong shapes" in line and "Use a" not in line
    for model_id in ("ct-clip-v2", "fvlm"):
        assert model_status(load_registry().get(model_id)).state == MISSING
        assert not model_dir(model_id, env).exists()
    code, _, err = run_cli("weights", "import", "ct-clip-v2", str(checkpoints["ct-clip"]), "--yes")
    assert code == 0 and "imported and verified" in err
    code, _, err = run_cli("weights", "import", "fvlm", str(checkpoints["fvlm"]), "--yes")
    assert code == 0 and "imported and verified" in err
    code, _, err = run_cli("weights", "verify", "ct-clip-v2", "fvlm")
    assert code == 0 and "ct-clip-v2: 1 file(s) OK" in err and "fvlm: 1 file(s) OK" in err


def test_verify_sets_aside_a_checkpoint_of_another_model(env: Path, checkpoints: dict[str, Path], run_cli) -> None:
    """A wrong file that an import let through before the check existed: verify finds it and sets it aside."""
    folder = model_dir("ct-clip-v2", env)
    folder.mkdir(parents=True)
    placed = folder / "CT-CLIP_v2.pt"
    placed.write_bytes(checkpoints["fvlm"].read_bytes())
    manifest = Manifest("ct-clip-v2", env)
    manifest.record_file(placed.name, FileRecord(sha(placed.read_bytes()), placed.stat().st_size, "2024-01-01T00:00:00",
                                                 f"import:{checkpoints['fvlm']}", "computed"))
    manifest.save()
    spec = load_registry().get("ct-clip-v2")
    assert model_status(spec).state == INSTALLED
    code, _, err = run_cli("weights", "verify", "ct-clip-v2")
    assert code == 1 and "BAD CT-CLIP_v2.pt" in err and "looks like an fVLM checkpoint" in err
    assert model_status(spec).state == MISSING and placed.with_name("CT-CLIP_v2.pt.corrupt").is_file()


def test_import_checks_at_the_sizes_the_registry_entry_names(env: Path, checkpoints: dict[str, Path],
                                                             tmp_path: Path) -> None:
    """An entry with its own constructors file (not the released sizes) is checked at those sizes."""
    source = tmp_path / "small-clip"
    source.mkdir()
    _write(source / "small.pt", checkpoints["small ct-clip"].read_bytes())
    _write(source / "constructors.json", (checkpoints["small ct-clip"].parent / "config.json").read_bytes())
    assert import_model("t-small-clip", source, accept_licenses=True).name == "small.pt"
    assert verify_model(load_registry().get("t-small-clip")).ok == ["constructors.json", "small.pt"]
    _write(source / "small.pt", checkpoints["small fvlm"].read_bytes())
    with pytest.raises(WeightsError, match=r"small.pt looks like an fVLM checkpoint .*not model 't-small-clip'"):
        import_model("t-small-clip", source, home=tmp_path / "other", accept_licenses=True)
    assert not (tmp_path / "other" / "models" / "t-small-clip").exists()


def test_verify_sets_a_changed_file_aside(env: Path, hub: FakeHub) -> None:
    path = get("t-clip")
    assert verify_model(load_registry().get("t-clip")).ok == ["clip.pt"]
    data = bytearray(path.read_bytes())
    data[10] ^= 1
    path.write_bytes(bytes(data))
    result = verify_model(load_registry().get("t-clip"))
    assert list(result.bad) == ["clip.pt"] and path.with_name("clip.pt.corrupt").is_file()
    status = model_status(load_registry().get("t-clip"))
    assert status.state == MISSING and status.corrupt == ["clip.pt.corrupt"]


def test_registry_update_makes_an_old_file_outdated(env: Path, hub: FakeHub) -> None:
    get("t-pinned")
    data = json.loads(Path(os.environ["CTFOUNDATION_REGISTRY"]).read_text())
    newer = blob(len(PINNED), 8)
    data["models"]["t-pinned"]["files"][0]["sha256"] = sha(newer)
    Path(os.environ["CTFOUNDATION_REGISTRY"]).write_text(json.dumps(data))
    assert model_status(load_registry().get("t-pinned")).state == PARTIAL
    hub.add(CTRATE, "models/pinned.pt", newer, repo_type="dataset")
    assert get("t-pinned").read_bytes() == newer


def test_resolve_weights_override(env: Path, tmp_path: Path) -> None:
    mine = _write(tmp_path / "mine.pt", CLIP)
    assert resolve_weights("t-clip", mine) == mine.resolve()
    with pytest.raises(WeightsError, match=r"absent.pt \(given for t-clip\): no such file or folder"):
        resolve_weights("t-clip", tmp_path / "absent.pt")
    with pytest.raises(WeightsError, match=r"model t-clip is not installed: missing clip.pt; get it with "
                                           r"`ctfoundation weights download t-clip` \(gated: .*`ctfoundation "
                                           r"weights import t-clip FILE`"):
        resolve_weights("t-clip")


def test_remove(env: Path, hub: FakeHub) -> None:
    get("t-clip")
    assert remove_model("t-clip") >= len(CLIP)
    assert not model_dir("t-clip", env).exists()
    assert model_status(load_registry().get("t-clip")).state == MISSING
    assert remove_model("t-clip") == 0


# --- CLI ----------------------------------------------------------------------------------------------------


def _states(out: str) -> dict[str, str]:
    return {row["model"]: row["state"] for row in json.loads(out)}


def test_cli_list_status_download_path_verify_remove(env: Path, hub: FakeHub, run_cli) -> None:
    code, out, _ = run_cli("weights", "list")
    assert code == 0 and "t-clip" in out and "CC-BY-NC-SA-4.0" in out and "ct-clip-v2" in out
    code, out, _ = run_cli("weights", "list", "--json")
    assert _states(out)["t-clip"] == "missing"

    hub.behave("models/clip.pt", "cut")
    code, _, err = run_cli("weights", "download", "t-clip", "--yes", "--retries", "0")
    assert code == 2 and "resume" in err and "Creative Commons" in err
    assert _states(run_cli("weights", "list", "--json")[1])["t-clip"] == "partial"
    code, out, _ = run_cli("weights", "status", "t-clip")
    assert "partial" in out and "resumes on the next download" in out

    code, _, err = run_cli("weights", "download", "t-clip", "--retries", "0")  # licence already accepted
    assert code == 0 and "installed at" in err and "Creative Commons" not in err
    assert _states(run_cli("weights", "list", "--json")[1])["t-clip"] == "installed"
    code, out, _ = run_cli("weights", "path", "t-clip")
    assert code == 0 and Path(out.strip()).read_bytes() == CLIP
    code, out, _ = run_cli("weights", "status", "--json", "t-clip")
    entry = json.loads(out)["models"][0]
    assert entry["state"] == "installed" and entry["license_acknowledged"] and entry["files"] == ["clip.pt"]
    assert run_cli("weights", "verify")[0] == 0

    Path(out and entry["path"], "clip.pt").write_bytes(b"PK\x03\x04tampered")
    code, _, err = run_cli("weights", "verify", "t-clip")
    assert code == 1 and "BAD clip.pt" in err
    code, _, err = run_cli("weights", "remove", "t-clip")
    assert code == 0 and "removed" in err
    assert _states(run_cli("weights", "list", "--json")[1])["t-clip"] == "missing"
    code, _, err = run_cli("weights", "path", "t-clip")
    assert code == 2 and "not installed" in err


def test_cli_needs_licence_acceptance_without_a_terminal(env: Path, hub: FakeHub, run_cli,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", open(os.devnull))
    code, _, err = run_cli("weights", "download", "t-clip")
    assert code == 2 and "must be accepted once" in err and "--yes" in err
    assert hub.served["models/clip.pt"] == 0


def test_cli_asks_for_the_licence_once(env: Path, hub: FakeHub, run_cli, monkeypatch: pytest.MonkeyPatch) -> None:
    class Terminal:
        def isatty(self) -> bool:
            return True

    answers = iter(["no", "yes"])
    monkeypatch.setattr(sys, "stdin", Terminal())
    monkeypatch.setattr("builtins.input", lambda prompt: next(answers))
    code, _, err = run_cli("weights", "download", "t-clip")
    assert code == 2 and "not accepted" in err and hub.served["models/clip.pt"] == 0
    code, _, err = run_cli("weights", "download", "t-clip")
    assert code == 0 and "Creative Commons" in err
    code, _, err = run_cli("weights", "download", "t-pinned")  # same licence: no second question
    assert code == 0 and "Creative Commons" not in err
    assert "CC-BY-NC-SA-4.0" in json.loads((env / "licenses.json").read_text())


def test_cli_import_and_errors(env: Path, run_cli, tmp_path: Path) -> None:
    good = _write(tmp_path / "p.pt", PINNED)
    code, _, err = run_cli("weights", "import", "t-pinned", str(good), "--yes")
    assert code == 0 and "imported and verified" in err
    code, _, err = run_cli("weights", "import", "t-clip", str(_write(tmp_path / "x.pt", b"text")), "--yes")
    assert code == 2 and "not a PyTorch checkpoint" in err
    code, _, err = run_cli("weights", "download", "no-such-model", "--yes")
    assert code == 2 and "unknown model 'no-such-model'" in err
    code, _, err = run_cli("weights", "download", "t-manual", "--yes")
    assert code == 2 and "cannot be downloaded automatically" in err


def test_token_is_used_but_never_shown(env: Path, hub: FakeHub, run_cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", SECRET)
    outputs = [run_cli("weights", "download", "t-clip", "--yes")]
    auths = {h.get("Authorization") for _, p, h in hub.requests_seen if "/resolve/" in p}
    assert auths == {f"Bearer {SECRET}"}
    plain_auth = [h.get("Authorization") for _, p, h in hub.requests_seen if p.startswith("/plain/")]
    outputs.append(run_cli("weights", "download", "t-plain"))
    assert all(h.get("Authorization") is None for _, p, h in hub.requests_seen if p.startswith("/plain/"))
    assert plain_auth == []
    for mode in ("401", "403", "404", "corrupt"):
        hub.behave("models/pinned.pt", mode)
        outputs.append(run_cli("weights", "download", "t-pinned", "--yes", "--retries", "0"))
    outputs.append(run_cli("weights", "status"))
    outputs.append(run_cli("weights", "status", "--json"))
    monkeypatch.setenv("CTFOUNDATION_MIRROR", "http://127.0.0.1:9")
    outputs.append(run_cli("weights", "download", "t-llm", "--yes", "--retries", "0"))
    assert all(code in (0, 2) for code, _, _ in outputs)
    assert any("gated" in err for _, _, err in outputs)
    assert not any(SECRET in out or SECRET in err for _, out, err in outputs)


def test_token_from_settings_file(env: Path, hub: FakeHub, run_cli, monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO(SECRET + "\n"))
    code, out, err = run_cli("weights", "token")
    assert code == 0 and SECRET not in out + err
    settings = env / "settings.json"
    assert json.loads(settings.read_text())["hf_token"] == SECRET
    assert settings.stat().st_mode & 0o077 == 0
    code, out, _ = run_cli("weights", "status")
    assert "settings file" in out and SECRET not in out
    run_cli("weights", "download", "t-pinned", "--yes")
    assert f"Bearer {SECRET}" in {h.get("Authorization") for _, p, h in hub.requests_seen}
    assert run_cli("weights", "token", "--clear")[0] == 0
    assert "hf_token" not in json.loads(settings.read_text())


def test_json_writes_are_shareable_and_unwritable_places_are_named(tmp_path: Path) -> None:
    from CTFoundationLib.errors import CTFoundationError
    from CTFoundationLib.io.files import write_json_atomic

    write_json_atomic(tmp_path / "shared.json", {"a": 1})
    write_json_atomic(tmp_path / "secret.json", {"token": "x"}, private=True)
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "shared.json").stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "secret.json").stat().st_mode & 0o777 == 0o600
    (tmp_path / "file").write_text("")
    with pytest.raises(CTFoundationError, match=r"cannot write .*file/out.json"):
        write_json_atomic(tmp_path / "file" / "out.json", {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "secret.json", "shared.json"]
