"""What only real MRML reaches (slicer-core, Testing/slicer_core_app.py): the module's segment codes against
Slicer's own terminology lists, a user's segmentation with Slicer's segment ids, an empty segment, a segment stored
on another grid and clashing names, nested and non-linear transforms above the CT, and a scene with results
saved to .mrb and read back."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel
import numpy as np
import pytest
from test_slicer_module import RICORD, ctf, scene  # noqa: F401  (fixtures)

from CTFoundationLib.errors import CTInputError
from CTFoundationLib.inference.results import DetectionResult, Finding

REPO = Path(__file__).resolve().parents[1]
AORTA = "totalseg_chest_crop_aorta"


# --- terminology ------------------------------------------------------------------------------------------


def terminology_match(logic, serialized: str):
    """(type meaning, modifier meaning or None) of a serialised entry as Slicer's loaded lists define it, or None
    when its category, type or modifier code is not in the terminology the entry names."""
    import slicer

    entry = slicer.vtkSlicerTerminologyEntry()
    assert logic.DeserializeTerminologyEntry(serialized, entry)
    name, wanted = entry.GetTerminologyContextName(), entry.GetTypeObject()
    category = slicer.vtkSlicerTerminologyCategory()
    for index in range(logic.GetNumberOfCategoriesInTerminology(name)):
        logic.GetNthCategoryInTerminology(name, index, category)
        if same_code(category, entry.GetCategoryObject()):
            break
    else:
        return None
    candidate = slicer.vtkSlicerTerminologyType()
    for index in range(logic.GetNumberOfTypesInTerminologyCategory(name, category)):
        logic.GetNthTypeInTerminologyCategory(name, category, index, candidate)
        if same_code(candidate, wanted):
            break
    else:
        return None
    modifier = entry.GetTypeModifierObject()
    if not modifier.GetCodeValue():
        return candidate.GetCodeMeaning(), None
    found = slicer.vtkSlicerTerminologyType()
    for index in range(logic.GetNumberOfTypeModifiersInTerminologyType(name, category, candidate)):
        logic.GetNthTypeModifierInTerminologyType(name, category, candidate, index, found)
        if same_code(found, modifier):
            return candidate.GetCodeMeaning(), found.GetCodeMeaning()
    return None


def same_code(a, b) -> bool:
    return (a.GetCodingSchemeDesignator(), a.GetCodeValue()) == (b.GetCodingSchemeDesignator(), b.GetCodeValue())


def test_segment_codes_are_in_slicers_terminology_lists(ctf, scene) -> None:  # noqa: F811
    """Every coded segment name is a type (and laterality modifier) of Slicer's DICOM master list, with its meaning."""
    from CTFoundationMRML import anatomy

    logic = scene.modules.terminologies.logic()
    assert logic.GetNumberOfCategoriesInTerminology(anatomy.TERMINOLOGY_CONTEXT) >= 8
    types = anatomy.terminologyTypes(REPO / "Resources")
    assert len(types) >= 15
    for name, (code, meaning, laterality) in types.items():
        serialized = anatomy.terminologyEntry(name, REPO / "Resources")
        assert terminology_match(logic, serialized) == (meaning, laterality and laterality.capitalize()), name
    lung = anatomy.terminologyEntry("lung_left", REPO / "Resources")
    assert terminology_match(logic, lung.replace("^39607008^", "^39607009^")) is None  # a wrong code is caught
    assert terminology_match(logic, lung.replace("^7771000^Left", "^66459002^Unilateral")) is None


# --- a user's segmentation as the anatomy -------------------------------------------------------------------


@pytest.fixture
def aorta_ct(scene, ct_dir):  # noqa: F811
    node = scene.util.loadVolume(str(ct_dir / AORTA / "ct.nii.gz"))
    mask_ijk = np.asanyarray(nibabel.load(str(ct_dir / AORTA / "aorta_mask.nii.gz")).dataobj) > 0
    return node, mask_ijk


def coarse_copy(slicer, volumeNode, step: int = 2):
    """Every `step`-th voxel of the volume in a new node whose geometry keeps those voxels in place."""
    array = slicer.util.arrayFromVolume(volumeNode)[::step, ::step, ::step].copy()
    ijkToRas = ctf_ijk_to_ras(slicer, volumeNode) @ np.diag([step, step, step, 1.0])
    return slicer.util.addVolumeFromArray(array, ijkToRas, "coarse")


