"""Report text as the CT-CLIP reference trains on it."""

from __future__ import annotations

import math

STRIPPED_CHARACTERS = "\"'()"


def clean_report_text(findings: object) -> str:
    """Findings text with quotes and parentheses removed (the reference's cleaning); '' for a missing value."""
    if findings is None or (isinstance(findings, float) and math.isnan(findings)):
        return ""
    text = str(findings)
    for character in STRIPPED_CHARACTERS:
        text = text.replace(character, "")
    return text.strip()
