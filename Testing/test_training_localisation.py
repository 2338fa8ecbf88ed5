"""VocabFine's localisation term: the training-time per-token terms, the loss, the finding masks and a run."""

from __future__ import annotations

import csv
import math
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage
from test_maps import oblique_free_volume, tiny_ctclip
from test_training_recipes import STEPS, dataset, write_config
from training_fixtures import make_ctrate_split

from CTFoundationLib.errors import TrainingError
from CTFoundationLib.inference.maps import TokenGrid, token_contributions
from CTFoundationLib.io.reading import read_ct
from CTFoundationLib.models.ctclip import tokenize, zero_shot_prompts
from CTFoundationLib.preprocess import CTCLIP_DEMO
from CTFoundationLib.vocab import CT_RATE_ABNORMALITIES
from training.demo.pointing import nearest_distance_mm
from training.finding_masks import FindingMasks, mask_file_name, read_finding_masks, token_centre_voxels
from training.modeling import TrainableCTCLIP
from training.recipes import localisation_loss
from training.trainer import Trainer, finding_masks


def test_training_time_terms_are_the_finding_maps_terms_with_gradients():
    model = TrainableCTCLIP(tiny_ctclip())
    model.eval()
    volumes = torch.randn(2, 1, 30, 64, 80) * 0.5
    ids = torch.randint(5, 64, (6, 7))
    images, texts, scale, terms = model(volumes, ids, torch.ones_like(ids), prompt_terms=True)
    prompts = texts.view(3, 2, -1)
    logits = torch.einsum("bl,pkl->bpk", images, prompts) * scale
    assert terms.shape == (2, 3, 3, 4, 5)
    assert torch.allclose(terms.sum(dim=(2, 3, 4)), logits[..., 0] - logits[..., 1], atol=1e-4, rtol=0)
    with torch.no_grad():
        codes = model.image_tokens(volumes)
        exact = token_contributions(model.clip, codes, prompts.detach().double())
    assert torch.allclose(terms.double(), exact, atol=1e-5, rtol=0) and exact.abs().max() > 1e-3
    terms[:, 0, 1, 2, 3].sum().backward()
    assert model.clip.to_visual_latent.weight.grad.abs().sum() > 0
    assert model.clip.visual_transformer.to_patch_emb[1].weight.grad is not None  # through the encoder too


def test_the_localisation_loss_rewards_a_map_that_peaks_on_its_target():
    terms = torch.zeros(1, 2, 2, 2, 2)
    targets = torch.zeros(1, 2, 2, 2, 2, dtype=torch.bool)
    targets[0, 0, 1, 1, 1] = True  # finding 0 has one target token of 8; finding 1 none (left out of the mean)
    assert localisation_loss(terms, targets, 0.1).item() == pytest.approx(math.log(8))  # a flat map
    terms[0, 0, 1, 1, 1] = 1.0  # 1 logit above the rest, temperature 0.1: mass e^10 / (e^10 + 7)
    assert localisation_loss(terms, targets, 0.1).item() == pytest.approx(math.log1p(7 * math.exp(-10)), rel=1e-4)
    terms[0, 0, 0, 0, 0] = 2.0  # a higher peak elsewhere costs
    assert localisation_loss(terms, targets, 0.1).item() > 9.0
    terms.requires_grad_(True)
    none = localisation_loss(terms, torch.zeros_like(targets), 0.1)
    none.backward()
    assert none.item() == 0.0 and terms.grad is not None


def write_mask(folder, volume, finding: str, box: tuple[slice, ...]) -> np.ndarray:
    mask = np.zeros(volume.shape_ijk, np.uint8)
    mask[box] = 1
    folder.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(mask, volume.affine_ras), str(folder / mask_file_name(finding)))
    return mask.astype(bool)


