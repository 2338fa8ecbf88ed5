"""Anatomy masks: the built-in fallback on the real RICORD scan, and mask plumbing on the real TotalSegmentator
crops (label maps, mask folders, RadGenome folders, resampling into other geometries, NIfTI output)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import scipy.ndimage as ndi
from nibabel.processing import resample_from_to

from CTFoundationLib.anatomy.fallback import fallback_anatomy
from CTFoundationLib.anatomy.masks import (
    REGIONS,
    AnatomyRequest,
    build_anatomy,
    from_label_map,
    from_mask_folder,
    from_radgenome,
    lookup_anatomy,
    totalsegmentator_classes,
)
from CTFoundationLib.errors import AnatomyError
from CTFoundationLib.io.reading import read_ct
from CTFoundationLib.io.volume import CTVolume
from CTFoundationLib.vocab import FVLM_ORGANS

RICORD_15 = "ricord1a_419639-000082_chest_noncontrast/ct_1p5mm_iso.nii.gz"
AORTA = "totalseg_chest_crop_aorta"
PULMONARY = "totalseg_chest_crop_pulmonary"


@pytest.fixture(scope="module")
def ricord(ct_dir) -> CTVolume:
    return read_ct(ct_dir / RICORD_15)


@pytest.fixture(scope="module")
def fallback(ricord):
    return fallback_anatomy(ricord)


def world_centroid(path: Path) -> np.ndarray:
    """Centre of a mask file's voxels in RAS mm, straight from nibabel."""
    image = nib.load(str(path))
    ijk = np.argwhere(np.asanyarray(image.dataobj) > 0)
    return nib.affines.apply_affine(image.affine, ijk).mean(axis=0)


def test_fallback_lungs_are_plausible_and_on_the_right_sides(fallback):
    left, right = fallback.volume_ml("lung_left"), fallback.volume_ml("lung_right")
    assert 2500 < left + right < 8000, (left, right)  # litres of an adult's aerated lungs at inspiration
    assert 0.3 < left / (left + right) < 0.5  # the left lung is the smaller one (cardiac notch)
    x_left, x_right = fallback.centroid_ras("lung_left")[0], fallback.centroid_ras("lung_right")[0]
    body_x = fallback.centroid_ras("body")[0]
    assert x_left < body_x - 40 and x_right > body_x + 40  # RAS: +x is the patient's right
    assert not (fallback.mask("lung_left") & fallback.mask("lung_right")).any()


def test_fallback_airway_is_a_midline_tube_joined_to_both_lungs(fallback):
    assert 10 < fallback.volume_ml("airway") < 150
    airway = fallback.mask("airway")
    assert abs(fallback.centroid_ras("airway")[0] - fallback.centroid_ras("body")[0]) < 30
    assert fallback.centroid_ras("airway")[2] > fallback.centroid_ras("lung_right")[2]  # above the lung centres
    touching = ndi.binary_dilation(airway)
    assert (touching & fallback.mask("lung_left")).sum() > 50 and (touching & fallback.mask("lung_right")).sum() > 50
    assert not (airway & (fallback.mask("lung_left") | fallback.mask("lung_right"))).any()


def test_fallback_body_bone_and_what_it_cannot_make(fallback, ricord):
    assert 10_000 < fallback.volume_ml("body") < 60_000
    bone, body = fallback.mask("bone"), fallback.mask("body")
    assert 200 < fallback.volume_ml("bone") < 3000 and not (bone & ~body).any()
    assert np.median(ricord.hu[bone]) > 150
    summary = fallback.summary()
    assert summary["segments"]["lung_left"]["fvlm_organ"] == "lung"
    assert "heart" not in fallback.segments and "aorta" not in fallback.segments


def test_fallback_does_not_depend_on_voxel_order(ricord, fallback):
    flipped = ricord.reoriented("RAS")  # i and j reversed, the same patient
    again = fallback_anatomy(flipped)
    for name in ("lung_left", "lung_right", "airway"):
        assert again.volume_ml(name) == pytest.approx(fallback.volume_ml(name), rel=0.02)
        np.testing.assert_allclose(again.centroid_ras(name), fallback.centroid_ras(name), atol=1.5)