def ctf_ijk_to_ras(slicer, volumeNode) -> np.ndarray:
    import vtk

    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix)


def test_a_users_segmentation_exports_on_the_ct_grid(ctf, scene, aorta_ct, tmp_path) -> None:  # noqa: F811
    """Slicer's own segment ids, an empty segment (skipped), a segment drawn on a coarser grid (resampled by
    Slicer onto the CT's grid), and two segments whose names clash (refused, not one overwriting the other)."""
    from CTFoundationMRML import anatomy

    node, mask_ijk = aorta_ct
    coarse = coarse_copy(scene, node)
    given = scene.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "user")
    segmentation = given.GetSegmentation()
    aortaId = segmentation.AddEmptySegment("", "Aorta")
    emptyId = segmentation.AddEmptySegment("", "nothing drawn")
    assert aortaId != emptyId and not aortaId.startswith("Aorta")  # Slicer makes its own ids
    coarse_kji = mask_ijk[::2, ::2, ::2].transpose(2, 1, 0).astype(np.uint8)
    scene.util.updateSegmentBinaryLabelmapFromArray(coarse_kji, given, aortaId, coarse)
    assert not scene.util.arrayFromSegmentBinaryLabelmap(given, emptyId, node).any()

    folder = anatomy.exportSegmentMasks(given, node, ctf.ijkToRasArray(node), tmp_path / "masks")

    assert sorted(p.name for p in folder.iterdir()) == ["Aorta.nii.gz"]
    exported = nibabel.load(str(folder / "Aorta.nii.gz"))
    np.testing.assert_allclose(exported.affine, ctf.ijkToRasArray(node), atol=1e-5)
    resampled = np.asanyarray(exported.dataobj) > 0
    assert resampled.shape == mask_ijk.shape
    dice = 2 * (resampled & mask_ijk).sum() / (resampled.sum() + mask_ijk.sum())
    assert dice > 0.85, dice  # nearest-neighbour from a 2x coarser grid: the same aorta, in the same place

    clash = segmentation.AddEmptySegment("", "aorta")
    scene.util.updateSegmentBinaryLabelmapFromArray(mask_ijk.transpose(2, 1, 0).astype(np.uint8), given, clash, node)
    with pytest.raises(CTInputError, match="two segments named 'Aorta' and 'aorta'"):
        anatomy.exportSegmentMasks(given, node, ctf.ijkToRasArray(node), tmp_path / "again")


# --- transforms -------------------------------------------------------------------------------------------


def test_nested_linear_and_non_linear_transforms_above_the_ct(ctf, scene, ct_dir) -> None:  # noqa: F811
    import vtk

    node = scene.util.loadVolume(str(ct_dir / RICORD / "ct_3mm_iso.nii.gz"))
    plain = ctf.ctVolumeFromNode(node).affine_ras
    inner_matrix = np.array([[0.0, -1, 0, 10], [1, 0, 0, -20], [0, 0, 1, 5], [0, 0, 0, 1]])
    outer_matrix = np.array([[1.0, 0, 0, 0], [0, 0, -1, 3], [0, 1, 0, 7], [0, 0, 0, 1]])
    inner = scene.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "inner")
    outer = scene.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "outer")
    inner.SetMatrixTransformToParent(scene.util.vtkMatrixFromArray(inner_matrix))
    outer.SetMatrixTransformToParent(scene.util.vtkMatrixFromArray(outer_matrix))
    inner.SetAndObserveTransformNodeID(outer.GetID())
    node.SetAndObserveTransformNodeID(inner.GetID())
    np.testing.assert_allclose(ctf.ctVolumeFromNode(node).affine_ras, outer_matrix @ inner_matrix @ plain, atol=1e-4)

    grid = scene.mrmlScene.AddNewNodeByClass("vtkMRMLGridTransformNode", "warp")  # a non-linear transform on top
    field = vtk.vtkImageData()  # a 4x4x4 displacement grid over the chest, displacements along x
    field.SetDimensions(4, 4, 4)
    field.SetSpacing(100, 100, 100)
    field.SetOrigin(-150, -150, -150)
    field.AllocateScalars(vtk.VTK_DOUBLE, 3)
    field.GetPointData().GetScalars().Fill(2.0)
    displacements = scene.vtkOrientedGridTransform()
    displacements.SetDisplacementGridData(field)
    grid.SetAndObserveTransformToParent(displacements)
    outer.SetAndObserveTransformNodeID(grid.GetID())
    assert not node.GetParentTransformNode().IsTransformToWorldLinear()
    with pytest.raises(CTInputError, match="'ct_3mm_iso' is under a non-linear transform; harden"):
        ctf.ctVolumeFromNode(node)


