"""DICOM SEG + SR output on real DICOM CT series (the dcmqi 3-slice set) with a small CT-CLIP checkpoint: both
objects read back with highdicom / pydicom, their references to the source series, segment codes, masks and
numbers checked; `report --dicom-out` end to end, and the one-line message for a NIfTI input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import highdicom as hd
import jsonschema
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes
from small_models import bert_vocab, make_small_ctclip

from CTFoundationLib.anatomy.masks import AnatomyRequest, build_anatomy
from CTFoundationLib.cli import main
from CTFoundationLib.errors import CTInputError
from CTFoundationLib.host import worker
from CTFoundationLib.inference.ctclip import CTCLIPRuntime
from CTFoundationLib.inference.maps import FindingMaps, write_map_niftis
from CTFoundationLib.inference.results import detection_report
from CTFoundationLib.io.reading import read_ct
from CTFoundationLib.io.volume import CTVolume
from CTFoundationLib.report import RESULT_SCHEMA
from CTFoundationLib.report.dicom import (
    FindingRegion,
    frames_of,
    grounded_regions,
    map_region,
    map_regions,
    source_series,
    write_dicom_outputs,
)
from CTFoundationLib.vocab import CT_RATE_ABNORMALITIES, FVLM_ORGANS

SERIES = "dcmqi_ct_3slice"
POSITIVE = ("Medical material", "Lung nodule", "Emphysema")  # threshold 0: positive whatever the probability
NIFTI = "ricord1a_419639-000082_chest_noncontrast/ct_3mm_iso.nii.gz"


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return make_small_ctclip(tmp_path_factory.mktemp("small"))


@pytest.fixture(scope="module")
def thresholds() -> dict[str, float]:
    return {name: 0.0 if name in POSITIVE else 1.0 for name in CT_RATE_ABNORMALITIES}


@pytest.fixture(scope="module")
def runtime(small, tmp_path_factory) -> CTCLIPRuntime:
    checkpoint, _, config = small
    return CTCLIPRuntime(checkpoint, bert_vocab(), config=config, device="cpu",
                         cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def written(runtime, thresholds, ct_dir, tmp_path_factory):
    """SEG + SR of the 3-slice series: fallback anatomy, grounded regions and one hand-made box region."""
    volume = read_ct(ct_dir / SERIES)
    detection = runtime.detect(volume, thresholds)
    anatomy = build_anatomy(volume, AnatomyRequest(use_totalsegmentator=False), FVLM_ORGANS)
    box = np.zeros(volume.shape_ijk, bool)
    box[300:340, 200:230, 1:3] = True  # any mask on the CT grid, as a localisation map will give
    regions = {**grounded_regions(anatomy, detection), "Lung nodule": FindingRegion(box, "test box"),
               "Cardiomegaly": FindingRegion(box, "a region of a negative finding: left out")}
    outputs = write_dicom_outputs(volume, detection, tmp_path_factory.mktemp("dicom"), anatomy, regions)
    assert outputs.notes == ["finding Cardiomegaly: not positive, its region is left out"]
    return volume, detection, anatomy, regions, outputs


def source_files(ct_dir) -> list[pydicom.Dataset]:
    """The source slices read directly, in the order of their position along the slice normal (z here)."""
    headers = [pydicom.dcmread(path, stop_before_pixels=True) for path in sorted((ct_dir / SERIES).glob("*.dcm"))]
    return sorted(headers, key=lambda h: float(h.ImagePositionPatient[2]))


def code_of(item) -> tuple[str, str]:
    return str(item.CodingSchemeDesignator), str(item.CodeValue)


def test_seg_references_the_source_series_and_holds_the_masks(written, ct_dir):
    volume, detection, anatomy, regions, outputs = written
    sources = source_files(ct_dir)
    seg = hd.seg.segread(outputs.seg)
    assert seg.Modality == "SEG" and seg.SegmentationType == "BINARY"
    assert seg.file_meta.TransferSyntaxUID == pydicom.uid.DeflatedExplicitVRLittleEndian  # lossless: masks below
    assert seg.StudyInstanceUID == sources[0].StudyInstanceUID == outputs.study_uid
    assert seg.PatientID == sources[0].PatientID and seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    (referenced,) = seg.ReferencedSeriesSequence
    assert referenced.SeriesInstanceUID == sources[0].SeriesInstanceUID
    assert {item.ReferencedSOPInstanceUID for item in referenced.ReferencedInstanceSequence} == {
        h.SOPInstanceUID for h in sources}
    labels = {d.SegmentNumber: d.SegmentLabel for d in seg.SegmentSequence}
    assert set(anatomy.segments) == {"body", "bone"}  # three slices: too few for lungs and airway
    assert list(labels.values()) == ["body", "bone", "Medical material region", "Lung nodule region"]
    expected = {"body": anatomy.mask("body"), "bone": anatomy.mask("bone"),
                "Medical material region": anatomy.mask("body"), "Lung nodule region": regions["Lung nodule"].mask}
    pixels = seg.get_pixels_by_source_instance([h.SOPInstanceUID for h in sources],
                                               segment_numbers=list(labels), assert_missing_frames_are_empty=True)
    for index, label in enumerate(labels.values()):
        assert np.array_equal(pixels[..., index] > 0, expected[label].transpose(2, 1, 0)), label


def test_seg_segments_carry_the_terminology_codes(written):
    _, detection, _, _, outputs = written
    seg = hd.seg.segread(outputs.seg)
    described = {d.SegmentLabel: d for d in seg.SegmentSequence}
    anatomical, abnormal = ("SCT", "123037004"), ("SCT", "49755003")
    for label, segment_type in (("body", ("SCT", "38266002")), ("bone", ("SCT", "272673000"))):
        assert code_of(described[label].SegmentedPropertyCategoryCodeSequence[0]) == anatomical
        assert code_of(described[label].SegmentedPropertyTypeCodeSequence[0]) == segment_type
    nodule = described["Lung nodule region"]
    assert code_of(nodule.SegmentedPropertyCategoryCodeSequence[0]) == abnormal
    assert code_of(nodule.SegmentedPropertyTypeCodeSequence[0]) == ("99CTFOUNDATION", "CTRATE-10")
    algorithm = nodule.SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == detection.model
    assert algorithm.AlgorithmVersion == detection.checkpoint_sha256[:64]
    assert nodule.SegmentDescription == "test box"


def group_text(group, concept) -> str:
    """The one TEXT item of a measurement group named `concept`."""
    (text,) = [item.TextValue for item in group[0].ContentSequence
               if code_of(item.ConceptNameCodeSequence[0]) == (concept.scheme_designator, concept.value)]
    return text


def test_sr_lists_every_finding_with_its_numbers_and_references(written, ct_dir):
    _, detection, _, _, outputs = written
    sources = source_files(ct_dir)
    seg = hd.seg.segread(outputs.seg)
    sr = hd.sr.srread(outputs.sr)
    assert sr.StudyInstanceUID == sources[0].StudyInstanceUID and sr.Modality == "SR"
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    evidence = {series.SeriesInstanceUID: {item.ReferencedSOPInstanceUID for item in series.ReferencedSOPSequence}
                for study in sr.CurrentRequestedProcedureEvidenceSequence for series in study.ReferencedSeriesSequence}
    assert evidence == {sources[0].SeriesInstanceUID: {h.SOPInstanceUID for h in sources},
                        seg.SeriesInstanceUID: {seg.SOPInstanceUID}}
    report = sr.content
    roi_groups = report.get_volumetric_roi_measurement_groups()
    image_groups = report.get_image_measurement_groups()
    assert len(roi_groups) + len(image_groups) == len(CT_RATE_ABNORMALITIES)
    labels = {d.SegmentNumber: d.SegmentLabel for d in seg.SegmentSequence}
    for group in roi_groups:  # positives with a region reference their SEG segment and the source series
        reference = group.referenced_segment
        assert reference.referenced_sop_instance_uid == seg.SOPInstanceUID
        assert labels[reference.referenced_segment_numbers[0]] == f"{group.tracking_identifier} region"
        assert reference.source_series_for_segmentation.value == sources[0].SeriesInstanceUID
    assert {g.tracking_identifier for g in roi_groups} == {"Medical material", "Lung nodule"}
    by_name = {f.name: f for f in detection.findings}
    for group in [*roi_groups, *image_groups]:
        finding = by_name[group.tracking_identifier]
        numbers = {m.name.meaning: m.value for m in group.get_measurements()}
        assert numbers["Probability"] == pytest.approx(finding.probability, abs=1e-9)
        assert numbers["Decision threshold"] == finding.threshold
        (presence,) = group.get_qualitative_evaluations()
        assert presence.name == codes.DCM.PresenceOfProperty
        assert presence.value == (codes.DCM.Present if finding.positive else codes.DCM.Absent)
        assert finding.positive == (finding.name in POSITIVE)
        assert group.finding_type.meaning == finding.name
        assert group_text(group, codes.DCM.AlgorithmName) == detection.model
        assert group_text(group, codes.DCM.AlgorithmVersion) == detection.checkpoint_sha256
    assert by_name["Emphysema"].positive and "Emphysema" in {g.tracking_identifier for g in image_groups}  # no lung


@pytest.fixture(scope="module")
def mapped(runtime, thresholds, ct_dir, tmp_path_factory):
    """SEG + SR of the 3-slice series with the finding maps' regions (no anatomy); Emphysema's map negated, so it
    has no positive part."""
    volume = read_ct(ct_dir / SERIES)
    detection = runtime.detect(volume, thresholds)
    maps = runtime.finding_maps(volume)
    values = maps.values.copy()
    emphysema = maps.names.index("Emphysema")
    values[emphysema] = -np.abs(values[emphysema]) - 1e-3
    maps = FindingMaps(maps.names, values, maps.grid, maps.model)
    regions = map_regions(maps, volume, detection)
    outputs = write_dicom_outputs(volume, detection, tmp_path_factory.mktemp("mapped"), None, regions)
    return volume, detection, maps, outputs


def test_map_region_keeps_the_peak_component_at_the_fraction():
    values = np.zeros((20, 10, 10), np.float32)
    values[2:5, 2:5, 2:5] = 1.0
    values[3, 3, 3] = 2.0  # the peak
    values[10:14, 2:5, 2:5] = 1.5  # hotter than half the peak, but apart from it
    values[5, 3, 3] = 0.9  # touches the peak's blob, below half the peak
    region = map_region(values, 0.5)
    assert region.sum() == 27 and region[2:5, 2:5, 2:5].all()
    assert map_region(values, 0.3).sum() == 27 + 1  # 0.9 >= 0.6 joins; the far blob stays apart
    assert map_region(-np.abs(values)) is None and map_region(np.zeros((3, 3, 3))) is None


def test_seg_holds_a_map_region_per_positive_finding_with_its_code_around_the_map_maximum(mapped, ct_dir):
    volume, detection, maps, outputs = mapped
    seg = hd.seg.segread(outputs.seg)
    sources = source_files(ct_dir)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == sources[0].SeriesInstanceUID
    described = {d.SegmentLabel: d for d in seg.SegmentSequence}
    positives = sorted(f.name for f in detection.findings if f.positive)
    assert positives == sorted(POSITIVE)
    with_region = sorted(name for name in positives if maps.in_ct(name, volume).max() > 0)
    assert "Emphysema" not in with_region and len(with_region) == 2  # the small model's maps do reach above 0
    assert sorted(described) == [f"{name} region" for name in with_region]
    assert outputs.notes == ["finding Emphysema: no region (its map has no positive value)"]
    numbers = [described[f"{name} region"].SegmentNumber for name in with_region]
    pixels = seg.get_pixels_by_source_instance([h.SOPInstanceUID for h in sources], segment_numbers=numbers,
                                               assert_missing_frames_are_empty=True)
    for index, name in enumerate(with_region):
        segment = described[f"{name} region"]
        assert code_of(segment.SegmentedPropertyCategoryCodeSequence[0]) == ("SCT", "49755003")
        expected_code = finding_code_pair(name)
        assert code_of(segment.SegmentedPropertyTypeCodeSequence[0]) == expected_code
        assert segment.SegmentDescription == "map region: >= 0.5 x map max, peak part; not a segmentation"
        mask = pixels[..., index].transpose(2, 1, 0) > 0  # back to (i, j, k)
        values = maps.in_ct(name, volume)
        peak = np.unravel_index(int(np.argmax(values)), values.shape)
        assert mask[peak] and 0 < mask.sum() < mask.size
        assert values[mask].min() >= 0.5 * values[peak] - 1e-6  # nothing below the fraction of the maximum
    sr = hd.sr.srread(outputs.sr)
    groups = {g.tracking_identifier: g for g in sr.content.get_volumetric_roi_measurement_groups()}
    assert sorted(groups) == with_region
    for name, group in groups.items():
        assert group.referenced_segment.referenced_segment_numbers == [described[f"{name} region"].SegmentNumber]
        assert (group.finding_type.scheme_designator, group.finding_type.value) == finding_code_pair(name)


def finding_code_pair(name: str) -> tuple[str, str]:
    """(scheme, value) of a finding's code as Resources/anatomy/finding_codes.json gives it."""
    from CTFoundationLib.resources import ANATOMY_RESOURCES

    scheme, value, _ = json.loads((ANATOMY_RESOURCES / "finding_codes.json").read_text())["findings"][name]
    return scheme, value


