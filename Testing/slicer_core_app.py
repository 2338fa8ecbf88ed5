"""A headless 3D Slicer for the module tests, built from Kitware's `slicer-core` wheel (real MRML, the real
module logics and the real `slicer.util`; no Qt).

`start()` does what Slicer's application does at start-up, around one scene: cache and data-IO managers, the
application logic, the Colors / Terminologies / Volumes / Segmentations / SubjectHierarchy / Tables / Markups /
Data logics, the default slice views (Red, Yellow, Green) and the crosshair. It then sets `slicer.app`,
`slicer.mrmlScene` and `slicer.modules.<name>.logic()` as Slicer does. `slicer.app` is the one imitation here
(qSlicerApplication is a Qt object): headless, in testing mode, with the IO manager `slicer.util` calls
(volumes and scenes, through the real volumes logic and the scene's MRB reader/writer).

What slicer-core cannot give (Qt widgets, ctk, the pure-Python ScriptedLoadableModule, parameterNodeWrapper and
i18n that Slicer builds on Qt) stays in Testing/slicer_standin, which `start()` puts on the path.
"""

from __future__ import annotations

import gzip
import importlib.metadata
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

STANDIN = Path(__file__).resolve().parent / "slicer_standin"
TERMINOLOGIES = Path(__file__).resolve().parent / "slicer_terminologies"
SLICE_VIEWS = ("Red", "Yellow", "Green")
VOLUME_EXTENSIONS = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd", ".hdr")


def _slicerCoreVersion() -> tuple[int, int]:
    major, minor = importlib.metadata.version("slicer-core").split(".")[:2]
    return int(major), int(minor)


class _CommandOptions:
    noMainWindow = True
    testingEnabled = True


class CoreIOManager:
    """qSlicerCoreIOManager's calls that slicer.util makes, for volumes and scenes, on the real logics."""

    def __init__(self, scene, volumesLogic) -> None:
        self.scene, self.volumesLogic = scene, volumesLogic

    def fileType(self, fileName) -> str:
        name = str(fileName).lower()
        if name.endswith((".mrb", ".mrml")):
            return "SceneFile"
        if name.endswith(VOLUME_EXTENSIONS):
            return "VolumeFile"
        return "NoFile"

    def fileWriterFileType(self, node) -> str:
        return "VolumeFile" if node.IsA("vtkMRMLVolumeNode") else "NoFile"

    def loadNodes(self, fileType: str, properties: dict, loadedNodes, userMessages=None) -> bool:
        fileName = str(properties["fileName"])
        if fileType == "VolumeFile":
            return self._loadVolume(fileName, properties, loadedNodes)
        if fileType == "SceneFile" and fileName.lower().endswith(".mrb"):
            return bool(self.scene.ReadFromMRB(fileName, not properties.get("clear", True), userMessages))
        if fileType == "SceneFile":
            self.scene.SetURL(fileName)
            return bool(self.scene.Import() if properties.get("clear", True) is False else self.scene.Connect())
        return False

    def _loadVolume(self, fileName: str, properties: dict, loadedNodes) -> bool:
        """As qSlicerVolumesReader: the options bits, the name from the file name, AddArchetypeVolume."""
        name = properties.get("name") or Path(fileName).name.split(".")[0]
        flags = {"labelmap": 0x1, "center": 0x2, "singleFile": 0x4, "autoWindowLevel": 0x8, "discardOrientation": 0x10}
        options = sum(bit for key, bit in flags.items() if properties.get(key))
        node = self.volumesLogic.AddArchetypeVolume(fileName, name, options)
        if node is None:
            return False
        loadedNodes.AddItem(node)
        return True

    def saveNodes(self, fileType: str, properties: dict, userMessages=None) -> bool:
        fileName = str(properties["fileName"])
        if fileType == "SceneFile" and fileName.lower().endswith(".mrb"):
            return bool(self.scene.WriteToMRB(fileName, None, userMessages))
        if fileType == "VolumeFile":
            node = self.scene.GetNodeByID(properties["nodeID"])
            storage = node.CreateDefaultStorageNode()
            storage.SetFileName(fileName)
            return bool(storage.WriteData(node))
        return False


class HeadlessApplication:
    """slicer.app without a main window, in testing mode (so no dialog may open)."""

    def __init__(self, scene, applicationLogic, ioManager: CoreIOManager) -> None:
        self.majorVersion, self.minorVersion = _slicerCoreVersion()
        self._scene, self._applicationLogic, self._ioManager = scene, applicationLogic, ioManager

    def commandOptions(self) -> _CommandOptions:
        return _CommandOptions()

    def testingEnabled(self) -> bool:
        return True

    def processEvents(self) -> None:
        """No Qt event loop: nothing to process."""

    def layoutManager(self):
        return None  # no views to lay out: callers check for None, as with --no-main-window

    def applicationLogic(self):
        return self._applicationLogic

    def mrmlScene(self):
        return self._scene

    def coreIOManager(self) -> CoreIOManager:
        return self._ioManager


