"""Batch reports on the real CTs with a small CT-CLIP checkpoint: shards, schema, HTML, failures, resume."""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import jsonschema
import nibabel as nib
import numpy as np
import pytest
from conftest import REPO_ROOT
from PIL import Image
from small_models import bert_vocab, make_small_ctclip

from CTFoundationLib.cli import main
from CTFoundationLib.errors import CTFoundationError
from CTFoundationLib.inference.ctclip import CTCLIPRuntime
from CTFoundationLib.io.cases import Case, discover_cases
from CTFoundationLib.models.ctchat.modeling import GenerationSettings
from CTFoundationLib.report import (
    RESULT_SCHEMA,
    MarkedPoint,
    Overlay,
    ReportSection,
    SectionOutput,
    Shard,
    run_batch,
)
from CTFoundationLib.report.narrative import narrative_section
from CTFoundationLib.vocab import CT_RATE_ABNORMALITIES

RICORD = "ricord1a_419639-000082_chest_noncontrast"
SOURCES = {  # case id -> (path below the shared ct folder, shape_ijk the manifest gives)
    f"{RICORD}_dicom": (f"{RICORD}/dicom", [512, 512, 255]),
    "ct_3mm_iso": (f"{RICORD}/ct_3mm_iso.nii.gz", [120, 120, 106]),
    "totalseg_chest_crop_pulmonary_ct": ("totalseg_chest_crop_pulmonary/ct.nii.gz", [122, 102, 112]),
    "totalseg_chest_crop_aorta_ct": ("totalseg_chest_crop_aorta/ct.nii.gz", [120, 126, 164]),
    "totalseg_abdomen_control_ct": ("totalseg_abdomen_control/ct.nii.gz", [122, 101, 112]),
}
CORRUPT = "corrupt"


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return make_small_ctclip(tmp_path_factory.mktemp("small"))


@pytest.fixture(scope="module")
def runtime(small, tmp_path_factory):
    checkpoint, _, config = small
    return CTCLIPRuntime(checkpoint, bert_vocab(), config=config, device="cpu", cache_dir=tmp_path_factory.mktemp("c"))


