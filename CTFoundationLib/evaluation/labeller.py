"""Report labeller: the 18 CT-RATE findings (0/1) of free-text chest-CT reports.

Method (what CT-CLIP's RadBERT text classifier does, made small): the report is cut into clauses (sentences,
';', quotes, 'but', 'however', ...). In a clause with a negation cue ("no", "not", "without", "absent", ...)
every word is marked `neg_`, so "no pleural effusion" and "pleural effusion" are different features.
The features are the word 1-2-grams the marked text holds (0/1 times idf), leaving out those in more than 30% of
the training reports (template wording such as "the trachea is open"); one L1-regularised, class-balanced logistic
regression per finding (scikit-learn) scores them, and a finding is present when its probability is above 0.5.
Features neither scaled by report length nor drawn from the template keep a short report ("Bilateral pleural
effusion.") scored as its words say: unit-length TF-IDF gave its "effusion" 5-7 times the weight it has in a full
report, enough to call it a pericardial effusion.

The labeller is trained on first use from CT-CLIP's 800 hand-labelled reports (`text_classifier/data/
train.csv`, CC BY-NC-SA, so never shipped) and cached as one `.npz` of arrays (no pickle).
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import sklearn
from scipy.special import expit
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import precision_recall_fscore_support
from sklearn.model_selection import train_test_split
from tqdm import tqdm

from CTFoundationLib.errors import ReportLabelError
from CTFoundationLib.io.files import atomic_write, sha256_file
from CTFoundationLib.io.tables import (
    REPORT_TEXT_COLUMN,
    binary_matrix,
    finding_columns,
    read_csv_rows,
    require_columns,
    write_csv,
)
from CTFoundationLib.resources import shared_data_root
from CTFoundationLib.vocab import CT_RATE_ABNORMALITIES
from CTFoundationLib.weights.cache import cache_root, now_iso

LABELLER_FORMAT = "ctfoundation-report-labeller-2"
TEXT_COLUMN = REPORT_TEXT_COLUMN
TRAINING_CSV = Path("reports") / "ctclip_text_classifier" / "train.csv"  # under the shared data folder
NEGATION_CUES = re.compile(
    r"\b(?:no|not|none|without|absent|neither|nor|free of|negative for|ruled out|rule out|unremarkable)\b|n't",
    re.IGNORECASE,
)
CLAUSE_BREAKS = re.compile(r"(?<=[.!?;:])\s+|\"+|\n+|\s*\u2022\s*|\b(?:but|however|whereas|except|although)\b", re.I)
WORD = re.compile(r"[a-z]+")
NEGATED = "neg_"


@dataclass(frozen=True)
class LabellerSettings:
    """How a labeller is trained; stored with it."""

    max_ngram: int = 2
    min_df: int = 2
    max_df: float = 0.3  # n-grams in more of the training reports are template wording, not findings
    inverse_regularisation: float = 0.5  # LogisticRegression C; 0.2-1 cross-validate alike, 0.5 labels short text best
    threshold: float = 0.5


def mark_negation(report: str) -> str:
    """Lower-case words of the report, clause by clause; words of a clause holding a negation cue get `neg_`."""
    clauses = []
    for clause in CLAUSE_BREAKS.split(report):
        words = WORD.findall(clause.lower())
        if words:
            prefix = NEGATED if NEGATION_CUES.search(clause) else ""
            clauses.append(" ".join(prefix + word for word in words))
    return " . ".join(clauses)


def l1_logistic_regression(settings: LabellerSettings) -> LogisticRegression:
    """Class-balanced L1 logistic regression (scikit-learn 1.8 renamed penalty='l1' to l1_ratio=1)."""
    version = tuple(int(part) for part in re.findall(r"\d+", sklearn.__version__)[:2])
    penalty = {"l1_ratio": 1.0} if version >= (1, 8) else {"penalty": "l1"}
    return LogisticRegression(
        C=settings.inverse_regularisation,
        class_weight="balanced",
        solver="liblinear",
        max_iter=5000,
        random_state=0,
        **penalty,
    )


def make_vectorizer(settings: LabellerSettings, vocabulary: Sequence[str] | None = None) -> TfidfVectorizer:
    """Presence (0/1) times idf of the n-grams of marked report text, not normalised by the report's length;
    with `vocabulary` it is the fixed vocabulary of a trained labeller."""
    return TfidfVectorizer(
        token_pattern=r"[a-z_]+",
        lowercase=False,
        ngram_range=(1, settings.max_ngram),
        min_df=settings.min_df,
        max_df=settings.max_df,
        binary=True,
        norm=None,
        vocabulary=vocabulary,
    )


class ReportLabeller:
    """A trained labeller: TF-IDF vocabulary and idf, and one linear model per CT-RATE finding."""

    def __init__(
        self,
        vocabulary: Sequence[str],
        idf: np.ndarray,
        coef: np.ndarray,
        intercept: np.ndarray,
        settings: LabellerSettings,
        provenance: dict,
    ) -> None:
        self.vectorizer = make_vectorizer(settings, list(vocabulary))
        self.vectorizer.idf_ = np.asarray(idf, dtype=np.float64)
        self.coef = np.asarray(coef, dtype=np.float64)  # (findings, vocabulary)
        self.intercept = np.asarray(intercept, dtype=np.float64)  # (findings,)
        self.settings = settings
        self.provenance = provenance

    @classmethod
    def fit(
        cls,
        reports: Sequence[str],
        labels: np.ndarray,
        settings: LabellerSettings = LabellerSettings(),
        provenance: dict | None = None,
    ) -> ReportLabeller:
        """Train on reports and their (n, 18) 0/1 labels in CT-CLIP's finding order."""
        labels = np.asarray(labels)
        absent = [name for name, column in zip(CT_RATE_ABNORMALITIES, labels.T) if column.min() == column.max()]
        if absent:
            raise ReportLabelError(f"cannot train the labeller: {absent} are all 0 or all 1 in the training reports")
        vectorizer = make_vectorizer(settings)
        features = vectorizer.fit_transform([mark_negation(text) for text in reports])
        models = [
            l1_logistic_regression(settings).fit(features, labels[:, j])
            for j in tqdm(range(labels.shape[1]), desc="labeller", unit="finding", file=sys.stderr, disable=None)
        ]
        coef = np.concatenate([model.coef_ for model in models])
        intercept = np.concatenate([model.intercept_ for model in models])
        record = {"n_reports": len(reports), "positives": dict(zip(CT_RATE_ABNORMALITIES, map(int, labels.sum(0))))}
        record.update(provenance or {}, trained_at=now_iso(), scikit_learn=sklearn.__version__)
        return cls(vectorizer.get_feature_names_out(), vectorizer.idf_, coef, intercept, settings, record)

    def probabilities(self, reports: Sequence[str]) -> np.ndarray:
        """(n, 18) probability that each finding is reported present; 0 for a report without words."""
        progress = tqdm(reports, desc="labelling", unit="report", file=sys.stderr, disable=len(reports) < 1000 or None)
        marked = [mark_negation(text or "") for text in progress]
        scores = expit(self.vectorizer.transform(marked) @ self.coef.T + self.intercept)
        scores[[not text for text in marked]] = 0.0
        return scores

    def labels(self, reports: Sequence[str]) -> np.ndarray:
        """(n, 18) 0/1 findings in CT-CLIP's order."""
        return (self.probabilities(reports) > self.settings.threshold).astype(np.int64)

    def save(self, path: Path) -> None:
        """Write one compressed .npz of arrays (the metadata as JSON text), through a temporary file."""
        metadata = {"format": LABELLER_FORMAT, "settings": asdict(self.settings), "provenance": self.provenance}
        with atomic_write(path, "wb") as handle:
            np.savez_compressed(
                handle,
                findings=np.array(CT_RATE_ABNORMALITIES),
                vocabulary=np.array(self.vectorizer.get_feature_names_out(), dtype=str),
                idf=self.vectorizer.idf_,
                coef=self.coef,
                intercept=self.intercept,
                metadata=np.array(json.dumps(metadata)),
            )

    @classmethod
    def load(cls, path: Path) -> ReportLabeller:
        """Read a labeller written by `save`; a damaged or foreign file is an error that names it."""
        try:
            with np.load(path, allow_pickle=False) as arrays:
                metadata = json.loads(str(arrays["metadata"]))
                parts = {key: arrays[key] for key in ("findings", "vocabulary", "idf", "coef", "intercept")}
        except FileNotFoundError:
            raise ReportLabelError(f"labeller file {path} does not exist") from None
        except (OSError, ValueError, KeyError) as error:
            raise ReportLabelError(f"labeller file {path} is damaged ({error}); delete it and run again") from None
        if metadata.get("format") != LABELLER_FORMAT or tuple(parts["findings"]) != CT_RATE_ABNORMALITIES:
            raise ReportLabelError(f"{path} is not a {LABELLER_FORMAT} file; delete it and run again")
        settings = LabellerSettings(**metadata["settings"])
        arrays = (parts["vocabulary"], parts["idf"], parts["coef"], parts["intercept"])
        return cls(*arrays, settings, metadata["provenance"])


