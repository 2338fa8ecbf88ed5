"""fVLM runtime: the reference fixtures through the window scorer, the preprocessing against an independent MONAI
pipeline on the real RICORD scan, and the whole runtime with a small checkpoint on RICORD + fallback anatomy."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import fixture_folders
from monai.transforms import Resize, ScaleIntensityRange, SpatialPad
from safetensors.torch import load_file
from small_models import bert_vocab, make_small_fvlm

from CTFoundationLib.anatomy.fallback import fallback_anatomy
from CTFoundationLib.errors import AnatomyError, CTFoundationError
from CTFoundationLib.inference.fvlm import FVLMInput, FVLMRuntime, prepare_fvlm_input, score_windows, window_validity
from CTFoundationLib.io.reading import read_ct
from CTFoundationLib.models.fvlm import (
    FVLMConfig,
    ZeroShotItem,
    encode_prompt_pairs,
    load_fvlm,
    zero_shot_token_terms,
)
from CTFoundationLib.preprocess import FVLM_WINDOWS, organ_window, pad_end_to_multiple
from CTFoundationLib.vocab import FVLM_ORGANS

RICORD_15 = "ricord1a_419639-000082_chest_noncontrast/ct_1p5mm_iso.nii.gz"


@pytest.mark.parametrize("folder", fixture_folders("fvlm_"), ids=lambda p: p.name)
@pytest.mark.parametrize("mode", ["organ", "whole"])
def test_reference_fixture_numbers_through_the_window_scorer(folder, mode):
    spec = json.loads((folder / "config.json").read_text())
    model = load_fvlm(folder / "state_dict.pt", FVLMConfig.from_reference_constructors(spec["constructors"]))
    inputs, expected = load_file(folder / "inputs.safetensors"), load_file(folder / "expected.safetensors")
    items = [ZeroShotItem(*row) for row in spec["inputs"]["items"]]
    with torch.inference_mode():
        prompts = encode_prompt_pairs(model, lambda texts: (inputs["text_input_ids"], inputs["text_attention_mask"]),
                                      items)
    inp = FVLMInput(inputs["image"].float()[0, 0].numpy(), inputs["organ_mask"][0, 0].numpy(), FVLM_ORGANS)
    scores = score_windows(model, inp, prompts, items, mode)
    assert all(s.status == "scored" for s in scores.statuses.values())
    got = torch.tensor([scores.probabilities[item] for item in items])
    torch.testing.assert_close(got, expected["item_p_pos"], rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def ricord(ct_dir):
    return read_ct(ct_dir / RICORD_15)


@pytest.fixture(scope="module")
def anatomy(ricord):
    return fallback_anatomy(ricord)


def test_preprocessing_matches_an_independent_monai_pipeline(ricord, anatomy):
    """MONAI in the reference's order: resize in stored (i, j, k) order, then transpose to (k, j, i), window, crop."""
    labels = anatomy.fvlm_labels(FVLM_ORGANS)
    labels[anatomy.mask("bone")] = 2  # a second id, to check nearest resampling of several labels
    ours = prepare_fvlm_input(ricord, labels, FVLM_ORGANS)
    spacing = ricord.spacing_ijk_mm  # RICORD is stored LPS like CT-RATE: (k, j, i) = (S, P, L)
    size = [int(n * s / t) for n, s, t in zip(ricord.shape_ijk, spacing, (1.0, 1.0, 3.0))]
    image = Resize(size, mode="trilinear")(torch.from_numpy(ricord.hu.astype(np.float32))[None])
    image = ScaleIntensityRange(-1150, 350, 0.0, 1.0, clip=True)(image)[0].permute(2, 1, 0).numpy()
    mask = Resize(size, mode="nearest")(torch.from_numpy(labels.astype(np.float32))[None])[0].permute(2, 1, 0)
    mask = mask.numpy().astype(np.uint8)
    first = np.argwhere(mask).min(0) - (5, 20, 20)
    last = np.argwhere(mask).max(0) + (5, 20, 20)
    box = tuple(slice(max(a, 0), min(b, n)) for a, b, n in zip(first, last, mask.shape))
    pad = SpatialPad((112, 256, 352))
    # float32 vs 64
    np.testing.assert_allclose(ours.image, pad(torch.from_numpy(image[box])[None])[0].numpy(), atol=2e-5)
    np.testing.assert_array_equal(ours.labels, pad(torch.from_numpy(mask[box])[None])[0].numpy())
    assert ours.image.shape[1] >= 256 and ours.image.shape[2] >= 352


