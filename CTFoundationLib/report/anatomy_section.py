"""The report's per-anatomy findings: a `ReportSection` that grounds each case (anatomy masks, its CT-CLIP
findings and optionally fVLM's on the segments) and draws the positive segments over the key images.

Colours follow `anatomy/colours.py` (the score of a segment picks one of five YlOrRd colours; positives only, at
POSITIVE_ALPHA). Key images are added through the centres of the MAX_SEGMENT_IMAGES highest-scoring positives.
"""

from __future__ import annotations

from html import escape

from CTFoundationLib.anatomy.colours import POSITIVE_ALPHA, score_colour
from CTFoundationLib.anatomy.masks import AnatomyRequest, build_anatomy
from CTFoundationLib.inference.grounding import FVLMScoring, GroundedCase, GroundedSegment, SegmentFinding, ground_case
from CTFoundationLib.inference.results import DetectionResult
from CTFoundationLib.io.volume import CTVolume
from CTFoundationLib.report.keyimages import MarkedPoint, Overlay
from CTFoundationLib.report.sections import ReportSection, SectionOutput
from CTFoundationLib.vocab import FVLM_ORGANS

SECTION_KEY = "anatomy"
MAX_SEGMENT_IMAGES = 2


def anatomy_section(request: AnatomyRequest, fvlm: FVLMScoring) -> ReportSection:
    """The per-anatomy findings section; anatomy from `request` (TotalSegmentator or the built-in fallback)."""

    def compute(volume: CTVolume, detection: DetectionResult) -> SectionOutput:
        anatomy = build_anatomy(volume, request, FVLM_ORGANS)
        scores, fvlm_record = fvlm.score(volume, anatomy)
        case = ground_case(anatomy, detection, scores, [], {"ct-clip": detection.model, "fvlm": fvlm_record},
                           volume.source)
        positives = sorted((s for s in case.segments.values() if s.positive), key=lambda s: -s.score)
        overlays = [Overlay(s.name, anatomy.mask(s.name), score_colour(s.score), POSITIVE_ALPHA) for s in positives]
        points = [MarkedPoint(f"{s.title} centre", tuple(s.centroid_ras_mm)) for s in positives[:MAX_SEGMENT_IMAGES]]
        return SectionOutput(case.to_dict(), section_html(case), points, overlays, anatomy)

    fvlm_settings = (
        {"skipped": fvlm.skipped} if fvlm.runtime is None else
        {"model": fvlm.runtime.model_id, "checkpoint_sha256": fvlm.runtime.checkpoint_sha256,
         "thresholds": dict(fvlm.thresholds or {}), "mode": fvlm.mode,
         **({"notice": fvlm.notice} if fvlm.notice else {})}
    )
    settings = {"totalsegmentator": request.use_totalsegmentator, "fvlm": fvlm_settings}
    return ReportSection(SECTION_KEY, "Findings per anatomy", compute, settings)


def section_html(case: GroundedCase) -> str:
    """A table: one row per segment with its colour swatch, region, volume and positive findings."""
    rows = "\n".join(_row(segment) for segment in case.segments.values())
    fvlm = case.models["fvlm"]
    note = "" if fvlm.get("available", True) else f"<p class='muted'>{escape(str(fvlm['reason']))}</p>"
    if fvlm.get("notice"):
        note += f"<p class='muted'>Note: {escape(str(fvlm['notice']))}</p>"
    return (f"<p class='muted'>Anatomy: {escape(case.anatomy['source'])}. Positive segments are tinted on the key "
            "images by their highest probability (pale yellow &lt; 0.2 … dark red &ge; 0.8).</p>\n" + note +
            "<table class='anatomy'>\n<thead><tr><th></th><th>anatomy</th><th>region</th><th class='num'>ml</th>"
            "<th class='num'>score</th><th>positive findings (CT-CLIP / fVLM P)</th></tr></thead>\n<tbody>\n"
            f"{rows}\n</tbody>\n</table>")


def _row(segment: GroundedSegment) -> str:
    swatch = "" if not segment.positive else (
        "<span class='swatch' style='display:inline-block;width:1em;height:1em;"
        f"background:rgb{score_colour(segment.score)}'></span>")
    findings = ", ".join(_finding_text(f) for f in segment.findings if f.positive) or "—"
    css = " class='positive'" if segment.positive else ""
    return (f"<tr{css}><td>{swatch}</td><td>{escape(segment.title)}</td><td>{escape(segment.region or '—')}</td>"
            f"<td class='num'>{segment.volume_ml:.0f}</td><td class='num'>{segment.score:.3f}</td>"
            f"<td>{escape(findings)}</td></tr>")


def _finding_text(finding: SegmentFinding) -> str:
    scores = " / ".join("—" if s is None else f"{s.probability:.2f}" for s in (finding.ctclip, finding.fvlm))
    return f"{finding.name} ({scores})"
