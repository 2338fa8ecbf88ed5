"""Bad input as a new user gives it: a one-line error or a warning, never a traceback, never a result that looks
normal. Each class of bad input (non-finite voxels, oblique or degenerate geometry, wrong voxel types, unwritable or
misplaced outputs, wrong devices, dropped inputs, bad checkpoints) goes through `info`, `detect` and `report`."""

from __future__ import annotations

import errno
import json
import pickle
import shutil
import struct
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from small_models import bert_vocab, make_small_ctclip

from CTFoundationLib.cli import main
from CTFoundationLib.io.files import cannot_write
from CTFoundationLib.io.reading import read_ct
from CTFoundationLib.report import batch as batch_module

RICORD = "ricord1a_419639-000082_chest_noncontrast"
RICORD_3MM = f"{RICORD}/ct_3mm_iso.nii.gz"


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    checkpoint, config_path, _ = make_small_ctclip(tmp_path_factory.mktemp("small"))
    return ["--weights", str(checkpoint), "--model-config", str(config_path), "--text-encoder", str(bert_vocab()),
            "--device", "cpu"]


@pytest.fixture(autouse=True)
def private_home(tmp_path, monkeypatch):
    monkeypatch.setenv("CTFOUNDATION_HOME", str(tmp_path / "home"))


@pytest.fixture(scope="module")
def chest(ct_dir):
    """The real 3 mm chest CT: (HU float32 array, affine)."""
    image = nib.load(str(ct_dir / RICORD_3MM))
    return np.asarray(image.dataobj, dtype=np.float32), image.affine


def rotation_z(degrees: float) -> np.ndarray:
    angle = np.radians(degrees)
    rotation = np.eye(4)
    rotation[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    return rotation


def header_without_orientation(path: Path, hu: np.ndarray) -> Path:
    """An uncompressed NIfTI whose sform and qform codes are 0 and whose voxel sizes are 0 (patched in the header
    bytes: nibabel refuses to write such a header)."""
    nib.save(nib.Nifti1Image(hu, np.eye(4)), str(path))
    header = bytearray(path.read_bytes()[:348])
    header[80:92] = struct.pack("<3f", 0.0, 0.0, 0.0)  # pixdim[1..3]
    header[252:256] = struct.pack("<2h", 0, 0)  # qform_code, sform_code
    path.write_bytes(bytes(header) + path.read_bytes()[348:])
    return path


def bad_volumes(chest, folder: Path) -> dict[str, tuple[Path, str]]:
    """name -> (NIfTI file, what must come of it: "error" or the warning code it must carry)."""
    hu, affine = chest
    with_nan = hu.copy()
    with_nan[:20] = np.nan
    with_inf = hu.copy()
    with_inf[:, :, :5] = np.inf
    sheared = affine.copy()
    sheared[0, 2] = 0.5 * affine[2, 2]
    specs = {
        "nan_block": (with_nan, affine, "NON_FINITE"),
        "infinite_slices": (with_inf, affine, "NON_FINITE"),
        "all_nan": (np.full_like(hu, np.nan), affine, "error"),
        "rotated_30_degrees": (hu, affine @ rotation_z(30), "OBLIQUE"),
        "sheared": (hu, sheared, "error"),
        "one_voxel_axis": (hu[:, :, :1], affine, "error"),
        "huge_spacing": (hu, affine @ np.diag([400.0, 1, 1, 1]), "error"),
        "tiny_spacing": (hu, affine @ np.diag([1e-4, 1, 1, 1]), "error"),
        "complex_voxels": (hu.astype(np.complex64), affine, "error"),
    }
    volumes = {}
    for name, (data, matrix, expected) in specs.items():
        path = folder / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(data, matrix), str(path))
        volumes[name] = (path, expected)
    volumes["no_orientation"] = (header_without_orientation(folder / "no_orientation.nii", hu), "NO_ORIENTATION")
    return volumes


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, *words: str) -> None:
    assert code == 2 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert all(word in lines[0] for word in words), err


