"""Read a CT from NIfTI, NRRD or a DICOM series folder into a `CTVolume` (HU, RAS affine).

DICOM series choice (a folder with several series): the caller may name `series_uid`; otherwise the
CT series with the most slices is used and the others are listed in `metadata["other_series"]`.
Gantry tilt, uneven slice spacing (missing slices) and duplicate slice positions are refused with a
clear error rather than silently resampled.
"""

from __future__ import annotations

import gzip
import os
import warnings
import zlib
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from CTFoundationLib.errors import CTInputError
from CTFoundationLib.io.volume import LPS_FROM_RAS, CTVolume, shear_deg

NIFTI_SUFFIXES = (".nii", ".nii.gz")
NRRD_SUFFIXES = (".nrrd", ".nhdr")
SLICE_SPACING_TOLERANCE = 0.05  # relative deviation from the median slice step before we refuse
TILT_TOLERANCE_DEG = 0.5  # shear (gantry tilt) beyond this is refused; the same bound flags an oblique grid
SPACING_RANGE_MM = (0.01, 50.0)  # voxel sizes a CT can have; outside it the header is wrong
SFORM_QFORM_TOLERANCE_MM = 0.5  # an ignored sform further than this from the qform is reported
PIXEL_DATA_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
AIR_HU = -1024.0  # what a non-finite voxel becomes: outside the field of view, as scanners pad it


def read_ct(path: str | Path, series_uid: str | None = None, rescale: tuple[float, float] | None = None) -> CTVolume:
    """Read a CT file or DICOM folder.

    rescale: an explicit (slope, intercept) to turn stored values into HU, for data whose files hold raw
    values (e.g. CT-RATE's first release). It replaces any rescale found in DICOM headers.
    """
    path = Path(path)
    if not path.exists():
        raise CTInputError(f"{path}: no such file or folder")
    if path.is_dir():
        volume = read_dicom_series(path, series_uid, rescale)
    elif path.name.lower().endswith(NIFTI_SUFFIXES + NRRD_SUFFIXES):
        nifti = path.name.lower().endswith(NIFTI_SUFFIXES)
        volume = read_nifti(path, stored=rescale is not None) if nifti else read_nrrd(path)
        if rescale is not None:
            volume = _apply_explicit_rescale(volume, rescale)
    elif path.suffix.lower() in (".dcm", "") or _is_dicom_file(path):
        volume = read_dicom_series([path], series_uid, rescale)
    else:
        raise CTInputError(
            f"{path}: unknown file type; give a NIfTI (.nii/.nii.gz), NRRD (.nrrd/.nhdr) file or a DICOM folder"
        )
    return usable_volume(volume)


def read_nifti(path: Path, stored: bool = False) -> CTVolume:
    """stored: the values as stored, without the header's scl_slope/scl_inter (an explicit rescale replaces it)."""
    import nibabel as nib

    try:
        image = nib.load(str(path))
        data = image.dataobj.get_unscaled() if stored else np.asanyarray(image.dataobj)
    except (OSError, EOFError, zlib.error, gzip.BadGzipFile, nib.filebasedimages.ImageFileError, ValueError) as error:
        raise CTInputError(f"{path}: cannot read this NIfTI file ({error}); is it truncated or corrupt?") from error
    data = _squeeze_to_3d(data, path)
    affine, notes = nifti_affine(image.header)
    return CTVolume(_as_hu_dtype(data, path), affine, str(path), {"format": "nifti", **notes})


