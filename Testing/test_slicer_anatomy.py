"""Anatomy-grounded findings in the Slicer module on slicer-core (real MRML and module logics), on real CTs with
a small CT-CLIP: the segmentation node (segments, names, terminology, colours and opacities from the colour map,
tags), the findings table's anatomy column, a row click centring the real slice nodes on the segment, and an existing
segmentation node (TotalSegmentator's aorta mask) as the anatomy source."""

from __future__ import annotations

import json

import nibabel
import numpy as np
import pytest
from test_slicer_module import configured_logic, ctf, scene, small  # noqa: F401  (fixtures)

from CTFoundationLib.anatomy.colours import POSITIVE_ALPHA, score_colour, segment_opacity
from CTFoundationLib.anatomy.fallback import fallback_anatomy
from CTFoundationLib.io.reading import read_ct
from CTFoundationLib.vocab import CT_RATE_ABNORMALITIES

RICORD_3MM = "ricord1a_419639-000082_chest_noncontrast/ct_3mm_iso.nii.gz"
AORTA = "totalseg_chest_crop_aorta"
REPORT = "Patchy ground-glass opacities in the right lower lobe. Minimal left pleural effusion."


def thresholds_file(tmp_path, positive: str):
    path = tmp_path / "thresholds.json"
    path.write_text(json.dumps({**dict.fromkeys(CT_RATE_ABNORMALITIES, 1.0), positive: 0.0}))
    return str(path)


def mask_centre_ras(slicer, segmentationNode, segmentId: str, volumeNode) -> np.ndarray:
    """Centre of mass of the segment's stored labelmap, through the volume's IJK-to-RAS."""
    import vtk

    mask = slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, volumeNode)
    ijk = np.argwhere(mask).mean(axis=0)[::-1]
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    return (slicer.util.arrayFromVTKMatrix(matrix) @ np.append(ijk, 1.0))[:3]


def slice_view_centres(slicer) -> np.ndarray:
    """World RAS (mm) at the centre of the Red, Yellow and Green slice views (their SliceToRAS origins)."""
    centres = []
    for name in ("Red", "Yellow", "Green"):
        sliceToRas = slicer.mrmlScene.GetSingletonNode(name, "vtkMRMLSliceNode").GetSliceToRAS()
        centres.append([sliceToRas.GetElement(row, 3) for row in range(3)])
    return np.array(centres)


def table_rows(table) -> list[dict]:
    names = [table.GetTable().GetColumn(c).GetName() for c in range(table.GetNumberOfColumns())]
    return [{name: table.GetCellText(row, c) for c, name in enumerate(names)} for row in range(table.GetNumberOfRows())]


