"""fVLM port against the golden fixtures (fvlm_* folders + full-size key manifest)."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import pytest
import torch
from conftest import fixture_folders, fixtures_root
from safetensors.torch import load_file

from CTFoundationLib.errors import CheckpointError
from CTFoundationLib.models.fvlm import (
    FVLM,
    FVLMConfig,
    ZeroShotItem,
    encode_prompt_pairs,
    is_unused_checkpoint_key,
    load_fvlm,
)

FOLDERS = fixture_folders("fvlm_")
MANIFEST = fixtures_root() / "fvlm_fullsize_keys.json"
folder_cases = pytest.mark.parametrize("folder", FOLDERS, ids=lambda p: p.name)


class Case:
    """One fixture folder: its config, our loaded model, inputs and expected tensors."""

    def __init__(self, folder: Path) -> None:
        self.spec = json.loads((folder / "config.json").read_text())
        self.config = FVLMConfig.from_reference_constructors(self.spec["constructors"])
        self.model = load_fvlm(folder / "state_dict.pt", self.config)
        inputs = load_file(folder / "inputs.safetensors")
        self.image = inputs["image"].float()
        self.mask = inputs["organ_mask"]
        self.ids, self.attention = inputs["text_input_ids"], inputs["text_attention_mask"]
        self.expected = load_file(folder / "expected.safetensors")
        self.items = [ZeroShotItem(*row) for row in self.spec["inputs"]["items"]]
        words = self.spec["tolerances_suggested"]["float_outputs"].replace(",", "").split()
        self.tol = {"rtol": float(words[words.index("rtol") + 1]), "atol": float(words[words.index("atol") + 1])}

    def check(self, name: str, actual: torch.Tensor) -> None:
        torch.testing.assert_close(actual, self.expected[name], **self.tol, msg=lambda m: f"{name}: {m}")

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Stand-in tokenizer: the fixture stores the token ids of its prompts in item order."""
        assert texts == [t for item in self.items for t in (item.negative, item.positive)]
        return self.ids, self.attention


@cache
def case(folder: Path) -> Case:
    return Case(folder)


@folder_cases
def test_image_tower(folder: Path) -> None:
    c = case(folder)
    with torch.inference_mode():
        c.check("patch_embedding_out", c.model.visual_encoder.patch_embedding(c.image))
        levels = c.model.visual_encoder(c.image)
    c.check("vit_hidden_levels", levels)
    c.check("vit_final", levels[-1])


@folder_cases
def test_organ_tokens_and_features(folder: Path) -> None:
    c = case(folder)
    flags = c.model.organ_token_flags(c.mask)
    assert torch.equal(flags[0], c.expected["organ_token_flags"])
    assert torch.equal(c.model.organ_token_flags(c.mask.float()), flags)  # eval.py passes the mask as float
    with torch.inference_mode():
        c.check("organ_image_feats", c.model.encode_organs(c.image, c.mask)[0])


@folder_cases
def test_single_organ_window_mask(folder: Path) -> None:
    """eval.py's per-organ windows keep only the target organ in the mask; the others come out NaN."""
    c = case(folder)
    with torch.inference_mode():
        levels = c.model.visual_encoder(c.image)
        for index in range(len(c.config.organs)):
            target_only = torch.where(c.mask == index + 1, c.mask, torch.zeros_like(c.mask))
            feats = c.model.pool_organs(levels, c.model.organ_token_flags(target_only))[0]
            torch.testing.assert_close(feats[index], c.expected["organ_image_feats"][index], **c.tol)
            others = [o for o in range(len(c.config.organs)) if o != index]
            assert feats[others].isnan().all()


@folder_cases
def test_text_and_zero_shot(folder: Path) -> None:
    c = case(folder)
    with torch.inference_mode():
        prompts = encode_prompt_pairs(c.model, c.tokenize, c.items)
        organs = c.model.encode_organs(c.image, c.mask)[0]
        logits = c.model.zero_shot_logits(organs, prompts, c.items)
        p_pos = c.model.zero_shot_p_positive(organs, prompts, c.items)
    c.check("item_text_feats", prompts)
    c.check("item_logits", logits)
    c.check("item_probs", logits.softmax(-1))
    c.check("item_p_pos", p_pos)


@folder_cases
@pytest.mark.parametrize("layout", ["released", "token_type_present", "bare_state_dict"])
def test_checkpoint_layouts_load(folder: Path, layout: str, tmp_path: Path) -> None:
    state = torch.load(folder / "state_dict.pt", map_location="cpu", weights_only=True)["model"]
    width = state["text_encoder.embeddings.word_embeddings.weight"].shape[1]
    if layout == "token_type_present":
        state["text_encoder.embeddings.token_type_embeddings.weight"] = torch.randn(2, width)
    saved = state if layout == "bare_state_dict" else {"model": state, "epoch": 3, "config": {"run": {"seed": 42}}}
    torch.save(saved, tmp_path / "checkpoint_3.pth")
    c = case(folder)
    model = load_fvlm(tmp_path / "checkpoint_3.pth", c.config)
    with torch.inference_mode():
        c.check("item_text_feats", encode_prompt_pairs(model, c.tokenize, c.items))
        c.check("organ_image_feats", model.encode_organs(c.image, c.mask)[0])


def _variants() -> list:
    variants = json.loads(MANIFEST.read_text())["variants"] if MANIFEST.is_file() else {}
    return [pytest.param(name, variant, id=name) for name, variant in variants.items()]


@pytest.mark.parametrize(("name", "variant"), _variants())
def test_fullsize_keys_match_meta_build(name: str, variant: dict) -> None:
    with torch.device("meta"):
        model = FVLM(FVLMConfig())
    ours = {k: (list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in model.state_dict().items()}
    listed = {e["key"]: (e["shape"], e["dtype"]) for e in variant["keys_in_saved_checkpoint_model_entry"]}
    assert ours == {k: v for k, v in listed.items() if not is_unused_checkpoint_key(k)}
    assert all(is_unused_checkpoint_key(k) for k in variant["keys_in_model_state_dict_but_not_in_checkpoint"])


@folder_cases
def test_bad_checkpoints_raise_checkpoint_error(folder: Path, tmp_path: Path) -> None:
    state = torch.load(folder / "state_dict.pt", map_location="cpu", weights_only=True)["model"]
    config = case(folder).config
    cases = {
        "missing_query_tokens": ({"model": {k: v for k, v in state.items() if k != "query_tokens"}}, "query_tokens"),
        "wrong_shape": ({"model": {**state, "text_proj.bias": torch.zeros(3)}},
                        r"text_proj\.bias.* --fvlm-config FILE \(in Python: config= of FVLMRuntime\.from_registry\)"),
        "not_a_state_dict": ({"model": {"a": 1}}, "not a plain state dict"),
        "list": ([torch.zeros(1)], "not a dictionary"),
    }
    for name, (content, message) in cases.items():
        torch.save(content, tmp_path / name)
        with pytest.raises(CheckpointError, match=message):
            load_fvlm(tmp_path / name, config)
    (tmp_path / "garbage.pth").write_bytes(b"\x00" * 64)
    for name in ("garbage.pth", "absent.pth"):
        with pytest.raises(CheckpointError, match=name):
            load_fvlm(tmp_path / name, config)
