"""Turn command-line inputs (CT files, DICOM folders, folders of cases, CSV lists) into named cases."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from CTFoundationLib.errors import CTInputError
from CTFoundationLib.io.reading import NIFTI_SUFFIXES, NRRD_SUFFIXES, _is_dicom_file

CT_SUFFIXES = NIFTI_SUFFIXES + NRRD_SUFFIXES
EMBEDDING_SUFFIX = ".safetensors"  # a case already embedded by `ctfoundation embed`


@dataclass(frozen=True)
class Case:
    """One input CT. report: the text of the case list's optional `report` column (None when not given)."""

    case_id: str
    path: Path
    report: str | None = None


@dataclass(frozen=True)
class SkippedInput:
    """A file found in an input folder that is not a case, and why."""

    path: Path
    reason: str


@dataclass
class Discovered:
    cases: list[Case]
    skipped: list[SkippedInput]


def discover_cases(inputs: list[Path], embeddings: bool = False) -> Discovered:
    """Cases in input order, and the files of input folders that are not cases. A CT file is a case; a folder
    holding DICOM files is a case; any other folder contributes each CT file and DICOM folder found below it (and,
    with `embeddings`, each saved embedding); a .csv lists paths in a `path` column (optional `case_id` and
    `report`). Case ids
    are file/folder names, made unique with a numeric suffix. No case at all is a CTInputError."""
    found: list[tuple[str | None, Path, str | None]] = []
    skipped: list[SkippedInput] = []
    suffixes = CT_SUFFIXES + ((EMBEDDING_SUFFIX,) if embeddings else ())
    for path in inputs:
        path = Path(path)
        if not path.exists():
            raise CTInputError(f"{path}: no such file or folder")
        if path.suffix.lower() == ".csv":
            found += _from_csv(path)
        elif path.is_file() or _holds_dicom(path):
            found.append((None, path, None))
        else:
            cases = _cases_below(path, suffixes, skipped)
            if not cases:
                raise CTInputError(f"{path}: no CT files (.nii, .nii.gz, .nrrd) or DICOM folders inside")
            found += [(None, case, None) for case in cases]
    return Discovered(_unique_ids(found), skipped)


def _from_csv(path: Path) -> list[tuple[str | None, Path, str | None]]:
    from CTFoundationLib.io.tables import read_csv_rows, require_columns

    header, rows = read_csv_rows(path, CTInputError)
    require_columns(header, ("path",), path, CTInputError)
    if not rows:
        raise CTInputError(f"{path}: lists no cases (a header only); add one row per CT with its path")
    cases = []
    for number, row in enumerate(rows, start=2):
        text = (row["path"] or "").strip()
        if not text:
            raise CTInputError(f"{path}, line {number}: the 'path' cell is empty")
        case_path = Path(text)
        case_path = case_path if case_path.is_absolute() else path.parent / case_path
        report = (row.get("report") or "").strip() or None
        cases.append((row.get("case_id") or None, case_path, report))
    return cases


def _holds_dicom(folder: Path) -> bool:
    return folder.is_dir() and any(
        f.is_file() and (f.suffix.lower() == ".dcm" or _is_dicom_file(f)) for f in folder.iterdir()
    )


def _cases_below(folder: Path, suffixes: tuple[str, ...], skipped: list[SkippedInput]) -> list[Path]:
    """CT files and DICOM folders below `folder`; other files go to `skipped` with the reason (hidden ones aside)."""
    cases = []
    for child in sorted(folder.iterdir()):
        if child.name.startswith("."):
            continue
        if child.is_file() and child.name.lower().endswith(suffixes):
            cases.append(child)
        elif child.is_dir():
            cases += [child] if _holds_dicom(child) else _cases_below(child, suffixes, skipped)
        elif _is_report_beside_a_ct(child):
            continue  # the case's report (io.reports.report_beside), not a stray file
        else:
            kind = child.suffix.lower() or "without an extension"
            skipped.append(SkippedInput(child, f"not a CT file ({kind}): reads .nii, .nii.gz, .nrrd and DICOM folders"))
    return cases


def _is_report_beside_a_ct(path: Path) -> bool:
    """`case.txt` beside `case.nii.gz` (.nii, .nrrd) or a DICOM folder `case/`: the report `index` reads."""
    if path.suffix.lower() != ".txt":
        return False
    return _holds_dicom(path.with_suffix("")) or any(path.with_name(path.stem + suffix).is_file()
                                                     for suffix in CT_SUFFIXES)


def require_outside_series(out: Path, cases: list[Case]) -> None:
    """Refuse an output folder that is, or lies inside, an input DICOM series folder (it would mix results into
    the series and be read back as part of it)."""
    out = Path(out).resolve()
    for case in cases:
        folder = Path(case.path).resolve()
        if folder.is_dir() and (out == folder or folder in out.parents):
            raise CTInputError(f"output folder {out} is inside the input series {folder}; choose a folder outside it")


def case_name(path: Path) -> str:
    name = path.name
    for suffix in CT_SUFFIXES + (EMBEDDING_SUFFIX,):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _unique_ids(found: list[tuple[str | None, Path, str | None]]) -> list[Case]:
    cases, seen = [], {}
    for given, path, report in found:
        base = given or _readable_name(path)
        seen[base] = seen.get(base, 0) + 1
        cases.append(Case(base if seen[base] == 1 else f"{base}_{seen[base]}", path, report))
    return cases


def _readable_name(path: Path) -> str:
    """'ct' or 'dicom' say nothing: prefix the parent folder's name then."""
    name = case_name(path)
    return f"{path.parent.name}_{name}" if name.lower() in {"ct", "dicom", "image", "series"} else name
