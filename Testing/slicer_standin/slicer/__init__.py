"""Stand-in for the `slicer` package (see ../README.md): a headless application in testing mode."""

from __future__ import annotations

from types import SimpleNamespace

from .standin_mrml import (  # noqa: F401  (slicer.vtkMRML* names)
    vtkMRMLLayoutNode,
    vtkMRMLLinearTransformNode,
    vtkMRMLScalarVolumeNode,
    vtkMRMLScene,
    vtkMRMLScriptedModuleNode,
    vtkMRMLSegmentationDisplayNode,
    vtkMRMLSegmentationNode,
    vtkMRMLTableNode,
    vtkMRMLTextNode,
    vtkSegment,
    vtkSegmentation,
)


class _CommandOptions:
    noMainWindow = True
    testingEnabled = True


class _Application:
    majorVersion, minorVersion = 5, 10

    def commandOptions(self) -> _CommandOptions:
        return _CommandOptions()

    def testingEnabled(self) -> bool:
        return True

    def processEvents(self) -> None:
        pass

    def layoutManager(self):
        return None


class _MarkupsLogic:
    """vtkSlicerMarkupsLogic: without slice views, JumpSlicesToLocation only records where it was asked to go."""

    def __init__(self) -> None:
        self.jumps: list[tuple] = []

    def JumpSlicesToLocation(self, x: float, y: float, z: float, centered: bool, viewGroup: int = -1,
                             exclude=None) -> None:
        self.jumps.append((x, y, z, centered))


app = _Application()
mrmlScene = vtkMRMLScene()
_markupsLogic = _MarkupsLogic()
modules = SimpleNamespace(markups=SimpleNamespace(logic=lambda: _markupsLogic))

from . import util  # noqa: E402, F401
