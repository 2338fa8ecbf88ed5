"""Where each finding is in a training volume: finding masks read from files, turned into token targets.

Layout of `data.finding_masks`: `<folder>/<volume stem>/<finding>.nii.gz`, one mask per finding present in the
volume, on the volume's own voxel grid (non-zero = the finding's voxels), named after the CT-RATE finding with
spaces as underscores (`Lung_nodule.nii.gz`); the volume stem is its file name without `.nii.gz`
(`train_1_a_1`). A volume without a folder has no masks (its findings train without a localisation term).

A token is a target of a finding when its centre, placed in the CT by the same geometry as the finding maps
(`inference.maps.TokenGrid`: the preprocessing inverted, then the patch size), lies within `radius_mm` of one of
the finding's voxels, so a map whose maximum is on a target token points at the finding within that distance.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy.spatial import cKDTree

from CTFoundationLib.errors import TrainingError
from CTFoundationLib.inference.maps import TokenGrid
from CTFoundationLib.io.volume import CTVolume
from CTFoundationLib.preprocess import PreprocessSpec
from CTFoundationLib.vocab import CT_RATE_ABNORMALITIES

SUFFIX = ".nii.gz"


def mask_file_name(finding: str) -> str:
    return finding.replace(" ", "_") + SUFFIX


def read_finding_masks(folder: Path, volume: CTVolume) -> dict[str, np.ndarray]:
    """finding -> bool mask (volume's (i, j, k) grid) of every file in `folder`; {} when the folder is absent."""
    if not folder.is_dir():
        return {}
    masks = {}
    for path in sorted(folder.glob("*" + SUFFIX)):
        finding = path.name.removesuffix(SUFFIX).replace("_", " ")
        if finding not in CT_RATE_ABNORMALITIES:
            raise TrainingError(f"{path}: not a finding mask; name it after a CT-RATE finding, e.g. Lung_nodule.nii.gz")
        try:
            mask = np.asarray(nib.load(str(path)).dataobj) != 0
        except Exception as error:  # nibabel raises several types for damaged files
            raise TrainingError(f"{path}: cannot read this NIfTI mask ({error})") from None
        if mask.shape != volume.shape_ijk:
            raise TrainingError(f"{path}: mask of shape {mask.shape}, but its volume {volume.source} is "
                                f"{volume.shape_ijk}; write the mask on the volume's own grid")
        masks[finding] = mask
    return masks


class FindingMasks:
    """Token targets of the volumes from their mask files: (18, *token grid) bool per volume, CT-RATE's finding
    order; only `findings` get targets (their masks are the only ones read into them)."""

    def __init__(self, folder: Path, spec: PreprocessSpec, patch: Sequence[int], radius_mm: float,
                 findings: Sequence[str] = CT_RATE_ABNORMALITIES) -> None:
        if spec.shape is None:
            raise TrainingError(f"finding masks need a fixed model input shape; {spec.name} has none")
        self.folder, self.spec, self.patch, self.radius_mm = Path(folder), spec, tuple(patch), radius_mm
        self.findings = set(findings)
        self.token_shape = tuple(n // p for n, p in zip(spec.shape, patch))

    def token_targets(self, volume: CTVolume, stem: str) -> np.ndarray:
        """(18, t, h, w) bool: the tokens within radius_mm of each finding's voxels (none without a mask)."""
        names = CT_RATE_ABNORMALITIES
        targets = np.zeros((len(names), *self.token_shape), bool)
        masks = read_finding_masks(self.folder / stem, volume)
        if not masks:
            return targets
        grid = TokenGrid.of_model_input(volume, self.spec, self.patch, self.token_shape)
        centres, inside = token_centre_voxels(grid, volume)
        spacing_mm = np.asarray(volume.spacing_ijk_mm)
        for finding, mask in masks.items():
            if finding in self.findings and mask.any():
                # Distances from the token centres only (a tree of the finding's voxels), not a whole-volume EDT.
                voxels = cKDTree(np.argwhere(mask) * spacing_mm)
                distance, _ = voxels.query(centres.T * spacing_mm, distance_upper_bound=self.radius_mm + 1.0)
                targets[names.index(finding)] = (inside & (distance <= self.radius_mm)).reshape(self.token_shape)
        return targets


def token_centre_voxels(grid: TokenGrid, volume: CTVolume) -> tuple[np.ndarray, np.ndarray]:
    """(3, tokens) the CT voxel nearest each token centre (clipped into the CT) and (tokens,) whether the centre
    lies inside the CT at all; tokens in C order of the grid."""
    to_voxel = np.linalg.inv(volume.affine_ras) @ grid.affine_ras
    index = np.indices(grid.shape).reshape(3, -1)
    voxels = np.rint(to_voxel[:3, :3] @ index + to_voxel[:3, 3:]).astype(int)
    upper = np.array(volume.shape_ijk)[:, None]
    inside = np.all((voxels >= 0) & (voxels < upper), axis=0)
    return np.clip(voxels, 0, upper - 1), inside
