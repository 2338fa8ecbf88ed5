"""The background worker (`python -m CTFoundationLib.host.worker`) as a real subprocess:
events, results, errors, cancel."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import pytest
from fake_hub import FakeHub
from small_models import bert_vocab, fullsize_layout, make_small_ctclip

from CTFoundationLib import cli
from CTFoundationLib.errors import WorkerError
from CTFoundationLib.host.jobs import DETECT_STEPS
from CTFoundationLib.host.process import ChildTraceback, WorkerProcess, format_event, parse_event, python_command

REPO = Path(__file__).resolve().parents[1]
RICORD_3MM = "ricord1a_419639-000082_chest_noncontrast/ct_3mm_iso.nii.gz"
LAUNCHER = "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))"  # like PythonSlicer: a child runs Python


def worker(*arguments: str, env: dict | None = None, launcher: bool = False) -> WorkerProcess:
    command = python_command() + list(arguments)
    if launcher:
        command = [sys.executable, "-c", LAUNCHER, *command]
    return WorkerProcess(command, cwd=REPO, env=env).start()


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    checkpoint, config, _ = make_small_ctclip(tmp_path_factory.mktemp("small"))
    return checkpoint, config


def model_options(small) -> list[str]:
    checkpoint, config = small
    return ["--weights", str(checkpoint), "--model-config", str(config), "--text-encoder", str(bert_vocab()),
            "--device", "cpu"]


def detect_request(folder: Path, ct: Path, out: Path, small=None) -> str:
    """The worker's detect request (what the Slicer module writes), as a JSON file in `folder`."""
    request = {"ct": str(ct), "out": str(out)}
    if small is not None:
        checkpoint, config = small
        request["ctclip"] = {"weights": str(checkpoint), "model_config": str(config),
                             "text_encoder": str(bert_vocab()), "device": "cpu"}
    path = folder / "request.json"
    path.write_text(json.dumps(request))
    return str(path)


def test_event_lines_round_trip_and_other_lines_are_logs() -> None:
    line = format_event("step", name="load model", index=3, count=8)
    assert parse_event(line) == {"type": "step", "name": "load model", "index": 3, "count": 8}
    assert parse_event("UserWarning: something") is None
    assert parse_event(line.replace("{", "[", 1)) is None


@pytest.mark.slow
def test_detect_writes_the_cli_json(ct_dir, small, tmp_path, monkeypatch) -> None:
    ct = ct_dir / RICORD_3MM
    monkeypatch.setenv("CTFOUNDATION_HOME", str(tmp_path / "home"))
    env = dict(os.environ)
    process = worker("detect", detect_request(tmp_path, ct, tmp_path / "worker.json", small), env=env)
    assert process.wait(timeout_s=600) == 0, "\n".join(process.log_tail)
    result = process.outcome()
    assert Path(result["path"]) == tmp_path / "worker.json"
    steps = [e for e in process.events if e["type"] == "step"]
    assert [e["index"] for e in steps] == sorted(e["index"] for e in steps)
    assert {"read CT", "check CT", "load model", "preprocess", "encode image", "score", "write result"} <= {
        e["name"] for e in steps}
    assert all(e["count"] == len(DETECT_STEPS) for e in steps)
    assert process.events[0]["type"] == "started" and process.events[-1]["type"] == "result"

    assert cli.main(["detect", str(ct), "--out", str(tmp_path / "cli.json"), *model_options(small)]) == 0
    from_worker = json.loads((tmp_path / "worker.json").read_text())
    from_cli = json.loads((tmp_path / "cli.json").read_text())
    assert from_worker["input"] == from_cli["input"]
    for ours, theirs in zip(from_worker["detection"]["findings"], from_cli["detection"]["findings"]):
        # written rounded to 1e-6: a last-digit difference is float noise between the processes
        assert ours["name"] == theirs["name"] and ours["probability"] == pytest.approx(theirs["probability"], abs=2e-6)
    drop = {"findings", "timings_s"}
    assert {k: v for k, v in from_worker["detection"].items() if k not in drop} == {
        k: v for k, v in from_cli["detection"].items() if k not in drop}