@pytest.mark.slow
def test_generated_bad_volumes_give_an_error_or_a_warning_everywhere(chest, small, tmp_path, capsys):
    """The fuzz test: every generated bad volume through info, detect and report."""
    for name, (path, expected) in bad_volumes(chest, tmp_path).items():
        code, out, err = run(["info", path], capsys)
        if expected == "error":
            assert_one_line_error(code, err, path.name)
        else:
            hu_range = next(line for line in out.splitlines() if line.startswith("HU range:"))
            assert code == 0 and f"[{expected}]" in out and "nan" not in hu_range and "inf" not in hu_range, out

        result_file = tmp_path / f"{name}.json"
        code, out, err = run(["detect", path, *small, "--out", result_file], capsys)
        if expected == "error":
            assert_one_line_error(code, err, path.name)
            assert not result_file.exists()
        else:
            result = json.loads(result_file.read_text(), parse_constant=pytest.fail)  # strict JSON: no NaN
            assert code == 0 and expected in [w["code"] for w in result["input"]["warnings"]], name
            assert f"warning [{expected}]" in err and "Traceback" not in err
            assert all(np.isfinite(f["probability"]) for f in result["detection"]["findings"])

        reports = tmp_path / f"{name}-reports"
        code, out, err = run(["report", path, *small, "--out", reports], capsys)
        case = json.loads(next(reports.glob("*/result.json")).read_text(), parse_constant=pytest.fail)
        if expected == "error":
            assert code == 1 and case["status"] == "failed" and "Traceback" not in err, name
            assert "traceback" not in case["error"] and path.name in case["error"]["message"]
        else:
            assert code == 0 and expected in [w["code"] for w in case["warnings"]], name
        assert (reports / "summary.csv").is_file() and (reports / "index.html").is_file()


def bad_checkpoints(folder: Path) -> dict[str, Path]:
    """Files that are not a CT-CLIP v2 checkpoint, as users mistake them for one."""
    files = {"junk.pt": b"not a checkpoint at all", "empty.pt": b""}
    paths = {}
    for name, content in files.items():
        paths[name] = folder / name
        paths[name].write_bytes(content)
    torch.save({"visual_encoder.patch_embed.proj.weight": torch.zeros(4, 1, 4, 16, 16)}, folder / "fvlm_like.pt")
    paths["fvlm_like.pt"] = folder / "fvlm_like.pt"
    whole = folder / "truncated.pt"
    torch.save({"text_transformer.embeddings.word_embeddings.weight": torch.zeros(100, 8)}, whole)
    whole.write_bytes(whole.read_bytes()[:200])
    paths["truncated.pt"] = whole
    with open(folder / "code.pt", "wb") as handle:  # a pickle that runs code when loaded without weights_only
        pickle.dump(shutil.rmtree, handle)
    paths["code.pt"] = folder / "code.pt"
    return paths


def test_bad_checkpoints_are_one_line_errors(ct_dir, small, tmp_path, capsys):
    config = small[small.index("--model-config") + 1]
    options = ["--model-config", config, "--text-encoder", str(bert_vocab()), "--device", "cpu"]
    for name, path in bad_checkpoints(tmp_path).items():
        with warnings.catch_warnings(record=True) as caught:  # outside pytest a warning prints beside the error
            warnings.simplefilter("always")
            code, out, err = run(["detect", ct_dir / RICORD_3MM, "--weights", path, *options], capsys)
        assert not caught, [f"{w.filename}: {w.message}" for w in caught]
        assert_one_line_error(code, err, name)
        assert tmp_path.exists()  # the code in code.pt never ran


def test_non_finite_voxels_become_air_with_a_warning(chest, small, tmp_path, capsys):
    hu, affine = chest
    hu = hu.copy()
    hu[:10] = np.nan
    path = tmp_path / "nan.nii.gz"
    nib.save(nib.Nifti1Image(hu, affine), str(path))
    code, out, err = run(["info", path, "--json"], capsys)
    summary = json.loads(out)
    assert code == 0 and np.isfinite(summary["hu_range"]).all()
    assert (read_ct(path).hu[:10] == -1024).all()  # outside the field of view: air
    warning = next(w for w in summary["warnings"] if w["code"] == "NON_FINITE")
    assert f"{10 * hu.shape[1] * hu.shape[2]} voxels" in warning["message"]


