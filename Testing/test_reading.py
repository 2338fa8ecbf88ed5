"""CT input: readers on the real shared CTs, the sanity warnings, and a clear error for every bad input."""

from __future__ import annotations

import gzip
import shutil
import warnings
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pydicom
import pytest

from CTFoundationLib.errors import CTInputError
from CTFoundationLib.io.reading import read_ct
from CTFoundationLib.io.sanity import check_ct
from CTFoundationLib.io.volume import CTVolume

RICORD = "ricord1a_419639-000082_chest_noncontrast"


def codes(volume: CTVolume) -> set[str]:
    return {w.code for w in check_ct(volume)}


def test_ricord_dicom_series_geometry_and_hu(ct_dir):
    volume = read_ct(ct_dir / RICORD / "dicom")
    assert volume.shape_ijk == (512, 512, 255)
    np.testing.assert_allclose(volume.spacing_ijk_mm, (0.703125, 0.703125, 1.25), atol=1e-4)
    assert volume.orientation_code == "LPS"
    assert volume.metadata["modality"] == "CT" and volume.metadata["contrast_agent"] is None
    assert volume.metadata["rescale"] == {"slope": 1.0, "intercept": -1024.0, "source": "dicom"}
    # -3024 outside the reconstruction circle, air about -1000, bone well above 1000
    assert volume.hu.min() == -3024 and volume.hu.max() > 1000
    assert np.mean((volume.hu > -1100) & (volume.hu < -900)) > 0.1  # air around the patient and in the lungs
    assert codes(volume) == set()


def test_slices_are_sorted_along_the_normal(ct_dir, tmp_path):
    """Shuffled file names give the same volume: order comes from ImagePositionPatient."""
    source = sorted((ct_dir / RICORD / "dicom").glob("*.dcm"))[100:110]
    for index, file in enumerate(reversed(source)):
        shutil.copy(file, tmp_path / f"{index:03d}.dcm")
    reversed_copy = read_ct(tmp_path)
    for index, file in enumerate(source):
        shutil.copy(file, tmp_path / f"{index:03d}.dcm")
    in_order = read_ct(tmp_path)
    np.testing.assert_array_equal(reversed_copy.hu, in_order.hu)
    np.testing.assert_allclose(reversed_copy.affine_ras, in_order.affine_ras)
    assert in_order.shape_ijk == (512, 512, 10)


def test_small_dicom_set_and_rescale(ct_dir):
    volume = read_ct(ct_dir / "dcmqi_ct_3slice")
    assert volume.shape_ijk == (512, 512, 3)
    np.testing.assert_allclose(volume.spacing_ijk_mm[2], 1.0, atol=1e-3)
    raw = pydicom.dcmread(sorted((ct_dir / "dcmqi_ct_3slice").glob("*.dcm"))[0])
    slope, intercept = float(raw.RescaleSlope), float(raw.RescaleIntercept)
    # the slice with the lowest position along the normal is k = 0
    first = min(
        (pydicom.dcmread(p) for p in (ct_dir / "dcmqi_ct_3slice").glob("*.dcm")),
        key=lambda d: float(np.dot(d.ImagePositionPatient,
                                   np.cross(d.ImageOrientationPatient[:3], d.ImageOrientationPatient[3:]))),
    )
    np.testing.assert_array_equal(volume.hu[:, :, 0].T, first.pixel_array * slope + intercept)
    assert "SHORT_COVERAGE" in codes(volume)


@pytest.mark.parametrize(
    "name, shape, spacing, orientation",
    [
        ("totalseg_chest_crop_pulmonary/ct.nii.gz", (122, 102, 112), 1.5, "LPS"),
        ("totalseg_chest_crop_aorta/ct.nii.gz", (120, 126, 164), 1.5, "LPS"),
        ("totalseg_abdomen_control/ct.nii.gz", (122, 101, 112), 3.0, "RAS"),
        (f"{RICORD}/ct_3mm_iso.nii.gz", (120, 120, 106), 3.0, "LPS"),
    ],
)
def test_nifti_geometry(ct_dir, name, shape, spacing, orientation):
    volume = read_ct(ct_dir / name)
    assert volume.shape_ijk == shape and volume.orientation_code == orientation
    np.testing.assert_allclose(volume.spacing_ijk_mm, (spacing,) * 3)
    assert volume.hu.dtype == np.int16