def test_bad_input_is_an_error_event_with_the_reason(tmp_path) -> None:
    process = worker("detect", detect_request(tmp_path, tmp_path / "missing.nii.gz", tmp_path / "r.json"))
    assert process.wait(timeout_s=300) == 2
    error = process.last("error")
    assert error["kind"] == "CTInputError" and "missing.nii.gz: no such file or folder" in error["message"]
    with pytest.raises(WorkerError, match="The CT cannot be used: .*missing.nii.gz") as caught:
        process.outcome()
    assert error["details"] == ""  # an expected error: its one line says it all, no traceback
    assert isinstance(caught.value.__cause__, ChildTraceback) and "Traceback" not in str(caught.value.__cause__)
    assert not (tmp_path / "r.json").exists()


def test_a_malformed_request_is_a_one_line_error(tmp_path) -> None:
    """A request the caller got wrong says what is wrong in one line, not with a KeyError's traceback."""
    request = tmp_path / "request.json"
    for content, message in (('{"out": "r.json"}', "'ct' must be a non-empty string"),
                             ('["ct.nii"]', "expected a JSON object, got list"),
                             ('{"ct": "a.nii", "out": "r.json", "ctclip": {"wieghts": "x.pt"}}',
                              r"unknown 'ctclip' options \['wieghts'\]")):
        request.write_text(content)
        process = worker("detect", str(request))
        assert process.wait(timeout_s=300) == 2
        error = process.last("error")
        assert error["kind"] == "WorkerError" and error["details"] == "" and "\n" not in error["message"]
        with pytest.raises(WorkerError, match=message):
            process.outcome()


