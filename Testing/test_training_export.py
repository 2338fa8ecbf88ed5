"""Export in the official CT-CLIP v2 layout, thresholds by CT-CLIP's ROC-corner rule, the CT-RATE reader."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import data_root, fixtures_root
from training_fixtures import tiny_constructors

from CTFoundationLib.inference.common import load_thresholds
from CTFoundationLib.inference.ctclip import CTCLIPRuntime
from CTFoundationLib.io.reading import read_ct
from CTFoundationLib.models.ctclip import CTCLIP, CTCLIPConfig, load_ctclip
from CTFoundationLib.preprocess import CTCLIP_DEMO, preprocess
from CTFoundationLib.vocab import CT_RATE_ABNORMALITIES
from training.ctrate import read_metadata, read_raw_volume
from training.export import official_state_dict, save_checkpoint, write_thresholds
from training.modeling import CLUSTER_SIZE_KEY, read_cluster_size
from training.text import clean_report_text
from training.validation import evaluate_split, thresholds_of

RICORD_3MM = "ricord1a_419639-000082_chest_noncontrast/ct_3mm_iso.nii.gz"


def test_layout_equals_the_reference_checkpoint_key_for_key():
    fixture = fixtures_root() / "ctclip_v2_small"
    constructors = json.loads((fixture / "config.json").read_text())["constructors"]
    ours = official_state_dict(CTCLIP(CTCLIPConfig.from_reference_constructors(constructors)))
    reference = torch.load(fixture / "state_dict.pt", weights_only=True)
    describe = lambda state: {k: (tuple(v.shape), v.dtype) for k, v in state.items()}  # noqa: E731
    assert describe(ours) == describe(reference)


def test_round_trip_through_the_runtime(tmp_path, ct_dir):
    config = CTCLIPConfig.from_reference_constructors(tiny_constructors())
    torch.manual_seed(1)
    clip = CTCLIP(config)
    with torch.no_grad():
        clip.temperature.fill_(2.5)
    cluster_size = torch.arange(16.0)
    path = save_checkpoint(clip, tmp_path / "model.pt", cluster_size)
    loaded = load_ctclip(path, config)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in clip.state_dict().items())
    assert torch.equal(read_cluster_size(path), cluster_size[None])
    assert torch.load(path, weights_only=True)[CLUSTER_SIZE_KEY].shape == (1, 16)
    from training_fixtures import TINY_SPEC, tokenizer_path

    runtime = CTCLIPRuntime(path, tokenizer_path(), config=config, device="cpu", cache_dir=tmp_path, spec=TINY_SPEC)
    volume = read_ct(ct_dir / RICORD_3MM)
    image = torch.from_numpy(preprocess(volume, TINY_SPEC))[None]
    expected, _ = clip.eval().encode_image(image)
    assert torch.allclose(runtime.encode_volume(volume)[0], expected, atol=1e-6)
    assert len(runtime.detect(volume).findings) == 18


def test_lipro_export_nests_the_model(tmp_path):
    config = CTCLIPConfig.from_reference_constructors(tiny_constructors())
    clip = CTCLIP(config)
    clip.attach_lipro_classifier()
    state = torch.load(save_checkpoint(clip, tmp_path / "lipro.pt"), weights_only=True)
    assert {"classifier.weight", "classifier.bias", "trained_model.to_visual_latent_extra.weight"} <= set(state)
    assert not any(k.startswith(("to_", "visual_transformer", "text_transformer")) for k in state)
    assert load_ctclip(tmp_path / "lipro.pt", config).classifier.weight.shape == (18, 16)


def test_thresholds_file_is_read_by_the_runtime(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, size=(40, 18))
    labels[:, 3] = 0  # no positive: no threshold for that finding
    probabilities = np.clip(labels * 0.5 + rng.uniform(0, 0.5, size=labels.shape), 0, 1)
    evaluation = evaluate_split(probabilities, labels, n_bootstrap=10)
    thresholds = thresholds_of(evaluation)
    assert CT_RATE_ABNORMALITIES[3] not in thresholds and len(thresholds) == 17
    assert all(f.metrics["auroc"].value == 1.0 for f in evaluation.findings)
    for k, name in enumerate(CT_RATE_ABNORMALITIES):  # separable classes: t splits them, as high as possible
        if name in thresholds:
            positives, negatives = probabilities[labels[:, k] == 1, k], probabilities[labels[:, k] == 0, k]
            assert negatives.max() <= thresholds[name] < positives.min() <= thresholds[name] + 1 / 99
    write_thresholds(tmp_path / "thresholds.json", thresholds, "synthetic", 40)
    assert load_thresholds(tmp_path / "thresholds.json") == thresholds


def test_raw_volumes_use_the_metadata_rescale_and_spacing(tmp_path, ct_dir):
    metadata_csv = data_root() / "reports/ctrate_metadata/ctrate_validation_metadata.csv"
    with open(metadata_csv, newline="") as handle:
        row = next(csv.DictReader(handle))
    entry = read_metadata(metadata_csv)[row["VolumeName"]]
    assert entry.slope == float(row["RescaleSlope"]) and entry.z_spacing_mm == float(row["ZSpacing"])
    volume = read_ct(ct_dir / RICORD_3MM).reoriented("LPS")
    stored = ((volume.hu.astype(np.float32) - entry.intercept) / entry.slope).astype(np.int16)
    path = tmp_path / row["VolumeName"]
    nib.save(nib.Nifti1Image(stored, np.eye(4)), str(path))  # first-release files: no spacing, raw values
    raw = read_raw_volume(path, entry)
    assert raw.orientation_code == "LPS"
    assert raw.spacing_ijk_mm == pytest.approx((entry.xy_spacing_mm, entry.xy_spacing_mm, entry.z_spacing_mm))
    assert np.allclose(raw.hu, volume.hu, atol=abs(entry.slope))
    same_geometry = type(volume)(volume.hu, raw.affine_ras)
    assert np.allclose(preprocess(raw, CTCLIP_DEMO), preprocess(same_geometry, CTCLIP_DEMO), atol=1e-3)


def test_report_text_cleaning_as_the_reference():
    with open(data_root() / "reports/ctclip_text_classifier/train.csv", newline="", encoding="utf-8") as handle:
        text = next(r["report_text"] for r in csv.DictReader(handle)
                    if '"' in r["report_text"] and "(" in r["report_text"])
    cleaned = clean_report_text(text)
    assert not set("\"'()") & set(cleaned) and len(cleaned) > 0.9 * len(text) - text.count('"') * 2
    assert clean_report_text(float("nan")) == "" and clean_report_text("(cyst?) 'a'") == "cyst? a"
