"""Per-anatomy findings in the batch report, on the real RICORD scan with small CT-CLIP (and fVLM) checkpoints:
the section in result.json and report.html, and the positive segments tinted on the key images in the colour map."""

from __future__ import annotations

import base64
import io
import json
import re

import numpy as np
import pytest
from PIL import Image
from small_models import bert_vocab, make_small_ctclip, make_small_fvlm

from CTFoundationLib.anatomy.colours import POSITIVE_ALPHA, score_colour
from CTFoundationLib.anatomy.masks import AnatomyRequest
from CTFoundationLib.cli import main
from CTFoundationLib.inference.ctclip import CTCLIPRuntime
from CTFoundationLib.inference.grounding import FVLMScoring
from CTFoundationLib.io.cases import Case
from CTFoundationLib.io.reading import read_ct
from CTFoundationLib.report import MarkedPoint, key_images, run_batch
from CTFoundationLib.report.anatomy_section import anatomy_section
from CTFoundationLib.vocab import CT_RATE_ABNORMALITIES

RICORD_3MM = "ricord1a_419639-000082_chest_noncontrast/ct_3mm_iso.nii.gz"
NONE_POSITIVE = dict.fromkeys(CT_RATE_ABNORMALITIES, 1.0)  # small models never reach P = 1


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    return make_small_ctclip(folder), make_small_fvlm(folder)


@pytest.fixture(autouse=True)
def private_home(tmp_path, monkeypatch):
    monkeypatch.setenv("CTFOUNDATION_HOME", str(tmp_path / "home"))


def page_images(path) -> list[np.ndarray]:
    found = re.findall(r'src="data:image/png;base64,([^"]+)"', path.read_text(encoding="utf-8"))
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")).astype(int) for data in found]


def reference_images(volume, record: dict) -> list[np.ndarray]:
    """The key images without overlays, through the same points."""
    segments = record["sections"]["anatomy"]["segments"].values()
    positives = sorted((s for s in segments if s["positive"]), key=lambda s: -s["score"])[:2]
    points = [MarkedPoint(f"{s['title']} centre", tuple(s["centroid_ras_mm"])) for s in positives]
    return [np.asarray(Image.open(io.BytesIO(k.png)).convert("RGB")).astype(int) for k in key_images(volume, points)]


def tinted_pixels(shown: np.ndarray, plain: np.ndarray, colour) -> int:
    """Pixels showing `colour` blended at POSITIVE_ALPHA over the plain grey."""
    expected = (1 - POSITIVE_ALPHA) * plain + POSITIVE_ALPHA * np.asarray(colour)
    return int(np.all(np.abs(shown - expected) <= 3, axis=-1).sum())


def test_report_with_anatomy_tints_the_positive_lungs(ct_dir, small, tmp_path):
    (ctclip, ctclip_config, _), (fvlm, fvlm_config, _) = small
    thresholds = tmp_path / "thresholds.json"
    thresholds.write_text(json.dumps({**NONE_POSITIVE, "Emphysema": 0.0}))
    fvlm_thresholds = tmp_path / "fvlm_thresholds.json"
    fvlm_thresholds.write_text(json.dumps(NONE_POSITIVE))
    code = main(["report", str(ct_dir / RICORD_3MM), "--out", str(tmp_path / "out"), "--weights", str(ctclip),
                 "--model-config", str(ctclip_config), "--text-encoder", str(bert_vocab()), "--device", "cpu",
                 "--thresholds", str(thresholds), "--anatomy", "--no-totalsegmentator", "--fvlm-weights", str(fvlm),
                 "--fvlm-config", str(fvlm_config), "--fvlm-thresholds", str(fvlm_thresholds)])
    assert code == 0
    folder = tmp_path / "out" / "ct_3mm_iso"
    record = json.loads((folder / "result.json").read_text())
    segments = record["sections"]["anatomy"]["segments"]
    assert set(segments) == {"body", "bone", "airway", "lung_left", "lung_right"}
    assert {name for name, s in segments.items() if s["positive"]} == {"lung_left", "lung_right"}
    emphysema = next(f for f in segments["lung_left"]["findings"] if f["name"] == "Emphysema")
    assert emphysema["positive"] and emphysema["ctclip"]["threshold"] == 0.0 and emphysema["fvlm"]["positive"] is False
    assert record["sections"]["anatomy"]["models"]["fvlm"]["mode"] == "organ"
    through = [k["through"] for k in record["key_images"]]
    assert through.count("left lung centre") == through.count("right lung centre") == 6

    html = (folder / "report.html").read_text(encoding="utf-8")
    assert "Findings per anatomy" in html and "Emphysema (" in html
    for name in ("lung_left", "lung_right"):
        assert "background:rgb{}".format(score_colour(segments[name]["score"])) in html
    shown, plain = page_images(folder / "report.html"), reference_images(read_ct(ct_dir / RICORD_3MM), record)
    assert len(shown) == len(plain) == 18
    # the axial chest-window image through the left lung's centre shows both lungs in their colours
    axial = [k["plane"] == "axial" and k["window"] == "chest" for k in record["key_images"]].index(True, 6)
    for name in ("lung_left", "lung_right"):
        assert tinted_pixels(shown[axial], plain[axial], score_colour(segments[name]["score"])) > 2000
    assert all(np.any(s != p) for s, p in zip(shown, plain))


def test_report_without_positives_draws_nothing(ct_dir, small, tmp_path):
    (ctclip, _, config), _ = small
    runtime = CTCLIPRuntime(ctclip, bert_vocab(), config=config, device="cpu", cache_dir=tmp_path / "c")
    section = anatomy_section(AnatomyRequest(use_totalsegmentator=False), FVLMScoring(None, "not installed"))
    summary = run_batch(runtime, [Case("ricord", ct_dir / RICORD_3MM)], tmp_path, NONE_POSITIVE, [section])
    assert [o.status for o in summary.outcomes] == ["ok"]
    record = json.loads((tmp_path / "ricord" / "result.json").read_text())
    segments = record["sections"]["anatomy"]["segments"]
    assert segments and not any(s["positive"] for s in segments.values())
    assert segments["lung_right"]["findings"] and segments["lung_right"]["score"] > 0
    assert {k["through"] for k in record["key_images"]} == {"volume centre"}
    shown = page_images(tmp_path / "ricord" / "report.html")
    plain = reference_images(read_ct(ct_dir / RICORD_3MM), record)
    assert len(shown) == 6 and all(np.array_equal(s, p) for s, p in zip(shown, plain))
    assert "not installed" in (tmp_path / "ricord" / "report.html").read_text(encoding="utf-8")
