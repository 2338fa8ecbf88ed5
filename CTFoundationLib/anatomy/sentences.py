"""Sentence -> anatomy grounding: which RadGenome regions / anatomies a report sentence talks about.

A lexicon (`Resources/anatomy/grounding_lexicon.json`) keyed by RadGenome location paths gives anatomy terms
(weight 3: "pleural", "right lung", "aortic") and findings RadGenome files under a place when no place is named
(weight 1: "nodule" -> lung, "lymph node" -> mediastinum). Lobes are read with their side ("right lower lobe",
"lower lobe of the left lung", RUL/LLL, lingula); a side word just before any mention sets its laterality.
Negation (NegEx-like): a cue before a mention in the same clause ("no", "without", ...) or a closing cue after it
("... were not observed") marks it negated; negated mentions still ground the sentence (kept, flagged).
The sentence's region is the one with the highest total weight (ties: the first mentioned).
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from CTFoundationLib.resources import ANATOMY_RESOURCES

ANATOMY_WEIGHT, FINDING_WEIGHT = 3, 1
SIDE_WINDOW = 24  # characters before a mention searched for its side word
POST_NEGATION = ("not observed", "not seen", "not detected", "was not", "were not", "is not", "are not",
                 "ruled out", "resolved")
LOBE_NAMES = {"upper": "upper", "middle": "middle", "lower": "lower", "superior": "upper", "inferior": "lower"}
LOBE_ABBREVIATIONS = {"RUL": ("right", "upper"), "RML": ("right", "middle"), "RLL": ("right", "lower"),
                      "LUL": ("left", "upper"), "LLL": ("left", "lower")}
_SIDE = r"(right|left)"
_POS = r"(upper|middle|lower|superior|inferior)"
LOBE_PATTERNS = (
    re.compile(rf"\b{_SIDE}\s+(?:lung\s+)?{_POS}\s+lob(?:e|es)\b"),
    re.compile(rf"\b{_POS}\s+lob(?:e|es)\s+of\s+the\s+{_SIDE}\s+lung\b"),
)


@dataclass(frozen=True)
class Mention:
    """One place named (or implied by a finding) in a sentence. path: RadGenome location path."""

    path: str
    text: str
    start: int
    kind: str  # "anatomy", "lobe" or "finding"
    negated: bool = False
    laterality: str | None = None

    @property
    def region(self) -> str:
        return self.path.split("/")[0]

    @property
    def weight(self) -> int:
        return FINDING_WEIGHT if self.kind == "finding" else ANATOMY_WEIGHT


@dataclass
class GroundedSentence:
    """A sentence, its mentions, and the region / most specific path it is about (None: no anatomy found)."""

    text: str
    mentions: list[Mention] = field(default_factory=list)
    region: str | None = None
    path: str | None = None
    laterality: str | None = None
    negated: bool = False  # every mention of the chosen region is negated


def lobe_path(side: str, position: str) -> str:
    lobe = LOBE_NAMES[position]
    return f"lung/{side} lung/{side} lung {lobe} lobe"


def split_sentences(text: str) -> list[str]:
    """Report text -> sentences (split after . ! ? and at line breaks; RadGenome's '<Abnormality>' tags dropped)."""
    text = re.sub(r"<[^>]+>", " ", text)
    parts = re.split(r"(?<=[.!?])\s+|\n+", text)
    return [p.strip() for p in parts if p and p.strip(" .")]


class SentenceGrounder:
    """Grounds sentences with the lexicon at `path` (default: the built-in one)."""

    def __init__(self, path: Path = ANATOMY_RESOURCES / "grounding_lexicon.json") -> None:
        lexicon = json.loads(Path(path).read_text())
        self.terms: dict[str, tuple[str, str]] = {}
        for kind in ("anatomy", "findings"):
            for place, words in lexicon[kind].items():
                for word in words:
                    self.terms.setdefault(word.lower(), (place, "anatomy" if kind == "anatomy" else "finding"))
        alternatives = "|".join(re.escape(t) for t in sorted(self.terms, key=len, reverse=True))
        self.pattern = re.compile(rf"(?<![\w-])({alternatives})s?(?![\w-])")
        negation = sorted((c for c in lexicon["negation"] if c not in POST_NEGATION), key=len, reverse=True)
        self.pre_negation = re.compile(r"(?<![\w-])(" + "|".join(re.escape(c) for c in negation) + r")(?![\w-])")
        breaks = "|".join(re.escape(b) for b in lexicon["clause_breaks"] if b.strip() not in ("and", ","))
        self.clause_break = re.compile(breaks)

    def ground(self, sentence: str) -> GroundedSentence:
        text = sentence.lower()
        mentions = self._lobes(sentence, text)
        masked = _mask(text, mentions)
        for match in self.pattern.finditer(masked):
            place, kind = self.terms[match.group(1)]
            mentions.append(Mention(place, match.group(0), match.start(), kind))
        mentions = [self._qualified(m, text) for m in sorted(mentions, key=lambda m: m.start)]
        return _decide(sentence, mentions)

    def ground_report(self, text: str) -> list[GroundedSentence]:
        return [self.ground(sentence) for sentence in split_sentences(text)]

    def _lobes(self, sentence: str, text: str) -> list[Mention]:
        found = []
        for pattern in LOBE_PATTERNS:
            for m in pattern.finditer(text):
                side, position = ((m.group(1), m.group(2)) if m.group(1) in ("right", "left")
                                  else (m.group(2), m.group(1)))
                if side == "left" and LOBE_NAMES[position] == "middle":
                    continue  # no left middle lobe: leave it to the plain terms
                found.append(Mention(lobe_path(side, position), m.group(0), m.start(), "lobe", laterality=side))
        for m in re.finditer(r"\b(RUL|RML|RLL|LUL|LLL)\b", sentence):
            side, position = LOBE_ABBREVIATIONS[m.group(1)]
            found.append(Mention(lobe_path(side, position), m.group(0), m.start(), "lobe", laterality=side))
        for m in re.finditer(r"\blingul(?:a|ar)\b", text):
            found.append(Mention(lobe_path("left", "upper"), m.group(0), m.start(), "lobe", laterality="left"))
        return _without_overlaps(found)

    def _qualified(self, mention: Mention, text: str) -> Mention:
        """The mention with its side (a side word just before it) and negation (within its clause)."""
        laterality = mention.laterality
        if laterality is None:
            before = text[max(0, mention.start - SIDE_WINDOW):mention.start + len(mention.text)]
            sides = re.findall(r"\b(right|left|bilateral|both)\b", before)
            laterality = {"both": "bilateral"}.get(sides[-1], sides[-1]) if sides else None
        clause_start, clause_end = self._clause(text, mention.start)
        negated = bool(self.pre_negation.search(text, clause_start, mention.start)) or any(
            cue in text[mention.start:clause_end] for cue in POST_NEGATION)
        return Mention(mention.path, mention.text, mention.start, mention.kind, negated, laterality)

    def _clause(self, text: str, position: int) -> tuple[int, int]:
        start, end = 0, len(text)
        for b in self.clause_break.finditer(text):
            if b.end() <= position:
                start = b.end()
            elif b.start() >= position:
                end = b.start()
                break
        return start, end


def _mask(text: str, mentions: list[Mention]) -> str:
    chars = list(text)
    for m in mentions:
        chars[m.start:m.start + len(m.text)] = " " * len(m.text)
    return "".join(chars)


def _without_overlaps(mentions: list[Mention]) -> list[Mention]:
    kept: list[Mention] = []
    for m in sorted(mentions, key=lambda m: (m.start, -len(m.text))):
        if not kept or m.start >= kept[-1].start + len(kept[-1].text):
            kept.append(m)
    return kept


def _decide(sentence: str, mentions: list[Mention]) -> GroundedSentence:
    if not mentions:
        return GroundedSentence(sentence)
    weight: dict[str, int] = defaultdict(int)
    for m in mentions:
        weight[m.region] += m.weight
    best = max(weight.values())
    region = next(m.region for m in mentions if weight[m.region] == best)
    own = [m for m in mentions if m.region == region]
    deepest = max(own, key=lambda m: (m.weight, m.path.count("/"), -m.start))
    sides = {m.laterality for m in own if m.laterality}
    laterality = sides.pop() if len(sides) == 1 else ("bilateral" if sides else None)
    return GroundedSentence(sentence, mentions, region, deepest.path, laterality, all(m.negated for m in own))


@cache
def default_grounder() -> SentenceGrounder:
    return SentenceGrounder()
