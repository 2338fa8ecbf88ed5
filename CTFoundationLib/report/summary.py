"""The cross-case summary of a report folder: `index.html` and `summary.csv`, rebuilt from every result.json.

Built from what is on disk, so N shards writing into one folder each leave a summary of all finished cases.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from CTFoundationLib.io.files import write_text_atomic
from CTFoundationLib.report.files import INDEX_FILE, REPORT_FILE, RESULT_FILE, SKIPPED_INPUTS_FILE, SUMMARY_FILE
from CTFoundationLib.report.render import render_index
from CTFoundationLib.weights.cache import now_iso

TOP_FINDINGS = 3
CSV_FIELDS = ("case_id", "status", "report", "warnings", "positives", "seconds", "error")


def summary_rows(out_dir: Path) -> list[dict]:
    """One row per case folder holding a result.json, sorted by case id (an unreadable result is a failed row, a
    case still to do a pending one), then one per input file that is not a case (status "skipped")."""
    rows = [_row(path, out_dir) for path in sorted(out_dir.glob(f"*/{RESULT_FILE}"))]
    return sorted(rows, key=lambda row: row["case_id"]) + _skipped_rows(out_dir / SKIPPED_INPUTS_FILE)


def _skipped_rows(path: Path) -> list[dict]:
    try:
        skipped = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as error:
        return [_failed_row(path.name, f"{path} is unreadable ({error}); rerun the batch")]
    return [dict(_failed_row(Path(item["path"]).name, f"{item['path']}: {item['reason']}"), status="skipped")
            for item in skipped]


def _row(path: Path, out_dir: Path) -> dict:
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
        case_id, status = result["case_id"], result["status"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        return _failed_row(path.parent.name, f"{path} is unreadable ({error}); rerun the batch to redo the case")
    if status == "pending":
        return dict(_failed_row(case_id, "not done yet: the batch stopped before this case; run it again"),
                    status="pending")
    if status != "ok":
        error = result.get("error", {})
        return _failed_row(case_id, f"{error.get('stage', '?')}: {error.get('message', '?')}", result)
    findings = sorted(result["detection"]["findings"], key=lambda f: -f["probability"])
    return {
        "case_id": case_id,
        "status": "ok",
        "report": (path.parent / REPORT_FILE).relative_to(out_dir).as_posix(),
        "warnings": [w["code"] for w in result["warnings"]],
        "positives": [f["name"] for f in findings if f["positive"]],
        "top_findings": [(f["name"], f["probability"]) for f in findings[:TOP_FINDINGS]],
        "probabilities": {f["name"]: f["probability"] for f in result["detection"]["findings"]},
        "seconds": result["timings_s"].get("total", ""),
        "error": "",
    }


def _failed_row(case_id: str, message: str, result: dict | None = None) -> dict:
    seconds = (result or {}).get("timings_s", {}).get("total", "")
    return {"case_id": case_id, "status": "failed", "report": "", "warnings": [], "positives": [],
            "top_findings": [], "probabilities": {}, "seconds": seconds, "error": message}


def summary_csv(rows: list[dict]) -> str:
    """CSV text: the fixed columns, then one P(present) column per finding (blank for failed cases)."""
    finding_names = list(dict.fromkeys(name for row in rows for name in row["probabilities"]))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([*CSV_FIELDS, *finding_names])
    for row in rows:
        fixed = [row[field] for field in CSV_FIELDS]
        fixed[3], fixed[4] = ";".join(row["warnings"]), ";".join(row["positives"])
        writer.writerow([*fixed, *(row["probabilities"].get(name, "") for name in finding_names)])
    return buffer.getvalue()


def write_summary(out_dir: Path) -> tuple[Path, Path]:
    """(Re)write DIR/index.html and DIR/summary.csv atomically; returns their paths."""
    rows = summary_rows(out_dir)
    index, table = out_dir / INDEX_FILE, out_dir / SUMMARY_FILE
    write_text_atomic(table, summary_csv(rows))
    write_text_atomic(index, render_index(rows, now_iso()))
    return index, table
