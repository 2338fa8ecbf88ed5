"""Built-in anatomy without model weights: body, lungs (left/right), airway and bone from HU thresholds and
connected components (scipy.ndimage). CPU only; what it cannot segment is reported, never guessed.

Steps, on the CT viewed in LPS voxel order (axis 0 -> patient left, 1 -> posterior, 2 -> superior):
1. body = largest connected region above AIR_HU, holes filled per axial slice;
2. lung air = air (< AIR_HU) inside the body, the largest connected region plus any other one at least
   SECOND_LUNG_FRACTION of it (a lung not joined to the other through the airway);
3. airway = dark air (after a 1-voxel Gaussian) connected to the topmost midline air tube (the trachea), at
   the most lenient threshold of AIRWAY_HU before the region explodes into the lungs (grows more than
   AIRWAY_LEAK_GROWTH times in one step, or beyond AIRWAY_MAX_ML);
4. lungs = lung air without the airway, split into the two largest parts (eroded apart if they touch) and
   named left/right by their centre in patient coordinates; vessels and opacities filled per axial slice;
5. bone = voxels above BONE_HU inside the body in parts of at least BONE_MIN_ML, holes filled per slice.
"""

from __future__ import annotations

from collections.abc import Callable

import nibabel.orientations as nio
import numpy as np
import scipy.ndimage as ndi

from CTFoundationLib.anatomy.masks import AnatomyMasks, anatomy_info
from CTFoundationLib.io.volume import CTVolume

AIR_HU = -400.0
AIRWAY_HU = tuple(range(-975, -575, 25))  # thresholds tried from strict to lenient
AIRWAY_LEAK_GROWTH = 2.0  # a step that more than doubles the airway means it leaked into the lungs
AIRWAY_MAX_ML = 250.0
TRACHEA_AREA_CM2 = (0.8, 8.0)
TRACHEA_MIDLINE_MM = 35.0
MIN_LUNG_ML = 300.0
SECOND_LUNG_FRACTION = 0.15
LUNG_PIECE_ML = 1.0
BONE_HU = 250.0
BONE_MIN_ML = 0.5
WORK_ORIENTATION = "LPS"


def fallback_anatomy(volume: CTVolume, progress: Callable[[str], None] | None = None) -> AnatomyMasks:
    """Body, lungs, airway and bone of `volume`; a missing part is listed in `unavailable` with the reason."""
    say = progress or (lambda message: None)
    work = volume.reoriented(WORK_ORIENTATION)
    spacing = np.array(work.spacing_ijk_mm)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    anatomy = AnatomyMasks.for_volume(volume, "built-in HU-threshold segmentation")
    back = _back_to_volume(volume)

    say("fallback: body")
    body = body_mask(work.hu)
    anatomy.add(anatomy_info("body"), back(body))
    say("fallback: bone")
    anatomy.add(anatomy_info("bone"), back(bone_mask(work.hu, body, voxel_ml)))
    say("fallback: lungs")
    lung_air = lung_air_mask(work.hu, body, voxel_ml)
    if lung_air is None:
        reason = f"no air-filled region of at least {MIN_LUNG_ML:.0f} ml inside the body (is this a chest CT?)"
        for name in ("lung_left", "lung_right", "airway"):
            anatomy.unavailable[name] = reason
        return anatomy
    say("fallback: airway")
    airway = airway_mask(work.hu, lung_air, body, spacing)
    if airway is None:
        anatomy.unavailable["airway"] = "no trachea-like midline air tube found at the top of the lungs"
        airway = np.zeros_like(lung_air)
    else:
        anatomy.add(anatomy_info("airway"), back(airway))
    left, right = split_lungs(lung_air & ~airway, voxel_ml)
    for name, lung in (("lung_left", left), ("lung_right", right)):
        anatomy.add(anatomy_info(name), back(fill_slices(lung) & ~airway))
    return anatomy


def _back_to_volume(volume: CTVolume) -> Callable[[np.ndarray], np.ndarray]:
    """Map an array of the LPS view back to the volume's own voxel order (axis permutation and flips, no copy)."""
    to_volume = nio.ornt_transform(nio.axcodes2ornt(tuple(WORK_ORIENTATION)), nio.io_orientation(volume.affine_ras))
    return lambda array: nio.apply_orientation(array, to_volume)


