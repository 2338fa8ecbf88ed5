"""CT-CHAT projector port against the golden fixtures (ctchat_projector_* folders + full-size key manifest)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import fixture_folders, fixtures_root
from safetensors.torch import load_file, save_file

from CTFoundationLib.errors import CheckpointError
from CTFoundationLib.models.ctchat.projector import (
    PROJECTOR_PREFIXES,
    AttnPoolProjector,
    ProjectorConfig,
    llm_embedding_weights,
    load_projector,
    split_projector_state,
)

FOLDERS = fixture_folders("ctchat_projector_")
MANIFEST = fixtures_root() / "ctchat_projector_fullsize_keys.json"
folder_cases = pytest.mark.parametrize("folder", FOLDERS, ids=lambda p: p.name)


def _config(folder: Path) -> ProjectorConfig:
    return ProjectorConfig.from_reference_constructors(json.loads((folder / "config.json").read_text())["constructors"])


def _tolerance(folder: Path) -> dict[str, float]:
    text = json.loads((folder / "config.json").read_text())["tolerances_suggested"]["float_outputs"]
    words = text.replace(",", "").split()
    return {"rtol": float(words[words.index("rtol") + 1]), "atol": float(words[words.index("atol") + 1])}


def _state(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(folder / "state_dict.pt", map_location="cpu", weights_only=True)


def _listed_expected(folder: Path) -> dict[str, torch.Tensor]:
    """The tensors the fixture's config.json lists under `expected`, each required in expected.safetensors."""
    listed = json.loads((folder / "config.json").read_text())["expected"]
    stored = load_file(folder / "expected.safetensors")
    missing = sorted(set(listed) - set(stored))
    assert not missing, f"{folder}: config.json lists {missing} but expected.safetensors lacks them"
    return {name: stored[name] for name in listed}


def _assert_matches_reference(folder: Path) -> None:
    model = load_projector(folder / "state_dict.pt", _config(folder))
    x = load_file(folder / "inputs.safetensors")["projector_input"].float()
    expected = _listed_expected(folder)
    with torch.inference_mode():
        ours = {"attn_pool_out": model.attn_pool(x), "projector_out": model(x)}
        out_grid = model(x.unflatten(1, (1, 1, x.shape[1])))
    assert not expected.keys() - ours.keys(), f"{folder}: tensors we do not produce: {sorted(expected.keys() - ours)}"
    for name, want in expected.items():
        torch.testing.assert_close(ours[name], want, **_tolerance(folder), msg=lambda m, name=name: f"{name}: {m}")
    torch.testing.assert_close(out_grid, ours["projector_out"], rtol=0, atol=0)


def _copy_listing(folder: Path, destination: Path, listed: list[str], stored: list[str]) -> Path:
    """A copy of the fixture whose config.json lists `listed` and whose expected.safetensors holds `stored`."""
    shutil.copytree(folder, destination)
    config = json.loads((folder / "config.json").read_text())
    config["expected"] = {name: config["expected"][name] for name in listed}
    (destination / "config.json").write_text(json.dumps(config))
    expected = load_file(folder / "expected.safetensors")
    save_file({name: expected[name] for name in stored}, destination / "expected.safetensors")
    return destination


@folder_cases
def test_outputs_match_reference(folder: Path) -> None:
    _assert_matches_reference(folder)


@folder_cases
def test_fixture_without_the_intermediate_is_compared_on_what_it_lists(folder: Path, tmp_path: Path) -> None:
    _assert_matches_reference(_copy_listing(folder, tmp_path / "final_only", ["projector_out"], ["projector_out"]))
    missing = _copy_listing(folder, tmp_path / "missing", ["attn_pool_out", "projector_out"], ["projector_out"])
    with pytest.raises(AssertionError, match=r"lists \['attn_pool_out'\] but expected.safetensors lacks"):
        _assert_matches_reference(missing)


@folder_cases
@pytest.mark.parametrize("prefix", [*PROJECTOR_PREFIXES, ""], ids=lambda p: p or "no-prefix")
def test_loads_any_prefix_and_keeps_llm_tables(folder: Path, prefix: str, tmp_path: Path) -> None:
    state = {prefix + k: v for k, v in _state(folder).items()}
    llm = {"embed_tokens": torch.randn(7, 3), "lm_head": torch.randn(7, 3)}
    if prefix:  # real files carry the (resized) LLM tables beside the projector
        state["base_model.model.model.embed_tokens.weight"] = llm["embed_tokens"]
        state["base_model.model.lm_head.weight"] = llm["lm_head"]
    path = tmp_path / "non_lora_trainables.bin"
    torch.save(state, path)

    model = load_projector(path)  # sizes read from the file
    assert model.config == _config(folder)
    for key, value in _state(folder).items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0)
    projector, other = split_projector_state(state)
    assert set(projector) == set(_state(folder))
    if prefix:
        assert set(other) == {"base_model.model.model.embed_tokens.weight", "base_model.model.lm_head.weight"}
        for name, value in llm_embedding_weights(other).items():
            assert torch.equal(value, llm[name])


def _variants() -> list:
    variants = json.loads(MANIFEST.read_text())["variants"] if MANIFEST.is_file() else {}
    return [pytest.param(name, variant, id=name) for name, variant in variants.items()]


@pytest.mark.parametrize(("name", "variant"), _variants())
def test_fullsize_keys_match_meta_build(name: str, variant: dict) -> None:
    with torch.device("meta"):
        model = AttnPoolProjector(ProjectorConfig(llm_hidden_size=variant["llm_hidden_size"]))
    ours = {k: (list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in model.state_dict().items()}
    theirs = {e["key"]: (e["shape"], e["dtype"]) for e in variant["keys"]}
    assert ours == theirs
    assert sum(p.numel() for p in model.parameters()) == variant["param_count"]


@folder_cases
def test_bad_checkpoints_raise_checkpoint_error(folder: Path, tmp_path: Path) -> None:
    good = _state(folder)
    first = next(iter(good))
    cases = {
        "missing.bin": None,
        "garbage.bin": b"not a torch file",
        "truncated.bin": None,
        "not_a_dict.bin": [torch.zeros(1)],
        "pickled_object.bin": {"attn_pool.query": torch.zeros(1), "x": Path("/")},
        "no_projector.bin": {"model.embed_tokens.weight": torch.zeros(2, 2)},
        "missing_key.bin": {k: v for k, v in good.items() if k != first},
        "wrong_shape.bin": {**good, first: torch.zeros(3, 3)},
        "other_variant.bin": {**good, "proj.4.weight": torch.zeros(1)},
    }
    for name, content in cases.items():
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif content is not None:
            torch.save(content, path)
    path_good = tmp_path / "good.bin"
    torch.save(good, path_good)
    (tmp_path / "truncated.bin").write_bytes(path_good.read_bytes()[:1000])
    for name in cases:
        with pytest.raises(CheckpointError, match=name):
            load_projector(tmp_path / name, _config(folder))
