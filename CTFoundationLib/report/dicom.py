"""DICOM output of a reported CT, for DICOM inputs: a DICOM SEG and a DICOM SR that a PACS and Slicer read.

- SEG (binary, highdicom, stored deflated: `SEG_TRANSFER_SYNTAX`): one segment per anatomy segment (category SCT
  123037004 "Anatomical Structure", type and laterality from `Resources/anatomy/terminology.json`, the codes the
  Slicer module uses; a name without a code there gets the type SCT 91723000 "Anatomical Structure" and keeps its
  name as the label), then one segment per positive finding that has a region (category SCT 49755003
  "Morphologically Abnormal Structure", type from `Resources/anatomy/finding_codes.json`).
- SR (Comprehensive 3D SR, TID 1500 measurement report): one measurement group per finding with its code, the
  probability (DCM 122157), the decision threshold, present / absent / undetermined (DCM 121052), and the model id
  and checkpoint sha256 as the algorithm's name and version. A positive finding with a region is a volumetric ROI
  group (TID 1411) referencing its SEG segment and the source series; the others are TID 1501 groups.

Both objects belong to the source CT's study (patient and study attributes copied by highdicom) and reference its
series and SOP instances. Finding regions are boolean masks in CT space, one per positive finding
(`FindingRegion`): `map_regions` derives them from the CT-CLIP finding maps (inference.maps; `MapRegions` in a
batch), `grounded_regions` from the anatomy grounding (the finding's segments, by
`Resources/anatomy/finding_anatomy.json`) for checkpoints without maps; any mask on the CT grid fits.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from CTFoundationLib import __version__
from CTFoundationLib.anatomy.colours import score_colour
from CTFoundationLib.anatomy.masks import (
    AnatomyMasks,
    AnatomyRequest,
    build_anatomy,
    crop_to_content,
    resample_mask_nearest,
)
from CTFoundationLib.errors import CTInputError, DependencyError
from CTFoundationLib.inference.results import DetectionResult, Finding
from CTFoundationLib.io.files import cannot_write
from CTFoundationLib.io.volume import LPS_FROM_RAS, CTVolume
from CTFoundationLib.resources import ANATOMY_RESOURCES
from CTFoundationLib.vocab import FVLM_ORGANS

if TYPE_CHECKING:  # the runtime and the maps bring torch; a SEG of given masks needs neither
    from CTFoundationLib.inference.ctclip import CTCLIPRuntime
    from CTFoundationLib.inference.maps import FindingMaps

SEG_FILE = "seg.dcm"
SR_FILE = "sr.dcm"
MANUFACTURER = "CTFoundation"
NOT_CLINICAL = "not for clinical use"
# Deflated Explicit VR Little Endian: zlib over the whole SEG, lossless. The bit-packed masks shrink 55x on the
# RICORD case (59.7 MB -> 1.1 MB; highdicom's only compressed syntax for BINARY, JPEG 2000 lossless, gives 2.3 MB and
# needs an extra codec that DCMTK-based readers such as dcmqi lack). pydicom, highdicom and DCMTK read it.
SEG_TRANSFER_SYNTAX = "1.2.840.10008.1.2.1.99"
GRID_TOLERANCE_MM = 1e-3  # a mask grid this close to the source frames' grid is taken as the same grid
LO_LENGTH = 64  # DICOM long string (segment labels, descriptions, algorithm names)
ANATOMY_CATEGORY = ("SCT", "123037004", "Anatomical Structure")
GENERIC_ANATOMY = ("SCT", "91723000", "Anatomical Structure")
FINDING_CATEGORY = ("SCT", "49755003", "Morphologically Abnormal Structure")
LATERALITY = {"left": ("SCT", "7771000", "Left"), "right": ("SCT", "24028007", "Right")}
PROCEDURE = ("LN", "24627-2", "CT Chest")
MAP_REGION_FRACTION = 0.5  # a map region: voxels at >= this fraction of the map's positive maximum


def needs_dicom_message(volume: CTVolume) -> str:
    """The one line said when DICOM output is asked for a CT that does not come from DICOM files."""
    kind = volume.metadata.get("format") or "not DICOM"
    return (f"{volume.source or 'this CT'}: no DICOM SEG/SR written: DICOM output needs a DICOM source (this CT is "
            f"{kind}); give the DICOM series folder instead")


@dataclass(frozen=True)
class FindingRegion:
    """Where a positive finding is: a boolean mask (i, j, k) on the CT's grid, and how it was made (one line);
    mask None: the finding has no region, `method` says why (a note in the output)."""

    mask: np.ndarray | None
    method: str


@dataclass
class DicomOutputs:
    """What was written: the files (seg None when no segment had voxels), their UIDs, the SEG's segments
    (number -> label) and notes (parts left out)."""

    seg: Path | None
    sr: Path
    study_uid: str
    source_series_uid: str
    seg_series_uid: str
    sr_series_uid: str
    segments: dict[int, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"written": True, "seg": str(self.seg) if self.seg else None, "sr": str(self.sr),
                "study_uid": self.study_uid, "source_series_uid": self.source_series_uid,
                "seg_series_uid": self.seg_series_uid, "sr_series_uid": self.sr_series_uid,
                "segments": {str(k): v for k, v in self.segments.items()}, "notes": list(self.notes)}


# ---------------------------------------------------------------- codes


@cache
def _terminology() -> dict:
    return json.loads((ANATOMY_RESOURCES / "terminology.json").read_text(encoding="utf-8"))["types"]


@cache
def _finding_codes() -> dict:
    return json.loads((ANATOMY_RESOURCES / "finding_codes.json").read_text(encoding="utf-8"))


def coded(triple: Sequence[str]):
    """A highdicom CodedConcept from [scheme, value, meaning]."""
    import highdicom as hd

    scheme, value, meaning = triple
    return hd.sr.CodedConcept(value=value, scheme_designator=scheme, meaning=meaning)


def finding_code(name: str):
    """The code of a CT-RATE finding (SNOMED CT where the DICOM standard has it, else the private scheme)."""
    codes = _finding_codes()["findings"]
    if name not in codes:
        raise CTInputError(f"finding '{name}' has no code in Resources/anatomy/finding_codes.json; add one there")
    return coded(codes[name])


def anatomy_codes(name: str) -> tuple[object, object | None]:
    """(type, laterality modifier or None) of an anatomy segment, from the Slicer module's terminology."""
    entry = _terminology().get(name)
    if entry is None:
        return coded(GENERIC_ANATOMY), None
    code, meaning, laterality = entry
    return coded(("SCT", code, meaning)), coded(LATERALITY[laterality]) if laterality else None