def largest_components(mask: np.ndarray, count: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(labels, ids of the `count` largest connected components, largest first)."""
    labels, n = ndi.label(mask)
    sizes = np.bincount(labels.ravel())[1:]
    return labels, np.argsort(sizes)[::-1][:count] + 1 if n else np.array([], int)


def fill_slices(mask: np.ndarray) -> np.ndarray:
    """Fill holes in every axial (axis 2) slice."""
    filled = np.empty_like(mask)
    for k in range(mask.shape[2]):
        filled[:, :, k] = ndi.binary_fill_holes(mask[:, :, k])
    return filled


def body_mask(hu: np.ndarray) -> np.ndarray:
    """Largest connected non-air region, holes filled per axial slice."""
    labels, largest = largest_components(hu >= AIR_HU)
    return fill_slices(labels == largest[0])


def lung_air_mask(hu: np.ndarray, body: np.ndarray, voxel_ml: float) -> np.ndarray | None:
    """Air inside the body belonging to the lungs and airways, or None when there is no lung-sized region."""
    labels, n = ndi.label((hu < AIR_HU) & body)
    sizes = np.bincount(labels.ravel())[1:]
    if not n or sizes.max() * voxel_ml < MIN_LUNG_ML:
        return None
    keep = np.nonzero(sizes >= SECOND_LUNG_FRACTION * sizes.max())[0][:2] + 1
    return np.isin(labels, keep)


def trachea_seed(lung_air: np.ndarray, body: np.ndarray, spacing: np.ndarray) -> tuple[int, int, int] | None:
    """A voxel of the topmost midline air tube of trachea size, searching down from the top of the lungs."""
    midline = ndi.center_of_mass(body)[0]
    area_voxels = np.array(TRACHEA_AREA_CM2) * 100.0 / (spacing[0] * spacing[1])
    for k in np.nonzero(lung_air.any(axis=(0, 1)))[0][::-1]:
        labels, n = ndi.label(lung_air[:, :, k])
        if not n:
            continue
        sizes = np.bincount(labels.ravel())[1:]
        centres = ndi.center_of_mass(lung_air[:, :, k], labels, range(1, n + 1))
        for index, (size, (ci, cj)) in enumerate(zip(sizes, centres), start=1):
            if area_voxels[0] <= size <= area_voxels[1] and abs(ci - midline) * spacing[0] <= TRACHEA_MIDLINE_MM:
                depth = ndi.distance_transform_edt(labels == index)  # seed at the tube's centre, not its wall
                i, j = np.unravel_index(np.argmax(depth), depth.shape)
                return int(i), int(j), int(k)
    return None


def airway_mask(hu: np.ndarray, lung_air: np.ndarray, body: np.ndarray, spacing: np.ndarray) -> np.ndarray | None:
    """Trachea and main bronchi grown from the trachea seed at the most lenient threshold that does not leak."""
    seed = trachea_seed(lung_air, body, spacing)
    if seed is None:
        return None
    box = ndi.find_objects(lung_air.astype(np.uint8))[0]
    smooth = ndi.gaussian_filter(np.asarray(hu[box], dtype=np.float32), sigma=1.0)
    local_seed = tuple(s - b.start for s, b in zip(seed, box))
    max_voxels = AIRWAY_MAX_ML * 1000.0 / float(np.prod(spacing))
    tree = None
    for threshold in AIRWAY_HU:
        labels, _ = ndi.label((smooth < threshold) & lung_air[box])
        if labels[local_seed] == 0:
            continue
        grown = labels == labels[local_seed]
        size = np.count_nonzero(grown)
        if size > max_voxels or (tree is not None and size > AIRWAY_LEAK_GROWTH * np.count_nonzero(tree)):
            break
        tree = grown
    if tree is None:
        return None
    airway = np.zeros_like(lung_air)
    airway[box] = tree
    return airway


def split_lungs(lungs: np.ndarray, voxel_ml: float) -> tuple[np.ndarray, np.ndarray]:
    """(left, right) lung: the two largest parts, eroded apart if joined, every lung voxel given to the nearer
    part; named by their centre (LPS axis 0 grows toward the patient's left). Pieces under LUNG_PIECE_ML dropped.
    """
    box = ndi.find_objects(lungs.astype(np.uint8))[0]
    lungs_box = lungs[box] & ~_small_pieces(lungs[box], voxel_ml)
    core = lungs_box
    labels, ids = largest_components(core, 2)
    for _ in range(8):
        sizes = [np.count_nonzero(labels == i) for i in ids]
        if len(ids) == 2 and sizes[1] >= SECOND_LUNG_FRACTION * sizes[0]:
            break
        core = ndi.binary_erosion(core)
        labels, ids = largest_components(core, 2)
    seeds = np.zeros(lungs_box.shape, np.uint8)
    for value, i in enumerate(ids, start=1):
        seeds[labels == i] = value
    nearest = ndi.distance_transform_edt(seeds == 0, return_distances=False, return_indices=True)
    owner = seeds[tuple(nearest)] * lungs_box
    del nearest
    centres = [ndi.center_of_mass(owner == v)[0] for v in (1, 2)]
    left_value = 1 if centres[0] > centres[1] else 2
    left, right = np.zeros_like(lungs), np.zeros_like(lungs)
    left[box], right[box] = owner == left_value, owner == 3 - left_value
    return left, right


def _small_pieces(mask: np.ndarray, voxel_ml: float) -> np.ndarray:
    labels, n = ndi.label(mask)
    sizes = np.bincount(labels.ravel())
    return (sizes < LUNG_PIECE_ML / voxel_ml)[labels] & mask


def bone_mask(hu: np.ndarray, body: np.ndarray, voxel_ml: float) -> np.ndarray:
    """Dense voxels inside the body in parts of at least BONE_MIN_ML, holes filled per axial slice."""
    dense = (hu > BONE_HU) & body
    labels, n = ndi.label(dense)
    sizes = np.bincount(labels.ravel())
    keep = sizes >= BONE_MIN_ML / voxel_ml
    keep[0] = False
    return fill_slices(keep[labels])