def _gone(pid: int, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def test_cancel_ends_the_whole_process_tree(ct_dir, small, tmp_path) -> None:
    out = tmp_path / "r.json"
    process = worker("detect", detect_request(tmp_path, ct_dir / RICORD_3MM, out, small), launcher=True)
    deadline = time.monotonic() + 300
    while not any(e["type"] == "step" for e in process.events):
        assert time.monotonic() < deadline and not process.finished, "\n".join(process.log_tail)
        process.poll()
        time.sleep(0.05)
    python_pid = process.last("started")["pid"]
    assert python_pid != process.pid  # the launcher's child, as with PythonSlicer
    process.cancel()
    process.wait(timeout_s=30)
    assert _gone(process.pid) and _gone(python_pid)
    assert process.cancelled and not out.exists()
    with pytest.raises(WorkerError, match="cancelled"):
        process.outcome()


def test_devices_lists_auto_and_cpu() -> None:
    process = worker("devices")
    assert process.wait(timeout_s=300) == 0
    devices = process.last("devices")
    assert [d["id"] for d in devices["devices"]][:2] == ["auto", "cpu"]
    import torch

    assert devices["torch"] == torch.__version__
    assert len(devices["devices"]) == 2 + (torch.cuda.device_count() if torch.cuda.is_available() else 0)


# --- weights --------------------------------------------------------------------------------------------

CHECKPOINT = b"PK\x03\x04" + bytes(range(256)) * 12_000  # a torch-zip header, ~3 MB: several progress chunks


@pytest.fixture
def hub_env(tmp_path):
    """A fake Hub serving one gated checkpoint, and the environment that points the worker at it."""
    hub = FakeHub(tmp_path / "hub").start()
    hub.add("test/CT-RATE", "models/clip.pt", CHECKPOINT, repo_type="dataset")
    registry = {
        "schema_version": 1,
        "models": {"t-clip": {
            "title": "test clip", "family": "ct-clip", "license": "CC-BY-NC-SA-4.0", "gated": True,
            "page": "https://example.org/ct-rate", "depends_on": [], "resources": {"approx_ram_gb": 1},
            "files": [{"name": "clip.pt", "format": "torch", "source": {
                "type": "hf", "repo": "test/CT-RATE", "repo_type": "dataset", "revision": "main",
                "path": "models/clip.pt"}}]}},
    }
    (tmp_path / "registry.json").write_text(json.dumps(registry))
    env = {**os.environ, "CTFOUNDATION_REGISTRY": str(tmp_path / "registry.json"), "CTFOUNDATION_MIRROR": hub.url,
           "HF_TOKEN": "hf_test_token"}
    yield env, tmp_path / "home"
    hub.stop()


def test_download_reports_progress_and_places_the_file(hub_env) -> None:
    env, home = hub_env
    refused = worker("download", "t-clip", "--home", str(home), env=env)
    assert refused.wait(timeout_s=120) == 2 and "licence not yet acknowledged" in refused.last("error")["message"]

    process = worker("download", "t-clip", "--home", str(home), "--accept-licenses", env=env)
    assert process.wait(timeout_s=120) == 0, "\n".join(process.log_tail)
    assert process.last("file") == {"type": "file", "name": "clip.pt", "size": len(CHECKPOINT)}
    last_bytes = process.last("bytes")
    assert last_bytes["done"] == last_bytes["total"] == len(CHECKPOINT)
    placed = Path(process.outcome()["path"])
    assert placed == home / "models" / "t-clip" / "clip.pt"
    assert hashlib.sha256(placed.read_bytes()).hexdigest() == hashlib.sha256(CHECKPOINT).hexdigest()


def test_import_checks_and_copies_a_checkpoint(hub_env, tmp_path) -> None:
    env, home = hub_env
    source = fullsize_layout("ctclip_v2", tmp_path / "downloaded-elsewhere.pt")
    process = worker("import", "t-clip", str(source), "--home", str(home), "--accept-licenses", env=env)
    assert process.wait(timeout_s=120) == 0, "\n".join(process.log_tail)
    placed = Path(process.outcome()["path"])
    assert placed.read_bytes() == source.read_bytes() and placed.parent == home / "models" / "t-clip"
    assert placed.stat().st_ino != source.stat().st_ino  # copied by default: damage to the cache spares the source
    wrong = fullsize_layout("fvlm", tmp_path / "fvlm.pth")
    process = worker("import", "t-clip", str(wrong), "--home", str(home), "--accept-licenses", "--link", env=env)
    assert process.wait(timeout_s=120) == 2 and "looks like an fVLM checkpoint" in process.last("error")["message"]


def test_the_compute_processes_keep_freed_memory_for_reuse(monkeypatch, capsys):
    """The CLI and the Slicer worker (never Slicer) set the allocator up; off glibc the setting is skipped."""
    from CTFoundationLib.host import worker as worker_module
    from CTFoundationLib.host.allocator import reuse_freed_memory

    calls = []
    monkeypatch.setattr(cli, "reuse_freed_memory", lambda: calls.append("cli"))
    monkeypatch.setattr(worker_module, "reuse_freed_memory", lambda: calls.append("worker"))
    assert cli.main(["weights", "list"]) == 0
    assert worker_module.main(["devices"]) == 0
    assert calls == ["cli", "worker"]
    capsys.readouterr()
    monkeypatch.setattr(sys, "platform", "darwin")
    assert reuse_freed_memory() is False


def test_volume_info_names_the_source_or_is_a_one_line_error(tmp_path) -> None:
    """The file Slicer writes beside a temporary CT: its source and metadata replace the temporary file's."""
    import numpy as np

    from CTFoundationLib.errors import CTInputError
    from CTFoundationLib.host.jobs import apply_volume_info
    from CTFoundationLib.io.volume import CTVolume

    volume = CTVolume(np.zeros((2, 2, 2), np.float32), np.eye(4), source="/tmp/slicer-123.nii.gz")
    info = tmp_path / "info.json"
    info.write_text(json.dumps({"source": "Slicer node 'CT chest'", "metadata": {"node": "vtkMRMLScalarVolumeNode1"}}))
    apply_volume_info(volume, info)
    assert volume.source == "Slicer node 'CT chest'" and volume.metadata["node"] == "vtkMRMLScalarVolumeNode1"
    for content, message in (("{not json", "cannot be read as JSON"), ("[1]", "expected a JSON object, got list")):
        info.write_text(content)
        with pytest.raises(CTInputError, match=f"volume info {info}.*{message}"):
            apply_volume_info(volume, info)
