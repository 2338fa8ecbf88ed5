"""CT-CHAT text metrics (pycocoevalcap, as the reference scores) against values worked out by hand, yes/no
accuracy, per-type grouping, and the predictions / questions file checks."""

from __future__ import annotations

import json
import math
import shutil

import pytest

from CTFoundationLib.errors import TrainingError
from training.ctchat.evaluate import score_files
from training.ctchat.metrics import clean_answer, meteor, scores_by_type, text_metrics, yes_no, yes_no_accuracy


def test_bleu_and_rouge_of_one_pair_match_the_hand_computation():
    # candidate "the cat sat on a mat" vs reference "the cat sat on the mat": 6 words each (brevity penalty 1);
    # unigrams 5/6 match, bigrams 3/5 (the cat, cat sat, sat on), trigrams 2/4, 4-grams 1/3; LCS 5 of 6 words
    scores = text_metrics(["the cat sat on the mat"], ["the cat sat on a mat"], with_meteor=False)
    precisions = [5 / 6, 3 / 5, 2 / 4, 1 / 3]
    for n in range(1, 5):
        expected = math.prod(precisions[:n]) ** (1 / n)
        assert scores[f"BLEU-{n}"] == pytest.approx(expected, abs=1e-6)
    assert scores["ROUGE-L"] == pytest.approx(5 / 6, abs=1e-6)  # P = R = 5/6, so F_beta = 5/6 for any beta


def test_cider_is_ten_for_exact_answers_and_zero_for_disjoint_ones():
    # two answers with no shared n-gram: every n-gram has idf log(2) and the candidate's tf-idf vector equals the
    # reference's, so each n's cosine is 1 and CIDEr-D = 10 * mean over n = 10 (no length penalty)
    exact = text_metrics(["pleural effusion on the right", "nodules in both lungs"],
                         ["pleural effusion on the right", "nodules in both lungs"], with_meteor=False)
    assert exact["CIDEr"] == pytest.approx(10.0, abs=1e-6)
    assert exact["BLEU-4"] == pytest.approx(1.0, abs=1e-6) and exact["ROUGE-L"] == pytest.approx(1.0)
    disjoint = text_metrics(["pleural effusion on the right", "nodules in both lungs"],
                            ["normal heart size", "no emphysema seen here"], with_meteor=False)
    assert disjoint["CIDEr"] == pytest.approx(0.0, abs=1e-9) and disjoint["ROUGE-L"] == 0.0


@pytest.mark.skipif(shutil.which("java") is None, reason="METEOR runs pycocoevalcap's jar with Java")
def test_meteor_ranks_an_exact_answer_above_a_partial_and_a_wrong_one():
    references = ["there is a pleural effusion in the right hemithorax"] * 3
    candidates = [references[0], "there is a pleural effusion", "the heart is normal"]
    corpus, scores = meteor(dict(enumerate([r] for r in references)), dict(enumerate([c] for c in candidates)))
    assert scores[0] > scores[1] > scores[2] >= 0 and scores[0] > 0.9
    # the jar pools matches and chunks over the corpus (not the mean of the segments): it lies between the worst
    # and the exact answer's
    assert scores[2] < corpus < scores[0]


def test_yes_no_reading_and_accuracy():
    assert [yes_no(t) for t in ("Yes.", "no, there is none", "(Yes) it is", "Maybe.", "")] == \
        ["yes", "no", "yes", None, None]
    accuracy, count = yes_no_accuracy(["Yes.", "No.", "No.", "In the left lung."], ["Yes.", "Yes.", "Unsure", "x"])
    assert (accuracy, count) == (pytest.approx(1 / 3), 3)
    assert clean_answer("No.<|im_end|>\n") == "No."


def test_scores_group_types_as_the_reference_and_files_are_checked(tmp_path):
    rows = [("short_answer", "Yes.", "Yes."), ("short_answer", "No.", "Yes."), ("free_response", "a b c", "a b c"),
            ("conversation", "d e f", "d e"), ("multiple_choice", "(a) x", "(a) x")]
    table = scores_by_type(rows, with_meteor=False)
    assert set(table) == {"short_answer", "long_answer", "multiple_choice"}
    assert table["long_answer"]["count"] == 2 and table["short_answer"]["yes_no_accuracy"] == 0.5

    questions = [{"id": "1", "image": "a.nii.gz", "conversations": [
        {"from": "human", "value": "<image>\n<provided>Is there X? <short_answer>", "type": "short_answer"},
        {"from": "gpt", "value": "No."}]}]
    (tmp_path / "q.json").write_text(json.dumps(questions))
    (tmp_path / "p.json").write_text(json.dumps([{"conversations_out": [{"answer": "No."}]}]))
    scores = score_files(tmp_path / "q.json", tmp_path / "p.json", with_meteor=False)
    assert scores["short_answer"]["yes_no_accuracy"] == 1.0
    (tmp_path / "p.json").write_text(json.dumps([]))
    with pytest.raises(TrainingError, match="0 predictions for 1"):
        score_files(tmp_path / "q.json", tmp_path / "p.json")
