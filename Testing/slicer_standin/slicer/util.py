"""Stand-in for slicer.util (see ../README.md): the functions the module and its tests use."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import numpy as np
import vtk
from vtk.util import numpy_support

import slicer


def arrayFromVolume(volumeNode) -> np.ndarray:
    """A (k, j, i) view of the voxels, as Slicer gives it (VTK stores i fastest)."""
    image = volumeNode.GetImageData()
    array = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    shape = tuple(reversed(image.GetDimensions()))
    components = image.GetNumberOfScalarComponents()
    return array.reshape(shape + (components,) if components > 1 else shape)


def arrayFromVTKMatrix(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def vtkMatrixFromArray(array) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r][c]))
    return matrix


def _addVolumeNode(array_ijk: np.ndarray, ijkToRas: np.ndarray, name: str):
    """A scalar volume node holding `array_ijk` (axes i, j, k) with i fastest in memory, as VTK lays it out."""
    image = vtk.vtkImageData()
    image.SetDimensions(*array_ijk.shape)
    flat = np.ascontiguousarray(array_ijk.ravel(order="F"))
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(flat, deep=True))
    node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    node.SetAndObserveImageData(image)
    node.SetIJKToRASMatrix(vtkMatrixFromArray(ijkToRas))
    return node


def loadVolume(filename: str, properties: dict | None = None, returnNode: bool = False):
    """NIfTI files only: voxels in file order (i fastest) with the file's RAS affine, as ITK + Slicer place them."""
    import nibabel

    path = Path(filename)
    try:
        image = nibabel.load(str(path))
    except Exception as error:
        raise RuntimeError(f"Failed to load volume: {filename}") from error
    name = (properties or {}).get("name") or path.name.removesuffix(".gz").removesuffix(".nii")
    return _addVolumeNode(np.asanyarray(image.dataobj), image.affine, name)


sliceViewerLayers: dict = {}  # what setSliceViewerLayers was last asked to show (there are no slice views)


def setSliceViewerLayers(background="keep-current", foreground="keep-current", label="keep-current",
                         foregroundOpacity=None, labelOpacity=None, fit=False, rotateToVolumePlane=False) -> None:
    sliceViewerLayers.update(background=background, foreground=foreground, foregroundOpacity=foregroundOpacity)


def _ijkToRas(volumeNode) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    return arrayFromVTKMatrix(matrix)


def updateSegmentBinaryLabelmapFromArray(narray, segmentationNode, segmentId, referenceVolumeNode=None) -> None:
    """Store a (k, j, i) mask as the segment's labelmap on the reference volume's geometry."""
    segmentationNode.GetSegmentation()._labelmaps[segmentId] = (np.asarray(narray) > 0, _ijkToRas(referenceVolumeNode))


def arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, referenceVolumeNode=None):
    """The segment's (k, j, i) mask on the reference volume's grid. Only the reference's own geometry is
    modelled (Slicer resamples other geometries); anything else fails loudly rather than give a wrong mask."""
    mask, ijkToRas = segmentationNode.GetSegmentation()._labelmaps[segmentId]
    shape = tuple(reversed(referenceVolumeNode.GetImageData().GetDimensions()))
    if mask.shape != shape or not np.allclose(ijkToRas, _ijkToRas(referenceVolumeNode), atol=1e-4):
        raise NotImplementedError("stand-in: resampling a segment to another geometry is not modelled")
    return mask.astype(np.uint8)


def confirmOkCancelDisplay(text, windowTitle=None, parent=None, **kwargs) -> bool:
    logging.info(text)
    return True  # what Slicer returns in testing mode


def confirmYesNoDisplay(text, windowTitle=None, parent=None, **kwargs) -> bool:
    logging.info(text)
    return True


def errorDisplay(text, windowTitle=None, parent=None, standardButtons=None, **kwargs) -> None:
    logging.error(text)


@contextlib.contextmanager
def tryWithErrorDisplay(message=None, show=True, waitCursor=False):
    """Like Slicer: the exception is logged (a dialog outside testing mode) and not re-raised."""
    try:
        yield
    except Exception as error:
        errorDisplay(f"{message}\n\n{error}" if message else str(error))


def pip_install(requirements) -> None:
    raise AssertionError("tests must never install packages")


def mainWindow():
    return None


class VTKObservationMixin:
    def __init__(self) -> None:
        self.observations = []

    def addObserver(self, obj, event, method) -> None:
        self.observations.append((obj, event, method))

    def removeObserver(self, obj, event, method) -> None:
        self.observations = [o for o in self.observations if o != (obj, event, method)]

    def removeObservers(self) -> None:
        self.observations = []
