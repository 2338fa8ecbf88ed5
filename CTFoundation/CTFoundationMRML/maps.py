"""Finding maps <-> MRML: the worker writes one NIfTI map per finding (token grid, in patient space); the module
keeps the files past the job, and shows a finding's map over its CT as the foreground layer of the slice views with a
diverging colour map (blue: evidence against the finding, red: for it), a threshold and an opacity.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import slicer

MAP_COLOUR_NODE_ID = "vtkMRMLColorTableNodeFileDivergingBlueRed.txt"  # a colour table Slicer ships
MAP_ATTRIBUTE = "CTFoundation.findingMap"  # on a map node: the finding it shows
MAP_SOURCE_ROLE = "CTFoundationMapSource"  # map node -> the CT volume it belongs to
DEFAULT_OPACITY = 0.5
DEFAULT_THRESHOLD = 0.3  # fraction of the map's maximum below which nothing is drawn


def keepMapFiles(report: dict) -> dict[str, Path]:
    """Copy the maps a detect job wrote (its `maps` record) out of the job's work folder, which is removed when the
    job ends, into a folder of their own -> {finding: file}; {} when the job wrote none."""
    record = report.get("maps")
    if not record:
        return {}
    source = Path(record["folder"])
    kept = Path(tempfile.mkdtemp(prefix="CTFoundation-maps-"))
    files = {}
    for name, entry in record["findings"].items():
        shutil.copyfile(source / entry["file"], kept / entry["file"])
        files[name] = kept / entry["file"]
    return files


def showFindingMap(volumeNode, finding: str, path: Path, opacity: float = DEFAULT_OPACITY,
                   threshold: float = DEFAULT_THRESHOLD):
    """Load (once per CT and finding) and show a finding's map over `volumeNode`; returns the map's volume node."""
    mapNode = findingMapNode(volumeNode, finding)
    if mapNode is None:
        mapNode = slicer.util.loadVolume(str(path), {"name": f"{volumeNode.GetName()} {finding} map", "show": False})
        mapNode.SetAttribute(MAP_ATTRIBUTE, finding)
        mapNode.SetNodeReferenceID(MAP_SOURCE_ROLE, volumeNode.GetID())
        mapNode.SetAndObserveTransformNodeID(volumeNode.GetTransformNodeID())
        mapNode.CreateDefaultDisplayNodes()
    setMapDisplay(mapNode, threshold)
    slicer.util.setSliceViewerLayers(background=volumeNode, foreground=mapNode, foregroundOpacity=opacity)
    return mapNode


def findingMapNode(volumeNode, finding: str):
    """The map node of `finding` already loaded for this CT, or None."""
    for node in slicer.mrmlScene.GetNodesByClass("vtkMRMLScalarVolumeNode"):
        source = node.GetNodeReferenceID(MAP_SOURCE_ROLE)
        if node.GetAttribute(MAP_ATTRIBUTE) == finding and source == volumeNode.GetID():
            return node
    return None


def setMapDisplay(mapNode, threshold: float) -> None:
    """Diverging colours centred on 0 (window: +- the largest |value|); values below `threshold` x the maximum are
    not drawn."""
    values = slicer.util.arrayFromVolume(mapNode)
    largest = float(np.abs(values).max()) or 1.0
    display = mapNode.GetDisplayNode()
    display.SetAndObserveColorNodeID(MAP_COLOUR_NODE_ID)
    display.SetAutoWindowLevel(False)
    display.SetWindowLevelMinMax(-largest, largest)
    display.SetApplyThreshold(True)
    display.SetLowerThreshold(threshold * max(float(values.max()), 0.0))
    display.SetUpperThreshold(largest)


class MapControls:
    """Under the results table: a click on a finding's row shows its map; sliders set the map's opacity and
    threshold (the fraction of its maximum below which nothing is drawn)."""

    def __init__(self, ui) -> None:
        """The Results section's widgets of the .ui: resultsTableView, mapHintLabel, mapOpacitySlider and
        mapThresholdSlider."""
        self.tableView, self.volumeNode, self.tableNode, self.mapFiles, self.finding = (
            ui.resultsTableView, None, None, {}, None)
        self.label = ui.mapHintLabel
        self.opacity = self._slider(ui.mapOpacitySlider, DEFAULT_OPACITY)
        self.threshold = self._slider(ui.mapThresholdSlider, DEFAULT_THRESHOLD)
        self.tableView.connect("clicked(QModelIndex)", self.onRowClicked)

    def _slider(self, slider, value: float):
        slider.minimum, slider.maximum, slider.singleStep, slider.value = 0.0, 1.0, 0.05, value
        slider.connect("valueChanged(double)", lambda _value: self.refresh())
        return slider

    def setResults(self, volumeNode, tableNode, mapFiles: dict | None) -> None:
        self.volumeNode, self.tableNode, self.mapFiles, self.finding = volumeNode, tableNode, mapFiles or {}, None

    def onRowClicked(self, index) -> None:
        if self.tableNode is None:
            return
        row = self.tableView.sortFilterProxyModel().mapToSource(index).row()
        self.finding = self.tableNode.GetCellText(row, self.tableNode.GetColumnIndex("finding"))
        self.refresh()

    def refresh(self) -> None:
        if self.finding is None:
            return
        if self.finding not in self.mapFiles:
            self.label.text = f"No map for {self.finding} (the model gives none, e.g. a LiPro checkpoint)."
            return
        showFindingMap(self.volumeNode, self.finding, self.mapFiles[self.finding], self.opacity.value,
                       self.threshold.value)
        self.label.text = (f"{self.finding}: red = evidence for, blue = against (each token's share of the "
                           "finding's logit; docs/maps.md).")
