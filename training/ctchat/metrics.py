"""Scoring CT-CHAT answers as the reference does (evaluations/new_llm_metrics.py): BLEU-1..4, METEOR, ROUGE-L and
CIDEr from `pycocoevalcap` on the raw answer strings, per question type; yes/no accuracy of short answers; and
clinical efficacy of generated reports with the library's report labeller (per-finding and macro F1).

pycocoevalcap's METEOR runs its bundled meteor-1.5.jar with Java; without a `java` on PATH METEOR is reported as
unavailable (None, with the reason) and the other metrics still run.
"""

from __future__ import annotations

import shutil
from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from CTFoundationLib.errors import DependencyError

# the reference's grouping of question types into its table rows
TYPE_GROUPS = {"free_response": "long_answer", "description": "long_answer", "conversation": "long_answer",
               "long_answer": "long_answer", "multiple_choice": "multiple_choice",
               "report_generation": "report_generation", "short_answer": "short_answer"}
METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")
METEOR_UNAVAILABLE = "METEOR needs Java (pycocoevalcap runs meteor-1.5.jar): install a JRE, e.g. apt-get install " \
                     "default-jre-headless"


def clean_answer(text: str) -> str:
    """An answer as the reference scores it: end-of-turn markers removed, one line."""
    for marker in ("<s>", "</s>", "<|eot_id|>", "<|im_end|>"):
        text = text.replace(marker, "")
    return " ".join(text.replace("\n", " ").split())


def text_metrics(references: Sequence[str], predictions: Sequence[str], with_meteor: bool = True,
                 ) -> dict[str, float | None]:
    """Corpus BLEU-1..4, METEOR, ROUGE-L, CIDEr(-D) of predictions against one reference each (pycocoevalcap).

    with_meteor=False skips METEOR (None), which starts a Java process per call."""
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge
    except ImportError:
        raise DependencyError("text metrics need pycocoevalcap: pip install 'ctfoundation[training]'") from None
    if len(references) != len(predictions) or not references:
        raise ValueError(f"{len(references)} references for {len(predictions)} predictions")
    gts = {i: [clean_answer(r) or "-"] for i, r in enumerate(references)}
    res = {i: [clean_answer(p) or "-"] for i, p in enumerate(predictions)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores: dict[str, float | None] = {f"BLEU-{n + 1}": float(value) for n, value in enumerate(bleu)}
    scores["METEOR"] = meteor(gts, res)[0] if with_meteor else None
    scores["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
    scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    return scores


def meteor(gts: dict, res: dict) -> tuple[float | None, list[float]]:
    """(corpus METEOR, per-answer scores); (None, []) without Java."""
    if shutil.which("java") is None:
        return None, []
    from pycocoevalcap.meteor.meteor import Meteor

    scorer = Meteor()  # a java process, ended when the scorer is collected
    corpus, each = scorer.compute_score(gts, res)
    return float(corpus), [float(value) for value in each]


def yes_no(text: str) -> str | None:
    """'yes' / 'no' from the first word of an answer, else None."""
    words = clean_answer(text).lower().lstrip("(").split()
    first = words[0].strip(".,!:;)") if words else ""
    return first if first in ("yes", "no") else None


def yes_no_accuracy(references: Sequence[str], predictions: Sequence[str]) -> tuple[float, int]:
    """(accuracy, count) over the references that are yes/no answers; an answer that is neither counts as wrong."""
    pairs = [(yes_no(r), yes_no(p)) for r, p in zip(references, predictions) if yes_no(r) is not None]
    if not pairs:
        return float("nan"), 0
    return sum(r == p for r, p in pairs) / len(pairs), len(pairs)


def scores_by_type(rows: Sequence[tuple[str, str, str]], with_meteor: bool = True) -> dict[str, dict]:
    """rows of (question type, reference, prediction) -> {group: metrics + count} with the reference's groups."""
    grouped: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for kind, reference, prediction in rows:
        grouped[TYPE_GROUPS.get(kind, "short_answer")].append((reference, prediction))
    table = {}
    for group, pairs in sorted(grouped.items()):
        references, predictions = zip(*pairs)
        table[group] = {**text_metrics(references, predictions, with_meteor), "count": len(pairs)}
        accuracy, count = yes_no_accuracy(references, predictions)
        if count:
            table[group].update(yes_no_accuracy=accuracy, yes_no_count=count)
    return table


def clinical_efficacy(references: Sequence[str], generated: Sequence[str], labeller,
                      findings: Sequence[str] | None = None) -> dict:
    """Precision / recall / F1 per finding of the labeller's labels of generated vs reference reports, and their
    macro mean over `findings` (default: the findings some reference report has)."""
    from sklearn.metrics import precision_recall_fscore_support

    from CTFoundationLib.vocab import CT_RATE_ABNORMALITIES

    truth = np.asarray(labeller.labels(list(references)))
    predicted = np.asarray(labeller.labels(list(generated)))
    names = list(findings) if findings else [n for i, n in enumerate(CT_RATE_ABNORMALITIES) if truth[:, i].any()]
    columns = [CT_RATE_ABNORMALITIES.index(name) for name in names]
    precision, recall, f1, support = precision_recall_fscore_support(truth[:, columns], predicted[:, columns],
                                                                     average=None, zero_division=0)
    per_finding = {name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
                   for name, p, r, f, s in zip(names, precision, recall, f1, support)}
    return {"findings": per_finding, "macro_f1": float(np.mean(f1)) if len(f1) else float("nan"),
            "n_reports": len(references)}


def format_scores(table: dict[str, dict]) -> str:
    header = f"{'question type':20} {'n':>5} " + " ".join(f"{m:>8}" for m in METRICS)
    lines = [header]
    for group, row in table.items():
        values = " ".join(f"{row[m]:8.4f}" if row.get(m) is not None else f"{'n/a':>8}" for m in METRICS)
        lines.append(f"{group:20} {row['count']:5d} {values}")
    if shutil.which("java") is None:
        lines.append(f"METEOR n/a: {METEOR_UNAVAILABLE}")
    return "\n".join(lines)
