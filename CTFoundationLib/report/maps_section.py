"""The report's finding maps (`report --maps`): a `ReportSection` that computes each case's CT-CLIP finding maps
(inference.maps), adds key images through the hottest point of each positive finding's map (circled there), lists
those points, and writes the positive findings' maps (NIfTI on the CT's grid) into the case's `maps/` folder (only
the positives: a full-size CT's map is hundreds of MB, and a batch has many cases).
"""

from __future__ import annotations

from html import escape
from pathlib import Path

from CTFoundationLib.inference.ctclip import CTCLIPRuntime
from CTFoundationLib.inference.maps import maps_record, write_map_niftis
from CTFoundationLib.inference.results import DetectionResult
from CTFoundationLib.io.volume import CTVolume
from CTFoundationLib.report.keyimages import MarkedPoint
from CTFoundationLib.report.sections import ReportSection, SectionOutput

SECTION_KEY = "maps"
MAPS_FOLDER = "maps"


def maps_section(runtime: CTCLIPRuntime, grid: str = "ct") -> ReportSection:
    """The finding-maps section. The runtime keeps detection's token grid, so the maps cost no second image pass."""
    runtime.require_maps()
    runtime.keep_tokens = True

    def compute(volume: CTVolume, detection: DetectionResult) -> SectionOutput:
        maps = runtime.finding_maps(volume)
        positives = [f.name for f in detection.findings if f.positive]
        hottest = {name: [round(float(v), 2) for v in maps.hottest_ras(name, volume)] for name in positives}
        points = [MarkedPoint(f"{name}: map maximum", tuple(ras)) for name, ras in hottest.items()]

        def write_files(case_folder: Path) -> dict:
            folder = case_folder / MAPS_FOLDER
            written = write_map_niftis(maps, volume, folder, positives, grid) if positives else {}
            record = maps_record(folder, written, runtime.model_id, grid)
            return {"files": {**record, "folder": MAPS_FOLDER}}

        data = {"model": runtime.model_id, "hottest_ras_mm": hottest}
        return SectionOutput(data, section_html(hottest), points, files=write_files)

    return ReportSection(SECTION_KEY, "Where: finding maps", compute, {"grid": grid})


def section_html(hottest: dict[str, list[float]]) -> str:
    """What the maps are, and one row per positive finding with the RAS position of its map's maximum."""
    rows = "\n".join(f"<tr><td>{escape(name)}</td><td class='num'>{', '.join(f'{v:.1f}' for v in ras)}</td></tr>"
                     for name, ras in hottest.items())
    note = ("<p class='muted'>Each map is the exact per-token share of the finding's zero-shot logit in CT-CLIP's "
            "last layer (in the spirit of class activation maps: where the linear head reads the finding from, not "
            "a segmentation; its height within the chest is not reliable, docs/maps.md). Key images are added "
            "through the maximum of each positive finding's map, circled; their maps are in the "
            "<code>maps/</code> folder beside this report (NIfTI, one per positive finding).</p>\n")
    if not hottest:
        return note + "<p>No positive finding.</p>"
    return (note + "<table class='maps'>\n<thead><tr><th>positive finding</th><th class='num'>map maximum "
            "(RAS mm)</th></tr></thead>\n<tbody>\n" + rows + "\n</tbody>\n</table>")
