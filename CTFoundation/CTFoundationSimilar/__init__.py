"""CTFoundation's Similar cases in Slicer: the most similar cases of a case index for the input CT.

The query CT is encoded and searched by the background worker (`similar` task: torch never runs in Slicer's
process); this file writes the request, reads the worker's JSON of hits, shows them (thumbnail, similarity,
findings, report excerpt) and loads a hit's CT when its file is reachable from this computer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import ctk
import qt
import slicer
from slicer import vtkMRMLScalarVolumeNode
from slicer.i18n import tr as _

from CTFoundationLib.errors import CTFoundationError, CTInputError

INDEX_SETTING = "CTFoundation/SimilarCasesIndex"  # the index folder, kept between Slicer sessions
COLUMNS = (_("Image"), _("Similarity"), _("Case"), _("Findings"), _("Report"))


@dataclass
class SimilarCasesOutcome:
    """What `similarCases` returns. hits: best first, each `CTFoundationLib.retrieval.describe_hit`'s dict
    (case_id, score, source_path, reachable, thumbnail, findings, report)."""

    hits: list[dict]
    index: str
    model: str


def similarCases(logic, volumeNode: vtkMRMLScalarVolumeNode, indexFolder, k: int = 5, target: str = "images",
                 device: str | None = None, waitForCompletion: bool = True, callback=None, progress=None):
    """The k cases of the index most similar to the volume, computed by the worker with the index's own model.

    target: "images" (image->image) or "reports" (image->report). Waiting: a SimilarCasesOutcome (raises a
    CTFoundationError on failure); not waiting: the BackgroundTask, callback(outcome, error) at the end.
    """
    import json

    from CTFoundationLib.retrieval import index_model_id

    indexFolder = Path(indexFolder)
    model = index_model_id(indexFolder)  # a missing or damaged index is a clear error before any work

    def arguments(workDir: Path) -> tuple[str, dict]:
        return "similar", {**logic._volumeRequest(volumeNode, workDir), **logic._modelOptions(model, device),
                           "index": str(indexFolder), "k": int(k), "target": target,
                           "out": str(workDir / "similar.json")}

    def outcome(task, workDir: Path) -> SimilarCasesOutcome:
        task.process.outcome()  # raises WorkerError with the reason when it failed or was cancelled
        found = json.loads((workDir / "similar.json").read_text(encoding="utf-8"))
        return SimilarCasesOutcome(found["hits"], found["index"], found["model"])

    return logic._runInBackground("similar", arguments, outcome, waitForCompletion, callback, progress)


def loadSimilarCase(hit: dict) -> vtkMRMLScalarVolumeNode:
    """Load a hit's CT into the scene: a CT file as it is, a DICOM folder through its first file (the reader
    takes the whole series). A CTInputError when the file is not reachable from this computer."""
    source = Path(hit["source_path"])
    if source.is_dir():
        files = sorted(path for path in source.iterdir() if path.is_file())
        source = files[0] if files else source
    if not source.is_file():
        raise CTInputError(f"{hit['source_path']}: the case's CT is not reachable from this computer")
    if source.suffix == ".safetensors":
        raise CTInputError(f"{source}: the case was indexed from an embedding file; there is no image to load")
    node = slicer.util.loadVolume(str(source))
    if node.GetName() != hit["case_id"]:  # named by the case, not by the file (often ct.nii.gz or a DICOM file)
        node.SetName(slicer.mrmlScene.GenerateUniqueName(hit["case_id"]))
    return node


class SimilarCasesPanel:
    """The Similar cases section: index folder, number of cases, Find (or Cancel), the hits table, Load case."""

    def __init__(self, logic, ui, currentVolume) -> None:
        """The .ui's Similar cases section (similarCollapsibleButton and its similar* widgets)."""
        self.logic, self.currentVolume = logic, currentVolume
        self.task = None
        self.hits: list[dict] = []
        self.indexEdit = ui.similarIndexPathLineEdit
        self.indexEdit.filters = ctk.ctkPathLineEdit.Dirs
        self.indexEdit.currentPath = str(qt.QSettings().value(INDEX_SETTING, ""))
        self.countSpinBox, self.targetSelector = ui.similarCountSpinBox, ui.similarTargetSelector
        self.targetSelector.addItem(_("by image"), "images")
        self.targetSelector.addItem(_("by report"), "reports")
        self.findButton, self.statusLabel = ui.similarFindButton, ui.similarStatusLabel
        self.findButton.connect("clicked(bool)", self.onFindOrCancel)
        self.table = ui.similarTableWidget
        self.table.setColumnCount(len(COLUMNS))
        self.table.setHorizontalHeaderLabels(list(COLUMNS))
        self.table.setSelectionBehavior(qt.QAbstractItemView.SelectRows)
        self.table.setEditTriggers(qt.QAbstractItemView.NoEditTriggers)
        self.table.horizontalHeader().setStretchLastSection(True)
        self.table.connect("itemSelectionChanged()", self.updateLoadButton)
        self.loadButton = ui.similarLoadButton
        self.loadButton.connect("clicked(bool)", self.onLoad)

    def onResultsShown(self) -> None:
        """After detection: search at once when an index is chosen (in the background)."""
        if self.task is None and self.indexEdit.currentPath:
            self.onFindOrCancel()

    def onFindOrCancel(self) -> None:
        if self.task is not None:
            self.task.cancel()
            return
        volumeNode, folder = self.currentVolume(), self.indexEdit.currentPath
        if volumeNode is None or not folder:
            self.statusLabel.text = _("choose an input CT and a case index")
            return
        qt.QSettings().setValue(INDEX_SETTING, folder)
        try:
            self.task = similarCases(self.logic, volumeNode, folder, self.countSpinBox.value,
                                     self.targetSelector.currentData, waitForCompletion=False,
                                     callback=self.onFinished, progress=self.onProgress)
        except CTFoundationError as error:  # a bug is not caught here: it reaches Slicer's log with its traceback
            self.statusLabel.text = _("failed")
            slicer.util.errorDisplay(str(error))
            return
        self.findButton.text = _("Cancel")
        self.statusLabel.text = _("starting")

    def onProgress(self, step: str, fraction: float) -> None:
        self.statusLabel.text = f"{step} ({100 * fraction:.0f} %)"

    def onFinished(self, outcome: SimilarCasesOutcome | None, error: Exception | None) -> None:
        cancelled = self.task is not None and self.task.process.cancelled
        self.task = None
        self.findButton.text = _("Find similar cases")
        if error is not None:
            self.statusLabel.text = _("cancelled") if cancelled else _("failed")
            if not cancelled:
                slicer.util.errorDisplay(str(error))
            return
        self.statusLabel.text = _("{count} cases from {model}").format(count=len(outcome.hits), model=outcome.model)
        self.show(outcome.hits)

    def show(self, hits: list[dict]) -> None:
        self.hits = hits
        self.table.setRowCount(len(hits))
        for row, hit in enumerate(hits):
            if hit["thumbnail"]:  # drawn by the cell itself (its decoration), no widget per row
                pixmap, image = qt.QPixmap(hit["thumbnail"]), qt.QTableWidgetItem()
                image.setData(qt.Qt.DecorationRole, pixmap)
                self.table.setItem(row, 0, image)
                self.table.setRowHeight(row, pixmap.height() + 4)
                self.table.setIconSize(pixmap.size())
            findings = _("not recorded") if hit["findings"] is None else (", ".join(hit["findings"]) or _("none"))
            for column, text in enumerate((f"{hit['score']:.3f}", hit["case_id"], findings, hit["report"] or ""), 1):
                item = qt.QTableWidgetItem(text)
                item.setToolTip(hit["report"] if column == 4 and hit["report"] else hit["source_path"])
                self.table.setItem(row, column, item)
        self.table.resizeColumnsToContents()
        self.updateLoadButton()

    def selectedHit(self) -> dict | None:
        rows = {item.row() for item in self.table.selectedItems()}
        return self.hits[rows.pop()] if len(rows) == 1 else None

    def updateLoadButton(self) -> None:
        hit = self.selectedHit()
        self.loadButton.enabled = hit is not None and hit["reachable"]
        self.loadButton.toolTip = (hit["source_path"] if hit is not None and hit["reachable"]
                                   else _("the selected case's CT is not reachable from this computer"))

    def onLoad(self) -> None:
        hit = self.selectedHit()
        if hit is None:
            return
        try:
            node = loadSimilarCase(hit)
        except (CTFoundationError, RuntimeError) as error:  # RuntimeError: Slicer's loadVolume could not read it
            slicer.util.errorDisplay(str(error))
            return
        slicer.util.setSliceViewerLayers(background=node, fit=True)

    def cleanup(self) -> None:
        if self.task is not None:
            self.task.cancel()
