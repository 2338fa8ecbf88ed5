"""Smoke runs of the three CT-CLIP recipes on real CTs and real CT-RATE report texts, with a tiny model.

Each run trains a few steps on one fixed batch (the three chest CTs, batch three): the loss must be finite and fall.
The checkpoints each recipe exports load in the runtime unchanged.
"""

from __future__ import annotations

import csv
import json
import time
import warnings

import pytest
import torch
import yaml
from training_fixtures import TINY_SPEC, make_ctrate_split, real_reports, tiny_constructors, tokenizer_path

from CTFoundationLib.errors import TrainingError
from CTFoundationLib.inference.ctclip import CTCLIPRuntime, load_tokenizer
from CTFoundationLib.io.reading import read_ct
from CTFoundationLib.models.ctclip import CTCLIPConfig, load_ctclip, tokenize
from CTFoundationLib.vocab import CT_RATE_ABNORMALITIES
from training.config import load_config
from training.ctrate import CTRateDataset, load_cases, read_labels
from training.modeling import (
    CodebookEMA,
    FrozenTextPrefix,
    TrainableCTCLIP,
    build_clip,
    contrastive_loss,
    enable_gradient_checkpointing,
)
from training.recipes import positive_class_weights
from training.run import parse_overrides
from training.trainer import DataWait, Trainer, freeze_text_layers

STEPS = 8


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    return make_ctrate_split(tmp_path_factory.mktemp("ctrate"))


def write_config(folder, split, recipe: str, init_checkpoint=None, data: dict | None = None, **train) -> object:
    model = {"constructors": tiny_constructors(), "tokenizer": str(tokenizer_path()), "temperature_init": 2.659}
    if init_checkpoint is not None:
        model["init_checkpoint"] = str(init_checkpoint)
    raw = {
        "model": model,
        "data": {"root": str(split["root"]), "reports_csv": str(split["reports_csv"]),
                 "labels_csv": str(split["labels_csv"]), "num_workers": 0, "cache_images": True, **(data or {})},
        "train": {"recipe": recipe, "batch_size": 3, "lr": 1e-2, "steps": STEPS, "log_every": 1, "save_every": 4,
                  "output_dir": str(folder / recipe), **train},
    }
    path = folder / f"{recipe}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_config(path)


def dataset(config) -> CTRateDataset:
    needs_labels = config.train.recipe != "contrastive"
    cases = load_cases(config.data.root, config.data.reports_csv, config.data.labels_csv if needs_labels else None)
    return CTRateDataset(cases, TINY_SPEC, cache_images=True)


def assert_learns(losses: list[float]) -> None:
    assert len(losses) == STEPS and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.9 * losses[0], losses


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, split):
    folder = tmp_path_factory.mktemp("runs")
    config = write_config(folder, split, "contrastive")
    result = Trainer(config, dataset(config)).train()
    return folder, config, result


def test_contrastive_learns_logs_and_exports(pretrained):
    folder, config, result = pretrained
    assert_learns(result.losses)
    log = [json.loads(line) for line in (folder / "contrastive" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, STEPS + 1))
    assert {"loss", "lr", "temperature", "logit_scale"} <= set(log[0]) and log[0]["lr"] == pytest.approx(1e-2)
    assert all(0 <= r["data_wait_fraction"] <= 1 and r["data_wait_s"] >= 0 for r in log)
    assert log[-1]["temperature"] != pytest.approx(1.0)  # the temperature is learned
    clip = load_ctclip(result.checkpoint, CTCLIPConfig.from_reference_constructors(tiny_constructors()))
    assert clip.classifier is None
    assert float(clip.temperature.detach()) == pytest.approx(log[-1]["temperature"], abs=1e-4)


def test_resume_continues_from_the_saved_state(pretrained, split):
    folder, config, _ = pretrained
    checkpoints = sorted(p.name for p in (folder / "contrastive" / "checkpoints").iterdir())
    assert checkpoints == ["step_4", "step_8"]
    longer = write_config(folder, split, "contrastive", steps=STEPS + 2)
    result = Trainer(longer, dataset(longer)).train()
    assert result.steps == STEPS + 2 and len(result.losses) == 2  # only the two new steps ran
    steps = [json.loads(line)["step"] for line in (folder / "contrastive" / "log.jsonl").read_text().splitlines()]
    assert steps[-2:] == [STEPS + 1, STEPS + 2]


