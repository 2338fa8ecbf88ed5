"""The Slicer module on real Slicer core (slicer-core: MRML, module logics, slicer.util; brought up by
Testing/slicer_core_app.py, with Qt and ctk imitated in Testing/slicer_standin): MRML <-> library conversion,
detection end-to-end on the real RICORD CT into a table node, the console API, cancel, the headless batch
script."""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import json
import sys
import time
import unittest
from pathlib import Path
from types import ModuleType, SimpleNamespace

import nibabel
import numpy as np
import pytest
import slicer_core_app
from conftest import data_root
from small_models import bert_vocab, make_small_ctclip

from CTFoundationLib import cli
from CTFoundationLib.errors import CTInputError, DependencyError, WorkerError
from CTFoundationLib.inference.ctclip import CTCLIPRuntime
from CTFoundationLib.io.reading import read_ct
from CTFoundationLib.vocab import CT_RATE_ABNORMALITIES

REPO = Path(__file__).resolve().parents[1]
RICORD = "ricord1a_419639-000082_chest_noncontrast"


@pytest.fixture(scope="module")
def ctf():
    """The CTFoundation module imported on slicer-core (and the batch script's folder on the path)."""
    slicer_core_app.start()
    for folder in (REPO / "CTFoundation", REPO / "CTFoundation" / "Scripts"):
        if str(folder) not in sys.path:
            sys.path.insert(0, str(folder))
    import CTFoundation

    return CTFoundation


@pytest.fixture
def scene(ctf):
    import slicer

    slicer.mrmlScene.Clear()  # as File > Close Scene: the views, crosshair and parameter nodes stay (reset)
    return slicer


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    checkpoint, config, model_config = make_small_ctclip(tmp_path_factory.mktemp("small"))
    return checkpoint, config, model_config


def configured_logic(ctf, small, tmp_path: Path):
    """A logic whose parameters point at the small checkpoint, a real vocabulary and a private weights cache."""
    logic = ctf.CTFoundationLogic()
    parameters = logic.getParameterNode()
    parameters.weightsFile = str(small[0])
    parameters.modelConfigFile = str(small[1])
    parameters.textEncoder = str(bert_vocab())
    parameters.weightsHome = str(tmp_path / "weights-home")
    parameters.device = "cpu"
    return logic


def permuted_and_flipped(data: np.ndarray, affine: np.ndarray, order=(2, 0, 1), flips=(0, 2)):
    """The same voxels with the axes reordered and some reversed, and the affine keeping every voxel in place."""
    moved = np.flip(np.transpose(data, order), axis=flips)
    new_to_old = np.zeros((4, 4))
    new_to_old[3, 3] = 1
    for new_axis, old_axis in enumerate(order):
        flipped = new_axis in flips
        new_to_old[old_axis, new_axis] = -1 if flipped else 1
        new_to_old[old_axis, 3] = moved.shape[new_axis] - 1 if flipped else 0
    return moved, affine @ new_to_old, new_to_old


def save_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    nibabel.save(nibabel.Nifti1Image(data, affine), str(path))
    return path


# --- module ---------------------------------------------------------------------------------------------


def test_module_texts_cite_sources_licences_and_clinical_use(ctf) -> None:
    parent = SimpleNamespace()
    ctf.CTFoundation(parent)
    assert "not for clinical use" in parent.helpText.lower()
    for name in ("CT-RATE", "CT-CLIP", "fVLM", "CT-CHAT", "CC BY-NC-SA 4.0", "not for clinical use"):
        assert name.lower() in parent.acknowledgementText.lower()
    assert Path(parent.icon.path) == REPO / "Resources" / "Icons" / "CTFoundation.png"
    assert ctf.packageRoot() == REPO


# --- MRML <-> library -------------------------------------------------------------------------------------