# ---------------------------------------------------------------- the source series


@dataclass
class SourceSeries:
    """The source CT's DICOM headers in frame order (sorted along the slice normal, as `read_ct` stacks them),
    and the frames' grid: voxel (column, row, frame) -> RAS mm."""

    datasets: list
    affine_ras: np.ndarray

    @property
    def shape_ijk(self) -> tuple[int, int, int]:
        first = self.datasets[0]
        return int(first.Columns), int(first.Rows), len(self.datasets)

    @property
    def series_uid(self) -> str:
        return str(self.datasets[0].SeriesInstanceUID)


def source_series(volume: CTVolume, files: Sequence[Path] | None = None) -> SourceSeries:
    """The headers of the series `volume` was read from: `files` (the source's DICOM files, e.g. from Slicer's
    DICOM database), else the DICOM folder `volume.source`. CTInputError when the CT is not from DICOM files
    (`needs_dicom_message`) or that series is not there."""
    if files is None:
        if volume.metadata.get("format") != "dicom" or not Path(volume.source).is_dir():
            raise CTInputError(needs_dicom_message(volume))
        files = sorted(p for p in Path(volume.source).rglob("*") if p.is_file())
    return read_source_series(files, volume.metadata.get("series_uid"), volume.source)


def read_source_series(files: Sequence[Path], series_uid: str | None, where: str) -> SourceSeries:
    """One series' headers (the series with most slices when `series_uid` is None) sorted along the slice normal."""
    import pydicom

    by_series: dict[str, list] = {}
    for path in files:
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
        except (pydicom.errors.InvalidDicomError, OSError, EOFError, ValueError, TypeError, AttributeError):
            continue  # not DICOM (checksums, notes): read_ct skips them too
        if "ImagePositionPatient" in header and str(header.get("Modality", "CT")) == "CT":
            if not header.get("SpecificCharacterSet", "default"):  # empty (as some scanners write it) means the
                del header.SpecificCharacterSet  # default repertoire; highdicom refuses the empty value
            by_series.setdefault(str(header.get("SeriesInstanceUID", "")), []).append(header)
    series_uid = series_uid or max(by_series, key=lambda uid: len(by_series[uid]), default=None)
    headers = by_series.get(series_uid or "", [])
    if not headers:
        raise CTInputError(f"{where}: no DICOM CT series {series_uid or ''} there; DICOM output needs the source "
                           "series' files")
    orientation = np.asarray(headers[0].ImageOrientationPatient, dtype=float)
    normal = np.cross(orientation[:3], orientation[3:])
    headers.sort(key=lambda h: float(np.asarray(h.ImagePositionPatient, dtype=float) @ normal))
    return SourceSeries(headers, _frames_affine_ras(headers, orientation, normal))