def test_token_targets_are_the_tokens_centred_near_the_finding(tmp_path):
    volume = oblique_free_volume("PIR", shape=(120, 110, 60), spacing=(3.0, 3.0, 3.0))
    mask = write_mask(tmp_path / "case", volume, "Lung nodule", (slice(10, 14), slice(90, 96), slice(40, 44)))
    masks = FindingMasks(tmp_path, CTCLIP_DEMO, (8, 16, 16), radius_mm=15.0)
    targets = masks.token_targets(volume, "case")
    assert targets.shape == (18, 12, 7, 7)
    nodule = targets[CT_RATE_ABNORMALITIES.index("Lung nodule")]
    assert 1 <= nodule.sum() <= 4 and targets.sum() == nodule.sum()  # a few tokens of 588, only this finding
    grid = TokenGrid.of_model_input(volume, CTCLIP_DEMO, (8, 16, 16), (12, 7, 7))
    voxels_ras = volume.affine_ras[:3, :3] @ np.argwhere(mask).T + volume.affine_ras[:3, 3:]

    def distance_mm(index) -> float:
        centre_ras = grid.affine_ras[:3, :3] @ np.asarray(index, float) + grid.affine_ras[:3, 3]
        return float(np.linalg.norm(voxels_ras - centre_ras[:, None], axis=0).min())

    distances = {index: distance_mm(index) for index in np.ndindex(12, 7, 7)}
    assert all(distances[tuple(i)] <= 15.0 + 1.5 for i in np.argwhere(nodule))  # voxel rounding of the centre
    assert all(d > 15.0 - 1.5 for i, d in distances.items() if not nodule[i])
    assert not masks.token_targets(volume, "no such case").any()  # no folder: no targets


def test_token_targets_are_the_centres_within_the_radius_of_any_part(tmp_path):
    """Scattered parts, anisotropic voxels, token centres exactly on the radius: the targets are the token centres
    whose distance (mm) to the nearest voxel of the finding, by a whole-volume distance transform, is <= radius."""
    volume = oblique_free_volume("PIR", shape=(120, 110, 60), spacing=(3.0, 2.0, 4.0))
    mask = np.zeros(volume.shape_ijk, bool)
    mask[np.random.default_rng(0).integers(0, volume.shape_ijk, size=(40, 3)).T.tolist()] = True
    (tmp_path / "case").mkdir()
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), volume.affine_ras), str(tmp_path / "case" / "Lung_nodule.nii.gz"))
    grid = TokenGrid.of_model_input(volume, CTCLIP_DEMO, (8, 16, 16), (12, 7, 7))
    centres, inside = token_centre_voxels(grid, volume)
    distance = ndimage.distance_transform_edt(~mask, sampling=volume.spacing_ijk_mm)[tuple(centres)]
    for radius in (12.0, 15.0, sorted(distance)[100]):  # the last one: a centre exactly on the radius
        targets = FindingMasks(tmp_path, CTCLIP_DEMO, (8, 16, 16), radius_mm=radius).token_targets(volume, "case")
        expected = (inside & (distance <= radius)).reshape(12, 7, 7)
        assert 0 < expected.sum() < expected.size
        assert np.array_equal(targets[CT_RATE_ABNORMALITIES.index("Lung nodule")], expected)


def test_pointing_distances_are_the_distance_transform_at_the_peak():
    rng = np.random.default_rng(1)
    mask = np.zeros((30, 20, 10), bool)
    mask[tuple(rng.integers(0, mask.shape, size=(6, 3)).T)] = True
    spacing = (0.7, 1.5, 5.0)
    transform = ndimage.distance_transform_edt(~mask, sampling=spacing)
    for voxel in [tuple(v) for v in rng.integers(0, mask.shape, size=(50, 3))] + [tuple(np.argwhere(mask)[0])]:
        assert nearest_distance_mm(mask, voxel, spacing) == round(float(transform[voxel]), 2)
    assert nearest_distance_mm(np.zeros((3, 3), bool), (1, 1), (1.0, 1.0)) == float("inf")


def test_bad_finding_masks_are_refused_naming_the_file(tmp_path):
    volume = oblique_free_volume("PIR", shape=(20, 20, 20))
    write_mask(tmp_path / "a", volume, "Lung nodules", (slice(0, 2),) * 3)
    with pytest.raises(TrainingError, match=r"a/Lung_nodules.nii.gz: not a finding mask; name it after"):
        read_finding_masks(tmp_path / "a", volume)
    write_mask(tmp_path / "b", oblique_free_volume("PIR", shape=(20, 20, 21)), "Emphysema", (slice(0, 2),) * 3)
    with pytest.raises(TrainingError, match=r"b/Emphysema.nii.gz: mask of shape \(20, 20, 21\), but its volume"):
        read_finding_masks(tmp_path / "b", volume)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "Emphysema.nii.gz").write_bytes(b"not a NIfTI")
    with pytest.raises(TrainingError, match=r"c/Emphysema.nii.gz: cannot read this NIfTI mask"):
        read_finding_masks(tmp_path / "c", volume)


