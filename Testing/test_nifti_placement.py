"""One NIfTI placement rule for the library and 3D Slicer: hand-made headers read by `read_ct` (nibabel + the
rule in `io.reading.nifti_affine`) and by Slicer's own reader (slicer-core's volumes logic, ITK), which must put
every voxel at the same place, or both refuse the file."""

from __future__ import annotations

from pathlib import Path

import nibabel
import numpy as np
import pytest
from test_slicer_module import ctf, scene  # noqa: F401  (fixtures)

from CTFoundationLib.errors import CTInputError
from CTFoundationLib.io.reading import read_ct
from CTFoundationLib.io.sanity import check_ct

SCANNER = np.array([[-0.8, 0, 0, 100.0], [0, -0.8, 0, 120], [0, 0, 2.5, -300], [0, 0, 0, 1]])
SHIFTED = SCANNER + np.array([[0, 0, 0, 10.0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])  # 10 mm to the left
SHEARED = SCANNER + np.array([[0, 0, 0.4, 0.0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])  # x moves with k: 9°
ROTATED = np.array([[0.0, -0.8, 0, 10], [0.8, 0, 0, 20], [0, 0, 2.5, -3], [0, 0, 0, 1]])
LPS_FROM_ORIGIN = np.diag([-0.8, -0.8, 2.5, 1.0])  # no orientation: ITK's identity LPS directions, origin 0

# name: (sform, sform_code, qform, qform_code, where the voxels belong, warning code or None)
HEADERS = {
    "aligned sform, scanner qform 10 mm apart": (SCANNER, 2, SHIFTED, 1, SHIFTED, "SFORM_IGNORED"),
    "template sform, scanner qform": (SCANNER, 4, SHIFTED, 1, SHIFTED, "SFORM_IGNORED"),
    "scanner sform, scanner qform 10 mm apart": (SCANNER, 1, SHIFTED, 1, SCANNER, None),
    "nibabel's default (aligned sform, no qform), rotated": (ROTATED, 2, None, 0, ROTATED, None),
    "dcm2niix's (scanner sform = qform)": (SCANNER, 1, SCANNER, 1, SCANNER, None),
    "qform only": (None, 0, SHIFTED, 1, SHIFTED, None),
    "no sform, no qform": (None, 0, None, 0, LPS_FROM_ORIGIN, "NO_ORIENTATION"),
    "sheared scanner sform, scanner qform": (SHEARED, 1, SCANNER, 1, SCANNER, "SFORM_IGNORED"),
}


def hand_made_nifti(path: Path, sform, sform_code: int, qform, qform_code: int) -> tuple[Path, np.ndarray]:
    """A small CT-like volume (i, j, k) = (6, 7, 8) of 0.8 x 0.8 x 2.5 mm with exactly these header transforms."""
    voxels = np.random.default_rng(0).integers(-1000, 1500, (6, 7, 8)).astype(np.int16)
    header = nibabel.Nifti1Header()
    header.set_data_shape(voxels.shape)
    header.set_data_dtype(np.int16)
    header.set_zooms((0.8, 0.8, 2.5))
    header.set_sform(sform, code=sform_code)
    header.set_qform(qform, code=qform_code)
    nibabel.save(nibabel.Nifti1Image(voxels, None, header), str(path))
    saved = nibabel.load(str(path)).header
    assert (int(saved["sform_code"]), int(saved["qform_code"])) == (sform_code, qform_code)
    return path, voxels


def slicer_placement(slicer, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """IJK-to-RAS and (i, j, k) voxels of the file as Slicer's reader loads it."""
    node = slicer.util.loadVolume(str(path))
    return slicer.util.arrayFromVTKMatrix(node_ijk_to_ras(node)), slicer.util.arrayFromVolume(node).transpose(2, 1, 0)


def node_ijk_to_ras(node):
    import vtk

    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return matrix


@pytest.mark.parametrize("name", list(HEADERS))
def test_the_library_places_a_nifti_where_slicer_does(ctf, scene, tmp_path, name) -> None:  # noqa: F811
    sform, sform_code, qform, qform_code, expected, warning = HEADERS[name]
    path, voxels = hand_made_nifti(tmp_path / "ct.nii", sform, sform_code, qform, qform_code)

    volume = read_ct(path)
    slicer_affine, slicer_voxels = slicer_placement(scene, path)

    np.testing.assert_allclose(slicer_affine, expected, atol=1e-4)  # Slicer's rule, as the table says
    np.testing.assert_allclose(volume.affine_ras, slicer_affine, atol=1e-4)  # the library agrees with it
    assert np.array_equal(volume.hu, voxels) and np.array_equal(slicer_voxels, voxels)
    node_volume = ctf.ctVolumeFromNode(scene.util.getNode("ct"))  # what the module sends to the models
    np.testing.assert_allclose(node_volume.affine_ras, volume.affine_ras, atol=1e-4)
    codes = {w.code for w in check_ct(volume)} & {"SFORM_IGNORED", "NO_ORIENTATION"}
    assert codes == ({warning} if warning else set())


def test_the_ignored_sform_is_reported_with_its_distance(tmp_path) -> None:
    path, _ = hand_made_nifti(tmp_path / "ct.nii", SCANNER, 2, SHIFTED, 1)
    volume = read_ct(path)
    assert volume.metadata == {"format": "nifti", "sform_ignored_mm": 10.0}
    message = next(w.message for w in check_ct(volume) if w.code == "SFORM_IGNORED")
    assert "up to 10 mm apart; the qform was used" in message


def test_a_sheared_sform_without_qform_is_refused_by_both(ctf, scene, tmp_path) -> None:  # noqa: F811
    path, _ = hand_made_nifti(tmp_path / "sheared.nii", SHEARED, 1, None, 0)
    with pytest.raises(CTInputError, match="sheared.nii: the voxel axes are not perpendicular"):
        read_ct(path)
    with pytest.raises(RuntimeError, match="Failed to load"):
        scene.util.loadVolume(str(path))
