"""fVLM's organ-wise evaluation: one AUROC (and the rest of CT-CLIP's table) per (organ, finding) pair, through
the same `evaluate` as CT-CLIP's, plus the mean per organ and the mean of those organ means."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from CTFoundationLib.evaluation.ctclip import Evaluation, evaluate, format_evaluation


class ZeroShotItem(Protocol):
    """What is read of `CTFoundationLib.models.fvlm.ZeroShotItem` (not imported: evaluation stays torch-free)."""

    organ: str
    finding: str


def item_name(item: ZeroShotItem) -> str:
    return f"{item.organ}: {item.finding}"


def evaluate_organs(probabilities: np.ndarray, labels: np.ndarray, items: Sequence[ZeroShotItem],
                    n_bootstrap: int = 1000, progress: bool = False) -> Evaluation:
    """(cases, items) P(positive) and 0/1 labels -> CT-CLIP's table with rows named "organ: finding"."""
    return evaluate(probabilities, labels, [item_name(item) for item in items], n_bootstrap, progress=progress)


def organ_means(evaluation: Evaluation, items: Sequence[ZeroShotItem]) -> dict[str, float]:
    """Organ -> mean AUROC of its findings, in the items' organ order."""
    by_organ: dict[str, list[float]] = {}
    for item, finding in zip(items, evaluation.findings):
        by_organ.setdefault(item.organ, []).append(finding.metrics["auroc"].value)
    return {organ: float(np.mean(values)) for organ, values in by_organ.items()}


def per_organ_mean_auroc(evaluation: Evaluation, items: Sequence[ZeroShotItem]) -> float:
    """The mean over organs of each organ's mean AUROC (every organ counts once, whatever its finding count)."""
    return float(np.mean(list(organ_means(evaluation, items).values())))


def format_organ_evaluation(evaluation: Evaluation, items: Sequence[ZeroShotItem]) -> str:
    """CT-CLIP's table (one row per organ: finding), then one line per organ with its mean AUROC."""
    lines = [format_evaluation(evaluation)]
    lines += [f"{organ:10} mean AUROC {value:.3f}" for organ, value in organ_means(evaluation, items).items()]
    return "\n".join(lines)