@pytest.fixture(scope="module")
def masked_split(tmp_path_factory):
    """The tiny CT-RATE split, with a mask for every positive finding: a box in the first third of the CT."""
    split = make_ctrate_split(tmp_path_factory.mktemp("ctrate"))
    masks = split["root"].parent / "masks"
    for path in sorted(split["root"].rglob("*.nii.gz")):
        volume = read_ct(path)
        labels = dataset_labels(split, path.name)
        box = tuple(slice(0, n // 3) for n in volume.shape_ijk)
        for finding in (name for name, label in labels.items() if label):
            write_mask(masks / path.name.removesuffix(".nii.gz"), volume, finding, box)
    return split, masks


def dataset_labels(split, name: str) -> dict[str, int]:
    with open(split["labels_csv"], newline="") as handle:
        row = next(r for r in csv.DictReader(handle) if r["VolumeName"] == name)
    return {finding: int(float(row[finding])) for finding in CT_RATE_ABNORMALITIES}


def test_vocabfine_with_the_localisation_term_learns_where_the_findings_are(masked_split, tmp_path):
    split, masks = masked_split
    contrastive = write_config(tmp_path, split, "contrastive")
    pretrained = Trainer(contrastive, dataset(contrastive)).train().checkpoint
    config = write_config(tmp_path, split, "vocabfine", pretrained, {"finding_masks": str(masks)}, lr=3e-3,
                          localisation_weight=1.0, localisation_temperature=0.1, localisation_radius_mm=40.0)
    trainer = Trainer(config, dataset(config))
    batch = {key: torch.stack([trainer.dataset[i][key] for i in range(3)]) for key in ("image", "token_targets")}
    labels = torch.stack([trainer.dataset[i]["labels"] for i in range(3)]).bool()
    assert batch["token_targets"].shape == (3, 18, 4, 2, 2)
    # tokens of 48 x 192 x 192 mm: 2 of the first CT's 16 token centres lie within 40 mm of its box, 2 of the
    # second's 4 inside it, and none of the third, a crop smaller than a token
    assert batch["token_targets"].sum(dim=(2, 3, 4))[labels].tolist() == [2] * int(labels[:2].sum()) + \
        [0] * int(labels[2].sum())
    assert not batch["token_targets"][~labels].any()

    def localisation() -> float:
        core = trainer.core.eval()
        with torch.no_grad():
            ids, mask = tokenize(trainer.tokenizer, zero_shot_prompts())
            *_, terms = core(batch["image"], ids, mask, prompt_terms=True)
        return localisation_loss(terms, batch["token_targets"] & labels[..., None, None, None], 0.1).item()

    before = localisation()
    run = trainer.train()
    assert len(run.losses) == STEPS and all(math.isfinite(loss) for loss in run.losses)
    assert run.losses[-1] < 0.9 * run.losses[0], run.losses
    assert localisation() < 0.7 * before, before


def test_a_mask_of_a_finding_labelled_absent_is_refused(masked_split, tmp_path):
    split, masks = masked_split
    volume_path = sorted(split["root"].rglob("*.nii.gz"))[0]
    labels = dataset_labels(split, volume_path.name)
    absent = next(name for name, label in labels.items() if not label)
    contradicting = tmp_path / "masks"
    shutil.copytree(masks, contradicting)
    volume = read_ct(volume_path)
    write_mask(contradicting / volume_path.name.removesuffix(".nii.gz"), volume, absent,
               tuple(slice(0, n // 3) for n in volume.shape_ijk))
    config = write_config(tmp_path, split, "vocabfine", volume_path, {"finding_masks": str(contradicting)},
                          localisation_weight=1.0, localisation_radius_mm=40.0)
    data = dataset(config)
    data.finding_masks = finding_masks(config, data.spec)
    with pytest.raises(TrainingError, match=rf"{volume_path.name}: finding masks for \['{absent}'\], but its labels"):
        data[0]
