"""CT-CLIP v2 port against every ctclip_v2_* golden fixture: tensors, checkpoint layouts, bad files, scoring."""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import pytest
import torch
from conftest import fixture_folders, fixtures_root
from safetensors.torch import load_file

from CTFoundationLib.errors import CheckpointError
from CTFoundationLib.inference.ctclip import load_tokenizer
from CTFoundationLib.models.ctclip import (
    CTCLIP,
    IGNORED_CHECKPOINT_KEYS,
    LIPRO_PREFIX,
    V1_MESSAGE,
    CTCLIPConfig,
    attach_text_tower,
    encode_zero_shot_prompts,
    load_ctclip,
    tokenize,
    zero_shot_logits,
    zero_shot_probabilities,
    zero_shot_prompts,
)
from CTFoundationLib.vocab import CT_RATE_ABNORMALITIES

FOLDERS = fixture_folders("ctclip_v2_")
per_folder = pytest.mark.parametrize("folder", FOLDERS, ids=lambda p: p.name)


@functools.cache
def fixture_config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


@functools.cache
def model_config(folder: Path) -> CTCLIPConfig:
    return CTCLIPConfig.from_reference_constructors(fixture_config(folder)["constructors"])


@functools.cache
def fixture_model(folder: Path) -> CTCLIP:
    return load_ctclip(folder / "state_dict.pt", model_config(folder))


@functools.cache
def inputs(folder: Path) -> dict[str, torch.Tensor]:
    """Fixture inputs; float16 image volumes cast to float32 (exact) as the README asks."""
    return {k: v.float() if v.is_floating_point() else v for k, v in load_file(folder / "inputs.safetensors").items()}


def tolerances(folder: Path) -> dict[str, float]:
    text = fixture_config(folder).get("tolerances_suggested", {}).get("float_outputs", "")
    found = dict(re.findall(r"(rtol|atol)\s*([0-9.eE+-]+)", text))
    return {"rtol": float(found.get("rtol", 1e-4)), "atol": float(found.get("atol", 1e-5))}


def image_inputs(folder: Path) -> dict[str, torch.Tensor]:
    """Expected-key prefix -> volume: "image" -> "", "image_d20" -> "d20_"."""
    volumes = {name: v for name, v in inputs(folder).items() if name.startswith("image")}
    return {"" if name == "image" else name.removeprefix("image_") + "_": v for name, v in volumes.items()}


