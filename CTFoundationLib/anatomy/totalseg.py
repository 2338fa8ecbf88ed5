"""TotalSegmentator as an optional anatomy source: found when installed, never required.

It runs the "total" task in-process (`totalsegmentator.python_api.totalsegmentator`, multi-label output, the
class ids of `Resources/anatomy/totalsegmentator_classes.json`). Its weights are downloaded by TotalSegmentator
itself on first use; where that is impossible its error is reported as an `AnatomyError`.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import numpy as np

from CTFoundationLib.anatomy.masks import AnatomyMasks, add_labels, totalsegmentator_classes
from CTFoundationLib.errors import AnatomyError
from CTFoundationLib.io.volume import CTVolume


def totalsegmentator_status() -> tuple[bool, str]:
    """(installed, a sentence saying so or why not)."""
    if importlib.util.find_spec("totalsegmentator") is None:
        return False, "not installed (optional: `pip install TotalSegmentator`, then its weights on first use)"
    return True, "installed"


def run_totalsegmentator(volume: CTVolume, device: str = "cpu", progress: Callable[[str], None] | None = None,
                         fast: bool = False) -> AnatomyMasks:
    """Segment `volume` with TotalSegmentator 'total' (v2 ids) -> segments on the volume's own grid."""
    import nibabel as nib
    from totalsegmentator.python_api import totalsegmentator

    if progress:
        progress("TotalSegmentator")
    image = nib.Nifti1Image(np.asarray(volume.hu, dtype=np.int16), volume.affine_ras)
    try:
        result = totalsegmentator(image, None, ml=True, task="total", fast=fast, quiet=True,
                                  device=totalsegmentator_device(device))
    except Exception as error:  # its failures (weights download, licence, memory) come in many types
        raise AnatomyError(
            f"TotalSegmentator failed on {volume.source or 'the CT'} ({type(error).__name__}: {error}); "
            "run it yourself and pass its output with --segmentation, or leave it out to use the built-in fallback"
        ) from error
    labels = np.asarray(result.dataobj).astype(np.int32)
    if labels.shape != volume.shape_ijk:
        raise AnatomyError(f"TotalSegmentator returned a {labels.shape} label map for a {volume.shape_ijk} CT")
    anatomy = AnatomyMasks.for_volume(volume, "TotalSegmentator total" + (" (fast)" if fast else ""))
    add_labels(anatomy, labels, volume.affine_ras, totalsegmentator_classes("total"), "TotalSegmentator")
    return anatomy


def totalsegmentator_device(device: str) -> str:
    """Our device name as TotalSegmentator's: auto/cuda -> gpu (it falls back to CPU), cuda:1 -> gpu:1, cpu, mps."""
    if device == "auto":
        return "gpu"
    return "gpu" + device[len("cuda"):] if device.startswith("cuda") else device