def _frames_affine_ras(headers: list, orientation: np.ndarray, normal: np.ndarray) -> np.ndarray:
    row_spacing, column_spacing = (float(v) for v in headers[0].PixelSpacing)
    positions = np.array([h.ImagePositionPatient for h in headers], dtype=float)
    step = float(np.median(np.diff(positions @ normal))) if len(headers) > 1 else 1.0  # as read_ct's slice step
    affine_lps = np.eye(4)
    affine_lps[:3, 0] = orientation[:3] * column_spacing
    affine_lps[:3, 1] = orientation[3:] * row_spacing
    affine_lps[:3, 2] = normal * step
    affine_lps[:3, 3] = positions[0]
    return LPS_FROM_RAS @ affine_lps


def frames_of(mask_ijk: np.ndarray, mask_affine_ras: np.ndarray, series: SourceSeries) -> np.ndarray:
    """A boolean mask on a CT grid as (frame, row, column) of the source series: the same array transposed when the
    grids agree (a CT read from that series), else resampled (nearest neighbour in world coordinates)."""
    shape = series.shape_ijk
    if mask_ijk.shape == shape and np.allclose(mask_affine_ras, series.affine_ras, atol=GRID_TOLERANCE_MM):
        return np.ascontiguousarray(mask_ijk.transpose(2, 1, 0), dtype=bool)
    frames = np.zeros(shape[::-1], dtype=bool)
    cropped = crop_to_content(mask_ijk)
    if cropped is None:
        return frames
    placed = resample_mask_nearest(cropped[1], cropped[0], mask_affine_ras, shape, series.affine_ras)
    if placed is not None:
        (i, j, k), crop = placed
        frames[k:k + crop.shape[2], j:j + crop.shape[1], i:i + crop.shape[0]] = crop.transpose(2, 1, 0)
    return frames


# ---------------------------------------------------------------- finding regions


def grounded_regions(anatomy: AnatomyMasks, detection: DetectionResult) -> dict[str, FindingRegion]:
    """Positive finding -> the union of the anatomy segments the grounding puts it on (finding_anatomy.json);
    positives with no segment in this anatomy get none. A stand-in for localisation maps: as large as the organ."""
    from CTFoundationLib.inference.grounding import finding_map, segments_for

    regions = {}
    for finding in detection.findings:
        where = finding_map()["findings"].get(finding.name)
        if not finding.positive or where is None:
            continue
        names = segments_for(anatomy, where["region"], where["fvlm_organ"])
        if names:
            mask = np.zeros(anatomy.shape_ijk, dtype=bool)
            for name in names:
                segment = anatomy.segments[name]
                mask[segment.slices] |= segment.mask
            regions[finding.name] = FindingRegion(mask, f"anatomy grounding: {', '.join(names)}")
    return regions


def map_region(values: np.ndarray, fraction: float = MAP_REGION_FRACTION) -> np.ndarray | None:
    """One finding's region from its map on the CT grid: the voxels at >= `fraction` of the map's maximum, only the
    connected component (faces touching) that holds the maximum, so one hot spot gives one region. None when the
    map has no positive value: no voxel speaks for the finding."""
    from scipy import ndimage

    peak = np.unravel_index(int(np.argmax(values)), values.shape)
    top = float(values[peak])
    if not top > 0:
        return None
    labels, _ = ndimage.label(values >= fraction * top)
    return labels == labels[peak]