def text_inputs(folder: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Text name ("report", "prompt") -> (input_ids, attention_mask)."""
    data = inputs(folder)
    names = [name.removesuffix("_input_ids") for name in data if name.endswith("_input_ids")]
    return {name: (data[f"{name}_input_ids"], data[f"{name}_attention_mask"]) for name in names}


def our_outputs(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor the fixtures describe, computed by our model, under the fixtures' names."""
    model, out = fixture_model(folder), {}
    with torch.inference_mode():
        for prefix, volume in image_inputs(folder).items():
            vit = model.visual_transformer
            patch_emb = vit.embed_patches(volume)
            pre_vq = vit.encode(patch_emb)
            codes, indices = vit.vq(pre_vq)
            latents, grid = model.encode_image(volume, return_tokens=True)
            assert torch.equal(grid, codes)
            out |= {
                f"{prefix}patch_emb": patch_emb,
                f"{prefix}pre_vq_tokens": pre_vq,
                f"{prefix}vq_indices": indices,
                f"{prefix}enc_tokens": codes,
                f"{prefix}image_pooled_flat": model.pool_tokens(codes),
                f"{prefix}image_latents": latents,
            }
        image_latents = out["image_latents"]
        for name, (ids, mask) in text_inputs(folder).items():
            text_latents = model.encode_text(ids, mask)
            sim = model.similarity(text_latents, image_latents)
            out |= {
                f"{name}_text_cls": model.text_cls(ids, mask),
                f"{name}_text_latents": text_latents,
                f"{name}_sim_matrix": sim,
                f"{name}_logits_reference_forward": sim[:, 0],
            }
        pairs = out["prompt_text_latents"].view(-1, 2, model.config.dim_latent)
        logits = zero_shot_logits(image_latents, pairs, model.logit_scale)[0]
        out |= {
            "zs_logits": logits,
            "zs_probs": logits.softmax(dim=-1),
            "zs_p_present": zero_shot_probabilities(image_latents, pairs, model.logit_scale)[0],
        }
    return out


@per_folder
def test_expected_tensors(folder: Path) -> None:
    expected, ours, tol = load_file(folder / "expected.safetensors"), our_outputs(folder), tolerances(folder)
    assert not expected.keys() - ours.keys(), f"tensors we do not produce: {sorted(expected.keys() - ours.keys())}"
    failures = []
    for key, want in sorted(expected.items()):
        got = ours[key].reshape(want.shape)
        if not want.is_floating_point():
            print(f"{key}: exact={torch.equal(got, want)}")
            failures += [] if torch.equal(got, want) else [f"{key} differs at {int((got != want).sum())} places"]
            continue
        err = (got.float() - want).abs().max().item()
        print(f"{key}: max abs err {err:.2e}")
        failures += [] if torch.allclose(got.float(), want, **tol) else [f"{key} max abs err {err:.2e}"]
    assert not failures, failures


@per_folder
def test_one_pass_equals_per_pathology_loop(folder: Path, tmp_path: Path) -> None:
    """Encode once + batched prompts == the reference loop (image re-encoded, 2 prompts padded to max length)."""
    cfg, model, tol = fixture_config(folder), fixture_model(folder), tolerances(folder)
    (tmp_path / "vocab.txt").write_text("\n".join(cfg["toy_vocab"]) + "\n")
    tokenizer = load_tokenizer(tmp_path / "vocab.txt")
    ids, mask = tokenize(tokenizer, zero_shot_prompts())
    assert tokenizer.convert_tokens_to_ids("present") in ids[0].tolist()  # the toy vocabulary, not [UNK] only
    assert ids.shape[1] == int(mask.sum(dim=1).max()), "prompts must be padded only to the longest one"
    volume = inputs(folder)["image"]
    pad_to = model.config.bert_config().max_position_embeddings

    image_latents, _ = model.encode_image(volume)
    one_pass = zero_shot_probabilities(image_latents, encode_zero_shot_prompts(model, tokenizer), model.logit_scale)

    loop = []
    for name in CT_RATE_ABNORMALITIES:
        texts = [f"{name} is present.", f"{name} is not present."]
        pair = tokenizer(texts, padding="max_length", max_length=pad_to, return_tensors="pt")
        latent, _ = model.encode_image(volume)
        logits = model.similarity(model.encode_text(pair["input_ids"], pair["attention_mask"]), latent)[:, 0]
        loop.append(logits.softmax(dim=0)[0])
    assert one_pass.shape == (1, len(CT_RATE_ABNORMALITIES))
    torch.testing.assert_close(one_pass[0], torch.stack(loop), **tol)


@per_folder
def test_text_latent_independent_of_padding(folder: Path) -> None:
    model, tol = fixture_model(folder), tolerances(folder)
    ids, mask = text_inputs(folder)["report"]
    longest = int(mask.sum(dim=1).max())
    pad_to = model.config.bert_config().max_position_embeddings
    pad_id = model.config.bert_config().pad_token_id
    padded_ids = torch.nn.functional.pad(ids[:, :longest], (0, pad_to - longest), value=pad_id)
    padded_mask = torch.nn.functional.pad(mask[:, :longest], (0, pad_to - longest), value=0)
    short = model.encode_text(ids[:, :longest], mask[:, :longest])
    torch.testing.assert_close(model.encode_text(padded_ids, padded_mask), short, **tol)
    torch.testing.assert_close(model.encode_text(ids, mask), short, **tol)


def test_full_size_keys_match_reference_manifest() -> None:
    manifest_path = fixtures_root() / "ctclip_v2_fullsize_keys.json"
    if not manifest_path.is_file():
        pytest.skip(f"{manifest_path} not found; set CTFOUNDATION_FIXTURES")
    manifest = json.loads(manifest_path.read_text())
    assert CTCLIPConfig.from_reference_constructors(manifest["constructors"]) == CTCLIPConfig.full_size()
    with torch.device("meta"):
        model = CTCLIP(CTCLIPConfig.full_size())
    ours = {key: (list(t.shape), str(t.dtype).removeprefix("torch.")) for key, t in model.state_dict().items()}
    reference = {entry["key"]: (entry["shape"], entry["dtype"]) for entry in manifest["keys"]}
    dropped = {key for key in reference if IGNORED_CHECKPOINT_KEYS.fullmatch(key)}
    assert ours == {key: value for key, value in reference.items() if key not in dropped}
    assert {"to_text_latent_extra.weight", "to_visual_latent_extra.weight"} <= dropped


@per_folder
def test_lipro_layout(folder: Path, tmp_path: Path) -> None:
    state = torch.load(folder / "state_dict.pt", weights_only=True)
    dim_latent = model_config(folder).dim_latent
    weight, bias = torch.randn(len(CT_RATE_ABNORMALITIES), dim_latent), torch.randn(len(CT_RATE_ABNORMALITIES))
    lipro = {LIPRO_PREFIX + key: value for key, value in state.items()}
    lipro |= {"classifier.weight": weight, "classifier.bias": bias}
    torch.save(lipro, tmp_path / "CT_LiPro_v2.pt")

    model = load_ctclip(tmp_path / "CT_LiPro_v2.pt", model_config(folder))
    expected_latents = load_file(folder / "expected.safetensors")["image_latents"]
    latents, _ = model.encode_image(inputs(folder)["image"])
    torch.testing.assert_close(latents, expected_latents, **tolerances(folder))
    reference_head = torch.sigmoid(torch.relu(expected_latents) @ weight.t() + bias)
    torch.testing.assert_close(model.lipro_probabilities(latents), reference_head, **tolerances(folder))
    assert not any("_extra" in key for key in model.state_dict())
    with pytest.raises(RuntimeError, match="no LiPro classifier"):
        fixture_model(folder).lipro_probabilities(latents)


def _bad_files(folder: Path, tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """Case name -> (bad checkpoint path, regex its CheckpointError message must match)."""
    state = torch.load(folder / "state_dict.pt", weights_only=True)
    grid = load_file(folder / "expected.safetensors")["enc_tokens"][0]
    v1_head = torch.zeros(model_config(folder).dim_latent, grid.numel())  # v1 flattens the whole t*h*w*d grid
    used = [key for key in state if not IGNORED_CHECKPOINT_KEYS.fullmatch(key)]
    visual = [key for key in used if key.startswith("visual_transformer.")]
    lipro = {LIPRO_PREFIX + k: v for k, v in state.items()}
    lipro |= {"classifier.weight": torch.zeros(len(CT_RATE_ABNORMALITIES), 1), "stray.weight": torch.zeros(1)}
    def without(keys: list[str]) -> dict[str, torch.Tensor]:
        return {key: value for key, value in state.items() if key not in keys}

    variants = {
        "v1_head": (state | {"to_visual_latent.weight": v1_head}, re.escape(V1_MESSAGE)),
        "missing": (without(["temperature", "to_text_latent.weight"]), r"2 missing keys: temperature, to_text_latent"),
        "many_missing": (without(visual), rf"{len(visual)} missing keys: .*\(\+\d+ more\)"),
        "garbage": (state | {"garbage.weight": torch.zeros(3)}, r"1 unexpected keys: garbage\.weight"),
        "wrong_shape": (state | {"temperature": torch.zeros(2)},
                        r"wrong shapes: temperature \(2,\).* constructor JSON with --model-config FILE \(in Python: "
                        r"model_config= of CTCLIPRuntime\.from_registry\)\.$"),
        "lipro_bad": (lipro, r"missing keys: classifier\.bias.*unexpected keys: stray\.weight.*classifier\.weight"),
        "not_a_state_dict": ([1, 2, 3], r"is a list, not a dictionary of weights"),
    }
    cases = {}
    for name, (content, pattern) in variants.items():
        torch.save(content, tmp_path / f"{name}.pt")
        cases[name] = (tmp_path / f"{name}.pt", pattern)
    blob = (folder / "state_dict.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(blob[: len(blob) // 2])
    (tmp_path / "text.pt").write_text("this is not a checkpoint\n")
    cases["truncated"] = (tmp_path / "truncated.pt", "cannot be read.*damaged, incomplete")
    cases["text_file"] = (tmp_path / "text.pt", "cannot be read.*damaged, incomplete")
    cases["no_file"] = (tmp_path / "absent.pt", "not found")
    return cases


@per_folder
def test_bad_checkpoints_raise_checkpoint_error(folder: Path, tmp_path: Path) -> None:
    for name, (path, pattern) in _bad_files(folder, tmp_path).items():
        with pytest.raises(CheckpointError) as caught:
            load_ctclip(path, model_config(folder))
        message = str(caught.value)
        assert path.name in message, f"{name}: file not named in {message!r}"
        assert "\n" not in message and "from_reference_constructors" not in message, f"{name}: {message!r}"
        assert re.search(pattern, message, re.DOTALL), f"{name}: {message!r} does not match {pattern!r}"


@per_folder
def test_text_tower_attached_later_equals_a_full_load(folder: Path, tmp_path: Path) -> None:
    """Image work loads without BERT; attaching it later gives the full model's text latents, and a text tower
    that does not fit the configuration is a CheckpointError naming the file."""
    model = load_ctclip(folder / "state_dict.pt", model_config(folder), with_text=False)
    assert model.text_transformer is None
    attach_text_tower(model, folder / "state_dict.pt")
    ids, mask = text_inputs(folder)["prompt"]
    with torch.inference_mode():
        torch.testing.assert_close(model.encode_text(ids, mask), fixture_model(folder).encode_text(ids, mask),
                                   rtol=0, atol=0)
    state = torch.load(folder / "state_dict.pt", weights_only=True)
    del state["text_transformer.embeddings.word_embeddings.weight"]
    torch.save(state, tmp_path / "no_words.pt")
    with pytest.raises(CheckpointError, match=r"no_words\.pt.*1 missing keys: embeddings\.word_embeddings"):
        attach_text_tower(load_ctclip(folder / "state_dict.pt", model_config(folder), with_text=False),
                          tmp_path / "no_words.pt")


@per_folder
def test_bfloat16_autocast_runs(folder: Path) -> None:
    model = load_ctclip(folder / "state_dict.pt", model_config(folder), dtype=torch.bfloat16)
    expected = load_file(folder / "expected.safetensors")
    latents, grid = model.encode_image(inputs(folder)["image"], return_tokens=True)
    ids, mask = text_inputs(folder)["report"]
    text = model.encode_text(ids, mask)
    assert latents.dtype == text.dtype == grid.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(latents, expected["image_latents"]).min() > 0.9
    assert torch.nn.functional.cosine_similarity(text, expected["report_text_latents"]).min() > 0.99


@per_folder
def test_invalid_inputs_and_configs(folder: Path) -> None:
    model = fixture_model(folder)
    volume = inputs(folder)["image"]
    with pytest.raises(ValueError, match="volume"):
        model.encode_image(volume[..., :-1])
    constructors = fixture_config(folder)["constructors"]
    for change, message in (({"dim_image": 7}, "dim_image"), ({"use_all_token_embeds": True}, "use_all_token_embeds")):
        with pytest.raises(ValueError, match=message):
            CTCLIPConfig.from_reference_constructors(constructors | {"CTCLIP": constructors["CTCLIP"] | change})


@per_folder
def test_batch_matches_single_volumes(folder: Path) -> None:
    model, volume = fixture_model(folder), inputs(folder)["image"]
    single, single_grid = model.encode_image(volume, return_tokens=True)
    batch, batch_grid = model.encode_image(torch.cat([volume, volume.flip(-1)]), return_tokens=True)
    flipped, _ = model.encode_image(volume.flip(-1))
    torch.testing.assert_close(batch, torch.cat([single, flipped]), **tolerances(folder))
    torch.testing.assert_close(batch_grid[:1], single_grid, **tolerances(folder))
