"""The fVLM recipe (training/fvlm.py): organ texts, the dual false-negative soft targets, the loss on a fixed
batch, and a tiny run through the shared trainer on the real RICORD CT whose export the runtime scores alike."""

from __future__ import annotations

import csv
import json
import math
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import data_root
from safetensors.torch import save_file
from small_models import bert_vocab

import training.demo.__main__ as demo_command
from CTFoundationLib.cli import main
from CTFoundationLib.errors import TrainingError
from CTFoundationLib.inference.ctclip import load_tokenizer
from CTFoundationLib.inference.fvlm import FVLMRuntime, prepare_fvlm_input
from CTFoundationLib.inference.grounding import GROUNDED_FILE
from CTFoundationLib.io.reading import read_ct
from CTFoundationLib.models.fvlm import ZERO_SHOT_ITEMS, FVLMConfig, encode_prompt_pairs, read_fvlm_config
from CTFoundationLib.preprocess import FVLM_DEMO, FVLM_DEMO_WINDOWS
from training.config import load_config
from training.demo.fvlm_demo import train_fvlm_demo
from training.fvlm import (
    AnatomyLabeller,
    TrainableFVLM,
    build_fvlm,
    fvlm_step,
    intact_organs,
    load_mae_into_visual_encoder,
    normal_template,
    one_sentence,
    organ_texts,
    prompt_loss,
    soft_targets,
)
from training.trainer import Trainer, freeze_text_layers, initial_model

RICORD_3MM = "ct/ricord1a_419639-000082_chest_noncontrast/ct_3mm_iso.nii.gz"
LUNG_NORMAL = normal_template("lung")


def tiny_constructors(organs: list[str]) -> dict:
    """An fVLM of the reference's structure, tiny widths, for the fvlm-demo input (104 x 80 x 128 at 3 mm)."""
    return {
        "ViT": {"in_channels": 1, "img_size": [104, 80, 128], "patch_size": [8, 16, 16], "hidden_size": 16,
                "mlp_dim": 32, "num_layers": 2, "num_heads": 2, "qkv_bias": True},
        "BertConfig": {"vocab_size": 30522, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "intermediate_size": 64, "max_position_embeddings": 512},
        "BlipPretrain": {"embed_dim": 16, "max_txt_len": 64},
        "organ_pooling": {"organs": organs, "levels": [0], "heads": 2},
    }


def test_organ_texts_follow_the_report_and_the_normal_template():
    report = ("Nodules are observed in both lungs. There is pleural effusion in the right hemithorax. "
              "There are wall calcifications in the aorta. Pericardial effusion was not detected.")
    texts, abnormal = organ_texts(report, ("lung", "heart", "esophagus", "aorta"))
    assert texts[0] == "Nodules are observed in both lungs. There is pleural effusion in the right hemithorax."
    assert texts[1] == "heart shows no significant abnormalities. Pericardial effusion was not detected."
    assert texts[2] == "esophagus shows no significant abnormalities."
    assert texts[3] == "There are wall calcifications in the aorta."
    assert abnormal == [True, False, False, True]
    _, vascular = organ_texts("Calcified atheroma plaques were observed in the mediastinal main vascular "
                              "structures.", ("aorta",))
    assert vascular == [True]


def test_one_sentence_keeps_a_normal_organ_normal():
    generator = torch.Generator().manual_seed(0)
    drawn = {one_sentence(f"{LUNG_NORMAL} No effusion. No nodule.", "lung", generator) for _ in range(20)}
    assert drawn == {f"{LUNG_NORMAL} No effusion.", f"{LUNG_NORMAL} No nodule."}
    drawn = {one_sentence("Nodules in both lungs. No effusion was seen.", "lung", generator) for _ in range(20)}
    assert drawn == {"Nodules in both lungs.", "No effusion was seen."}
    assert one_sentence(LUNG_NORMAL, "lung", generator) == LUNG_NORMAL


def test_two_normal_organs_and_two_identical_texts_are_positives():
    texts = [LUNG_NORMAL, f"{LUNG_NORMAL} No effusion was detected.", "Nodule in the left lung.",
             "Nodule in the left lung.", "Effusion on the right."]
    targets = soft_targets(texts, [t.startswith(LUNG_NORMAL) for t in texts])
    expected = torch.tensor([[0.5, 0.5, 0, 0, 0], [0.5, 0.5, 0, 0, 0], [0, 0, 0.5, 0.5, 0], [0, 0, 0.5, 0.5, 0],
                             [0, 0, 0, 0, 1.0]])
    torch.testing.assert_close(targets, expected)


