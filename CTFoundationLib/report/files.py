"""Output folder layout of a batch report and the atomic write used for every file in it."""

from __future__ import annotations

import json
import os
import re
import uuid
from pathlib import Path

from ..weights.registry import RESOURCES

RESULT_FILE = "result.json"  # written last: an "ok" result.json marks the case finished
REPORT_FILE = "report.html"
INDEX_FILE = "index.html"
SUMMARY_FILE = "summary.csv"
TEMPORARY_SUFFIX = ".tmp"
RESULT_SCHEMA = RESOURCES / "report_result.schema.json"  # JSON Schema of result.json


def case_folder_name(case_id: str) -> str:
    """A folder name for a case id: characters other than letters, digits, '.', '_', '-' become '_'."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", case_id).strip("._")
    return name or "case"


def write_text_atomic(path: Path, text: str) -> None:
    """Write UTF-8 text to a temporary file in the same folder, then rename it: readers never see half a file.

    The file gets the usual permissions (umask), so reports can be shared like any other file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}{TEMPORARY_SUFFIX}")
    try:
        with open(temporary, "x", encoding="utf-8", newline="") as handle:
            handle.write(text)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_json_file(path: Path, data: dict) -> None:
    """Atomic, readable JSON (2-space indent, keys in insertion order)."""
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def remove_leftovers(folder: Path) -> None:
    """Delete temporary files a killed run left in a case folder (only its own process writes there)."""
    for leftover in folder.glob(f"*{TEMPORARY_SUFFIX}"):
        leftover.unlink(missing_ok=True)