def test_rotation_is_warned_with_its_angle_and_shear_refused(chest, tmp_path, capsys):
    hu, affine = chest
    rotated, sheared = tmp_path / "rotated.nii.gz", tmp_path / "sheared.nii.gz"
    nib.save(nib.Nifti1Image(hu, affine @ rotation_z(30)), str(rotated))
    shear = affine.copy()
    shear[0, 2] = 0.5 * affine[2, 2]
    nib.save(nib.Nifti1Image(hu, shear), str(sheared))
    code, out, _ = run(["info", rotated], capsys)
    assert code == 0 and "[OBLIQUE] the voxel grid is rotated 30.0°" in out
    code, _, err = run(["info", sheared], capsys)
    assert_one_line_error(code, err, "sheared by 26.6°")
    nearly_straight = tmp_path / "nearly_straight.nii.gz"
    nib.save(nib.Nifti1Image(hu, affine @ rotation_z(0.1)), str(nearly_straight))  # header rounding: no warning
    assert "OBLIQUE" not in run(["info", nearly_straight], capsys)[1]


def test_a_folder_of_cases_lists_what_it_skipped(ct_dir, small, tmp_path, capsys):
    """A DICOM series, two NIfTIs and a PNG: three cases, and the PNG on screen and in summary.csv."""
    inputs = tmp_path / "inputs"
    shutil.copytree(ct_dir / "dcmqi_ct_3slice", inputs / "series")
    for name in ("a.nii.gz", "b.nii.gz"):
        shutil.copy(ct_dir / RICORD_3MM, inputs / name)
    (inputs / "scout.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    code, out, err = run(["report", inputs, *small, "--out", tmp_path / "out"], capsys)
    assert code == 0 and "3 cases: 3 reported" in out
    assert "skipped" in err and "scout.png" in err and "not a CT file (.png)" in err
    summary = (tmp_path / "out" / "summary.csv").read_text()
    row = next(line for line in summary.splitlines() if line.startswith("scout.png"))
    assert ",skipped," in row and "not a CT file (.png)" in row
    assert "3 cases: 3 reported, 0 failed; 1 input files skipped" in (tmp_path / "out" / "index.html").read_text()


def test_a_case_list_with_only_a_header_is_an_error(small, tmp_path, capsys):
    listing = tmp_path / "cases.csv"
    listing.write_text("path\n")
    code, _, err = run(["report", listing, *small, "--out", tmp_path / "out"], capsys)
    assert_one_line_error(code, err, "cases.csv", "lists no cases")


def test_an_output_folder_inside_an_input_series_is_refused(ct_dir, small, tmp_path, capsys):
    series = tmp_path / "series"
    shutil.copytree(ct_dir / RICORD / "dicom", series)
    before = sorted(p.name for p in series.iterdir())
    for out in (series, series / "reports"):
        code, _, err = run(["report", series, *small, "--out", out], capsys)
        assert_one_line_error(code, err, "inside the input series")
    assert sorted(p.name for p in series.iterdir()) == before


def test_a_model_config_of_another_input_size_is_refused_before_any_work(ct_dir, small, tmp_path, capsys):
    config = json.loads(Path(small[small.index("--model-config") + 1]).read_text())
    config["CTViT"]["image_size"] = 80  # a 4 x 4 token grid instead of 24 x 24
    config["CTCLIP"]["dim_image"] = 4 * 4 * config["CTViT"]["dim"]
    other = tmp_path / "other_size.json"
    other.write_text(json.dumps(config))
    weights = small[small.index("--weights") + 1]
    code, _, err = run(["detect", ct_dir / RICORD_3MM, "--weights", weights, "--model-config", other,
                        "--text-encoder", bert_vocab(), "--device", "cpu"], capsys)
    assert_one_line_error(code, err, "80 x 80", "240 x 480 x 480", "--model-config")


def test_unwritable_outputs_fail_at_once_with_one_line(ct_dir, small, capsys):
    unwritable = Path("/sys/kernel")  # exists, and not even root may create files there
    if not unwritable.is_dir():
        pytest.fail("this test needs a read-only folder such as /sys/kernel")
    code, _, err = run(["report", ct_dir / RICORD_3MM, *small, "--out", unwritable], capsys)
    assert_one_line_error(code, err, str(unwritable), "cannot write there")
    code, _, err = run(["detect", ct_dir / "missing.nii.gz", *small, "--out", unwritable / "r.json"], capsys)
    assert_one_line_error(code, err, "--out", "cannot write there")  # before the missing CT is even looked at


def test_a_full_disk_stops_the_batch_keeps_its_work_and_a_rerun_completes(ct_dir, small, tmp_path, capsys,
                                                                          monkeypatch):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for name in ("a", "b", "c"):
        shutil.copy(ct_dir / RICORD_3MM, inputs / f"{name}.nii.gz")
    real_write = batch_module.write_text_atomic
    pages = []

    def fills_up(path: Path, text: str) -> None:  # the second case's page finds the disk full
        pages.append(path)
        if len(pages) == 2:
            raise cannot_write(path, OSError(errno.ENOSPC, "No space left on device"))
        real_write(path, text)

    out = tmp_path / "out"
    monkeypatch.setattr(batch_module, "write_text_atomic", fills_up)
    code, _, err = run(["report", inputs, *small, "--out", out], capsys)
    assert_one_line_error(code, err, "No space left on device", "stopped after 1 of 3 cases", "run the same command")
    statuses = {line.split(",")[0]: line.split(",")[1] for line in (out / "summary.csv").read_text().splitlines()[1:]}
    assert statuses == {"a": "ok", "b": "pending", "c": "pending"}
    monkeypatch.setattr(batch_module, "write_text_atomic", real_write)
    code, stdout, _ = run(["report", inputs, *small, "--out", out], capsys)
    assert code == 0 and "3 cases: 2 reported, 0 failed, 1 already done" in stdout


@pytest.mark.parametrize("device", ["tpu", "", "cuda:7", "cpu:x"])
def test_unknown_devices_are_refused_before_reading_the_ct(ct_dir, device, tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:  # argparse's usage error: the usage line, then one error line
        main(["detect", str(tmp_path / "missing.nii.gz"), "--device", device])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and "Traceback" not in err and "missing.nii.gz" not in err
    assert err.strip().splitlines()[-1].startswith(f"ctfoundation detect: error: argument --device: device '{device}'")


def test_exit_codes_tell_failed_cases_from_fatal_and_internal_errors(ct_dir, small, tmp_path, capsys, monkeypatch):
    listing = tmp_path / "cases.csv"
    listing.write_text(f"path\n{ct_dir / RICORD_3MM}\nmissing.nii.gz\n")
    code, out, _ = run(["report", listing, *small, "--out", tmp_path / "out"], capsys)
    assert code == 1 and "2 cases: 1 reported, 1 failed" in out
    code, _, _ = run(["report", listing, "--out", tmp_path / "out2"], capsys)  # no weights installed: fatal
    assert code == 2

    def broken(*args, **kwargs):
        raise RuntimeError("something nobody anticipated")

    monkeypatch.setattr("CTFoundationLib.cli.ct.summarize", broken)
    code, _, err = run(["info", ct_dir / RICORD_3MM], capsys)
    assert code == 3 and "Traceback" not in err
    line = err.strip()
    assert line.startswith("internal error: RuntimeError: something nobody anticipated") and "report it" in line
    log = Path(line.rsplit(" ", 1)[1])
    assert "Traceback" in log.read_text() and "something nobody anticipated" in log.read_text()
    log.unlink()
