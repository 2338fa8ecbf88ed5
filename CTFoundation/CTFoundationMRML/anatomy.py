"""Anatomy-grounded findings <-> MRML: a segmentation node with one segment per anatomy, coloured by score
(`CTFoundationLib.anatomy.colours`: YlOrRd by the highest P(positive), positives opaque, the others faint), each
segment's scores, sentences and centre in its tags, and a findings table with an anatomy column.

Also the other way: an existing segmentation node exported as one NIfTI mask per segment (named by segment
name) on the CT's grid, which the library reads as its anatomy source.
"""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path

import numpy as np
import slicer
import vtk

TAG_PREFIX = "CTFoundation."
SEGMENTATION_REFERENCE_ROLE = "CTFoundationAnatomySegmentation"
ANATOMY_COLUMN = "anatomy"
TERMINOLOGY_CONTEXT = "Segmentation category and type - DICOM master list"
ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"
ANATOMICAL_STRUCTURE = "SCT^123037004^Anatomical Structure"
LATERALITY_CODES = {"left": "SCT^7771000^Left", "right": "SCT^24028007^Right", None: "^^"}


@cache
def _terminology(resources: Path) -> dict:
    return json.loads((resources / "anatomy" / "terminology.json").read_text(encoding="utf-8"))


def terminologyTypes(resources: Path) -> dict:
    return _terminology(resources)["types"]


def terminologyEntry(name: str, resources: Path) -> str | None:
    """Slicer's serialised terminology entry of a segment name, or None for a name without a code."""
    if name not in terminologyTypes(resources):
        return None
    code, meaning, laterality = terminologyTypes(resources)[name]
    category = _terminology(resources).get("categories", {}).get(name)
    return "~".join((TERMINOLOGY_CONTEXT, f"SCT^{category[0]}^{category[1]}" if category else ANATOMICAL_STRUCTURE,
                     f"SCT^{code}^{meaning}", LATERALITY_CODES[laterality], ANATOMIC_CONTEXT, "^^", "^^"))


def exportSegmentMasks(segmentationNode, volumeNode, affineRas: np.ndarray, folder: Path) -> Path:
    """One uint8 NIfTI per non-empty segment, on the volume's grid (i, j, k) with `affineRas` (Slicer resamples
    a segment stored on another grid), named by segment. Two segments whose names give the same file name are
    refused: the library names the anatomy by file, so one would silently replace the other."""
    import nibabel

    from CTFoundationLib.errors import CTInputError

    folder.mkdir(parents=True, exist_ok=True)
    segmentation = segmentationNode.GetSegmentation()
    written: dict[str, str] = {}  # lower-case file name -> segment name (file systems may ignore case)
    for index in range(segmentation.GetNumberOfSegments()):
        segmentId = segmentation.GetNthSegmentID(index)
        mask = slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, volumeNode)
        if mask is None or not mask.any():
            continue
        name = segmentation.GetSegment(segmentId).GetName()
        fileName = re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_") or segmentId
        if fileName.lower() in written:
            raise CTInputError(
                f"segmentation '{segmentationNode.GetName()}' has two segments named '{written[fileName.lower()]}' "
                f"and '{name}'; rename one of them (Segmentations module) and try again")
        written[fileName.lower()] = name
        image = nibabel.Nifti1Image(np.ascontiguousarray((mask > 0).astype(np.uint8).transpose(2, 1, 0)), affineRas)
        nibabel.save(image, str(folder / f"{fileName}.nii.gz"))
    return folder


