"""Region-level accuracy of sentence grounding on RadGenome-ChestCT's abnormality rows (Volumename, Anatomy, text).

Split by patient (the volume name without its reconstruction suffix, e.g. train_430 for train_430_a_1), so
reconstructions of one report never straddle the split: a patient is held out when sha256(id) % 5 == 0 (20 %).
A case is one distinct (volume, text) pair other than "no findings"; its gold regions are all the regions its
rows are filed under (the same text may sit under several, e.g. atheroma under mediastinum and abdomen).
Accuracy: the grounder's region is one of the gold regions; "no region" counts as wrong.
"""

from __future__ import annotations

import csv
import hashlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from CTFoundationLib.anatomy.sentences import SentenceGrounder, default_grounder

HELD_OUT_MODULUS = 5


def patient_id(volume_name: str) -> str:
    return volume_name.rsplit("_", 2)[0]


def is_held_out(volume_name: str) -> bool:
    return int(hashlib.sha256(patient_id(volume_name).encode()).hexdigest(), 16) % HELD_OUT_MODULUS == 0


def read_cases(csv_path: Path, held_out: bool) -> dict[tuple[str, str], set[str]]:
    """(volume, text) -> gold regions, for one part of the split."""
    cases: dict[tuple[str, str], set[str]] = defaultdict(set)
    with open(csv_path, newline="") as handle:
        for row in csv.DictReader(handle):
            text = row["Abnormality"].strip()
            if text.lower() != "no findings" and is_held_out(row["Volumename"]) == held_out:
                cases[(row["Volumename"], text)].add(row["Anatomy"].split("/")[0])
    return cases


@dataclass
class GroundingScore:
    cases: int = 0
    correct: int = 0
    no_region: int = 0
    per_region: dict[str, list[int]] = field(default_factory=dict)  # gold region -> [correct, total]
    confusions: Counter = field(default_factory=Counter)  # (gold, predicted) of the errors

    @property
    def accuracy(self) -> float:
        return self.correct / self.cases if self.cases else 0.0


def region_accuracy(csv_path: Path, held_out: bool = True, grounder: SentenceGrounder | None = None) -> GroundingScore:
    """Score the grounder on one part (held-out or training) of RadGenome's abnormality rows."""
    grounder = grounder or default_grounder()
    score = GroundingScore()
    for (_, text), gold in read_cases(csv_path, held_out).items():
        predicted = grounder.ground(text).region
        hit = predicted in gold
        score.cases += 1
        score.correct += hit
        score.no_region += predicted is None
        for region in gold:
            tally = score.per_region.setdefault(region, [0, 0])
            tally[0] += hit
            tally[1] += 1
        if not hit:
            score.confusions[(" | ".join(sorted(gold)), predicted)] += 1
    return score
