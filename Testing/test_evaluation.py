"""CT-CLIP's evaluation protocol: hand-checked tiny cases, bootstrap behaviour, file inputs, and real labels."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO_ROOT, data_root
from sklearn.metrics import accuracy_score, f1_score, precision_score, roc_auc_score

from CTFoundationLib.errors import EvaluationError
from CTFoundationLib.evaluation.ctclip import (
    THRESHOLD_GRID,
    align,
    auroc,
    choose_threshold,
    evaluate,
    read_labels,
    read_predictions,
    reference_interval,
    threshold_metrics,
)
from CTFoundationLib.evaluation.labeller import ReportLabeller, read_labelled_reports, split_indices
from CTFoundationLib.vocab import CT_RATE_ABNORMALITIES

TRAIN_CSV = data_root() / "reports" / "ctclip_text_classifier" / "train.csv"


def synthetic(cases: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels with about 30% positives and probabilities that rank them imperfectly (AUROC about 0.8)."""
    rng = np.random.default_rng(seed)
    labels = (rng.random((cases, 18)) < 0.3).astype(np.int64)
    return np.clip(0.25 * labels + 0.75 * rng.random((cases, 18)), 0, 1), labels


def test_auroc_of_a_known_case_and_of_ties():
    np.testing.assert_allclose(auroc(np.array([[0.1], [0.4], [0.35], [0.8]]), np.array([[0], [0], [1], [1]])), [0.75])
    np.testing.assert_allclose(auroc(np.array([[0.5], [0.5]]), np.array([[0], [1]])), [0.5])
    assert np.isnan(auroc(np.array([[0.2], [0.9]]), np.array([[1], [1]]))[0])


def test_auroc_equals_scikit_learn_with_ties():
    probabilities, labels = synthetic(150, seed=3)
    probabilities = np.round(probabilities, 1)  # many ties
    expected = [roc_auc_score(labels[:, j], probabilities[:, j]) for j in range(18)]
    np.testing.assert_allclose(auroc(probabilities, labels), expected, rtol=0, atol=1e-12)


def test_threshold_is_the_last_grid_value_nearest_the_roc_corner():
    # Separable: every threshold in [0.2, 0.6) reaches the corner; the reference keeps the last, 59/99.
    assert choose_threshold(np.array([0.1, 0.2, 0.6, 0.7]), np.array([0, 0, 1, 1])) == pytest.approx(59 / 99)
    # Not separable: (TPR 1, FPR .5) for t in [0.1, 0.35) and (TPR .5, FPR 0) for t in [0.4, 0.8) are both 0.5
    # from the corner; the tie goes to the larger threshold, 79/99.
    assert choose_threshold(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == pytest.approx(79 / 99)
    assert set(np.round(THRESHOLD_GRID * 99, 9)) == set(range(100))


def test_weighted_f1_accuracy_precision_by_hand():
    # Calls at 0.5: [1, 0, 1, 0, 0] against labels [1, 1, 0, 0, 0]: TP 1, FN 1, FP 1, TN 2.
    probabilities = np.array([[0.9], [0.2], [0.7], [0.1], [0.3]])
    labels = np.array([[1], [1], [0], [0], [0]])
    _, weighted_f1, accuracy, precision = threshold_metrics(probabilities, labels, np.array([0.5]))[0]
    # F1 positive 1/2 (support 2), negative 2/3 (support 3): weighted (1 + 2) / 5; binary would be 0.5.
    assert weighted_f1 == pytest.approx(0.6)
    assert accuracy == pytest.approx(0.6)
    assert precision == pytest.approx(0.5)


def test_metrics_equal_the_reference_scikit_learn_calls():
    probabilities, labels = synthetic(120, seed=4)
    labels[:, 5] = 0
    labels[:3, 5] = 1  # a rare finding
    thresholds = np.array([choose_threshold(probabilities[:, j], labels[:, j]) for j in range(18)])
    ours = threshold_metrics(probabilities, labels, thresholds)
    for j in range(18):
        called = probabilities[:, j] > thresholds[j]
        assert ours[j, 1] == pytest.approx(f1_score(labels[:, j], called, average="weighted"))
        assert ours[j, 2] == pytest.approx(accuracy_score(labels[:, j], called))
        assert ours[j, 3] == pytest.approx(precision_score(labels[:, j], called, zero_division=0))


def test_interval_uses_the_reference_order_statistics():
    values = np.random.default_rng(0).permutation(1000).astype(float)
    assert reference_interval(values) == (24.0, 974.0)
    assert reference_interval(np.r_[values, np.nan]) == (24.0, 974.0)
    assert reference_interval(np.arange(2000.0)) == (49.0, 1949.0)


def test_bootstrap_interval_holds_the_estimate_and_narrows_with_more_cases():
    small = evaluate(*synthetic(80, seed=1), n_bootstrap=300, progress=False)
    large = evaluate(*synthetic(800, seed=1), n_bootstrap=300, progress=False)
    for result in (small, large):
        for metrics in [f.metrics for f in result.findings] + [result.mean]:
            for estimate in metrics.values():
                assert estimate.lower <= estimate.value <= estimate.upper
    for metric in ("auroc", "f1_weighted", "accuracy"):
        width = {name: r.mean[metric].upper - r.mean[metric].lower for name, r in (("small", small), ("large", large))}
        assert width["large"] < 0.6 * width["small"], (metric, width)
    assert 0.7 < large.mean["auroc"].value < 0.9


def test_fixed_seed_reproduces_and_another_seed_resamples_differently():
    probabilities, labels = synthetic(60, seed=2)
    first = evaluate(probabilities, labels, n_bootstrap=100, seed=7, progress=False).to_dict()
    again = evaluate(probabilities, labels, n_bootstrap=100, seed=7, progress=False).to_dict()
    other = evaluate(probabilities, labels, n_bootstrap=100, seed=8, progress=False).to_dict()
    assert first == again
    assert other["mean"]["auroc"]["value"] == first["mean"]["auroc"]["value"]
    assert other["mean"]["auroc"]["lower"] != first["mean"]["auroc"]["lower"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda p, y: (p * 1.5, y), "probabilities in \\[0, 1\\]"),
        (lambda p, y: (p, y * 2), "0 or 1"),
        (lambda p, y: (p, np.where(np.arange(18) == 2, 0, y)), "Cardiomegaly"),
        (lambda p, y: (p[:, :17], y), "must both be"),
    ],
)
def test_unusable_inputs_are_clear_errors(change, message):
    with pytest.raises(EvaluationError, match=message):
        evaluate(*change(*synthetic(30, seed=5)), n_bootstrap=10, progress=False)