def test_node_to_volume_with_flips_permutation_and_parent_transform(ctf, scene, ct_dir, tmp_path) -> None:
    image = nibabel.load(str(ct_dir / RICORD / "ct_3mm_iso.nii.gz"))
    original = np.asanyarray(image.dataobj)[:, ::2, :]  # anisotropic: 3 x 6 x 3 mm
    original_affine = image.affine @ np.diag([1.0, 2.0, 1.0, 1.0])
    data, affine, new_to_old = permuted_and_flipped(original, original_affine)
    rng = np.random.default_rng(0)
    samples = np.stack([rng.integers(0, n, 200) for n in data.shape], axis=1)
    for index in samples[:20]:  # the construction itself is right
        old = (new_to_old @ np.append(index, 1))[:3].astype(int)
        assert data[tuple(index)] == original[tuple(old)]

    node = scene.util.loadVolume(str(save_nifti(tmp_path / "moved.nii", data, affine)))
    volume = ctf.ctVolumeFromNode(node)

    assert np.array_equal(volume.hu, data) and volume.hu.shape == data.shape
    np.testing.assert_allclose(volume.affine_ras, affine, atol=1e-4)
    np.testing.assert_allclose(volume.spacing_ijk_mm, (3.0, 3.0, 6.0), atol=1e-4)
    assert volume.orientation_code == "".join(nibabel.aff2axcodes(affine))
    assert volume.orientation_code != "".join(nibabel.aff2axcodes(original_affine))
    assert np.shares_memory(volume.hu, scene.util.arrayFromVolume(node))  # no copy of the voxels
    assert volume.source == node.GetName() and volume.metadata == {"format": "slicer"}
    world_to_original = np.linalg.inv(original_affine)
    for index in samples:  # every sampled voxel sits where the original file puts it
        world = volume.affine_ras @ np.append(index, 1)
        old = np.rint(world_to_original @ world)[:3].astype(int)
        assert volume.hu[tuple(index)] == original[tuple(old)]

    rotation = np.array([[0.0, -1, 0, 10], [1, 0, 0, -20], [0, 0, 1, 5], [0, 0, 0, 1]])
    transform = scene.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    transform.SetMatrixTransformToParent(scene.util.vtkMatrixFromArray(rotation))
    node.SetAndObserveTransformNodeID(transform.GetID())
    np.testing.assert_allclose(ctf.ctVolumeFromNode(node).affine_ras, rotation @ affine, atol=1e-4)


def test_unusable_nodes_are_clear_errors(ctf, scene) -> None:
    with pytest.raises(CTInputError, match="no CT volume selected"):
        ctf.ctVolumeFromNode(None)
    empty = scene.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(CTInputError, match="no CT volume selected"):
        ctf.CTFoundationLogic().detect(empty)


# --- detection ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ricord_volume(ct_dir):
    return read_ct(ct_dir / RICORD / "dicom")


def world_agreement(volume, reference: nibabel.Nifti1Image, hu: np.ndarray) -> tuple[float, float]:
    """Correlation and median |difference| of HU at reference voxels mapped into `volume`'s grid (HU clamped
    to [-1024, 3071] as the reference was: outside the scan's field of view the DICOM holds -3024)."""
    grid = np.stack(np.meshgrid(*[np.arange(4, n - 4, 9) for n in reference.shape], indexing="ij"), -1).reshape(-1, 3)
    world = reference.affine @ np.c_[grid, np.ones(len(grid))].T
    voxel = np.rint(np.linalg.inv(volume.affine_ras) @ world)[:3].T.astype(int)
    inside = np.all((voxel >= 0) & (voxel < np.array(hu.shape)), axis=1)
    ours = np.clip(hu[tuple(voxel[inside].T)].astype(float), -1024, 3071)
    theirs = np.asanyarray(reference.dataobj)[tuple(grid[inside].T)].astype(float)
    return float(np.corrcoef(ours, theirs)[0, 1]), float(np.median(np.abs(ours - theirs)))


