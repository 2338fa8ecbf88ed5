"""Rough anatomical landmarks on a CT-CLIP tensor (axis 0 -> superior, 1 -> left, 2 -> posterior; HU/1000).

Used by the orientation tests: each function measures a fact of chest anatomy that a wrong axis order
or a flipped axis would contradict.
"""

from __future__ import annotations

import numpy as np
import scipy.ndimage as ndi

LUNG_MAX = -0.5  # HU < -500
SOFT_TISSUE = (-0.1, 0.15)  # -100 .. 150 HU
BONE_MIN = 0.25  # HU > 250


def body_mask(values: np.ndarray) -> np.ndarray:
    """Largest connected non-air region with holes filled per axial slice."""
    tissue = values > LUNG_MAX
    labels, count = ndi.label(tissue)
    sizes = ndi.sum(tissue, labels, range(1, count + 1))
    body = labels == (int(np.argmax(sizes)) + 1)
    return np.stack([ndi.binary_fill_holes(s) for s in body])


def lung_mask(values: np.ndarray, body: np.ndarray) -> np.ndarray:
    """The largest air-filled component inside the body: both lungs joined through the airways."""
    air = (values < LUNG_MAX) & body
    labels, count = ndi.label(air)
    sizes = ndi.sum(air, labels, range(1, count + 1))
    return labels == (int(np.argmax(sizes)) + 1)


def scanned_extent(values: np.ndarray, pad_value: float = -1.0) -> tuple[int, int]:
    """First and last axis-0 slice that holds image data rather than padding."""
    rows = np.nonzero((values != pad_value).any(axis=(1, 2)))[0]
    return int(rows[0]), int(rows[-1])


def lung_extent(lungs: np.ndarray) -> tuple[int, int]:
    """First and last axis-0 slice holding a real amount of lung."""
    area = lungs.sum(axis=(1, 2))
    rows = np.nonzero(area > 0.05 * area.max())[0]
    return int(rows[0]), int(rows[-1])


def bowel_gas_axis0(values: np.ndarray, body: np.ndarray, lungs: np.ndarray, min_voxels: int = 1000) -> float:
    """Axis-0 centre of the air pockets inside the body that are not lung (stomach and colon gas)."""
    gas = (values < LUNG_MAX) & body & ~lungs
    labels, count = ndi.label(gas)
    sizes = ndi.sum(gas, labels, range(1, count + 1))
    pockets = np.isin(labels, 1 + np.nonzero(sizes >= min_voxels)[0])
    return float(ndi.center_of_mass(pockets)[0])


def heart_offset_axis1(values: np.ndarray, body: np.ndarray, lungs: np.ndarray) -> float:
    """Heart centre minus body midline along axis 1, in voxels (positive = toward axis-1's end).

    Heart = soft tissue between the lungs (per anterior-posterior row, between the outermost lung voxels)
    in the lower half of the lung extent.
    """
    first, last = lung_extent(lungs)
    lower = slice(first + (last - first) // 8, first + (last - first) // 2)
    between = np.zeros_like(lungs[lower])
    for z, plane in enumerate(lungs[lower]):
        for row in range(plane.shape[1]):
            cols = np.nonzero(plane[:, row])[0]
            if cols.size:
                between[z, cols[0] : cols[-1] + 1, row] = True
    soft = (values[lower] > SOFT_TISSUE[0]) & (values[lower] < SOFT_TISSUE[1])
    heart = between & soft & ~lungs[lower]
    return ndi.center_of_mass(heart)[1] - ndi.center_of_mass(body[lower])[1]


def spine_offset_axis2(values: np.ndarray, body: np.ndarray) -> float:
    """Centre of the bone in the midline band minus the body centre along axis 2, in voxels."""
    midline = int(round(ndi.center_of_mass(body)[1]))
    band = slice(midline - 15, midline + 16)
    bone = (values[:, band] > BONE_MIN) & body[:, band]
    return ndi.center_of_mass(bone)[2] - ndi.center_of_mass(body[:, band])[2]
