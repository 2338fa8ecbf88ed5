"""CSV tables of reports, labels and predicted probabilities over the 18 CT-RATE findings.

Column names are matched to CT-CLIP's names (`CT_RATE_ABNORMALITIES`) explicitly: exactly, ignoring case,
spacing and punctuation, or through the aliases the CT-CLIP scripts and label files use.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from CTFoundationLib.errors import CTFoundationError
from CTFoundationLib.io.files import atomic_write
from CTFoundationLib.vocab import CT_RATE_ABNORMALITIES

# Other spellings of the finding names, after `normalize_name`. "calcification" is what CT-CLIP's
# bootstrap script calls "Arterial wall calcification".
FINDING_ALIASES: dict[str, str] = {
    "calcification": "Arterial wall calcification",
    "arterial calcification": "Arterial wall calcification",
    "coronary artery calcification": "Coronary artery wall calcification",
    "pulmonary fibrotic sequelae": "Pulmonary fibrotic sequela",
    "mosaic attenuation": "Mosaic attenuation pattern",
    "lung nodules": "Lung nodule",
}
REPORT_TEXT_COLUMN = "report_text"  # the free-text report column of a reports CSV
CASE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".json", ".npz")


def normalize_name(name: str) -> str:
    """Lower case, every run of non-alphanumerics as one space: 'Lung_Nodule ' -> 'lung nodule'."""
    return " ".join(re.findall(r"[a-z0-9]+", name.lower()))


FINDING_KEYS: dict[str, str] = {normalize_name(name): name for name in CT_RATE_ABNORMALITIES}


def finding_for_column(column: str) -> str | None:
    """The CT-RATE finding a column holds, or None when it is not a finding column."""
    key = normalize_name(column)
    return FINDING_KEYS.get(key) or FINDING_ALIASES.get(key)


def finding_columns(header: Iterable[str], source: Path, error: type[CTFoundationError]) -> dict[str, str]:
    """Map finding name -> column for every finding column of a header; two columns for one finding is an error."""
    columns: dict[str, str] = {}
    for column in header:
        finding = finding_for_column(column)
        if finding is None:
            continue
        if finding in columns:
            raise error(f"{source}: columns {columns[finding]!r} and {column!r} both hold {finding!r}; keep one")
        columns[finding] = column
    return columns


def case_id(name: str) -> str:
    """A case key that matches across files, without folder or suffix: 'a/valid_1_a_1.nii.gz' -> 'valid_1_a_1'."""
    base = name.strip().replace("\\", "/").rsplit("/", 1)[-1]
    for suffix in CASE_SUFFIXES:
        if base.lower().endswith(suffix):
            return base[: -len(suffix)]
    return base


def read_csv_rows(path: Path, error: type[CTFoundationError]) -> tuple[list[str], list[dict[str, str]]]:
    """(header, rows) of a UTF-8 CSV with a header line; any problem is `error` naming the file."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            rows = list(reader)
            header = list(reader.fieldnames or [])
    except FileNotFoundError:
        raise error(f"{path}: no such file; check the path") from None
    except IsADirectoryError:
        raise error(f"{path} is a folder; pass a CSV file") from None
    except UnicodeDecodeError:
        raise error(f"{path} is not UTF-8 text; export it as a UTF-8 CSV") from None
    except (OSError, csv.Error) as problem:
        raise error(f"{path} cannot be read as CSV ({problem}); check the file") from None
    if not header:
        raise error(f"{path} is empty; a CSV with a header line is expected")
    if any(None in row for row in rows):
        line = next(i for i, row in enumerate(rows, start=2) if None in row)
        raise error(f"{path}, line {line}: more fields than header columns; check the quoting of that row")
    return header, rows


def require_columns(header: Sequence[str], needed: Sequence[str], source: Path, error: type[CTFoundationError]) -> None:
    """An error naming the missing columns and the ones the file has."""
    missing = [name for name in needed if name not in header]
    if missing:
        raise error(f"{source}: missing column(s) {missing}; the file has {list(header)}")


def number_matrix(
    rows: Sequence[dict[str, str]], columns: Sequence[str], source: Path, error: type[CTFoundationError]
) -> np.ndarray:
    """(len(rows), len(columns)) float array of the cells; a cell that is not a finite number is an error."""
    matrix = np.empty((len(rows), len(columns)), dtype=np.float64)
    for i, row in enumerate(rows):
        for j, column in enumerate(columns):
            try:
                matrix[i, j] = float(row[column])
            except (TypeError, ValueError):
                raise error(f"{source}, line {i + 2}, column {column!r}: {row[column]!r} is not a number") from None
    if not np.isfinite(matrix).all():
        i, j = np.argwhere(~np.isfinite(matrix))[0]
        raise error(f"{source}, line {i + 2}, column {columns[j]!r}: {matrix[i, j]} is not a finite number")
    return matrix


def binary_matrix(
    rows: Sequence[dict[str, str]], columns: Sequence[str], source: Path, error: type[CTFoundationError]
) -> np.ndarray:
    """(len(rows), len(columns)) int array of 0/1 labels; any other value is an error naming line and column."""
    matrix = number_matrix(rows, columns, source, error)
    bad = np.argwhere((matrix != 0) & (matrix != 1))
    if len(bad):
        i, j = bad[0]
        raise error(f"{source}, line {i + 2}, column {columns[j]!r}: labels must be 0 or 1, got {matrix[i, j]:g}")
    return matrix.astype(np.int64)


def write_csv(path: Path, header: Sequence[str], rows: Sequence[dict], error: type[CTFoundationError]) -> None:
    """Write a CSV through a temporary file, so readers never see half a file; a failure is `error` naming it."""
    try:
        with atomic_write(path, newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=header)
            writer.writeheader()
            writer.writerows(rows)
    except OSError as problem:
        raise error(f"cannot write {path} ({problem}); check the folder and its permissions") from None
