"""3D Slicer module CTFoundation: chest-CT foundation models (CT-CLIP v2 findings) on a loaded CT.

A thin layer over the pure-Python library CTFoundationLib: it turns MRML volume nodes into library
`CTVolume`s and results into MRML (a table node, attributes on the volume), drives the panel, and runs
every model job (detection, grounding, reports, CT-CHAT) in one long-lived model process that keeps the models
loaded (`PythonSlicer -m CTFoundationLib.host.worker serve`), and downloads in one-shot worker processes; a QTimer
polls them, so the application never freezes and torch is never imported into Slicer. Python packages are
installed only when first needed, after asking.
Scripting: `CTFoundationLogic().detect(volumeNode, model="ct-clip-v2", device="auto")`.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import ctk
import numpy as np
import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLTableNode
from slicer.i18n import tr as _
from slicer.parameterNodeWrapper import Choice, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin


def packageRoot() -> Path:
    """The folder holding CTFoundationLib/ and Resources/: this file's folder once built or installed,
    the repository root when Slicer runs the module from a source checkout (CTFoundation/ added as a module path)."""
    here = Path(__file__).resolve().parent
    return here if (here / "CTFoundationLib").is_dir() else here.parent


def resourcePath(relativePath: str) -> Path:
    return packageRoot() / "Resources" / relativePath


for _folder in (packageRoot(), Path(__file__).resolve().parent):  # CTFoundationLib; CTFoundationMRML beside this file
    if str(_folder) not in sys.path:
        sys.path.insert(0, str(_folder))

# Only light library modules here (no torch, nibabel): the module must load before its dependencies are installed.
from CTFoundationChat import ChatPanel  # noqa: E402
from CTFoundationLib.errors import CTFoundationError, CTInputError, DependencyError  # noqa: E402
from CTFoundationLib.host.client import ModelProcess  # noqa: E402
from CTFoundationLib.host.process import WorkerProcess, python_command  # noqa: E402
from CTFoundationLib.weights import load_registry  # noqa: E402
from CTFoundationMRML import anatomy  # noqa: E402
from CTFoundationMRML import maps as findingMaps  # noqa: E402
from CTFoundationSimilar import SimilarCasesPanel, similarCases  # noqa: E402

REQUIREMENTS_FILE = "slicer-requirements.txt"
TORCH_REQUIREMENT = ">=2.1"
ATTRIBUTE_PREFIX = "CTFoundation."
FINDINGS_REFERENCE_ROLE = "CTFoundationFindings"
POSITIVE_ROW_COLOR = (255, 205, 205)
DICOM_TAGS = {  # library metadata key -> DICOM tag, read from the first file of a DICOM-loaded volume
    "modality": "0008,0060",
    "study_description": "0008,1030",
    "series_description": "0008,103E",
    "contrast_agent": "0018,0010",
    "slice_thickness_mm": "0018,0050",
}


#
# CTFoundation
#


class CTFoundation(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("CT Foundation")
        self.parent.categories = [_("Chest CT")]
        self.parent.dependencies = []
        self.parent.contributors = ["CTFoundation developers"]
        self.parent.helpText = _(
            "Chest-CT foundation models on the loaded CT: probabilities of the 18 CT-RATE abnormalities with "
            "CT-CLIP v2 (zero-shot, VocabFine or LiPro). Select a CT, get the model weights once (Download or "
            "Import file...), then press Detect. The work runs in a separate process; the results go into a "
            "table and onto the volume node. <b>Research use only, not for clinical use.</b>"
        )
        self.parent.acknowledgementText = _(
            "Models and weights: CT-CLIP and CT-CHAT (Hamamci et al., 'Developing Generalist Foundation Models "
            "from a Multimodal Dataset for 3D Computed Tomography', CT-RATE dataset) and fVLM (Shui et al., "
            "'Large-scale and fine-grained vision-language pre-training for enhanced CT image understanding', "
            "ICLR 2025). The CT-RATE-derived weights are licensed CC BY-NC-SA 4.0 (non-commercial, share-alike); "
            "CT-CHAT's language models carry their own licences (Llama 3.1 / Llama 2 community licences, "
            "Apache-2.0). Not a medical device: not for clinical use."
        )
        iconPath = resourcePath("Icons/CTFoundation.png")
        if iconPath.is_file():
            self.parent.icon = qt.QIcon(str(iconPath))


#
# Parameters
#


@parameterNodeWrapper
class CTFoundationParameterNode:
    """What the user chose; saved with the scene.

    inputVolume: the CT. model: detection model id. device: auto, cpu or cuda:N. dtype: fp32 or bf16.
    weightsFile / modelConfigFile / textEncoder / thresholdsFile: optional paths ("" = installed weights,
    full-size config, installed CXR-BERT, no thresholds). weightsHome: weights cache ("" = library default).
    findingsTable: the latest results.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    model: Annotated[str, Choice(load_registry().ids("ct-clip"))] = "ct-clip-v2"
    device: str = "auto"
    dtype: Annotated[str, Choice(["fp32", "bf16"])] = "fp32"
    weightsFile: str = ""
    modelConfigFile: str = ""
    textEncoder: str = ""
    thresholdsFile: str = ""
    weightsHome: str = ""
    findingsTable: vtkMRMLTableNode


#
# MRML <-> library
#


def ijkToRasArray(volumeNode: vtkMRMLScalarVolumeNode) -> np.ndarray:
    """4x4 voxel (i, j, k) -> world RAS (mm), including a linear parent transform."""
    ijkToRas = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(ijkToRas)
    matrix = slicer.util.arrayFromVTKMatrix(ijkToRas)
    transformNode = volumeNode.GetParentTransformNode()
    if transformNode is not None:
        if not transformNode.IsTransformToWorldLinear():
            raise CTInputError(
                f"volume '{volumeNode.GetName()}' is under a non-linear transform; harden the transform "
                "(Data module, right-click > Harden transform) and try again"
            )
        toWorld = vtk.vtkMatrix4x4()
        transformNode.GetMatrixTransformToWorld(toWorld)
        matrix = slicer.util.arrayFromVTKMatrix(toWorld) @ matrix
    return matrix


def ctVolumeFromNode(volumeNode: vtkMRMLScalarVolumeNode):
    """The node's voxels (a (k, j, i) view, no copy) and geometry as a library CTVolume in HU, through the checks
    every reader applies (`usable_volume`: geometry refused or warned the same way as for files)."""
    from CTFoundationLib.io.reading import usable_volume
    from CTFoundationLib.io.volume import CTVolume

    if volumeNode is None or volumeNode.GetImageData() is None:
        raise CTInputError("no CT volume selected, or the selected volume holds no image data")
    array = slicer.util.arrayFromVolume(volumeNode)
    if array.ndim != 3:
        raise CTInputError(
            f"volume '{volumeNode.GetName()}' has {array.shape[-1]} values per voxel; a CT has one (load it as "
            "a scalar volume)"
        )
    metadata = {"format": "slicer", **dicomMetadata(volumeNode)}
    return usable_volume(CTVolume.from_kji(array, ijkToRasArray(volumeNode), volumeNode.GetName(), metadata))


