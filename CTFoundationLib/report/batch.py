"""Batch reports: many CTs in, per case `result.json` + a self-contained `report.html`, and a summary.

Output folder (see files.py): DIR/<case>/result.json, DIR/<case>/report.html, DIR/index.html, DIR/summary.csv.
- Resumable: a case is skipped when its result.json says "ok" with the same run key (checkpoint, dtype,
  thresholds, sections, source path and file fingerprint). report.html is written first and result.json
  last, each atomically, so a killed run never leaves a case that looks finished. Failed cases are retried.
- One bad case does not stop the batch: its error is written to its result.json and the summary.
- `Shard(i, n)` takes every n-th case starting at the i-th, so n uncoordinated processes split a list.
- Bounded memory: cases are processed one at a time with the one loaded model (`read_workers` read a few next
  cases ahead in worker processes, for a device faster than reading).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from CTFoundationLib import __version__
from CTFoundationLib.errors import CTFoundationError, CTInputError, OutputError, WeightsError
from CTFoundationLib.inference.common import StepTimer
from CTFoundationLib.inference.ctclip import CTCLIPRuntime
from CTFoundationLib.io.cases import Case, SkippedInput
from CTFoundationLib.io.files import cannot_write, require_writable_folder, write_json_atomic, write_text_atomic
from CTFoundationLib.io.read_ahead import CaseReader, read_case
from CTFoundationLib.io.sanity import summarize
from CTFoundationLib.io.volume import CTVolume
from CTFoundationLib.report.dicom import DicomExport
from CTFoundationLib.report.files import (
    REPORT_FILE,
    RESULT_FILE,
    SKIPPED_INPUTS_FILE,
    case_folder_name,
    remove_leftovers,
)
from CTFoundationLib.report.keyimages import key_images
from CTFoundationLib.report.render import render_case
from CTFoundationLib.report.sections import ReportSection, SectionOutput
from CTFoundationLib.report.summary import write_summary
from CTFoundationLib.retrieval import source_fingerprint
from CTFoundationLib.weights.cache import now_iso
from CTFoundationLib.weights.registry import load_registry

RESULT_FORMAT = "ctfoundation-report-result/1"


@dataclass(frozen=True)
class Shard:
    """The `index`-th (1-based) of `count` interleaved parts of a case list."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        """'2/4' -> Shard(2, 4)."""
        try:
            index, count = (int(part) for part in text.split("/"))
        except ValueError:
            raise CTFoundationError(f"shard '{text}': expected I/N such as 1/4 (the I-th of N parts)") from None
        if not 1 <= index <= count:
            raise CTFoundationError(f"shard '{text}': I must run from 1 to N, e.g. 1/{max(count, 1)}")
        return cls(index, count)

    def select(self, cases: Sequence[Case]) -> list[Case]:
        return list(cases[self.index - 1 :: self.count])

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


@dataclass(frozen=True)
class BatchProgress:
    """Progress of a batch: `done` of `total` cases to process are finished; `step` runs on `case_id`."""

    case_id: str
    step: str
    done: int
    total: int


@dataclass(frozen=True)
class CaseOutcome:
    case_id: str
    status: str  # "ok", "failed" or "skipped" (finished by an earlier run)
    folder: Path
    seconds: float = 0.0
    error: str = ""
    notes: tuple[str, ...] = ()  # lines for the user about a finished case (e.g. why no DICOM output was written)


@dataclass
class BatchSummary:
    out_dir: Path
    outcomes: list[CaseOutcome] = field(default_factory=list)
    index_html: Path | None = None
    summary_csv: Path | None = None

    def with_status(self, status: str) -> list[CaseOutcome]:
        return [outcome for outcome in self.outcomes if outcome.status == status]


def run_batch(
    runtime: CTCLIPRuntime,
    cases: Sequence[Case],
    out_dir: Path,
    thresholds: Mapping[str, float] | None = None,
    sections: Sequence[ReportSection] = (),
    shard: Shard | None = None,
    force: bool = False,
    progress: Callable[[BatchProgress], None] | None = None,
    skipped_inputs: Sequence[SkippedInput] = (),
    dicom: DicomExport | None = None,
    read_workers: int = 0,
) -> BatchSummary:
    """Report every case of `cases` (or of its `shard`) into `out_dir`, then rebuild the summary.

    runtime: an already loaded model, used for all cases. force: redo cases finished before.
    progress: called at each step of each case that is processed (skipped cases are not reported).
    skipped_inputs: files of the input folders that are not cases, listed in the summary with their reason.
    dicom: also write a DICOM SEG and SR per DICOM case (`report.dicom`).
    read_workers: read and decode that many next cases ahead in worker processes (`io.read_ahead`; 0: none).
    Cases still to do are listed as pending first. An output that cannot be written (a full disk, permissions)
    stops the batch with one OutputError; finished cases are kept and a rerun does the rest.
    """
    out_dir = Path(out_dir)
    require_writable_folder(out_dir)
    folders = _case_folders(out_dir, cases)
    selected = shard.select(cases) if shard else list(cases)
    keys = {case.case_id: run_key(runtime, case, thresholds, sections, dicom) for case in selected}
    summary = BatchSummary(out_dir)
    todo = []
    for case in selected:
        if not force and is_finished(folders[case.case_id], keys[case.case_id]):
            summary.outcomes.append(CaseOutcome(case.case_id, "skipped", folders[case.case_id]))
        else:
            todo.append(case)
    notify = progress or (lambda event: None)
    write_skipped_inputs(out_dir, skipped_inputs)
    for case in todo:
        mark_pending(folders[case.case_id], case, keys[case.case_id])
    try:
        with CaseReader(todo, read_workers) as reader:
            for position, case in enumerate(todo):

                def step(name: str, case_id: str = case.case_id, finished: int = position) -> None:
                    notify(BatchProgress(case_id, name, finished, len(todo)))

                outcome = report_one(runtime, case, folders[case.case_id], keys[case.case_id], thresholds, sections,
                                     step, dicom, reader.read)
                summary.outcomes.append(outcome)
                notify(BatchProgress(case.case_id, outcome.status, position + 1, len(todo)))
    except BaseException as error:
        with contextlib.suppress(OutputError):  # the summary of what was done, where it can still be written
            write_summary(out_dir)
        if isinstance(error, OutputError):
            done = len(summary.outcomes) - len(summary.with_status("skipped"))
            raise OutputError(f"{error}. The batch stopped after {done} of {len(todo)} cases (kept; the others are "
                              "listed as pending): fix that, then run the same command again") from None
        raise
    summary.index_html, summary.summary_csv = write_summary(out_dir)
    return summary


def mark_pending(folder: Path, case: Case, key: str) -> None:
    """A result.json saying the case is still to do, unless the folder already holds a result of an earlier run."""
    if not (folder / RESULT_FILE).exists():
        make_folder(folder)
        write_json_atomic(folder / RESULT_FILE, {**_base_result(case, key), "status": "pending"}, sort_keys=False)


def write_skipped_inputs(out_dir: Path, skipped: Sequence[SkippedInput]) -> None:
    """The input files that are not cases, for the summary (a stale list from an earlier run is removed)."""
    path = out_dir / SKIPPED_INPUTS_FILE
    if skipped:
        write_json_atomic(path, [{"path": str(s.path), "reason": s.reason} for s in skipped], sort_keys=False)
    else:
        path.unlink(missing_ok=True)


def make_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise cannot_write(folder, error) from None


def report_one(
    runtime: CTCLIPRuntime,
    case: Case,
    folder: Path,
    key: str,
    thresholds: Mapping[str, float] | None,
    sections: Sequence[ReportSection],
    step: Callable[[str], None],
    dicom: DicomExport | None = None,
    read: Callable[[Case], CTVolume] = read_case,
) -> CaseOutcome:
    """Read, check, detect, run the sections, render and write one case; any error becomes a failed result, except
    an output that cannot be written (OutputError), which stops the batch."""
    make_folder(folder)
    remove_leftovers(folder)
    clock = StepTimer(step)
    result = _base_result(case, key)
    try:
        _fill_result(result, runtime, case, folder, thresholds, sections, clock, dicom, read)
    except OutputError:
        raise
    except Exception as error:  # one bad case must not stop the batch; KeyboardInterrupt still does
        (folder / REPORT_FILE).unlink(missing_ok=True)
        result.pop("report", None)
        result.update(status="failed", error=_error_record(error, clock.current))
    result["timings_s"] = dict(clock.seconds, total=round(time.perf_counter() - clock.started, 3))
    write_json_atomic(folder / RESULT_FILE, result, sort_keys=False)
    message = f"{result['error']['stage']}: {result['error']['message']}" if result["status"] == "failed" else ""
    notes = (result["dicom"]["reason"],) if not result.get("dicom", {"written": True})["written"] else ()
    return CaseOutcome(case.case_id, result["status"], folder, result["timings_s"]["total"], message, notes)


def _fill_result(
    result: dict,
    runtime: CTCLIPRuntime,
    case: Case,
    folder: Path,
    thresholds: Mapping[str, float] | None,
    sections: Sequence[ReportSection],
    clock: StepTimer,
    dicom: DicomExport | None = None,
    read: Callable[[Case], CTVolume] = read_case,
) -> None:
    """The pipeline of one case; fills `result` step by step and writes report.html."""
    with clock("read"):
        volume = read(case)
    with clock("check"):
        summary = summarize(volume)
    result["warnings"] = summary.pop("warnings")
    summary.pop("source")
    result["input"] = summary
    with clock("detect"):
        detection = runtime.detect(volume, thresholds)
    result["detection"] = detection.to_dict()
    result["models"] = [_model_record("detection", runtime)]
    outputs: dict[str, SectionOutput] = {}
    for section in sections:
        with clock(f"section:{section.key}"):
            outputs[section.key] = section.compute(volume, detection)
            if outputs[section.key].files is not None:
                outputs[section.key].data.update(outputs[section.key].files(folder))
    result["sections"] = {key: output.data for key, output in outputs.items()}
    if dicom is not None:
        with clock("dicom"):
            anatomy = next((output.anatomy for output in outputs.values() if output.anatomy is not None), None)
            result["dicom"] = dicom.write(folder.name, volume, detection, anatomy)
    with clock("key_images"):
        points = [point for output in outputs.values() for point in output.points]
        overlays = [overlay for output in outputs.values() for overlay in output.overlays]
        images = key_images(volume, points=points, overlays=overlays)
    del volume
    result["key_images"] = [image.describe() for image in images]
    result.update(status="ok", report=REPORT_FILE)
    with clock("write"):
        fragments = [(s.key, s.title, outputs[s.key].html) for s in sections]
        result["timings_s"] = dict(clock.seconds)
        write_text_atomic(folder / REPORT_FILE, render_case(result, images, fragments))


def _base_result(case: Case, key: str) -> dict:
    return {
        "format": RESULT_FORMAT,
        "case_id": case.case_id,
        "status": "failed",
        "source": str(case.path),
        "created": now_iso(),
        "software": f"ctfoundation {__version__}",
        "run_key": key,
    }


def _model_record(role: str, runtime: CTCLIPRuntime) -> dict:
    """Which model and checkpoint produced a part of the result, and under which licence."""
    return {
        "role": role,
        "id": runtime.model_id,
        "checkpoint_file": runtime.checkpoint.name,
        "checkpoint_sha256": runtime.checkpoint_sha256,
        "licence": dict(licence) if (licence := _licence_record(runtime.model_id)) else None,
    }


@functools.lru_cache(maxsize=8)
def _licence_record(model_id: str) -> dict | None:
    """The registry's licence of a model; None for a model the registry does not know."""
    try:
        licence = load_registry().get(model_id).license
    except WeightsError:
        return None
    return {"id": licence.id, "name": licence.name, "url": licence.url, "summary": licence.summary}


