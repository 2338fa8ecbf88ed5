"""Anatomy masks in a CT's geometry: named segments with their RadGenome region and fVLM organ.

Names follow TotalSegmentator's "total" task (e.g. `lung_upper_lobe_left`), the built-in fallback
(`lung_left`, `lung_right`, `airway`, `body`, `bone`) or RadGenome's location hierarchy (e.g. `heart_tissue`);
`Resources/anatomy/anatomy.json` maps each to its RadGenome path (first part = one of the 11 regions) and
fVLM organ (lung = the five lobes, heart = heart + left atrial appendage, esophagus, aorta).

Masks are kept per segment as a boolean crop of its bounding box (segments may overlap), indexed (i, j, k)
like `CTVolume.hu`. Sources, in order of preference (`build_anatomy`): an existing segmentation (label map or
folder of binary masks), RadGenome mask folders, TotalSegmentator when installed, the built-in fallback.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import scipy.ndimage as ndi

from CTFoundationLib.errors import AnatomyError
from CTFoundationLib.io.volume import CTVolume
from CTFoundationLib.resources import ANATOMY_RESOURCES

NIFTI_SUFFIXES = (".nii.gz", ".nii")
Progress = Callable[[str], None]


@dataclass(frozen=True)
class AnatomyInfo:
    """What a segment is. path: RadGenome location path ('lung/left lung/left lung upper lobe') or None."""

    name: str
    title: str
    path: str | None = None
    fvlm_organ: str | None = None
    laterality: str | None = None

    @property
    def region(self) -> str | None:
        """The RadGenome region (first part of the path): lung, heart, mediastinum, ... or None."""
        return self.path.split("/")[0] if self.path else None


@cache
def _anatomy_json() -> dict:
    return json.loads((ANATOMY_RESOURCES / "anatomy.json").read_text())


@cache
def anatomy_table() -> dict[str, AnatomyInfo]:
    """Every known segment name -> its `AnatomyInfo`."""
    return {
        name: AnatomyInfo(name, e["title"], e["path"], e["fvlm_organ"], e["laterality"])
        for name, e in _anatomy_json()["anatomy"].items()
    }


REGIONS: tuple[str, ...] = tuple(_anatomy_json()["regions"])


def _normalise(label: str) -> str:
    text = re.sub(r"[_\-\s]+", " ", label.strip().lower())
    return re.sub(r" mask$", "", text)


@cache
def _lookup_keys() -> dict[str, AnatomyInfo]:
    keys = {}
    for info in anatomy_table().values():
        keys[_normalise(info.title)] = info
        keys[_normalise(info.name)] = info
    return keys


def lookup_anatomy(label: str) -> AnatomyInfo | None:
    """A segment by name or title, case/underscore-insensitive, a trailing '_mask' ignored."""
    return _lookup_keys().get(_normalise(label))


def anatomy_info(label: str) -> AnatomyInfo:
    """`lookup_anatomy`, or an unmapped segment (no region, no organ) that keeps the label as its name."""
    return lookup_anatomy(label) or AnatomyInfo(label, label.replace("_", " "))


@cache
def totalsegmentator_classes(scheme: str = "total") -> dict[int, str]:
    """TotalSegmentator class id -> name for 'total' (v2, what fVLM used) or 'total_v1'."""
    schemes = json.loads((ANATOMY_RESOURCES / "totalsegmentator_classes.json").read_text())["schemes"]
    if scheme not in schemes:
        raise AnatomyError(f"unknown label scheme '{scheme}'; use one of {sorted(schemes)}")
    return {int(k): v for k, v in schemes[scheme].items()}


@dataclass
class Segment:
    """One anatomy's mask: `mask` (bool) covers voxels offset .. offset + mask.shape of the volume (i, j, k)."""

    info: AnatomyInfo
    offset: tuple[int, int, int]
    mask: np.ndarray
    source: str

    @property
    def voxels(self) -> int:
        return int(np.count_nonzero(self.mask))

    @property
    def slices(self) -> tuple[slice, slice, slice]:
        return tuple(slice(o, o + n) for o, n in zip(self.offset, self.mask.shape))


