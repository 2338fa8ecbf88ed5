"""Scoring a labelled split through the runtime the extension uses (read, preprocess, encode, score), and
evaluating it with CT-CLIP's protocol (`CTFoundationLib.evaluation.ctclip`: ROC-corner thresholds, AUROC, weighted F1,
bootstrap intervals).

Thresholds and the demo's AUROC come from exactly the files and code that serve predictions later.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from CTFoundationLib.evaluation.ctclip import Evaluation, evaluate
from CTFoundationLib.inference.ctclip import CTCLIPRuntime
from CTFoundationLib.vocab import CT_RATE_ABNORMALITIES
from training.ctrate import CTRateDataset


def score_dataset(runtime: CTCLIPRuntime, dataset: CTRateDataset,
                  progress: Callable[[int], None] = lambda n: None) -> np.ndarray:
    """(N, 18) P(present) of every case, in CT-CLIP's finding order."""
    rows = []
    for index in range(len(dataset)):
        latent, _ = runtime.encode_volume(dataset.volume(index))
        rows.append(runtime.probabilities(latent)[0].numpy())
        progress(1)
    return np.stack(rows)


def labels_of(dataset: CTRateDataset) -> np.ndarray:
    """(N, 18) 0/1 labels of every case, in CT-CLIP's finding order."""
    return np.stack([case.labels for case in dataset.cases]).astype(np.int64)


def evaluate_split(
    probabilities: np.ndarray, labels: np.ndarray, names: Sequence[str] = CT_RATE_ABNORMALITIES, n_bootstrap: int = 1000
) -> Evaluation:
    """CT-CLIP's evaluation of the findings that have positive and negative cases in the split; (N, 18) inputs."""
    columns = [k for k in range(labels.shape[1]) if 0 < labels[:, k].sum() < len(labels)]
    return evaluate(
        probabilities[:, columns], labels[:, columns], [names[k] for k in columns], n_bootstrap, progress=False
    )


def thresholds_of(evaluation: Evaluation) -> dict[str, float]:
    """finding -> the ROC-corner threshold the evaluation chose."""
    return {finding.name: finding.threshold for finding in evaluation.findings}