def dicomMetadata(volumeNode: vtkMRMLScalarVolumeNode) -> dict:
    """Facts the sanity checks use (contrast agent, slice thickness, ...) from the DICOM database, if any."""
    instanceUids = (volumeNode.GetAttribute("DICOM.instanceUIDs") or "").split()
    database = getattr(slicer, "dicomDatabase", None)
    if not instanceUids or database is None:
        return {}
    firstFile = database.fileForInstance(instanceUids[0])
    values = {key: database.fileValue(firstFile, tag).strip() for key, tag in DICOM_TAGS.items()}
    metadata = {key: value for key, value in values.items() if value}
    if "slice_thickness_mm" in metadata:
        try:
            metadata["slice_thickness_mm"] = float(metadata["slice_thickness_mm"])
        except ValueError:
            del metadata["slice_thickness_mm"]
    return metadata


def sourceDicomFiles(volumeNode: vtkMRMLScalarVolumeNode) -> list[str]:
    """The files of the DICOM instances the volume was loaded from (Slicer's DICOM database); one-line error if none."""
    instanceUids = (volumeNode.GetAttribute("DICOM.instanceUIDs") or "").split()
    database = getattr(slicer, "dicomDatabase", None)
    files = [database.fileForInstance(uid) for uid in instanceUids] if database is not None else []
    if not files or not all(files):
        raise CTInputError(f"volume '{volumeNode.GetName()}': DICOM output needs a DICOM source; load the CT "
                           "through the DICOM module (its files must be in Slicer's DICOM database)")
    return files


def findingsTable(result, tableNode: vtkMRMLTableNode) -> vtkMRMLTableNode:
    """Fill `tableNode` with one row per finding: finding, probability, threshold, positive, model."""
    table = vtk.vtkTable()
    names, positive, model = vtk.vtkStringArray(), vtk.vtkStringArray(), vtk.vtkStringArray()
    probability, threshold = vtk.vtkDoubleArray(), vtk.vtkDoubleArray()
    for array, name in ((names, "finding"), (probability, "probability"), (threshold, "threshold"),
                        (positive, "positive"), (model, "model")):
        array.SetName(name)
        table.AddColumn(array)
    for finding in result.findings:
        names.InsertNextValue(finding.name)
        probability.InsertNextValue(finding.probability)
        threshold.InsertNextValue(np.nan if finding.threshold is None else finding.threshold)
        positive.InsertNextValue({True: "yes", False: "no", None: ""}[finding.positive])
        model.InsertNextValue(result.model)
    tableNode.SetAndObserveTable(table)
    tableNode.SetColumnDescription("probability", "P(present) from the model, 0..1")
    tableNode.SetColumnDescription("threshold", "decision threshold (empty: none set)")
    tableNode.SetColumnDescription("positive", "probability >= threshold")
    tableNode.SetLocked(True)
    return tableNode


def storeResultOnVolume(volumeNode: vtkMRMLScalarVolumeNode, result, tableNode: vtkMRMLTableNode) -> None:
    """Keep what was found, and with which model and checkpoint, on the volume (saved with the scene)."""
    positives = [f.name for f in result.findings if f.positive]
    attributes = {
        "Model": result.model,
        "Method": result.method,
        "CheckpointSHA256": result.checkpoint_sha256,
        "Device": result.device,
        "Software": result.software,
        "Probabilities": json.dumps({f.name: f.probability for f in result.findings}),
        "Positive": ", ".join(positives),
    }
    for key, value in attributes.items():
        volumeNode.SetAttribute(ATTRIBUTE_PREFIX + key, value)
    volumeNode.SetNodeReferenceID(FINDINGS_REFERENCE_ROLE, tableNode.GetID())


def isInteractive() -> bool:
    """False in headless runs (--no-main-window) and tests: then no dialog may be shown."""
    return not (slicer.app.commandOptions().noMainWindow or slicer.app.testingEnabled())


def optionalPath(text: str) -> Path | None:
    return Path(text).expanduser() if text.strip() else None


#
# Background tasks
#


class BackgroundTask:
    """A one-shot worker process (WorkerProcess) or a job of the model process (ModelJob), followed from the main
    thread: a QTimer polls its events, one completion callback.

    onEvent(event) gets every event while it runs; onFinished(task) once when it ended (also after cancel).
    The temporary `workDir` (inputs and outputs of the job) is removed after onFinished.
    """

    POLL_INTERVAL_MS = 200

    def __init__(self, process, onEvent: Callable[[dict], None],
                 onFinished: Callable[[BackgroundTask], None], workDir: Path | None = None) -> None:
        self.process, self.onEvent, self.onFinished, self.workDir = process, onEvent, onFinished, workDir
        self.done = False
        self.timer = qt.QTimer()
        self.timer.setInterval(self.POLL_INTERVAL_MS)
        self.timer.timeout.connect(self.poll)

    def start(self) -> BackgroundTask:
        self.process.start()
        self.timer.start()
        return self

    def poll(self) -> None:
        for event in self.process.poll():
            self.onEvent(event)
        if self.process.finished and not self.done:
            self.done = True
            self.timer.stop()
            try:
                self.onFinished(self)
            finally:
                if self.workDir is not None:
                    shutil.rmtree(self.workDir, ignore_errors=True)

    def waitForCompletion(self) -> None:
        """Block the caller (console, batch scripts) but keep the application painting."""
        while not self.done:
            self.poll()
            slicer.app.processEvents()
            time.sleep(0.05)

    def cancel(self) -> None:
        """End the job (a one-shot process: its whole process tree); onFinished follows on a later poll."""
        self.process.cancel()


@dataclass
class DetectionOutcome:
    """What `CTFoundationLogic.detect` returns: the library's result and the MRML nodes it went into.

    report: the full JSON (input summary + detection), exactly what `ctfoundation detect --out` writes.
    """

    result: object  # CTFoundationLib.inference.results.DetectionResult
    report: dict
    tableNode: vtkMRMLTableNode
    volumeNode: vtkMRMLScalarVolumeNode
    mapFiles: dict | None = None  # finding -> its map file (token grid, patient space), kept past the job


@dataclass
class ReportOutcome:
    """What `CTFoundationLogic.report` returns: where the batch report is and each case's status row
    (summary.csv as `ctfoundation report` writes it: case_id, status ok/failed, report, error, ...)."""

    indexHtml: Path
    cases: list[dict]

    @property
    def failed(self) -> list[dict]:
        return [row for row in self.cases if row["status"] != "ok"]


@dataclass
class GroundingOutcome:
    """What `CTFoundationLogic.ground` returns: the library's grounded result (grounded.json, as
    `ctfoundation ground` writes it) and the segmentation and table nodes made from it."""

    grounded: dict
    segmentationNode: object  # vtkMRMLSegmentationNode
    tableNode: vtkMRMLTableNode
    volumeNode: vtkMRMLScalarVolumeNode


#
# CTFoundationLogic
#


