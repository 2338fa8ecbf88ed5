"""The panel looked at: Resources/UI/CTFoundation.ui rendered offscreen with PySide6 (Testing/panel_render.py;
`make panel-images` writes the PNGs in docs/): sections in the order a radiologist works, no text clipped at
Slicer's panel width (with long run-time status texts filled in), and every widget the module code names present
in the .ui."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import panel_render
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
UI = REPO / "Resources" / "UI" / "CTFoundation.ui"
ORDER = ["Input", "Models", "Detection", "Results", "Similar cases", "Findings per anatomy", "Chat (CT-CHAT)"]


@pytest.fixture(scope="module")
def rendering(tmp_path_factory):
    return panel_render.render(UI, tmp_path_factory.mktemp("panel"), texts=panel_render.EXAMPLE_TEXTS)


def test_sections_in_working_order_and_nothing_clipped(rendering) -> None:
    assert rendering.sections == ORDER
    assert rendering.clipped == []
    assert rendering.minimum_width_px <= panel_render.PANEL_WIDTH_PX
    image = np.asarray(Image.open(rendering.png).convert("L"))
    assert image.shape[1] == panel_render.PANEL_WIDTH_PX and image.shape[0] == rendering.size[1] > 1000
    assert image.std() > 10  # drawn widgets and text, not a blank page


def test_the_clipping_check_sees_a_squeezed_panel(tmp_path) -> None:
    squeezed = panel_render.render(UI, tmp_path, width_px=260)
    assert "downloadWeightsButton: Download" in squeezed.clipped


def test_every_widget_the_module_uses_is_in_the_ui() -> None:
    """`self.ui.name` in the module and `ui.name` in its panels (chat, similar cases, maps): each an object of the
    .ui, which is the whole layout (no section or widget is built in code)."""
    names = set(re.findall(r'name="(\w+)"', UI.read_text(encoding="utf-8")))
    module = REPO / "CTFoundation"
    used = set(re.findall(r"self\.ui\.(\w+)", (module / "CTFoundation.py").read_text(encoding="utf-8")))
    for panel in ("CTFoundationChat/__init__.py", "CTFoundationSimilar/__init__.py", "CTFoundationMRML/maps.py"):
        used |= set(re.findall(r"\bui\.(\w+)", (module / panel).read_text(encoding="utf-8")))
    assert len(used) >= 45 and used <= names, sorted(used - names)
    for panel in module.glob("CTFoundation*/*.py"):
        assert not re.search(r"qt\.Q\w*(Layout|Button|Label|Widget|SpinBox|ComboBox)\(|ctk\.ctk\w+\(",
                             panel.read_text(encoding="utf-8")), f"{panel.name} builds widgets; put them in the .ui"


def test_the_docs_show_the_current_panel() -> None:
    png = REPO / "docs" / "CTFoundation.png"
    assert png.is_file(), "run `make panel-images`"
    assert Image.open(png).size[0] == panel_render.PANEL_WIDTH_PX