def test_mask_folder_resampled_into_another_crop_keeps_world_position(ct_dir, tmp_path):
    folder = tmp_path / "masks"
    folder.mkdir()
    (folder / "aorta_mask.nii.gz").symlink_to(ct_dir / AORTA / "aorta_mask.nii.gz")
    (folder / "pulmonary_artery_mask.nii.gz").symlink_to(ct_dir / PULMONARY / "pulmonary_artery_mask.nii.gz")
    target = read_ct(ct_dir / PULMONARY / "ct.nii.gz")  # same patient, other z range and shape
    anatomy = from_mask_folder(folder, target)
    assert anatomy.segments["aorta"].info.fvlm_organ == "aorta"
    assert anatomy.segments["pulmonary_artery"].info.region == "mediastinum"
    assert anatomy.segments["pulmonary_artery"].voxels == 14_261  # same grid: taken as is
    # the aorta crop's grid is the pulmonary crop's shifted by 24 slices: the part inside it must be identical
    source = nib.load(str(ct_dir / AORTA / "aorta_mask.nii.gz"))
    ijk = np.argwhere(np.asanyarray(source.dataobj) > 0)
    world = nib.affines.apply_affine(source.affine, ijk)
    inside = nib.affines.apply_affine(np.linalg.inv(target.affine_ras), world).round().astype(int)
    keep = ((inside >= 0) & (inside < target.shape_ijk)).all(axis=1)
    assert anatomy.segments["aorta"].voxels == keep.sum() > 10_000
    np.testing.assert_allclose(anatomy.centroid_ras("aorta"), world[keep].mean(axis=0), atol=1e-6)
    assert anatomy.fvlm_labels(FVLM_ORGANS)[anatomy.mask("aorta")].tolist() == [4] * keep.sum()


def test_mask_resampled_into_a_rotated_finer_copy_of_the_ct(ct_dir, tmp_path):
    ct = nib.load(str(ct_dir / AORTA / "ct.nii.gz"))
    angle = np.deg2rad(12)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([1.2, 1.0, 2.0])  # RAS-ish, other spacing, rotated about z
    centre = nib.affines.apply_affine(ct.affine, np.array(ct.shape) / 2)
    shape = (170, 200, 130)
    affine[:3, 3] = centre - affine[:3, :3] @ (np.array(shape) / 2)
    resampled = resample_from_to(ct, (shape, affine), order=1, cval=-1024)
    volume = CTVolume(np.asarray(resampled.dataobj).astype(np.int16), affine, "resampled aorta crop")
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "aorta.nii.gz").symlink_to(ct_dir / AORTA / "aorta_mask.nii.gz")
    anatomy = from_mask_folder(folder, volume)
    assert anatomy.volume_ml("aorta") == pytest.approx(72_810 * 1.5**3 / 1000, rel=0.03)
    np.testing.assert_allclose(anatomy.centroid_ras("aorta"), world_centroid(folder / "aorta.nii.gz"), atol=1.0)
    # the aorta's HU in the resampled CT is blood (non-contrast or contrast), not air or bone
    assert 0 < np.median(volume.hu[anatomy.mask("aorta")]) < 500


def test_label_map_with_totalsegmentator_ids_and_nifti_output(ct_dir, tmp_path):
    pulmonary = nib.load(str(ct_dir / PULMONARY / "pulmonary_artery_mask.nii.gz"))
    aorta_on_grid = resample_from_to(nib.load(str(ct_dir / AORTA / "aorta_mask.nii.gz")), pulmonary, order=0)
    ids = {name: i for i, name in totalsegmentator_classes("total_v1").items()}
    labels = np.zeros(pulmonary.shape, np.uint8)
    labels[np.asanyarray(aorta_on_grid.dataobj) > 0] = ids["aorta"]
    labels[np.asanyarray(pulmonary.dataobj) > 0] = ids["pulmonary_artery"]
    nib.save(nib.Nifti1Image(labels, pulmonary.affine), str(tmp_path / "seg.nii.gz"))
    volume = read_ct(ct_dir / PULMONARY / "ct.nii.gz")
    anatomy = from_label_map(tmp_path / "seg.nii.gz", volume, scheme="total_v1")
    assert set(anatomy.segments) == {"aorta", "pulmonary_artery"}
    assert anatomy.segments["pulmonary_artery"].voxels == int((labels == ids["pulmonary_artery"]).sum())
    written = anatomy.save_nifti(tmp_path / "out")
    saved = nib.load(str(written["aorta"]))
    np.testing.assert_allclose(saved.affine, volume.affine_ras)
    assert int(np.asanyarray(saved.dataobj).sum()) == anatomy.segments["aorta"].voxels
    v2 = from_label_map(tmp_path / "seg.nii.gz", volume)  # the same ids read as TotalSegmentator v2 classes
    assert "aorta" not in v2.segments and lookup_anatomy(totalsegmentator_classes()[7]).name == "pancreas"


