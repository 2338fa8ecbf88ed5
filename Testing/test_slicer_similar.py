"""The module's Similar cases against the Slicer stand-in: a case index made by `ctfoundation index` with a small
CT-CLIP, searched by the background worker for a volume node, and a hit's CT loaded back into the scene."""

from __future__ import annotations

import numpy as np
import pytest
import test_slicer_module
from small_models import bert_vocab
from test_slicer_module import RICORD, configured_logic

from CTFoundationLib import cli
from CTFoundationLib.errors import CTInputError, RetrievalError

ctf, scene, small = test_slicer_module.ctf, test_slicer_module.scene, test_slicer_module.small  # shared fixtures


def test_similar_cases_of_a_volume_node_and_loading_a_hit(ctf, scene, small, ct_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("CTFOUNDATION_HOME", str(tmp_path / "weights-home"))
    cases = tmp_path / "cases"
    cases.mkdir()
    ricord = cases / "ricord.nii.gz"
    ricord.symlink_to(ct_dir / RICORD / "ct_3mm_iso.nii.gz")
    (cases / "aorta.nii.gz").symlink_to(ct_dir / "totalseg_chest_crop_aorta" / "ct.nii.gz")
    (cases / "ricord.txt").write_text("Mild emphysema in both upper lobes.")
    options = ["--weights", str(small[0]), "--model-config", str(small[1]), "--text-encoder", str(bert_vocab())]
    assert cli.main(["index", str(cases), "--index", str(tmp_path / "index"), *options, "--device", "cpu"]) == 0

    logic = configured_logic(ctf, small, tmp_path)
    node = scene.util.loadVolume(str(ct_dir / RICORD / "ct_3mm_iso.nii.gz"))
    steps = []
    outcome = logic.similarCases(node, tmp_path / "index", k=2, progress=lambda step, fraction: steps.append(step))
    first, second = outcome.hits
    assert outcome.model == "ct-clip-v2" and [first["case_id"], second["case_id"]] == ["ricord", "aorta"]
    assert first["score"] == pytest.approx(1.0, abs=1e-4) and second["score"] < first["score"]  # same scan
    assert first["report"] == "Mild emphysema in both upper lobes." and second["report"] is None
    assert first["reachable"] and first["thumbnail"].endswith(".png") and first["findings"] is None
    assert {"read CT", "encode image", "search"} <= set(steps)

    import CTFoundationSimilar

    loaded = CTFoundationSimilar.loadSimilarCase(first)
    assert loaded.GetName() == "ricord"
    assert np.array_equal(scene.util.arrayFromVolume(loaded), scene.util.arrayFromVolume(node))
    with pytest.raises(CTInputError, match="not reachable from this computer"):
        CTFoundationSimilar.loadSimilarCase({**first, "source_path": str(tmp_path / "gone.nii.gz")})
    with pytest.raises(RetrievalError, match="no case index here"):
        logic.similarCases(node, tmp_path / "no-index")
