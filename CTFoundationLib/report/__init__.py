"""Batch reports: per-case findings JSON and a self-contained HTML page, a summary across cases.

    pipeline.report_cases(cases, out_dir, ctclip={"model_id": ...}, anatomy=False, narrative=None, ...)
        -> BatchSummary            (by registry id: what the CLI, the worker and headless Slicer call)
    run_batch(runtime, cases, out_dir, thresholds=None, sections=(), shard=None, force=False, progress=None)
        -> BatchSummary            (the engine, with a loaded runtime and sections)
    key_images(volume, points=(), overlays=(), windows=(CHEST_WINDOW, LUNG_WINDOW), size_px=384) -> [KeyImage]
    write_summary(out_dir) -> (index.html, summary.csv)
    ReportSection / SectionOutput: optional result producers that add a section, points and overlays.
"""

from CTFoundationLib.report.batch import (
    RESULT_FORMAT,
    BatchProgress,
    BatchSummary,
    CaseOutcome,
    Shard,
    is_finished,
    run_batch,
)
from CTFoundationLib.report.files import INDEX_FILE, REPORT_FILE, RESULT_FILE, RESULT_SCHEMA, SUMMARY_FILE
from CTFoundationLib.report.keyimages import (
    CHEST_WINDOW,
    LUNG_WINDOW,
    KeyImage,
    MarkedPoint,
    Overlay,
    Window,
    key_images,
)
from CTFoundationLib.report.render import NOT_FOR_CLINICAL_USE
from CTFoundationLib.report.sections import ReportSection, SectionOutput
from CTFoundationLib.report.summary import write_summary

__all__ = [
    "CHEST_WINDOW", "INDEX_FILE", "LUNG_WINDOW", "NOT_FOR_CLINICAL_USE", "REPORT_FILE", "RESULT_FILE",
    "RESULT_FORMAT", "RESULT_SCHEMA", "SUMMARY_FILE", "BatchProgress", "BatchSummary", "CaseOutcome", "KeyImage",
    "MarkedPoint", "Overlay", "ReportSection", "SectionOutput", "Shard", "Window", "is_finished", "key_images",
    "run_batch", "write_summary",
]