@pytest.mark.slow
def test_detect_on_ricord_into_a_table_node(ctf, scene, ct_dir, small, ricord_volume, tmp_path) -> None:
    path = save_nifti(tmp_path / "ricord.nii", ricord_volume.hu, ricord_volume.affine_ras)
    node = scene.util.loadVolume(str(path))
    volume = ctf.ctVolumeFromNode(node)
    reference = nibabel.load(str(ct_dir / RICORD / "ct_1p5mm_iso.nii.gz"))  # the same scan, resampled elsewhere
    assert volume.shape_ijk == (512, 512, 255)
    np.testing.assert_allclose(volume.spacing_ijk_mm, (0.703125, 0.703125, 1.25), atol=1e-3)
    directions = volume.affine_ras[:3, :3] / np.array(volume.spacing_ijk_mm)
    np.testing.assert_allclose(directions, reference.affine[:3, :3] / 1.5, atol=1e-4)
    np.testing.assert_allclose(volume.affine_ras[:3, 3], reference.affine[:3, 3], atol=0.01)
    correlation, median_difference = world_agreement(volume, reference, volume.hu)
    assert correlation > 0.98 and median_difference < 15
    for wrong in (volume.hu.transpose(1, 0, 2), volume.hu[::-1]):  # i/j mixed up, left-right flipped: must fail
        correlation, median_difference = world_agreement(volume, reference, wrong)
        assert correlation < 0.9 and median_difference > 25

    thresholds = tmp_path / "thresholds.json"
    thresholds.write_text(json.dumps({"Emphysema": 0.0, "Lung nodule": 1.0}))
    logic = configured_logic(ctf, small, tmp_path)
    logic.getParameterNode().thresholdsFile = str(thresholds)
    steps = []
    outcome = logic.detect(node, model="ct-clip-v2", progress=lambda step, fraction: steps.append((step, fraction)))

    runtime = CTCLIPRuntime(small[0], bert_vocab(), config=small[2], device="cpu", cache_dir=tmp_path / "c")
    runtime.keep_tokens = True  # the maps below reuse this image pass
    expected = runtime.detect(ricord_volume)
    result = outcome.result
    assert [f.name for f in result.findings] == list(CT_RATE_ABNORMALITIES)
    assert [f.probability for f in result.findings] == pytest.approx(
        [f.probability for f in expected.findings], abs=2e-5)
    assert result.checkpoint_sha256 == hashlib.sha256(small[0].read_bytes()).hexdigest()
    assert [fraction for _, fraction in steps] == sorted(fraction for _, fraction in steps)
    assert {"load model", "preprocess", "encode image", "score"} <= {step for step, _ in steps}

    table = outcome.tableNode
    column = {name: table.GetColumnIndex(name) for name in ("finding", "probability", "threshold", "positive", "model")}
    assert table.GetNumberOfRows() == 18 and sorted(column.values()) == [0, 1, 2, 3, 4] and table.GetLocked()
    for row, finding in enumerate(result.findings):
        assert table.GetCellText(row, column["finding"]) == finding.name
        assert float(table.GetCellText(row, column["probability"])) == pytest.approx(finding.probability, rel=1e-5)
        assert table.GetCellText(row, column["model"]) == "ct-clip-v2"
    row = {finding.name: i for i, finding in enumerate(result.findings)}
    assert table.GetCellText(row["Emphysema"], column["positive"]) == "yes"
    assert table.GetCellText(row["Lung nodule"], column["positive"]) == "no"
    assert table.GetCellText(row["Cardiomegaly"], column["positive"]) == ""

    assert node.GetAttribute("CTFoundation.Model") == "ct-clip-v2"
    assert node.GetAttribute("CTFoundation.CheckpointSHA256") == result.checkpoint_sha256
    assert node.GetAttribute("CTFoundation.Positive") == "Emphysema"
    probabilities = json.loads(node.GetAttribute("CTFoundation.Probabilities"))
    assert probabilities == {f.name: f.probability for f in result.findings}
    assert node.GetNodeReference("CTFoundationFindings") is table
    assert logic.getParameterNode().findingsTable is table
    assert outcome.report["input"]["source"] == node.GetName() == "ricord"
    assert outcome.report["input"]["shape_ijk"] == [512, 512, 255]
    assert outcome.report["detection"] == result.to_dict()

    # the worker's token-grid maps, kept past the job; a finding's map shown over the CT with its colour map
    assert set(outcome.mapFiles) == set(CT_RATE_ABNORMALITIES) and outcome.report["maps"]["grid"] == "tokens"
    expected_maps = runtime.finding_maps(ricord_volume)
    mapNode = ctf.findingMaps.showFindingMap(node, "Emphysema", outcome.mapFiles["Emphysema"], opacity=0.6,
                                             threshold=0.4)
    values = scene.util.arrayFromVolume(mapNode).transpose(2, 1, 0)  # (k, j, i) -> the file's (i, j, k)
    expected = expected_maps.token_map("Emphysema")
    assert values.shape == expected.shape == (24, 24, 24)
    np.testing.assert_allclose(values, expected, atol=1e-4 * np.abs(expected).max())
    np.testing.assert_allclose(ctf.ijkToRasArray(mapNode), expected_maps.grid.affine_ras, atol=1e-4)
    display = mapNode.GetDisplayNode()
    assert display.GetColorNodeID() == ctf.findingMaps.MAP_COLOUR_NODE_ID and not display.GetAutoWindowLevel()
    assert display.GetWindowLevelMin() == pytest.approx(-np.abs(expected).max(), rel=1e-4)
    assert display.GetApplyThreshold() and display.GetLowerThreshold() == pytest.approx(0.4 * expected.max(), rel=1e-4)
    for composite in scene.util.getNodesByClass("vtkMRMLSliceCompositeNode"):  # every slice view shows it over the CT
        assert composite.GetBackgroundVolumeID() == node.GetID()
        assert composite.GetForegroundVolumeID() == mapNode.GetID()
        assert composite.GetForegroundOpacity() == pytest.approx(0.6)
    assert ctf.findingMaps.showFindingMap(node, "Emphysema", outcome.mapFiles["Emphysema"]) is mapNode  # loaded once