def test_chest_crops_are_not_flagged_and_the_abdomen_is(ct_dir):
    for name in ("totalseg_chest_crop_pulmonary", "totalseg_chest_crop_aorta"):
        assert "NOT_CHEST" not in codes(read_ct(ct_dir / name / "ct.nii.gz"))
    assert codes(read_ct(ct_dir / "totalseg_abdomen_control" / "ct.nii.gz")) == {"NOT_CHEST"}


def test_nrrd_reads_like_the_nifti(ct_dir, tmp_path):
    nifti = read_ct(ct_dir / RICORD / "ct_3mm_iso.nii.gz")
    lps = nifti.affine_lps
    header = {"space": "left-posterior-superior", "space directions": lps[:3, :3].T, "space origin": lps[:3, 3]}
    nrrd.write(str(tmp_path / "ct.nrrd"), nifti.hu, header)
    copy = read_ct(tmp_path / "ct.nrrd")
    np.testing.assert_array_equal(copy.hu, nifti.hu)
    np.testing.assert_allclose(copy.affine_ras, nifti.affine_ras, atol=1e-6)


def _save_nifti(volume: CTVolume, values: np.ndarray, path: Path) -> Path:
    nib.save(nib.Nifti1Image(values, volume.affine_ras), path)
    return path


@pytest.fixture(scope="module")
def ricord_3mm(ct_dir) -> CTVolume:
    return read_ct(ct_dir / RICORD / "ct_3mm_iso.nii.gz")


def test_raw_stored_values_are_flagged_and_explicit_rescale_fixes_them(ricord_3mm, tmp_path):
    raw = np.clip(ricord_3mm.hu.astype(np.int32) + 1024, 0, None).astype(np.uint16)
    path = _save_nifti(ricord_3mm, raw, tmp_path / "raw.nii.gz")
    assert codes(read_ct(path)) == {"HU_RAW"}
    fixed = read_ct(path, rescale=(1.0, -1024.0))
    assert codes(fixed) == set()
    np.testing.assert_array_equal(fixed.hu, np.clip(ricord_3mm.hu, -1024, None))
    assert fixed.metadata["rescale"]["source"] == "explicit"


def test_explicit_rescale_replaces_the_nifti_header_scaling(ricord_3mm, tmp_path):
    raw = np.clip(ricord_3mm.hu.astype(np.int32) + 1024, 0, None).astype(np.uint16)
    image = nib.Nifti1Image(raw, ricord_3mm.affine_ras)
    image.header.set_slope_inter(1.0, -1000.0)  # a wrong header scaling the explicit rescale must replace
    nib.save(image, tmp_path / "scaled.nii.gz")
    fixed = read_ct(tmp_path / "scaled.nii.gz", rescale=(1.0, -1024.0))
    np.testing.assert_array_equal(fixed.hu, np.clip(ricord_3mm.hu, -1024, None))


def test_rescale_applied_twice_is_flagged(ricord_3mm, tmp_path):
    path = _save_nifti(ricord_3mm, (ricord_3mm.hu.astype(np.int32) - 1024).astype(np.int16), tmp_path / "twice.nii.gz")
    assert codes(read_ct(path)) == {"HU_SHIFTED"}


def test_thick_slices_are_flagged(ricord_3mm, tmp_path):
    affine = ricord_3mm.affine_ras @ np.diag([1.0, 1.0, 2.0, 1.0])
    path = tmp_path / "thick.nii.gz"
    nib.save(nib.Nifti1Image(ricord_3mm.hu[:, :, ::2], affine), path)
    assert codes(read_ct(path)) == {"THICK_SLICES"}


def _copy_dicom(ct_dir: Path, folder: Path, edit=None, files=slice(100, 106)) -> Path:
    folder.mkdir()
    for index, file in enumerate(sorted((ct_dir / RICORD / "dicom").glob("*.dcm"))[files]):
        dataset = pydicom.dcmread(file)
        if edit:
            edit(index, dataset)
        dataset.save_as(folder / file.name)
    return folder


