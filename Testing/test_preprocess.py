"""CT-CLIP / fVLM preprocessing: golden fixtures, tensor contract, and orientation checked on real anatomy."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from anatomy_checks import (
    body_mask,
    bowel_gas_axis0,
    heart_offset_axis1,
    lung_extent,
    lung_mask,
    scanned_extent,
    spine_offset_axis2,
)
from conftest import data_root, fixture_folders
from safetensors.numpy import load_file

from CTFoundationLib.io.reading import read_ct
from CTFoundationLib.preprocess import (
    CTCLIP_V2,
    FVLM,
    centre_crop_or_pad,
    crop_to_labels,
    organ_window,
    pad_end_to_multiple,
    pad_symmetric,
    preprocess,
    preprocess_tensor,
)

RICORD = "ricord1a_419639-000082_chest_noncontrast"


def _find_input(name: str, sha256: str) -> Path:
    for candidate in data_root().rglob(name):
        if hashlib.sha256(candidate.read_bytes()).hexdigest() == sha256:
            return candidate
    pytest.fail(f"input {name} with sha256 {sha256[:12]}… not found under {data_root()}")


def _expected_from_output(key: str, output: np.ndarray) -> np.ndarray:
    """Recompute a stored reduction named like 'sum_over_axes_1_2' or 'axis0_slice_060' from our output."""
    if match := re.fullmatch(r"sum_over_axes_(\d)_(\d)", key):
        return output.astype(np.float64).sum(axis=(int(match[1]), int(match[2])))
    if match := re.fullmatch(r"axis(\d)_slice_(\d+)", key):
        return np.take(output, int(match[2]), axis=int(match[1]))
    raise AssertionError(f"fixture key {key} has no known meaning")


@pytest.mark.parametrize("folder", fixture_folders("preprocess_ctclip_v2_"), ids=lambda p: p.name)
def test_ctclip_preprocessing_matches_reference_fixture(folder: Path):
    config = json.loads((folder / "config.json").read_text())
    expected = load_file(folder / "expected.safetensors")
    source = _find_input(config["input_file"], config["input_sha256"])
    rescale = (config.get("rescale_slope", 1.0), config.get("rescale_intercept", 0.0))
    output = preprocess(read_ct(source, rescale=None if rescale == (1.0, 0.0) else rescale), CTCLIP_V2)
    assert output.dtype == np.float32 and output.shape[0] == 1
    volume = output[0]
    assert set(expected) == set(config["expected_keys"])
    for key, shape in config["expected_keys"].items():
        assert list(expected[key].shape) == shape
        np.testing.assert_allclose(_expected_from_output(key, volume), expected[key], rtol=1e-4, atol=1e-4, err_msg=key)
    stats = config["global"]
    assert volume.min() == pytest.approx(stats["min"], abs=1e-4)
    assert volume.max() == pytest.approx(stats["max"], abs=1e-4)
    assert volume.mean(dtype=np.float64) == pytest.approx(stats["mean"], abs=1e-4)
    assert int((volume == -1.0).sum()) == stats["count_pad_minus_one"]


@pytest.fixture(scope="module")
def ricord_dicom_tensor(ct_dir):
    return preprocess(read_ct(ct_dir / RICORD / "dicom"), CTCLIP_V2)


@pytest.fixture(scope="module")
def ricord_nifti_tensor(ct_dir):
    return preprocess(read_ct(ct_dir / RICORD / "ct_3mm_iso.nii.gz"), CTCLIP_V2)


def test_ctclip_tensor_contract_on_real_dicom(ricord_dicom_tensor):
    tensor = ricord_dicom_tensor
    assert tensor.shape == (1, 240, 480, 480) and tensor.dtype == np.float32
    assert tensor.min() == -1.0 and tensor.max() <= 1.0
    # 255 slices x 1.25 mm -> 212 slices at 1.5 mm, centred: 14 padded slices of exactly -1 on each side.
    assert np.all(tensor[0, :14] == -1.0) and np.all(tensor[0, -14:] == -1.0)
    assert not np.all(tensor[0, 14] == -1.0) and not np.all(tensor[0, 225] == -1.0)
    # 512 x 0.703 mm = 360 mm -> 480 voxels at 0.75 mm: no in-plane padding or cropping, body in the middle.
    assert tensor[0, 120, 240, 240] > -0.5


def test_dicom_and_nifti_of_the_same_scan_agree(ct_dir, ricord_dicom_tensor):
    dicom = read_ct(ct_dir / RICORD / "dicom")
    nifti = read_ct(ct_dir / RICORD / "ct_1p5mm_iso.nii.gz")
    np.testing.assert_allclose(dicom.affine_ras[:3, 3], nifti.affine_ras[:3, 3], atol=1e-3)
    assert dicom.orientation_code == nifti.orientation_code == "LPS"
    # Sample the NIfTI grid's centres inside the body and read the DICOM voxel at the same world point.
    rng = np.random.default_rng(0)
    ijk = rng.integers(20, np.array(nifti.shape_ijk) - 20, size=(4000, 3))
    world = nib.affines.apply_affine(nifti.affine_ras, ijk)
    dicom_ijk = np.rint(nib.affines.apply_affine(np.linalg.inv(dicom.affine_ras), world)).astype(int)
    a = nifti.hu[tuple(ijk.T)].astype(float)
    b = np.clip(dicom.hu[tuple(dicom_ijk.T)].astype(float), -1024, 3071)
    assert np.corrcoef(a, b)[0, 1] > 0.95
    assert np.median(np.abs(a - b)) < 40
    # and the model tensors agree (the NIfTI is smoother, so compare coarse structure)
    coarse = preprocess(nifti, CTCLIP_V2)[0, ::4, ::4, ::4]
    assert np.corrcoef(coarse.ravel(), ricord_dicom_tensor[0, ::4, ::4, ::4].ravel())[0, 1] > 0.97


def assert_ctclip_anatomy(values: np.ndarray) -> None:
    """Axis 0 inferior -> superior, axis 1 right -> left, axis 2 anterior -> posterior, on real anatomy."""
    body = body_mask(values)
    lungs = lung_mask(values, body)
    scan_first, scan_last = scanned_extent(values)
    lung_first, lung_last = lung_extent(lungs)
    # The scan runs from the upper abdomen (low axis 0) to the apices (high axis 0) ...
    assert lung_first - scan_first > 1.5 * (scan_last - lung_last), "lung apices should sit at high axis-0"
    # ... and the stomach / colon gas lies below the lungs' centre.
    assert bowel_gas_axis0(values, body, lungs) < lung_first + 0.25 * (lung_last - lung_first)
    assert heart_offset_axis1(values, body, lungs) > 3, "heart should lie toward +axis 1 (patient's left)"
    assert spine_offset_axis2(values, body) > 15, "spine should lie toward +axis 2 (posterior)"


def test_ctclip_orientation_is_anatomical_on_dicom(ricord_dicom_tensor):
    assert_ctclip_anatomy(ricord_dicom_tensor[0, :, ::2, ::2])


def test_anatomy_checks_catch_a_flipped_axis(ricord_nifti_tensor):
    values = ricord_nifti_tensor[0, :, ::2, ::2]
    for flipped in (values[::-1], values[:, ::-1], values[:, :, ::-1]):
        with pytest.raises(AssertionError):
            assert_ctclip_anatomy(np.ascontiguousarray(flipped))


@pytest.mark.parametrize(
    "transform",
    [
        pytest.param((0, 1, 2, (True, False, False)), id="flip-i"),
        pytest.param((2, 0, 1, (False, True, False)), id="permute-kij-flip-j"),
        pytest.param((1, 2, 0, (True, True, True)), id="permute-jki-flip-all"),
    ],
)
def test_reordered_copy_gives_the_same_tensor_and_anatomy(ct_dir, tmp_path, ricord_nifti_tensor, transform):
    *order, flips = transform
    image = nib.load(ct_dir / RICORD / "ct_3mm_iso.nii.gz")
    data = np.asanyarray(image.dataobj)
    affine = image.affine.copy()
    for axis, flip in enumerate(flips):  # flipping axis n: index i -> n-1-i, world unchanged
        if flip:
            data = np.flip(data, axis)
            affine = affine @ _flip_matrix(axis, image.shape[axis])
    data = np.transpose(data, order)
    permute = np.eye(4)
    permute[:3, :3] = np.eye(3)[:, order]
    affine = affine @ permute
    path = tmp_path / "reordered.nii.gz"
    nib.save(nib.Nifti1Image(np.ascontiguousarray(data), affine), path)
    copy = read_ct(path)
    assert copy.orientation_code != "LPS"
    tensor = preprocess(copy, CTCLIP_V2)
    np.testing.assert_array_equal(tensor, ricord_nifti_tensor)
    assert_ctclip_anatomy(tensor[0, :, ::2, ::2])


def _flip_matrix(axis: int, length: int) -> np.ndarray:
    matrix = np.eye(4)
    matrix[axis, axis] = -1
    matrix[axis, 3] = length - 1
    return matrix


def test_fvlm_tensor_contract(ct_dir):
    tensor = preprocess(read_ct(ct_dir / RICORD / "ct_3mm_iso.nii.gz"), FVLM)
    # 318 mm / 3 mm -> 106 slices, 360 mm / 1 mm -> 360 voxels; padded to multiples of (16, 16, 32).
    assert tensor.shape == (1, 112, 368, 384) and tensor.dtype == np.float32
    assert tensor.min() >= 0.0 and tensor.max() <= 1.0
    assert np.all(tensor[0, 106:] == 0.0) and np.all(tensor[0, :, 360:] == 0.0)
    # (Z, Y, X) = (S, P, L): the spine (bright, posterior) is at high Y in the body's middle slice.
    middle = tensor[0, 53, :360, :360]
    bone_rows = np.nonzero(middle.max(axis=1) > (300 + 1150) / 1500)[0]
    assert np.median(bone_rows) > 180


def test_centre_crop_and_pad_follow_the_reference_rule():
    values = np.arange(10, dtype=np.float32).reshape(10, 1, 1)
    np.testing.assert_array_equal(centre_crop_or_pad(values, (4, 1, 1), -1)[:, 0, 0], [3, 4, 5, 6])
    padded = centre_crop_or_pad(values[:3], (6, 1, 1), -1)[:, 0, 0]
    np.testing.assert_array_equal(padded, [-1, 0, 1, 2, -1, -1])


def test_organ_window_centres_clamps_and_grows_like_fvlm_eval():
    organ = np.zeros((40, 300, 400), bool)
    organ[10:21, 5:50, 385:396] = True  # box z 10..20, y 5..49, x 385..395 (inclusive)
    z, y, x = organ_window(organ, (16, 64, 32))
    assert (z.start, z.stop) == (7, 23)  # centre 15, start 15 - 8
    assert (y.start, y.stop) == (0, 64)  # centre 27 - 32 < 0 -> starts at 0
    assert (x.start, x.stop) == (368, 400)  # centre 390 + 16 > 400 -> moved back to end at 400
    wide = np.zeros((40, 300, 400), bool)
    wide[0:40, 100:101, 0:400] = True  # x extent 399 > roi: size = last - first, as the reference
    assert organ_window(wide, (16, 64, 32))[2] == slice(0, 399)
    assert organ_window(wide, (64, 64, 32))[0] == slice(0, 40)  # volume shorter than the roi


def test_crop_and_pads_follow_monai_rules():
    labels = np.zeros((30, 60, 70), np.uint8)
    labels[10:12, 25:30, 1:2] = 3
    assert crop_to_labels(labels, labels, (5, 20, 20)) == (slice(5, 16), slice(5, 49), slice(0, 21))
    values = np.ones((3, 5, 6), np.float32)
    padded = pad_symmetric(values, (6, 5, 4), 0.0)
    assert padded.shape == (6, 5, 6) and padded[:1].sum() == 0 and padded[1:4].all() and padded[4:].sum() == 0
    ended = pad_end_to_multiple(values, (4, 4, 4), 0.0)
    assert ended.shape == (4, 8, 8) and ended[:3, :5, :6].all() and ended.sum() == values.sum()



@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the CPU path is the one the fixtures check")
def test_preprocessing_on_cuda_equals_the_cpu_result(ct_dir, ricord_nifti_tensor):
    """One implementation: on CUDA the tensor path gives the CPU arrays within 1e-4 (CT-CLIP crop/pad; fVLM pad
    to a multiple) and stays on the device."""
    volume = read_ct(ct_dir / RICORD / "ct_3mm_iso.nii.gz")
    for spec, expected in ((CTCLIP_V2, ricord_nifti_tensor), (FVLM, preprocess(volume, FVLM))):
        tensor = preprocess_tensor(volume, spec, "cuda")
        assert tensor.is_cuda and tensor.dtype == torch.float32 and type(tensor) is torch.Tensor
        np.testing.assert_allclose(tensor.cpu().numpy(), expected, rtol=0, atol=1e-4)