def test_cancel_from_the_timer_driven_path(ctf, scene, ct_dir, small, tmp_path) -> None:
    import qt

    node = scene.util.loadVolume(str(ct_dir / RICORD / "ct_3mm_iso.nii.gz"))
    logic = configured_logic(ctf, small, tmp_path)
    steps, finished = [], []
    task = logic.detect(node, waitForCompletion=False, progress=lambda step, fraction: steps.append(step),
                        callback=lambda outcome, error: finished.append((outcome, error)))
    assert isinstance(task, ctf.BackgroundTask) and task.timer.isActive()
    deadline = time.monotonic() + 300
    while not steps:  # the GUI's timer turns, until the worker reports its first step
        assert time.monotonic() < deadline and not finished
        qt.QTimer.fireActiveTimers()
        time.sleep(0.05)
    task.cancel()
    while not finished:
        assert time.monotonic() < deadline
        qt.QTimer.fireActiveTimers()
        time.sleep(0.05)
    outcome, error = finished[0]
    assert outcome is None and isinstance(error, WorkerError) and "cancelled" in str(error)
    assert not task.timer.isActive() and not task.workDir.exists()
    assert scene.mrmlScene.GetFirstNodeByClass("vtkMRMLTableNode") is None
    assert node.GetAttribute("CTFoundation.Model") is None


def test_headless_detection_never_installs_packages(ctf, scene, ct_dir, tmp_path, monkeypatch) -> None:
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("tqdm\nno-such-package-ctfoundation>=1\n")
    monkeypatch.setattr(ctf, "resourcePath", lambda name: requirements)
    logic = ctf.CTFoundationLogic()
    assert logic.missingDependencies() == ["no-such-package-ctfoundation>=1"]
    node = scene.util.loadVolume(str(ct_dir / RICORD / "ct_3mm_iso.nii.gz"))
    with pytest.raises(DependencyError, match="no-such-package-ctfoundation.*installDependencies"):
        logic.detect(node)  # slicer.util.pip_install would fail here (slicer-core has no slicer.packaging)


@pytest.mark.parametrize("version", [(5, 10), (5, 12)])
def test_installing_pins_slicers_own_packages(ctf, scene, tmp_path, monkeypatch, version) -> None:
    """pip gets only what is missing, with a constraints file that keeps numpy, requests and torch as they are."""
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("tqdm\nno-such-package-ctfoundation>=1\n")
    monkeypatch.setattr(ctf, "resourcePath", lambda name: requirements)
    monkeypatch.setattr(scene.app, "majorVersion", version[0])
    monkeypatch.setattr(scene.app, "minorVersion", version[1])
    calls = []

    def pip_ensure(requirements, constraints=None, **options) -> None:  # Slicer 5.12's slicer.packaging
        calls.append((list(requirements), Path(constraints).read_text(), options))

    def pip_install(arguments) -> None:  # Slicer 5.10's slicer.util.pip_install
        assert arguments[0] == "-c"
        calls.append((arguments[2:], Path(arguments[1]).read_text(), {}))

    packaging = ModuleType("slicer.packaging")
    packaging.pip_ensure = pip_ensure
    monkeypatch.setitem(sys.modules, "slicer.packaging", packaging)
    monkeypatch.setattr(scene, "packaging", packaging, raising=False)
    monkeypatch.setattr(scene.util, "pip_install", pip_install)
    ctf.CTFoundationLogic().installDependencies(askConfirmation=False)

    (wanted, constraints, options), = calls
    assert wanted == ["no-such-package-ctfoundation>=1"]
    pins = constraints.split()
    for name in ("numpy", "requests", "torch"):
        assert f"{name}=={importlib.metadata.version(name)}" in pins
    if version >= (5, 12):
        assert options == {"requester": "CTFoundation", "prompt_install": False, "skip_in_testing": False}