class CTFoundationLogic(ScriptedLoadableModuleLogic):
    """The scripting API; also what the panel calls. No widget code here.

    Console:  logic = CTFoundationLogic(); outcome = logic.detect(slicer.util.getNode("CT"))
              outcome.result.findings, outcome.tableNode
    """

    _modelProcess: ModelProcess | None = None  # shared by every instance: see modelProcess()

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.pythonExecutable = shutil.which("PythonSlicer") or sys.executable
        self._registry = None

    def getParameterNode(self) -> CTFoundationParameterNode:
        return CTFoundationParameterNode(super().getParameterNode())

    # --- dependencies -------------------------------------------------------------------------------------

    def missingDependencies(self) -> list[str]:
        """Requirements not yet satisfied in Slicer's Python ('torch' first when PyTorch is missing)."""
        from CTFoundationLib.dependencies import missing_requirements, read_requirements

        missing = missing_requirements(read_requirements(resourcePath(REQUIREMENTS_FILE)))
        if importlib.util.find_spec("torch") is None:
            missing.insert(0, f"torch{TORCH_REQUIREMENT}")
        return missing

    def requireDependencies(self) -> None:
        """Install what is missing (asking first) in the GUI; headless, say how instead of installing."""
        missing = self.missingDependencies()
        if not missing:
            return
        if not isInteractive():
            raise DependencyError(
                f"missing Python packages in Slicer: {', '.join(missing)}. Install them once with "
                "CTFoundationLogic().installDependencies(askConfirmation=False) (batch script: --install-dependencies)"
            )
        self.installDependencies(askConfirmation=True)

    def installDependencies(self, askConfirmation: bool = True) -> None:
        """PyTorch through the PyTorch extension, then the rest with pip; Slicer's own numpy, SimpleITK and
        requests (and the installed torch) are pinned by a constraints file so that pip never replaces them."""
        missing = self.missingDependencies()
        if askConfirmation and missing and not slicer.util.confirmOkCancelDisplay(
            _("CT Foundation needs these Python packages, which will now be downloaded and installed into "
              "Slicer (this can take several minutes):\n\n") + "\n".join(missing),
            windowTitle=_("Install Python packages"),
        ):
            raise DependencyError("installation of the required Python packages was declined")
        if importlib.util.find_spec("torch") is None:
            self._installTorch()
        self._pipInstall()

    def _installTorch(self) -> None:
        try:
            import PyTorchUtils
        except ImportError:
            raise DependencyError(
                "PyTorch is needed: install the 'PyTorch' extension from the Extensions Manager, restart Slicer "
                "and try again"
            ) from None
        torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False,
                                                                torchVersionRequirement=TORCH_REQUIREMENT)
        if torch is None:
            raise DependencyError("PyTorch was not installed; install it from the PyTorch Utils module")

    def _pipInstall(self) -> None:
        from CTFoundationLib.dependencies import (
            PROTECTED_PACKAGES,
            missing_requirements,
            read_requirements,
            write_constraints,
        )

        missing = missing_requirements(read_requirements(resourcePath(REQUIREMENTS_FILE)))
        if not missing:
            return
        constraints = write_constraints(Path(tempfile.mkdtemp(prefix="CTFoundation-")) / "constraints.txt",
                                        (*PROTECTED_PACKAGES, "torch"))
        try:
            if (slicer.app.majorVersion, slicer.app.minorVersion) >= (5, 12):  # slicer.packaging is new in 5.12
                import slicer.packaging as packaging  # an alias: a plain `import slicer...` would make slicer local

                packaging.pip_ensure(missing, constraints=str(constraints), requester="CTFoundation",
                                     prompt_install=False, skip_in_testing=False)
            else:
                slicer.util.pip_install(["-c", str(constraints), *missing])
        finally:
            shutil.rmtree(constraints.parent, ignore_errors=True)

    # --- input --------------------------------------------------------------------------------------------

    def inputWarnings(self, volumeNode: vtkMRMLScalarVolumeNode) -> list:
        """The library's sanity checks (not a chest, thick slices, contrast, HU problems) on the node."""
        from CTFoundationLib.io.sanity import check_ct

        return check_ct(ctVolumeFromNode(volumeNode))

    # --- weights ------------------------------------------------------------------------------------------

    def weightsHome(self) -> Path | None:
        return optionalPath(self.getParameterNode().weightsHome)

    def registry(self):
        """The weights registry (built-in, or the site's $CTFOUNDATION_REGISTRY), read once."""
        if self._registry is None:
            from CTFoundationLib.weights import load_registry

            self._registry = load_registry()
        return self._registry

    def weightsStatus(self, model: str) -> tuple[bool, str]:
        """(ready, a one-line description) for the model and what it depends on."""
        from CTFoundationLib.weights import INSTALLED, model_status

        home = self.weightsHome()
        states = [(spec, model_status(spec, home)) for spec in self.registry().closure(model)]
        missing = [spec.id for spec, status in states if status.state != INSTALLED]
        if not missing:
            size = sum(status.size_bytes for _spec, status in states) / 2**30
            return True, _("installed ({size:.2f} GB) in {folder}").format(size=size, folder=states[-1][1].folder)
        return False, _("not installed: {models}").format(models=", ".join(missing))

    def pendingLicenses(self, model: str) -> list:
        from CTFoundationLib.weights import pending_licenses

        return pending_licenses(self.registry().closure(model), self.weightsHome())

    def needsToken(self, model: str) -> bool:
        from CTFoundationLib.weights import get_token

        gated = any(spec.gated for spec in self.registry().closure(model))
        return gated and get_token(self.weightsHome()) is None

    def saveToken(self, token: str) -> None:
        from CTFoundationLib.weights import save_token

        save_token(token.strip(), self.weightsHome())

    def startDownload(self, model: str, acceptLicenses: bool, onEvent, onFinished) -> BackgroundTask:
        """Download the model's weights (and its text encoder) in the background."""
        arguments = ["download", model, *self._homeArguments()]
        if acceptLicenses:
            arguments.append("--accept-licenses")
        return self._startTask(arguments, onEvent, onFinished)

    def startImport(self, model: str, source: Path, acceptLicenses: bool, onEvent, onFinished) -> BackgroundTask:
        """Check a weights file obtained elsewhere and place it in the cache, in the background."""
        arguments = ["import", model, str(source), *self._homeArguments()]
        if acceptLicenses:
            arguments.append("--accept-licenses")
        return self._startTask(arguments, onEvent, onFinished)

    def startDeviceQuery(self, onFinished) -> BackgroundTask:
        """Ask PyTorch (in the worker) which devices exist; the `devices` event lists them."""
        return self._startTask(["devices"], lambda event: None, onFinished)

    def _homeArguments(self) -> list[str]:
        home = self.weightsHome()
        return ["--home", str(home)] if home else []

    def _startTask(self, arguments: list[str], onEvent, onFinished, workDir: Path | None = None) -> BackgroundTask:
        process = WorkerProcess(python_command(self.pythonExecutable) + arguments, cwd=packageRoot(),
                                env=self._workerEnvironment(), on_log=logging.info)
        return BackgroundTask(process, onEvent, onFinished, workDir).start()

    def modelProcess(self) -> ModelProcess:
        """The long-lived model process, one for the application (every logic instance shares it, so the panel,
        the console and scripts reuse the same loaded models); started by its first job, and a new one when the
        weights folder (the environment it runs in) changed."""
        environment = self._workerEnvironment()
        shared = CTFoundationLogic._modelProcess
        if shared is not None and shared.env != environment:
            shared.stop()
            shared = None
        if shared is None:
            shared = ModelProcess(python_command(self.pythonExecutable) + ["serve"], cwd=packageRoot(),
                                  env=environment, on_log=logging.info)
            CTFoundationLogic._modelProcess = shared
        return shared

    def unloadModels(self, waitForCompletion: bool = True, callback=None):
        """Free the models the model process keeps loaded (they load again on the next job).

        Returns the kinds freed (waiting) or the BackgroundTask (None when no model process runs);
        callback(kinds, error) as in `detect`."""
        process = CTFoundationLogic._modelProcess
        if process is None or not process.running:
            if callback is not None:
                callback([], None)
            return [] if waitForCompletion else None
        return self._runInBackground("unload", lambda workDir: ("unload", {}),
                                     lambda task, workDir: task.process.outcome()["unloaded"],
                                     waitForCompletion, callback, None, needsPackages=False)

    def stopModelProcess(self) -> None:
        """End the model process (its loaded models go with it); the next job starts a new one."""
        if CTFoundationLogic._modelProcess is not None:
            CTFoundationLogic._modelProcess.stop()

    def _workerEnvironment(self) -> dict:
        environment = dict(os.environ)
        home = self.weightsHome()
        if home:
            environment["CTFOUNDATION_HOME"] = str(home)
        return environment

    # --- detection ----------------------------------------------------------------------------------------

    def detect(self, volumeNode: vtkMRMLScalarVolumeNode, model: str | None = None, device: str | None = None,
               waitForCompletion: bool = True, callback=None, progress=None, maps: bool = True):
        """Findings for one CT volume node, computed in a background process.

        model / device: default to the parameter node's (ct-clip-v2, auto); the other options (weights file,
        config, text encoder, thresholds, dtype) come from the parameter node.
        progress(stepName, fraction 0..1) is called while it runs. maps: also the per-finding maps (token grid, shown
        as overlays from the results table; `DetectionOutcome.mapFiles`).
        waitForCompletion=True: returns a DetectionOutcome (raises CTFoundationError on failure).
        waitForCompletion=False: returns the BackgroundTask (cancel() it to stop); callback(outcome, error)
        is called on the main thread when it ends, with exactly one of the two set.
        """

        def arguments(workDir: Path) -> tuple[str, dict]:
            mapOptions = {"maps": str(workDir / "maps"), "map_grid": "tokens"} if maps else {}
            return "detect", {**self._volumeRequest(volumeNode, workDir), **self._modelOptions(model, device),
                              "out": str(workDir / "result.json"), **mapOptions}

        return self._runInBackground(
            "detect", arguments,
            lambda task, workDir: self._detectionOutcome(task, volumeNode, workDir / "result.json"),
            waitForCompletion, callback, progress)

    def _runInBackground(self, name: str, arguments: Callable[[Path], tuple[str, dict]], outcome: Callable,
                         waitForCompletion: bool, callback, progress, needsPackages: bool = True):
        """Run a job of the model process on a fresh work folder: the outcome (waiting) or the BackgroundTask.

        arguments(workDir) writes the inputs and gives (op, request); outcome(task, workDir) turns the
        finished task into MRML on the main thread; callback(outcome, error) as in `detect`.
        """
        if needsPackages:
            self.requireDependencies()
        workDir = Path(tempfile.mkdtemp(prefix=f"CTFoundation-{name}-"))
        try:
            op, request = arguments(workDir)
        except BaseException:
            shutil.rmtree(workDir, ignore_errors=True)
            raise
        finished = {}

        def onFinished(task: BackgroundTask) -> None:
            try:
                finished["outcome"] = outcome(task, workDir)
            except CTFoundationError as error:
                finished["error"] = error
            if callback is not None:
                callback(finished.get("outcome"), finished.get("error"))

        job = self.modelProcess().job(op, request)
        try:
            task = BackgroundTask(job, lambda event: self._reportStep(event, progress), onFinished, workDir).start()
        except BaseException:  # the model process could not start: say why, leave no work folder behind
            shutil.rmtree(workDir, ignore_errors=True)
            raise
        if not waitForCompletion:
            return task
        task.waitForCompletion()
        if "error" in finished:
            raise finished["error"]
        return finished["outcome"]

    @staticmethod
    def _volumeRequest(volumeNode, workDir: Path) -> dict:
        """Write the CT for the worker (uncompressed NIfTI + source/metadata JSON); the request's CT entries."""
        import nibabel

        volume = ctVolumeFromNode(volumeNode)
        nibabel.save(nibabel.Nifti1Image(volume.hu, volume.affine_ras), str(workDir / "volume.nii"))
        info = {"source": volume.source, "metadata": volume.metadata}
        (workDir / "volume.json").write_text(json.dumps(info), encoding="utf-8")
        return {"ct": str(workDir / "volume.nii"), "volume_info": str(workDir / "volume.json")}

    def _modelOptions(self, model: str | None, device: str | None) -> dict:
        """The request's model entries: model / device as given, else the parameter node's, and its files."""
        parameters = self.getParameterNode()
        files = {key: str(optionalPath(text)) if optionalPath(text) else None for key, text in (
            ("weights", parameters.weightsFile), ("model_config", parameters.modelConfigFile),
            ("text_encoder", parameters.textEncoder))}
        thresholds = optionalPath(parameters.thresholdsFile)
        return {"ctclip": {"model_id": model or parameters.model, "device": device or parameters.device,
                           "dtype": parameters.dtype, **files},
                "thresholds": str(thresholds) if thresholds else None}

    @staticmethod
    def _reportStep(event: dict, progress) -> None:
        if progress is not None and event["type"] == "step":
            progress(event["name"], event["index"] / event["count"])

    def _detectionOutcome(self, task: BackgroundTask, volumeNode, resultPath: Path) -> DetectionOutcome:
        """Read the worker's JSON and put it into MRML (main thread)."""
        from CTFoundationLib.inference.results import DetectionResult

        task.process.outcome()  # raises WorkerError with the reason when it failed or was cancelled
        report = json.loads(resultPath.read_text(encoding="utf-8"))
        result = DetectionResult.from_dict(report["detection"])
        tableNode = slicer.mrmlScene.AddNewNodeByClass(
            "vtkMRMLTableNode", slicer.mrmlScene.GenerateUniqueName(f"{volumeNode.GetName()} findings"))
        findingsTable(result, tableNode)
        storeResultOnVolume(volumeNode, result, tableNode)
        self.getParameterNode().findingsTable = tableNode
        return DetectionOutcome(result, report, tableNode, volumeNode, findingMaps.keepMapFiles(report))

    # --- anatomy-grounded findings ---------------------------------------------------------------------

    def ground(self, volumeNode: vtkMRMLScalarVolumeNode, segmentationNode=None, report: str | None = None,
               model: str | None = None, device: str | None = None, waitForCompletion: bool = True,
               callback=None, progress=None):
        """Findings per anatomy segment (CT-CLIP, and fVLM when its weights are installed), in the background.

        segmentationNode: the anatomy (segments named as TotalSegmentator or RadGenome name them); None lets
        the library make it (TotalSegmentator if installed, else lungs/airway/body/bone). report: report or
        answer text whose sentences are placed on the segments. Model options as in `detect`.
        Returns a GroundingOutcome (waiting) or the BackgroundTask; callback(outcome, error) as in `detect`.
        """

        def arguments(workDir: Path) -> tuple[str, dict]:
            request = {**self._volumeRequest(volumeNode, workDir), **self._modelOptions(model, device),
                       "out": str(workDir / "out"), "report": report or ""}
            if segmentationNode is not None:
                masks = anatomy.exportSegmentMasks(segmentationNode, volumeNode, ijkToRasArray(volumeNode),
                                                   workDir / "segmentation")
                request["anatomy"] = {"segmentation": str(masks)}
            return "ground", request

        return self._runInBackground(
            "ground", arguments, lambda task, workDir: self._groundingOutcome(task, volumeNode, workDir / "out"),
            waitForCompletion, callback, progress)

    def _groundingOutcome(self, task: BackgroundTask, volumeNode, outFolder: Path) -> GroundingOutcome:
        """The worker's grounded.json and masks into a segmentation node and a findings table (main thread)."""
        task.process.outcome()
        grounded = json.loads((outFolder / "grounded.json").read_text(encoding="utf-8"))
        segmentationNode = anatomy.anatomySegmentation(grounded, outFolder, volumeNode, resourcePath(""))
        tableNode = slicer.mrmlScene.AddNewNodeByClass(
            "vtkMRMLTableNode", slicer.mrmlScene.GenerateUniqueName(f"{volumeNode.GetName()} anatomy findings"))
        anatomy.anatomyFindingsTable(grounded, tableNode)
        tableNode.SetNodeReferenceID(anatomy.SEGMENTATION_REFERENCE_ROLE, segmentationNode.GetID())
        return GroundingOutcome(grounded, segmentationNode, tableNode, volumeNode)

    # --- batch reports --------------------------------------------------------------------------------------

    def report(self, inputs: list, outFolder, model: str | None = None, device: str | None = None,
               anatomy: bool = False, waitForCompletion: bool = True, callback=None, progress=None):
        """Batch reports of CT files / DICOM folders / case folders / a CSV list, exactly as `ctfoundation
        report` writes them into outFolder (result.json + report.html per case, index.html, summary.csv), in
        the background; finished cases are skipped. Returns a ReportOutcome (waiting) or the BackgroundTask.
        """
        outFolder = Path(outFolder)

        def arguments(workDir: Path) -> tuple[str, dict]:
            return "report", {"inputs": [str(Path(p)) for p in inputs], "out": str(outFolder),
                              **self._modelOptions(model, device), "anatomy": anatomy}

        return self._runInBackground(
            "report", arguments, lambda task, workDir: self._reportOutcome(task, outFolder),
            waitForCompletion, callback, progress)

    @staticmethod
    def _reportOutcome(task: BackgroundTask, outFolder: Path) -> ReportOutcome:
        import csv

        indexHtml = Path(task.process.outcome()["path"])
        with open(outFolder / "summary.csv", newline="", encoding="utf-8") as summary:
            return ReportOutcome(indexHtml, list(csv.DictReader(summary)))

    def similarCases(self, volumeNode: vtkMRMLScalarVolumeNode, indexFolder, k: int = 5, **options):
        """The k most similar cases of a case index (CTFoundationSimilar.similarCases; computed by the worker)."""
        return similarCases(self, volumeNode, indexFolder, k, **options)

    @staticmethod
    def jumpToAnatomyRow(tableNode: vtkMRMLTableNode, row: int) -> tuple[float, float, float] | None:
        """Centre the slice views on the segment of a findings-table row; returns that centre (RAS mm)."""
        centre = anatomy.rowSegmentCentre(tableNode, row)
        if centre is not None:
            slicer.modules.markups.logic().JumpSlicesToLocation(*centre, True)
        return centre

    # --- DICOM output ---------------------------------------------------------------------------------------

    def exportDicom(self, outcome: DetectionOutcome, outFolder, segmentationNode=None, waitForCompletion: bool = True,
                    callback=None, progress=None):
        """A DICOM SEG (anatomy + positive-finding regions) and SR (the findings) of a detection, referencing the
        volume's source DICOM series, written by the background worker as outFolder/seg.dcm and sr.dcm. The
        finding regions come from the detection's finding maps (`outcome.mapFiles`), else from the grounding.

        segmentationNode: the anatomy (e.g. the grounding's segmentation); None lets the library make it.
        Returns the SR's path (waiting) or the BackgroundTask; callback(path, error) as in `detect`.
        """
        files = sourceDicomFiles(outcome.volumeNode)

        def arguments(workDir: Path) -> tuple[str, dict]:
            (workDir / "detection.json").write_text(json.dumps(outcome.report), encoding="utf-8")
            request = {**self._volumeRequest(outcome.volumeNode, workDir), "dicom_files": files,
                       "detection": str(workDir / "detection.json"), "out": str(Path(outFolder)),
                       "maps": {name: str(path) for name, path in (outcome.mapFiles or {}).items()}}
            if segmentationNode is not None:
                masks = anatomy.exportSegmentMasks(segmentationNode, outcome.volumeNode,
                                                   ijkToRasArray(outcome.volumeNode), workDir / "segmentation")
                request["anatomy"] = {"segmentation": str(masks)}
            return "dicom", request

        return self._runInBackground(
            "dicom", arguments, lambda task, workDir: Path(task.process.outcome()["path"]),
            waitForCompletion, callback, progress)

    # --- chat (CT-CHAT) ------------------------------------------------------------------------------------

    def chatModels(self) -> list[str]:
        """The registered CT-CHAT model ids."""
        return sorted(model for model, spec in self.registry().models.items() if spec.family == "ct-chat")

    def chat(self, volumeNode: vtkMRMLScalarVolumeNode | None, model: str = "ct-chat-llama3.1-8b",
             maxNewTokens: int | None = None, **modelOptions):
        """A CT-CHAT conversation about the volume (None: general questions); `.ask("...")` returns the answer.
        maxNewTokens: the longest answer in tokens (default: the library's).

        It runs in the model process, which loads the model once per (model, modelOptions, device, CT-CLIP
        checkpoint, weights folder) and keeps it for later chats. modelOptions: llm / lora / projector paths,
        template, precision (library load_chat_model); the CT-CLIP checkpoint, device and weights folder come from
        the parameter node.
        """
        from CTFoundationChat import ChatConversation

        self.requireDependencies()
        return ChatConversation(self, volumeNode, model, self._chatOptions(modelOptions), maxNewTokens)

    def _chatOptions(self, modelOptions: dict) -> dict:
        """ChatRuntime.from_registry's options as plain data: the given ones, the device and weights folder, and
        the parameter node's CT-CLIP checkpoint when it is the one CT-CHAT encodes with (ct-clip-v2)."""
        parameters = self.getParameterNode()
        ownCTCLIP = parameters.model == "ct-clip-v2"
        ctclip = optionalPath(parameters.weightsFile) if ownCTCLIP else None
        config = optionalPath(parameters.modelConfigFile) if ownCTCLIP else None
        home = self.weightsHome()
        options = {key: str(value) if isinstance(value, Path) else value for key, value in modelOptions.items()}
        return {**options, "ctclip": str(ctclip) if ctclip else None, "ctclip_config": str(config) if config else None,
                "device": parameters.device, "home": str(home) if home else None}

    @staticmethod
    def showTableInLayout(tableNode: vtkMRMLTableNode) -> None:
        """Show the table in the view layout (switching to a layout with a table view if needed)."""
        layoutManager = slicer.app.layoutManager()
        if layoutManager is None:
            return
        if layoutManager.tableViewCount == 0:
            layoutManager.setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpTableView)
        applicationLogic = slicer.app.applicationLogic()
        applicationLogic.GetSelectionNode().SetActiveTableID(tableNode.GetID())
        applicationLogic.PropagateTableSelection()


