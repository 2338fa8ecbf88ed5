"""CT-CHAT's VQA training data, written in the reference's conversation JSON (ibrahimethemhamamci/CT-CHAT).

A file is a list of items `{"id", "image", "conversations": [{"from": "human", "value", "type"}, {"from": "gpt",
"value"}, ...]}`. The first human turn starts with `<image>\\n<provided>`; each question ends with the answer-type
suffix the runtime sends (`templates.ANSWER_SUFFIXES`: ` <short_answer>`, ` <long_answer>`, ` <multiple_choice>`,
` <report_generation>`, none for free text), so training and chat see the same text. `type` is one of KINDS, the
names the reference's evaluation scripts group by.

Sources:
- CT-RATE reports CSV (`VolumeName, Findings_EN, Impressions_EN`) + the 18-column labels CSV: report generation,
  presence short answers, multiple choice (distractors: findings the case does not have), long answers
  (findings text), free response (impression) and a multi-turn conversation;
- RadGenome-ChestCT's region-level tables (presence, abnormality, location, size, case disorders) with their
  question templates (`{region}`, `{abnormality}` filled);
- the demo set's recorded findings (`training.ctchat.demo`).

Every choice is drawn from a generator seeded by (seed, volume name, source): the output does not depend on the
order of the rows or on other volumes (only multiple-choice distractors come from the pool of other findings).
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from CTFoundationLib.errors import TrainingError
from CTFoundationLib.models.ctchat.templates import ANSWER_SUFFIXES, user_message
from CTFoundationLib.vocab import CT_RATE_ABNORMALITIES

# kind -> the runtime's answer type (its suffix token)
KINDS = {
    "conversation": "free",
    "free_response": "free",
    "long_answer": "long",
    "multiple_choice": "multiple_choice",
    "report_generation": "report",
    "short_answer": "short",
}
REPORT_REQUESTS = (
    "Generate the radiology report for this chest CT volume.",
    "Write the radiology report of this CT scan.",
    "Can you produce a report of the findings in this chest CT?",
    "Please write a report for this chest CT volume.",
)
PRESENCE_QUESTIONS = (
    "Is there {finding} in this CT?",
    "Does this chest CT show {finding}?",
    "Can {finding} be seen in this scan?",
    "Is {finding} present?",
)
CHOICE_QUESTIONS = ("Which of the following findings is present in this CT?",
                    "Which of these findings does this chest CT show?")
FINDINGS_QUESTIONS = ("Describe the findings of this chest CT in detail.",
                      "What are the findings in this CT volume? Explain them.")
IMPRESSION_QUESTIONS = ("What is the overall impression of this chest CT?",
                        "Summarise the most important findings of this scan.")
RADGENOME_FILES = {
    "presence": "train_vqa_presence.csv",
    "abnormality": "train_vqa_abnormality.csv",
    "location": "train_vqa_location.csv",
    "size": "train_vqa_size.csv",
    "disorders": "train_case_disorders.csv",
}


@dataclass(frozen=True)
class QA:
    """One question (as the user asks it, without placeholders or suffix), its answer and its kind."""

    question: str
    answer: str
    kind: str


def case_rng(seed: int, *parts: str) -> random.Random:
    """A generator that depends only on the seed and the named parts (volume name, source)."""
    digest = hashlib.sha256("|".join([str(seed), *parts]).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def conversation_item(image: str, qas: Sequence[QA], item_id: str) -> dict:
    """One item of the reference's JSON: the first question carries `<image>\\n<provided>`, each its suffix."""
    if not qas:
        raise TrainingError(f"{item_id}: a conversation needs at least one question")
    turns = []
    for index, qa in enumerate(qas):
        if not qa.question.strip() or not qa.answer.strip():
            raise TrainingError(f"{item_id}: empty question or answer ({qa.kind})")
        value = user_message(qa.question, KINDS[qa.kind], first_with_image=index == 0)
        turns += [{"from": "human", "value": value, "type": qa.kind}, {"from": "gpt", "value": qa.answer.strip()}]
    return {"id": item_id, "image": image, "conversations": turns}


def plain_question(value: str) -> str:
    """A human turn's question without `<image>`, `<provided>` and the answer-type suffix."""
    text = value.replace("<image>", "").replace("<provided>", "").strip()
    for suffix in sorted(ANSWER_SUFFIXES.values(), key=len, reverse=True):
        if suffix and text.endswith(suffix):
            return text[: -len(suffix)].strip()
    return text


def lower_finding(name: str) -> str:
    return name[0].lower() + name[1:] if name[:2] != name[:2].upper() else name


