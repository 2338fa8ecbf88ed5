"""`python -m training.ctchat` end to end on real demo CTs: `data` writes conversations from a reports CSV and its
labels, `train` runs both stages from YAML configs (grids encoded with the registered ct-clip-demo), `predict`
answers the questions with the exported LoRA folder through the runtime, `score` scores the predictions.
The LLM is a tiny random Llama with SmolLM2's tokenizer: this checks the commands and files, not answer quality."""

from __future__ import annotations

import csv
import json

import pytest
from small_chat_models import make_tiny_llm, smollm2_tokenizer_folder

from training.ctchat.__main__ import build_parser, run

VOLUMES = 3


def command(*arguments: str) -> int:
    return run(build_parser().parse_args([str(a) for a in arguments]))


def subset_csv(source, target, names: set[str]) -> None:
    with open(source, newline="") as handle:
        reader = csv.DictReader(handle)
        rows = [row for row in reader if row["VolumeName"] in names]
        fields = reader.fieldnames
    with open(target, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


@pytest.fixture
def demo_cases(demo_home, tmp_path):
    """(images folder with VOLUMES demo CTs, reports CSV, labels CSV) of the CT-CLIP demo's training split."""
    home, _ = demo_home
    data = next(p for p in (home / "demo_data").iterdir() if p.is_dir())
    volumes = sorted((data / "train").rglob("*.nii.gz"))[:VOLUMES]
    images = tmp_path / "images"
    images.mkdir()
    for volume in volumes:
        (images / volume.name).symlink_to(volume)
    names = {volume.name for volume in volumes}
    subset_csv(data / "train_reports.csv", tmp_path / "reports.csv", names)
    subset_csv(data / "train_labels.csv", tmp_path / "labels.csv", names)
    return images, tmp_path / "reports.csv", tmp_path / "labels.csv"


def write_stage(path, llm, questions, images, **values) -> None:
    config = {"llm": str(llm), "template": "chatml_direct", "data": str(questions), "images": str(images),
              "encoder": "ct-clip-demo", "projector": {"n_queries": 4, "n_heads": 4}, "steps": 2, "batch_size": 2,
              "max_length": 512, "save_every": 100, **values}
    path.write_text(json.dumps(config))  # JSON is YAML


@pytest.mark.slow
def test_data_train_predict_and_score_commands(demo_home, demo_cases, tmp_path, monkeypatch, capsys):
    home, _ = demo_home
    monkeypatch.setenv("CTFOUNDATION_HOME", str(home))
    images, reports, labels = demo_cases
    llm = make_tiny_llm(tmp_path / "llm", smollm2_tokenizer_folder(tmp_path), seed=1)

    questions = tmp_path / "questions.json"
    assert command("data", "--reports", reports, "--labels", labels, "--out", questions) == 0
    items = json.loads(questions.read_text())
    assert {item["image"] for item in items} == {p.name for p in images.iterdir()}

    write_stage(tmp_path / "pretrain.yaml", llm, questions, images, stage="pretrain",
                kinds=["report_generation"], output_dir=str(tmp_path / "stage1"))
    assert command("train", tmp_path / "pretrain.yaml") == 0
    projector = tmp_path / "stage1" / "mm_projector.bin"
    assert projector.is_file()
    write_stage(tmp_path / "lora.yaml", llm, questions, images, stage="lora", init_projector=str(projector),
                lora={"r": 4, "alpha": 8, "dropout": 0.0}, output_dir=str(tmp_path / "stage2"))
    assert command("train", tmp_path / "lora.yaml") == 0
    lora = next(p.parent for p in (tmp_path / "stage2").rglob("non_lora_trainables.bin"))
    assert (lora / "adapter_model.safetensors").is_file()

    asked = tmp_path / "asked.json"
    asked.write_text(json.dumps(items[:2]))
    predictions = tmp_path / "predictions.json"
    assert command("predict", asked, "--images", images, "--model", "ct-chat-demo", "--llm", llm, "--lora", lora,
                   "--max-new-tokens", 4, "--device", "cpu", "--out", predictions) == 0
    predicted = json.loads(predictions.read_text())
    assert [p["id"] for p in predicted] == [item["id"] for item in items[:2]]
    for item, answer in zip(items[:2], predicted):
        assert [a["question"] for a in answer["conversations_out"]] == [t["value"] for t in item["conversations"][::2]]
        assert all(isinstance(a["answer"], str) for a in answer["conversations_out"])

    capsys.readouterr()
    table_file = tmp_path / "scores.json"
    assert command("score", asked, predictions, "--out", table_file) == 0
    table = json.loads(table_file.read_text())
    assert sum(group["count"] for group in table.values()) == sum(len(i["conversations"]) // 2 for i in items[:2])
    assert all(0.0 <= group["BLEU-1"] <= 1.0 for group in table.values())
    assert next(iter(table)) in capsys.readouterr().out