def crop_to_content(
    mask: np.ndarray, offset: Iterable[int] = (0, 0, 0)
) -> tuple[tuple[int, int, int], np.ndarray] | None:
    """(offset, crop) of the True voxels' bounding box, or None for an empty mask."""
    box = ndi.find_objects(mask.astype(np.uint8, copy=False))
    if not box or box[0] is None:
        return None
    start = tuple(int(o) + s.start for o, s in zip(offset, box[0]))
    return start, np.ascontiguousarray(mask[box[0]], dtype=bool)


def resample_mask_nearest(
    mask: np.ndarray, offset: Iterable[int], source_affine: np.ndarray, shape: tuple[int, ...], affine: np.ndarray
) -> tuple[tuple[int, int, int], np.ndarray] | None:
    """A mask crop (at `offset` in a grid with `source_affine`) resampled into the grid (shape, affine).

    Nearest neighbour in world coordinates (scipy `affine_transform`, order 0), evaluated only over the target
    voxels the crop's box can reach. Returns (offset, crop) in the target grid, or None when nothing lands in it.
    """
    offset = np.asarray(tuple(offset), float)
    corners = np.array([[a, b, c] for a in (0, 1) for b in (0, 1) for c in (0, 1)]) * mask.shape + offset - 0.5
    to_target = np.linalg.solve(affine, source_affine)
    reach = corners @ to_target[:3, :3].T + to_target[:3, 3]
    low = np.clip(np.floor(reach.min(0)).astype(int), 0, shape)
    high = np.clip(np.ceil(reach.max(0)).astype(int) + 1, 0, shape)
    if np.any(high <= low):
        return None
    to_source = np.linalg.solve(source_affine, affine)
    matrix = to_source[:3, :3]
    start = matrix @ low + to_source[:3, 3] - offset
    out = ndi.affine_transform(mask.astype(np.uint8), matrix, start, output_shape=tuple(high - low), order=0)
    return crop_to_content(out.astype(bool), low)


