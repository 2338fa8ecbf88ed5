"""`ctfoundation info`, `preprocess`, `--version` and the demo, run as a user would."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO_ROOT

from CTFoundationLib import __version__
from CTFoundationLib.cli import main

RICORD = "ricord1a_419639-000082_chest_noncontrast"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "CTFoundationLib", *args], capture_output=True, text=True, cwd=REPO_ROOT, timeout=300
    )


def test_version():
    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"ctfoundation {__version__}"


@pytest.mark.parametrize(
    "name, shape, orientation, warnings",
    [
        (f"{RICORD}/dicom", [512, 512, 255], "LPS", []),
        (f"{RICORD}/ct_1p5mm_iso.nii.gz", [240, 240, 212], "LPS", []),
        ("totalseg_chest_crop_aorta/ct.nii.gz", [120, 126, 164], "LPS", []),
        ("totalseg_abdomen_control/ct.nii.gz", [122, 101, 112], "RAS", ["NOT_CHEST"]),
        ("dcmqi_ct_3slice", [512, 512, 3], "LPS", ["SHORT_COVERAGE"]),
    ],
)
def test_info_json_on_shared_cts(capsys, ct_dir, name, shape, orientation, warnings):
    assert main(["info", str(ct_dir / name), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["shape_ijk"] == shape and info["orientation"] == orientation
    assert [w["code"] for w in info["warnings"]] == warnings
    assert all(w["message"] for w in info["warnings"])
    assert info["hu_range"][0] < -900 < 300 < info["hu_range"][1]


def test_info_text_shows_geometry_and_warnings(ct_dir):
    result = run_cli("info", str(ct_dir / "totalseg_abdomen_control" / "ct.nii.gz"))
    assert result.returncode == 0
    assert "3.000 x 3.000 x 3.000" in result.stdout and "RAS" in result.stdout
    assert "[NOT_CHEST]" in result.stdout


def test_bad_input_gives_one_clear_line_and_exit_2(ct_dir):
    result = run_cli("info", str(ct_dir / "lidc_single_slice" / "lidc_slice.dcm"))
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "2-D image" in result.stderr and "Traceback" not in result.stderr
    bad_rescale = run_cli("info", str(ct_dir / RICORD / "ct_3mm_iso.nii.gz"), "--rescale", "one")
    assert bad_rescale.returncode == 2 and "SLOPE,INTERCEPT" in bad_rescale.stderr


@pytest.mark.parametrize("model, shape", [("ct-clip-v2", (1, 240, 480, 480)), ("fvlm", (1, 112, 368, 384))])
def test_preprocess_writes_the_model_tensor(tmp_path, ct_dir, model, shape):
    out = tmp_path / f"{model}.npy"
    assert main(["preprocess", str(ct_dir / RICORD / "ct_3mm_iso.nii.gz"), "--model", model, "--out", str(out)]) == 0
    tensor = np.load(out)
    assert tensor.shape == shape and tensor.dtype == np.float32