def map_regions(maps: FindingMaps, volume: CTVolume, detection: DetectionResult,
                fraction: float = MAP_REGION_FRACTION) -> dict[str, FindingRegion]:
    """Positive finding -> `map_region` of its map (`maps.in_ct`); a map without a positive value gives a region
    of mask None (a note, no segment). Positives without a map (not in `maps`) get no entry."""
    method = f"map region: >= {fraction:g} x map max, peak part; not a segmentation"
    regions = {}
    for finding in detection.findings:
        if finding.positive and finding.name in maps.names:
            mask = map_region(maps.in_ct(finding.name, volume), fraction)
            regions[finding.name] = FindingRegion(mask, method if mask is not None else "its map has no positive value")
    return regions


# ---------------------------------------------------------------- in batch reports

RegionMaker = Callable[[CTVolume, DetectionResult, AnatomyMasks], Mapping[str, FindingRegion]]


def regions_from_grounding(volume: CTVolume, detection: DetectionResult, anatomy: AnatomyMasks
                           ) -> Mapping[str, FindingRegion]:
    """The default `RegionMaker`: `grounded_regions`."""
    return grounded_regions(anatomy, detection)


@dataclass(frozen=True)
class MapRegions:
    """A `RegionMaker` from the detection model's finding maps (`map_regions`); with the runtime's `keep_tokens`
    the maps reuse detection's image pass."""

    runtime: CTCLIPRuntime
    fraction: float = MAP_REGION_FRACTION

    @property
    def key(self) -> str:
        return f"map_regions:{self.fraction:g}"

    def __call__(self, volume: CTVolume, detection: DetectionResult, anatomy: AnatomyMasks
                 ) -> Mapping[str, FindingRegion]:
        return map_regions(self.runtime.finding_maps(volume), volume, detection, self.fraction)


@dataclass(frozen=True)
class DicomExport:
    """`report --dicom-out`: DICOM SEG + SR per DICOM case into `out/<case folder>/`.

    anatomy: where the SEG's anatomy comes from when no report section made it (the per-anatomy section's is
    reused). regions: positive finding -> its region on the CT grid (default: the grounding's segments;
    `MapRegions` for the finding maps' regions).
    """

    out: Path
    anatomy: AnatomyRequest = field(default_factory=AnatomyRequest)
    regions: RegionMaker = regions_from_grounding

    @property
    def settings(self) -> dict:
        """What the DICOM output depends on besides the CT and the detection (part of the batch's resume key)."""
        return {"out": str(Path(self.out).resolve()), "totalsegmentator": self.anatomy.use_totalsegmentator,
                "regions": getattr(self.regions, "key", None) or getattr(self.regions, "__name__", repr(self.regions))}

    def write(self, folder_name: str, volume: CTVolume, detection: DetectionResult,
              anatomy: AnatomyMasks | None = None) -> dict:
        """The case's `dicom` record: the files written, or (a CT not from DICOM) why none were."""
        if volume.metadata.get("format") != "dicom":
            return {"written": False, "reason": needs_dicom_message(volume)}
        anatomy = anatomy or build_anatomy(volume, self.anatomy, FVLM_ORGANS)
        regions = self.regions(volume, detection, anatomy)
        return write_dicom_outputs(volume, detection, Path(self.out) / folder_name, anatomy, regions).to_dict()


# ---------------------------------------------------------------- writing


def write_dicom_outputs(
    volume: CTVolume,
    detection: DetectionResult,
    out_dir: Path | str,
    anatomy: AnatomyMasks | None = None,
    regions: Mapping[str, FindingRegion] | None = None,
    series: SourceSeries | None = None,
) -> DicomOutputs:
    """Write `out_dir/seg.dcm` and `out_dir/sr.dcm` for one CT read from a DICOM folder.

    anatomy: segments on the CT's grid (None: the SEG holds finding regions only). regions: positive finding ->
    its region on the CT's grid (None: `grounded_regions` of the anatomy). series: the source headers (default:
    read again from `volume.source`). A CT that is not from DICOM files raises CTInputError (`needs_dicom_message`).
    """
    hd = _highdicom()
    series = series or source_series(volume)
    regions = dict(grounded_regions(anatomy, detection) if regions is None and anatomy else regions or {})
    out_dir = Path(out_dir)
    notes: list[str] = []
    layers, descriptions, finding_segments = _segments(volume, series, detection, anatomy, regions, notes)
    with warnings.catch_warnings():  # the patient's name is copied as the source has it, whatever its form
        warnings.filterwarnings("ignore", "The string .* person name", UserWarning)
        seg, sr = _make_objects(hd, series, detection, layers, descriptions, finding_segments, notes)
    _save(out_dir, seg, sr)
    return DicomOutputs(out_dir / SEG_FILE if seg is not None else None, out_dir / SR_FILE,
                        str(series.datasets[0].StudyInstanceUID), series.series_uid,
                        str(seg.SeriesInstanceUID) if seg is not None else "", str(sr.SeriesInstanceUID),
                        {d.SegmentNumber: d.SegmentLabel for d in descriptions}, notes)