class AnatomyMasks:
    """Named anatomy segments on one CT grid (shape_ijk, affine_ras), with what could not be provided and why."""

    def __init__(self, shape_ijk: tuple[int, int, int], affine_ras: np.ndarray, source: str) -> None:
        self.shape_ijk = tuple(int(n) for n in shape_ijk)
        self.affine_ras = np.asarray(affine_ras, dtype=np.float64)
        self.source = source
        self.segments: dict[str, Segment] = {}
        self.unavailable: dict[str, str] = {}  # fVLM organ / RadGenome region / anatomy -> why it is missing
        self.notes: list[str] = []

    @classmethod
    def for_volume(cls, volume: CTVolume, source: str) -> AnatomyMasks:
        return cls(volume.shape_ijk, volume.affine_ras, source)

    # ---------------------------------------------------------------- building

    def add(self, info: AnatomyInfo, mask: np.ndarray, offset: Iterable[int] = (0, 0, 0), source: str = "") -> None:
        """Add (or unite with an existing segment of the same name) a boolean mask placed at `offset`."""
        cropped = crop_to_content(mask, offset)
        if cropped is None:
            self.notes.append(f"{info.name}: empty mask, skipped")
            return
        start, crop = cropped
        if info.name in self.segments:
            crop, start = self._union(self.segments[info.name], crop, start)
        self.segments[info.name] = Segment(info, start, crop, source or self.source)

    def add_resampled(self, info: AnatomyInfo, mask: np.ndarray, offset: Iterable[int], affine: np.ndarray,
                      source: str) -> None:
        """Add a mask given on another grid (affine), resampled into this one."""
        placed = resample_mask_nearest(mask, offset, affine, self.shape_ijk, self.affine_ras)
        if placed is None:
            self.notes.append(f"{info.name}: outside this CT's field of view, skipped")
            return
        self.add(info, placed[1], placed[0], source)

    def _union(self, old: Segment, crop: np.ndarray, start: tuple[int, ...]) -> tuple[np.ndarray, tuple[int, ...]]:
        low = np.minimum(old.offset, start)
        high = np.maximum(np.add(old.offset, old.mask.shape), np.add(start, crop.shape))
        union = np.zeros(tuple(high - low), bool)
        for piece, at in ((old.mask, old.offset), (crop, start)):
            union[tuple(slice(a - b, a - b + n) for a, b, n in zip(at, low, piece.shape))] |= piece
        return union, tuple(int(v) for v in low)

    # ---------------------------------------------------------------- reading

    def mask(self, name: str) -> np.ndarray:
        """The full-size boolean mask (i, j, k) of one segment."""
        segment = self._segment(name)
        full = np.zeros(self.shape_ijk, bool)
        full[segment.slices] = segment.mask
        return full

    def _segment(self, name: str) -> Segment:
        if name not in self.segments:
            why = self.unavailable.get(name, f"not in the anatomy from {self.source}")
            raise AnatomyError(f"anatomy '{name}' is not available: {why}")
        return self.segments[name]

    @property
    def voxel_ml(self) -> float:
        return float(abs(np.linalg.det(self.affine_ras[:3, :3]))) / 1000.0

    def volume_ml(self, name: str) -> float:
        return self._segment(name).voxels * self.voxel_ml

    def centroid_ras(self, name: str) -> np.ndarray:
        """Centre of mass of a segment in RAS world mm."""
        segment = self._segment(name)
        centre = np.add(ndi.center_of_mass(segment.mask), segment.offset)
        return self.affine_ras[:3, :3] @ centre + self.affine_ras[:3, 3]

    def names_in(self, *, region: str | None = None, fvlm_organ: str | None = None) -> list[str]:
        """Segment names of one RadGenome region and/or fVLM organ."""
        return [
            name for name, s in self.segments.items()
            if (region is None or s.info.region == region) and (fvlm_organ is None or s.info.fvlm_organ == fvlm_organ)
        ]

    def fvlm_labels(self, organs: tuple[str, ...]) -> np.ndarray:
        """uint8 (i, j, k) label map of fVLM organs: id n + 1 for organs[n]; a later organ wins where masks overlap."""
        labels = np.zeros(self.shape_ijk, np.uint8)
        for organ_id, organ in enumerate(organs, start=1):
            for name in self.names_in(fvlm_organ=organ):
                segment = self.segments[name]
                labels[segment.slices][segment.mask] = organ_id
        return labels

    def mark_missing(self, wanted_organs: Iterable[str], reason: str) -> None:
        """Record why fVLM organs and RadGenome regions this source did not give are unavailable."""
        present_organs = {s.info.fvlm_organ for s in self.segments.values()}
        present_regions = {s.info.region for s in self.segments.values()}
        for organ in wanted_organs:
            if organ not in present_organs:
                self.unavailable.setdefault(f"fvlm:{organ}", reason)
        for region in REGIONS:
            if region not in present_regions:
                self.unavailable.setdefault(f"region:{region}", reason)

    def summary(self) -> dict:
        """JSON-ready description: per segment its region, organ, voxels, ml and centre (RAS mm)."""
        segments = {
            name: {
                "title": s.info.title, "region": s.info.region, "path": s.info.path, "fvlm_organ": s.info.fvlm_organ,
                "laterality": s.info.laterality, "voxels": s.voxels, "volume_ml": round(self.volume_ml(name), 2),
                "centroid_ras_mm": [round(float(v), 1) for v in self.centroid_ras(name)], "source": s.source,
            }
            for name, s in self.segments.items()
        }
        return {"source": self.source, "segments": segments, "unavailable": dict(self.unavailable), "notes": self.notes}

    def save_nifti(self, folder: Path) -> dict[str, Path]:
        """One uint8 NIfTI per segment (<name>.nii.gz) on the CT's grid; returns name -> path."""
        import nibabel as nib

        folder.mkdir(parents=True, exist_ok=True)
        written = {}
        for name in self.segments:
            path = folder / f"{name}.nii.gz"
            image = nib.Nifti1Image(self.mask(name).astype(np.uint8), self.affine_ras)
            image.header.set_xyzt_units("mm")
            nib.save(image, str(path))
            written[name] = path
        return written