def test_contrast_agent_in_dicom_is_flagged(ct_dir, tmp_path):
    def add_contrast(_, dataset):
        dataset.ContrastBolusAgent = "IOPAMIDOL"

    volume = read_ct(_copy_dicom(ct_dir, tmp_path / "contrast", add_contrast))
    assert "CONTRAST" in codes(volume)
    assert "IOPAMIDOL" in next(w.message for w in check_ct(volume) if w.code == "CONTRAST")


def test_mr_is_refused(ct_dir, tmp_path):
    def make_mr(_, dataset):
        dataset.Modality = "MR"

    with pytest.raises(CTInputError, match="not a CT.*MR"):
        read_ct(_copy_dicom(ct_dir, tmp_path / "mr", make_mr))


def test_gantry_tilt_is_refused(ct_dir, tmp_path):
    def shear(index, dataset):
        x, y, z = (float(v) for v in dataset.ImagePositionPatient)
        dataset.ImagePositionPatient = [x, y + 0.3 * index * 1.25, z]

    with pytest.raises(CTInputError, match="gantry tilt"):
        read_ct(_copy_dicom(ct_dir, tmp_path / "tilt", shear))


def test_missing_slice_is_refused(ct_dir, tmp_path):
    folder = _copy_dicom(ct_dir, tmp_path / "gap")
    sorted(folder.glob("*.dcm"))[3].unlink()
    with pytest.raises(CTInputError, match="uneven slice spacing"):
        read_ct(folder)


def test_several_series_pick_the_largest_or_the_named_one(ct_dir, tmp_path):
    folder = _copy_dicom(ct_dir, tmp_path / "mixed")
    for file in (ct_dir / "dcmqi_ct_3slice").glob("*.dcm"):
        shutil.copy(file, folder / f"other_{file.name}")
    chosen = read_ct(folder)
    assert chosen.shape_ijk[2] == 6 and "OTHER_SERIES" in codes(chosen)
    other_uid = chosen.metadata["other_series"][0]["series_uid"]
    assert read_ct(folder, series_uid=other_uid).shape_ijk[2] == 3
    with pytest.raises(CTInputError, match="no series 1.2.3"):
        read_ct(folder, series_uid="1.2.3")


def test_two_dimensional_image_is_refused(ct_dir):
    with pytest.raises(CTInputError, match="2-D image"):
        read_ct(ct_dir / "lidc_single_slice" / "lidc_slice.dcm")


def test_truncated_nifti_is_refused(ct_dir, tmp_path):
    data = (ct_dir / RICORD / "ct_3mm_iso.nii.gz").read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(CTInputError, match="cut.nii.gz: cannot read this NIfTI file.*truncated or corrupt"):
        read_ct(tmp_path / "cut.nii.gz")


def test_corrupt_dicom_pixels_are_refused(ct_dir, tmp_path):
    folder = _copy_dicom(ct_dir, tmp_path / "corrupt")
    victim = sorted(folder.glob("*.dcm"))[2]
    victim.write_bytes(victim.read_bytes()[:-20000])
    with warnings.catch_warnings(record=True) as caught, pytest.raises(CTInputError) as refused:
        warnings.simplefilter("always")
        read_ct(folder)
    assert str(refused.value).startswith(f"{victim}: no pixel data: the file is cut short")
    assert not [str(w.message) for w in caught]  # the one line only, not pydicom's note beside it


def test_empty_folder_and_missing_path_and_unknown_type(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CTInputError, match="folder is empty"):
        read_ct(tmp_path / "empty")
    with pytest.raises(CTInputError, match="no such file"):
        read_ct(tmp_path / "nothing.nii.gz")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CTInputError, match="unknown file type"):
        read_ct(tmp_path / "notes.txt")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.dcm").write_bytes(gzip.compress(b"not dicom"))
    with pytest.raises(CTInputError, match="no DICOM images found"):
        read_ct(tmp_path / "junk")


def test_slicer_style_array_is_wrapped_without_copy(ricord_3mm):
    array_kji = np.ascontiguousarray(ricord_3mm.hu.transpose(2, 1, 0))
    volume = CTVolume.from_kji(array_kji, ricord_3mm.affine_ras)
    assert np.shares_memory(volume.hu, array_kji)
    np.testing.assert_array_equal(volume.hu, ricord_3mm.hu)