def anatomySegmentation(grounded: dict, outFolder: Path, volumeNode, resources: Path):
    """A new segmentation node on the volume's geometry holding the grounded result's segments."""
    import nibabel

    from CTFoundationLib.anatomy.colours import POSITIVE_ALPHA, score_colour, segment_opacity

    segmentationNode = slicer.mrmlScene.AddNewNodeByClass(
        "vtkMRMLSegmentationNode", slicer.mrmlScene.GenerateUniqueName(f"{volumeNode.GetName()} anatomy"))
    segmentationNode.CreateDefaultDisplayNodes()
    segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
    segmentationNode.SetAndObserveTransformNodeID(volumeNode.GetTransformNodeID())
    displayNode = segmentationNode.GetDisplayNode()
    for name, segment in grounded["segments"].items():
        colour = [c / 255 for c in score_colour(segment["score"])]
        segmentId = segmentationNode.GetSegmentation().AddEmptySegment(name, name, colour)
        mask = np.asanyarray(nibabel.load(str(outFolder / segment["mask_file"])).dataobj)
        slicer.util.updateSegmentBinaryLabelmapFromArray(mask.transpose(2, 1, 0), segmentationNode, segmentId,
                                                         volumeNode)
        describeSegment(segmentationNode.GetSegmentation().GetSegment(segmentId), segment, resources)
        opacity = segment_opacity(segment["score"], segment["positive"])
        displayNode.SetSegmentOpacity3D(segmentId, opacity)
        displayNode.SetSegmentOpacity2DFill(segmentId, opacity * POSITIVE_ALPHA)
    return segmentationNode


def describeSegment(segment, grounded: dict, resources: Path) -> None:
    """Terminology, and the grounded facts as tags: score, positive, region, centre, findings, sentences."""
    entry = terminologyEntry(grounded["name"], resources)
    if entry:
        segment.SetTerminology(entry)
    tags = {"Title": grounded["title"], "Region": grounded["region"] or "", "Score": f"{grounded['score']:.6f}",
            "Positive": "yes" if grounded["positive"] else "no",
            "CentroidRAS": json.dumps(grounded["centroid_ras_mm"]),
            "Findings": json.dumps(grounded["findings"]), "Sentences": json.dumps(grounded["sentences"])}
    for key, value in tags.items():
        segment.SetTag(TAG_PREFIX + key, value)


def segmentTag(segment, key: str) -> str | None:
    """A CTFoundation tag of a segment, or None when it has none."""
    value = vtk.reference("")
    return str(value) if segment.GetTag(TAG_PREFIX + key, value) else None


TABLE_COLUMNS = (("anatomy", "segment name"), ("title", "anatomy"), ("region", "RadGenome region"),
                 ("finding", "CT-RATE finding ('' when the segment has none)"),
                 ("ctclip", "CT-CLIP P(positive)"), ("fvlm", "fVLM P(positive)"), ("positive", "either model positive"),
                 ("score", "the segment's highest P(positive): its colour"))


def anatomyFindingsTable(grounded: dict, tableNode):
    """One row per (segment, finding), and one row for each segment without findings; locked."""
    table = vtk.vtkTable()
    columns = {}
    for name, _description in TABLE_COLUMNS:
        columns[name] = vtk.vtkDoubleArray() if name in ("ctclip", "fvlm", "score") else vtk.vtkStringArray()
        columns[name].SetName(name)
        table.AddColumn(columns[name])
    for name, segment in grounded["segments"].items():
        for finding in segment["findings"] or [None]:
            row = {"anatomy": name, "title": segment["title"], "region": segment["region"] or "",
                   "finding": finding["name"] if finding else "", "ctclip": _probability(finding, "ctclip"),
                   "fvlm": _probability(finding, "fvlm"), "positive": "yes" if finding and finding["positive"] else "",
                   "score": segment["score"]}
            for column, value in row.items():
                columns[column].InsertNextValue(value)
    tableNode.SetAndObserveTable(table)
    for name, description in TABLE_COLUMNS:
        tableNode.SetColumnDescription(name, description)
    tableNode.SetLocked(True)
    return tableNode


def _probability(finding: dict | None, model: str) -> float:
    return finding[model]["probability"] if finding and finding.get(model) else float("nan")


def rowSegmentCentre(tableNode, row: int) -> tuple[float, float, float] | None:
    """World RAS centre (mm) of the segment named in a findings-table row, or None when it cannot be found."""
    segmentationNode = tableNode.GetNodeReference(SEGMENTATION_REFERENCE_ROLE)
    column = tableNode.GetColumnIndex(ANATOMY_COLUMN)
    if segmentationNode is None or column < 0 or not 0 <= row < tableNode.GetNumberOfRows():
        return None
    segmentation = segmentationNode.GetSegmentation()
    segmentId = segmentation.GetSegmentIdBySegmentName(tableNode.GetCellText(row, column))
    centre = segmentTag(segmentation.GetSegment(segmentId), "CentroidRAS") if segmentId else None
    return tuple(json.loads(centre)) if centre else None
