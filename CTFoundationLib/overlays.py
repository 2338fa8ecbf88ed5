"""Positive anatomy segments as RGBA overlays for 2-D key images (the batch report draws them over CT slices).

Colour map (fixed): a segment's score (its highest P(positive)) picks one of five ColorBrewer YlOrRd colours,
from pale yellow (score < 0.2) to dark red (score >= 0.8); positive segments are drawn at POSITIVE_ALPHA, the
others are not drawn. In Slicer's segmentation (3-D and 2-D fill) the same colours are used with opacity
`segment_opacity`: positives opaque (1.0), the others faint, from 0.05 (score 0) to 0.3 (score 1). Slices are taken from the (i, j, k) masks of `AnatomyMasks` along `axis`.
"""

from __future__ import annotations

import numpy as np

from .anatomy import AnatomyMasks
from .grounded import GroundedCase

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


def rgba_mask(mask: np.ndarray, colour: tuple[int, int, int], alpha: float = POSITIVE_ALPHA) -> np.ndarray:
    """A 2-D boolean mask -> (H, W, 4) uint8 RGBA: `colour` at `alpha` where True, transparent elsewhere."""
    image = np.zeros((*mask.shape, 4), np.uint8)
    image[mask] = (*colour, round(alpha * 255))
    return image


def positive_overlays(case: GroundedCase, anatomy: AnatomyMasks, axis: int, index: int) -> dict[str, np.ndarray]:
    """Segment name -> RGBA overlay of slice `index` along voxel `axis` (0, 1, 2 = i, j, k), positives only,
    segments absent from that slice left out."""
    overlays = {}
    for name, segment in case.segments.items():
        if not segment.positive:
            continue
        mask = np.take(anatomy.mask(name), index, axis=axis)
        if mask.any():
            overlays[name] = rgba_mask(mask, score_colour(segment.score))
    return overlays
