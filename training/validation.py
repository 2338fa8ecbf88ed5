"""Scoring a labelled split through the runtime the extension uses (read, preprocess, encode, score).

Thresholds and the demo's AUROC come from exactly the files and code that serve predictions later.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from sklearn.metrics import roc_auc_score

from CTFoundationLib.detection import CTCLIPRuntime
from CTFoundationLib.models.ctclip import CT_RATE_ABNORMALITIES

from .ctrate import CTRateDataset


def score_dataset(runtime: CTCLIPRuntime, dataset: CTRateDataset, progress: Callable[[int], None] = lambda n: None) -> np.ndarray:
    """(N, 18) P(present) of every case, in CT-CLIP's finding order."""
    rows = []
    for index in range(len(dataset)):
        latent, _ = runtime.encode_volume(dataset.volume(index))
        rows.append(runtime.probabilities(latent)[0].numpy())
        progress(1)
    return np.stack(rows)


def labels_of(dataset: CTRateDataset) -> np.ndarray:
    return np.stack([case.labels for case in dataset.cases])


def auroc_table(
    probabilities: np.ndarray, labels: np.ndarray, names: Sequence[str] = CT_RATE_ABNORMALITIES,
    eligible: dict[str, np.ndarray] | None = None,
) -> dict[str, dict]:
    """Per finding with both classes present: AUROC (sklearn), positives, cases. `eligible` restricts a
    finding to the cases where it could occur (boolean mask per name)."""
    table = {}
    for k, name in enumerate(names):
        rows = eligible.get(name, slice(None)) if eligible else slice(None)
        y, p = labels[rows, k], probabilities[rows, k]
        if 0 < y.sum() < len(y):
            table[name] = {"auroc": float(roc_auc_score(y, p)), "positives": int(y.sum()), "cases": int(len(y))}
    return table


def format_table(table: dict[str, dict], thresholds: dict[str, float] | None = None) -> str:
    lines = [f"{'finding':30} {'AUROC':>6} {'positives':>9} {'cases':>5} {'threshold':>9}"]
    for name, row in table.items():
        threshold = f"{thresholds[name]:.3f}" if thresholds and name in thresholds else "-"
        lines.append(f"{name:30} {row['auroc']:6.3f} {row['positives']:9d} {row['cases']:5d} {threshold:>9}")
    return "\n".join(lines)