def test_radgenome_folders_leaf_first_region_as_fallback(ct_dir, tmp_path):
    leaves, regions = tmp_path / "seg_train_1_a_1", tmp_path / "regions" / "seg_train_1_a_1"
    leaves.mkdir()
    regions.mkdir(parents=True)
    (leaves / "aorta.nii.gz").symlink_to(ct_dir / AORTA / "aorta_mask.nii.gz")
    # any real mask serves for the plumbing: region files named by region
    (regions / "mediastinum.nii.gz").symlink_to(ct_dir / PULMONARY / "pulmonary_artery_mask.nii.gz")
    (regions / "trachea and bronchie.nii.gz").symlink_to(ct_dir / PULMONARY / "pulmonary_artery_mask.nii.gz")
    volume = read_ct(ct_dir / PULMONARY / "ct.nii.gz")
    anatomy = from_radgenome(leaves, volume, regions)
    assert set(anatomy.segments) == {"aorta", "trachea_and_bronchie"}  # mediastinum: the aorta leaf covers it
    assert anatomy.segments["trachea_and_bronchie"].info.region == "trachea and bronchie"


def test_bad_segmentations_say_what_is_wrong(ct_dir, tmp_path):
    volume = read_ct(ct_dir / PULMONARY / "ct.nii.gz")
    with pytest.raises(AnatomyError, match="negative labels; is this a CT image"):
        from_label_map(ct_dir / AORTA / "ct.nii.gz", volume)
    far = nib.load(str(ct_dir / AORTA / "aorta_mask.nii.gz"))
    moved = far.affine.copy()
    moved[2, 3] += 2000  # two metres away
    nib.save(nib.Nifti1Image(np.asanyarray(far.dataobj), moved), str(tmp_path / "far.nii.gz"))
    with pytest.raises(AnatomyError, match="another scan"):
        from_label_map(tmp_path / "far.nii.gz", volume)
    (tmp_path / "empty").mkdir()
    with pytest.raises(AnatomyError, match="no .nii"):
        from_mask_folder(tmp_path / "empty", volume)
    (tmp_path / "broken.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(AnatomyError, match="broken.nii.gz: cannot read"):
        from_label_map(tmp_path / "broken.nii.gz", volume)


def test_build_anatomy_prefers_the_given_segmentation_and_reports_the_rest(ct_dir, tmp_path, ricord, fallback):
    volume = read_ct(ct_dir / PULMONARY / "ct.nii.gz")
    request = AnatomyRequest(segmentation=ct_dir / PULMONARY / "pulmonary_artery_mask.nii.gz", label_scheme="total_v1")
    given = build_anatomy(volume, request, FVLM_ORGANS)
    assert list(given.segments) == ["pulmonary_artery"]  # a binary mask named after its anatomy
    assert set(given.unavailable) >= {"fvlm:lung", "fvlm:heart", "region:lung"}
    built = build_anatomy(ricord, AnatomyRequest(), FVLM_ORGANS)  # no segmentation, no TotalSegmentator here
    assert set(built.segments) == set(fallback.segments)
    assert any("TotalSegmentator: not installed" in note for note in built.notes)
    assert "built-in HU-threshold" in built.unavailable["fvlm:heart"] and "fvlm:lung" not in built.unavailable
    assert set(REGIONS) - {"lung", "bone", "trachea and bronchie"} == {
        key.removeprefix("region:") for key in built.unavailable if key.startswith("region:")}


def test_device_names_as_totalsegmentator_takes_them():
    from CTFoundationLib.anatomy.totalseg import totalsegmentator_device

    assert [totalsegmentator_device(d) for d in ("auto", "cuda", "cuda:1", "cpu", "mps")] == \
        ["gpu", "gpu", "gpu:1", "cpu", "mps"]


def test_missing_radgenome_folder_is_named(tmp_path):
    from CTFoundationLib.anatomy.masks import nifti_files
    from CTFoundationLib.errors import AnatomyError

    with pytest.raises(AnatomyError, match="no such folder"):
        nifti_files(tmp_path / "nowhere")
