"""CT-CLIP detection end-to-end on the real RICORD DICOM with a small checkpoint made here."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from small_models import bert_vocab, make_small_ctclip

from CTFoundationLib.errors import CheckpointError, CTFoundationError
from CTFoundationLib.inference.common import load_thresholds
from CTFoundationLib.inference.ctclip import CTCLIPRuntime, load_tokenizer
from CTFoundationLib.io.reading import read_ct
from CTFoundationLib.vocab import CT_RATE_ABNORMALITIES

RICORD_DICOM = "ricord1a_419639-000082_chest_noncontrast/dicom"


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    return make_small_ctclip(tmp_path_factory.mktemp("small"))


@pytest.fixture(scope="module")
def ricord(ct_dir):
    return read_ct(ct_dir / RICORD_DICOM)


@pytest.fixture(scope="module")
def runtime(small_checkpoint, tmp_path_factory):
    checkpoint, _, config = small_checkpoint
    return CTCLIPRuntime(checkpoint, bert_vocab(), config=config, device="cpu", cache_dir=tmp_path_factory.mktemp("c"))


def reference_style_probabilities(runtime: CTCLIPRuntime, ricord) -> list[float]:
    """The reference loop: per finding, re-encode the image and both prompts padded to 512 tokens."""
    model, tensor = runtime.model, runtime.prepare(ricord)
    probabilities = []
    for name in CT_RATE_ABNORMALITIES:
        encoded = runtime.tokenizer(
            [f"{name} is present.", f"{name} is not present."],
            padding="max_length", truncation=True, max_length=512, return_tensors="pt",
        )
        text = model.encode_text(encoded["input_ids"], encoded["attention_mask"])
        image, _ = model.encode_image(tensor)
        logits = (text @ image.t())[:, 0] * model.logit_scale
        probabilities.append(logits.softmax(dim=0)[0].item())
    return probabilities


def test_detect_on_real_dicom_equals_the_reference_loop(runtime, ricord):
    result = runtime.detect(ricord)
    assert [f.name for f in result.findings] == list(CT_RATE_ABNORMALITIES)
    probabilities = [f.probability for f in result.findings]
    assert all(0.0 < p < 1.0 for p in probabilities)
    assert max(probabilities) - min(probabilities) > 1e-3  # the small model still tells findings apart
    assert probabilities == pytest.approx(reference_style_probabilities(runtime, ricord), abs=1e-5)
    assert result.method == "zero-shot" and result.device == "cpu" and len(result.checkpoint_sha256) == 64
    assert {"preprocess", "encode_image", "score"} <= set(result.timings_s)
    json.dumps(result.to_dict())


def test_prompt_latents_are_cached_per_checkpoint(small_checkpoint, runtime, ricord, tmp_path):
    checkpoint, _, config = small_checkpoint
    first = runtime.prompt_latents()
    cached = list((runtime.cache_dir / "prompt_latents").glob("*.safetensors"))
    assert len(cached) == 1 and cached[0].name.startswith(runtime.checkpoint_sha256[:16])
    again = CTCLIPRuntime(checkpoint, bert_vocab(), config=config, device="cpu", cache_dir=runtime.cache_dir)
    torch.testing.assert_close(again.prompt_latents(), first)
    assert "encode_prompts_cached" in again.timings_s and "encode_prompts" not in again.timings_s
    other, _, _ = make_small_ctclip(tmp_path, seed=1)
    fresh = CTCLIPRuntime(other, bert_vocab(), config=config, device="cpu", cache_dir=runtime.cache_dir)
    assert not torch.allclose(fresh.prompt_latents(), first)


def test_a_damaged_prompt_cache_is_computed_again(small_checkpoint, runtime, tmp_path, caplog):
    checkpoint, _, config = small_checkpoint
    expected = runtime.prompt_latents()
    cache = next((runtime.cache_dir / "prompt_latents").glob(f"{runtime.checkpoint_sha256[:16]}-*.safetensors"))
    for damage in (b"not a safetensors file", None):  # unreadable, then readable but of another shape
        if damage is None:
            save_file({"prompt_latents": torch.zeros(3, 2, 7)}, cache)
        else:
            cache.write_bytes(damage)
        again = CTCLIPRuntime(checkpoint, bert_vocab(), config=config, device="cpu", cache_dir=runtime.cache_dir)
        torch.testing.assert_close(again.prompt_latents(), expected)
        assert "encode_prompts" in again.timings_s and "computing it again" in caplog.text
        torch.testing.assert_close(load_file(cache)["prompt_latents"], expected)  # the cache is whole again


def test_thresholds_set_positive_flags(runtime, ricord, tmp_path):
    p = {f.name: f.probability for f in runtime.detect(ricord).findings}
    thresholds = {"Emphysema": p["Emphysema"] - 0.01, "Lung nodule": p["Lung nodule"] + 0.01}
    (tmp_path / "t.json").write_text(json.dumps({"thresholds": thresholds}))
    result = runtime.detect(ricord, load_thresholds(tmp_path / "t.json"))
    flags = {f.name: (f.threshold, f.positive) for f in result.findings}
    assert flags["Emphysema"] == (thresholds["Emphysema"], True)
    assert flags["Lung nodule"] == (thresholds["Lung nodule"], False)
    assert flags["Cardiomegaly"] == (None, None)


def test_bad_thresholds_are_refused(tmp_path):
    with pytest.raises(CTFoundationError, match="unknown findings.*Pneumothorax"):
        load_thresholds({"Pneumothorax": 0.5})
    with pytest.raises(CTFoundationError, match=r"probabilities in \[0, 1\]"):
        load_thresholds({"Emphysema": 3})
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(CTFoundationError, match="bad.json cannot be read"):
        load_thresholds(tmp_path / "bad.json")


def test_lipro_checkpoint_uses_its_head(tmp_path, ricord):
    checkpoint, _, config = make_small_ctclip(tmp_path, lipro=True)
    runtime = CTCLIPRuntime(checkpoint, None, "ct-clip-lipro", config=config, device="cpu", cache_dir=tmp_path)
    result = runtime.detect(ricord)
    assert result.method == "lipro"
    latent, _ = runtime.encode_volume(ricord)
    state = torch.load(checkpoint, weights_only=True)
    expected = torch.sigmoid(torch.relu(latent) @ state["classifier.weight"].t() + state["classifier.bias"])[0]
    assert [f.probability for f in result.findings] == pytest.approx(expected.tolist(), abs=1e-5)


def test_the_tokenizer_reads_the_whole_vocabulary(runtime):
    """bert-base-uncased ids of a prompt (transformers 5 ignores `vocab_file=` and made every word [UNK])."""
    assert runtime.tokenizer("Medical material is present.")["input_ids"] == [101, 2966, 3430, 2003, 2556, 1012, 102]
    assert len(runtime.tokenizer) == 30522


def test_a_vocabulary_with_a_repeated_line_still_loads(tmp_path):
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "lung", "nodule", "lung", "."]
    (tmp_path / "vocab.txt").write_text("\n".join(tokens) + "\n")
    # a repeated token keeps its last line, as BERT's own vocabulary reader does
    assert load_tokenizer(tmp_path / "vocab.txt")("lung nodule.")["input_ids"] == [2, 7, 6, 8, 3]


def test_text_needs_a_tokenizer(tmp_path, small_checkpoint):
    checkpoint, _, config = small_checkpoint
    runtime = CTCLIPRuntime(checkpoint, None, config=config, device="cpu", cache_dir=tmp_path)
    with pytest.raises(CheckpointError, match="needs the CXR-BERT tokenizer"):
        runtime.encode_texts(["Emphysema is present."])
    with pytest.raises(CheckpointError, match="no vocab.txt"):
        CTCLIPRuntime(checkpoint, tmp_path, config=config, device="cpu", cache_dir=tmp_path)


def test_token_grid_and_latent_export(runtime, ricord):
    latent, tokens = runtime.encode_volume(ricord, return_tokens=True)
    assert latent.shape == (1, 32) and torch.linalg.norm(latent) == pytest.approx(1.0, abs=1e-5)
    assert tokens.shape == (1, 24, 24, 24, 16)
    assert torch.allclose(runtime.model.image_latents_from_tokens(tokens), latent, atol=1e-6)
