"""`ctfoundation detect / embed / embed-text` as a user runs them, with a small checkpoint made here."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO_ROOT
from PIL import Image
from safetensors import safe_open
from small_models import bert_vocab, make_small_ctclip

from CTFoundationLib.cli import COMMAND_GROUPS, build_parser, command_of, main
from CTFoundationLib.retrieval import CaseIndex, index_metrics
from CTFoundationLib.vocab import CT_RATE_ABNORMALITIES

RICORD_3MM = "ricord1a_419639-000082_chest_noncontrast/ct_3mm_iso.nii.gz"
RICORD_DICOM = "ricord1a_419639-000082_chest_noncontrast/dicom"


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    checkpoint, config_path, _ = make_small_ctclip(tmp_path_factory.mktemp("small"))
    return ["--weights", str(checkpoint), "--model-config", str(config_path), "--text-encoder", str(bert_vocab())]


@pytest.fixture(autouse=True)
def private_home(tmp_path, monkeypatch):
    monkeypatch.setenv("CTFOUNDATION_HOME", str(tmp_path / "home"))


def test_detect_writes_json_and_prints_a_table(ct_dir, tmp_path, small, capsys):
    out = tmp_path / "result.json"
    assert main(["detect", str(ct_dir / RICORD_DICOM), *small, "--device", "cpu", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "P(present)" in printed and "Emphysema" in printed
    result = json.loads(out.read_text())
    findings = result["detection"]["findings"]
    assert [f["name"] for f in findings] == list(CT_RATE_ABNORMALITIES)
    assert result["input"]["shape_ijk"] == [512, 512, 255] and result["input"]["warnings"] == []
    assert result["detection"]["method"] == "zero-shot" and result["detection"]["device"] == "cpu"


def test_a_detect_with_cached_prompts_imports_neither_transformers_nor_scikit_learn(ct_dir, tmp_path, small):
    """Fast start: the first detect encodes the prompts (text tower, transformers) and caches them; the next one
    needs only the image tower, so its process never imports transformers or scikit-learn."""
    script = ("import sys; from CTFoundationLib.cli import main; code = main(sys.argv[1:]); "
              "print('imported:', sorted(m for m in ('transformers', 'sklearn') if m in sys.modules))")
    command = [sys.executable, "-c", script, "detect", str(ct_dir / RICORD_3MM), *small, "--device", "cpu"]
    environment = {**os.environ, "CTFOUNDATION_HOME": str(tmp_path / "home")}
    first, second = (subprocess.run(command, capture_output=True, text=True, env=environment, cwd=REPO_ROOT,
                                    timeout=300) for _ in range(2))
    assert first.returncode == 0 and "imported: ['transformers']" in first.stdout, first.stderr
    assert second.returncode == 0 and "imported: []" in second.stdout, second.stderr
    assert first.stdout.split("imported")[0] == second.stdout.split("imported")[0]  # the same findings table


def test_every_command_is_built_by_the_group_that_registers_it():
    """COMMAND_GROUPS names each group's commands: a command line builds its own group's parser only."""
    for group, commands in COMMAND_GROUPS.items():
        choices = next(action.choices for action in build_parser(commands[0])._actions
                       if isinstance(action, argparse._SubParsersAction))
        assert sorted(choices) == sorted(commands), group
    assert command_of(["--version"]) is None and len(build_parser(None)._actions[-1].choices) == sum(
        map(len, COMMAND_GROUPS.values()))


def test_detect_without_weights_says_which_file_is_missing(ct_dir, capsys):
    assert main(["detect", str(ct_dir / RICORD_3MM)]) == 2
    error = capsys.readouterr().err
    assert "ct-clip-v2 is not installed" in error and "ctfoundation weights download ct-clip-v2" in error
    assert "CT-CLIP_v2.pt" in error


def test_bad_model_config_and_missing_weights_file(ct_dir, tmp_path, capsys):
    (tmp_path / "c.json").write_text("{}")
    code = main(["detect", str(ct_dir / RICORD_3MM), "--weights", str(tmp_path / "nope.pt")])
    assert code == 2 and "nope.pt (given for ct-clip-v2): no such file" in capsys.readouterr().err
    (tmp_path / "w.pt").write_bytes(b"junk")
    code = main(["detect", str(ct_dir / RICORD_3MM), "--weights", str(tmp_path / "w.pt"),
                 "--model-config", str(tmp_path / "c.json")])
    assert code == 2 and "not a usable CT-CLIP constructor JSON" in capsys.readouterr().err


def test_checkpoint_of_other_sizes_without_model_config_names_the_option(ct_dir, small, capsys):
    without_config = small[:2] + small[4:]
    assert main(["detect", str(ct_dir / RICORD_3MM), *without_config, "--device", "cpu"]) == 2
    error = capsys.readouterr().err
    assert f"{small[1]} does not match the CT-CLIP v2 model" in error and "wrong shapes" in error
    assert "pass its constructor JSON with --model-config FILE" in error and "Traceback" not in error
    assert len(error.strip().splitlines()) == 1, error


def test_embed_image_with_tokens_and_text(ct_dir, tmp_path, small):
    out = tmp_path / "case.safetensors"
    assert main(["embed", str(ct_dir / RICORD_3MM), *small, "--tokens", "--out", str(out)]) == 0
    with safe_open(str(out), "pt") as stored:
        assert stored.get_tensor("image_latent").shape == (32,)
        assert stored.get_tensor("token_grid").shape == (24, 24, 24, 16)
        assert len(stored.metadata()["checkpoint_sha256"]) == 64
    text_out = tmp_path / "text.safetensors"
    assert main(["embed-text", "Emphysema is present.", "No nodules.", *small, "--out", str(text_out)]) == 0
    with safe_open(str(text_out), "pt") as stored:
        assert stored.get_tensor("text_latents").shape == (2, 32)


def test_index_and_search_by_image_and_text(ct_dir, tmp_path, small, capsys):
    cases = tmp_path / "cases"
    cases.mkdir()
    for name in ("totalseg_chest_crop_aorta", "totalseg_chest_crop_pulmonary", "totalseg_abdomen_control"):
        (cases / f"{name}.nii.gz").symlink_to(ct_dir / name / "ct.nii.gz")
    embedded = cases / "ricord.safetensors"
    assert main(["embed", str(ct_dir / RICORD_3MM), *small, "--out", str(embedded)]) == 0
    index = tmp_path / "index"
    assert main(["index", str(cases), "--index", str(index), *small]) == 0
    assert "4 cases" in capsys.readouterr().out

    assert main(["search", "--index", str(index), "--ct", str(ct_dir / RICORD_3MM), "-k", "4", *small]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and "ricord" in lines[0]
    assert float(lines[0].split()[1]) == pytest.approx(1.0, abs=1e-4)  # the same scan, embedded earlier
    assert main(["search", "--index", str(index), "--text", "Pleural effusion is present.", *small]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 4

    stamp = (index / "index.json").stat().st_mtime_ns
    assert main(["index", str(cases), "--index", str(index), *small]) == 0  # nothing changed: nothing re-encoded
    assert (index / "index.json").stat().st_mtime_ns == stamp


def test_unreadable_embeddings_and_empty_case_list_cells_are_named(ct_dir, tmp_path, small, capsys):
    cases = tmp_path / "cases"
    cases.mkdir()
    (cases / "junk.safetensors").write_bytes(b"not safetensors")
    assert main(["embed-text", "Emphysema is present.", *small, "--out", str(cases / "text.safetensors")]) == 0
    (cases / "ricord.nii.gz").symlink_to(ct_dir / RICORD_3MM)
    assert main(["index", str(cases), "--index", str(tmp_path / "index"), *small]) == 1
    captured = capsys.readouterr()
    assert "junk.safetensors: not a readable embedding file" in captured.err
    assert "holds no image_latent" in captured.err and "1 cases (2 could not be read)" in captured.out
    listing = tmp_path / "list.csv"
    listing.write_text("case_id,path\na,ricord.nii.gz\nb,\n")
    assert main(["index", str(listing), "--index", str(tmp_path / "index2"), *small]) == 2
    assert "list.csv, line 3: the 'path' cell is empty" in capsys.readouterr().err


def test_embedding_from_another_checkpoint_is_refused(ct_dir, tmp_path, small, capsys):
    other, other_config, _ = make_small_ctclip(tmp_path / "other", seed=3)
    (tmp_path / "cases").mkdir()
    embedded = tmp_path / "cases" / "case.safetensors"
    other_args = ["--weights", str(other), "--model-config", str(other_config)]
    assert main(["embed", str(ct_dir / RICORD_3MM), *other_args, "--out", str(embedded)]) == 0
    assert main(["index", str(tmp_path / "cases"), "--index", str(tmp_path / "index"), *small]) == 1
    assert "re-embed it with this model" in capsys.readouterr().err


def test_index_keeps_reports_labels_and_thumbnails_and_searches_every_way(ct_dir, tmp_path, small, capsys):
    """Reports from a case-list column, a CT-RATE CSV and a file beside the CT; labels from a CT-RATE CSV."""
    cases = tmp_path / "cases"
    cases.mkdir()
    names = ("totalseg_chest_crop_aorta", "totalseg_chest_crop_pulmonary", "totalseg_abdomen_control")
    for name in names:
        (cases / f"{name}.nii.gz").symlink_to(ct_dir / name / "ct.nii.gz")
    (cases / f"{names[2]}.txt").write_text("Liver (normal).\n")  # beside the CT; cleaned as CT-CLIP does
    listing = tmp_path / "cases.csv"
    listing.write_text("path,report\n" + "".join(
        f"cases/{name}.nii.gz,{'Aortic wall calcification.' if i == 0 else ''}\n" for i, name in enumerate(names)))
    reports = tmp_path / "reports.csv"
    reports.write_text("VolumeName,Findings_EN,Impressions_EN\n"
                       f"{names[0]}.nii.gz,Ignored: the case list names a report.,x\n"
                       f"{names[1]}.nii.gz,\"Pulmonary \"\"embolism\"\".\",x\n")
    labels = tmp_path / "labels.csv"
    labels.write_text("VolumeName," + ",".join(CT_RATE_ABNORMALITIES) + "\n" + "".join(
        f"{name}.nii.gz," + ",".join("1" if j == i else "0" for j in range(18)) + "\n" for i, name in enumerate(names)))
    index = tmp_path / "index"
    assert main(["index", str(listing), "--index", str(index), "--reports", str(reports), "--labels", str(labels),
                 *small]) == 0
    assert "3 cases (0 could not be read); 3 with a report, 3 with labels" in capsys.readouterr().out

    stored = CaseIndex.open(index)
    assert [stored.metadata(name).report for name in names] == [
        "Aortic wall calcification.", "Pulmonary embolism.", "Liver normal."]
    thumbnail = Image.open(stored.thumbnail_path(names[0]))
    assert thumbnail.format == "PNG" and max(thumbnail.size) == 128

    out = tmp_path / "hits.json"
    assert main(["search", "--index", str(index), "--case", names[0], "-k", "2", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    hits = json.loads(out.read_text())["hits"]
    assert [hit["case_id"] for hit in hits] == [h.case_id for h in stored.search(
        stored.latent(names[0]), 2, exclude=names[0])] and names[0] not in [hit["case_id"] for hit in hits]
    assert f"findings: {CT_RATE_ABNORMALITIES[1]}" in printed or f"findings: {CT_RATE_ABNORMALITIES[2]}" in printed
    assert main(["search", "--index", str(index), "--case", names[0], "--target", "reports", "-k", "3",
                 "--json", str(out)]) == 0
    expected = stored.search(stored.latent(names[0]), 3, exclude=names[0], target="reports")  # its own left out
    assert len(expected) == 2 and [hit["score"] for hit in json.loads(out.read_text())["hits"]] == pytest.approx(
        [h.score for h in expected], abs=1e-6)
    assert main(["search", "--index", str(index), "--text", "Pulmonary embolism.", "-k", "3", "--json", str(out),
                 *small]) == 0
    by_text = json.loads(out.read_text())["hits"]
    # the query text is case 1's report: its score against every image equals that stored report latent's
    expected = stored.latents @ stored.text_latent(names[1])
    assert {hit["case_id"]: hit["score"] for hit in by_text} == pytest.approx(dict(zip(names, expected)), abs=1e-5)

    assert main(["retrieval-metrics", "--index", str(index), "-k", "1", "2", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    metrics = json.loads(out.read_text())
    reference = index_metrics(stored, (1, 2))
    assert metrics["report_to_image"] == {str(k): v for k, v in reference.report_to_image.items()}
    assert metrics["image_to_image"] == {str(k): v for k, v in reference.image_to_image.items()}
    assert "image->image mAP" in printed and "3 cases with a report" in printed

    # The folder itself: the report file beside a CT is no stray file, and known reports and labels are kept.
    stamp = (index / "index.json").stat().st_mtime_ns
    assert main(["index", str(cases), "--index", str(index), *small]) == 0
    assert "skipped" not in capsys.readouterr().err and (index / "index.json").stat().st_mtime_ns == stamp

    # A changed CT is encoded again; its known report and text latent stay (no text tower loaded for them).
    report_latent = stored.text_latent(names[0])
    (cases / f"{names[0]}.nii.gz").unlink()
    (cases / f"{names[0]}.nii.gz").symlink_to(ct_dir / names[1] / "ct.nii.gz")
    assert main(["index", str(cases), "--index", str(index), *small]) == 0
    changed = CaseIndex.open(index)
    assert changed.metadata(names[0]).report == "Aortic wall calcification."
    assert changed.metadata(names[0]).labels == stored.metadata(names[0]).labels
    np.testing.assert_array_equal(changed.text_latent(names[0]), report_latent)
    np.testing.assert_allclose(changed.latent(names[0]), changed.latent(names[1]), atol=1e-6)  # now the same CT
