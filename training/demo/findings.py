"""Inserting findings of known type and place into a chest CT (HU, 3 mm grid, voxel axes (i, j, k) = L, P, S).

Each inserter changes `hu` in place and returns an `Inserted` record (CT-RATE finding name, centre voxel,
size in mm, side and zone) that the report templates turn into sentences. Each finding takes the distribution
it typically has (so that it covers the same region of the chest from case to case, as it does in real CTs):
- Lung nodules: 12-24 solid spheres, 12-30 mm, 0..60 HU, soft edge, scattered through both lungs (metastatic pattern);
- Pleural effusion: fluid (5..25 HU) layering in the dependent (posterior) lung base, one or both sides,
  a crescent that thins upward (meniscus);
- Consolidation: lobar, most of one lower lobe at 20..50 HU, with air bronchograms (10-20 % of it stays air);
- Lung opacity (ground glass): bilateral, patchy and peripheral (within 15-30 mm of the lung edge) in the
  lower and middle zones, pulled 55-70 % toward -450 HU (vessels stay visible);
- Emphysema: clustered low-attenuation holes (-1000..-980 HU, vessels gone) over 45-60 % of the zone and 2-4
  bullae of 20-40 mm, upper zones or diffuse;
- Arterial wall calcification: 16-32 dense curvilinear plates (1100..1800 HU, 12-24 mm across, two 3 mm voxels
  thick) on the wall of the descending aorta (found by `find_descending_aorta`);
- Medical material: a pacemaker (generator + lead) or a port (chamber + catheter) in the upper anterior chest
  wall, its lead running medially and down toward the heart, or (15 %) a central catheter alone; metal-dense
  (2000..3000 HU), leads and catheters 6 mm thick on the 3 mm grid.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

SPACING_MM = 3.0
OUTSIDE_AIR_HU = -930.0  # air components darker than this on average and touching the border are outside


@dataclass
class Inserted:
    """One inserted finding: CT-RATE name, where (voxel centre, side, zone) and how big (mm)."""

    name: str
    centre_ijk: tuple[int, int, int]
    size_mm: float
    side: str = ""
    zone: str = ""
    kind: str = ""
    extra: dict = field(default_factory=dict)


@dataclass
class Anatomy:
    """Masks of one working volume: lung (inside the body), its distance to the lung edge (voxels), body, and the
    descending aorta (None when not found)."""

    lung: np.ndarray
    lung_depth: np.ndarray
    body: np.ndarray
    aorta: np.ndarray | None


def find_anatomy(hu: np.ndarray) -> Anatomy:
    """Lung = air components that are not outside air (mean HU above OUTSIDE_AIR_HU or not touching the border);
    aorta: `find_descending_aorta`."""
    air = hu < -500
    labels, count = ndimage.label(air)
    index = np.arange(1, count + 1)
    sizes = ndimage.sum(air, labels, index)
    means = ndimage.mean(hu, labels, index)
    border = np.zeros_like(air)
    border[[0, -1], :, :] = border[:, [0, -1], :] = True
    touching = ndimage.maximum(border, labels, index) > 0
    outside = touching & (means < OUTSIDE_AIR_HU)
    keep = (~outside) & (sizes >= 0.02 * sizes[~outside].max()) if (~outside).any() else outside
    lung = np.isin(labels, index[keep])
    lung = ndimage.binary_opening(lung, iterations=1)
    body = ~np.isin(labels, index[outside])
    return Anatomy(lung, ndimage.distance_transform_edt(lung), body, find_descending_aorta(hu, lung))


AORTA_RADIUS_MM = 12.0
AORTA_LEFT_OF_MIDLINE_MM = (6.0, 48.0)  # range searched for the aorta's centre
BLOOD_HU = (0.0, 90.0)  # unenhanced blood
MIN_AORTA_SCORE = 0.8  # blood fraction of the disc (+ up to 0.15 for lung contact) at every tracked level
IN_PLANE = ndimage.generate_binary_structure(2, 1)[:, :, None]  # 4-connectivity within an axial slice (i, j)


def find_descending_aorta(hu: np.ndarray, lung: np.ndarray) -> np.ndarray | None:
    """Mask of the descending thoracic aorta of an unenhanced chest CT, from 20 % to 65 % of the lung height.

    The aorta lies left of the midline in the posterior half, a disc of blood attenuation touching the left
    lung: found at mid height as the best such disc (blood fraction plus lung contact), then tracked slice by
    slice up and down (one voxel of movement at most); the mask is the tracked discs within soft tissue.
    """
    i_range, k_range = np.flatnonzero(lung.any(axis=(1, 2))), np.flatnonzero(lung.any(axis=(0, 1)))
    if len(i_range) == 0:
        return None
    radius = AORTA_RADIUS_MM / SPACING_MM
    r = int(np.ceil(radius))
    offsets = np.mgrid[-r:r + 1, -r:r + 1]
    disc = (offsets ** 2).sum(axis=0) <= radius ** 2
    ring = ndimage.binary_dilation(disc, iterations=2) & ~ndimage.binary_dilation(disc)
    blood = ((hu > BLOOD_HU[0]) & (hu < BLOOD_HU[1])).astype(np.float32)
    score = ndimage.convolve(blood, disc[:, :, None] / disc.sum(), mode="constant")
    score += 0.5 * np.minimum(
        ndimage.convolve(lung.astype(np.float32), ring[:, :, None] / ring.sum(), mode="constant"), 0.3)
    middle = int(round((i_range[0] + i_range[-1]) / 2))
    window = np.zeros(hu.shape[:2], bool)
    near_mm, far_mm = AORTA_LEFT_OF_MIDLINE_MM
    window[middle + round(near_mm / SPACING_MM):middle + round(far_mm / SPACING_MM), hu.shape[1] // 2:] = True
    low, high = (int(k_range[0] + f * (k_range[-1] - k_range[0])) for f in (0.2, 0.65))
    start = (low + high) // 2
    centres = {start: np.unravel_index(np.argmax(np.where(window, score[:, :, start], -1)), window.shape)}
    for levels in (range(start + 1, high + 1), range(start - 1, low - 1, -1)):
        previous = centres[start]
        for k in levels:
            near = np.zeros_like(window)
            near[max(previous[0] - 1, 0):previous[0] + 2, max(previous[1] - 1, 0):previous[1] + 2] = True
            previous = np.unravel_index(np.argmax(np.where(near & window, score[:, :, k], -1)), window.shape)
            centres[k] = previous
    if min(score[i, j, k] for k, (i, j) in centres.items()) < MIN_AORTA_SCORE:
        return None
    aorta = np.zeros(hu.shape, bool)
    for k, (i, j) in centres.items():
        if r <= i < hu.shape[0] - r and r <= j < hu.shape[1] - r:
            aorta[i - r:i + r + 1, j - r:j + r + 1, k] = disc
    return aorta & (hu > -100) & (hu < 200)


def side_and_zone(anatomy: Anatomy, centre: tuple[int, int, int]) -> tuple[str, str]:
    """'right'/'left' (i grows toward the patient's left) and the lobe by height within the lung."""
    i_range = np.flatnonzero(anatomy.lung.any(axis=(1, 2)))
    k_range = np.flatnonzero(anatomy.lung.any(axis=(0, 1)))
    side = "left" if centre[0] > (i_range[0] + i_range[-1]) / 2 else "right"
    height = (centre[2] - k_range[0]) / max(1, k_range[-1] - k_range[0])
    if side == "left":
        return side, "upper lobe" if height > 0.45 else "lower lobe"
    return side, "upper lobe" if height > 0.62 else ("middle lobe" if height > 0.38 else "lower lobe")


def pick_lung_point(anatomy: Anatomy, rng: np.random.Generator, min_depth_vox: float) -> tuple[int, int, int]:
    """A random lung voxel at least `min_depth_vox` from the lung edge (the deepest ones if none is)."""
    candidates = np.argwhere(anatomy.lung_depth >= min_depth_vox)
    if len(candidates) == 0:
        candidates = np.argwhere(anatomy.lung_depth >= anatomy.lung_depth.max() * 0.8)
    return tuple(int(v) for v in candidates[rng.integers(len(candidates))])


def local_box(shape: tuple[int, ...], centre: tuple[int, int, int], radius: float) -> tuple[slice, ...]:
    r = int(np.ceil(radius)) + 2
    return tuple(slice(max(c - r, 0), min(c + r + 1, n)) for c, n in zip(centre, shape))


def sphere_weight(box: tuple[slice, ...], centre: tuple[int, int, int], radius: float) -> np.ndarray:
    """Soft sphere (1 inside, 0 outside, ~1 voxel ramp) over the voxels of `box`."""
    grids = np.ogrid[tuple(slice(s.start, s.stop) for s in box)]
    distance = np.sqrt(sum((g - c) ** 2 for g, c in zip(grids, centre)))
    return np.clip(radius + 0.5 - distance, 0.0, 1.0).astype(np.float32)


def insert_nodules(hu, anatomy, rng) -> Inserted:
    count = int(rng.integers(12, 25))
    diameters = np.sort(rng.uniform(12.0, 30.0, size=count))[::-1]
    centres = []
    for diameter in diameters:
        radius = diameter / 2 / SPACING_MM
        centre = pick_lung_point(anatomy, rng, radius + 1)
        box = local_box(hu.shape, centre, radius)
        weight = sphere_weight(box, centre, radius)
        hu[box] += weight * (rng.uniform(0.0, 60.0) - hu[box])
        centres.append(centre)
    side, zone = side_and_zone(anatomy, centres[0])
    return Inserted("Lung nodule", centres[0], round(float(diameters[0])), side, zone, extra={"count": count})


def insert_effusion(hu, anatomy, rng) -> Inserted:
    sides = [str(rng.choice(["right", "left", "both"]))]
    sides = ["right", "left"] if sides == ["both"] else sides
    lung = anatomy.lung
    i_range = np.flatnonzero(lung.any(axis=(1, 2)))
    middle = (i_range[0] + i_range[-1]) / 2
    k_range = np.flatnonzero(lung.any(axis=(0, 1)))
    height = rng.uniform(0.4, 0.7) * (k_range[-1] - k_range[0])
    thicknesses, centre = {}, None
    for side in sides:
        thickness = rng.uniform(12.0, 45.0) / SPACING_MM
        columns = np.arange(lung.shape[0])
        on_side = (columns > middle) if side == "left" else (columns <= middle)
        k = np.arange(lung.shape[2])
        taper = np.clip(1 - (k - k_range[0]) / height, 0, 1) ** 0.7 * thickness  # (k,) voxels, meniscus
        j = np.arange(lung.shape[1])
        posterior = np.where(lung.any(axis=1), lung.shape[1] - 1 - np.argmax(lung[:, ::-1, :], axis=1), -1)  # (i, k)
        fluid = lung & on_side[:, None, None] & (j[None, :, None] >= (posterior - taper[None, :])[:, None, :])
        fluid &= posterior[:, None, :] >= 0
        if not fluid.any():
            continue
        hu[fluid] = rng.uniform(5.0, 25.0) + rng.normal(0.0, 6.0, size=int(fluid.sum()))
        thicknesses[side] = round(float(thickness * SPACING_MM))
        centre = tuple(int(v) for v in np.argwhere(fluid).mean(axis=0))
    size = max(thicknesses.values()) if thicknesses else 0.0
    return Inserted("Pleural effusion", centre or (0, 0, 0), size, "both" if len(thicknesses) == 2 else sides[0],
                    extra={"thickness_mm": thicknesses})


def lung_height(anatomy: Anatomy) -> np.ndarray:
    """(k,) height of each axial level within the lung, 0 at its base and 1 at its apex."""
    k_range = np.flatnonzero(anatomy.lung.any(axis=(0, 1)))
    return (np.arange(anatomy.lung.shape[2]) - k_range[0]) / max(1, k_range[-1] - k_range[0])


def lung_side(anatomy: Anatomy, side: str) -> np.ndarray:
    """(i,) True on the patient's `side` ('left': i above the lungs' midline)."""
    i_range = np.flatnonzero(anatomy.lung.any(axis=(1, 2)))
    columns = np.arange(anatomy.lung.shape[0])
    middle = (i_range[0] + i_range[-1]) / 2
    return columns > middle if side == "left" else columns <= middle


def patchy(region: np.ndarray, fraction: float, rng: np.random.Generator, sigma: float = 1.5) -> np.ndarray:
    """About `fraction` of `region`, in smooth blobs (thresholded smoothed noise)."""
    noise = ndimage.gaussian_filter(rng.standard_normal(region.shape), sigma)
    return region & (noise > np.quantile(noise[region], 1 - fraction)) if region.any() else region


def insert_consolidation(hu, anatomy, rng) -> Inserted:
    side = str(rng.choice(["right", "left"]))
    top = rng.uniform(0.3, 0.45)
    lobe = anatomy.lung & lung_side(anatomy, side)[:, None, None] & (lung_height(anatomy) <= top)[None, None, :]
    solid = lobe & ~patchy(lobe, rng.uniform(0.1, 0.2), rng, sigma=0.8)  # air bronchograms stay dark
    hu[solid] = rng.uniform(20.0, 50.0) + rng.normal(0.0, 10.0, size=int(solid.sum()))
    centre = tuple(int(v) for v in np.argwhere(lobe).mean(axis=0)) if lobe.any() else (0, 0, 0)
    extent_mm = float(lobe.any(axis=(0, 1)).sum() * SPACING_MM)  # cranio-caudal
    return Inserted("Consolidation", centre, round(extent_mm), side, "lower lobe")


def insert_ground_glass(hu, anatomy, rng) -> Inserted:
    rim = anatomy.lung & (anatomy.lung_depth * SPACING_MM <= rng.uniform(15.0, 30.0))
    zone = rim & (lung_height(anatomy) <= rng.uniform(0.6, 0.85))[None, None, :]
    glass = patchy(zone, rng.uniform(0.4, 0.6), rng)
    hu[glass] += rng.uniform(0.55, 0.7) * (-450.0 - hu[glass])
    centre = tuple(int(v) for v in np.argwhere(zone).mean(axis=0)) if zone.any() else (0, 0, 0)
    return Inserted("Lung opacity", centre, 0.0, "both", "lower lobes")


def insert_emphysema(hu, anatomy, rng) -> Inserted:
    lung = anatomy.lung
    k_range = np.flatnonzero(lung.any(axis=(0, 1)))
    diffuse = bool(rng.random() < 0.4)
    floor = k_range[0] if diffuse else k_range[0] + 0.45 * (k_range[-1] - k_range[0])
    zone = lung & (np.arange(lung.shape[2]) >= floor)[None, None, :]
    holes = ndimage.gaussian_filter(rng.standard_normal(lung.shape), 1.5)
    holes = zone & (holes > np.quantile(holes[zone], 1 - rng.uniform(0.45, 0.6)))
    hu[holes] = rng.uniform(-1000.0, -980.0, size=int(holes.sum()))
    for _ in range(int(rng.integers(2, 5))):
        radius = rng.uniform(10.0, 20.0) / SPACING_MM
        centre = pick_lung_point(anatomy, rng, 1.0)
        box = local_box(hu.shape, centre, radius)
        bulla = (sphere_weight(box, centre, radius) > 0.5) & lung[box]
        hu[box][bulla] = -995.0
    centre = tuple(int(v) for v in np.argwhere(zone).mean(axis=0))
    return Inserted("Emphysema", centre, 0.0, "both", "diffuse" if diffuse else "upper lobes")


def insert_calcification(hu, anatomy, rng) -> Inserted:
    """Extensive calcification: 16-32 curvilinear plates, each the aortic wall within 6-12 mm of a wall voxel; the
    wall is the aorta's edge ring and the ring just outside it (a dense plate blooms over two 3 mm voxels)."""
    aorta = anatomy.aorta
    wall = ndimage.binary_dilation(aorta, IN_PLANE) & ~ndimage.binary_erosion(aorta, IN_PLANE)
    seeds = np.argwhere(wall)
    chosen = seeds[rng.choice(len(seeds), size=int(rng.integers(16, 33)), replace=False)]
    for seed in chosen:
        centre = tuple(int(v) for v in seed)
        radius = rng.uniform(6.0, 12.0) / SPACING_MM
        box = local_box(hu.shape, centre, radius)
        plate = (sphere_weight(box, centre, radius) > 0.5) & wall[box]
        hu[box][plate] = np.maximum(hu[box][plate], rng.uniform(1100.0, 1800.0))
    centre = tuple(int(v) for v in chosen.mean(axis=0))
    return Inserted("Arterial wall calcification", centre, 0.0, kind="aorta")


def draw_tube(hu, points: np.ndarray, radius: float, value: float) -> None:
    """A dense tube through consecutive voxel points (soft edge, max-blended)."""
    for a, b in zip(points[:-1], points[1:]):
        for t in np.linspace(0.0, 1.0, int(np.ceil(np.linalg.norm(b - a))) * 2 + 1):
            centre = tuple(int(round(v)) for v in a + t * (b - a))
            box = local_box(hu.shape, centre, radius)
            weight = sphere_weight(box, centre, radius)
            hu[box] = np.maximum(hu[box], hu[box] + weight * (value - hu[box]))


def chest_wall_point(hu, anatomy, rng, side: str) -> tuple[int, int, int]:
    """A soft-tissue voxel of the upper anterior chest wall on `side`: in front of the lung, lateral, in the lung's
    upper third (any upper soft tissue when the volume has no such voxel)."""
    tissue = anatomy.body & ~anatomy.lung & (hu > -150) & (hu < 150)
    j = np.arange(hu.shape[1])[None, :, None]
    front = np.where(anatomy.lung.any(axis=1), np.argmax(anatomy.lung, axis=1), -1)[:, None, :]  # (i, 1, k)
    i_range = np.flatnonzero(anatomy.lung.any(axis=(1, 2)))
    off_midline = np.abs(np.arange(hu.shape[0]) - (i_range[0] + i_range[-1]) / 2) > 0.25 * (i_range[-1] - i_range[0])
    wall = tissue & (j < front - 1) & (lung_side(anatomy, side) & off_midline)[:, None, None]
    wall &= (lung_height(anatomy) >= 0.65)[None, None, :]
    if not wall.any():
        wall = tissue & (lung_height(anatomy) >= 0.5)[None, None, :]
    candidates = np.argwhere(wall if wall.any() else tissue)
    return tuple(int(v) for v in candidates[rng.integers(len(candidates))])


def insert_device(hu, anatomy, rng) -> Inserted:
    kind = str(rng.choice(["pacemaker", "port catheter", "central venous catheter"], p=[0.45, 0.4, 0.15]))
    side = "left" if kind == "pacemaker" and rng.random() < 0.8 else str(rng.choice(["right", "left"]))
    start = np.array(chest_wall_point(hu, anatomy, rng, side), float)
    if kind != "central venous catheter":
        half = np.array([22.0, 5.0, 18.0] if kind == "pacemaker" else [12.0, 6.0, 12.0]) / SPACING_MM
        box = tuple(slice(max(int(c - h), 0), int(c + h) + 1) for c, h in zip(start, half))
        hu[box] = np.maximum(hu[box], rng.uniform(2000.0, 3000.0))
    heart = np.array([np.mean(np.flatnonzero(anatomy.lung.any(axis=(1, 2)))), hu.shape[1] * 0.45,
                      np.flatnonzero(anatomy.lung.any(axis=(0, 1))).mean()])  # mediastinum, mid height
    steps = start + np.linspace(0.0, 1.0, 7)[:, None] * (heart - start)
    steps += np.vstack([np.zeros(3), rng.normal(0, 1.0, size=(6, 3))])
    steps = np.clip(steps, 0, np.array(hu.shape) - 1)
    draw_tube(hu, steps, 1.0, rng.uniform(2000.0, 3000.0))
    length = float(np.linalg.norm(heart - start) * SPACING_MM)
    return Inserted("Medical material", tuple(int(v) for v in start), round(length), side, kind=kind)


INSERTERS = {
    "Emphysema": insert_emphysema,
    "Pleural effusion": insert_effusion,
    "Lung opacity": insert_ground_glass,
    "Consolidation": insert_consolidation,
    "Lung nodule": insert_nodules,
    "Arterial wall calcification": insert_calcification,
    "Medical material": insert_device,
}
DEMO_FINDINGS = tuple(INSERTERS)  # also the order of insertion: later ones are drawn over earlier ones
