"""Finding maps: the per-token terms are exact, and the maps land where the image content is, in patient space."""

from __future__ import annotations

import copy
from dataclasses import replace

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import data_root
from small_models import bert_vocab, make_small_ctclip

from CTFoundationLib.cli import main
from CTFoundationLib.inference.maps import (
    FindingMaps,
    TokenGrid,
    model_grid_affine,
    token_contributions,
    write_map_niftis,
)
from CTFoundationLib.io.volume import CTVolume
from CTFoundationLib.models.ctclip import CTCLIP, CTCLIPConfig, zero_shot_logits
from CTFoundationLib.preprocess import CTCLIP_DEMO, CTCLIP_V2, preprocess


def tiny_ctclip() -> CTCLIP:
    """A random CT-CLIP v2 of 3 x 4 x 5 tokens (30 x 64 x 80 input), small widths."""
    config = CTCLIPConfig.from_reference_constructors({
        "CTViT": {"dim": 8, "codebook_size": 16, "image_size": [64, 80], "patch_size": 16, "temporal_patch_size": 10,
                  "spatial_depth": 1, "temporal_depth": 1, "dim_head": 4, "heads": 2},
        "BertConfig": {"vocab_size": 64, "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "intermediate_size": 32, "max_position_embeddings": 32},
        "CTCLIP": {"dim_image": 4 * 5 * 8, "dim_text": 16, "dim_latent": 12},
    })
    torch.manual_seed(3)
    model = CTCLIP(config).eval()
    with torch.no_grad():
        model.temperature.fill_(4.6)
    return model


def test_per_token_terms_sum_to_the_zero_shot_logit_difference():
    model = tiny_ctclip()
    volume = torch.randn(2, 1, 30, 64, 80) * 0.5
    latents, codes = model.encode_image(volume, return_tokens=True)
    ids = torch.randint(5, 64, (6, 7))
    prompts = model.encode_text(ids, torch.ones_like(ids)).view(3, 2, -1)  # 3 findings, [present, not present]
    logits = zero_shot_logits(latents, prompts, model.logit_scale)
    terms = token_contributions(model, codes, prompts)
    assert terms.shape == (2, 3, 3, 4, 5)
    difference = logits[..., 0] - logits[..., 1]
    assert torch.allclose(terms.sum(dim=(2, 3, 4)).float(), difference, atol=1e-4, rtol=0)  # float32 logits
    # the same zero-shot logits in float64, through the model's own pooling and projection
    head = copy.deepcopy(model.to_visual_latent).double()
    latents64 = F.normalize(head(model.pool_tokens(codes.double())), dim=-1)
    logits64 = zero_shot_logits(latents64, prompts.double(), model.logit_scale.double())
    assert torch.allclose(terms.sum(dim=(2, 3, 4)), logits64[..., 0] - logits64[..., 1], atol=1e-5, rtol=0)
    assert difference.abs().max() > 0.1 and terms.std() > 0  # a real, non-trivial decomposition
    # per token: changing one token's code leaves every other token's term as it was, up to the one per-image
    # factor of the L2 normalisation
    changed = codes.clone()
    changed[0, 1, 2, 3] = changed[0, 0, 0, 0]
    ratio = token_contributions(model, changed, prompts)[0] / terms[0]
    others = torch.ones(3, 4, 5, dtype=torch.bool)
    others[1, 2, 3] = False
    assert torch.allclose(ratio[:, others], ratio[:, others].mean(), rtol=1e-6)
    assert not torch.allclose(ratio[:, 1, 2, 3], ratio[:, others].mean(), rtol=1e-3)

def oblique_free_volume(codes: str, shape=(70, 90, 50), spacing=(1.2, 0.8, 2.5), origin=(30.0, -80.0, 100.0)):
    """A volume of zeros whose voxel axes grow toward `codes` (e.g. 'PIR'), with anisotropic spacing."""
    direction = {"R": (1, 0, 0), "L": (-1, 0, 0), "A": (0, 1, 0), "P": (0, -1, 0), "S": (0, 0, 1), "I": (0, 0, -1)}
    affine = np.eye(4)
    affine[:3, :3] = np.array([direction[c] for c in codes], float).T * np.array(spacing)
    affine[:3, 3] = origin
    return CTVolume(np.zeros(shape, np.float32), affine)


def world_coordinates(volume: CTVolume) -> np.ndarray:
    """(3, i, j, k) RAS mm of every voxel."""
    index = np.indices(volume.shape_ijk).reshape(3, -1).astype(float)
    return (volume.affine_ras[:3, :3] @ index + volume.affine_ras[:3, 3:]).reshape(3, *volume.shape_ijk)


SMALL_V2 = replace(CTCLIP_V2, name="v2-small", shape=(40, 64, 96))  # CT-CLIP v2's steps, a smaller crop / pad


@pytest.mark.parametrize("spec", [CTCLIP_DEMO, SMALL_V2], ids=lambda spec: spec.name)
@pytest.mark.parametrize("codes", ["LPS", "PIR"])
def test_the_model_grid_affine_inverts_the_preprocessing(spec, codes):
    """A CT whose HU is a linear function of patient position: the preprocessed input (linear resampling keeps it)
    must hold, at every model voxel inside the CT, that function of the position `model_grid_affine` gives it."""
    volume = oblique_free_volume(codes, shape=(70, 90, 50))
    world = world_coordinates(volume)
    gradient = np.array([2.0, -3.0, 1.5])  # HU per mm along R, A, S
    volume.hu = np.tensordot(gradient, world - world.mean(axis=(1, 2, 3), keepdims=True), axes=1).astype(np.float32)
    assert np.abs(volume.hu).max() < 1000  # inside the HU window: no clipping
    model_input = preprocess(volume, spec)[0]
    affine = model_grid_affine(volume, spec)
    index = np.indices(model_input.shape).reshape(3, -1).astype(float)
    position = affine[:3, :3] @ index + affine[:3, 3:]
    expected_hu = gradient @ (position - world.mean(axis=(1, 2, 3))[:, None])
    inside_ct = np.all((np.linalg.inv(volume.affine_ras) @ np.vstack([position, np.ones(position.shape[1])]))[:3]
                       .T.round(6) >= 0.5, axis=1)  # away from the CT's edge voxels, where resampling clamps
    inside_ct &= np.all((np.linalg.inv(volume.affine_ras) @ np.vstack([position, np.ones(position.shape[1])]))[:3]
                        .T.round(6) <= np.array(volume.shape_ijk) - 1.5, axis=1)
    assert inside_ct.sum() > 1000
    got_hu = (model_input.reshape(-1)[inside_ct] + 1) * 1000 - 1000  # [-1, 1] -> HU
    assert np.abs(got_hu - expected_hu[inside_ct]).max() < 0.05


@pytest.mark.parametrize("codes", ["LPS", "PIR"])
def test_a_finding_planted_in_a_corner_peaks_there_in_patient_coordinates(codes):
    """A dense block in one corner of a synthetic CT; a token map that follows the model input (each token's mean
    value) resampled to the CT peaks inside the block, at the same patient position as the token that saw it."""
    volume = oblique_free_volume(codes, shape=(60, 50, 40), spacing=(5.0, 6.0, 7.5))  # 300 mm each way
    volume.hu[:] = -1000  # as the padding, so that only the block raises a token's mean
    corner = (slice(40, 60), slice(0, 17), slice(28, 39))  # 100 x 102 x 82 mm at the high-i, low-j, high-k corner
    volume.hu[corner] = 600
    model_input = preprocess(volume, CTCLIP_DEMO)[0]
    patch = (8, 16, 16)
    tokens = model_input.reshape(12, 8, 7, 16, 7, 16).mean(axis=(1, 3, 5))
    grid = TokenGrid.of_model_input(volume, CTCLIP_DEMO, patch, tokens.shape)
    maps = FindingMaps(["Lung nodule"], tokens[None], grid, "test")
    in_ct = maps.in_ct("Lung nodule", volume)
    assert in_ct.shape == volume.shape_ijk and in_ct.dtype == np.float32
    peak = np.unravel_index(np.argmax(in_ct), in_ct.shape)
    block = np.zeros(volume.shape_ijk, bool)
    block[corner] = True
    assert block[peak], (peak, corner)
    hottest = maps.hottest_ras("Lung nodule", volume)
    # the peak lies in the box of a token holding the maximum (at its centre, or on the plateau out to the face of
    # an edge token)
    token = np.linalg.inv(grid.affine_ras)[:3] @ np.append(hottest, 1.0)
    nearest = tuple(int(v) for v in np.round(token))
    assert np.abs(token - nearest).max() <= 0.5 and tokens[nearest] == pytest.approx(tokens.max())
    block_ras = world_coordinates(volume)[:, block]
    assert np.all(hottest >= block_ras.min(axis=1) - 1e-6) and np.all(hottest <= block_ras.max(axis=1) + 1e-6)
    assert in_ct[~block].max() < in_ct[peak]


def test_map_niftis_overlay_the_ct(tmp_path):
    volume = oblique_free_volume("PIR", shape=(30, 40, 20))
    tokens = np.random.default_rng(0).standard_normal((2, 12, 7, 7)).astype(np.float32)
    grid = TokenGrid.of_model_input(volume, CTCLIP_DEMO, (8, 16, 16), (12, 7, 7))
    maps = FindingMaps(["Lung nodule", "Emphysema"], tokens, grid, "test")
    written = write_map_niftis(maps, volume, tmp_path / "ct")
    assert {file.path.name for file in written.values()} == {"Lung_nodule.nii", "Emphysema.nii"}
    image = nib.load(written["Lung nodule"].path)
    assert np.allclose(image.affine, volume.affine_ras) and image.shape == volume.shape_ijk
    in_ct = maps.in_ct("Lung nodule", volume)
    assert np.allclose(np.asarray(image.dataobj), in_ct)
    peak = np.unravel_index(np.argmax(in_ct), in_ct.shape)
    assert written["Lung nodule"].maximum == pytest.approx(in_ct.max())
    assert np.allclose(written["Lung nodule"].hottest_ras_mm, volume.affine_ras[:3] @ np.array([*peak, 1.0]))
    averaged = maps.axial_average()
    axial = grid.axis_toward("S")  # token axis 0: the demo spec's axes are S, L, P
    assert axial == 0 and np.allclose(averaged.values.sum(axis=(1, 2, 3)), tokens.sum(axis=(1, 2, 3)), atol=1e-4)
    assert np.allclose(averaged.values, averaged.values[:, :1]) and not np.allclose(tokens, tokens[:, :1])
    small = write_map_niftis(maps, volume, tmp_path / "tokens", ["Emphysema"], grid="tokens")
    token_image = nib.load(small["Emphysema"].path)
    assert small["Emphysema"].path.name == "Emphysema.nii.gz" and token_image.shape == (12, 7, 7)
    assert np.allclose(token_image.affine, grid.affine_ras) and np.allclose(token_image.dataobj, tokens[1])


def test_a_lipro_checkpoint_has_no_maps_and_says_so_before_the_image_pass(tmp_path, capsys):
    checkpoint, constructors, _ = make_small_ctclip(tmp_path / "small", lipro=True)
    ct = data_root() / "ct/ricord1a_419639-000082_chest_noncontrast/ct_3mm_iso.nii.gz"
    code = main(["detect", str(ct), "--weights", str(checkpoint), "--model-config", str(constructors),
                 "--text-encoder", str(bert_vocab()), "--maps", str(tmp_path / "maps"), "--device", "cpu"])
    error = capsys.readouterr().err
    assert code == 2 and "maps need a zero-shot checkpoint" in error and "Traceback" not in error
    assert not list((tmp_path / "maps").iterdir())