def highlightPositiveRows(tableView, tableNode: vtkMRMLTableNode) -> None:
    """Tint the rows flagged positive in a qMRMLTableView showing `tableNode`."""
    model = tableView.tableModel()
    positiveColumn = tableNode.GetColumnIndex("positive")
    brush = qt.QBrush(qt.QColor(*POSITIVE_ROW_COLOR))
    for row in range(tableNode.GetNumberOfRows()):
        if tableNode.GetCellText(row, positiveColumn) != "yes":
            continue
        for column in range(tableNode.GetNumberOfColumns()):
            item = model.item(row, column)
            if item is not None:
                item.setBackground(brush)


#
# CTFoundationWidget
#


class CTFoundationWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel (Resources/UI/CTFoundation.ui), in sections: Input, Models, Detection, Results, Findings per
    anatomy, Chat."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._detectionTask = None
        self._weightsTask = None
        self._devicesTask = None
        self._groundingTask = None
        self._unloadTask = None
        self._anatomyTable = None
        self._detectionOutcome = None  # the latest results, for the DICOM export
        self._groundingOutcome = None

    def resourcePath(self, filename: str) -> str:
        return str(resourcePath(filename))

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/CTFoundation.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = CTFoundationLogic()
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.setupInputSection()
        self.setupModelsSection()
        self.setupDetectionSection()
        self.setupResultsSection()
        self.setupAnatomySection()
        self.similarPanel = SimilarCasesPanel(self.logic, self.ui, lambda: self._parameterNode.inputVolume)
        self.chatPanel = ChatPanel(self.logic, self.ui, lambda: self._parameterNode.inputVolume, self.groundText)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        for task in (self._detectionTask, self._weightsTask, self._devicesTask, self._groundingTask):
            if task is not None:
                task.cancel()
        self.chatPanel.cleanup()
        self.similarPanel.cleanup()
        self.logic.stopModelProcess()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()
        self.refreshDependencyState()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGui)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            self._parameterNode.inputVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")

    def setParameterNode(self, parameterNode: CTFoundationParameterNode | None) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGui)
        self._parameterNode = parameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGui)
            self.updateGui()

    def updateGui(self, caller=None, event=None) -> None:
        if not self._parameterNode:
            return
        self.updatePathEdits()
        self.updateWeightsState()
        self.updateApplyButton()

    # --- Input section ------------------------------------------------------------------------------------

    def setupInputSection(self) -> None:
        self.ui.inputVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onInputVolumeChanged)

    def onInputVolumeChanged(self, volumeNode) -> None:
        """Show the sanity-check warnings of the new input (about 0.2 s for a 512x512x255 CT)."""
        self.ui.inputWarningsLabel.text = ""
        if volumeNode is None:
            return
        if self.logic.missingDependencies():
            self.ui.inputWarningsLabel.text = _("Input checks run once the Python packages are installed.")
            return
        with slicer.util.tryWithErrorDisplay(_("The input CT could not be checked."), waitCursor=True):
            warnings = self.logic.inputWarnings(volumeNode)
            lines = [f"<b>{w.code}</b>: {w.message}" for w in warnings]
            self.ui.inputWarningsLabel.text = "<br>".join(lines) if lines else _("Input checks passed.")

    # --- Models section -----------------------------------------------------------------------------------

    def setupModelsSection(self) -> None:
        self.ui.weightsHomeEdit.filters = ctk.ctkPathLineEdit.Dirs
        self.ui.weightsProgressBar.hide()
        self.ui.deviceSelector.addItem(_("auto (GPU when present)"), "auto")
        self.ui.deviceSelector.addItem(_("CPU"), "cpu")
        self.ui.deviceSelector.connect("currentIndexChanged(int)", self.onDeviceChanged)
        self.ui.installDependenciesButton.connect("clicked(bool)", self.onInstallDependencies)
        self.ui.downloadWeightsButton.connect("clicked(bool)", self.onDownloadOrCancel)
        self.ui.importWeightsButton.connect("clicked(bool)", self.onImportWeights)
        self.ui.unloadModelsButton.connect("clicked(bool)", self.onUnloadModels)
        for edit, name in self.pathEdits().items():
            edit.connect("currentPathChanged(QString)", lambda path, name=name: self.onPathChanged(name, path))

    def pathEdits(self) -> dict:
        """Path widgets and the parameter each one edits (strings: '' means the default)."""
        return {self.ui.weightsFileEdit: "weightsFile", self.ui.modelConfigFileEdit: "modelConfigFile",
                self.ui.textEncoderEdit: "textEncoder", self.ui.thresholdsFileEdit: "thresholdsFile",
                self.ui.weightsHomeEdit: "weightsHome"}

    def onPathChanged(self, name: str, path: str) -> None:
        if self._parameterNode and getattr(self._parameterNode, name) != path:
            setattr(self._parameterNode, name, path)

    def updatePathEdits(self) -> None:
        for edit, name in self.pathEdits().items():
            value = getattr(self._parameterNode, name)
            if edit.currentPath != value:
                wasBlocked = edit.blockSignals(True)
                edit.currentPath = value
                edit.blockSignals(wasBlocked)

    def refreshDependencyState(self) -> None:
        missing = self.logic.missingDependencies()
        self.ui.installDependenciesButton.visible = bool(missing)
        self.ui.dependenciesLabel.text = (
            _("Python packages to install on first use: {names}").format(names=", ".join(missing)) if missing
            else _("Python packages: ready"))
        if not missing and self._devicesTask is None:
            self._devicesTask = self.logic.startDeviceQuery(self.onDevicesFound)

    def onInstallDependencies(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("The Python packages could not be installed."), waitCursor=True):
            self.logic.installDependencies(askConfirmation=True)
        self.refreshDependencyState()

    def onDevicesFound(self, task: BackgroundTask) -> None:
        event = task.process.last("devices")
        if event is None:
            logging.warning("CTFoundation: device query failed:\n" + "\n".join(task.process.log_tail))
            return
        self.ui.deviceSelector.blockSignals(True)
        self.ui.deviceSelector.clear()
        for device in event["devices"]:
            self.ui.deviceSelector.addItem(device["label"], device["id"])
        self.ui.deviceSelector.blockSignals(False)
        self.selectDevice(self._parameterNode.device if self._parameterNode else "auto")

    def selectDevice(self, deviceId: str) -> None:
        index = self.ui.deviceSelector.findData(deviceId)
        self.ui.deviceSelector.currentIndex = max(index, 0)

    def onDeviceChanged(self, index: int) -> None:
        if self._parameterNode and index >= 0:
            self._parameterNode.device = self.ui.deviceSelector.itemData(index)

    def updateWeightsState(self) -> None:
        if self._weightsTask is not None:
            return
        with slicer.util.tryWithErrorDisplay(_("The weights cache could not be read.")):
            ready, text = self.logic.weightsStatus(self._parameterNode.model)
            if optionalPath(self._parameterNode.weightsFile):
                text = _("using the weights file set under Advanced")
            self.ui.weightsStatusLabel.text = text
            self.ui.downloadWeightsButton.text = _("Download")
            self.ui.downloadWeightsButton.enabled = not ready

    def onDownloadOrCancel(self) -> None:
        if self._weightsTask is not None:
            self._weightsTask.cancel()
            return
        model = self._parameterNode.model
        with slicer.util.tryWithErrorDisplay(_("The download could not start.")):
            self.logic.requireDependencies()
            accepted = self.askLicenses(model)
            if accepted is None or not self.askTokenIfNeeded(model):
                return
            self._weightsTask = self.logic.startDownload(model, accepted, self.onWeightsEvent, self.onWeightsFinished)
            self.showWeightsProgress(_("Cancel download"))

    def onUnloadModels(self) -> None:
        """Free the loaded models (after the job at hand: the model process takes its requests in order)."""
        self.ui.unloadModelsButton.enabled = False
        with slicer.util.tryWithErrorDisplay(_("The models could not be unloaded.")):
            self._unloadTask = self.logic.unloadModels(waitForCompletion=False, callback=self.onModelsUnloaded)

    def onModelsUnloaded(self, kinds: list[str] | None, error: Exception | None) -> None:
        self._unloadTask = None
        self.ui.unloadModelsButton.enabled = True
        self.ui.weightsStatusLabel.text = (_("models unloaded: {kinds}").format(kinds=", ".join(kinds))
                                           if kinds else _("no model was loaded"))
        if error is not None:
            slicer.util.errorDisplay(_("The models could not be unloaded: {error}").format(error=error))

    def onImportWeights(self) -> None:
        model = self._parameterNode.model
        source = qt.QFileDialog.getOpenFileName(slicer.util.mainWindow(), _("Import weights for {model}").format(
            model=model), "", _("Checkpoints (*.pt *.pth *.safetensors *.bin);;All files (*)"))
        if not source:
            return
        with slicer.util.tryWithErrorDisplay(_("The import could not start.")):
            self.logic.requireDependencies()
            accepted = self.askLicenses(model)
            if accepted is None:
                return
            self._weightsTask = self.logic.startImport(model, Path(source), accepted, self.onWeightsEvent,
                                                       self.onWeightsFinished)
            self.showWeightsProgress(_("Cancel import"))

    def askLicenses(self, model: str) -> bool | None:
        """Show each licence still to acknowledge; True: accepted now, False: none pending, None: declined."""
        pending = self.logic.pendingLicenses(model)
        for licence in pending:
            text = _("These weights are licensed under {name}\n{url}\n\n{summary}\n\nDo you accept this licence?")
            if not slicer.util.confirmYesNoDisplay(text.format(name=licence.name, url=licence.url,
                                                               summary=licence.summary)):
                return None
        return bool(pending)

    def askTokenIfNeeded(self, model: str) -> bool:
        """Gated weights need a Hugging Face token; ask for one when none is stored."""
        if not self.logic.needsToken(model):
            return True
        token = qt.QInputDialog.getText(
            slicer.util.mainWindow(), _("Hugging Face token"),
            _("These weights are gated: accept the terms on the dataset page, then paste your Hugging Face "
              "access token (stored in the weights cache settings, never shown):"), qt.QLineEdit.Password)
        if not token:
            return False
        self.logic.saveToken(token)
        return True

    def showWeightsProgress(self, cancelText: str) -> None:
        self.ui.weightsProgressBar.setRange(0, 0)
        self.ui.weightsProgressBar.show()
        self.ui.downloadWeightsButton.text = cancelText
        self.ui.downloadWeightsButton.enabled = True
        self.ui.importWeightsButton.enabled = False

    def onWeightsEvent(self, event: dict) -> None:
        if event["type"] == "file":
            self.ui.weightsStatusLabel.text = _("downloading {name}").format(name=event["name"])
        elif event["type"] == "note":
            self.ui.weightsStatusLabel.text = event["message"]
        elif event["type"] == "bytes" and event.get("total"):
            self.ui.weightsProgressBar.setRange(0, 1000)
            self.ui.weightsProgressBar.value = int(1000 * event["done"] / event["total"])

    def onWeightsFinished(self, task: BackgroundTask) -> None:
        self._weightsTask = None
        self.ui.weightsProgressBar.hide()
        self.ui.importWeightsButton.enabled = True
        self.updateWeightsState()
        if not task.process.cancelled:
            with slicer.util.tryWithErrorDisplay(_("Getting the weights failed.")):
                task.process.outcome()

    # --- Detection section --------------------------------------------------------------------------------

    def setupDetectionSection(self) -> None:
        self.ui.detectProgressBar.hide()
        self.ui.applyButton.connect("clicked(bool)", self.onApplyOrCancel)

    def updateApplyButton(self) -> None:
        if self._detectionTask is not None:
            self.ui.applyButton.text = _("Cancel")
            self.ui.applyButton.enabled = True
            return
        self.ui.applyButton.text = _("Detect findings")
        self.ui.applyButton.enabled = bool(self._parameterNode.inputVolume)
        self.ui.applyButton.toolTip = (_("Compute the probabilities of the 18 CT-RATE findings")
                                       if self._parameterNode.inputVolume else _("Select a CT volume first"))

    def onApplyOrCancel(self) -> None:
        if self._detectionTask is not None:
            self._detectionTask.cancel()
            return
        with slicer.util.tryWithErrorDisplay(_("Detection could not start."), waitCursor=True):
            self._detectionTask = self.logic.detect(self._parameterNode.inputVolume, waitForCompletion=False,
                                                    callback=self.onDetectionFinished,
                                                    progress=self.onDetectionProgress)
            self.ui.detectProgressBar.value = 0
            self.ui.detectProgressBar.show()
            self.ui.detectStatusLabel.text = _("starting")
        self.updateApplyButton()

    def onDetectionProgress(self, step: str, fraction: float) -> None:
        self.ui.detectProgressBar.value = int(100 * fraction)
        self.ui.detectStatusLabel.text = step

    def onDetectionFinished(self, outcome: DetectionOutcome | None, error: Exception | None) -> None:
        cancelled = self._detectionTask is not None and self._detectionTask.process.cancelled
        self._detectionTask = None
        self.ui.detectProgressBar.hide()
        self.ui.detectStatusLabel.text = _("cancelled") if cancelled else (_("failed") if error else _("done"))
        self.updateApplyButton()
        if cancelled:
            return
        with slicer.util.tryWithErrorDisplay(_("Detection failed.")):
            if error is not None:
                raise error
            self.showResults(outcome)

    # --- Results section ----------------------------------------------------------------------------------

    def setupResultsSection(self) -> None:
        self.ui.resultsTableView.setMRMLScene(slicer.mrmlScene)
        self.ui.exportDicomButton.connect("clicked(bool)", self.onExportDicom)
        self.mapControls = findingMaps.MapControls(self.ui)

    def showResults(self, outcome: DetectionOutcome) -> None:
        self._detectionOutcome = outcome
        self.ui.exportDicomButton.enabled = True
        self.ui.resultsTableView.setMRMLTableNode(outcome.tableNode)
        self.mapControls.setResults(outcome.volumeNode, outcome.tableNode, outcome.mapFiles)
        highlightPositiveRows(self.ui.resultsTableView, outcome.tableNode)
        self.logic.showTableInLayout(outcome.tableNode)
        tableWidget = slicer.app.layoutManager().tableWidget(0)
        if tableWidget is not None:
            highlightPositiveRows(tableWidget.tableView(), outcome.tableNode)
        positives = [f.name for f in outcome.result.findings if f.positive]
        thresholds = any(f.threshold is not None for f in outcome.result.findings)
        summary = (_("Positive: {names}").format(names=", ".join(positives) or _("none")) if thresholds
                   else _("No decision thresholds set (Advanced): probabilities only."))
        self.ui.resultsSummaryLabel.text = f"{outcome.result.model} ({outcome.result.method}): {summary}"
        self.similarPanel.onResultsShown()


    def onExportDicom(self) -> None:
        """Write the latest results as DICOM SEG + SR into a chosen folder (with the grounding's anatomy when it was
        made for the same volume)."""
        outcome, grounding = self._detectionOutcome, self._groundingOutcome
        folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), _("Folder for the DICOM SEG and SR"))
        if outcome is None or not folder:
            return
        sameVolume = grounding is not None and grounding.volumeNode is outcome.volumeNode
        with slicer.util.tryWithErrorDisplay(_("DICOM export could not start."), waitCursor=True):
            self.logic.exportDicom(outcome, folder, grounding.segmentationNode if sameVolume else None,
                                   waitForCompletion=False, callback=self.onDicomExported)
            self.ui.exportDicomButton.enabled = False

    def onDicomExported(self, path: Path | None, error: Exception | None) -> None:
        self.ui.exportDicomButton.enabled = True
        with slicer.util.tryWithErrorDisplay(_("DICOM export failed.")):
            if error is not None:
                raise error
            self.ui.resultsSummaryLabel.text += "\n" + _("DICOM SEG and SR written to {folder}").format(
                folder=path.parent)

    # --- Findings per anatomy section -----------------------------------------------------------------------

    def setupAnatomySection(self) -> None:
        self.ui.groundProgressBar.hide()
        self.ui.groundButton.connect("clicked(bool)", self.onGroundOrCancel)
        self.ui.anatomyTableView.connect("clicked(QModelIndex)", self.onAnatomyRowClicked)

    def onGroundOrCancel(self) -> None:
        if self._groundingTask is not None:
            self._groundingTask.cancel()
            return
        with slicer.util.tryWithErrorDisplay(_("Grounding could not start."), waitCursor=True):
            self._groundingTask = self.logic.ground(
                self._parameterNode.inputVolume, self.ui.anatomySegmentationSelector.currentNode(),
                self.ui.anatomyReportEdit.toPlainText(), waitForCompletion=False,
                callback=self.onGroundingFinished, progress=self.onGroundingProgress)
            self.ui.groundProgressBar.value = 0
            self.ui.groundProgressBar.show()
            self.ui.groundButton.text = _("Cancel")

    def groundText(self, text: str) -> None:
        """Place a text's sentences (a chat answer) on the anatomy segments: the Anatomy section's report box."""
        self.ui.anatomyReportEdit.setPlainText(text)
        if self._groundingTask is None:
            self.onGroundOrCancel()

    def onGroundingProgress(self, step: str, fraction: float) -> None:
        self.ui.groundProgressBar.value = int(100 * fraction)
        self.ui.groundStatusLabel.text = step

    def onGroundingFinished(self, outcome: GroundingOutcome | None, error: Exception | None) -> None:
        cancelled = self._groundingTask is not None and self._groundingTask.process.cancelled
        self._groundingTask = None
        self.ui.groundProgressBar.hide()
        self.ui.groundButton.text = _("Find findings per anatomy")
        self.ui.groundStatusLabel.text = _("cancelled") if cancelled else (_("failed") if error else _("done"))
        if cancelled:
            return
        with slicer.util.tryWithErrorDisplay(_("Grounding failed.")):
            if error is not None:
                raise error
            self._anatomyTable = outcome.tableNode
            self._groundingOutcome = outcome
            self.ui.anatomyTableView.setMRMLTableNode(outcome.tableNode)
            highlightPositiveRows(self.ui.anatomyTableView, outcome.tableNode)
            positives = [name for name, s in outcome.grounded["segments"].items() if s["positive"]]
            self.ui.groundStatusLabel.text = _("Positive segments: {names}").format(
                names=", ".join(positives) or _("none"))

    def onAnatomyRowClicked(self, index) -> None:
        """A click on a row (of the possibly sorted view) centres the slice views on that row's segment."""
        if self._anatomyTable is not None:
            row = self.ui.anatomyTableView.sortFilterProxyModel().mapToSource(index).row()
            self.logic.jumpToAnatomyRow(self._anatomyTable, row)


