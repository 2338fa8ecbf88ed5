"""Stand-in for the `slicer` package (see ../README.md): a headless application in testing mode."""

from __future__ import annotations

from .standin_mrml import (  # noqa: F401  (slicer.vtkMRML* names)
    vtkMRMLLayoutNode,
    vtkMRMLLinearTransformNode,
    vtkMRMLScalarVolumeNode,
    vtkMRMLScene,
    vtkMRMLScriptedModuleNode,
    vtkMRMLTableNode,
    vtkMRMLTextNode,
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


app = _Application()
mrmlScene = vtkMRMLScene()

from . import util  # noqa: E402, F401
