"""Positive anatomy segments as RGBA overlays for 2-D key images (the batch report draws them over CT slices).

Colour map (fixed): a segment's score (its highest P(positive)) picks one of five ColorBrewer YlOrRd colours,
from pale yellow (score < 0.2) to dark red (score >= 0.8); positive segments are drawn at POSITIVE_ALPHA, the
others are not drawn. Slices are taken from the (i, j, k) masks of `AnatomyMasks` along `axis`.
"""

from __future__ import annotations

import numpy as np

from .anatomy import AnatomyMasks
from .grounded import GroundedCase

SCORE_COLOURS = ((255, 255, 178), (254, 204, 92), (253, 141, 60), (240, 59, 32), (189, 0, 38))  # YlOrRd-5
POSITIVE_ALPHA = 0.6


def score_colour(score: float) -> tuple[int, int, int]:
    """RGB of a score in [0, 1] (five equal bins)."""
    return SCORE_COLOURS[min(int(np.clip(score, 0.0, 1.0) * len(SCORE_COLOURS)), len(SCORE_COLOURS) - 1)]


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
