"""Anatomy: masks from segmentations, RadGenome, TotalSegmentator or the built-in fallback; report sentences placed
on anatomy; the colour map of scored segments."""
