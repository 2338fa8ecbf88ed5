"""CT-RATE as released, read for training: volumes, reports, labels and (for raw volumes) the metadata CSV.

Layout: `<split>/<split>_<pid>/<split>_<pid>_<scan>/<split>_<pid>_<scan>_<rec>.nii.gz`, e.g.
`train/train_1/train_1_a/train_1_a_1.nii.gz`. Reports CSV: `VolumeName, Findings_EN, Impressions_EN`.
Labels CSV: `VolumeName` + the 18 abnormality columns (0/1). Metadata CSV: `VolumeName, XYSpacing, ZSpacing,
RescaleSlope, RescaleIntercept, ...`; it is needed only for volumes stored as raw values (the first
release), whose NIfTI headers carry neither HU rescale nor spacing. The HU re-release is read as is.

Images go through the library's own `preprocess` with the model's `PreprocessSpec`, exactly as at inference.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from torch.utils.data import Dataset

from CTFoundationLib.errors import TrainingError
from CTFoundationLib.io.reading import read_ct
from CTFoundationLib.io.tables import binary_matrix, require_columns
from CTFoundationLib.io.tables import read_csv_rows as read_table
from CTFoundationLib.io.volume import CTVolume
from CTFoundationLib.preprocess import PreprocessSpec, preprocess
from CTFoundationLib.vocab import CT_RATE_ABNORMALITIES
from training.finding_masks import FindingMasks
from training.text import clean_report_text

STORED_VALUES = ("hu", "raw")


@dataclass(frozen=True)
class VolumeMetadata:
    """What the metadata CSV says about one raw volume: HU = slope * stored + intercept; spacing in mm."""

    slope: float
    intercept: float
    xy_spacing_mm: float
    z_spacing_mm: float


@dataclass(frozen=True)
class CTRateCase:
    """One volume with its training text (cleaned Findings) and, when known, its 18 labels."""

    name: str
    path: Path
    text: str
    labels: np.ndarray | None


def read_csv_rows(path: Path, required: tuple[str, ...]) -> list[dict[str, str]]:
    """Rows of a CSV as dicts; TrainingError naming the file when it is unreadable or lacks a column."""
    header, rows = read_table(path, TrainingError)
    require_columns(header, required, path, TrainingError)
    return rows


def read_reports(path: Path) -> dict[str, str]:
    """VolumeName -> cleaned Findings text."""
    rows = read_csv_rows(path, ("VolumeName", "Findings_EN"))
    return {row["VolumeName"]: clean_report_text(row["Findings_EN"]) for row in rows}


def read_labels(path: Path, names: tuple[str, ...] = CT_RATE_ABNORMALITIES) -> dict[str, np.ndarray]:
    """VolumeName -> float32 (18,) labels in `names` order (CT-CLIP's), whatever the column order."""
    rows = read_csv_rows(path, ("VolumeName", *names))
    matrix = binary_matrix(rows, names, path, TrainingError).astype(np.float32)
    return {row["VolumeName"]: labels for row, labels in zip(rows, matrix)}


def read_metadata(path: Path) -> dict[str, VolumeMetadata]:
    """VolumeName -> rescale and spacing, for volumes stored as raw values."""
    rows = read_csv_rows(path, ("VolumeName", "XYSpacing", "ZSpacing", "RescaleSlope", "RescaleIntercept"))
    table = {}
    for row in rows:
        xy = re.findall(r"[-+]?\d*\.?\d+(?:[eE][-+]?\d+)?", row["XYSpacing"])
        try:
            table[row["VolumeName"]] = VolumeMetadata(
                float(row["RescaleSlope"]), float(row["RescaleIntercept"]), float(xy[0]), float(row["ZSpacing"])
            )
        except (IndexError, ValueError):
            raise TrainingError(f"{path}: unreadable spacing or rescale for {row['VolumeName']}") from None
    return table


def find_volumes(split_root: Path) -> dict[str, Path]:
    """File name -> path of every `*.nii.gz` in the CT-RATE layout under `split_root` (patient/scan folders)."""
    volumes = {path.name: path for path in sorted(Path(split_root).glob("*/*/*.nii.gz"))}
    if not volumes:
        raise TrainingError(
            f"{split_root}: no volumes in the CT-RATE layout (<split>_<pid>/<split>_<pid>_<scan>/*.nii.gz); "
            "point `data.root` at the split folder, e.g. dataset/train"
        )
    return volumes


def load_cases(split_root: Path, reports_csv: Path, labels_csv: Path | None = None) -> list[CTRateCase]:
    """Every volume that has a report (and labels, when a labels CSV is given), in file-name order."""
    volumes = find_volumes(split_root)
    reports = read_reports(reports_csv)
    labels = read_labels(labels_csv) if labels_csv else None
    cases = [
        CTRateCase(name, path, reports[name], labels[name] if labels is not None else None)
        for name, path in volumes.items()
        if name in reports and (labels is None or name in labels)
    ]
    if not cases:
        raise TrainingError(f"none of the {len(volumes)} volumes under {split_root} has a row in {reports_csv}")
    return cases


def read_raw_volume(path: Path, metadata: VolumeMetadata) -> CTVolume:
    """A first-release volume: stored values -> HU with the CSV rescale; voxel axes (i, j, k) = (L, P, S)."""
    try:
        stored = np.asanyarray(nib.load(str(path)).dataobj).astype(np.float32)
    except Exception as error:  # nibabel raises several types for damaged files
        raise TrainingError(f"{path}: cannot read this NIfTI file ({error})") from None
    hu = stored * np.float32(metadata.slope) + np.float32(metadata.intercept)
    xy, z = metadata.xy_spacing_mm, metadata.z_spacing_mm
    return CTVolume(hu, np.diag([-xy, -xy, z, 1.0]), str(path), {"rescale": (metadata.slope, metadata.intercept)})


class CTRateDataset(Dataset):
    """Items {"image": (1, *spec.shape) float32, "text": str, "labels": (18,) float32, "name": str}, and
    "token_targets" ((18, t, h, w) bool, `FindingMasks.token_targets`) when finding masks are given.

    stored_values: "hu" (headers hold HU and spacing) or "raw" (needs `metadata`). cache_images keeps each
    preprocessed image (and its token targets) in memory (small demo sets; use with num_workers=0). The trainer
    sets `finding_masks` from its config, so one cached dataset serves stages with and without them.
    """

    def __init__(
        self,
        cases: list[CTRateCase],
        spec: PreprocessSpec,
        stored_values: str = "hu",
        metadata: dict[str, VolumeMetadata] | None = None,
        cache_images: bool = False,
        finding_masks: FindingMasks | None = None,
    ) -> None:
        if stored_values not in STORED_VALUES:
            raise TrainingError(f"data.stored_values must be one of {STORED_VALUES}, got {stored_values!r}")
        if stored_values == "raw" and metadata is None:
            raise TrainingError("data.stored_values is 'raw' but no data.metadata_csv was given (rescale and spacing)")
        self.cases, self.spec, self.stored_values, self.metadata = cases, spec, stored_values, metadata
        self.finding_masks = finding_masks
        self._cache: dict[int, dict[str, torch.Tensor]] | None = {} if cache_images else None

    def __len__(self) -> int:
        return len(self.cases)

    def volume(self, index: int) -> CTVolume:
        case = self.cases[index]
        if self.stored_values == "hu":
            return read_ct(case.path)
        if case.name not in self.metadata:
            raise TrainingError(f"{case.name}: no row in the metadata CSV (needed for rescale and spacing)")
        return read_raw_volume(case.path, self.metadata[case.name])

    def _inputs(self, index: int) -> dict[str, torch.Tensor]:
        """The preprocessed image and, with finding masks, the token targets (each read once when cached)."""
        cached = self._cache.setdefault(index, {}) if self._cache is not None else {}
        wanted = ("image", "token_targets") if self.finding_masks is not None else ("image",)
        if any(key not in cached for key in wanted):
            volume = self.volume(index)
            if "image" not in cached:
                cached["image"] = torch.from_numpy(preprocess(volume, self.spec))
            if self.finding_masks is not None:
                stem = self.cases[index].name.removesuffix(".nii.gz")
                cached["token_targets"] = torch.from_numpy(self.finding_masks.token_targets(volume, stem))
        return {key: cached[key] for key in wanted}

    def __getitem__(self, index: int) -> dict:
        case = self.cases[index]
        labels = case.labels if case.labels is not None else np.zeros(len(CT_RATE_ABNORMALITIES), np.float32)
        inputs = self._inputs(index)
        if "token_targets" in inputs:
            masked_absent = inputs["token_targets"].flatten(1).any(dim=1).numpy() & (labels == 0)
            if masked_absent.any():
                names = [CT_RATE_ABNORMALITIES[i] for i in np.flatnonzero(masked_absent)]
                raise TrainingError(f"{case.name}: finding masks for {names}, but its labels say absent; fix the "
                                    "labels or remove those masks")
        return {**inputs, "text": case.text, "labels": torch.from_numpy(labels), "name": case.name}
