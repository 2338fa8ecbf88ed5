"""The one CT volume type of the library: HU voxels plus their geometry and provenance.

Conventions (the same as nibabel's):
- `hu` is indexed (i, j, k) in voxel order as stored; k is usually the slice axis.
- `affine_ras` maps voxel indices (i, j, k, 1) to RAS world coordinates in mm
  (+x toward the patient's Right, +y Anterior, +z Superior).
- Slicer arrays are (k, j, i): `CTVolume.from_kji` wraps them as a transposed view, no copy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import nibabel.orientations as nio
import numpy as np

LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class CTVolume:
    """A CT in Hounsfield units with its voxel-to-world geometry.

    hu: voxel values in HU, axes (i, j, k); int16 when the rescale was integral, else float32.
    affine_ras: 4x4 float64, voxel (i, j, k) -> RAS world mm.
    source: where it came from (file or folder path, or a Slicer node name).
    metadata: facts the reader found (modality, series description, contrast agent, rescale used...).
    """

    hu: np.ndarray
    affine_ras: np.ndarray
    source: str = ""
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.affine_ras = np.asarray(self.affine_ras, dtype=np.float64)
        if self.hu.ndim != 3:
            raise ValueError(f"CTVolume needs a 3-D array, got shape {self.hu.shape}")
        if self.affine_ras.shape != (4, 4):
            raise ValueError(f"affine must be 4x4, got {self.affine_ras.shape}")

    @classmethod
    def from_kji(cls, array_kji: np.ndarray, ijk_to_ras: np.ndarray, source: str = "", metadata=None) -> CTVolume:
        """Wrap a Slicer-style (k, j, i) array without copying it."""
        return cls(array_kji.transpose(2, 1, 0), ijk_to_ras, source, dict(metadata or {}))

    @property
    def shape_ijk(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.hu.shape)

    @property
    def spacing_ijk_mm(self) -> tuple[float, float, float]:
        """Voxel size along i, j, k in mm (column norms of the affine)."""
        return tuple(float(s) for s in np.linalg.norm(self.affine_ras[:3, :3], axis=0))

    @property
    def orientation_code(self) -> str:
        """Closest anatomical direction each voxel axis grows toward, e.g. 'LPS'
        (i->Left, j->Posterior, k->Superior)."""
        return "".join(nio.aff2axcodes(self.affine_ras))

    @property
    def affine_lps(self) -> np.ndarray:
        """Voxel (i, j, k) -> LPS world mm, the DICOM patient frame."""
        return LPS_FROM_RAS @ self.affine_ras

    def extent_mm(self) -> tuple[float, float, float]:
        """Physical size covered along i, j, k (number of voxels x spacing)."""
        return tuple(n * s for n, s in zip(self.shape_ijk, self.spacing_ijk_mm))

    def reoriented(self, axis_codes: str) -> CTVolume:
        """The same volume with voxel axes reordered/flipped so axis n grows toward `axis_codes[n]`.

        Uses views (no copy). `axis_codes` uses the letters L/R, P/A, S/I, e.g. 'LPS'.
        """
        current = nio.io_orientation(self.affine_ras)
        transform = nio.ornt_transform(current, nio.axcodes2ornt(tuple(axis_codes)))
        hu = nio.apply_orientation(self.hu, transform)
        affine = self.affine_ras @ nio.inv_ornt_aff(transform, self.hu.shape)
        return CTVolume(hu, affine, self.source, dict(self.metadata))


def shear_deg(affine: np.ndarray) -> float:
    """The largest deviation from 90° between two voxel axes, in degrees."""
    unit = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    cosines = np.abs(unit.T @ unit)[np.triu_indices(3, k=1)]
    return float(np.degrees(np.arcsin(np.clip(cosines.max(), 0.0, 1.0))))


def obliquity_deg(affine: np.ndarray) -> float:
    """The largest angle between a voxel axis and the world axis nearest to it, in degrees (0: not oblique)."""
    unit = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    return float(np.degrees(np.arccos(np.clip(np.abs(unit).max(axis=0).min(), 0.0, 1.0))))
