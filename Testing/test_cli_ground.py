"""`ctfoundation ground` end to end on the real RICORD scan and a TotalSegmentator crop, with small CT-CLIP and fVLM
checkpoints made here; the positive-segment overlays from its result."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from small_models import bert_vocab, make_small_ctclip, make_small_fvlm

from CTFoundationLib.anatomy.colours import SCORE_COLOURS, score_colour, segment_opacity
from CTFoundationLib.cli import main

RICORD_15 = "ricord1a_419639-000082_chest_noncontrast/ct_1p5mm_iso.nii.gz"
REPORT = ("Patchy ground-glass opacities in the right lower lobe. Minimal left pleural effusion. "
          "Sliding type hiatal hernia. No pneumothorax.")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    ctclip, ctclip_config, _ = make_small_ctclip(folder)
    fvlm, fvlm_config, _ = make_small_fvlm(folder)
    return {"ctclip": ["--weights", str(ctclip), "--model-config", str(ctclip_config),
                       "--text-encoder", str(bert_vocab()), "--device", "cpu"],
            "fvlm": ["--fvlm-weights", str(fvlm), "--fvlm-config", str(fvlm_config)]}


@pytest.fixture(autouse=True)
def private_home(tmp_path, monkeypatch):
    monkeypatch.setenv("CTFOUNDATION_HOME", str(tmp_path / "home"))


def test_ground_ricord_writes_grounded_json_and_masks(ct_dir, tmp_path, models, capsys):
    out = tmp_path / "out"
    code = main(["ground", str(ct_dir / RICORD_15), *models["ctclip"], *models["fvlm"], "--report", REPORT,
                 "--out", str(out), "--fvlm-maps", str(tmp_path / "maps")])
    assert code == 0
    assert "lung_right" in capsys.readouterr().out
    result = json.loads((out / "grounded.json").read_text())
    segments = result["segments"]
    assert set(segments) == {"body", "bone", "airway", "lung_left", "lung_right"}
    lung = {f["name"]: f for f in segments["lung_right"]["findings"]}
    assert len(lung) == 11 and all(f["ctclip"] and f["fvlm"] for f in lung.values())
    assert lung["Pleural effusion"]["fvlm"]["threshold_source"] == "default"
    assert result["models"]["fvlm"]["mode"] == "organ" and "Lymphadenopathy" in result["unplaced_findings"]
    texts = {side: [s["text"] for s in segments[side]["sentences"]] for side in ("lung_left", "lung_right")}
    assert texts["lung_right"] == ["Patchy ground-glass opacities in the right lower lobe."]
    assert texts["lung_left"] == ["Minimal left pleural effusion."]
    unplaced = {s["text"]: s for s in result["unplaced_sentences"]}
    assert unplaced["Sliding type hiatal hernia."]["region"] == "esophagus"
    assert segments["body"]["sentences"] == [  # RadGenome files pneumothorax under "others": the body hosts it
        {"text": "No pneumothorax.", "path": "others", "laterality": None, "negated": True}]
    assert "built-in HU-threshold" in result["anatomy"]["unavailable"]["fvlm:heart"]
    mask = nib.load(str(out / segments["lung_left"]["mask_file"]))
    volume_ml = np.asanyarray(mask.dataobj).sum() * abs(np.linalg.det(mask.affine[:3, :3])) / 1000
    assert volume_ml == pytest.approx(segments["lung_left"]["volume_ml"], rel=1e-3) and volume_ml > 1000
    maps = result["fvlm_maps"]
    assert maps["written"] and maps["grid"] == "tokens" and list(maps["organs"]) == ["lung"]
    assert set(maps["organs"]["lung"]) == set(lung) and len(list((tmp_path / "maps").iterdir())) == 11
    lungs = np.argwhere(np.asanyarray(mask.dataobj) | np.asanyarray(
        nib.load(str(out / segments["lung_right"]["mask_file"])).dataobj))
    corners = (mask.affine @ np.c_[[lungs.min(0), lungs.max(0)], [1, 1]].T)[:3].T
    low, high = corners.min(0) - 50, corners.max(0) + 50  # within a token (48 mm at most) of the lungs' box
    for entry in maps["organs"]["lung"].values():
        token_map = nib.load(str(tmp_path / "maps" / entry["file"]))
        assert token_map.shape == tuple(maps_shape(result)) and np.count_nonzero(token_map.get_fdata()) > 0
        if entry["maximum"] > 0:  # else the maximum is a 0 outside the organ, anywhere
            assert np.all(low <= entry["hottest_ras_mm"]) and np.all(np.array(entry["hottest_ras_mm"]) <= high)
    assert any(entry["maximum"] > 0 for entry in maps["organs"]["lung"].values())


def maps_shape(result: dict) -> list[int]:
    """The token grid of fVLM's lung window: the window (processed voxels) over the 16 x 16 x 32 patch."""
    (window,) = [s["window_zyx"] for s in result["models"]["fvlm"]["organs"] if s["organ"] == "lung"]
    return [-(-(stop - start) // patch) for (start, stop), patch in zip(window, (16, 16, 32))]


def test_ground_without_fvlm_weights_says_it_is_skipped(ct_dir, tmp_path, models, capsys):
    out = tmp_path / "out"
    assert main(["ground", str(ct_dir / RICORD_15), *models["ctclip"], "--out", str(out)]) == 0
    assert "fVLM skipped: model fvlm is not installed" in capsys.readouterr().err
    result = json.loads((out / "grounded.json").read_text())
    assert result["models"]["fvlm"]["available"] is False
    assert all(f["fvlm"] is None and f["ctclip"] for f in result["segments"]["lung_left"]["findings"])


def test_ground_with_a_given_segmentation_scores_the_aorta(ct_dir, tmp_path, models):
    masks = tmp_path / "seg"
    masks.mkdir()
    (masks / "aorta.nii.gz").symlink_to(ct_dir / "totalseg_chest_crop_aorta" / "aorta_mask.nii.gz")
    out = tmp_path / "out"
    ct = ct_dir / "totalseg_chest_crop_aorta" / "ct.nii.gz"
    assert main(["ground", str(ct), *models["ctclip"], *models["fvlm"], "--segmentation", str(masks),
                 "--out", str(out), "--report", "Calcific atheroma plaques in the aortic arch."]) == 0
    result = json.loads((out / "grounded.json").read_text())
    assert list(result["segments"]) == ["aorta"]
    statuses = {s["organ"]: s["status"] for s in result["models"]["fvlm"]["organs"]}
    assert statuses == {"lung": "absent", "heart": "absent", "esophagus": "absent", "aorta": "scored"}
    aorta = result["segments"]["aorta"]
    findings = {f["name"]: f for f in aorta["findings"]}  # the mediastinum's only segment also shows its nodes
    assert list(findings) == ["Arterial wall calcification", "Lymphadenopathy"]
    assert findings["Arterial wall calcification"]["fvlm"] and findings["Lymphadenopathy"]["fvlm"] is None
    assert aorta["sentences"][0]["path"] == "mediastinum/aorta"


def test_score_colours_and_opacity():
    assert score_colour(0.95) == SCORE_COLOURS[-1] and segment_opacity(0.95, True) == 1.0
    assert segment_opacity(0.0, False) == 0.05 and segment_opacity(1.0, False) == 0.3
    assert score_colour(0.0) == SCORE_COLOURS[0] and score_colour(0.5) == SCORE_COLOURS[2]
