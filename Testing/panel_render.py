"""Render the module panel (Resources/UI/*.ui) offscreen with PySide6 into PNGs, and measure what a user would
see: the sections top to bottom and every text that does not fit its widget.

The .ui is the layout; Slicer's own widget classes (ctk, qMRML) are not in PySide6, so each is drawn as the Qt
widget it derives from (a collapsible section as a titled box, a node selector as a combo box showing its "none"
text, a path editor as a line edit, an MRML table view as a table with the findings-table columns). Sections are
drawn expanded, so that every label is looked at; progress bars are hidden, as the module hides them until a job
runs; combo boxes the module fills at run time (models, devices) are empty; status labels hold long examples of
what the module writes there (EXAMPLE_TEXTS).

    QT_QPA_PLATFORM=offscreen python Testing/panel_render.py [OUT_FOLDER]   # default docs/
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
UI_FOLDER = REPO / "Resources" / "UI"
PANEL_WIDTH_PX = 400  # about Slicer's module panel at its default width
# What the module writes into its status labels at run time (long cases), drawn into the picture and checked for
# clipping with the rest.
EXAMPLE_TEXTS = {
    "inputWarningsLabel": "THICK_SLICES: slices are 5.00 mm thick (> 3 mm); the models were trained on thin-slice CT",
    "weightsStatusLabel": "installed (1.23 GB) in /home/radiologist/.cache/ctfoundation/models/ct-clip-v2",
    "dependenciesLabel": "Python packages missing in Slicer: torch>=2.1, monai>=1.3, nibabel>=5.0, transformers>=4.40",
    "detectStatusLabel": "encode image",
    "resultsSummaryLabel": "ct-clip-v2 (zero-shot): 3 positive: Emphysema, Lung nodule, Pleural effusion",
    "groundStatusLabel": "Positive segments: lung_left, lung_right, lung_lower_lobe_right",
    "chatStatusLabel": "ready: ct-chat-llama3.1-8b on cuda:0",
}
TABLE_COLUMNS = {"resultsTableView": ("finding", "probability", "threshold", "positive", "model"),
                 "anatomyTableView": ("anatomy", "title", "region", "finding", "ctclip", "fvlm", "positive", "score"),
                 "similarTableWidget": ("Image", "Similarity", "Case", "Findings", "Report")}


@dataclass
class Rendering:
    png: Path
    sections: list[str]  # collapsible-section titles, top to bottom
    clipped: list[str] = field(default_factory=list)  # "objectName: text" of texts that do not fit
    size: tuple[int, int] = (0, 0)
    minimum_width_px: int = 0  # the narrowest the layout can be without squeezing a widget


@cache
def _widget_classes():
    """PySide6 classes named as Slicer's, each the Qt widget its .ui <extends> names (kept alive: the loader
    holds no Python reference to a registered class)."""
    from PySide6 import QtCore, QtWidgets

    class ctkCollapsibleButton(QtWidgets.QGroupBox):  # noqa: N801 (Slicer's class names)
        def setText(self, text: str) -> None:
            self.setTitle(text)

    class ctkCollapsibleGroupBox(QtWidgets.QGroupBox):  # noqa: N801
        pass

    class ctkPathLineEdit(QtWidgets.QLineEdit):  # noqa: N801
        pass

    class ctkSliderWidget(QtWidgets.QSlider):  # noqa: N801 (a slider with its value box, drawn as the slider)
        def __init__(self, parent=None) -> None:
            super().__init__(QtCore.Qt.Orientation.Horizontal, parent)

    class qMRMLNodeComboBox(QtWidgets.QComboBox):  # noqa: N801
        pass

    class qMRMLTableView(QtWidgets.QTableView):  # noqa: N801
        pass

    class qMRMLWidget(QtWidgets.QWidget):  # noqa: N801
        pass

    return (ctkCollapsibleButton, ctkCollapsibleGroupBox, ctkPathLineEdit, ctkSliderWidget, qMRMLNodeComboBox,
            qMRMLTableView, qMRMLWidget)


def _application():
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from PySide6 import QtWidgets

    return QtWidgets.QApplication.instance() or QtWidgets.QApplication([])


def _quiet_scene_signals(kind, context, message: str) -> None:
    """Drop Qt's notes about the .ui's mrmlSceneChanged connections (MRML signals the stand-in classes lack)."""
    if "mrmlSceneChanged" not in message and "QObject::connect" not in message:
        print(message, file=sys.stderr)


def load_panel(ui_path: Path):
    """The .ui's widget tree, with Slicer's classes drawn as their Qt bases and sections expanded."""
    from PySide6 import QtCore, QtGui, QtUiTools, QtWidgets

    _application()
    QtCore.qInstallMessageHandler(_quiet_scene_signals)
    loader = QtUiTools.QUiLoader()
    for cls in _widget_classes():
        loader.registerCustomWidget(cls)
    ui_file = QtCore.QFile(str(ui_path))
    ui_file.open(QtCore.QFile.ReadOnly)
    panel = loader.load(ui_file)
    ui_file.close()
    if panel is None:
        raise RuntimeError(f"{ui_path}: {loader.errorString()}")
    for box in panel.findChildren(QtWidgets.QGroupBox):  # a collapsible section's title comes from its text
        text = box.property("text")
        if text:
            box.setTitle(text)
    for combo in panel.findChildren(QtWidgets.QComboBox):  # a node selector shows its "none" text
        if type(combo).__name__ == "qMRMLNodeComboBox":
            combo.addItem(combo.property("noneDisplay") or "None")
    for bar in panel.findChildren(QtWidgets.QProgressBar):  # the module hides them until a job runs
        bar.hide()
    for table in panel.findChildren(QtWidgets.QTableView):
        columns = list(TABLE_COLUMNS.get(table.objectName(), ()))
        if isinstance(table, QtWidgets.QTableWidget):  # the module sets its columns as it does here
            table.setColumnCount(len(columns))
            table.setHorizontalHeaderLabels(columns)
            continue
        model = QtGui.QStandardItemModel(0, len(columns), table)
        model.setHorizontalHeaderLabels(columns)
        table.setModel(model)
    return panel


def clipped_texts(panel) -> list[str]:
    """Visible labels, buttons and group titles whose text is wider (or taller, when wrapped) than the widget."""
    from PySide6 import QtWidgets

    clipped = []
    for widget in panel.findChildren(QtWidgets.QWidget):
        if not widget.isVisibleTo(panel):
            continue
        if isinstance(widget, QtWidgets.QLabel) and widget.text():
            fits = (widget.height() >= widget.heightForWidth(widget.width()) if widget.wordWrap()
                    else widget.width() >= widget.sizeHint().width())
        elif isinstance(widget, QtWidgets.QAbstractButton) and widget.text():
            fits = widget.width() >= widget.sizeHint().width()
        elif isinstance(widget, QtWidgets.QGroupBox) and widget.title():
            fits = widget.width() >= widget.fontMetrics().horizontalAdvance(widget.title()) + 20
        else:
            continue
        if not fits:
            clipped.append(f"{widget.objectName()}: {widget.property('text') or widget.title()}")
    return clipped


def section_titles(panel) -> list[str]:
    """Collapsible-section titles in the order they appear on screen, top to bottom."""
    from PySide6 import QtWidgets

    sections = [box for box in panel.findChildren(QtWidgets.QGroupBox) if type(box).__name__ == "ctkCollapsibleButton"]
    return [box.title() for box in sorted(sections, key=lambda box: box.mapTo(panel, box.rect().topLeft()).y())]


def render(ui_path: Path, out_folder: Path, width_px: int = PANEL_WIDTH_PX, texts: dict | None = None) -> Rendering:
    """Lay the panel out at `width_px` and its natural height, save OUT/<ui name>.png, measure it.
    texts: {objectName: text} set first, e.g. what the module writes into its status labels at run time."""
    from PySide6 import QtWidgets

    panel = load_panel(ui_path)
    for name, text in (texts or {}).items():
        panel.findChild(QtWidgets.QWidget, name).setText(text)
    height = panel.heightForWidth(width_px) if panel.hasHeightForWidth() else -1
    panel.setFixedSize(width_px, max(height, panel.sizeHint().height()))  # fixed: a narrow panel squeezes, as a dock
    panel.show()
    _application().processEvents()
    out_folder.mkdir(parents=True, exist_ok=True)
    png = out_folder / f"{ui_path.stem}.png"
    if not panel.grab().save(str(png)):
        raise RuntimeError(f"could not write {png}")
    rendering = Rendering(png, section_titles(panel), clipped_texts(panel), (panel.width(), panel.height()),
                          panel.layout().minimumSize().width())
    panel.close()
    return rendering


def main(argv: list[str]) -> int:
    out_folder = Path(argv[0]) if argv else REPO / "docs"
    for ui_path in sorted(UI_FOLDER.glob("*.ui")):
        rendering = render(ui_path, out_folder, texts=EXAMPLE_TEXTS if ui_path.stem == "CTFoundation" else None)
        print(f"{rendering.png} {rendering.size[0]}x{rendering.size[1]} px; sections: {', '.join(rendering.sections)}")
        for text in rendering.clipped:
            print(f"  clipped: {text}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
