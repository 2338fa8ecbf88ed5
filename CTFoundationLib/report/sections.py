"""Optional report sections: further result producers (grounded findings, narrative reports...) plug in here.

A section runs once per case on the CT volume and its CT-CLIP detection result. What it returns is stored in
`result.json` under `sections[key]`, its HTML fragment is placed in `report.html` under `title`, and its
points and overlays are drawn on the key images (with key images added through each point).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from CTFoundationLib.anatomy.masks import AnatomyMasks
from CTFoundationLib.inference.results import DetectionResult
from CTFoundationLib.io.volume import CTVolume
from CTFoundationLib.report.keyimages import MarkedPoint, Overlay


@dataclass
class SectionOutput:
    """data: JSON-serialisable. html: a fragment whose text the section has escaped itself. anatomy: the anatomy
    the section made, if any (reused by the DICOM SEG). files: when set, called with the case's output folder to
    write the section's files there; what it returns joins `data`."""

    data: dict
    html: str = ""
    points: Sequence[MarkedPoint] = field(default_factory=tuple)
    overlays: Sequence[Overlay] = field(default_factory=tuple)
    anatomy: AnatomyMasks | None = None
    files: Callable[[Path], dict] | None = None


@dataclass(frozen=True)
class ReportSection:
    """key: stable identifier (result.json key, HTML anchor). key and settings (JSON-ready: what the output
    depends on besides the CT, e.g. model checkpoints and options) are part of the resume key."""

    key: str
    title: str
    compute: Callable[[CTVolume, DetectionResult], SectionOutput]
    settings: Mapping[str, Any] = field(default_factory=dict)
