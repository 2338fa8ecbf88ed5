"""Sentence -> anatomy grounding: lobes, sides and negation on written sentences, and region-level accuracy on the
held-out patients of the real RadGenome-ChestCT abnormality sentences."""

from __future__ import annotations

import pytest
from conftest import data_root

from CTFoundationLib.anatomy.sentences import default_grounder, split_sentences
from CTFoundationLib.evaluation.grounding import is_held_out, read_cases, region_accuracy

RADGENOME = "reports/radgenome_subset2000/train_vqa_abnormality.csv"


@pytest.mark.parametrize(("sentence", "region", "path", "laterality", "negated"), [
    ("Consolidation in the right lower lobe.", "lung", "lung/right lung/right lung lower lobe", "right", False),
    ("Ground-glass opacity in the lower lobe of the left lung.", "lung", "lung/left lung/left lung lower lobe",
     "left", False),
    ("Nodule of 4 mm in the RUL.", "lung", "lung/right lung/right lung upper lobe", "right", False),
    ("Linear atelectasis in the lingula.", "lung", "lung/left lung/left lung upper lobe", "left", False),
    ("No pleural effusion was detected.", "pleura", "pleura", None, True),
    ("Bilateral pleural effusion, more on the left.", "pleura", "pleura", "bilateral", False),
    ("Minimal pericardial effusion.", "heart", "heart", None, False),
    ("Calcified atheroma plaques in the coronary arteries.", "heart", "heart", None, False),
    ("The ascending aorta is dilated, 45 mm.", "mediastinum", "mediastinum/aorta", None, False),
    ("Sliding type hiatal hernia.", "esophagus", "esophagus", None, False),
    ("Degenerative changes in the thoracic vertebrae.", "bone", "bone/vertebrae", None, False),
    ("Mediastinal lymph nodes were not observed.", "mediastinum", "mediastinum", None, True),
    ("A hypodense lesion in the left kidney.", "abdomen", "abdomen/kidney", "left", False),
    ("There is no consolidation, but a nodule in the left lung.", "lung", "lung/left lung", "left", False),
])
def test_written_sentences(sentence, region, path, laterality, negated):
    grounded = default_grounder().ground(sentence)
    assert (grounded.region, grounded.path, grounded.laterality, grounded.negated) == (region, path, laterality,
                                                                                       negated)


def test_negation_is_per_mention_and_sentences_split():
    grounded = default_grounder().ground("No pneumothorax; atelectasis in the left lower lobe.")
    flags = {m.text: m.negated for m in grounded.mentions}
    assert flags["pneumothorax"] is True and flags["left lower lobe"] is False
    assert split_sentences("<Abnormality> Nodule. No effusion.\nHeart normal") == ["Nodule.", "No effusion.",
                                                                                   "Heart normal"]
    assert default_grounder().ground("Patient was positioned supine.").region is None


def test_region_accuracy_on_held_out_radgenome_sentences():
    path = data_root() / RADGENOME
    held_out = read_cases(path, held_out=True)
    training = read_cases(path, held_out=False)
    assert not {v for v, _ in held_out} & {v for v, _ in training} and all(is_held_out(v) for v, _ in held_out)
    score = region_accuracy(path, held_out=True)
    majority = max(tally[1] for tally in score.per_region.values()) / score.cases
    print(f"\nRadGenome held-out region accuracy: {score.accuracy:.3f} on {score.cases} sentences "
          f"(majority region: {majority:.3f})")
    assert score.cases > 1500 and score.accuracy >= 0.78 and score.accuracy > majority + 0.35
    lung, mediastinum = score.per_region["lung"], score.per_region["mediastinum"]
    assert lung[0] / lung[1] > 0.9 and mediastinum[0] / mediastinum[1] > 0.85