def test_window_validity_follows_the_reference_rules():
    labels = np.zeros((20, 20, 20), np.uint8)
    labels[1:5, 8:12, 8:12] = 1  # touches the border (slice 1 < 2)
    labels[8:12, 8:12, 8:12] = 2  # inside, complete
    labels[14:17, 8:12, 8:12] = 3  # inside, but 48 of 100 voxels
    whole = {"lung": 64, "heart": 64, "esophagus": 100, "aorta": 5}
    verdict = window_validity(labels, whole, FVLM_ORGANS)
    assert "border" in verdict["lung"] and verdict["heart"] is None and "48%" in verdict["esophagus"]
    assert "aorta" not in verdict  # not in this window at all
    assert window_validity(labels, whole, FVLM_ORGANS, skip="lung")["lung"] is None
    assert window_validity(labels, whole, FVLM_ORGANS, skip="esophagus")["esophagus"] is None


@pytest.fixture(scope="module")
def runtime(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fvlm")
    checkpoint, _, config = make_small_fvlm(folder)
    return FVLMRuntime(checkpoint, bert_vocab(), config, device="cpu", cache_dir=folder)


def test_runtime_scores_the_lungs_of_ricord_and_says_what_is_missing(runtime, ricord, anatomy):
    labels = anatomy.fvlm_labels(FVLM_ORGANS)
    result = runtime.score(ricord, labels, thresholds={"Emphysema": 0.2, "Consolidation": 0.99})
    statuses = {s.organ: s for s in result.organs}
    assert statuses["lung"].status == "scored" and statuses["lung"].voxels > 100_000
    assert {statuses[o].status for o in ("heart", "esophagus", "aorta")} == {"absent"}
    window = statuses["lung"].window_zyx
    assert window[0][1] - window[0][0] >= 112 and window[1][1] - window[1][0] >= 256
    assert [f.name for f in result.findings] == [i.finding for i in runtime.items if i.organ == "lung"]
    assert len(result.findings) == 11 and all(0 < f.probability < 1 for f in result.findings)
    by_name = {f.name: f for f in result.findings}
    assert by_name["Emphysema"].positive == (by_name["Emphysema"].probability >= 0.2)
    assert by_name["Consolidation"].threshold == 0.99 and by_name["Atelectasis"].positive is None
    prompts = runtime.prompt_features()
    again = runtime.score(ricord, labels, mode="whole")
    assert runtime.prompt_features() is prompts  # the text is encoded once per runtime
    assert again.mode == "whole" and {s.organ: s.status for s in again.organs}["lung"] == "scored"
    json.dumps(again.to_dict())


def test_runtime_refuses_anatomy_without_fvlm_organs(runtime, ricord):
    with pytest.raises(AnatomyError, match="none of the fVLM organs"):
        runtime.score(ricord, np.zeros(ricord.shape_ijk, np.uint8))


def lung_window(inp, model):
    """The lung's organ window of a processed input, padded as `score_windows` pads it: (start, image, labels)."""
    bounds = organ_window(inp.labels == 1, FVLM_WINDOWS.roi)
    labels = np.where(inp.labels[bounds] == 1, 1, 0).astype(np.uint8)
    image = pad_end_to_multiple(inp.image[bounds], model.config.patch_size, 0.0)
    return tuple(s.start for s in bounds), image, pad_end_to_multiple(labels, model.config.patch_size, 0)


def test_token_terms_sum_to_the_logit_difference_on_ricord(runtime, ricord, anatomy):
    """float64, the small random fVLM on the RICORD lung window: terms + constant = logit difference, 0 outside."""
    model = copy.deepcopy(runtime.model).double()
    inp = prepare_fvlm_input(ricord, anatomy.fvlm_labels(FVLM_ORGANS), FVLM_ORGANS)
    _, image, labels = lung_window(inp, model)
    items = [item for item in runtime.items if item.organ == "lung"]
    prompts = F.normalize(torch.randn(len(items), 2, model.config.embed_dim, dtype=torch.float64,
                                      generator=torch.Generator().manual_seed(0)), dim=-1)
    with torch.no_grad():
        levels = model.visual_encoder(torch.from_numpy(image).double()[None, None])
        flags = model.organ_token_flags(torch.from_numpy(labels)[None, None])
        logits = model.zero_shot_logits(model.pool_organs(levels, flags), prompts, items)[0]
        terms, constant = zero_shot_token_terms(model, levels, flags, prompts, items)
    difference = logits[:, 1] - logits[:, 0]
    assert (terms.sum(-1) + constant - difference).abs().max() <= 1e-5
    assert difference.abs().min() > 1e-2 and terms.abs().max() > 0  # a real split, not a trivial zero
    assert (terms[:, ~flags[0, 0]] == 0).all() and (terms[:, flags[0, 0]] != 0).any()
    moved = zero_shot_token_terms(model, levels, flags, prompts[:, [1, 0]], items)  # swapped prompts: negated
    torch.testing.assert_close(moved[0], -terms) and torch.testing.assert_close(moved[1], -constant)


def test_runtime_maps_place_the_lung_window_tokens_on_the_ct(runtime, ricord, anatomy):
    """The runtime's lung maps: one per lung finding, on the lung window's token grid, summing with the constant to
    ln(P / (1 - P)); the grid puts each token over the CT voxels whose intensities the model saw there."""
    labels = anatomy.fvlm_labels(FVLM_ORGANS)
    runtime.score(ricord, labels)
    with pytest.raises(CTFoundationError, match="keep_windows"):
        runtime.finding_maps(ricord)  # nothing kept by default: a batch holds no CT and levels in between
    runtime.keep_windows = True
    result = runtime.score(ricord, labels)
    maps = runtime.finding_maps(ricord)
    runtime.keep_windows = False
    assert list(maps) == ["lung"] and maps["lung"].names == [f.name for f in result.findings]
    inp = prepare_fvlm_input(ricord, labels, FVLM_ORGANS)
    start, image, window_labels = lung_window(inp, runtime.model)
    grid, patch = maps["lung"].grid, np.array(runtime.model.config.patch_size)
    assert grid.shape == tuple(np.array(window_labels.shape) // patch)
    flags = runtime.model.organ_token_flags(torch.from_numpy(window_labels)[None, None])[0, 0].numpy()
    values = maps["lung"].values.reshape(len(result.findings), -1)
    assert (values[:, ~flags] == 0).all() and (values[:, flags] != 0).any()
    # each token's mean processed intensity against the CT's own voxels around that token's centre (RAS)
    tokens = np.argwhere(np.ones(grid.shape, bool))
    ct_index = np.rint((np.linalg.inv(ricord.affine_ras) @ np.c_[tokens @ grid.affine_ras[:3, :3].T
                                                                  + grid.affine_ras[:3, 3], np.ones(len(tokens))].T
                        )[:3].T).astype(int)
    inside = ((ct_index >= 0) & (ct_index < ricord.shape_ijk)).all(1)
    ct = np.clip((ricord.hu[tuple(ct_index[inside].T)] + 1150) / 1500, 0, 1)
    blocks = image.reshape(grid.shape[0], patch[0], grid.shape[1], patch[1], grid.shape[2], patch[2])
    centre = blocks[:, patch[0] // 2 - 1:patch[0] // 2 + 1, :, patch[1] // 2 - 1:patch[1] // 2 + 1, :,
                    patch[2] // 2 - 1:patch[2] // 2 + 1].mean(axis=(1, 3, 5))
    error = np.abs(centre.reshape(-1)[inside] - ct)
    # measured: median 0.0083, 90th percentile 0.103; the grid moved by one voxel (3 mm in z, 1 mm in-plane)
    # gives 0.013-0.015 and 0.131-0.145, without the crop / pad origin 0.16 and 0.66
    assert inside.sum() > 0.8 * len(tokens) and np.median(error) < 0.011 and np.percentile(error, 90) < 0.12
