"""Model preprocessing as data: one small `PreprocessSpec` per model, one implementation for all.

Steps, in order (each spec says how):
1. reorient the voxel axes so output axis n grows toward `axis_codes[n]` (views, no copy);
2. clip HU to `hu_range` (CT-CLIP: before resampling; fVLM: after it, see `clip_before_resampling`);
3. resample trilinearly (torch `F.interpolate`, `align_corners=False`, float64) to `spacing_mm`, with
   new size = floor(n * current / target) per axis — as both references do;
4. map `hu_range` linearly onto `value_range`;
5. centre crop / centre pad (with `pad_value`) to `shape`, and/or pad at the end to a multiple of
   `pad_multiple`;
6. add a channel axis: float32 (1, *shape).

The CT-CLIP reference resamples with the first in-plane spacing for both in-plane axes; we use each
axis's own spacing (identical for the square pixels of real CTs, and right for the rest).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from CTFoundationLib.io.volume import CTVolume

Array = TypeVar("Array", np.ndarray, torch.Tensor)


@dataclass(frozen=True)
class PreprocessSpec:
    """How one model wants its input. Axis tuples follow `axis_codes` order."""

    name: str
    axis_codes: str
    spacing_mm: tuple[float, float, float]
    hu_range: tuple[float, float]
    value_range: tuple[float, float]
    shape: tuple[int, int, int] | None = None
    pad_value: float = 0.0
    pad_multiple: tuple[int, int, int] | None = None
    clip_before_resampling: bool = True

    def hu_to_value_(self, hu: torch.Tensor) -> torch.Tensor:
        """Linear map of `hu_range` onto `value_range`, in place (no clipping)."""
        (h0, h1), (v0, v1) = self.hu_range, self.value_range
        return hu.sub_(h0).mul_((v1 - v0) / (h1 - h0)).add_(v0)


# CT-CLIP v2 and CT-CHAT: axis 0 -> superior, 1 -> patient's left, 2 -> posterior (CT-RATE's SLP arrays),
# z 1.5 mm, y/x 0.75 mm, HU [-1000, 1000] -> [-1, 1], 240 x 480 x 480 padded with -1.
CTCLIP_V2 = PreprocessSpec(
    name="ct-clip-v2",
    axis_codes="SLP",
    spacing_mm=(1.5, 0.75, 0.75),
    hu_range=(-1000.0, 1000.0),
    value_range=(-1.0, 1.0),
    shape=(240, 480, 480),
    pad_value=-1.0,
)

# fVLM: (Z, Y, X) = (superior, posterior, left) at 3 x 1 x 1 mm, resampled in HU, then [-1150, 350] -> [0, 1]
# clipped; the whole volume padded to the ViT patch multiple. Organ windows: `FVLM_WINDOWS` below.
FVLM = PreprocessSpec(
    name="fvlm",
    axis_codes="SPL",
    spacing_mm=(3.0, 1.0, 1.0),
    hu_range=(-1150.0, 350.0),
    value_range=(0.0, 1.0),
    pad_value=0.0,
    pad_multiple=(16, 16, 32),
    clip_before_resampling=False,
)

# The CT-CLIP demo model (trained here on synthetic-finding cases, see training/demo): CT-CLIP v2's axes, HU
# window and padding at a coarse 3 mm isotropic grid, 96 x 112 x 112 (288 x 336 x 336 mm).
CTCLIP_DEMO = replace(CTCLIP_V2, name="ct-clip-demo", spacing_mm=(3.0, 3.0, 3.0), shape=(96, 112, 112))

# The fVLM demo model (training/demo/fvlm_demo.py): fVLM's axes and HU window on the demo cases' 3 mm isotropic grid.
FVLM_DEMO = replace(FVLM, name="fvlm-demo", spacing_mm=(3.0, 3.0, 3.0), pad_multiple=(8, 8, 16))

SPECS = {spec.name: spec for spec in (CTCLIP_V2, FVLM, CTCLIP_DEMO, FVLM_DEMO)}


def preprocess(volume: CTVolume, spec: PreprocessSpec) -> np.ndarray:
    """CT volume -> model-ready float32 array (1, *spec axes)."""
    return preprocess_tensor(volume, spec).numpy()


def preprocess_tensor(volume: CTVolume, spec: PreprocessSpec, device: str | torch.device = "cpu") -> torch.Tensor:
    """CT volume -> model-ready float32 tensor (1, *spec axes) on `device`, where the work is done (the HU go there
    as read; on CUDA the same float64 maths as on CPU)."""
    oriented = volume.reoriented(spec.axis_codes)
    values = resample_hu_tensor(oriented.hu, oriented.spacing_ijk_mm, spec, device)
    if spec.shape is not None:
        values = centre_crop_or_pad(values, spec.shape, spec.pad_value)
    if spec.pad_multiple is not None:
        values = pad_end_to_multiple(values, spec.pad_multiple, spec.pad_value)
    return values[None]


def resample_hu(hu: np.ndarray, spacing_mm: tuple[float, float, float], spec: PreprocessSpec) -> np.ndarray:
    """Clip, resample to `spec.spacing_mm` (floor sizing, trilinear, float64), map to `spec.value_range`."""
    return resample_hu_tensor(hu, spacing_mm, spec).numpy()


def resample_hu_tensor(hu: np.ndarray, spacing_mm: tuple[float, float, float], spec: PreprocessSpec,
                       device: str | torch.device = "cpu") -> torch.Tensor:
    """`resample_hu` computed on `device`: a float32 tensor there."""
    size = output_size(hu.shape, spacing_mm, spec.spacing_mm)
    low, high = spec.hu_range
    tensor = torch.from_numpy(np.ascontiguousarray(hu)).to(device).to(torch.float64)
    if spec.clip_before_resampling:
        tensor.clamp_(low, high)
    resampled = F.interpolate(tensor[None, None], size=size, mode="trilinear", align_corners=False)[0, 0]
    del tensor
    resampled.clamp_(low, high)
    return spec.hu_to_value_(resampled).to(torch.float32)


def output_size(shape, spacing_mm, target_mm) -> tuple[int, int, int]:
    """Reference sizing: int(n * current / target) per axis (at least 1)."""
    return tuple(max(1, int(n * current / target)) for n, current, target in zip(shape, spacing_mm, target_mm))


def centre_crop_or_pad(values: Array, shape: tuple[int, ...], pad_value: float) -> Array:
    """Centre crop (start = (n - t) // 2) then centre pad (before = (t - n) // 2) each axis to `shape`; a numpy
    array or a tensor (on its device)."""
    if isinstance(values, np.ndarray):
        return centre_crop_or_pad(torch.from_numpy(values), shape, pad_value).numpy()
    crop = tuple(slice(max((n - t) // 2, 0), max((n - t) // 2, 0) + t) for n, t in zip(values.shape, shape))
    values = values[crop]
    pads = [((t - n) // 2, t - n - (t - n) // 2) for n, t in zip(values.shape, shape)]
    if any(p for pair in pads for p in pair):
        values = F.pad(values, [p for pair in reversed(pads) for p in pair], value=pad_value)  # last axis first
    return values.contiguous()


@dataclass(frozen=True)
class OrganWindowSpec:
    """How an organ-wise model cuts its input around anatomy masks. Tuples in (Z, Y, X) voxels of the spec grid.

    1. crop the volume to the box of all organs widened by `box_margin` (clipped to the volume);
    2. pad symmetrically with the spec's pad value to at least `min_shape`;
    3. per organ, a window of size max(`roi`, organ extent) centred on the organ's box, shifted to stay inside;
    4. pad the window at its end to a multiple of the spec's `pad_multiple`.
    """

    box_margin: tuple[int, int, int]
    min_shape: tuple[int, int, int]
    roi: tuple[int, int, int]


# fVLM's data preparation (crop +5 slices / +20 voxels, pad to 112 x 256 x 352) and eval.py's roi.
FVLM_WINDOWS = OrganWindowSpec(box_margin=(5, 20, 20), min_shape=(112, 256, 352), roi=(112, 288, 352))
# The demo's 3 mm grid: the same margins in mm (15, 20, 20 -> 5, 7, 7 voxels); one window holds the whole chest
# (312 x 240 x 384 mm), so every organ is pooled from the same, whole-volume pass it was trained on.
FVLM_DEMO_WINDOWS = OrganWindowSpec(box_margin=(5, 7, 7), min_shape=(104, 80, 128), roi=(104, 80, 128))
ORGAN_WINDOWS = {FVLM.name: FVLM_WINDOWS, "fvlm-demo": FVLM_DEMO_WINDOWS}  # by PreprocessSpec name


def resample_labels(labels: np.ndarray, spacing_mm: tuple[float, float, float], spec: PreprocessSpec) -> np.ndarray:
    """Integer labels resampled like `resample_hu` sizes them, with nearest-neighbour (torch 'nearest') -> uint8."""
    size = output_size(labels.shape, spacing_mm, spec.spacing_mm)
    tensor = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.uint8))[None, None]
    return F.interpolate(tensor, size=size, mode="nearest")[0, 0].numpy()


def crop_to_labels(values: np.ndarray, labels: np.ndarray, margin: tuple[int, ...]) -> tuple[slice, ...]:
    """Slices of the box of all labels > 0 widened by `margin`: [max(first - m, 0) : min(last + m, n)) per axis."""
    nonzero = np.nonzero(labels)
    if not nonzero[0].size:
        raise ValueError("no labelled voxel to crop around")
    return tuple(
        slice(max(int(idx.min()) - m, 0), min(int(idx.max()) + m, n))
        for idx, m, n in zip(nonzero, margin, values.shape)
    )


def pad_symmetric(values: np.ndarray, min_shape: tuple[int, ...], pad_value: float) -> np.ndarray:
    """MONAI SpatialPad (method 'symmetric'): pad each axis to at least `min_shape`, the odd voxel at the end."""
    from monai.transforms import SpatialPad

    pad = SpatialPad(min_shape, method="symmetric", mode="constant", value=pad_value)
    return np.asarray(pad(torch.from_numpy(values)[None]))[0]


def pad_end_to_multiple(values: Array, multiple: tuple[int, ...], pad_value: float) -> Array:
    """MONAI DivisiblePad (method 'end'): pad each axis at its end to a multiple of `multiple`; a numpy array or a
    tensor (on its device)."""
    from monai.transforms import DivisiblePad

    pad = DivisiblePad(multiple, method="end", mode="constant", value=pad_value)
    if isinstance(values, np.ndarray):
        return np.asarray(pad(torch.from_numpy(np.ascontiguousarray(values))[None]))[0]
    return pad(values[None])[0].as_subclass(torch.Tensor)


def organ_window(organ: np.ndarray, roi: tuple[int, ...]) -> tuple[slice, ...]:
    """Window around the True voxels of `organ`: size max(roi, last - first) per axis, centred at
    (first + last) // 2, start clipped at 0, stop at the volume end, then moved back so the size holds
    where the volume allows (fVLM eval.py's centre crop).
    """
    window = []
    for axis, (n, size) in enumerate(zip(organ.shape, roi)):
        present = np.nonzero(organ.any(axis=tuple(a for a in range(organ.ndim) if a != axis)))[0]
        first, last = int(present[0]), int(present[-1])
        size = max(size, last - first)
        start = max(0, (first + last) // 2 - size // 2)
        stop = min(n, start + size)
        window.append(slice(max(0, stop - size), stop))
    return tuple(window)