def nifti_affine(header) -> tuple[np.ndarray, dict]:
    """Voxel (i, j, k) -> RAS mm of a NIfTI header, chosen as 3D Slicer's reader (ITK's NiftiImageIO) chooses it,
    so that the command line, batch reports and Slicer place the same file alike; and metadata on what was
    assumed or passed over (empty for an ordinary file).

    1. sform_code 1 (scanner anatomical) and an unsheared sform: the sform.
    2. else a qform (qform_code > 0): the qform. (nibabel would take any coded sform first.)
    3. else a coded sform: the sform (a sheared one is refused later, as ITK refuses it).
    4. neither: voxel sizes along LPS from the origin, as ITK places them (metadata orientation_assumed: the
       NO_ORIENTATION warning).
    When a coded sform is passed over and places the voxels more than SFORM_QFORM_TOLERANCE_MM away from the
    qform, metadata["sform_ignored_mm"] holds that distance (the SFORM_IGNORED warning).
    """
    sform, sform_code = header.get_sform(coded=True)
    qform, qform_code = header.get_qform(coded=True)
    if sform_code == 1 and shear_deg(sform) <= TILT_TOLERANCE_DEG:
        return sform, {}
    if qform_code > 0:
        metadata = {}
        if sform_code > 0:
            ni, nj, nk = (n - 1 for n in header.get_data_shape()[:3])
            corners = np.array([[i, j, k, 1] for i in (0, ni) for j in (0, nj) for k in (0, nk)], float).T
            distance = float(np.linalg.norm(((sform - qform) @ corners)[:3], axis=0).max())
            if distance > SFORM_QFORM_TOLERANCE_MM:
                metadata["sform_ignored_mm"] = round(distance, 2)
        return qform, metadata
    if sform_code > 0:
        return sform, {}
    spacing = [float(z) for z in header.get_zooms()[:3]]  # nibabel gives 1.0 for a zero voxel size
    return np.diag([-spacing[0], -spacing[1], spacing[2], 1.0]), {"orientation_assumed": True}


def read_nrrd(path: Path) -> CTVolume:
    import nrrd

    try:
        data, header = nrrd.read(str(path))
    except (OSError, EOFError, zlib.error, nrrd.NRRDError, ValueError) as error:
        raise CTInputError(f"{path}: cannot read this NRRD file ({error}); is it truncated or corrupt?") from error
    data = _squeeze_to_3d(data, path)
    directions = np.asarray(header.get("space directions"), dtype=float)
    if directions.shape != (3, 3):
        raise CTInputError(f"{path}: NRRD without 3-D 'space directions'; cannot place the voxels in space")
    origin = np.asarray(header.get("space origin", np.zeros(3)), dtype=float)
    affine_space = np.eye(4)
    affine_space[:3, :3] = directions.T
    affine_space[:3, 3] = origin
    space = str(header.get("space", "left-posterior-superior")).lower()
    to_ras = {"left-posterior-superior": LPS_FROM_RAS, "right-anterior-superior": np.eye(4)}.get(space)
    if to_ras is None:
        raise CTInputError(f"{path}: NRRD space '{space}' is not supported; save it as LPS or RAS")
    return CTVolume(_as_hu_dtype(data, path), to_ras @ affine_space, str(path), {"format": "nrrd"})


def _squeeze_to_3d(data: np.ndarray, path: Path) -> np.ndarray:
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim == 2:
        data = data[:, :, None]
    if data.ndim != 3:
        raise CTInputError(f"{path}: expected a 3-D CT, got an array of shape {data.shape}")
    return data


def _as_hu_dtype(data: np.ndarray, path: Path) -> np.ndarray:
    """Integer data that fits in int16 stays int16 (half the memory), other real numbers become float32."""
    if data.dtype.kind not in "iuf":  # bool masks, complex, RGB records and text cannot be HU
        raise CTInputError(f"{path}: voxels of type {data.dtype} cannot hold HU values; give the CT itself (a "
                           "scalar integer or float image), not a mask, colour or complex image")
    if data.dtype == np.int16:
        return data
    if np.issubdtype(data.dtype, np.integer) and data.size and data.min() >= -32768 and data.max() <= 32767:
        return data.astype(np.int16)
    return data.astype(np.float32)