def test_vocabfine_learns_from_labels(pretrained, split, tmp_path):
    _, _, result = pretrained
    config = write_config(tmp_path, split, "vocabfine", result.checkpoint, lr=3e-3)
    run = Trainer(config, dataset(config)).train()
    assert_learns(run.losses)
    assert load_ctclip(run.checkpoint, CTCLIPConfig.from_reference_constructors(tiny_constructors())).classifier is None


def test_lipro_trains_only_its_head_and_exports_the_lipro_layout(pretrained, split, tmp_path, ct_dir):
    _, _, result = pretrained
    config = write_config(tmp_path, split, "lipro", result.checkpoint, lr=3e-2, dropout=0.0)
    trainer = Trainer(config, dataset(config))
    frozen = {k: v.clone() for k, v in trainer.model.clip.state_dict().items() if not k.startswith("classifier")}
    run = trainer.train()
    assert_learns(run.losses)
    after = trainer.model.clip.state_dict()
    assert all(torch.equal(frozen[k], after[k]) for k in frozen)  # the CT-CLIP weights and codebook stay fixed
    state = torch.load(run.checkpoint, weights_only=True)
    assert state["classifier.weight"].shape == (18, 16) and "trained_model.temperature" in state
    runtime = CTCLIPRuntime(run.checkpoint, None, "ct-clip-lipro", config=CTCLIPConfig.from_reference_constructors(
        tiny_constructors()), device="cpu", cache_dir=tmp_path / "cache", spec=TINY_SPEC)
    volume = read_ct(ct_dir / "ricord1a_419639-000082_chest_noncontrast/ct_3mm_iso.nii.gz")
    latent, _ = runtime.encode_volume(volume)
    expected = torch.sigmoid(torch.relu(latent) @ state["classifier.weight"].t() + state["classifier.bias"])[0]
    assert [f.probability for f in runtime.detect(volume).findings] == pytest.approx(expected.tolist(), abs=1e-5)


def test_pos_weight_is_negatives_over_positives():
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    assert positive_class_weights(labels).tolist() == pytest.approx([3.0, 1.0, 1 / 3])


def test_contrastive_loss_matches_the_reference_formula():
    torch.manual_seed(0)
    text, image = (torch.nn.functional.normalize(torch.randn(5, 8), dim=-1) for _ in range(2))
    scale = torch.tensor(3.0)
    sim = torch.exp(text @ image.t() * scale)
    text_to_image = (-torch.log(sim.diag()) + torch.log(sim.sum(dim=1))).mean()
    image_to_text = (-torch.log(sim.t().diag()) + torch.log(sim.t().sum(dim=1))).mean()
    assert float(contrastive_loss(text, image, scale)) == pytest.approx(float((text_to_image + image_to_text) / 2))
    assert float(contrastive_loss(text, text, torch.tensor(100.0))) < 1e-3  # matched pairs, sharp scale


def test_codebook_ema_straight_through_and_update():
    codebook = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]), dim=-1)[None].clone()
    quantizer = CodebookEMA(3, decay=0.5)
    tokens = torch.tensor([[2.0, 0.2], [0.1, 3.0]], requires_grad=True)
    codes = quantizer(tokens, codebook)
    assert torch.equal(codes.detach(), torch.tensor([[1.0, 0.0], [0.0, 1.0]]))  # cosine nearest rows
    codes.sum().backward()
    assert torch.equal(tokens.grad, torch.ones(2, 2))  # straight-through
    unit = torch.nn.functional.normalize(tokens.detach(), dim=-1)
    assert torch.allclose(codebook[0, 0], 0.5 * torch.tensor([1.0, 0.0]) + 0.5 * unit[0])
    assert torch.equal(codebook[0, 2], torch.tensor([-1.0, 0.0]))  # unused code unchanged
    assert quantizer.cluster_size.tolist() == [[0.5, 0.5, 0.0]]