def _handmade_batch() -> dict:
    """Four patients with both organs; patient 2's aorta touches the volume's border (not intact)."""
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(4, 1, 16, 32, 32, generator=generator)
    labels = torch.zeros(4, 16, 32, 32, dtype=torch.uint8)
    labels[:, 2:14, 4:28, 4:16] = 1
    labels[:, 4:12, 8:24, 20:28] = 2
    labels[2, 4:12, 8:24, 28:32] = 2  # reaches the last x column: cut off, not intact
    aorta_normal = normal_template("aorta")
    texts = [[LUNG_NORMAL, aorta_normal], [LUNG_NORMAL, "Calcified plaques in the aorta."],
             ["Nodule in the left lung.", aorta_normal], ["Nodule in the left lung.", aorta_normal]]
    abnormal = torch.tensor([[False, False], [False, True], [True, False], [True, False]])
    return {"image": image, "labels": labels, "texts": texts, "abnormal": abnormal}


def _tiny_model(organs: list[str]) -> TrainableFVLM:
    constructors = tiny_constructors(organs)
    constructors["ViT"].update(img_size=[16, 32, 32], patch_size=[4, 8, 8])
    return TrainableFVLM(build_fvlm(FVLMConfig.from_reference_constructors(constructors), seed=0))


def _tokenize(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = load_tokenizer(bert_vocab())(texts, padding="longest", return_tensors="pt")
    return tokens["input_ids"], tokens["attention_mask"]


def test_fixed_text_layers_run_once_per_text_and_give_the_features_of_the_whole_tower():
    """fVLM's own BERT with its first layers fixed: the features of the runtime's `encode_text`, other padding
    and batches alike, with the fixed layers run once per text."""
    constructors = tiny_constructors(["lung"])
    constructors["BertConfig"]["num_hidden_layers"] = 3
    model = TrainableFVLM(build_fvlm(FVLMConfig.from_reference_constructors(constructors), seed=0))
    freeze_text_layers(model, 2)
    tower = model.fvlm.text_encoder
    texts = [LUNG_NORMAL, "Nodule in the left lung.", "Bilateral pleural effusion with adjacent atelectasis."]
    ids, mask = _tokenize(texts)
    assert len(set(mask.sum(dim=1).tolist())) == len(texts)
    embedding_calls = []
    tower.embeddings.register_forward_hook(lambda *_: embedding_calls.append(1))
    model.text_features(ids, mask).sum().backward()
    fixed = [tower.embeddings, *tower.encoder["layer"][:2]]
    assert all(p.grad is None and not p.requires_grad for module in fixed for p in module.parameters())
    assert all(p.grad is not None for p in tower.encoder["layer"][2].parameters())
    cached = model.text_features(ids, mask)
    subset = model.text_features(ids[[2, 0]], mask[[2, 0]])
    assert len(model.frozen_text.states) == len(texts) and len(embedding_calls) == 1
    whole_tower = model.fvlm.encode_text(ids, mask)
    torch.testing.assert_close(cached, whole_tower, atol=1e-5, rtol=0)
    torch.testing.assert_close(subset, whole_tower[[2, 0]], atol=1e-5, rtol=0)
    assert (whole_tower[0] - whole_tower[2]).abs().max() > 100 * 1e-5  # texts differ well beyond the tolerance


def test_the_loss_is_the_soft_infonce_of_the_intact_organs_with_an_abnormal_case():
    """The aorta counts (patient 1 is abnormal) over its intact patients 0, 1, 3 only; the lung counts too;
    both are checked against a hand computation with the expected targets."""
    batch, model = _handmade_batch(), _tiny_model(["lung", "aorta"])
    assert intact_organs(batch["labels"], 2).tolist() == [[True, True], [True, True], [True, False], [True, True]]
    loss = fvlm_step(model, batch, _tokenize, ("lung", "aorta"))
    with torch.no_grad():
        feats = model.fvlm.encode_organs(batch["image"], batch["labels"])
        temp = model.fvlm.temp

        def soft_ce(images, texts, targets):
            sim = images @ model.fvlm.encode_text(*_tokenize(texts)).t() / temp
            return (-(F.log_softmax(sim, 1) * targets).sum(1).mean() - (F.log_softmax(sim.t(), 1) * targets)
                    .sum(1).mean()) / 2

        lung_targets = torch.tensor([[0.5, 0.5, 0, 0], [0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5], [0, 0, 0.5, 0.5]])
        aorta_targets = torch.tensor([[0.5, 0, 0.5], [0, 1.0, 0], [0.5, 0, 0.5]])
    lung_texts = [LUNG_NORMAL, LUNG_NORMAL, "Nodule in the left lung.", "Nodule in the left lung."]
    aorta_texts = [normal_template("aorta"), "Calcified plaques in the aorta.", normal_template("aorta")]
    with torch.no_grad():
        lung = soft_ce(feats[:, 0], lung_texts, lung_targets)
        aorta = soft_ce(feats[[0, 1, 3], 1], aorta_texts, aorta_targets)
    torch.testing.assert_close(loss.detach(), lung + aorta, rtol=1e-5, atol=1e-5)


def test_the_loss_is_finite_and_falls_on_a_fixed_batch():
    batch, model = _handmade_batch(), _tiny_model(["lung", "aorta"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    losses = []
    for _ in range(25):
        loss = fvlm_step(model, batch, _tokenize, ("lung", "aorta"))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert all(np.isfinite(losses)) and losses[-1] < 0.7 * losses[0], losses


PROMPT_ITEMS = tuple(item for item in ZERO_SHOT_ITEMS if item.finding in ("Lung nodule", "Arterial wall calcification"))
FINDINGS = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])  # (patients, PROMPT_ITEMS), as the texts


def test_the_prompt_term_is_the_cross_entropy_of_the_runtime_prompt_pairs_over_intact_organs():
    """fvlm_step(prompt_weight 2) - fvlm_step(0) = 2 x (mean CE of the lung item over patients 0-3 + that of the
    aorta item over its intact patients 0, 1, 3), the logits being the runtime's [negative, positive] ones."""
    batch, model = {**_handmade_batch(), "findings": FINDINGS}, _tiny_model(["lung", "aorta"])
    assert [item.organ for item in PROMPT_ITEMS] == ["lung", "aorta"]
    with torch.no_grad():
        difference = (fvlm_step(model, batch, _tokenize, ("lung", "aorta"), PROMPT_ITEMS, 2.0)
                      - fvlm_step(model, batch, _tokenize, ("lung", "aorta")))
        feats = model.fvlm.encode_organs(batch["image"], batch["labels"])
        prompts = encode_prompt_pairs(model.fvlm, _tokenize, PROMPT_ITEMS)
        logits = torch.einsum("boe,oke->bok", feats, prompts) / model.fvlm.temp
        lung = F.cross_entropy(logits[:, 0], FINDINGS[:, 0].long())
        aorta = F.cross_entropy(logits[[0, 1, 3], 1], FINDINGS[[0, 1, 3], 1].long())
    torch.testing.assert_close(difference, 2.0 * (lung + aorta), rtol=1e-4, atol=1e-5)


def test_the_prompt_term_teaches_the_runtime_prompts_which_side_is_positive():
    """Trained on the prompt term alone, the runtime's P(positive) of "Nodule." ranks the two nodule lungs above
    the two without (the sign that report-trained zero-shot got wrong in the demo)."""
    batch, model = {**_handmade_batch(), "findings": FINDINGS}, _tiny_model(["lung", "aorta"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(25):
        loss = prompt_loss(model.fvlm, model.fvlm.encode_organs(batch["image"], batch["labels"]),
                           encode_prompt_pairs(model.fvlm, _tokenize, PROMPT_ITEMS), FINDINGS,
                           intact_organs(batch["labels"], 2), PROMPT_ITEMS)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        p = model.fvlm.zero_shot_p_positive(model.fvlm.encode_organs(batch["image"], batch["labels"]),
                                            encode_prompt_pairs(model.fvlm, _tokenize, PROMPT_ITEMS), PROMPT_ITEMS)
    assert p[2:, 0].min() > p[:2, 0].max() and p[1, 1] > p[[0, 3], 1].max(), p



def mae_state(width: int = 16, grid: tuple[int, ...] = (4, 4, 4), patch: tuple[int, ...] = (4, 8, 8),
              channels: int = 1) -> dict[str, torch.Tensor]:
    """A random state dict of an MAE (facebookresearch/mae `MaskedAutoencoderViT` names) with 2 encoder blocks of
    MLP 32 and a 1-block decoder; pos_embed has the class row, then `grid` (Z, Y, X or Y, X; x fastest)."""
    generator = torch.Generator().manual_seed(7)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator)

    state = {"cls_token": rand(1, 1, width), "pos_embed": rand(1, 1 + math.prod(grid), width),
             "patch_embed.proj.weight": rand(width, channels, *patch), "patch_embed.proj.bias": rand(width),
             "norm.weight": rand(width), "norm.bias": rand(width), "mask_token": rand(1, 1, 8),
             "decoder_embed.weight": rand(8, width), "decoder_embed.bias": rand(8),
             "decoder_pos_embed": rand(1, 1 + math.prod(grid), 8), "decoder_norm.weight": rand(8),
             "decoder_pred.weight": rand(math.prod(patch) * channels, 8)}
    for block in ("blocks.0", "blocks.1", "decoder_blocks.0"):
        w = 8 if block.startswith("decoder") else width
        for name, shape in (("norm1", (w,)), ("attn.qkv", (3 * w, w)), ("attn.proj", (w, w)), ("norm2", (w,)),
                            ("mlp.fc1", (2 * w, w)), ("mlp.fc2", (w, 2 * w))):
            state[f"{block}.{name}.weight"] = rand(*shape)
            state[f"{block}.{name}.bias"] = rand(shape[0])
    return state


# MAE encoder key -> the library ViT's (the reference's renames: fc -> linear, proj -> out_proj), written out
MAE_TO_VIT = {"patch_embed.proj.weight": "patch_embedding.patch_embeddings.weight",
              "patch_embed.proj.bias": "patch_embedding.patch_embeddings.bias", "norm.weight": "norm.weight",
              "norm.bias": "norm.bias"}
for _n in (0, 1):
    for _mae, _vit in (("norm1", "norm1"), ("attn.qkv", "attn.qkv"), ("attn.proj", "attn.out_proj"),
                       ("norm2", "norm2"), ("mlp.fc1", "mlp.linear1"), ("mlp.fc2", "mlp.linear2")):
        for _kind in ("weight", "bias"):
            MAE_TO_VIT[f"blocks.{_n}.{_mae}.{_kind}"] = f"blocks.{_n}.{_vit}.{_kind}"


def test_an_mae_checkpoint_initialises_the_vit_and_nothing_else(tmp_path, capsys):
    """Every MAE encoder tensor lands on its ViT tensor unchanged (the position table without the class row, the
    grids being the same); decoder and tokens are ignored; queries, pooling and text tower are as without it."""
    state, path = mae_state(), tmp_path / "mae.pth"
    torch.save({"model": state}, path)
    plain, model = _tiny_model(["lung", "aorta"]).fvlm, _tiny_model(["lung", "aorta"]).fvlm
    assert load_mae_into_visual_encoder(model, path) == []
    visual = model.visual_encoder.state_dict()
    assert set(visual) == {*MAE_TO_VIT.values(), "patch_embedding.position_embeddings"}
    for mae_key, vit_key in MAE_TO_VIT.items():
        assert torch.equal(visual[vit_key], state[mae_key]), mae_key
    assert torch.equal(visual["patch_embedding.position_embeddings"], state["pos_embed"][:, 1:])
    others = {k: v for k, v in plain.state_dict().items() if not k.startswith("visual_encoder.")}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in others.items())
    assert "query_tokens" in others and "text_encoder.embeddings.word_embeddings.weight" in others
    assert f"{path}: 29 ViT tensors loaded from {len(state)} MAE tensors; fresh: none" in capsys.readouterr().err


def test_a_2d_mae_position_table_is_resized_and_repeated_over_depth_as_the_reference_does(tmp_path):
    """The reference's 2-D MAE (RGB 16 x 16 patches, s x s grid): the patch conv stays fresh; the table loses its
    class row, is resized bilinearly to the ViT's (Y, X) and repeated over Z (here 6 x 6 -> 4 x 4, Z = 4)."""
    state, path = mae_state(grid=(6, 6), patch=(16, 16), channels=3), tmp_path / "mae.safetensors"
    save_file(state, path)
    plain, model = _tiny_model(["lung"]).fvlm, _tiny_model(["lung"]).fvlm
    fresh = load_mae_into_visual_encoder(model, path)
    assert fresh == ["patch_embedding.patch_embeddings.bias", "patch_embedding.patch_embeddings.weight"]
    assert torch.equal(model.visual_encoder.patch_embedding.patch_embeddings.weight,
                       plain.visual_encoder.patch_embedding.patch_embeddings.weight)
    plane = state["pos_embed"][0, 1:].reshape(1, 6, 6, 16).permute(0, 3, 1, 2)
    plane = F.interpolate(plane, size=(4, 4), mode="bilinear", align_corners=False)
    expected = plane[:, :, None].repeat(1, 1, 4, 1, 1).flatten(2).transpose(1, 2)
    torch.testing.assert_close(model.visual_encoder.patch_embedding.position_embeddings.detach(), expected)
    assert torch.equal(model.visual_encoder.blocks[1].mlp.linear2.weight, state["blocks.1.mlp.fc2.weight"])


def test_a_3d_position_table_of_another_grid_is_resized_trilinearly(tmp_path):
    state, path = mae_state(grid=(2, 3, 5)), tmp_path / "mae.pth"
    torch.save(state, path)  # a bare state dict
    model = _tiny_model(["lung"]).fvlm
    with pytest.raises(TrainingError, match=r"mae\.pth: pos_embed has 30 positions, not 4 x 4 x 4; set "
                                            r"model\.image_init_grid"):
        load_mae_into_visual_encoder(model, path)
    load_mae_into_visual_encoder(model, path, (2, 3, 5))
    volume = state["pos_embed"][:, 1:].transpose(1, 2).reshape(1, 16, 2, 3, 5)
    expected = F.interpolate(volume, size=(4, 4, 4), mode="trilinear", align_corners=False)
    table = model.visual_encoder.patch_embedding.position_embeddings.detach()
    assert table.shape == (1, 64, 16)
    torch.testing.assert_close(table, expected.flatten(2).transpose(1, 2))


def test_an_mae_of_another_width_is_refused_naming_the_file_and_the_key(tmp_path):
    path = tmp_path / "wide_mae.pth"
    torch.save({"model": mae_state(width=24)}, path)
    with pytest.raises(TrainingError, match=r"wide_mae\.pth: \S+ \(.*24.*\) does not fit the ViT's"):
        load_mae_into_visual_encoder(_tiny_model(["lung"]).fvlm, path)
    flat = mae_state()
    flat["pos_embed"] = flat["pos_embed"][0]  # (positions, width): no batch axis
    torch.save({"model": flat}, path)
    with pytest.raises(TrainingError, match=r"wide_mae\.pth: pos_embed \(65, 16\) is not a \(1, positions, width\)"):
        load_mae_into_visual_encoder(_tiny_model(["lung"]).fvlm, path)


def test_an_unreadable_mae_file_is_refused_naming_it_once(tmp_path):
    model = _tiny_model(["lung"]).fvlm
    for name, content in (("mae.safetensors", b"not safetensors"), ("mae.pth", b"not a torch file")):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(TrainingError) as caught:
            load_mae_into_visual_encoder(model, tmp_path / name)
        assert str(caught.value).startswith("model.image_init") and str(caught.value).count(name) == 1
    torch.save([torch.zeros(2)], tmp_path / "mae.pth")  # readable, but no dictionary of weights
    with pytest.raises(TrainingError, match=r"model\.image_init: MAE checkpoint \S*mae\.pth is a list") as caught:
        load_mae_into_visual_encoder(model, tmp_path / "mae.pth")
    assert str(caught.value).count("mae.pth") == 1


def test_the_config_refuses_a_missing_image_init_and_the_trainer_loads_a_present_one(tmp_path):
    (tmp_path / "constructors.json").write_text(json.dumps(tiny_constructors(["lung"])))
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text("model: {constructors: constructors.json, image_init: mae.pth, image_init_grid: [2, 3, 5]}\n"
                           "train: {recipe: fvlm}\n")
    with pytest.raises(TrainingError, match=r"model\.image_init \S*mae\.pth is not a file"):
        load_config(config_file)
    with pytest.raises(TrainingError, match=r"model\.image_init_grid is the grid of model\.image_init"):
        load_config(config_file, {"model": {"image_init": None}})
    state = mae_state(grid=(2, 3, 5), patch=(8, 16, 16))
    torch.save({"model": state}, tmp_path / "mae.pth")
    config = load_config(config_file)
    assert config.model.image_init == tmp_path / "mae.pth" and config.model.image_init_grid == (2, 3, 5)
    visual = initial_model(config).fvlm.visual_encoder
    assert torch.equal(visual.patch_embedding.patch_embeddings.weight, state["patch_embed.proj.weight"])
    assert torch.equal(visual.blocks[0].attn.out_proj.weight, state["blocks.0.attn.proj.weight"])

REPORTS = ["Nodules are observed in both lungs.", "No nodule was detected in both lungs.",
           "Consolidation areas are observed in the lower lobe of the right lung.",
           "Emphysematous changes are present in both lungs."]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """Four RICORD volumes (links to the real 3 mm scan, built-in anatomy) trained 6 steps through the trainer."""
    folder = tmp_path_factory.mktemp("fvlm")
    rows = []
    for n, text in enumerate(REPORTS, start=1):
        name = f"train_{n}_a_1.nii.gz"
        target = folder / "train" / f"train_{n}" / f"train_{n}_a" / name
        target.parent.mkdir(parents=True)
        target.symlink_to(data_root() / RICORD_3MM)
        rows.append({"VolumeName": name, "Findings_EN": text, "Impressions_EN": ""})
    with open(folder / "train_reports.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (folder / "constructors.json").write_text(json.dumps(tiny_constructors(["lung"])))
    config_file = folder / "tiny.yaml"
    config_file.write_text(
        "model: {constructors: constructors.json}\n"
        "data: {root: train, reports_csv: train_reports.csv, preprocess: fvlm-demo, num_workers: 0,"
        " cache_images: true}\n"
        "train: {recipe: fvlm, batch_size: 4, lr: 3.0e-3, min_lr: 1.0e-4, weight_decay: 0.05, steps: 6,"
        " warmup_steps: 2, schedule: cosine, log_every: 2, save_every: 3, keep_checkpoints: 1, output_dir: run}\n"
        "export: {thresholds: false}\n")
    config = load_config(config_file, {"model": {"tokenizer": str(bert_vocab())}})
    trainer = Trainer(config)
    return folder, trainer, trainer.train()


def test_a_tiny_run_logs_checkpoints_and_exports_the_released_layout(tiny_run):
    folder, trainer, result = tiny_run
    assert result.steps == 6 and all(np.isfinite(result.losses))
    log = [json.loads(line) for line in (folder / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4, 6] and all(0.001 <= r["temperature"] <= 0.5 for r in log)
    assert sorted(p.name for p in (folder / "run" / "checkpoints").iterdir()) == ["step_6"]
    assert len(list((folder / "run" / "inputs").glob("*.npz"))) == 4  # prepared inputs cached once per case
    saved = torch.load(result.checkpoint, weights_only=True)
    assert set(saved) == {"model"} and "query_tokens" in saved["model"]
    assert read_fvlm_config(folder / "run" / "constructors.json") == trainer.core.fvlm.config


def test_the_runtime_scores_the_export_as_the_training_time_model(tiny_run):
    folder, trainer, result = tiny_run
    runtime = FVLMRuntime(result.checkpoint, bert_vocab(), read_fvlm_config(result.checkpoint.parent /
                          "constructors.json"), "cpu", folder / "runtime", spec=FVLM_DEMO, model_id="tiny")
    volume = read_ct(data_root() / RICORD_3MM)
    labels = AnatomyLabeller(("lung",))(volume, "ricord")
    scored = runtime.score(volume, labels)
    assert [s.status for s in scored.organs] == ["scored"] and scored.model == "tiny"
    model = trainer.core.fvlm.eval()
    items = [item for item in ZERO_SHOT_ITEMS if item.organ == "lung"]
    inp = prepare_fvlm_input(volume, labels, ("lung",), FVLM_DEMO, FVLM_DEMO_WINDOWS)
    with torch.no_grad():
        image, organ_ids = (torch.from_numpy(a)[None] for a in (inp.image, inp.labels))
        feats = model.encode_organs(image[:, None], organ_ids)
        expected = model.zero_shot_p_positive(feats[0], encode_prompt_pairs(model, runtime.tokenize, items), items)
    got = torch.tensor([f.probability for f in scored.findings], dtype=torch.float64)
    assert len(got) == len(items)
    torch.testing.assert_close(got, expected.double(), rtol=0, atol=1e-5)


# The suite's build: the demo recipe shortened to this many steps (its cosine schedule with it), so that the whole
# suite stays within its time budget; the full recipe's figures are measured by its own command (docs/training.md).
CI_STEPS = 200


@pytest.fixture(scope="module")
def fvlm_demo(demo_home):
    """fvlm-demo built by the real command path into the CT-CLIP demo's cache (its demo set reused), shortened."""
    home, _ = demo_home
    started = time.perf_counter()
    record = train_fvlm_demo(data_root(), home, steps=CI_STEPS)
    print(f"fvlm-demo build: {time.perf_counter() - started:.0f} s")
    return home, record


@pytest.mark.slow
def test_the_demo_fvlm_learns_its_organs_on_held_out_cases(fvlm_demo, monkeypatch, capsys):
    """At CI_STEPS the recipe reaches 0.83 (its full 900 steps: 0.901, measured by its own command): the
    aorta's finding separated, consolidation with the right sign (0.15 before the prompt term, 0.93 with it), the
    mean above the reports-only recipe's 0.78."""
    home, record = fvlm_demo
    assert record["test"]["aorta: Arterial wall calcification"]["auroc"] >= 0.95, record["test"]
    assert record["test"]["lung: Consolidation"]["auroc"] >= 0.8, record["test"]
    assert record["test_per_organ_mean_auroc"] >= 0.78, record["test"]
    assert record["stages"]["fvlm"]["loss_last"] < record["stages"]["fvlm"]["loss_first"], record["stages"]
    monkeypatch.setenv("CTFOUNDATION_HOME", str(home))
    arguments = ["eval", "--model", "fvlm-demo", "--data", str(data_root())]
    assert demo_command.run(demo_command.build_parser().parse_args(arguments)) == 0
    printed = capsys.readouterr().out
    line = next(line for line in printed.splitlines() if line.startswith("demo fVLM per-organ mean AUROC: "))
    assert float(line.split(": ")[1]) == pytest.approx(record["test_per_organ_mean_auroc"], abs=0.01)
    assert "lung: Lung nodule" in printed and "aorta: Arterial wall calcification" in printed
    # the pointing game of its organ maps (measured at CI_STEPS: focal 0.343; calcification 1.000: an aorta map's
    # maximum lies on the wall plates only where the map is placed in the CT where the model saw the aorta)
    rows = {line[:36].strip(): line[36:].split() for line in printed.splitlines() if "(focal)" in line[:36]}
    assert float(rows["Arterial wall calcification (focal)"][2]) >= 0.9, rows
    pointing = next(line for line in printed.splitlines() if line.startswith("fVLM pointing-game accuracy (focal"))
    assert float(pointing.split(": ")[1]) >= 0.25, pointing


@pytest.mark.slow
def test_ground_uses_the_demo_fvlm_without_official_weights_and_says_so(fvlm_demo, monkeypatch, capsys, tmp_path):
    home, _ = fvlm_demo
    monkeypatch.setenv("CTFOUNDATION_HOME", str(home))
    ct = data_root() / RICORD_3MM
    assert main(["ground", str(ct), "--model", "ct-clip-demo", "--no-totalsegmentator", "--out",
                 str(tmp_path)]) == 0
    assert "the organ scores come from the demo fVLM (fvlm-demo: trained on demo data" in capsys.readouterr().err
    grounded = json.loads((tmp_path / GROUNDED_FILE).read_text())
    fvlm = grounded["models"]["fvlm"]
    assert fvlm["model"] == "fvlm-demo" and "not for diagnosis" in fvlm["notice"]
    assert [organ["status"] for organ in fvlm["organs"]] == ["scored", "absent"]  # built-in anatomy: no aorta