def usable_volume(volume: CTVolume) -> CTVolume:
    """The volume if the models can use it, after the checks every reader (and a Slicer node) goes through.

    Refused: fewer than 2 voxels along an axis, a geometry that places no regular grid in space (non-finite or
    singular affine, spacing outside SPACING_RANGE_MM, sheared axes), no finite voxel. Non-finite voxels (NaN,
    inf) are taken as outside the field of view: they become AIR_HU, counted in metadata["non_finite_voxels"]
    (the NON_FINITE warning). A rotated (oblique) grid is kept along its nearest axes (the OBLIQUE warning).
    """
    where = volume.source or "the CT"
    if min(volume.shape_ijk) < 2:
        raise CTInputError(
            f"{where}: this is a 2-D image (shape {volume.shape_ijk}); the models need a 3-D CT volume "
            "(a whole series of slices)"
        )
    _require_regular_grid(volume.affine_ras, where)
    finite = np.isfinite(volume.hu) if volume.hu.dtype.kind == "f" else None
    if finite is not None and not finite.all():
        missing = int(finite.size - np.count_nonzero(finite))
        if missing == finite.size:
            raise CTInputError(f"{where}: no voxel holds a number (all NaN or infinite); the file is not a usable CT")
        hu = np.where(finite, volume.hu, np.float32(AIR_HU))
        volume = CTVolume(hu, volume.affine_ras, volume.source, dict(volume.metadata, non_finite_voxels=missing))
    return volume


def _require_regular_grid(affine: np.ndarray, where: str) -> None:
    """Refuse a voxel-to-world matrix that is not a regular grid in space: spacing and perpendicular axes."""
    axes = affine[:3, :3]
    if not np.isfinite(affine).all() or abs(np.linalg.det(axes)) < 1e-12:
        raise CTInputError(f"{where}: the voxel-to-world matrix is not finite or is singular; its header does not "
                           "place the voxels in space. Re-export the CT")
    spacing = np.linalg.norm(axes, axis=0)
    low, high = SPACING_RANGE_MM
    if spacing.min() < low or spacing.max() > high:
        raise CTInputError(f"{where}: voxel spacing {' x '.join(f'{s:g}' for s in spacing)} mm is not a CT's "
                           f"({low:g}-{high:g} mm); check the header's pixel spacing and slice thickness")
    shear = shear_deg(affine)
    if shear > TILT_TOLERANCE_DEG:
        raise CTInputError(f"{where}: the voxel axes are not perpendicular (sheared by {shear:.1f}°, e.g. gantry "
                           "tilt); resample it to an orthogonal grid first, e.g. with Slicer's DICOM import")


def _apply_explicit_rescale(volume: CTVolume, rescale: tuple[float, float]) -> CTVolume:
    slope, intercept = rescale
    hu = _rescale(volume.hu[None], np.array([slope]), np.array([intercept]))[0]
    metadata = dict(volume.metadata, rescale={"slope": slope, "intercept": intercept, "source": "explicit"})
    return CTVolume(hu, volume.affine_ras, volume.source, metadata)


# ---------------------------------------------------------------- DICOM