def test_masks_on_another_grid_are_resampled_onto_the_source_frames(written, ct_dir):
    volume, _, anatomy, _, _ = written
    mask = anatomy.mask("bone")
    moved = CTVolume(mask.astype(np.int16), volume.affine_ras).reoriented("RAS")  # stored in another voxel order
    assert moved.hu.shape == mask.shape and not np.array_equal(moved.hu > 0, mask)
    frames = frames_of(np.asarray(moved.hu > 0), moved.affine_ras, source_series(volume))
    assert np.array_equal(frames, mask.transpose(2, 1, 0))


def test_a_nifti_input_gets_one_line_and_no_files(small, thresholds, ct_dir, tmp_path, capsys):
    checkpoint, config_path, _ = small
    (tmp_path / "thresholds.json").write_text(json.dumps(thresholds))
    series = shutil.copytree(ct_dir / SERIES, tmp_path / "cases" / "chest")
    code = main(["report", str(series), str(ct_dir / NIFTI), "--out", str(tmp_path / "out"),
                 "--dicom-out", str(tmp_path / "dicom"), "--weights", str(checkpoint), "--model-config",
                 str(config_path), "--text-encoder", str(bert_vocab()), "--device", "cpu", "--thresholds",
                 str(tmp_path / "thresholds.json"), "--no-totalsegmentator"])
    captured = capsys.readouterr()
    assert code == 0
    assert f"dicom:   {tmp_path / 'dicom'}" in captured.out
    lines = [line for line in captured.err.splitlines() if "DICOM output needs a DICOM source" in line]
    assert len(lines) == 1 and "ct_3mm_iso" in lines[0] and "nifti" in lines[0]
    assert sorted(p.name for p in (tmp_path / "dicom").iterdir()) == ["chest"]
    record = json.loads((tmp_path / "out" / "chest" / "result.json").read_text())["dicom"]
    assert record["written"] and Path(record["seg"]).parent == tmp_path / "dicom" / "chest"
    assert hd.sr.srread(record["sr"]).content.get_volumetric_roi_measurement_groups()
    findings = [d for d in hd.seg.segread(record["seg"]).SegmentSequence
                if d.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"]
    assert findings and all(d.SegmentDescription.startswith("map region") for d in findings)  # from the maps
    nifti = json.loads((tmp_path / "out" / "ct_3mm_iso" / "result.json").read_text())
    assert nifti["status"] == "ok" and nifti["dicom"]["written"] is False
    for case in ("chest", "ct_3mm_iso"):
        jsonschema.validate(json.loads((tmp_path / "out" / case / "result.json").read_text()),
                            json.loads(RESULT_SCHEMA.read_text()))
    with pytest.raises(CTInputError, match="DICOM output needs a DICOM source"):
        source_series(read_ct(ct_dir / NIFTI))


def test_the_worker_task_writes_both_for_a_ct_passed_as_nifti_with_its_dicom_files(written, runtime, ct_dir,
                                                                                     tmp_path, capsys):
    """What the Slicer export does: the CT as the module writes it (NIfTI of the node), its DICOM files, the
    detection JSON, the detection's token-grid maps; the anatomy made by the library."""
    import nibabel

    volume, detection, _, _, _ = written
    nibabel.save(nibabel.Nifti1Image(volume.hu, volume.affine_ras), str(tmp_path / "volume.nii"))
    (tmp_path / "detection.json").write_text(json.dumps(detection_report({}, detection)))
    files = [str(p) for p in sorted((ct_dir / SERIES).glob("*.dcm"))]
    request = {"ct": str(tmp_path / "volume.nii"), "detection": str(tmp_path / "detection.json"),
               "anatomy": {"use_totalsegmentator": False}, "out": str(tmp_path / "out")}
    (tmp_path / "request.json").write_text(json.dumps({**request, "dicom_files": files}))
    assert worker.main(["dicom", str(tmp_path / "request.json")]) == 0
    seg, sr = hd.seg.segread(tmp_path / "out" / "seg.dcm"), hd.sr.srread(tmp_path / "out" / "sr.dcm")
    sources = source_files(ct_dir)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == sources[0].SeriesInstanceUID
    assert [d.SegmentLabel for d in seg.SegmentSequence] == ["body", "bone", "Medical material region"]
    groups = sr.content.get_volumetric_roi_measurement_groups()
    assert [g.tracking_identifier for g in groups] == ["Medical material"]
    assert groups[0].referenced_segment.referenced_segment_numbers == [3]
    files_request = {**request, "dicom_files": files, "out": str(tmp_path / "mapped")}
    tokens = write_map_niftis(runtime.finding_maps(volume), volume, tmp_path / "maps", grid="tokens")
    files_request["maps"] = {name: str(file.path) for name, file in tokens.items()}  # as Slicer's detection kept
    (tmp_path / "request.json").write_text(json.dumps(files_request))
    assert worker.main(["dicom", str(tmp_path / "request.json")]) == 0
    expected = map_regions(runtime.finding_maps(volume), volume, detection)
    seg = hd.seg.segread(tmp_path / "mapped" / "seg.dcm")
    labels = [d.SegmentLabel for d in seg.SegmentSequence]
    with_region = [name for name, region in expected.items() if region.mask is not None]
    assert labels == ["body", "bone", *(f"{name} region" for name in with_region)] and with_region
    pixels = seg.get_pixels_by_source_instance([h.SOPInstanceUID for h in sources],
                                               segment_numbers=list(range(3, len(labels) + 1)))
    for index, name in enumerate(with_region):  # the token-grid files give the regions of the maps themselves
        assert np.array_equal(pixels[..., index].transpose(2, 1, 0) > 0, expected[name].mask), name
    capsys.readouterr()
    (tmp_path / "request.json").write_text(json.dumps(request))  # no DICOM files: one error line, exit 2
    assert worker.main(["dicom", str(tmp_path / "request.json")]) == 2
    (error,) = [line for line in capsys.readouterr().out.splitlines() if '"type": "error"' in line]
    assert "DICOM output needs a DICOM source" in error
