"""Batch reports: per-case findings JSON and a self-contained HTML page, a summary across cases.

    run_batch(runtime, cases, out_dir, thresholds=None, sections=(), shard=None, force=False, progress=None)
        -> BatchSummary            (the engine the CLI `ctfoundation report` and headless Slicer call)
    key_images(volume, points=(), overlays=(), windows=(CHEST_WINDOW, LUNG_WINDOW), size_px=384) -> [KeyImage]
    write_summary(out_dir) -> (index.html, summary.csv)
    ReportSection / SectionOutput: optional result producers that add a section, points and overlays.
"""

from .batch import RESULT_FORMAT, BatchProgress, BatchSummary, CaseOutcome, Shard, is_finished, run_batch
from .files import INDEX_FILE, REPORT_FILE, RESULT_FILE, RESULT_SCHEMA, SUMMARY_FILE
from .keyimages import CHEST_WINDOW, LUNG_WINDOW, KeyImage, MarkedPoint, Overlay, Window, key_images
from .render import NOT_FOR_CLINICAL_USE
from .sections import ReportSection, SectionOutput
from .summary import write_summary

__all__ = [
    "CHEST_WINDOW", "INDEX_FILE", "LUNG_WINDOW", "NOT_FOR_CLINICAL_USE", "REPORT_FILE", "RESULT_FILE",
    "RESULT_FORMAT", "RESULT_SCHEMA", "SUMMARY_FILE", "BatchProgress", "BatchSummary", "CaseOutcome", "KeyImage",
    "MarkedPoint", "Overlay", "ReportSection", "SectionOutput", "Shard", "Window", "is_finished", "key_images",
    "run_batch", "write_summary",
]