@pytest.mark.slow
def test_ground_ricord_into_segments_table_and_jumps(ctf, scene, ct_dir, small, tmp_path) -> None:  # noqa: F811
    node = scene.util.loadVolume(str(ct_dir / RICORD_3MM))
    logic = configured_logic(ctf, small, tmp_path)
    logic.getParameterNode().thresholdsFile = thresholds_file(tmp_path, "Emphysema")
    steps = []
    outcome = logic.ground(node, report=REPORT, progress=lambda step, fraction: steps.append(step))
    assert {"anatomy", "encode image"} <= set(steps)

    grounded, segmentationNode = outcome.grounded, outcome.segmentationNode
    segmentation = segmentationNode.GetSegmentation()
    ids = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
    assert sorted(ids) == ["airway", "body", "bone", "lung_left", "lung_right"]
    assert {n for n, s in grounded["segments"].items() if s["positive"]} == {"lung_left", "lung_right"}
    library = fallback_anatomy(read_ct(ct_dir / RICORD_3MM))
    display = segmentationNode.GetDisplayNode()
    for segmentId in ids:
        segment, facts = segmentation.GetSegment(segmentId), grounded["segments"][segmentId]
        assert segment.GetName() == segmentId
        assert segment.GetColor() == pytest.approx([c / 255 for c in score_colour(facts["score"])])
        opacity = segment_opacity(facts["score"], facts["positive"])
        assert display.GetSegmentOpacity3D(segmentId) == opacity == (1.0 if facts["positive"] else opacity)
        assert display.GetSegmentOpacity2DFill(segmentId) == pytest.approx(opacity * POSITIVE_ALPHA)
        mask = scene.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, node)
        assert np.array_equal(mask > 0, library.mask(segmentId).transpose(2, 1, 0))
        findings = json.loads(ctf.anatomy.segmentTag(segment, "Findings"))
        assert findings == facts["findings"]
    lungLeft = segmentation.GetSegment("lung_left")
    assert display.GetSegmentOpacity3D("lung_left") == 1.0 and display.GetSegmentOpacity3D("body") < 0.35
    assert ctf.anatomy.segmentTag(lungLeft, "Positive") == "yes"
    assert "~SCT^39607008^Lung~SCT^7771000^Left~" in lungLeft.GetTerminology()
    emphysema = next(f for f in json.loads(ctf.anatomy.segmentTag(lungLeft, "Findings")) if f["name"] == "Emphysema")
    assert emphysema["positive"] and emphysema["ctclip"]["threshold"] == 0.0
    sentences = {s: [x["text"] for x in json.loads(ctf.anatomy.segmentTag(segmentation.GetSegment(s), "Sentences"))]
                 for s in ("lung_left", "lung_right")}
    assert sentences == {"lung_left": ["Minimal left pleural effusion."],
                         "lung_right": ["Patchy ground-glass opacities in the right lower lobe."]}

    rows = table_rows(outcome.tableNode)
    assert {r["anatomy"] for r in rows} == set(ids) and outcome.tableNode.GetLocked()
    positive = [(r["anatomy"], r["finding"]) for r in rows if r["positive"] == "yes"]
    assert sorted(positive) == [("lung_left", "Emphysema"), ("lung_right", "Emphysema")]
    row = next(i for i, r in enumerate(rows) if r["anatomy"] == "lung_left" and r["finding"] == "Emphysema")
    assert float(rows[row]["ctclip"]) == pytest.approx(emphysema["ctclip"]["probability"], abs=1e-6)
    before = slice_view_centres(scene)
    centre = logic.jumpToAnatomyRow(outcome.tableNode, row)
    assert not np.allclose(before, centre, atol=1.0)
    np.testing.assert_allclose(slice_view_centres(scene), [centre] * 3, atol=1e-6)  # every slice view centred there
    np.testing.assert_allclose(centre, library.centroid_ras("lung_left"), atol=0.06)
    np.testing.assert_allclose(centre, mask_centre_ras(scene, segmentationNode, "lung_left", node), atol=0.06)
    assert centre[0] < 0  # the left lung lies at negative R (patient left)
    assert logic.jumpToAnatomyRow(outcome.tableNode, len(rows)) is None
    np.testing.assert_allclose(slice_view_centres(scene), [centre] * 3, atol=1e-6)  # a row past the end: no move


@pytest.mark.slow
def test_an_existing_segmentation_node_is_the_anatomy(ctf, scene, ct_dir, small, tmp_path) -> None:  # noqa: F811
    node = scene.util.loadVolume(str(ct_dir / AORTA / "ct.nii.gz"))
    aorta = np.asanyarray(nibabel.load(str(ct_dir / AORTA / "aorta_mask.nii.gz")).dataobj) > 0
    mask_kji = aorta.transpose(2, 1, 0).astype(np.uint8)  # VTK has no bool scalars: a mask is stored as integers
    given = scene.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "TotalSegmentator")
    segmentId = given.GetSegmentation().AddEmptySegment("", "aorta", (1.0, 0.0, 0.0))
    scene.util.updateSegmentBinaryLabelmapFromArray(mask_kji, given, segmentId, node)
    logic = configured_logic(ctf, small, tmp_path)
    logic.getParameterNode().thresholdsFile = thresholds_file(tmp_path, "Arterial wall calcification")

    outcome = logic.ground(node, segmentationNode=given)

    grounded = outcome.grounded
    assert grounded["anatomy"]["source"] == "mask folder segmentation"
    assert list(grounded["segments"]) == ["aorta"] and grounded["segments"]["aorta"]["region"] == "mediastinum"
    assert grounded["anatomy"]["segments"]["aorta"]["voxels"] == 72810 and not grounded["models"]["fvlm"]["available"]
    created = outcome.segmentationNode.GetSegmentation()
    assert created.GetNumberOfSegments() == 1 and outcome.segmentationNode is not given
    mask = scene.util.arrayFromSegmentBinaryLabelmap(outcome.segmentationNode, "aorta", node)
    assert np.array_equal(mask > 0, aorta.transpose(2, 1, 0))
    assert "~SCT^15825003^Aorta~" in created.GetSegment("aorta").GetTerminology()
    rows = table_rows(outcome.tableNode)
    assert {r["anatomy"] for r in rows} == {"aorta"}
    assert [r["finding"] for r in rows if r["positive"] == "yes"] == ["Arterial wall calcification"]
    centre = logic.jumpToAnatomyRow(outcome.tableNode, 0)
    np.testing.assert_allclose(centre, mask_centre_ras(scene, outcome.segmentationNode, "aorta", node), atol=0.06)
