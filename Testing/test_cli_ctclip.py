"""`ctfoundation detect / embed / embed-text` as a user runs them, with a small checkpoint made here."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open

from CTFoundationLib.cli import main
from CTFoundationLib.models.ctclip import CT_RATE_ABNORMALITIES
from small_models import bert_vocab, make_small_ctclip

RICORD_3MM = "ricord1a_419639-000082_chest_noncontrast/ct_3mm_iso.nii.gz"


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    checkpoint, config_path, _ = make_small_ctclip(tmp_path_factory.mktemp("small"))
    return ["--weights", str(checkpoint), "--model-config", str(config_path), "--text-encoder", str(bert_vocab())]


@pytest.fixture(autouse=True)
def private_home(tmp_path, monkeypatch):
    monkeypatch.setenv("CTFOUNDATION_HOME", str(tmp_path / "home"))


def test_detect_writes_json_and_prints_a_table(ct_dir, tmp_path, small, capsys):
    out = tmp_path / "result.json"
    assert main(["detect", str(ct_dir / RICORD_3MM), *small, "--device", "cpu", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "P(present)" in printed and "Emphysema" in printed
    result = json.loads(out.read_text())
    findings = result["detection"]["findings"]
    assert [f["name"] for f in findings] == list(CT_RATE_ABNORMALITIES)
    assert result["input"]["shape_ijk"] == [120, 120, 106] and result["input"]["warnings"] == []
    assert result["detection"]["method"] == "zero-shot" and result["detection"]["device"] == "cpu"


def test_detect_without_weights_says_which_file_is_missing(ct_dir, capsys):
    assert main(["detect", str(ct_dir / RICORD_3MM)]) == 2
    error = capsys.readouterr().err
    assert "ct-clip-v2 is not installed" in error and "ctfoundation weights download ct-clip-v2" in error
    assert "CT-CLIP_v2.pt" in error


def test_bad_model_config_and_missing_weights_file(ct_dir, tmp_path, capsys):
    (tmp_path / "c.json").write_text("{}")
    code = main(["detect", str(ct_dir / RICORD_3MM), "--weights", str(tmp_path / "nope.pt")])
    assert code == 2 and "nope.pt: no such file" in capsys.readouterr().err
    (tmp_path / "w.pt").write_bytes(b"junk")
    code = main(["detect", str(ct_dir / RICORD_3MM), "--weights", str(tmp_path / "w.pt"), "--model-config", str(tmp_path / "c.json")])
    assert code == 2 and "not a usable CT-CLIP constructor JSON" in capsys.readouterr().err


def test_embed_image_with_tokens_and_text(ct_dir, tmp_path, small):
    out = tmp_path / "case.safetensors"
    assert main(["embed", str(ct_dir / RICORD_3MM), *small, "--tokens", "--out", str(out)]) == 0
    with safe_open(str(out), "pt") as stored:
        assert stored.get_tensor("image_latent").shape == (32,)
        assert stored.get_tensor("token_grid").shape == (24, 24, 24, 16)
        assert len(stored.metadata()["checkpoint_sha256"]) == 64
    text_out = tmp_path / "text.safetensors"
    assert main(["embed-text", "Emphysema is present.", "No nodules.", *small, "--out", str(text_out)]) == 0
    with safe_open(str(text_out), "pt") as stored:
        assert stored.get_tensor("text_latents").shape == (2, 32)