#
# CTFoundationTest
#


class CTFoundationTest(ScriptedLoadableModuleTest):
    """Self-test for a real Slicer: a chest CT, a small random CT-CLIP checkpoint made here, detection, table.

    The CT is $CTFOUNDATION_TEST_CT when set (any file slicer.util.loadVolume reads), else the CTChest sample.
    Needs the Python packages installed (the test installs them when missing, without asking).
    """

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_DetectionWithSmallCheckpoint()
        self.setUp()
        self.test_GroundingOnFallbackAnatomy()

    def loadTestCT(self) -> vtkMRMLScalarVolumeNode:
        path = os.environ.get("CTFOUNDATION_TEST_CT")
        if path:
            return slicer.util.loadVolume(path)
        import SampleData

        return SampleData.downloadSample("CTChest")

    def runWithSmallCheckpoint(self, run):
        """run(logic) with the parameter node pointing at a small random CT-CLIP checkpoint made here."""
        logic = CTFoundationLogic()
        if logic.missingDependencies():
            logic.installDependencies(askConfirmation=False)
        from CTFoundationTesting.small_ctclip import make_small_ctclip, write_prompt_vocab

        folder = Path(tempfile.mkdtemp(prefix="CTFoundationTest-"))
        checkpoint, constructors, _config = make_small_ctclip(folder)
        parameters = logic.getParameterNode()
        parameters.weightsFile = str(checkpoint)
        parameters.modelConfigFile = str(constructors)
        parameters.textEncoder = str(write_prompt_vocab(folder / "vocab" / "vocab.txt"))
        try:
            return run(logic)
        finally:
            parameters.weightsFile = parameters.modelConfigFile = parameters.textEncoder = ""
            shutil.rmtree(folder, ignore_errors=True)

    def test_DetectionWithSmallCheckpoint(self) -> None:
        self.delayDisplay("Loading a chest CT")
        volumeNode = self.loadTestCT()
        self.delayDisplay("Detecting with a small random checkpoint")
        steps = []
        outcome = self.runWithSmallCheckpoint(lambda logic: logic.detect(
            volumeNode, model="ct-clip-v2", device="cpu", progress=lambda step, fraction: steps.append(step)))

        table = outcome.tableNode
        self.assertEqual(table.GetNumberOfRows(), 18)
        self.assertEqual(table.GetCellText(0, table.GetColumnIndex("finding")), "Medical material")
        probabilities = [float(table.GetCellText(row, 1)) for row in range(18)]
        self.assertTrue(all(0.0 < p < 1.0 for p in probabilities))
        self.assertEqual(volumeNode.GetAttribute("CTFoundation.Model"), "ct-clip-v2")
        self.assertEqual(volumeNode.GetNodeReference(FINDINGS_REFERENCE_ROLE).GetID(), table.GetID())
        self.assertEqual(outcome.report["input"]["source"], volumeNode.GetName())
        self.assertIn("encode image", steps)
        self.delayDisplay("Test passed")

    def test_GroundingOnFallbackAnatomy(self) -> None:
        """Anatomy made by the library's fallback (lungs, airway, body, bone), a report sentence on the left lung."""
        self.delayDisplay("Loading a chest CT")
        volumeNode = self.loadTestCT()
        self.delayDisplay("Grounding findings on the anatomy")
        report = "A 6 mm nodule is seen in the left lung upper lobe."
        outcome = self.runWithSmallCheckpoint(lambda logic: logic.ground(
            volumeNode, report=report, model="ct-clip-v2", device="cpu"))

        segmentation = outcome.segmentationNode.GetSegmentation()
        names = {segmentation.GetSegment(segmentation.GetNthSegmentID(i)).GetName()
                 for i in range(segmentation.GetNumberOfSegments())}
        self.assertTrue({"lung_left", "lung_right"} <= names, names)
        table = outcome.tableNode
        self.assertGreater(table.GetNumberOfRows(), 0)
        anatomyColumn = table.GetColumnIndex("anatomy")
        self.assertGreaterEqual(anatomyColumn, 0)
        segments = outcome.grounded["segments"]
        self.assertEqual([s["text"] for s in segments["lung_left"]["sentences"]], [report])
        self.assertEqual(segments["lung_right"]["sentences"], [])
        centre = CTFoundationLogic.jumpToAnatomyRow(table, 0)
        self.assertIsNotNone(centre)
        self.delayDisplay("Test passed")
