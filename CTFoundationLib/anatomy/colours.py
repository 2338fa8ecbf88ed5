"""The anatomy colour map, shared by the batch report's key images and the Slicer segmentation.

Colour map (fixed): a segment's score (its highest P(positive)) picks one of five ColorBrewer YlOrRd colours,
from pale yellow (score < 0.2) to dark red (score >= 0.8); positive segments are drawn at POSITIVE_ALPHA, the
others are not drawn. In Slicer's segmentation (3-D and 2-D fill) the same colours are used with opacity
`segment_opacity`: positives opaque (1.0), the others faint, from 0.05 (score 0) to 0.3 (score 1).
"""

from __future__ import annotations

import numpy as np

SCORE_COLOURS = ((255, 255, 178), (254, 204, 92), (253, 141, 60), (240, 59, 32), (189, 0, 38))  # YlOrRd-5
POSITIVE_ALPHA = 0.6
NEGATIVE_OPACITY = (0.05, 0.3)  # a non-positive segment's opacity at score 0 and at score 1


def score_colour(score: float) -> tuple[int, int, int]:
    """RGB of a score in [0, 1] (five equal bins)."""
    return SCORE_COLOURS[min(int(np.clip(score, 0.0, 1.0) * len(SCORE_COLOURS)), len(SCORE_COLOURS) - 1)]


def segment_opacity(score: float, positive: bool) -> float:
    """Display opacity of a whole segment: 1 when positive, else rising linearly with its score."""
    low, high = NEGATIVE_OPACITY
    return 1.0 if positive else round(low + (high - low) * float(np.clip(score, 0.0, 1.0)), 4)
