"""Key images of the batch report on real CTs: windows, display orientation, aspect ratio, overlays, points."""

from __future__ import annotations

import io

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from CTFoundationLib.io.reading import read_ct
from CTFoundationLib.io.volume import CTVolume
from CTFoundationLib.report import CHEST_WINDOW, LUNG_WINDOW, MarkedPoint, Overlay, key_images

RICORD_3MM = "ricord1a_419639-000082_chest_noncontrast/ct_3mm_iso.nii.gz"
AORTA = "totalseg_chest_crop_aorta"


def pixels(image) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(image.png)))


@pytest.fixture(scope="module")
def ricord(ct_dir) -> CTVolume:
    return read_ct(ct_dir / RICORD_3MM)


def test_windows_map_hu_onto_grey_levels():
    # W400/L40 shows -160..240 HU, W1500/L-600 shows -1350..150 HU
    assert CHEST_WINDOW.to_uint8(np.array([-1000.0, -160.0, 140.0, 240.0, 3000.0])).tolist() == [0, 0, 191, 255, 255]
    assert LUNG_WINDOW.to_uint8(np.array([-2000.0, -1350.0, -975.0, 150.0, 400.0])).tolist() == [0, 0, 64, 255, 255]


def with_rods(volume: CTVolume) -> CTVolume:
    """The RICORD volume (stored L, P, S) with three 2000 HU rods, 30 mm off the centre planes:
    along S-I at patient left + anterior, along A-P at left + superior, along L-R at anterior + superior."""
    assert volume.orientation_code == "LPS"
    hu = volume.hu.copy()
    ci, cj, ck = (n // 2 for n in hu.shape)
    left, anterior, superior = slice(ci + 9, ci + 12), slice(cj - 12, cj - 9), slice(ck + 9, ck + 12)
    hu[left, anterior, :] = 2000
    hu[left, :, superior] = 2000
    hu[:, anterior, superior] = 2000
    return CTVolume(hu, volume.affine_ras, volume.source)


def test_planes_are_shown_in_radiological_orientation(ricord):
    """Where each rod appears tells which anatomical direction each image edge shows."""
    expected_quadrant = {"axial": ("right", "top"), "coronal": ("right", "top"), "sagittal": ("left", "top")}
    plain = {(k.plane, k.window): pixels(k) for k in key_images(ricord)}
    for image in key_images(with_rods(ricord)):
        changed = np.argwhere(pixels(image).astype(int) != plain[image.plane, image.window])
        assert len(changed) > 20, image.describe()
        row, col = changed.mean(axis=0)
        side = "right" if col > image.width / 2 else "left"
        level = "top" if row < image.height / 2 else "bottom"
        assert (side, level) == expected_quadrant[image.plane], image.describe()
    edges = {k.plane: k.edges for k in key_images(ricord)}
    assert edges == {"axial": ("A", "P", "R", "L"), "coronal": ("S", "I", "R", "L"), "sagittal": ("S", "I", "A", "P")}


def test_images_do_not_depend_on_the_voxel_storage_order(ricord):
    reference = [k.png for k in key_images(ricord)]
    for codes in ("RAS", "AIR", "SPL"):
        restored = ricord.reoriented(codes)
        assert restored.orientation_code == codes
        assert [k.png for k in key_images(restored)] == reference, codes


def test_aspect_ratio_follows_the_voxel_spacing(ricord):
    """Every second slice kept (3 x 3 x 6 mm voxels): images keep the physical proportions, not the voxel counts."""
    affine = ricord.affine_ras.copy()
    affine[:3, 2] *= 2
    thick = CTVolume(ricord.hu[:, :, ::2], affine)
    width_mm, depth_mm, height_mm = thick.extent_mm()  # L-R, A-P, S-I (stored L, P, S)
    sizes = {k.plane: (k.width, k.height) for k in key_images(thick, size_px=300)}
    scale = 300 / max(width_mm, height_mm)
    assert sizes["coronal"] == (round(width_mm * scale), round(height_mm * scale))
    assert sizes["axial"] == (300, round(depth_mm * 300 / width_mm))
    assert abs(sizes["coronal"][1] / sizes["coronal"][0] - height_mm / width_mm) < 0.01
    assert thick.shape_ijk[2] / thick.shape_ijk[0] < 0.5 < height_mm / width_mm  # voxel counts would mislead


def test_images_are_non_blank_and_positions_are_the_volume_centre(ricord):
    images = key_images(ricord)
    assert [(k.plane, k.window) for k in images] == [
        (plane, window) for plane in ("axial", "coronal", "sagittal") for window in ("chest", "lung")
    ]
    centre_ras = ricord.reoriented("LPI").affine_ras @ np.array([*(n // 2 for n in ricord.shape_ijk), 1.0])
    for image in images:
        grey = pixels(image)
        assert grey.shape == (image.height, image.width) and grey.std() > 20
        assert image.position_mm == pytest.approx(centre_ras["xyz".index(image.world_axis)])


def test_overlay_is_tinted_and_point_is_circled_on_the_aorta_crop(ct_dir):
    volume = read_ct(ct_dir / AORTA / "ct.nii.gz")
    mask = np.asarray(nib.load(ct_dir / AORTA / "aorta_mask.nii.gz").dataobj) > 0
    assert mask.shape == volume.hu.shape
    voxels = np.argwhere(mask)
    inside = voxels[len(voxels) // 2]
    ras = tuple(volume.affine_ras @ np.array([*inside, 1.0]))[:3]
    images = key_images(volume, points=[MarkedPoint("aorta", ras)], overlays=[Overlay("aorta", mask)])
    assert len(images) == 12 and {k.through for k in images} == {"volume centre", "aorta"}
    for image in (k for k in images if k.through == "aorta" and k.window == "chest"):
        assert image.position_mm == pytest.approx(ras["xyz".index(image.world_axis)])
        rgb = pixels(image).astype(int)
        red = (rgb[..., 0] - rgb[..., 1] > 40) & (rgb[..., 0] - rgb[..., 2] > 40)
        yellow = (rgb[..., 0] > 200) & (rgb[..., 1] > 170) & (rgb[..., 2] < 90)
        assert red.sum() > 100 and yellow.sum() > 20, image.describe()
        circle_row, circle_col = np.argwhere(yellow).mean(axis=0).round().astype(int)
        near = red[circle_row - 4 : circle_row + 5, circle_col - 4 : circle_col + 5]
        assert near.any(), f"{image.plane}: the circled point is not on the aorta overlay"


def test_bad_points_and_masks_are_refused(ricord):
    with pytest.raises(ValueError, match="outside the CT volume"):
        key_images(ricord, points=[MarkedPoint("far", (5000.0, 0.0, 0.0))])
    with pytest.raises(ValueError, match="mask shape"):
        key_images(ricord, overlays=[Overlay("wrong", np.zeros((3, 3, 3), bool))])