def multiple_choice(question: str, correct: str, pool: Sequence[str], rng: random.Random, n: int = 4) -> QA | None:
    """`question (a) .. (b) .. (c) .. (d) ..` with `correct` at a random place and distractors from `pool`;
    None when the pool has too few other options. Answer: `(b) choice`, as the reference writes it."""
    others = sorted({option for option in pool if option.lower() != correct.lower()})
    if len(others) < n - 1:
        return None
    options = rng.sample(others, n - 1)
    options.insert(rng.randrange(n), correct)
    letters = "abcdefgh"
    text = " ".join(f"({letters[i]}) {option}" for i, option in enumerate(options))
    index = options.index(correct)
    return QA(f"{question} {text}", f"({letters[index]}) {correct}", "multiple_choice")


# --- CT-RATE reports + labels ---------------------------------------------------------------------------------


def read_rows(path: Path, required: Sequence[str]) -> list[dict[str, str]]:
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            missing = [name for name in required if name not in (reader.fieldnames or [])]
            if missing:
                raise TrainingError(f"{path}: missing column(s) {', '.join(missing)}; expected {', '.join(required)}")
            return list(reader)
    except OSError as error:
        raise TrainingError(f"{path}: cannot be read ({error.strerror}); give the CSV file") from None


def report_text(findings: str, impression: str) -> str:
    return f"Findings: {findings.strip()} Impression: {impression.strip()}".strip()


def ctrate_qas(name: str, findings: str, impression: str, positives: set[str], seed: int) -> list[list[QA]]:
    """The conversations of one CT-RATE volume: each a list of QA sharing the image."""
    rng = case_rng(seed, name, "ctrate")
    negatives = [f for f in CT_RATE_ABNORMALITIES if f not in positives]
    conversations: list[list[QA]] = [[QA(rng.choice(REPORT_REQUESTS), report_text(findings, impression),
                                         "report_generation")]]
    asked = [rng.choice(sorted(positives))] if positives else []
    asked += rng.sample(negatives, min(2 if positives else 3, len(negatives)))
    conversations += [[QA(rng.choice(PRESENCE_QUESTIONS).format(finding=lower_finding(f)),
                          "Yes." if f in positives else "No.", "short_answer")] for f in asked]
    if positives:
        choice = multiple_choice(rng.choice(CHOICE_QUESTIONS), rng.choice(sorted(positives)), negatives, rng)
        if choice is not None:
            conversations.append([choice])
    if findings.strip():
        conversations.append([QA(rng.choice(FINDINGS_QUESTIONS), findings, "long_answer")])
    if impression.strip():
        conversations.append([QA(rng.choice(IMPRESSION_QUESTIONS), impression, "free_response")])
        finding = rng.choice(CT_RATE_ABNORMALITIES)
        conversations.append([
            QA("What does this chest CT show?", impression, "conversation"),
            QA(f"Is there any {lower_finding(finding)}?",
               f"Yes, there is {lower_finding(finding)}." if finding in positives
               else f"No, there is no {lower_finding(finding)}.", "conversation"),
        ])
    return conversations


def ctrate_items(reports_csv: Path, labels_csv: Path, seed: int = 0) -> list[dict]:
    """Conversation items of every volume of a CT-RATE reports CSV that has labels."""
    reports = read_rows(reports_csv, ("VolumeName", "Findings_EN", "Impressions_EN"))
    labels = {row["VolumeName"]: row for row in read_rows(labels_csv, ("VolumeName", *CT_RATE_ABNORMALITIES))}
    items = []
    for row in reports:
        name = row["VolumeName"]
        if name not in labels:
            continue
        positives = {f for f in CT_RATE_ABNORMALITIES if labels[name][f].strip() in ("1", "1.0")}
        for index, qas in enumerate(ctrate_qas(name, row["Findings_EN"] or "", row["Impressions_EN"] or "",
                                               positives, seed)):
            items.append(conversation_item(name, qas, f"{name}#ctrate{index}"))
    return items


# --- RadGenome-ChestCT region-level tables -------------------------------------------------------------------


def load_templates(folder: Path) -> dict[str, list[str]]:
    """{'presence': [...], 'abnormality': [...], 'location': [...], 'size': [...], 'disorders': [...]}."""
    templates = {}
    for kind in RADGENOME_FILES:
        path = folder / f"{kind}_template.json"
        try:
            templates[kind] = json.loads(path.read_text())[kind]
        except (OSError, ValueError, KeyError):
            raise TrainingError(f"{path}: missing or not a RadGenome question template file "
                                f'({{"{kind}": [questions]}})') from None
    return templates


def region_name(anatomy_path: str) -> str:
    """The most specific part of a RadGenome anatomy path ('lung/lung/left lung lower lobe' -> its last part)."""
    return anatomy_path.strip().split("/")[-1].strip()


