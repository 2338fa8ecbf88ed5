"""Output folder layout of a batch report and the atomic write used for every file in it."""

from __future__ import annotations

import re
from pathlib import Path

from CTFoundationLib.io.files import TEMPORARY_SUFFIX
from CTFoundationLib.resources import RESOURCES

RESULT_FILE = "result.json"  # written last: an "ok" result.json marks the case finished
REPORT_FILE = "report.html"
INDEX_FILE = "index.html"
SUMMARY_FILE = "summary.csv"
SKIPPED_INPUTS_FILE = "skipped_inputs.json"  # files of the input folders that are not cases, with the reason
RESULT_SCHEMA = RESOURCES / "report_result.schema.json"  # JSON Schema of result.json


def case_folder_name(case_id: str) -> str:
    """A folder name for a case id: characters other than letters, digits, '.', '_', '-' become '_'."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", case_id).strip("._")
    return name or "case"


def remove_leftovers(folder: Path) -> None:
    """Delete temporary files a killed run left in a case folder (only its own process writes there)."""
    for leftover in folder.glob(f"*{TEMPORARY_SUFFIX}"):
        leftover.unlink(missing_ok=True)