def _moduleLogic(logic, scene, applicationLogic, name: str):
    logic.SetMRMLApplicationLogic(applicationLogic)
    logic.SetMRMLScene(scene)
    applicationLogic.SetModuleLogic(name, logic)
    return logic


def _addViews(slicer, scene, applicationLogic) -> None:
    """The crosshair and the three slice views Slicer's layout creates (slice logics and their slice nodes)."""
    import vtk

    crosshair = slicer.vtkMRMLCrosshairNode()
    crosshair.SetCrosshairName("default")
    scene.AddNode(crosshair)
    slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene, True)
    sliceLogics = vtk.vtkCollection()
    for layoutName in SLICE_VIEWS:
        sliceLogic = slicer.vtkMRMLSliceLogic()
        sliceLogic.SetMRMLApplicationLogic(applicationLogic)
        sliceLogic.SetMRMLScene(scene)
        sliceLogic.AddSliceNode(layoutName)
        sliceLogics.AddItem(sliceLogic)
    applicationLogic.SetSliceLogics(sliceLogics)
    applicationLogic.SetViewLogics(vtk.vtkCollection())


def _terminologyFolder() -> Path:
    """Slicer's terminology lists (kept gzipped in Testing/slicer_terminologies), unpacked where the logic reads."""
    folder = Path(tempfile.mkdtemp(prefix="slicer-core-terminologies-"))
    for packed in TERMINOLOGIES.glob("*.term.json.gz"):
        (folder / packed.name.removesuffix(".gz")).write_bytes(gzip.decompress(packed.read_bytes()))
    return folder


def start():
    """Bring up the scene, application logic and module logics once; returns the `slicer` package."""
    if str(STANDIN) not in sys.path:
        sys.path.insert(0, str(STANDIN))  # qt, ctk, and slicer.{ScriptedLoadableModule, parameterNodeWrapper, i18n}
    import slicer

    if getattr(slicer, "mrmlScene", None) is not None:
        return slicer
    scene = slicer.vtkMRMLScene()
    applicationLogic = slicer.vtkSlicerApplicationLogic()
    applicationLogic.SetMRMLScene(scene)
    applicationLogic.GetColorLogic().SetMRMLScene(scene)
    applicationLogic.GetColorLogic().AddDefaultColorNodes()

    remoteIO = slicer.vtkMRMLRemoteIOLogic()  # the cache and data-IO managers storage nodes read and write through
    remoteIO.SetMRMLScene(scene)
    remoteIO.SetMRMLApplicationLogic(applicationLogic)
    remoteIO.GetCacheManager().SetRemoteCacheDirectory(tempfile.mkdtemp(prefix="slicer-core-cache-"))
    dataIO = slicer.vtkDataIOManagerLogic()
    dataIO.SetMRMLScene(scene)
    dataIO.SetMRMLApplicationLogic(applicationLogic)
    dataIO.SetAndObserveDataIOManager(remoteIO.GetDataIOManager())
    remoteIO.AddDataIOToScene()
    _addViews(slicer, scene, applicationLogic)

    terminologies = slicer.vtkSlicerTerminologiesModuleLogic()
    terminologies.SetModuleShareDirectory(str(_terminologyFolder()))  # Slicer's lists; slicer-core ships none
    logics = {
        "colors": (applicationLogic.GetColorLogic(), "Colors"),
        "terminologies": (terminologies, "Terminologies"),
        "volumes": (slicer.vtkSlicerVolumesLogic(), "Volumes"),
        "segmentations": (slicer.vtkSlicerSegmentationsModuleLogic(), "Segmentations"),
        "subjecthierarchy": (slicer.vtkSlicerSubjectHierarchyModuleLogic(), "SubjectHierarchy"),
        "tables": (slicer.vtkSlicerTablesLogic(), "Tables"),
        "markups": (slicer.vtkSlicerMarkupsLogic(), "Markups"),
        "data": (slicer.vtkSlicerDataModuleLogic(), "Data"),
    }
    modules = {key: _moduleLogic(logic, scene, applicationLogic, name) for key, (logic, name) in logics.items()}
    slicer.mrmlScene = scene
    slicer.modules = SimpleNamespace(**{key: SimpleNamespace(logic=lambda logic=logic: logic)
                                        for key, logic in modules.items()})
    slicer.app = HeadlessApplication(scene, applicationLogic, CoreIOManager(scene, modules["volumes"]))
    slicer._processStash = (remoteIO, dataIO)  # keep the IO logics alive as long as the scene
    return slicer
