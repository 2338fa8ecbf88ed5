"""Report text and finding labels of cases to index: a case-list column, a CT-RATE CSV, a report file beside the CT.

    annotations = case_annotations(cases, reports_csv=Path("valid_reports.csv"), labels_csv=Path("valid_labels.csv"))

Report text is kept as CT-CLIP trains on it: the `Findings_EN` of a CT-RATE reports CSV with quotes and
parentheses removed (CT-CLIP's cleaning); the same cleaning applies to a case-list `report` cell and a report file.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from CTFoundationLib.errors import CTInputError
from CTFoundationLib.io.cases import Case, case_name
from CTFoundationLib.io.tables import read_csv_rows, require_columns
from CTFoundationLib.vocab import CT_RATE_ABNORMALITIES

REPORT_SUFFIX = ".txt"  # `case.nii.gz` -> `case.txt` beside it; DICOM folder `series/` -> `series.txt` beside it
STRIPPED_CHARACTERS = "\"'()"  # what CT-CLIP's data loader strips from report text


@dataclass(frozen=True)
class CaseAnnotation:
    """What is known about a case besides its image: report text, 0/1 flags in CT_RATE_ABNORMALITIES order."""

    report: str | None = None
    labels: tuple[int, ...] | None = None


def clean_report_text(text: str | None) -> str | None:
    """Report text with quotes and parentheses removed and outer blanks stripped; None for a missing or empty one."""
    if text is None:
        return None
    for character in STRIPPED_CHARACTERS:
        text = text.replace(character, "")
    return text.strip() or None


def read_ctrate_reports(path: Path) -> dict[str, str]:
    """VolumeName -> cleaned findings text of a CT-RATE reports CSV (`VolumeName, Findings_EN[, Impressions_EN]`)."""
    header, rows = read_csv_rows(Path(path), CTInputError)
    require_columns(header, ("VolumeName", "Findings_EN"), path, CTInputError)
    reports = {}
    for row in rows:
        text = clean_report_text(row["Findings_EN"])
        if text is not None:
            reports[row["VolumeName"].strip()] = text
    return reports


def read_ctrate_labels(path: Path) -> dict[str, tuple[int, ...]]:
    """VolumeName -> 0/1 flags of the 18 CT-RATE abnormalities (CT_RATE_ABNORMALITIES order, any column order)."""
    header, rows = read_csv_rows(Path(path), CTInputError)
    require_columns(header, ("VolumeName", *CT_RATE_ABNORMALITIES), path, CTInputError)
    labels = {}
    for number, row in enumerate(rows, start=2):
        try:
            values = [float(row[name]) for name in CT_RATE_ABNORMALITIES]
        except (TypeError, ValueError):
            values = []
        if len(values) != len(CT_RATE_ABNORMALITIES) or any(value not in (0.0, 1.0) for value in values):
            raise CTInputError(f"{path}, line {number}: labels must be 0 or 1 in every abnormality column")
        labels[row["VolumeName"].strip()] = tuple(int(value) for value in values)
    return labels


def report_beside(path: Path) -> str | None:
    """The cleaned text of `<name>.txt` beside a CT file or a DICOM folder (never inside the series); None if absent."""
    path = Path(path)
    candidate = path.with_name((path.name if path.is_dir() else case_name(path)) + REPORT_SUFFIX)
    if not candidate.is_file():
        return None
    try:
        return clean_report_text(candidate.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as error:
        raise CTInputError(f"{candidate}: the report beside the CT cannot be read as UTF-8 text ({error})") from None


def case_annotations(cases: Sequence[Case], reports_csv: Path | None = None,
                     labels_csv: Path | None = None) -> dict[str, CaseAnnotation]:
    """case id -> its report and labels. A report comes from, in this order: the case list's `report` column, the
    reports CSV (row whose VolumeName is the CT's file name or the case id), a report file beside the CT. A CSV
    row is matched the same way for labels."""
    reports = read_ctrate_reports(reports_csv) if reports_csv else {}
    labels = read_ctrate_labels(labels_csv) if labels_csv else {}
    return {case.case_id: CaseAnnotation(
        clean_report_text(case.report) or _lookup(reports, case) or report_beside(case.path), _lookup(labels, case))
        for case in cases}


def _lookup(table: Mapping[str, object], case: Case):
    for key in (Path(case.path).name, case.case_id):
        if key in table:
            return table[key]
    return None
