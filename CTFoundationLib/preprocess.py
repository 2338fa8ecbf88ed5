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

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .volume import CTVolume


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
# clipped; the whole volume padded to the ViT patch multiple. Organ windows come from `crop_around_box`.
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
CTCLIP_DEMO = PreprocessSpec(
    name="ct-clip-demo",
    axis_codes="SLP",
    spacing_mm=(3.0, 3.0, 3.0),
    hu_range=(-1000.0, 1000.0),
    value_range=(-1.0, 1.0),
    shape=(96, 112, 112),
    pad_value=-1.0,
)

SPECS = {spec.name: spec for spec in (CTCLIP_V2, FVLM, CTCLIP_DEMO)}


def preprocess(volume: CTVolume, spec: PreprocessSpec) -> np.ndarray:
    """CT volume -> model-ready float32 array (1, *spec axes)."""
    oriented = volume.reoriented(spec.axis_codes)
    values = resample_hu(oriented.hu, oriented.spacing_ijk_mm, spec)
    if spec.shape is not None:
        values = centre_crop_or_pad(values, spec.shape, spec.pad_value)
    if spec.pad_multiple is not None:
        values = pad_to_multiple(values, spec.pad_multiple, spec.pad_value)
    return values[None]


def resample_hu(hu: np.ndarray, spacing_mm: tuple[float, float, float], spec: PreprocessSpec) -> np.ndarray:
    """Clip, resample to `spec.spacing_mm` (floor sizing, trilinear, float64), map to `spec.value_range`."""
    size = output_size(hu.shape, spacing_mm, spec.spacing_mm)
    low, high = spec.hu_range
    tensor = torch.from_numpy(np.ascontiguousarray(hu)).to(torch.float64)
    if spec.clip_before_resampling:
        tensor.clamp_(low, high)
    resampled = F.interpolate(tensor[None, None], size=size, mode="trilinear", align_corners=False)[0, 0]
    del tensor
    resampled.clamp_(low, high)
    return spec.hu_to_value_(resampled).to(torch.float32).numpy()


def output_size(shape, spacing_mm, target_mm) -> tuple[int, int, int]:
    """Reference sizing: int(n * current / target) per axis (at least 1)."""
    return tuple(max(1, int(n * current / target)) for n, current, target in zip(shape, spacing_mm, target_mm))


def centre_crop_or_pad(values: np.ndarray, shape: tuple[int, ...], pad_value: float) -> np.ndarray:
    """Centre crop (start = (n - t) // 2) then centre pad (before = (t - n) // 2) each axis to `shape`."""
    crop = tuple(slice(max((n - t) // 2, 0), max((n - t) // 2, 0) + t) for n, t in zip(values.shape, shape))
    values = values[crop]
    pads = [((t - n) // 2, t - n - (t - n) // 2) for n, t in zip(values.shape, shape)]
    if any(p for pair in pads for p in pair):
        values = np.pad(values, pads, mode="constant", constant_values=pad_value)
    return np.ascontiguousarray(values)


def pad_to_multiple(values: np.ndarray, multiple: tuple[int, ...], pad_value: float) -> np.ndarray:
    """Pad each axis at its end so its length is a multiple of `multiple`."""
    pads = [(0, -n % m) for n, m in zip(values.shape, multiple)]
    return np.pad(values, pads, mode="constant", constant_values=pad_value) if any(p for _, p in pads) else values


def crop_around_box(
    values: np.ndarray,
    box: tuple[tuple[int, int], ...],
    min_shape: tuple[int, ...],
    multiple: tuple[int, ...],
    pad_value: float,
) -> tuple[np.ndarray, tuple[slice, ...]]:
    """A window centred on `box` ((start, stop) per axis), at least `min_shape`, padded to `multiple`.

    Returns the window and the slices it was cut from (clipped to the array).
    """
    window = []
    for (start, stop), n, minimum, m in zip(box, values.shape, min_shape, multiple):
        length = max(stop - start, minimum)
        length += -length % m
        centre = (start + stop) // 2
        window.append((centre - length // 2, centre - length // 2 + length))
    slices = tuple(slice(max(a, 0), min(b, n)) for (a, b), n in zip(window, values.shape))
    pads = [(max(-a, 0), max(b - n, 0)) for (a, b), n in zip(window, values.shape)]
    cut = values[slices]
    return np.pad(cut, pads, mode="constant", constant_values=pad_value), slices