def _is_dicom_file(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def read_dicom_series(
    folder_or_files: Path | list[Path], series_uid: str | None = None, rescale: tuple[float, float] | None = None
) -> CTVolume:
    """Read one DICOM series: slices sorted along the slice normal, rescaled to HU.

    rescale: (slope, intercept) replacing the headers' RescaleSlope/RescaleIntercept.
    """
    import pydicom

    files = _dicom_candidates(folder_or_files)
    source = str(folder_or_files if isinstance(folder_or_files, Path) else folder_or_files[0])
    series = defaultdict(list)
    unreadable = []
    for file in files:
        try:
            header = pydicom.dcmread(file, stop_before_pixels=True)
        except (pydicom.errors.InvalidDicomError, OSError, EOFError, ValueError, TypeError, AttributeError) as error:
            unreadable.append(f"{file.name} ({error})")
            continue
        if "ImagePositionPatient" not in header and "PixelData" not in header and "Rows" not in header:
            continue  # DICOMDIR, structured reports, presentation states ...
        series[str(header.get("SeriesInstanceUID", "unknown"))].append((file, header))
    if not series:
        detail = f"; unreadable: {', '.join(unreadable[:3])}" if unreadable else ""
        raise CTInputError(f"{source}: no DICOM images found{detail}. Give a folder holding one CT series.")
    uid = _choose_series(series, series_uid, source)
    volume = _assemble_series(series[uid], source, rescale)
    others = [
        {"series_uid": u, "slices": len(s), "description": str(s[0][1].get("SeriesDescription", ""))}
        for u, s in series.items()
        if u != uid
    ]
    if others:
        volume.metadata["other_series"] = others
    return volume


def _dicom_candidates(folder_or_files: Path | list[Path]) -> list[Path]:
    if isinstance(folder_or_files, list):
        return folder_or_files
    files = sorted(p for p in folder_or_files.rglob("*") if p.is_file() and not p.name.startswith("."))
    files = [p for p in files if p.name.upper() != "DICOMDIR" and p.name != "SHA256SUMS"]
    if not files:
        raise CTInputError(f"{folder_or_files}: the folder is empty; give a folder holding one DICOM CT series")
    return files


def _choose_series(series: dict, series_uid: str | None, source: str) -> str:
    if series_uid is not None:
        if series_uid not in series:
            raise CTInputError(f"{source}: no series {series_uid}; found {', '.join(sorted(series))}")
        return series_uid
    modality_ok = {u: s for u, s in series.items() if str(s[0][1].get("Modality", "CT")) == "CT"}
    if not modality_ok:
        modalities = sorted({str(s[0][1].get("Modality", "?")) for s in series.values()})
        raise CTInputError(f"{source}: not a CT (modality {', '.join(modalities)}); the models need a CT series")
    return max(modality_ok, key=lambda u: len(modality_ok[u]))


def _assemble_series(items: list, source: str, rescale: tuple[float, float] | None) -> CTVolume:
    first = items[0][1]
    modality = str(first.get("Modality", ""))
    if modality and modality != "CT":
        raise CTInputError(f"{source}: not a CT (DICOM modality {modality}); the models need a CT series")
    orientation = np.asarray(first.get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0]), dtype=float)
    row_dir, col_dir = orientation[:3], orientation[3:]
    normal = np.cross(row_dir, col_dir)
    positions = np.array([_position(h, source) for _, h in items])
    order = np.argsort(positions @ normal)
    items = [items[i] for i in order]
    positions = positions[order]
    for _, header in items:
        other = np.asarray(header.get("ImageOrientationPatient", orientation), dtype=float)
        if not np.allclose(other, orientation, atol=1e-4):
            raise CTInputError(f"{source}: slices have different orientations; this is not one CT series")
    slice_step = _slice_step(positions, normal, source)
    pixel_spacing = [float(v) for v in first.get("PixelSpacing", [1.0, 1.0])]
    hu_kji, slopes, intercepts = _decode_slices([file for file, _ in items], rescale)
    affine_lps = np.eye(4)
    affine_lps[:3, 0] = row_dir * pixel_spacing[1]  # i: along a row (column index), step = column spacing
    affine_lps[:3, 1] = col_dir * pixel_spacing[0]  # j: down a column (row index), step = row spacing
    affine_lps[:3, 2] = normal * slice_step
    affine_lps[:3, 3] = positions[0]
    metadata = {
        "format": "dicom",
        "modality": modality or None,
        "series_uid": str(first.get("SeriesInstanceUID", "")),
        "series_description": str(first.get("SeriesDescription", "")),
        "study_description": str(first.get("StudyDescription", "")),
        "contrast_agent": str(first.get("ContrastBolusAgent", "")).strip() or None,
        "slice_thickness_mm": float(first.get("SliceThickness", slice_step) or slice_step),
        "rescale": {"slope": slopes[0], "intercept": intercepts[0], "source": "explicit" if rescale else "dicom"},
    }
    return CTVolume.from_kji(hu_kji, LPS_FROM_RAS @ affine_lps, source, metadata)


def _position(header, source: str) -> np.ndarray:
    if "ImagePositionPatient" not in header:
        raise CTInputError(f"{source}: a slice has no ImagePositionPatient; cannot order the slices in space")
    return np.asarray(header.ImagePositionPatient, dtype=float)


