"""CT-CLIP's evaluation protocol: AUROC, weighted F1, accuracy and precision per finding and their mean,
with bootstrap 95% confidence intervals.

It follows the reference scripts (`scripts/bootstrap_values.py` and `scripts/eval.py` of CT-CLIP):
- threshold per finding: the 100 values `linspace(0, 1, 100)`, prediction `probability > threshold`, keep the
  one that minimises the distance sqrt((1 - TPR)^2 + FPR^2) to the ROC corner (the larger one on ties). It is
  chosen once on all cases and kept fixed in the resamples.
- AUROC of the probabilities; F1 weighted over the two classes of the finding (scikit-learn `average="weighted"`);
  accuracy; precision of the positive class (0 when no case is called positive).
- 1000 bootstrap resamples of the cases with replacement; the interval is the sorted resampled values at
  indices int(0.025 n) - 1 and int(0.975 n) - 1 (eval.py's `compute_cis`). The mean over findings is taken in
  each resample. Where the committed reference has its resampling lines commented out (every "resample" is the
  full set), cases are resampled here, from a seeded generator.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy.stats import rankdata
from tqdm import tqdm

from CTFoundationLib.errors import EvaluationError
from CTFoundationLib.io.tables import case_id, finding_columns, finding_for_column, number_matrix, read_csv_rows
from CTFoundationLib.vocab import CT_RATE_ABNORMALITIES

METRICS = ("auroc", "f1_weighted", "accuracy", "precision")
THRESHOLD_GRID = np.linspace(0.0, 1.0, 100)
CONFIDENCE = 0.95


@dataclass
class Estimate:
    """A metric on all cases, with the bootstrap interval."""

    value: float
    lower: float
    upper: float


@dataclass
class FindingResult:
    name: str
    threshold: float
    positives: int
    metrics: dict[str, Estimate]


@dataclass
class Evaluation:
    """Per-finding and mean metrics of one set of predictions against labels."""

    findings: list[FindingResult]
    mean: dict[str, Estimate]
    n_cases: int
    n_bootstrap: int
    seed: int

    def to_dict(self) -> dict:
        return asdict(self)


def choose_threshold(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """CT-CLIP's threshold: the grid value whose (FPR, TPR) is nearest the ROC corner (0, 1); the larger on ties."""
    positive = labels == 1
    called = probabilities[None, :] > THRESHOLD_GRID[:, None]  # (grid, cases)
    tpr = called[:, positive].mean(axis=1)
    fpr = called[:, ~positive].mean(axis=1)
    distance = np.sqrt((1.0 - tpr) ** 2 + fpr**2)
    return float(THRESHOLD_GRID[np.flatnonzero(distance == distance.min())[-1]])