def split_findings(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def fill(template: str, **values: str) -> str:
    text = template.format(**values)
    if "{" in text or "}" in text:
        raise TrainingError(f"template {template!r} has a placeholder that was not filled")
    return text


def radgenome_rows(folder: Path) -> dict[str, list[tuple[str, dict]]]:
    """volume -> [(table kind, row), ...] of every RadGenome table in `folder`."""
    per_volume: dict[str, list[tuple[str, dict]]] = defaultdict(list)
    for kind, file in RADGENOME_FILES.items():
        for row in read_rows(folder / file, ("Volumename",)):
            per_volume[row["Volumename"]].append((kind, row))
    return per_volume


def radgenome_items(folder: Path, seed: int = 0, max_per_table: int = 4) -> list[dict]:
    """Conversation items from RadGenome's region-level VQA tables with their question templates.

    Per volume and table at most `max_per_table` rows (drawn with the volume's generator); presence -> short
    answer (Yes./No.), size -> short answer, location -> short answer (the region), abnormality -> long answer
    (the findings of a region), disorders -> long answer (all) and multiple choice (distractors: other cases'
    disorders).
    """
    templates = load_templates(folder)
    per_volume = radgenome_rows(folder)
    disorder_pool = sorted({d for rows in per_volume.values() for kind, row in rows if kind == "disorders"
                            for d in split_findings(row.get("Disorders", ""))})
    items = []
    for volume in sorted(per_volume):
        rng = case_rng(seed, volume, "radgenome")
        by_kind: dict[str, list[dict]] = defaultdict(list)
        for kind, row in per_volume[volume]:
            by_kind[kind].append(row)
        qas: list[QA] = []
        for kind in RADGENOME_FILES:
            rows = by_kind.get(kind, [])
            for row in rng.sample(rows, min(max_per_table, len(rows))):
                qas += radgenome_row_qas(kind, row, templates[kind], disorder_pool, rng)
        for index, qa in enumerate(qas):
            items.append(conversation_item(volume, [qa], f"{volume}#radgenome{index}"))
    return items


def radgenome_row_qas(kind: str, row: dict, templates: list[str], disorder_pool: Sequence[str],
                      rng: random.Random) -> list[QA]:
    template = rng.choice(templates)
    if kind == "presence":
        finding = rng.choice(split_findings(row["Finding"]) or [""])
        answer = row["Presence"].strip()
        if not finding or answer not in ("Yes.", "No."):
            return []
        return [QA(fill(template, abnormality=finding, region=region_name(row["Anatomy"])), answer, "short_answer")]
    if kind == "size":
        if not row["Size"].strip():
            return []
        question = fill(template, abnormality=row["Abnormality"].strip(), region=region_name(row["Anatomy"]))
        return [QA(question, row["Size"].strip(), "short_answer")]
    if kind == "location":
        finding = rng.choice(split_findings(row["Abnormality"]) or [""])
        if not finding:
            return []
        return [QA(fill(template, abnormality=finding), f"In the {region_name(row['Anatomy'])}.", "short_answer")]
    if kind == "abnormality":
        findings = split_findings(row["Abnormality"])
        if not findings:
            return []
        return [QA(fill(template, region=region_name(row["Anatomy"])), ", ".join(findings) + ".", "long_answer")]
    disorders = split_findings(row["Disorders"])
    if not disorders:
        return []
    qas = [QA(fill(template), ", ".join(disorders) + ".", "long_answer")]
    choice = multiple_choice("Which of the following is seen in the scan?", rng.choice(disorders),
                             [d for d in disorder_pool if d not in disorders], rng)
    return qas + ([choice] if choice is not None else [])


# --- writing and summaries -------------------------------------------------------------------------------------


def kind_counts(items: Iterable[dict]) -> dict[str, int]:
    """Questions per kind."""
    counts = dict.fromkeys(KINDS, 0)
    for item in items:
        for turn in item["conversations"]:
            if turn["from"] == "human":
                counts[turn["type"]] += 1
    return counts


def write_items(items: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(items, indent=1, ensure_ascii=False))


def read_items(path: Path) -> list[dict]:
    """A conversation JSON file, checked: a list of items with image and alternating human / gpt turns."""
    try:
        items = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise TrainingError(f"{path}: not a readable conversation JSON file ({error})") from None
    if not isinstance(items, list):
        raise TrainingError(f"{path}: expected a JSON list of conversation items")
    for item in items:
        turns = item.get("conversations") if isinstance(item, dict) else None
        if not turns or len(turns) % 2 or any(t.get("from") != ("human", "gpt")[i % 2] for i, t in enumerate(turns)):
            raise TrainingError(f"{path}: item {item.get('id') if isinstance(item, dict) else item!r} needs "
                                "alternating human / gpt turns")
    return items