def test_weights_panel_state(ctf, scene, tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    logic = ctf.CTFoundationLogic()
    logic.getParameterNode().weightsHome = str(tmp_path)
    ready, text = logic.weightsStatus("ct-clip-v2")
    assert not ready and text == "not installed: cxr-bert, ct-clip-v2"
    assert [licence.id for licence in logic.pendingLicenses("ct-clip-v2")] == ["CC-BY-NC-SA-4.0"]
    assert logic.needsToken("ct-clip-v2")
    logic.saveToken("hf_test_token")
    assert not logic.needsToken("ct-clip-v2")
    assert "hf_test_token" in (tmp_path / "settings.json").read_text()


# --- headless batch script ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_batch_script_writes_what_the_cli_writes(ctf, scene, ct_dir, small, tmp_path, monkeypatch) -> None:
    import ctfoundation_batch

    monkeypatch.setenv("CTFOUNDATION_HOME", str(tmp_path / "home"))
    ct = ct_dir / RICORD / "ct_3mm_iso.nii.gz"
    options = ["--weights", str(small[0]), "--model-config", str(small[1]), "--text-encoder", str(bert_vocab()),
               "--device", "cpu"]
    assert ctfoundation_batch.main(["--", str(ct), "--out", str(tmp_path / "batch.json"), *options]) == 0
    assert cli.main(["detect", str(ct), "--out", str(tmp_path / "cli.json"), *options]) == 0
    batch, reference = (json.loads((tmp_path / name).read_text()) for name in ("batch.json", "cli.json"))

    assert batch.keys() == reference.keys() == {"input", "detection"}
    assert batch["input"]["source"] == "ct_3mm_iso" and batch["input"]["metadata"] == {"format": "slicer"}
    same = {"shape_ijk", "spacing_ijk_mm", "orientation", "extent_ijk_mm", "affine_ras", "hu_range", "dtype",
            "warnings"}
    assert {k: batch["input"][k] for k in same} == {k: reference["input"][k] for k in same}
    assert [f["probability"] for f in batch["detection"]["findings"]] == pytest.approx(
        [f["probability"] for f in reference["detection"]["findings"]], abs=2e-6)  # written rounded to 1e-6

    code = ctfoundation_batch.main([str(tmp_path / "missing.nii.gz"), str(ct), "--out", str(tmp_path / "many"),
                                    *options, "--weights", str(tmp_path / "no-such.pt")])
    assert code == 1 and not (tmp_path / "many").exists()


def test_module_self_test_runs(ctf, scene, monkeypatch, tmp_path) -> None:
    """CTFoundationTest (written for a real Slicer) passes here on the RICORD 3 mm NIfTI: detection and grounding."""
    monkeypatch.setenv("CTFOUNDATION_TEST_CT", str(data_root() / "ct" / RICORD / "ct_3mm_iso.nii.gz"))
    monkeypatch.setenv("CTFOUNDATION_HOME", str(tmp_path / "home"))
    result = unittest.TextTestRunner(stream=io.StringIO()).run(ctf.CTFoundationTest("runTest"))
    assert result.wasSuccessful(), [text for _, text in result.errors + result.failures]


def test_batch_script_reports_like_the_cli(ctf, scene, ct_dir, small, tmp_path, monkeypatch) -> None:
    """--report runs `ctfoundation report` in the worker: same per-case JSON, a failed case -> exit 1."""
    import ctfoundation_batch

    monkeypatch.setenv("CTFOUNDATION_HOME", str(tmp_path / "home"))
    ct = ct_dir / RICORD / "ct_3mm_iso.nii.gz"
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not a NIfTI file")
    options = ["--weights", str(small[0]), "--model-config", str(small[1]), "--text-encoder", str(bert_vocab()),
               "--device", "cpu"]
    code = ctfoundation_batch.main(["--", str(ct), str(broken), "--out", str(tmp_path / "slicer"), "--report",
                                    *options])
    assert cli.main(["report", str(ct), "--out", str(tmp_path / "cli"), *options]) == 0
    assert code == 1

    summary = (tmp_path / "slicer" / "summary.csv").read_text()
    assert "broken" in summary and "failed" in summary
    ours, theirs = (json.loads(next((tmp_path / out).glob("*ct_3mm_iso*/result.json")).read_text())
                    for out in ("slicer", "cli"))
    assert ours["status"] == theirs["status"] == "ok"
    assert [f["probability"] for f in ours["detection"]["findings"]] == pytest.approx(
        [f["probability"] for f in theirs["detection"]["findings"]], abs=2e-6)  # written rounded to 1e-6
    assert (tmp_path / "slicer" / "index.html").is_file()