def threshold_metrics(probabilities: np.ndarray, labels: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """(findings, 4) [AUROC, weighted F1, accuracy, precision] of (cases, findings) inputs, all findings at once.

    F1, accuracy and precision are scikit-learn's `f1_score(average="weighted")`, `accuracy_score` and
    `precision_score(zero_division=0)` (as the reference calls them) written on confusion counts; AUROC is NaN
    where only one class is present.
    """
    called = probabilities > thresholds
    truth = labels == 1
    tp, fp = (called & truth).sum(axis=0), (called & ~truth).sum(axis=0)
    fn, tn = (~called & truth).sum(axis=0), (~called & ~truth).sum(axis=0)
    f1_positive = safe_ratio(2 * tp, 2 * tp + fp + fn)
    f1_negative = safe_ratio(2 * tn, 2 * tn + fp + fn)
    cases = len(labels)
    weighted_f1 = (f1_positive * (tp + fn) + f1_negative * (tn + fp)) / cases
    return np.stack([auroc(probabilities, labels), weighted_f1, (tp + tn) / cases, safe_ratio(tp, tp + fp)], axis=1)


def safe_ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, 0 where the denominator is 0 (scikit-learn's zero_division=0)."""
    return np.divide(numerator, denominator, out=np.zeros(len(numerator)), where=denominator > 0)


def auroc(probabilities: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """AUROC per column by the Mann-Whitney identity on mid-ranks (equal to scikit-learn's `roc_auc_score`, ties
    counting one half, for all columns at once); NaN where a column has one class only."""
    positives = labels.sum(axis=0)
    pairs = (positives * (len(labels) - positives)).astype(np.float64)
    rank_sum = (rankdata(probabilities, axis=0) * labels).sum(axis=0)
    result = np.full(labels.shape[1], np.nan)
    both = pairs > 0
    result[both] = (rank_sum[both] - positives[both] * (positives[both] + 1) / 2) / pairs[both]
    return result


def reference_interval(values: np.ndarray) -> tuple[float, float]:
    """95% interval as CT-CLIP's `compute_cis` takes it from sorted resampled values (NaNs left out)."""
    ordered = np.sort(values[~np.isnan(values)])
    if not len(ordered):
        return np.nan, np.nan
    tail = (1.0 - CONFIDENCE) / 2
    lower = max(int(tail * len(ordered)) - 1, 0)
    upper = max(int((1.0 - tail) * len(ordered)) - 1, 0)
    return float(ordered[lower]), float(ordered[upper])


def check_inputs(probabilities: np.ndarray, labels: np.ndarray, names: Sequence[str]) -> None:
    if probabilities.shape != labels.shape or probabilities.ndim != 2 or probabilities.shape[1] != len(names):
        raise EvaluationError(
            f"predictions {probabilities.shape} and labels {labels.shape} must both be (cases, {len(names)} findings)"
        )
    if not np.isin(labels, (0, 1)).all():
        raise EvaluationError("labels must be 0 or 1")
    if not ((probabilities >= 0) & (probabilities <= 1)).all():
        raise EvaluationError("predictions must be probabilities in [0, 1] (CT-CLIP's thresholds scan 0..1)")
    one_class = [name for name, column in zip(names, labels.T) if column.min() == column.max()]
    if one_class:
        raise EvaluationError(
            f"{one_class} have only positive or only negative cases among the {len(labels)} evaluated, so AUROC "
            "and the ROC threshold are undefined; evaluate more cases or leave those findings out of the predictions"
        )


def evaluate(
    probabilities: np.ndarray,
    labels: np.ndarray,
    names: Sequence[str] = CT_RATE_ABNORMALITIES,
    n_bootstrap: int = 1000,
    seed: int = 0,
    progress: bool = True,
) -> Evaluation:
    """The paper's table for (cases, findings) probabilities and 0/1 labels."""
    probabilities, labels = np.asarray(probabilities, dtype=np.float64), np.asarray(labels)
    check_inputs(probabilities, labels, names)
    if n_bootstrap < 1:
        raise EvaluationError(f"bootstrap resamples must be at least 1 (the paper uses 1000), got {n_bootstrap}")
    thresholds = np.array([choose_threshold(probabilities[:, j], labels[:, j]) for j in range(len(names))])
    point = threshold_metrics(probabilities, labels, thresholds)
    resampled = np.empty((n_bootstrap, len(names), len(METRICS)))
    rng = np.random.default_rng(seed)
    for b in tqdm(range(n_bootstrap), desc="bootstrap", unit="resample", file=sys.stderr, disable=not progress or None):
        cases = rng.integers(0, len(labels), len(labels))
        resampled[b] = threshold_metrics(probabilities[cases], labels[cases], thresholds)
    resampled_mean = np.nanmean(resampled, axis=1)
    findings = [
        FindingResult(name, float(thresholds[j]), int(labels[:, j].sum()), estimates(point[j], resampled[:, j]))
        for j, name in enumerate(names)
    ]
    return Evaluation(findings, estimates(point.mean(axis=0), resampled_mean), len(labels), n_bootstrap, seed)


def estimates(values: np.ndarray, resampled: np.ndarray) -> dict[str, Estimate]:
    """Metric name -> Estimate from the point values (metrics,) and the resamples (n_bootstrap, metrics)."""
    return {
        metric: Estimate(float(values[k]), *reference_interval(resampled[:, k])) for k, metric in enumerate(METRICS)
    }


def format_evaluation(evaluation: Evaluation) -> str:
    """The table: one line per finding, then the mean, each metric as value [lower, upper]."""
    header = f"{'finding':36} {'thr':>5} {'pos':>5}" + "".join(f" {m:>21}" for m in METRICS)
    rows = [header]
    for finding in evaluation.findings:
        rows.append(f"{finding.name:36} {finding.threshold:5.3f} {finding.positives:5d}" + cells(finding.metrics))
    rows.append(f"{'mean':36} {'':5} {'':5}" + cells(evaluation.mean))
    rows.append(
        f"{evaluation.n_cases} cases; 95% intervals from {evaluation.n_bootstrap} bootstrap resamples "
        f"(seed {evaluation.seed})"
    )
    return "\n".join(rows)


def cells(metrics: dict[str, Estimate]) -> str:
    return "".join(f" {e.value:5.3f} [{e.lower:5.3f}, {e.upper:5.3f}]" for e in (metrics[m] for m in METRICS))


def evaluation_rows(evaluation: Evaluation) -> list[dict]:
    """Flat rows (per finding, then 'mean') for a CSV."""
    rows = []
    for name, threshold, positives, metrics in [
        *((f.name, f.threshold, f.positives, f.metrics) for f in evaluation.findings),
        ("mean", "", "", evaluation.mean),
    ]:
        row = {"finding": name, "threshold": threshold, "positives": positives}
        for metric, estimate in metrics.items():
            row.update({metric: estimate.value, f"{metric}_lower": estimate.lower, f"{metric}_upper": estimate.upper})
        rows.append(row)
    return rows


# --- reading predictions and labels ---------------------------------------------------------------------------


@dataclass
class CaseTable:
    """Case ids and a (cases, findings) matrix, with the findings in CT-CLIP's order."""

    ids: list[str]
    names: list[str]
    values: np.ndarray
    source: Path


def read_csv_table(path: Path) -> CaseTable:
    """A CSV with a case-id column (the first column that is not a finding) and finding columns."""
    header, rows = read_csv_rows(path, EvaluationError)
    if not rows:
        raise EvaluationError(f"{path} has a header but no cases")
    columns = finding_columns(header, path, EvaluationError)
    id_columns = [column for column in header if finding_for_column(column) is None]
    if not columns or not id_columns:
        raise EvaluationError(f"{path}: expected a case-id column and finding columns (CT-RATE names); got {header}")
    names = [name for name in CT_RATE_ABNORMALITIES if name in columns]
    values = number_matrix(rows, [columns[name] for name in names], path, EvaluationError)
    return CaseTable([case_id(row[id_columns[0]] or "") for row in rows], names, values, path)


def read_npz_table(path: Path) -> CaseTable:
    """CT-CLIP's own output (`predicted_weights.npz` / `labels_weights.npz`): 'data' (cases, 18), rows in order."""
    try:
        with np.load(path, allow_pickle=False) as arrays:
            values = np.asarray(arrays["data"], dtype=np.float64)
    except (OSError, ValueError, KeyError) as error:
        raise EvaluationError(f"{path}: not an .npz with a 'data' array ({error})") from None
    if values.ndim != 2 or values.shape[1] != len(CT_RATE_ABNORMALITIES):
        raise EvaluationError(f"{path}: 'data' has shape {values.shape}; (cases, 18) in CT-CLIP's order is expected")
    return CaseTable([f"row {i}" for i in range(len(values))], list(CT_RATE_ABNORMALITIES), values, path)


def detection_probabilities(record: dict, where: str) -> dict[str, float]:
    """{finding: probability} from {finding: p} or a `ctfoundation detect --out` result."""
    if not isinstance(record, dict):
        raise EvaluationError(f"{where}: expected a JSON object, got {type(record).__name__}")
    findings = record.get("detection", {}).get("findings") if isinstance(record.get("detection"), dict) else None
    if isinstance(findings, list):
        record = {f.get("name"): f.get("probability") for f in findings if isinstance(f, dict)}
    table = {finding_for_column(str(key)): value for key, value in record.items()}
    if None in table or not table or not all(isinstance(v, (int, float)) for v in table.values()):
        raise EvaluationError(f"{where}: expected {{finding: probability}} with CT-RATE names or a detect result")
    return {name: float(value) for name, value in table.items()}


def read_json_table(records: dict[str, object], source: Path) -> CaseTable:
    """Cases from {case id: {finding: p} or detect result}; every case must give the same findings."""
    per_case = {
        case_id(key): detection_probabilities(value, f"{source}: case {key!r}") for key, value in records.items()
    }
    names = [name for name in CT_RATE_ABNORMALITIES if name in next(iter(per_case.values()))]
    uneven = [key for key, probs in per_case.items() if sorted(probs) != sorted(names)]
    if uneven:
        raise EvaluationError(f"{source}: case {uneven[0]!r} has other findings than the first case; "
                              "give the same ones")
    values = np.array([[probs[name] for name in names] for probs in per_case.values()])
    return CaseTable(list(per_case), names, values, source)


def load_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise EvaluationError(f"{path} cannot be read as JSON ({error})") from None


def read_predictions(path: Path) -> CaseTable:
    """Probabilities from a CSV, a JSON {case: ...}, a folder of `ctfoundation detect --out` JSONs, or CT-CLIP's npz."""
    if path.is_dir():
        files = sorted(path.glob("*.json"))
        if not files:
            raise EvaluationError(f"{path}: no *.json detection results in this folder")
        return read_json_table({case_id(f.name): load_json(f) for f in files}, path)
    if path.suffix.lower() == ".json":
        records = load_json(path)
        if not isinstance(records, dict) or not records:
            raise EvaluationError(f"{path}: expected a JSON object {{case id: {{finding: probability}}}}")
        return read_json_table(records, path)
    return read_npz_table(path) if path.suffix.lower() == ".npz" else read_csv_table(path)


def read_labels(path: Path) -> CaseTable:
    """0/1 labels from a CSV (e.g. CT-RATE's labels file: VolumeName + 18 columns) or CT-CLIP's labels npz."""
    table = read_npz_table(path) if path.suffix.lower() == ".npz" else read_csv_table(path)
    if not np.isin(table.values, (0, 1)).all():
        raise EvaluationError(f"{path}: labels must be 0 or 1")
    return table


def align(predictions: CaseTable, labels: CaseTable) -> tuple[np.ndarray, np.ndarray, list[str], int]:
    """(probabilities, labels, finding names, predicted cases without a label) for the cases both files hold."""
    missing = [name for name in predictions.names if name not in labels.names]
    if missing:
        raise EvaluationError(f"{labels.source} has no label column for {missing}")
    for table in (predictions, labels):
        if len(set(table.ids)) != len(table.ids):
            raise EvaluationError(f"{table.source}: case ids repeat; each case must appear once")
    row_of = {case: i for i, case in enumerate(labels.ids)}
    shared = [i for i, case in enumerate(predictions.ids) if case in row_of]
    if not shared:
        raise EvaluationError(
            f"no case of {predictions.source} is in {labels.source} (e.g. {predictions.ids[0]!r} vs {labels.ids[0]!r})"
        )
    label_rows = [row_of[predictions.ids[i]] for i in shared]
    columns = [labels.names.index(name) for name in predictions.names]
    unlabelled = len(predictions.ids) - len(shared)
    truth = labels.values[np.ix_(label_rows, columns)].astype(np.int64)
    return predictions.values[shared], truth, predictions.names, unlabelled