def test_gradient_checkpointing_gives_the_same_gradients():
    clip = build_clip(CTCLIPConfig.from_reference_constructors(tiny_constructors()), seed=3)
    volumes = torch.randn(2, 1, 16, 32, 32)
    ids, mask = torch.randint(1000, 2000, (2, 7)), torch.ones(2, 7, dtype=torch.long)

    def gradients(model: TrainableCTCLIP) -> dict:
        model.train()
        images, texts, scale, _ = model(volumes, ids, mask)
        contrastive_loss(texts, images, scale).backward()
        return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    plain = gradients(TrainableCTCLIP(build_clip(CTCLIPConfig.from_reference_constructors(tiny_constructors()),
                                                 seed=3)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        enable_gradient_checkpointing(clip)
        checkpointed = gradients(TrainableCTCLIP(clip))
    assert not [str(w.message) for w in caught if issubclass(w.category, (DeprecationWarning, FutureWarning))]
    assert plain.keys() == checkpointed.keys() and len(plain) > 20
    assert all(torch.allclose(plain[k], checkpointed[k], atol=1e-6) for k in plain)


def test_fixed_text_layers_run_once_per_text_and_give_the_latents_of_the_whole_tower():
    constructors = tiny_constructors()
    constructors["BertConfig"].update(num_hidden_layers=3, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    model = TrainableCTCLIP(build_clip(CTCLIPConfig.from_reference_constructors(constructors), seed=5))
    freeze_text_layers(model, 2)
    bert = model.clip.text_transformer
    report_sentences = real_reports(1)[0]["report_text"].split(". ")
    sentences = [". ".join(report_sentences[:n]) for n in range(1, 7)]  # six lengths
    ids, mask = tokenize(load_tokenizer(tokenizer_path()), sentences)
    assert len(set(mask.sum(dim=1).tolist())) == len(sentences)
    embedding_calls = []
    bert.embeddings.register_forward_hook(lambda *_: embedding_calls.append(1))

    model.train()  # the fixed layers run without dropout all the same
    model.text_latents(ids, mask).sum().backward()
    fixed = [bert.embeddings, *bert.encoder.layer[:2]]
    assert all(p.grad is None and not p.requires_grad for module in fixed for p in module.parameters())
    assert all(p.grad is not None for p in bert.encoder.layer[2].parameters())
    assert len(model.frozen_text.states) == len(sentences) and len(embedding_calls) == 1
    stored = model.frozen_text.states.values()  # each text's own tensor, not a view holding its padded batch
    assert sum(s.untyped_storage().nbytes() for s in stored) == model.frozen_text.stored_bytes

    model.eval()
    cached = model.text_latents(ids, mask)
    subset = model.text_latents(ids[[4, 1]], mask[[4, 1]])  # other padding, other batch: the same states
    model.frozen_text = None
    whole_tower = model.text_latents(ids, mask)
    assert len(embedding_calls) == 2  # the cached calls ran no fixed layer; the whole tower did
    assert torch.allclose(cached, whole_tower, atol=1e-5) and torch.allclose(subset, whole_tower[[4, 1]], atol=1e-5)
    assert (whole_tower[0] - whole_tower[5]).abs().max() > 100 * 1e-5  # texts differ well beyond the tolerance


def test_fixed_text_prefix_refuses_left_padding():
    bert = build_clip(CTCLIPConfig.from_reference_constructors(tiny_constructors())).text_transformer
    with pytest.raises(ValueError, match="right-padded"):
        FrozenTextPrefix(bert.embeddings, bert.encoder.layer, 1).text_cls(torch.tensor([[0, 101, 102]]),
                                                                          torch.tensor([[0, 1, 1]]))


def test_config_errors_name_the_problem(tmp_path):
    (tmp_path / "bad.yaml").write_text("train:\n  recipe: contrastive\n  batchsize: 8\n")
    with pytest.raises(TrainingError, match=r"unknown keys \['batchsize'\] in 'train'"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "vf.yaml").write_text("train:\n  recipe: vocabfine\n")
    with pytest.raises(TrainingError, match="set model.init_checkpoint"):
        load_config(tmp_path / "vf.yaml")


def test_config_values_are_typed_and_overrides_checked(tmp_path):
    (tmp_path / "c.yaml").write_text("train:\n  lr: 1e-5\n")  # YAML 1.1 reads 1e-5 as a string
    assert load_config(tmp_path / "c.yaml").train.lr == 1e-5
    (tmp_path / "steps.yaml").write_text("train:\n  steps: many\n")
    with pytest.raises(TrainingError, match=r"train.steps: 'many' is not a valid int"):
        load_config(tmp_path / "steps.yaml")
    (tmp_path / "empty.yaml").write_text("train:\n")
    with pytest.raises(TrainingError, match=r"unknown sections \['trian'\]"):
        load_config(tmp_path / "empty.yaml", parse_overrides(["trian.steps=3"]))
    assert load_config(tmp_path / "empty.yaml", parse_overrides(["train.steps=3"])).train.steps == 3
    with pytest.raises(TrainingError, match="must be positive"):
        load_config(tmp_path / "empty.yaml", parse_overrides(["train.log_every=0"]))
    with pytest.raises(TrainingError, match="expected SECTION.KEY=VALUE"):
        parse_overrides(["train.steps"])
    with pytest.raises(TrainingError, match=r"--set train.steps=\[1: the value is not valid YAML"):
        parse_overrides(["train.steps=[1"])


@pytest.mark.parametrize("setting, message", [
    ("model.constructors={CTViT: {}}", "not usable CT-CLIP constructor arguments"),
    ("train.pos_weight=Auto", "train.pos_weight must be auto or 18 numbers"),
    ("train.keep_checkpoints=0", "keep_checkpoints must be at least 1"),
    ("data.preprocess=ct-clip-v3", "data.preprocess must be one of"),
    ("data.stored_values=raw", "data.root needs data.metadata_csv"),
    ("train.prompt_weight=1.0", "train.prompt_weight is for recipe fvlm and needs data.labels_csv"),
    ("train.localisation_weight=1.0", "localisation_weight is for recipe vocabfine and needs data.finding_masks"),
    ("data.finding_masks=masks", "data.finding_masks is read only for the localisation term"),
    ("train.localisation_temperature=0", "localisation_temperature > 0"),
    ("train.localisation_findings=[Lung nodules]", "localisation_findings must be all or a list of CT-RATE findings"),
])
def test_bad_settings_are_refused_when_the_config_is_read(tmp_path, setting, message):
    (tmp_path / "c.yaml").write_text("data:\n  root: split\n")
    with pytest.raises(TrainingError, match=message):
        load_config(tmp_path / "c.yaml", parse_overrides([setting]))


def test_names_follow_ct_clip_order(tmp_path):
    """Label columns in any order in the file come out in CT-CLIP's order."""
    values = {name: i % 2 for i, name in enumerate(CT_RATE_ABNORMALITIES)}
    path = tmp_path / "labels.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, ["VolumeName", *reversed(CT_RATE_ABNORMALITIES)])
        writer.writeheader()
        writer.writerow({"VolumeName": "v.nii.gz", **values})
    assert read_labels(path)["v.nii.gz"].tolist() == [float(i % 2) for i in range(len(CT_RATE_ABNORMALITIES))]


def test_data_wait_is_the_loaders_share_of_the_wall_time():
    """A loader taking 40 ms a batch under a 40 ms step: the loop waits about half the time, and says so."""
    def slow_batches():
        for index in range(5):
            time.sleep(0.04)
            yield {"index": index}

    waits = DataWait(time.perf_counter())
    for _ in waits.timed(slow_batches()):
        time.sleep(0.04)
    record = waits.since_last_log()
    assert record["data_wait_s"] == pytest.approx(0.2, abs=0.08)
    assert record["data_wait_fraction"] == pytest.approx(0.5, abs=0.15)
    assert waits.since_last_log()["data_wait_s"] < 0.01  # counted once, then reset