def read_labelled_reports(path: Path) -> tuple[list[str], np.ndarray]:
    """Reports and (n, 18) expert labels from a CSV with `report_text` and the 18 finding columns."""
    header, rows = read_csv_rows(path, ReportLabelError)
    require_columns(header, [TEXT_COLUMN], path, ReportLabelError)
    columns = finding_columns(header, path, ReportLabelError)
    missing = [name for name in CT_RATE_ABNORMALITIES if name not in columns]
    if missing:
        raise ReportLabelError(f"{path}: no label column for {missing}; a column per CT-RATE finding is needed")
    if not rows:
        raise ReportLabelError(f"{path} has a header but no reports")
    labels = binary_matrix(rows, [columns[name] for name in CT_RATE_ABNORMALITIES], path, ReportLabelError)
    return [row[TEXT_COLUMN] or "" for row in rows], labels


def split_indices(count: int, test_fraction: float = 0.25, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Fixed seeded (train, held-out) split of `count` reports."""
    return train_test_split(np.arange(count), test_size=test_fraction, random_state=seed)


def label_agreement(truth: np.ndarray, predicted: np.ndarray) -> dict:
    """Per-finding precision, recall, F1, support of predicted vs expert labels, and macro/micro means."""
    per_finding = precision_recall_fscore_support(truth, predicted, average=None, zero_division=0)
    rows = {
        name: dict(zip(("precision", "recall", "f1", "support"), map(float, values)))
        for name, values in zip(CT_RATE_ABNORMALITIES, zip(*per_finding))
    }
    summary = {
        average: dict(zip(("precision", "recall", "f1"), map(float, precision_recall_fscore_support(
            truth, predicted, average=average, zero_division=0)[:3])))
        for average in ("macro", "micro", "weighted")
    }
    return {"findings": rows, "averages": summary, "n_reports": int(len(truth))}


def format_agreement(agreement: dict) -> str:
    """The per-finding table of `label_agreement`, then its averages."""
    lines = [f"{'finding':36} {'precision':>9} {'recall':>7} {'F1':>6} {'support':>8}"]
    for name, row in agreement["findings"].items():
        lines.append(f"{name:36} {row['precision']:9.3f} {row['recall']:7.3f} {row['f1']:6.3f} {row['support']:8.0f}")
    for average, row in agreement["averages"].items():
        lines.append(f"{average + ' average':36} {row['precision']:9.3f} {row['recall']:7.3f} {row['f1']:6.3f}")
    return "\n".join(lines)


def default_training_csv() -> Path:
    """CT-CLIP's hand-labelled reports in the shared data folder: $CTFOUNDATION_DATA, else ../shared/data."""
    return shared_data_root() / TRAINING_CSV


def cached_labeller_path(home: Path | str | None = None) -> Path:
    return cache_root(home) / "labeller" / f"{LABELLER_FORMAT}.npz"


def train_labeller(train_csv: Path, settings: LabellerSettings = LabellerSettings()) -> ReportLabeller:
    """A labeller trained on every report of a labelled CSV."""
    reports, labels = read_labelled_reports(train_csv)
    provenance = {"training_csv": str(train_csv), "sha256": sha256_file(train_csv)}
    return ReportLabeller.fit(reports, labels, settings, provenance)


def load_or_train(train_csv: Path | None = None, home: Path | str | None = None) -> ReportLabeller:
    """The cached labeller; trained (and cached) on first use, or again when `train_csv` is another file."""
    if train_csv is not None and not train_csv.is_file():
        raise ReportLabelError(f"--train-csv {train_csv}: no such file; give a CSV with report_text and the 18 "
                               "finding columns")
    path = cached_labeller_path(home)
    if path.is_file():
        labeller = ReportLabeller.load(path)
        if train_csv is None or labeller.provenance.get("sha256") == sha256_file(train_csv):
            return labeller
    source = train_csv or default_training_csv()
    if not source.is_file():
        raise ReportLabelError(
            f"no trained report labeller at {path} and no training reports at {source}; pass --train-csv with "
            "CT-CLIP's hand-labelled text_classifier/data/train.csv (report_text + the 18 finding columns)"
        )
    print(f"training the report labeller on {source} (once; cached at {path})", file=sys.stderr)
    labeller = train_labeller(source)
    labeller.save(path)
    return labeller


def read_report_csv(source: Path, text_column: str = TEXT_COLUMN) -> tuple[list[str], list[dict[str, str]]]:
    """(header, rows) of a CSV of reports to label: it needs `text_column` and must not hold finding columns yet."""
    header, rows = read_csv_rows(source, ReportLabelError)
    require_columns(header, [text_column], source, ReportLabelError)
    clashes = finding_columns(header, source, ReportLabelError)
    if clashes:
        raise ReportLabelError(
            f"{source} already has finding columns {sorted(clashes.values())}; drop or rename them first"
        )
    return header, rows


def write_labelled_csv(destination: Path, header: Sequence[str], rows: Sequence[dict], labels: np.ndarray) -> None:
    """Write the rows with the 18 finding columns (0/1, CT-CLIP's names and order) added."""
    labelled = [{**row, **dict(zip(CT_RATE_ABNORMALITIES, map(str, values)))} for row, values in zip(rows, labels)]
    write_csv(destination, list(header) + list(CT_RATE_ABNORMALITIES), labelled, ReportLabelError)