# ---------------------------------------------------------------- file sources


def _load_mask_image(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(data, affine) of a 3-D NIfTI label or mask file, with a clear error when it is not one."""
    import nibabel as nib

    try:
        image = nib.load(str(path))
        data = np.asanyarray(image.dataobj)
    except Exception as error:  # nibabel raises many kinds for damaged files
        raise AnatomyError(f"{path}: cannot read this segmentation file ({error}); is it a NIfTI label map?") from error
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise AnatomyError(f"{path}: expected a 3-D label map, got shape {data.shape}")
    if not np.issubdtype(data.dtype, np.integer):
        if not np.array_equal(data, np.round(data)):
            raise AnatomyError(f"{path}: holds non-integer values; a segmentation must hold integer labels")
        data = data.astype(np.int32)
    if data.min() < 0:
        raise AnatomyError(f"{path}: holds negative labels; is this a CT image rather than a segmentation?")
    return data, image.affine


def _place(anatomy: AnatomyMasks, info: AnatomyInfo, mask: np.ndarray, offset, affine: np.ndarray, source: str) -> None:
    if np.allclose(affine, anatomy.affine_ras, atol=1e-3):
        anatomy.add(info, mask, offset, source)
    else:
        anatomy.add_resampled(info, mask, offset, affine, source)


def from_label_map(path: Path, volume: CTVolume, scheme: str = "total",
                   label_names: dict[int, str] | None = None) -> AnatomyMasks:
    """A label map (e.g. TotalSegmentator --ml output) -> segments; ids named by `label_names` or the scheme.
    A binary file named after an anatomy (e.g. aorta_mask.nii.gz) is that one mask, not label 1 of the scheme."""
    data, affine = _load_mask_image(path)
    named = lookup_anatomy(mask_name(path)) if label_names is None and data.max() <= 1 else None
    names = {1: named.name} if named else label_names or totalsegmentator_classes(scheme)
    anatomy = AnatomyMasks.for_volume(volume, f"label map {path.name}")
    add_labels(anatomy, data, affine, names, str(path))
    _check_not_empty(anatomy, path)
    _note_unmapped(anatomy)
    return anatomy


def add_labels(anatomy: AnatomyMasks, labels: np.ndarray, affine: np.ndarray, names: dict[int, str],
               source: str) -> None:
    """Add one segment per label id of an integer label map (one pass per label over its own box only)."""
    for label, box in enumerate(ndi.find_objects(labels), start=1):
        if box is not None:
            info = anatomy_info(names.get(label, f"label_{label}"))
            _place(anatomy, info, labels[box] == label, [s.start for s in box], affine, source)


def nifti_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise AnatomyError(f"{folder}: no such folder of .nii/.nii.gz masks; check the path")
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(NIFTI_SUFFIXES))


def mask_name(path: Path) -> str:
    """The file name without its image suffix (.nii.gz, .nii, or whatever follows the first dot)."""
    return next((path.name[: -len(s)] for s in NIFTI_SUFFIXES if path.name.lower().endswith(s)),
                path.name.split(".")[0])


def from_mask_folder(folder: Path, volume: CTVolume) -> AnatomyMasks:
    """A folder of binary masks <name>.nii.gz (TotalSegmentator or RadGenome names) -> segments."""
    files = nifti_files(folder)
    if not files:
        raise AnatomyError(f"{folder}: no .nii/.nii.gz mask files in this folder")
    anatomy = AnatomyMasks.for_volume(volume, f"mask folder {folder.name}")
    for path in files:
        _add_mask_file(anatomy, path)
    _check_not_empty(anatomy, folder)
    _note_unmapped(anatomy)
    return anatomy


def _add_mask_file(anatomy: AnatomyMasks, path: Path) -> None:
    data, affine = _load_mask_image(path)
    _place(anatomy, anatomy_info(mask_name(path)), data > 0, (0, 0, 0), affine, str(path))


def from_radgenome(leaf_folder: Path, volume: CTVolume, region_folder: Path | None = None) -> AnatomyMasks:
    """RadGenome-ChestCT masks (`seg_<volume>/<anatomy>.nii.gz`), resampled into the CT's geometry.

    Leaf anatomies first; a region mask (`region_folder`, files named by region) is added only where the leaves
    give nothing of that region, or where it carries an fVLM organ the leaves lack (e.g. the whole heart).
    """
    anatomy = from_mask_folder(leaf_folder, volume)
    anatomy.source = f"RadGenome masks {leaf_folder.name}"
    if region_folder is None:
        return anatomy
    regions = {s.info.region for s in anatomy.segments.values()}
    organs = {s.info.fvlm_organ for s in anatomy.segments.values()}
    for path in nifti_files(region_folder):
        info = anatomy_info(mask_name(path))
        if info.region not in regions or (info.fvlm_organ and info.fvlm_organ not in organs):
            _add_mask_file(anatomy, path)
    return anatomy


def _check_not_empty(anatomy: AnatomyMasks, where: Path) -> None:
    if not anatomy.segments:
        raise AnatomyError(
            f"{where}: no labelled voxel falls inside the CT ({'; '.join(anatomy.notes) or 'all masks empty'}); "
            "is this the segmentation of another scan?"
        )


def _note_unmapped(anatomy: AnatomyMasks) -> None:
    unmapped = sorted(n for n, s in anatomy.segments.items() if s.info.path is None and n != "body")
    if unmapped:
        anatomy.notes.append(f"names not in the anatomy table (kept, but with no region or fVLM organ): {unmapped}")


# ---------------------------------------------------------------- choosing a source


@dataclass
class AnatomyRequest:
    """Where the anatomy may come from. Paths: a label map file or a mask folder; RadGenome leaf/region folders."""

    segmentation: Path | None = None
    label_scheme: str = "total"
    radgenome: Path | None = None
    radgenome_regions: Path | None = None
    use_totalsegmentator: bool = True
    device: str = "cpu"


def build_anatomy(volume: CTVolume, request: AnatomyRequest, organs: Iterable[str],
                  progress: Progress | None = None) -> AnatomyMasks:
    """The anatomy of `volume` from the first usable source: segmentation, RadGenome, TotalSegmentator, fallback.

    `organs`: fVLM organs the caller needs; those the chosen source lacks are listed in `unavailable`.
    """
    from CTFoundationLib.anatomy.fallback import fallback_anatomy
    from CTFoundationLib.anatomy.totalseg import run_totalsegmentator, totalsegmentator_status

    progress = progress or (lambda message: None)
    progress("anatomy")
    if request.segmentation is not None:
        path = Path(request.segmentation)
        if not path.exists():
            raise AnatomyError(f"{path}: no such segmentation file or folder")
        anatomy = (from_mask_folder(path, volume) if path.is_dir()
                   else from_label_map(path, volume, request.label_scheme))
        anatomy.mark_missing(organs, f"not in the given segmentation {path.name}")
    elif request.radgenome is not None:
        anatomy = from_radgenome(Path(request.radgenome), volume, request.radgenome_regions)
        anatomy.mark_missing(organs, "not in the RadGenome masks")
    else:
        available, why = totalsegmentator_status() if request.use_totalsegmentator else (False, "not requested")
        if available:
            anatomy = run_totalsegmentator(volume, request.device, progress)
            anatomy.mark_missing(organs, "TotalSegmentator found none in this scan")
        else:
            anatomy = fallback_anatomy(volume, progress)
            anatomy.notes.append(f"TotalSegmentator: {why}")
            anatomy.mark_missing(organs, FALLBACK_CANNOT)
    return anatomy


FALLBACK_CANNOT = (
    "the built-in HU-threshold segmentation makes only lungs, airway, body and bone; give a segmentation "
    "(--segmentation, e.g. TotalSegmentator 'total' output) or install TotalSegmentator for this organ"
)
