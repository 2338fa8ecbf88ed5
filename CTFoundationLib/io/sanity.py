"""Plausibility checks on a CT before a model sees it. They warn (with a stable code), never refuse.

Codes:
- HU_RAW: no negative values, so the data are stored pixel values, not HU.
- HU_SHIFTED: air sits near -2000 instead of -1000 (a rescale applied twice; CT-CLIP issue #50).
- HU_RANGE: values outside what a CT in HU can hold.
- THICK_SLICES: slices thicker than 3 mm (the models were trained on thin-slice CT).
- CONTRAST: the DICOM says a contrast agent was given (CT-RATE is mostly non-contrast).
- NOT_CHEST: too little aerated lung in view for a chest CT.
- SHORT_COVERAGE: the scan covers far less than a chest along the body axis.
- OTHER_SERIES: the DICOM folder holds further series that were not read.
- NON_FINITE: voxels that held no number (NaN, inf) were taken as outside the field of view (air).
- OBLIQUE: the voxel grid is rotated against the patient axes; the models see it along its nearest axes.
- NO_ORIENTATION: the file does not say how its voxels lie in the patient (NIfTI sform and qform codes 0).
- SFORM_IGNORED: a NIfTI whose sform and qform disagree was placed by its qform, as 3D Slicer places it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import scipy.ndimage as ndi

from CTFoundationLib.io.volume import CTVolume, obliquity_deg

THICK_SLICE_MM = 3.0
OBLIQUE_DEG = 0.5  # a rotation below this is rounding in the header
MIN_CHEST_COVERAGE_MM = 150.0
MIN_LUNG_FRACTION = 0.08  # aerated-lung voxels / non-air voxels, on a ~3 mm grid
LUNG_HU = (-950.0, -600.0)
CHECK_GRID_MM = 3.0


@dataclass(frozen=True)
class InputWarning:
    code: str
    message: str

    def to_dict(self) -> dict:
        return asdict(self)


def check_ct(volume: CTVolume) -> list[InputWarning]:
    """All warnings for `volume`, in a stable order."""
    coarse = _coarse_hu(volume)
    warnings = _hu_warnings(coarse)
    warnings += _geometry_warnings(volume)
    if volume.metadata.get("contrast_agent"):
        warnings.append(
            InputWarning(
                "CONTRAST",
                f"the DICOM records a contrast agent ({volume.metadata['contrast_agent']}); the models were trained "
                "mostly on non-contrast chest CT, so scores may shift",
            )
        )
    if not any(w.code.startswith("HU_") for w in warnings):
        fraction = lung_fraction(coarse)
        if fraction < MIN_LUNG_FRACTION:
            warnings.append(
                InputWarning(
                    "NOT_CHEST",
                    f"only {fraction:.0%} of the tissue in view is aerated lung (a chest CT has ≥ "
                    f"{MIN_LUNG_FRACTION:.0%}); this does not look like a chest CT and findings will not be meaningful",
                )
            )
    others = volume.metadata.get("other_series")
    if others:
        listed = "; ".join(f"{o['series_uid']} ({o['slices']} slices, '{o['description']}')" for o in others)
        warnings.append(
            InputWarning("OTHER_SERIES", f"read the series with the most slices; the folder also holds: {listed}")
        )
    return warnings


def _coarse_hu(volume: CTVolume) -> np.ndarray:
    """A strided ~3 mm float32 copy of the HU array in LPS order (axis 2 = head-foot), cheap for statistics."""
    oriented = volume.reoriented("LPS")
    steps = tuple(max(1, int(round(CHECK_GRID_MM / s))) for s in oriented.spacing_ijk_mm)
    return oriented.hu[:: steps[0], :: steps[1], :: steps[2]].astype(np.float32)


def _hu_warnings(hu: np.ndarray) -> list[InputWarning]:
    low, high = float(hu.min()), float(hu.max())
    if low >= 0:
        return [
            InputWarning(
                "HU_RAW",
                f"values run {low:.0f}..{high:.0f} with nothing negative: these look like stored pixel values, not "
                "HU. Pass the rescale explicitly, e.g. --rescale 1,-1024 (CT-RATE's first release: take slope and "
                "intercept from its metadata CSV; its second release is already HU)",
            )
        ]
    near_air = np.mean((hu >= -1100) & (hu <= -900))
    near_double = np.mean((hu >= -2150) & (hu <= -1900))
    if near_double > max(near_air, 0.01):
        return [
            InputWarning(
                "HU_SHIFTED",
                "air sits near -2000 HU instead of -1000: a rescale intercept was probably applied twice (e.g. "
                "CT-RATE's HU release rescaled again). Read it without --rescale or fix the intercept",
            )
        ]
    if high < 300 or low > -800:
        return [
            InputWarning(
                "HU_RANGE",
                f"values run {low:.0f}..{high:.0f}, implausible for a CT in HU (air ≈ -1000, bone > 300); "
                "check the file is a CT and its rescale",
            )
        ]
    return []


def _geometry_warnings(volume: CTVolume) -> list[InputWarning]:
    warnings = []
    non_finite = volume.metadata.get("non_finite_voxels")
    if non_finite:
        warnings.append(
            InputWarning(
                "NON_FINITE",
                f"{non_finite} voxels ({non_finite / volume.hu.size:.1%}) held no number (NaN or infinite); they were "
                "taken as outside the field of view (air, -1024 HU)",
            )
        )
    if volume.metadata.get("orientation_assumed"):
        warnings.append(
            InputWarning(
                "NO_ORIENTATION",
                "the file does not say how its voxels lie in the patient (NIfTI sform and qform codes are 0); they "
                "were placed by voxel size alone, so left-right and head-foot may be wrong. Save it with its "
                "orientation",
            )
        )
    ignored_mm = volume.metadata.get("sform_ignored_mm")
    if ignored_mm:
        warnings.append(
            InputWarning(
                "SFORM_IGNORED",
                f"the NIfTI sform and qform place the voxels up to {ignored_mm:g} mm apart; the qform was used, as "
                "3D Slicer uses it. Check which one is right and save the file with matching sform and qform",
            )
        )
    angle = obliquity_deg(volume.affine_ras)
    if angle > OBLIQUE_DEG:
        warnings.append(
            InputWarning(
                "OBLIQUE",
                f"the voxel grid is rotated {angle:.1f}° against the patient axes; the models see it along its nearest "
                "axes without resampling, so the anatomy is tilted by that angle. Resample it to an axial grid for "
                "reliable scores",
            )
        )
    oriented = volume.reoriented("LPS")
    slice_mm = max(oriented.spacing_ijk_mm[2], float(volume.metadata.get("slice_thickness_mm") or 0.0))
    if slice_mm > THICK_SLICE_MM:
        warnings.append(
            InputWarning(
                "THICK_SLICES",
                f"slices are {slice_mm:.2f} mm thick (> {THICK_SLICE_MM:g} mm); the models were trained on thin-slice "
                "CT and may miss small findings",
            )
        )
    coverage = oriented.extent_mm()[2]
    if coverage < MIN_CHEST_COVERAGE_MM:
        warnings.append(
            InputWarning(
                "SHORT_COVERAGE",
                f"the scan covers {coverage:.0f} mm head-to-foot; a chest CT covers about 250-350 mm, so most of the "
                "chest is missing",
            )
        )
    return warnings


def lung_fraction(coarse_hu: np.ndarray) -> float:
    """Share of non-air voxels that are aerated lung (-950..-600 HU after in-plane 3x3 smoothing, eroded once).

    coarse_hu: LPS-ordered ~3 mm grid; smoothing and erosion stay in-plane so a few slices suffice.
    """
    smooth = ndi.uniform_filter(coarse_hu, (3, 3, 1))
    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[:, :, 1] = ndi.generate_binary_structure(2, 1)
    lung = ndi.binary_erosion((smooth > LUNG_HU[0]) & (smooth < LUNG_HU[1]), structure=in_plane)
    tissue_or_lung = smooth > LUNG_HU[0]
    return float(lung.sum() / max(int(tissue_or_lung.sum()), 1))


def summarize(volume: CTVolume) -> dict:
    """Geometry, HU range and warnings of `volume`, JSON-serialisable (what `ctfoundation info` prints)."""
    hu_min, hu_max = (float(v) for v in (volume.hu.min(), volume.hu.max()))
    metadata = {k: v for k, v in volume.metadata.items() if k != "other_series"}
    return {
        "source": volume.source,
        "shape_ijk": list(volume.shape_ijk),
        "spacing_ijk_mm": [round(s, 4) for s in volume.spacing_ijk_mm],
        "orientation": volume.orientation_code,
        "extent_ijk_mm": [round(e, 1) for e in volume.extent_mm()],
        "affine_ras": np.round(volume.affine_ras, 4).tolist(),
        "hu_range": [hu_min, hu_max],
        "dtype": str(volume.hu.dtype),
        "metadata": metadata,
        "warnings": [w.to_dict() for w in check_ct(volume)],
    }
