"""Pointing game of the finding maps on the held-out demo cases: is each map's maximum on the inserted finding?

For every held-out case and every finding inserted in it, the finding's map (CT-CLIP's, inference.maps; fVLM's
inside its organ, `FVLMRuntime.finding_maps`, for the findings fVLM scores) is resampled to the case's CT grid; a
hit is its maximum within `TOLERANCE_MM` of a voxel the finding's inserter changed (the case's finding masks,
written with the demo data), so a finding made of many parts (12-24 nodules, 16-32 calcified plates, generator
and lead) counts every part.

Also in the axial plane: the maximum of the axially averaged map (`FindingMaps.axial_average`) against the finding's
voxels projected along the axial axis, distances measured in-plane.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from CTFoundationLib.inference.ctclip import CTCLIPRuntime
from CTFoundationLib.inference.maps import FindingMaps
from CTFoundationLib.io.reading import read_ct
from CTFoundationLib.io.volume import CTVolume

from ..ctrate import find_volumes
from ..finding_masks import read_finding_masks
from .findings import DEMO_FINDINGS

TOLERANCE_MM = 15.0  # 5 voxels of the 3 mm demo grid; the pointing game's usual 15-pixel allowance
FOCAL_FINDINGS = ("Lung nodule", "Consolidation", "Arterial wall calcification", "Medical material")


@dataclass
class PointingResult:
    """Per finding: the distance (mm) from each positive case's map maximum to the nearest voxel of the finding, in
    3-D (`distances_mm`) and in the axial plane for the axially averaged map (`in_plane_mm`)."""

    tolerance_mm: float = TOLERANCE_MM
    distances_mm: dict[str, list[float]] = field(default_factory=lambda: {name: [] for name in DEMO_FINDINGS})
    in_plane_mm: dict[str, list[float]] = field(default_factory=lambda: {name: [] for name in DEMO_FINDINGS})

    def accuracy(self, names=DEMO_FINDINGS, tolerance_mm: float | None = None, in_plane: bool = False) -> float:
        """Hits / positives pooled over `names` (nan without positives)."""
        tolerance = self.tolerance_mm if tolerance_mm is None else tolerance_mm
        table = self.in_plane_mm if in_plane else self.distances_mm
        distances = [d for name in names for d in table[name]]
        return float(np.mean(np.array(distances) <= tolerance)) if distances else float("nan")

    def table(self) -> str:
        header = (f"{'finding':36} {'pos':>4} {'hits':>5} {'accuracy':>9} {'at 0 mm':>8} {'median mm':>10} "
                  f"{'in-plane accuracy':>18}")
        rows = [header]
        for name in (name for name in DEMO_FINDINGS if self.distances_mm[name]):  # the findings a model maps
            distances = np.array(self.distances_mm[name])
            hits = int((distances <= self.tolerance_mm).sum())
            focal = " (focal)" if name in FOCAL_FINDINGS else ""
            rows.append(f"{name + focal:36} {len(distances):4d} {hits:5d} {self.accuracy([name]):9.3f} "
                        f"{self.accuracy([name], 0.0):8.3f} {np.median(distances):10.1f} "
                        f"{self.accuracy([name], in_plane=True):18.3f}")
        return "\n".join(rows)


def pointing_game(runtime: CTCLIPRuntime, data: Path, split: str, progress=lambda n: None) -> PointingResult:
    """The pointing game on every positive of every demo finding in `split` (from the split's finding masks)."""
    result = PointingResult()
    for name, path in find_volumes(data / split).items():
        volume = read_ct(path)
        add_case(result, runtime.finding_maps(volume), case_masks(data, split, name, volume), volume)
        progress(1)
    return result


def case_masks(data: Path, split: str, name: str, volume: CTVolume) -> dict[str, np.ndarray]:
    """finding -> voxels of a demo case (the masks written with the demo data)."""
    return read_finding_masks(data / f"{split}_masks" / name.removesuffix(".nii.gz"), volume)


def add_case(result: PointingResult, maps: FindingMaps, masks: dict[str, np.ndarray], volume: CTVolume) -> None:
    """Add the distances of every masked finding that `maps` has a map of (3-D and in the axial plane)."""
    columns = maps.axial_average()
    for finding, mask in masks.items():
        if finding in maps.names:
            result.distances_mm[finding].append(peak_distance_mm(maps.in_ct(finding, volume), mask, volume))
            result.in_plane_mm[finding].append(in_plane_distance_mm(columns.in_ct(finding, volume), mask, volume))


def peak_distance_mm(values: np.ndarray, mask: np.ndarray, volume: CTVolume) -> float:
    """Distance (mm) from the maximum of `values` to the nearest True voxel of `mask` (same grid as the CT)."""
    peak = np.unravel_index(int(np.argmax(values)), values.shape)
    return nearest_distance_mm(mask, peak, volume.spacing_ijk_mm)


def in_plane_distance_mm(values: np.ndarray, mask: np.ndarray, volume: CTVolume) -> float:
    """`peak_distance_mm` in the axial plane: values and mask projected along the CT's axial voxel axis (max)."""
    axial = int(np.abs(volume.affine_ras[2, :3]).argmax())
    spacing = [s for axis, s in enumerate(volume.spacing_ijk_mm) if axis != axial]
    plane, footprint = values.max(axis=axial), mask.any(axis=axial)
    peak = np.unravel_index(int(np.argmax(plane)), plane.shape)
    return nearest_distance_mm(footprint, peak, spacing)


def nearest_distance_mm(mask: np.ndarray, voxel: tuple[int, ...], spacing_mm: Sequence[float]) -> float:
    """Distance (mm, 2 decimals) from `voxel` to the nearest True voxel of `mask` (0 inside it; inf when empty)."""
    if not mask.any():
        return float("inf")
    offsets_mm = (np.argwhere(mask) - np.asarray(voxel)) * np.asarray(spacing_mm)
    return round(float(np.sqrt((offsets_mm**2).sum(axis=1).min())), 2)


def pointing_report(result: PointingResult, cases: int, model: str = "") -> str:
    """The per-finding table and the headline lines `python -m training.demo eval` prints; `model` prefixes the
    headline lines ("fVLM ")."""
    return "\n".join([
        f"{model}pointing game on the {cases} held-out demo cases: a hit is the finding's map maximum within "
        f"{result.tolerance_mm:g} mm of a voxel of the inserted finding (positives of each finding):",
        result.table(),
        f"{model}pointing-game accuracy (focal findings): {result.accuracy(FOCAL_FINDINGS):.3f}",
        f"{model}pointing-game accuracy (all inserted findings): {result.accuracy():.3f}",
        "in the axial plane (axially averaged maps, distances in-plane): focal findings "
        f"{result.accuracy(FOCAL_FINDINGS, in_plane=True):.3f}, all {result.accuracy(in_plane=True):.3f}",
    ])


def run_pointing_game(runtime: CTCLIPRuntime, data: Path, split: str = "test") -> tuple[PointingResult, int]:
    from tqdm import tqdm

    cases = len(find_volumes(data / split))
    with tqdm(total=cases, desc=f"maps {split}", unit="case", file=sys.stderr, disable=None) as bar:
        return pointing_game(runtime, data, split, bar.update), cases
