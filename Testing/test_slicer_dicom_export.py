"""The Slicer module's DICOM export on slicer-core (Testing/slicer_core_app.py): a CT node loaded "from DICOM" (its
instance UIDs in Slicer's DICOM database), detection with its finding maps, then `exportDicom` through the
background worker (finding regions from those maps); a node without a DICOM source gets the one-line error."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import highdicom as hd
import nibabel
import pydicom
import pytest
import slicer_core_app
from small_models import bert_vocab, make_small_ctclip

from CTFoundationLib.errors import CTInputError
from CTFoundationLib.inference.maps import read_map_files
from CTFoundationLib.io.reading import read_ct
from CTFoundationLib.report.dicom import map_regions
from CTFoundationLib.vocab import CT_RATE_ABNORMALITIES

REPO = Path(__file__).resolve().parents[1]
SERIES = "dcmqi_ct_3slice"


@pytest.fixture(scope="module")
def ctf():
    slicer_core_app.start()
    if str(REPO / "CTFoundation") not in sys.path:
        sys.path.insert(0, str(REPO / "CTFoundation"))
    import CTFoundation

    return CTFoundation


def test_export_writes_seg_and_sr_of_the_nodes_dicom_series(ctf, ct_dir, tmp_path, monkeypatch) -> None:
    import slicer

    slicer.mrmlScene.Clear(1)
    files = sorted((ct_dir / SERIES).glob("*.dcm"))
    by_uid = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID): str(f) for f in files}
    monkeypatch.setattr(slicer, "dicomDatabase", SimpleNamespace(fileForInstance=by_uid.get,
                                                                 fileValue=lambda file, tag: ""), raising=False)
    volume = read_ct(ct_dir / SERIES)
    nibabel.save(nibabel.Nifti1Image(volume.hu, volume.affine_ras), str(tmp_path / "ct.nii"))
    node = slicer.util.loadVolume(str(tmp_path / "ct.nii"))
    checkpoint, config, _ = make_small_ctclip(tmp_path / "small")
    (tmp_path / "thresholds.json").write_text(json.dumps({"Medical material": 0.0, "Emphysema": 0.0}))
    logic = ctf.CTFoundationLogic()
    parameters = logic.getParameterNode()
    parameters.weightsFile, parameters.modelConfigFile = str(checkpoint), str(config)
    parameters.textEncoder, parameters.thresholdsFile = str(bert_vocab()), str(tmp_path / "thresholds.json")
    parameters.weightsHome, parameters.device = str(tmp_path / "home"), "cpu"
    outcome = logic.detect(node)

    with pytest.raises(CTInputError, match="DICOM output needs a DICOM source"):
        logic.exportDicom(outcome, tmp_path / "dicom")  # not loaded through the DICOM module
    node.SetAttribute("DICOM.instanceUIDs", " ".join(by_uid))
    sr_path = logic.exportDicom(outcome, tmp_path / "dicom")
    assert sr_path == tmp_path / "dicom" / "sr.dcm"
    seg, sr = hd.seg.segread(tmp_path / "dicom" / "seg.dcm"), hd.sr.srread(sr_path)
    series_uid = pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series_uid
    assert {i.ReferencedSOPInstanceUID for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence} == set(
        by_uid)
    regions = map_regions(read_map_files(outcome.mapFiles), volume, outcome.result)
    with_region = [name for name, region in regions.items() if region.mask is not None]
    assert set(outcome.mapFiles) == set(CT_RATE_ABNORMALITIES) and "Medical material" in with_region
    assert [d.SegmentLabel for d in seg.SegmentSequence] == ["body", "bone", *(f"{n} region" for n in with_region)]
    assert all(d.SegmentDescription.startswith("map region") for d in seg.SegmentSequence[2:])
    groups = {g.tracking_identifier: g for g in sr.content.get_volumetric_roi_measurement_groups()}
    assert list(groups) == with_region
    numbers = {m.name.meaning: m.value for m in groups["Medical material"].get_measurements()}
    probability = numbers["Probability"]
    assert probability == pytest.approx(outcome.result.probability("Medical material"), abs=1e-9)