def _error_record(error: Exception, stage: str) -> dict:
    """What failed and where; a traceback only for errors the library did not anticipate."""
    record = {"stage": stage, "type": type(error).__name__, "message": str(error) or repr(error)}
    if not isinstance(error, CTFoundationError):
        record["traceback"] = "".join(traceback.format_exception(error))
    return record


def run_key(
    runtime: CTCLIPRuntime, case: Case, thresholds: Mapping[str, float] | None, sections: Sequence[ReportSection],
    dicom: DicomExport | None = None,
) -> str:
    """sha256 of everything a finished case depends on; a different key means the case must be redone."""
    try:
        fingerprint = source_fingerprint(case.path)
    except CTFoundationError:
        fingerprint = "missing"
    settings = {
        "model": runtime.model_id,
        "checkpoint_sha256": runtime.checkpoint_sha256,
        "dtype": runtime.dtype,
        "thresholds": dict(sorted((thresholds or {}).items())),
        "sections": [[section.key, section.settings] for section in sections],
        "source": str(Path(case.path).resolve()),
        "fingerprint": fingerprint,
    }
    if dicom is not None:  # only then: a batch without DICOM output keeps the keys of earlier runs
        settings["dicom"] = dicom.settings
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def is_finished(folder: Path, key: str) -> bool:
    """True when the case folder holds an "ok" result.json with this run key and its report.html."""
    try:
        result = json.loads((folder / RESULT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (
        isinstance(result, dict)
        and result.get("status") == "ok"
        and result.get("run_key") == key
        and (folder / REPORT_FILE).is_file()
    )


def _case_folders(out_dir: Path, cases: Sequence[Case]) -> dict[str, Path]:
    """Case id -> its output folder; ids that would share a folder are an input error."""
    folders: dict[str, Path] = {}
    owners: dict[str, str] = {}
    for case in cases:
        name = case_folder_name(case.case_id)
        if name in owners and owners[name] != case.case_id:
            raise CTInputError(
                f"cases '{owners[name]}' and '{case.case_id}' would share the output folder {out_dir / name}; "
                "give them distinct case_id values in a CSV list"
            )
        owners[name] = case.case_id
        folders[case.case_id] = out_dir / name
    return folders