# --- a scene with results through .mrb ----------------------------------------------------------------------


def grounded_lung(mask_file: str) -> dict:
    """One grounded segment as the library writes it (grounded.json), for the left lung."""
    return {"segments": {"lung_left": {
        "name": "lung_left", "title": "left lung", "region": "lung", "score": 0.75, "positive": True,
        "centroid_ras_mm": [-80.5, 10.25, -120.0], "mask_file": mask_file, "sentences": [{"text": "Left effusion."}],
        "findings": [{"name": "Emphysema", "positive": True, "ctclip": {"probability": 0.75, "threshold": 0.5}}]}}}


def test_a_scene_with_results_survives_an_mrb_round_trip(ctf, scene, ct_dir, tmp_path) -> None:  # noqa: F811
    from CTFoundationMRML import anatomy

    node = scene.util.loadVolume(str(ct_dir / RICORD / "ct_3mm_iso.nii.gz"))
    result = DetectionResult(model="ct-clip-v2", method="zero-shot", checkpoint="/w/ct_clip_v2.pt",
                             checkpoint_sha256="ab" * 32, device="cpu", dtype="fp32",
                             findings=[Finding("Emphysema", 0.8125, 0.5, True), Finding("Lung nodule", 0.25)])
    table = ctf.findingsTable(result, scene.mrmlScene.AddNewNodeByClass("vtkMRMLTableNode", "findings"))
    ctf.storeResultOnVolume(node, result, table)
    volume = ctf.ctVolumeFromNode(node)
    lung = np.zeros(volume.shape_ijk, np.uint8)
    lung[20:40, 30:60, 10:30] = 1
    nibabel.save(nibabel.Nifti1Image(lung, volume.affine_ras), str(tmp_path / "lung_left.nii.gz"))
    grounded = grounded_lung("lung_left.nii.gz")
    segmentationNode = anatomy.anatomySegmentation(grounded, tmp_path, node, REPO / "Resources")
    again = anatomy.anatomySegmentation(grounded, tmp_path, node, REPO / "Resources")  # MRML allows equal names
    assert (segmentationNode.GetName(), again.GetName()) == ("ct_3mm_iso anatomy", "ct_3mm_iso anatomy_1")
    scene.mrmlScene.RemoveNode(again)
    attributes = {key: node.GetAttribute(key) for key in node.GetAttributeNames() if key.startswith("CTFoundation.")}
    assert len(attributes) == 7

    assert scene.util.saveScene(str(tmp_path / "results.mrb"))
    scene.mrmlScene.Clear()
    scene.util.loadScene(str(tmp_path / "results.mrb"))

    loaded = scene.util.getNode("ct_3mm_iso")
    assert {key: loaded.GetAttribute(key) for key in attributes} == attributes
    assert np.array_equal(scene.util.arrayFromVolume(loaded), volume.hu.transpose(2, 1, 0))
    table = loaded.GetNodeReference(ctf.FINDINGS_REFERENCE_ROLE)
    assert table.GetName() == "findings" and table.GetNumberOfRows() == 2
    assert [table.GetCellText(0, c) for c in range(5)] == ["Emphysema", "0.8125", "0.5", "yes", "ct-clip-v2"]
    assert table.GetCellText(1, 3) == "" and table.GetCellText(1, 2) in ("nan", "")
    segmentation = scene.util.getNode(segmentationNode.GetName()).GetSegmentation()
    segment = segmentation.GetSegment("lung_left")
    assert segment.GetTerminology() == anatomy.terminologyEntry("lung_left", REPO / "Resources")
    assert anatomy.segmentTag(segment, "Positive") == "yes" and anatomy.segmentTag(segment, "Score") == "0.750000"
    assert json.loads(anatomy.segmentTag(segment, "Findings"))[0]["ctclip"]["probability"] == 0.75
    assert json.loads(anatomy.segmentTag(segment, "CentroidRAS")) == [-80.5, 10.25, -120.0]
    mask = scene.util.arrayFromSegmentBinaryLabelmap(scene.util.getNode(segmentationNode.GetName()), "lung_left",
                                                     loaded)
    assert np.array_equal(mask > 0, lung.transpose(2, 1, 0) > 0)