def _make_objects(hd, series: SourceSeries, detection: DetectionResult, layers: list, descriptions: list,
                  finding_segments: dict[str, int], notes: list[str]) -> tuple:
    """(the SEG or None when it would have no segment, the SR)."""
    seg = None
    if layers:
        seg = hd.seg.Segmentation(
            source_images=series.datasets, pixel_array=np.stack(layers, axis=-1),
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=descriptions,
            series_instance_uid=hd.UID(), series_number=_series_number(series, 1), sop_instance_uid=hd.UID(),
            instance_number=1, manufacturer=MANUFACTURER, manufacturer_model_name=detection.model[:LO_LENGTH],
            software_versions=__version__, device_serial_number="none",
            series_description=f"CTFoundation segments ({NOT_CLINICAL})", content_label="CTFOUNDATION",
            content_description=f"anatomy and positive-finding regions ({NOT_CLINICAL})")
        seg.file_meta.TransferSyntaxUID = SEG_TRANSFER_SYNTAX  # built uncompressed, deflated when saved
    else:
        notes.append("no anatomy and no positive finding region: no SEG written")
    report = _measurement_report(detection, series, seg, finding_segments)
    sr = hd.sr.Comprehensive3DSR(
        evidence=[*series.datasets, *([seg] if seg is not None else [])], content=report,
        series_instance_uid=hd.UID(), series_number=_series_number(series, 2), sop_instance_uid=hd.UID(),
        instance_number=1, manufacturer=MANUFACTURER, is_complete=True,
        series_description=f"CTFoundation findings ({NOT_CLINICAL})")
    return seg, sr


def _highdicom():
    try:
        import highdicom
    except ImportError:
        raise DependencyError("DICOM output needs highdicom: pip install 'highdicom>=0.28' (the 'dicom' extra)"
                              ) from None
    return highdicom


def _segments(volume, series, detection, anatomy, regions, notes) -> tuple[list, list, dict[str, int]]:
    """(masks as (frame, row, column), SegmentDescriptions, finding -> its segment number)."""
    layers, descriptions, finding_segments = [], [], {}
    for name, segment in (anatomy.segments.items() if anatomy else ()):
        frames = frames_of(anatomy.mask(name), anatomy.affine_ras, series)
        if not frames.any():
            notes.append(f"anatomy {name}: outside the source series' frames, left out")
            continue
        layers.append(frames)
        descriptions.append(_anatomy_description(len(layers), name, segment.info.title, anatomy.source))
    by_name = {finding.name: finding for finding in detection.findings}
    for name, region in regions.items():
        if name not in by_name:
            raise CTInputError(f"finding region '{name}': not a finding of the detection ({detection.model})")
        if not by_name[name].positive:  # a region says where a positive finding is; others get none
            notes.append(f"finding {name}: not positive, its region is left out")
            continue
        if region.mask is None:
            notes.append(f"finding {name}: no region ({region.method})")
            continue
        if np.shape(region.mask) != volume.shape_ijk:
            raise CTInputError(f"finding region '{name}': mask of shape {np.shape(region.mask)}, the CT's grid is "
                               f"{volume.shape_ijk}; give the region on the CT's grid")
        frames = frames_of(np.asarray(region.mask, dtype=bool), volume.affine_ras, series)
        if not frames.any():
            notes.append(f"finding {name}: empty region, no segment")
            continue
        layers.append(frames)
        descriptions.append(_finding_description(len(layers), by_name[name], region, detection))
        finding_segments[name] = len(layers)
    return layers, descriptions, finding_segments


def _anatomy_description(number: int, name: str, title: str, source: str):
    import highdicom as hd

    segment_type, laterality = anatomy_codes(name)
    description = hd.seg.SegmentDescription(
        segment_number=number, segment_label=title[:LO_LENGTH], segmented_property_category=coded(ANATOMY_CATEGORY),
        segmented_property_type=segment_type, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=source[:LO_LENGTH], family=_family(source), version=__version__),
        tracking_id=name[:LO_LENGTH], tracking_uid=hd.UID())
    if laterality is not None:  # as Slicer's terminology: the side is a modifier of the type
        description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [laterality]
    return description