def truncated_copy(source: Path, target: Path) -> Path:
    """A real CT cut short, as an interrupted copy leaves it."""
    target.write_bytes(source.read_bytes()[: source.stat().st_size // 3])
    return target


@pytest.fixture(scope="module")
def cases(ct_dir, tmp_path_factory) -> list[Case]:
    corrupt = truncated_copy(ct_dir / SOURCES["ct_3mm_iso"][0], tmp_path_factory.mktemp("bad") / f"{CORRUPT}.nii.gz")
    found = discover_cases([ct_dir / path for path, _ in SOURCES.values()] + [corrupt])
    assert [case.case_id for case in found.cases] == [*SOURCES, CORRUPT] and found.skipped == []
    return found.cases


@pytest.fixture(scope="module")
def batch(runtime, cases, tmp_path_factory):
    """The set reported by two shards into one folder, as two cluster jobs would."""
    out = tmp_path_factory.mktemp("report")
    events = []
    first = run_batch(runtime, cases, out, shard=Shard(1, 2), progress=events.append)
    second = run_batch(runtime, cases, out, shard=Shard(2, 2))
    return out, first, second, events


def result(out: Path, case_id: str) -> dict:
    return json.loads((out / case_id / "result.json").read_text())


class PageParser(HTMLParser):
    """Images, links, table rows and text of a report page."""

    def __init__(self) -> None:
        super().__init__()
        self.images, self.links, self.rows, self.text, self.tags = [], [], [], [], set()
        self._row = None

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs)
        elif tag == "a":
            self.links.append(attrs["href"])
        elif tag == "tr":
            self._row = []

    def handle_endtag(self, tag):
        if tag == "tr" and self._row is not None:
            self.rows.append(self._row)
            self._row = None

    def handle_data(self, data):
        self.text.append(data)
        if self._row is not None and data.strip():
            self._row.append(data.strip())


def parse_page(path: Path) -> PageParser:
    parser = PageParser()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


def test_two_shards_cover_the_set_exactly_once(batch, cases):
    out, first, second, events = batch
    done_first = {o.case_id for o in first.outcomes if o.status != "skipped"}
    done_second = {o.case_id for o in second.outcomes if o.status != "skipped"}
    assert done_first.isdisjoint(done_second)
    assert done_first | done_second == {case.case_id for case in cases}
    assert abs(len(done_first) - len(done_second)) <= 1
    assert sorted(p.parent.name for p in out.glob("*/result.json")) == sorted(c.case_id for c in cases)
    assert {e.case_id for e in events} == done_first and events[-1].done == events[-1].total == len(done_first)
    assert {"read", "check", "detect", "key_images", "write"} <= {e.step for e in events}


def test_results_match_the_schema_and_their_sources(batch, cases, runtime):
    out = batch[0]
    validator = jsonschema.Draft202012Validator(
        json.loads(RESULT_SCHEMA.read_text()), format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )
    probabilities = set()
    for case in cases:
        record = result(out, case.case_id)
        validator.validate(record)
        if case.case_id == CORRUPT:
            continue
        assert record["status"] == "ok" and record["source"] == str(case.path)
        assert record["input"]["shape_ijk"] == SOURCES[case.case_id][1]
        assert [f["name"] for f in record["detection"]["findings"]] == list(CT_RATE_ABNORMALITIES)
        assert record["detection"]["checkpoint_sha256"] == runtime.checkpoint_sha256
        assert record["models"][0]["licence"]["id"] == "CC-BY-NC-SA-4.0"
        assert len(record["key_images"]) == 6
        assert record["timings_s"]["total"] >= record["timings_s"]["detect"] > 0
        probabilities.add(tuple(f["probability"] for f in record["detection"]["findings"]))
    assert len(probabilities) == len(SOURCES)  # every case holds its own scores


def test_a_bad_case_is_reported_and_the_others_succeed(batch):
    out = batch[0]
    record = result(out, CORRUPT)
    assert record["status"] == "failed" and not (out / CORRUPT / "report.html").exists()
    assert record["error"]["stage"] == "read" and record["error"]["type"] == "CTInputError"
    assert "corrupt.nii.gz" in record["error"]["message"] and "truncated or corrupt" in record["error"]["message"]
    assert "traceback" not in record["error"]  # an anticipated error needs none
    assert all(result(out, case_id)["status"] == "ok" for case_id in SOURCES)
    index = parse_page(out / "index.html")
    failed_row = next(row for row in index.rows if row and row[0] == CORRUPT)
    assert failed_row[1] == "failed" and "truncated or corrupt" in failed_row[2]


def test_the_abdomen_control_carries_its_warning(batch):
    out = batch[0]
    codes = {case_id: [w["code"] for w in result(out, case_id)["warnings"]] for case_id in SOURCES}
    assert "NOT_CHEST" in codes["totalseg_abdomen_control_ct"]
    assert "NOT_CHEST" not in codes[f"{RICORD}_dicom"] and "NOT_CHEST" not in codes["ct_3mm_iso"]
    page = parse_page(out / "totalseg_abdomen_control_ct" / "report.html")
    assert "NOT_CHEST" in page.text and any("does not look like a chest CT" in t for t in page.text)
    rows = {row["case_id"]: row for row in csv.DictReader(io.StringIO((out / "summary.csv").read_text()))}
    assert rows["totalseg_abdomen_control_ct"]["warnings"] == "NOT_CHEST"


def test_case_pages_are_self_contained_and_readable(batch):
    out = batch[0]
    for case_id in SOURCES:
        record, page_path = result(out, case_id), out / case_id / "report.html"
        html = page_path.read_text(encoding="utf-8")
        page = parse_page(page_path)
        assert not page.tags & {"script", "link", "iframe"} and all(link.startswith("https://") for link in page.links)
        assert len(page.images) == 6
        for image in page.images:
            assert image["src"].startswith("data:image/png;base64,")
            grey = np.asarray(Image.open(io.BytesIO(base64.b64decode(image["src"].split(",", 1)[1]))).convert("L"))
            assert grey.shape == (int(image["height"]), int(image["width"])) and grey.std() > 15
        table = [row for row in page.rows if row and row[0] in CT_RATE_ABNORMALITIES]
        shown = [float(row[1]) for row in table]
        assert len(table) == 18 and shown == sorted(shown, reverse=True)
        expected = sorted(record["detection"]["findings"], key=lambda f: -f["probability"])
        assert shown == pytest.approx([f["probability"] for f in expected], abs=5e-4)
        assert f"Case {case_id}" in page.text
        assert "not for clinical use" in html and record["detection"]["checkpoint_sha256"] in html
        assert record["source"] not in html  # the page names the case, not the patient's folders


def test_index_and_summary_cover_every_case(batch, cases):
    out = batch[0]
    index = parse_page(out / "index.html")
    assert sorted(index.links) == sorted(f"{case_id}/report.html" for case_id in SOURCES)
    assert all((out / link).is_file() for link in index.links)
    rows = list(csv.DictReader(io.StringIO((out / "summary.csv").read_text())))
    assert sorted(row["case_id"] for row in rows) == sorted(c.case_id for c in cases)
    for row in rows:
        if row["status"] == "ok":
            findings = result(out, row["case_id"])["detection"]["findings"]
            assert {name: float(row[name]) for name in CT_RATE_ABNORMALITIES} == {
                f["name"]: f["probability"] for f in findings
            }
        else:
            assert row["case_id"] == CORRUPT and row[CT_RATE_ABNORMALITIES[0]] == ""


def test_finished_cases_are_skipped_until_the_settings_change(runtime, ct_dir, tmp_path):
    case = Case("one", ct_dir / SOURCES["ct_3mm_iso"][0])
    first = run_batch(runtime, [case], tmp_path)
    stamp = (tmp_path / "one" / "result.json").stat().st_mtime_ns
    again = run_batch(runtime, [case], tmp_path)
    assert [o.status for o in first.outcomes] == ["ok"] and [o.status for o in again.outcomes] == ["skipped"]
    assert (tmp_path / "one" / "result.json").stat().st_mtime_ns == stamp
    thresholds = {"Emphysema": 0.0, "Lung nodule": 1.0}
    leftover = tmp_path / "one" / ".report.html.4242.0badf00d.tmp"  # as a killed write leaves it
    leftover.write_text("<html>half")
    redone = run_batch(runtime, [case], tmp_path, thresholds=thresholds)
    assert [o.status for o in redone.outcomes] == ["ok"] and not leftover.exists()
    flags = {f["name"]: f["positive"] for f in result(tmp_path, "one")["detection"]["findings"]}
    assert flags["Emphysema"] is True and flags["Lung nodule"] is False and flags["Atelectasis"] is None
    shown = {row[0]: row[-1] for row in parse_page(tmp_path / "one" / "report.html").rows if row}
    assert (shown["Emphysema"], shown["Lung nodule"], shown["Atelectasis"]) == ("yes", "no", "—")


def test_sections_add_data_html_and_key_images(small, ct_dir, tmp_path):
    """A producer of localised findings plugs in as a section: its point and mask reach the key images.
    The model here is a site's own checkpoint, unknown to the registry."""
    checkpoint, _, config = small
    runtime = CTCLIPRuntime(checkpoint, bert_vocab(), "site-finetune", config, "cpu", cache_dir=tmp_path / "c")
    folder = ct_dir / "totalseg_chest_crop_aorta"
    mask = np.asarray(nib.load(folder / "aorta_mask.nii.gz").dataobj) > 0

    def aorta_section(volume, detection):
        voxel = np.argwhere(mask)[int(mask.sum()) // 2]
        ras = tuple(float(v) for v in (volume.affine_ras @ np.array([*voxel, 1.0]))[:3])
        volume_ml = float(mask.sum() * np.prod(volume.spacing_ijk_mm) / 1000)
        return SectionOutput(
            data={"volume_ml": volume_ml, "point_ras_mm": ras},
            html=f"<p class='aorta'>Aorta volume {volume_ml:.1f} ml</p>",
            points=[MarkedPoint("aorta point", ras)],
            overlays=[Overlay("aorta", mask)],
        )

    section = ReportSection("aorta", "Aorta (test producer)", aorta_section)
    summary = run_batch(runtime, [Case("aorta", folder / "ct.nii.gz")], tmp_path, sections=[section])
    assert [o.status for o in summary.outcomes] == ["ok"]
    record = result(tmp_path, "aorta")
    assert record["sections"]["aorta"]["volume_ml"] == pytest.approx(72810 * 1.5**3 / 1000, rel=1e-3)
    assert [k["through"] for k in record["key_images"]].count("aorta point") == 6
    assert record["models"][0]["id"] == "site-finetune" and record["models"][0]["licence"] is None
    page = parse_page(tmp_path / "aorta" / "report.html")
    assert "Aorta (test producer)" in page.text and any(t.startswith("Aorta volume") for t in page.text)
    assert any("not in the model registry" in t for t in page.text)
    assert len(page.images) == 12
    assert run_batch(runtime, [Case("aorta", folder / "ct.nii.gz")], tmp_path).outcomes[0].status == "ok"  # redone


def test_shard_text_is_checked():
    assert Shard.parse("2/3") == Shard(2, 3) and Shard(2, 3).select(list("abcdefg")) == ["b", "e"]
    for text in ("0/2", "3/2", "1", "a/b"):
        with pytest.raises(CTFoundationError, match="shard"):
            Shard.parse(text)
    with pytest.raises(SystemExit):
        main(["report", "x", "--out", "y", "--shard", "0/2"])


def test_reading_ahead_in_worker_processes_gives_the_same_reports(runtime, cases, batch, tmp_path):
    """read_workers: the next CTs are read in worker processes; every result (the corrupt case's one-line error
    included) is the one the in-turn run wrote, in the same order."""
    in_turn, _, _, _ = batch
    summary = run_batch(runtime, cases, tmp_path, read_workers=2)
    assert [o.case_id for o in summary.outcomes] == [case.case_id for case in cases]
    for case in cases:
        ahead, reference = (json.loads((folder / case.case_id / "result.json").read_text())
                            for folder in (tmp_path, in_turn))
        assert ahead["status"] == reference["status"], case.case_id
        assert ahead.get("detection", {}).get("findings") == reference.get("detection", {}).get("findings")
        assert ahead.get("error", {}).get("message") == reference.get("error", {}).get("message")
    assert summary.with_status("failed")[0].case_id == CORRUPT and "Traceback" not in summary.outcomes[-1].error


def small_model_arguments(small) -> list[str]:
    checkpoint, config_path, _ = small
    return ["--weights", str(checkpoint), "--model-config", str(config_path), "--text-encoder", str(bert_vocab())]


def test_failed_cases_exit_1_whatever_their_count(small, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CTFOUNDATION_HOME", str(tmp_path / "home"))
    listing = tmp_path / "cases.csv"
    listing.write_text("path\n" + "".join(f"missing_{n}.nii.gz\n" for n in range(101)))
    code = main(["report", str(listing), "--out", str(tmp_path / "out"), *small_model_arguments(small),
                 "--device", "cpu"])
    assert code == 1  # 2 and above are fatal errors (docs/cli.md), whatever the count of failed cases
    printed = capsys.readouterr()
    assert "101 cases: 0 reported, 101 failed" in printed.out and "no such file" in printed.err
    assert len(list((tmp_path / "out").glob("*/result.json"))) == 101


def finished_cases(out: Path) -> list[str]:
    """Case ids whose result.json says ok (the others are pending, failed, or being written)."""
    finished = []
    for path in out.glob("*/result.json"):
        try:
            finished += [path.parent.name] if json.loads(path.read_text())["status"] == "ok" else []
        except (OSError, ValueError):
            continue
    return finished


@pytest.mark.slow
def test_a_killed_run_resumes_without_redoing_finished_cases(small, ct_dir, tmp_path):
    corrupt = truncated_copy(ct_dir / SOURCES["ct_3mm_iso"][0], tmp_path / "corrupt.nii.gz")
    inputs = [str(ct_dir / SOURCES[c][0]) for c in ("ct_3mm_iso", "totalseg_abdomen_control_ct")] + [str(corrupt)]
    out = tmp_path / "out"
    command = [sys.executable, "-m", "CTFoundationLib", "report", *inputs, "--out", str(out), "--device", "cpu"]
    command += small_model_arguments(small)
    env = dict(os.environ, CTFOUNDATION_HOME=str(tmp_path / "home"), PYTHONPATH=str(REPO_ROOT))
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not finished_cases(out) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    records = {p.parent.name: json.loads(p.read_text()) for p in out.glob("*/result.json")}  # each one complete
    done = {case_id: (out / case_id / "result.json").stat().st_mtime_ns
            for case_id, record in records.items() if record["status"] == "ok"}
    assert done and len(done) < 2, f"killed after {sorted(done)}: " + process.stderr.read().decode()[-2000:]
    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 1, rerun.stderr  # the corrupt case, nothing else
    statuses = {p.parent.name: json.loads(p.read_text())["status"] for p in out.glob("*/result.json")}
    assert statuses == {"ct_3mm_iso": "ok", "totalseg_abdomen_control_ct": "ok", "corrupt": "failed"}
    for case_id, stamp in done.items():
        assert (out / case_id / "result.json").stat().st_mtime_ns == stamp, f"{case_id} was redone"
    assert f"3 cases: {2 - len(done)} reported, 1 failed, {len(done)} already done" in rerun.stdout
    assert (out / "index.html").is_file() and not list(out.glob("*/.*.tmp"))


def test_resume_key_follows_section_settings(ct_dir):
    """A section's settings (e.g. another CT-CHAT model or decoding options) redo finished cases; same ones don't."""
    from types import SimpleNamespace

    from CTFoundationLib.report.batch import run_key

    runtime = SimpleNamespace(model_id="ct-clip-v2", checkpoint_sha256="ab" * 32, dtype="fp32")
    case = Case("ricord", ct_dir / "ricord1a_419639-000082_chest_noncontrast" / "ct_3mm_iso.nii.gz")

    def key(**settings) -> str:
        section = ReportSection("narrative", "Generated report", lambda volume, detection: None, settings)
        return run_key(runtime, case, None, [section])

    assert key(model="a", generation={"temperature": 0.0}) == key(model="a", generation={"temperature": 0.0})
    assert key(model="a", generation={"temperature": 0.0}) != key(model="b", generation={"temperature": 0.0})
    assert key(model="a", generation={"temperature": 0.0}) != key(model="a", generation={"temperature": 0.7})
    assert key() != run_key(runtime, case, None, [])

    def narrative_key(**chat_options) -> str:  # the section the pipeline builds, with the chat model's options
        section = narrative_section(None, "ct-chat-llama3.1-8b", GenerationSettings(), chat_options)
        return run_key(runtime, case, None, [section])

    assert narrative_key(llm=Path("a"), precision="bf16") == narrative_key(llm=Path("a"), precision="bf16")
    for other in ({"llm": Path("b"), "precision": "bf16"}, {"llm": Path("a"), "precision": "4bit"},
                  {"llm": Path("a"), "precision": "bf16", "lora": Path("l")}):
        assert narrative_key(llm=Path("a"), precision="bf16") != narrative_key(**other)