def _slice_step(positions: np.ndarray, normal: np.ndarray, source: str) -> float:
    """Distance between slices along the normal; refuses tilt, duplicates and gaps."""
    if len(positions) < 2:
        return 1.0
    steps = np.diff(positions @ normal)
    if np.any(steps < 1e-3):
        raise CTInputError(f"{source}: two slices share the same position; the folder may hold duplicated files")
    median = float(np.median(steps))
    if np.max(np.abs(steps - median)) > SLICE_SPACING_TOLERANCE * median:
        raise CTInputError(
            f"{source}: uneven slice spacing ({steps.min():.3f}–{steps.max():.3f} mm): slices are missing or the "
            "series mixes acquisitions. Re-export the complete series."
        )
    travel = positions[-1] - positions[0]
    cos_angle = abs(travel @ normal) / np.linalg.norm(travel)
    tilt_deg = float(np.degrees(np.arccos(np.clip(cos_angle, -1.0, 1.0))))
    if tilt_deg > TILT_TOLERANCE_DEG:
        raise CTInputError(
            f"{source}: gantry tilt of {tilt_deg:.1f}° (slices are sheared); resample it to an orthogonal grid "
            "first, e.g. with Slicer's DICOM import (it corrects tilt)."
        )
    return median


def _decode_slices(files: list[Path], rescale: tuple[float, float] | None) -> tuple[np.ndarray, list, list]:
    """Decode and rescale every slice straight into one (k, j, i) HU array (int16 while exact, else float32)."""
    # pydicom's note on a file that ends early (the slice then has no pixel data, refused in _decode_slice); the
    # filter outlives the pool, whose threads may still decode when an error leaves the block
    with warnings.catch_warnings(), ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        warnings.filterwarnings("ignore", "End of file reached before delimiter", UserWarning)
        decoded = pool.map(_decode_slice, files)
        hu_kji, slopes, intercepts = None, [], []
        for k, (raw, slope, intercept) in enumerate(decoded):
            slope, intercept = rescale if rescale is not None else (slope, intercept)
            hu = _rescale(raw[None], np.array([slope]), np.array([intercept]))[0]
            if hu_kji is None:
                hu_kji = np.empty((len(files), *raw.shape), dtype=hu.dtype)
            if hu.shape != hu_kji.shape[1:]:
                raise CTInputError(f"{files[k]}: slice size {hu.shape} differs from {hu_kji.shape[1:]}; not one series")
            if hu.dtype != hu_kji.dtype and hu_kji.dtype != np.float32:  # widen once, not per slice
                hu_kji = hu_kji.astype(np.float32)
            hu_kji[k] = hu
            slopes.append(slope)
            intercepts.append(intercept)
    return hu_kji, slopes, intercepts


def _decode_slice(file: Path) -> tuple[np.ndarray, float, float]:
    import pydicom

    try:
        dataset = pydicom.dcmread(file)
        pixels = dataset.pixel_array if any(key in dataset for key in PIXEL_DATA_KEYWORDS) else None
    except Exception as error:  # pixel decoders raise many types; all mean "cannot decode this slice"
        raise CTInputError(
            f"{file}: cannot decode the pixel data ({type(error).__name__}: {error}). Compressed DICOM needs "
            "`pip install pylibjpeg pylibjpeg-libjpeg` (the 'dicom' extra); a truncated file must be re-exported."
        ) from error
    if pixels is None:
        raise CTInputError(f"{file}: no pixel data: the file is cut short or holds no image; copy or export the "
                           "series again")
    return pixels, float(dataset.get("RescaleSlope", 1.0)), float(dataset.get("RescaleIntercept", 0.0))


def _rescale(raw_kji: np.ndarray, slopes: np.ndarray, intercepts: np.ndarray) -> np.ndarray:
    """HU = slope * stored + intercept, per slice; int16 when integral and in range, else float32."""
    uniform = np.all(slopes == slopes[0]) and np.all(intercepts == intercepts[0])
    integral = float(slopes[0]).is_integer() and float(intercepts[0]).is_integer()
    if uniform and integral and np.issubdtype(raw_kji.dtype, np.integer):
        ends = np.array([raw_kji.min(), raw_kji.max()], dtype=np.float64) * slopes[0] + intercepts[0]
        if ends.min() >= -32768 and ends.max() <= 32767:
            return (raw_kji.astype(np.int32) * int(slopes[0]) + int(intercepts[0])).astype(np.int16)
    slope_k = slopes.astype(np.float32).reshape(-1, 1, 1)
    intercept_k = intercepts.astype(np.float32).reshape(-1, 1, 1)
    return raw_kji.astype(np.float32) * slope_k + intercept_k