def _family(source: str):
    from pydicom.sr.codedict import codes

    learned = "totalsegmentator" in source.lower()
    return codes.cid7162.ArtificialIntelligence if learned else codes.cid7162.HistogramAnalysis


def _finding_description(number: int, finding: Finding, region: FindingRegion, detection: DetectionResult):
    import highdicom as hd
    from pydicom.sr.codedict import codes

    description = hd.seg.SegmentDescription(
        segment_number=number, segment_label=f"{finding.name} region"[:LO_LENGTH],
        segmented_property_category=coded(FINDING_CATEGORY), segmented_property_type=finding_code(finding.name),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=detection.model[:LO_LENGTH], family=codes.cid7162.ArtificialIntelligence,
            version=detection.checkpoint_sha256[:LO_LENGTH], parameters={"region": region.method[:LO_LENGTH]}),
        tracking_id=finding.name[:LO_LENGTH], tracking_uid=hd.UID(),
        display_color=hd.color.CIELabColor.from_rgb(*score_colour(finding.probability)))
    description.SegmentDescription = region.method[:LO_LENGTH]
    return description


def _measurement_report(detection: DetectionResult, series: SourceSeries, seg, finding_segments: dict[str, int]):
    import highdicom as hd
    from pydicom.sr.codedict import codes

    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=hd.UID(), name=MANUFACTURER, manufacturer_name=MANUFACTURER, model_name=detection.model[:LO_LENGTH]))
    algorithm = hd.sr.AlgorithmIdentification(name=detection.model, version=detection.checkpoint_sha256,
                                              parameters=[f"method: {detection.method}", f"software: {__version__}"])
    groups = []
    for finding in detection.findings:
        common = {"tracking_identifier": hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=finding.name),
                  "finding_type": finding_code(finding.name), "algorithm_id": algorithm,
                  "measurements": _measurements(finding), "qualitative_evaluations": [_presence(finding)]}
        if finding.name in finding_segments:
            segment = hd.sr.ReferencedSegment(
                sop_class_uid=seg.SOPClassUID, sop_instance_uid=seg.SOPInstanceUID,
                segment_number=finding_segments[finding.name],
                source_series=hd.sr.SourceSeriesForSegmentation(series.series_uid))
            groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(referenced_segment=segment,
                                                                                    **common))
        else:
            groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(**common))
    return hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=coded(PROCEDURE), imaging_measurements=groups)


def _measurements(finding: Finding) -> list:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    measured = [hd.sr.Measurement(name=codes.DCM.Probability, value=float(finding.probability),
                                  unit=codes.UCUM.NoUnits)]
    if finding.threshold is not None:
        measured.append(hd.sr.Measurement(name=coded(_finding_codes()["decision_threshold"]),
                                          value=float(finding.threshold), unit=codes.UCUM.NoUnits))
    return measured


def _presence(finding: Finding):
    import highdicom as hd
    from pydicom.sr.codedict import codes

    value = {True: codes.DCM.Present, False: codes.DCM.Absent, None: codes.DCM.PresenceUndetermined}[finding.positive]
    return hd.sr.QualitativeEvaluation(name=codes.DCM.PresenceOfProperty, value=value)


def _series_number(series: SourceSeries, offset: int) -> int:
    """A series number after the source's (DICOM IS: at most 2^31 - 1)."""
    number = series.datasets[0].get("SeriesNumber")
    return min(int(number) + 1000 * offset if number not in (None, "") else 9000 + offset, 2**31 - 1)


def _save(out_dir: Path, seg, sr) -> None:
    """Write both objects (a partial pair left by a failure is removed: both or neither)."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        for dataset, name in ((seg, SEG_FILE), (sr, SR_FILE)):
            target = out_dir / name
            target.unlink(missing_ok=True)
            if dataset is not None:
                temporary = target.with_name(f".{name}.partial")
                dataset.save_as(temporary, enforce_file_format=True)
                temporary.replace(target)
    except OSError as error:
        for name in (SEG_FILE, SR_FILE):
            (out_dir / name).unlink(missing_ok=True)
        raise cannot_write(out_dir, error) from None
