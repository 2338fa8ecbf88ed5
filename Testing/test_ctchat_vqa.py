"""CT-CHAT's VQA generator on the real RadGenome-ChestCT region tables (subset of 2,000 CT-RATE volumes) and on the
demo set's CT-RATE-style reports + labels: counts per kind, templates filled, no empty answers, seeded."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from CTFoundationLib.errors import TrainingError
from CTFoundationLib.resources import shared_data_root
from training.ctchat.vqa import (
    KINDS,
    QA,
    ctrate_items,
    kind_counts,
    multiple_choice,
    plain_question,
    radgenome_items,
    read_items,
    write_items,
)

RADGENOME = shared_data_root() / "reports" / "radgenome_subset2000"
CHOICE = re.compile(r"\(a\) .+ \(b\) .+ \(c\) .+ \(d\) .+")


@pytest.fixture(scope="module")
def radgenome():
    if not (RADGENOME / "train_vqa_presence.csv").is_file():
        pytest.skip(f"RadGenome tables not found under {RADGENOME}")
    return radgenome_items(RADGENOME, seed=0)


def human_turns(items):
    return [(turn, item["conversations"][i + 1]) for item in items
            for i, turn in enumerate(item["conversations"]) if turn["from"] == "human"]


def test_radgenome_counts_per_kind_and_filled_templates(radgenome):
    counts = kind_counts(radgenome)
    # per volume at most 4 rows per table: 2,000 volumes; presence + size + location -> short answers,
    # abnormality + disorders -> long answers, one multiple choice per volume with disorders
    assert counts["multiple_choice"] == 2000
    assert counts["short_answer"] == 16646 and counts["long_answer"] == 9988
    assert counts["report_generation"] == counts["conversation"] == 0
    templates = {kind: json.loads((RADGENOME / f"{kind}_template.json").read_text())[kind]
                 for kind in ("presence", "size", "location", "abnormality", "disorders")}
    stems = {t.split("{")[0] for ts in templates.values() for t in ts}
    for human, answer in human_turns(radgenome):
        question = plain_question(human["value"])
        assert "{" not in question and "}" not in question
        assert human["value"].startswith("<image>\n<provided>")
        assert human["value"].endswith({"short": " <short_answer>", "long": " <long_answer>",
                                        "multiple_choice": " <multiple_choice>"}[KINDS[human["type"]]])
        assert answer["value"].strip()
        if human["type"] == "multiple_choice":
            assert CHOICE.search(question) and answer["value"] in question.replace(") ", ") ", 1)
            assert re.fullmatch(r"\([abcd]\) .+", answer["value"])
        else:
            assert any(question.startswith(stem) for stem in stems), question
    answers = [answer["value"] for human, answer in human_turns(radgenome) if human["type"] == "short_answer"]
    assert answers.count("Yes.") > 1000 and answers.count("No.") > 1000
    assert any(re.fullmatch(r"\d+(\.\d+)? ?(mm|cm)", a) for a in answers)  # sizes as the table writes them


def test_multiple_choice_answer_is_the_option_and_distractors_come_from_other_findings():
    import random

    qa = multiple_choice("Which?", "Emphysema", ["Emphysema", "Cardiomegaly", "Atelectasis", "Lung nodule", "X"],
                         random.Random(3))
    letter = qa.answer[1]
    options = dict(re.findall(r"\(([abcd])\) ([^()]+?)(?= \(|$)", qa.question))
    assert options[letter] == "Emphysema" and len(options) == 4 and list(options.values()).count("Emphysema") == 1
    assert multiple_choice("Which?", "A", ["A", "B"], random.Random(0)) is None


def test_ctrate_items_from_reports_and_labels_are_seeded(tmp_path):
    data = tmp_path
    (data / "reports.csv").write_text(
        "VolumeName,Findings_EN,Impressions_EN\n"
        'v_1.nii.gz,"Pleural effusion on the right. No nodule.",Right pleural effusion.\n'
        "v_2.nii.gz,Normal lungs.,Normal chest CT.\n")
    header = "VolumeName,Medical material,Arterial wall calcification,Cardiomegaly,Pericardial effusion," \
             "Coronary artery wall calcification,Hiatal hernia,Lymphadenopathy,Emphysema,Atelectasis,Lung nodule," \
             "Lung opacity,Pulmonary fibrotic sequela,Pleural effusion,Mosaic attenuation pattern," \
             "Peribronchial thickening,Consolidation,Bronchiectasis,Interlobular septal thickening\n"
    (data / "labels.csv").write_text(header + "v_1.nii.gz," + ",".join("1" if i == 12 else "0" for i in range(18))
                                     + "\nv_2.nii.gz," + ",".join("0" for _ in range(18)) + "\n")
    items = ctrate_items(data / "reports.csv", data / "labels.csv", seed=5)
    assert items == ctrate_items(data / "reports.csv", data / "labels.csv", seed=5)
    assert items != ctrate_items(data / "reports.csv", data / "labels.csv", seed=6)
    counts = kind_counts(items)
    assert counts["report_generation"] == 2 and counts["multiple_choice"] == 1 and counts["short_answer"] == 6
    assert counts["conversation"] == 4 and counts["long_answer"] == 2 and counts["free_response"] == 2
    first = [i for i in items if i["image"] == "v_1.nii.gz"]
    report = first[0]["conversations"]
    assert report[0]["value"].endswith(" <report_generation>")
    assert report[1]["value"] == ("Findings: Pleural effusion on the right. No nodule. "
                                  "Impression: Right pleural effusion.")
    presence = [(h["value"], a["value"]) for h, a in human_turns(first) if h["type"] == "short_answer"]
    assert sum(a == "Yes." for _, a in presence) == 1 and any("pleural effusion" in q for q, a in presence
                                                              if a == "Yes.")
    conversation = next(i for i in first if i["conversations"][0]["type"] == "conversation")["conversations"]
    assert len(conversation) == 4 and "<image>" not in conversation[2]["value"]
    write_items(items, data / "out.json")
    assert read_items(data / "out.json") == items


def test_bad_inputs_name_the_file(tmp_path):
    (tmp_path / "r.csv").write_text("VolumeName,Findings_EN\nv.nii.gz,x\n")
    with pytest.raises(TrainingError, match="r.csv: missing column.*Impressions_EN"):
        ctrate_items(tmp_path / "r.csv", tmp_path / "r.csv")
    (tmp_path / "bad.json").write_text(json.dumps([{"id": "1", "conversations": [{"from": "gpt", "value": "x"}]}]))
    with pytest.raises(TrainingError, match="alternating human / gpt"):
        read_items(tmp_path / "bad.json")
    with pytest.raises(TrainingError, match="empty question or answer"):
        from training.ctchat.vqa import conversation_item

        conversation_item("v", [QA("Is there X?", " ", "short_answer")], "v#0")
    assert Path(RADGENOME).name == "radgenome_subset2000"