def test_zero_resamples_is_refused():
    with pytest.raises(EvaluationError, match="at least 1"):
        evaluate(*synthetic(30, seed=5), n_bootstrap=0, progress=False)


def write_table(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([header, *rows])
    return path


def test_csv_json_folder_and_npz_predictions_align_with_labels(tmp_path):
    probabilities, labels = synthetic(6, seed=6)
    names = list(CT_RATE_ABNORMALITIES)
    ids = [f"valid_{i}_a_1" for i in range(6)]
    label_rows = [[f"{case}.nii.gz", *y] for case, y in zip(ids, labels)]
    label_csv = write_table(tmp_path / "labels.csv", ["VolumeName", *names], label_rows)
    # Predictions in another order, one case without a label.
    order = [3, 0, 5, 1]
    rows = [[ids[i], *probabilities[i]] for i in order] + [["unlabelled_case", *probabilities[0]]]
    prediction_csv = write_table(tmp_path / "pred.csv", ["case", *names], rows)
    folder = tmp_path / "detect"
    folder.mkdir()
    for i in order:
        findings = [{"name": n, "probability": float(p), "positive": None} for n, p in zip(names, probabilities[i])]
        (folder / f"{ids[i]}.json").write_text(json.dumps({"input": {}, "detection": {"findings": findings}}))
    mapping = tmp_path / "pred.json"
    mapping.write_text(json.dumps({f"{ids[i]}.nii.gz": dict(zip(names, probabilities[i])) for i in order}))

    for source, unlabelled_expected in ((prediction_csv, 1), (folder, 0), (mapping, 0)):
        predicted, truth, found_names, unlabelled = align(read_predictions(source), read_labels(label_csv))
        assert found_names == names and unlabelled == unlabelled_expected
        by_case = dict(zip(map(tuple, predicted), map(tuple, truth)))
        assert by_case == {tuple(probabilities[i]): tuple(labels[i]) for i in order}

    np.savez(tmp_path / "predicted_weights.npz", data=probabilities)
    np.savez(tmp_path / "labels_weights.npz", data=labels)
    predicted, truth, _, _ = align(
        read_predictions(tmp_path / "predicted_weights.npz"), read_labels(tmp_path / "labels_weights.npz")
    )
    np.testing.assert_array_equal(predicted, probabilities)
    np.testing.assert_array_equal(truth, labels)


def test_file_problems_name_the_file(tmp_path):
    names = list(CT_RATE_ABNORMALITIES)
    labels = write_table(tmp_path / "labels.csv", ["VolumeName", *names[:17]], [["a", *[0] * 17]])
    prediction = write_table(tmp_path / "pred.csv", ["VolumeName", *names], [["b", *[0.5] * 18]])
    with pytest.raises(EvaluationError, match="no label column for \\['Interlobular septal thickening'\\]"):
        align(read_predictions(prediction), read_labels(labels))
    labels = write_table(tmp_path / "labels.csv", ["VolumeName", *names], [["a", *[0] * 18]])
    with pytest.raises(EvaluationError, match="no case of .*pred.csv"):
        align(read_predictions(prediction), read_labels(labels))
    bad = write_table(tmp_path / "bad.csv", ["VolumeName", *names], [["a", "high", *[0.5] * 17]])
    with pytest.raises(EvaluationError, match="bad.csv, line 2, column 'Medical material': 'high' is not a number"):
        read_predictions(bad)
    (tmp_path / "x.json").write_text("[1, 2]")
    with pytest.raises(EvaluationError, match="x.json"):
        read_predictions(tmp_path / "x.json")


@pytest.fixture(scope="module")
def held_out_predictions(tmp_path_factory) -> tuple[Path, np.ndarray, np.ndarray]:
    """The labeller's probabilities for the 200 held-out reports, as a CSV keyed by AccessionNo."""
    texts, labels = read_labelled_reports(TRAIN_CSV)
    train, held_out = split_indices(len(texts))
    labeller = ReportLabeller.fit([texts[i] for i in train], labels[train])
    probabilities = labeller.probabilities([texts[i] for i in held_out])
    with open(TRAIN_CSV, newline="", encoding="utf-8") as handle:
        accessions = [row["AccessionNo"] for row in csv.DictReader(handle)]
    path = tmp_path_factory.mktemp("eval") / "labeller_probabilities.csv"
    rows = [[accessions[i], *p] for i, p in zip(held_out, probabilities)]
    write_table(path, ["AccessionNo", *CT_RATE_ABNORMALITIES], rows)
    return path, probabilities, labels[held_out]


def test_real_labels_labeller_probabilities_against_expert_labels(held_out_predictions):
    path, probabilities, labels = held_out_predictions
    # The expert label file itself (AccessionNo, report_text, 18 columns) is the labels input.
    predicted, truth, names, unlabelled = align(read_predictions(path), read_labels(TRAIN_CSV))
    assert (len(predicted), unlabelled, names) == (200, 0, list(CT_RATE_ABNORMALITIES))
    np.testing.assert_array_equal(truth, labels)
    result = evaluate(predicted, truth, names, n_bootstrap=200, progress=False)
    aurocs = {f.name: f.metrics["auroc"].value for f in result.findings}
    assert result.mean["auroc"].value >= 0.95 and min(aurocs.values()) >= 0.85, aurocs
    assert result.mean["f1_weighted"].value >= 0.9
    assert all(f.threshold in THRESHOLD_GRID for f in result.findings)
    assert result.mean["auroc"].lower <= result.mean["auroc"].value <= result.mean["auroc"].upper


def load_script():
    spec = importlib.util.spec_from_file_location("evaluate_script", REPO_ROOT / "training" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_evaluate_script_prints_the_table_and_writes_json_and_csv(held_out_predictions, tmp_path, capsys):
    path, _, _ = held_out_predictions
    script = load_script()
    out_json, out_csv = tmp_path / "result.json", tmp_path / "result.csv"
    argv = [str(path), str(TRAIN_CSV), "--bootstrap", "50", "--json", str(out_json), "--csv", str(out_csv)]
    assert script.main(argv) == 0
    printed = capsys.readouterr().out
    result = json.loads(out_json.read_text())
    assert f"mean AUROC: {result['mean']['auroc']['value']:.3f}" in printed
    assert [f["name"] for f in result["findings"]] == list(CT_RATE_ABNORMALITIES)
    with open(out_csv, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["finding"] for row in rows] == [*CT_RATE_ABNORMALITIES, "mean"]
    assert float(rows[-1]["auroc"]) == pytest.approx(result["mean"]["auroc"]["value"])

    assert script.main([str(tmp_path / "missing.csv"), str(TRAIN_CSV)]) == 2
    assert "missing.csv: no such file" in capsys.readouterr().err


def test_a_subset_of_findings_is_evaluated_alone():
    probabilities, labels = synthetic(50, seed=9)
    result = evaluate(probabilities[:, 2:3], labels[:, 2:3], ["Cardiomegaly"], n_bootstrap=20, progress=False)
    assert [f.name for f in result.findings] == ["Cardiomegaly"]
    assert result.mean["auroc"].value == pytest.approx(roc_auc_score(labels[:, 2], probabilities[:, 2]))
