"""Report labeller on CT-CLIP's 800 hand-labelled CT-RATE reports: held-out F1, storage, CLI, errors."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO_ROOT, data_root

from CTFoundationLib.cli import main
from CTFoundationLib.errors import ReportLabelError
from CTFoundationLib.evaluation.labeller import (
    ReportLabeller,
    cached_labeller_path,
    format_agreement,
    label_agreement,
    mark_negation,
    read_labelled_reports,
    split_indices,
)
from CTFoundationLib.vocab import CT_RATE_ABNORMALITIES

TRAIN_CSV = data_root() / "reports" / "ctclip_text_classifier" / "train.csv"


@pytest.fixture(scope="module")
def reports() -> tuple[list[str], np.ndarray]:
    if not TRAIN_CSV.is_file():
        pytest.fail(f"CT-CLIP's labelled reports not found at {TRAIN_CSV}; set CTFOUNDATION_DATA")
    return read_labelled_reports(TRAIN_CSV)


@pytest.fixture(scope="module")
def split(reports) -> tuple[np.ndarray, np.ndarray]:
    return split_indices(len(reports[0]))


@pytest.fixture(scope="module")
def held_out_labeller(reports, split) -> ReportLabeller:
    texts, labels = reports
    train, _ = split
    return ReportLabeller.fit([texts[i] for i in train], labels[train])


def write_rows(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_negation_marks_the_clause_with_the_cue_only():
    marked = mark_negation("Pleural effusion was not observed. Atelectasis is seen; no nodule, but a mass is present.")
    clauses = marked.split(" . ")
    assert clauses[0] == "neg_pleural neg_effusion neg_was neg_not neg_observed"
    assert clauses[1] == "atelectasis is seen"
    assert clauses[2] == "neg_no neg_nodule"
    assert clauses[3] == "a mass is present"


def test_reading_labelled_reports_maps_all_18_columns(reports):
    texts, labels = reports
    assert len(texts) == 800 and labels.shape == (800, 18)
    # Counts of the file's own columns (Lung nodule the commonest, Pericardial effusion the rarest).
    assert labels[:, CT_RATE_ABNORMALITIES.index("Lung nodule")].sum() == 370
    assert labels[:, CT_RATE_ABNORMALITIES.index("Pericardial effusion")].sum() == 64
    assert "Pericardial effusion-thickening was not observed" in texts[0]


def test_held_out_f1_per_finding(reports, split, held_out_labeller):
    texts, labels = reports
    _, held_out = split
    assert len(held_out) == 200
    agreement = label_agreement(labels[held_out], held_out_labeller.labels([texts[i] for i in held_out]))
    print("\n" + format_agreement(agreement))
    f1 = {name: row["f1"] for name, row in agreement["findings"].items()}
    assert agreement["averages"]["macro"]["f1"] >= 0.90
    assert agreement["averages"]["micro"]["f1"] >= 0.90
    assert min(f1.values()) >= 0.75, f1
    assert sum(row["support"] for row in agreement["findings"].values()) == labels[held_out].sum()


def test_negated_and_affirmed_mentions_get_opposite_labels(held_out_labeller):
    affirmed, negated, empty = held_out_labeller.labels([
        "Bilateral pleural effusion is observed. There is cardiomegaly.",
        "Pleural effusion was not detected. Heart size is normal, no cardiomegaly.",
        "",
    ])
    for name in ("Pleural effusion", "Cardiomegaly"):
        index = CT_RATE_ABNORMALITIES.index(name)
        assert (affirmed[index], negated[index]) == (1, 0), name
    assert not empty.any()


@pytest.mark.parametrize(
    ("report", "present"),
    [
        ("Bilateral pleural effusion. Cardiomegaly is present.", {"Pleural effusion", "Cardiomegaly"}),
        ("Pericardial effusion is present.", {"Pericardial effusion"}),
        ("Bilateral pleural effusion.", {"Pleural effusion"}),
        ("Cardiomegaly and pericardial effusion are present.", {"Cardiomegaly", "Pericardial effusion"}),
        ("Minimal pericardial effusion. No pleural effusion.", {"Pericardial effusion"}),
        ("Cardiomegaly. No pleural or pericardial effusion.", {"Cardiomegaly"}),
    ],
)
def test_short_reports_get_the_effusion_they_name_and_nothing_else(held_out_labeller, report, present):
    """Training reports are long templates; a report of one or two sentences must not borrow their findings."""
    labelled = held_out_labeller.labels([report])[0]
    assert {name for name, value in zip(CT_RATE_ABNORMALITIES, labelled) if value} == present


def test_save_and_load_give_the_same_probabilities(held_out_labeller, reports, tmp_path):
    path = tmp_path / "labeller.npz"
    held_out_labeller.save(path)
    assert path.stat().st_size < 1_000_000
    with np.load(path, allow_pickle=False) as arrays:  # plain arrays: loads without pickle
        assert arrays["coef"].shape == (18, len(arrays["vocabulary"]))
    texts = reports[0][:40]
    restored = ReportLabeller.load(path)
    np.testing.assert_array_equal(restored.probabilities(texts), held_out_labeller.probabilities(texts))
    assert restored.provenance["n_reports"] == 600


def test_damaged_labeller_file_is_a_clear_error(tmp_path):
    path = tmp_path / "labeller.npz"
    path.write_bytes(b"not a zip file")
    with pytest.raises(ReportLabelError, match="damaged"):
        ReportLabeller.load(path)


def test_cli_trains_on_first_use_then_labels_held_out_reports(reports, split, tmp_path, monkeypatch, capsys):
    """The CLI path end to end: train on the 600 training reports, label the 200 held-out ones."""
    texts, labels = reports
    train, held_out = split
    monkeypatch.setenv("CTFOUNDATION_HOME", str(tmp_path / "home"))
    train_csv = write_rows(
        tmp_path / "train.csv",
        ["report_text", *CT_RATE_ABNORMALITIES],
        [[texts[i], *labels[i]] for i in train],
    )
    reports_csv = write_rows(
        tmp_path / "in.csv", ["AccessionNo", "report_text"], [[f"case_{i}", texts[i]] for i in held_out]
    )
    out = tmp_path / "out" / "labels.csv"

    assert main(["label-reports", str(reports_csv), "--out", str(out), "--train-csv", str(train_csv)]) == 0
    assert "training the report labeller" in capsys.readouterr().err
    with open(out, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
        header = list(rows[0])
    assert header == ["AccessionNo", "report_text", *CT_RATE_ABNORMALITIES]
    assert [row["AccessionNo"] for row in rows] == [f"case_{i}" for i in held_out]
    predicted = np.array([[int(row[name]) for name in CT_RATE_ABNORMALITIES] for row in rows])
    assert label_agreement(labels[held_out], predicted)["averages"]["macro"]["f1"] >= 0.90

    cached = cached_labeller_path()
    stamp = cached.stat().st_mtime_ns
    assert main(["label-reports", str(reports_csv), "--out", str(out), "--train-csv", str(train_csv)]) == 0
    assert "training" not in capsys.readouterr().err
    assert cached.stat().st_mtime_ns == stamp


def test_cli_missing_text_column_fails_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CTFOUNDATION_HOME", str(tmp_path / "home"))
    source = write_rows(tmp_path / "in.csv", ["AccessionNo", "Findings_EN"], [["a", "No effusion."]])
    assert main(["label-reports", str(source), "--out", str(tmp_path / "o.csv")]) == 2
    err = capsys.readouterr().err
    assert "missing column(s) ['report_text']" in err and "Findings_EN" in err and str(source) in err
    assert not cached_labeller_path().exists()
    assert main(["label-reports", str(source), "--out", str(tmp_path / "o.csv"), "--text-column", "Nope"]) == 2


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no such file"),
        (b"report_text\n\xff\xfe\x00broken", "not UTF-8"),
        (b"", "is empty"),
        (b'report_text\n"one","two"\n', "more fields than header columns"),
        (b"report_text,Cardiomegaly\nHeart enlarged.,1\n", "already has finding columns ['Cardiomegaly']"),
    ],
)
def test_cli_unusable_csv_is_one_clear_line(tmp_path, monkeypatch, capsys, content, message):
    monkeypatch.setenv("CTFOUNDATION_HOME", str(tmp_path / "home"))
    source = tmp_path / "in.csv"
    if content is not None:
        source.write_bytes(content)
    assert main(["label-reports", str(source), "--out", str(tmp_path / "o.csv")]) == 2
    err = capsys.readouterr().err
    assert message in err and str(source) in err and "Traceback" not in err


def test_no_labeller_and_no_training_data_says_what_to_pass(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CTFOUNDATION_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CTFOUNDATION_DATA", str(tmp_path / "nothing"))
    source = write_rows(tmp_path / "in.csv", ["report_text"], [["Cardiomegaly."]])
    assert main(["label-reports", str(source), "--out", str(tmp_path / "o.csv")]) == 2
    assert "--train-csv" in capsys.readouterr().err


def test_label_columns_are_matched_by_name_not_position(reports, tmp_path):
    texts, labels = reports
    spelled = {"Arterial wall calcification": "Calcification", "Lung nodule": "lung_nodule ", "Emphysema": "EMPHYSEMA"}
    order = list(reversed(CT_RATE_ABNORMALITIES))
    path = write_rows(
        tmp_path / "t.csv",
        ["id", *[spelled.get(name, name) for name in order], "report_text"],
        [[i, *[labels[i, CT_RATE_ABNORMALITIES.index(name)] for name in order], texts[i]] for i in range(30)],
    )
    read_texts, read_labels = read_labelled_reports(path)
    assert read_texts == texts[:30]
    np.testing.assert_array_equal(read_labels, labels[:30])


def test_training_csv_without_a_finding_column_is_rejected(reports, tmp_path):
    texts, labels = reports
    names = [name for name in CT_RATE_ABNORMALITIES if name != "Bronchiectasis"]
    path = write_rows(tmp_path / "t.csv", ["report_text", *names], [[texts[0], *[0] * len(names)]])
    with pytest.raises(ReportLabelError, match="Bronchiectasis"):
        read_labelled_reports(path)


def test_training_script_reports_held_out_figures_and_installs(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CTFOUNDATION_HOME", str(tmp_path / "home"))
    spec = importlib.util.spec_from_file_location("train_labeller", REPO_ROOT / "training" / "train_labeller.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "held_out.json"
    assert script.main(["--train-csv", str(TRAIN_CSV), "--json", str(out), "--install"]) == 0
    figures = json.loads(out.read_text())
    assert (figures["n_train"], figures["n_reports"]) == (600, 200)
    assert f"{figures['averages']['macro']['f1']:6.3f}" in capsys.readouterr().out
    assert ReportLabeller.load(cached_labeller_path()).provenance["n_reports"] == 800
