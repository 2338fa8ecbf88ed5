"""Where each finding is: CT-CLIP v2 per-token contribution maps, and the same maps in the CT's own voxel grid.

CT-CLIP v2 pools its quantised token grid (B, t, h, w, d) by a mean over t and projects it with one bias-free
linear layer `to_visual_latent` (weight W, (L, h*w*d)), then L2-normalises the latent. For a finding with
prompt latents p ("... is present.") and n ("... is not present."), the zero-shot logit difference is

    s * (p - n) . (W pool(codes)) / |W pool(codes)|
  = sum over tokens (t, h, w) of  s / |W pool(codes)| / t_count * (p - n) . W[:, block(h, w)] . codes[t, h, w]

(s = exp(temperature), block(h, w) = that token position's d columns of W). Each term is one token's exact share
of the logit difference, ln(P / (1 - P)) of the finding's probability: an exact decomposition of the last layer,
in the spirit of class activation maps (CAM). It says which tokens the linear head reads the finding from; it is
not a segmentation and says nothing about how the encoder formed the tokens.

`TokenGrid` holds where the tokens sit in patient coordinates (RAS mm): the inverse of the preprocessing
(reorientation, resampling, centre crop/pad) and the patch size. `FindingMaps.in_ct` resamples a map to a CT's
voxel grid (linear between token centres, 0 outside the model's field of view), so it overlays the CT directly.
"""

from __future__ import annotations

import gzip
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from CTFoundationLib.errors import CTFoundationError
from CTFoundationLib.io.files import atomic_write, require_writable_folder
from CTFoundationLib.io.volume import CTVolume
from CTFoundationLib.models.ctclip import CTCLIP
from CTFoundationLib.preprocess import PreprocessSpec, output_size

MAP_GRIDS = {"ct": ".nii", "tokens": ".nii.gz"}  # where a map file is sampled -> its file suffix


def model_grid_affine(volume: CTVolume, spec: PreprocessSpec) -> np.ndarray:
    """4x4 affine: voxel index of the preprocessed model input (spec axis order) -> RAS mm of `volume`.

    Inverts `preprocess`: reorientation (an axis permutation/flip), the resampling of torch `F.interpolate`
    (align_corners=False: output voxel o samples input index (o + 0.5) * n_in / n_out - 0.5) and the centre
    crop / pad (end padding to a multiple adds nothing before the first voxel).
    """
    oriented = volume.reoriented(spec.axis_codes)
    shape_in = np.array(oriented.shape_ijk, float)
    resampled = np.array(output_size(oriented.shape_ijk, oriented.spacing_ijk_mm, spec.spacing_mm), float)
    scale = shape_in / resampled
    from_resampled = np.eye(4)
    from_resampled[:3, :3] = np.diag(scale)
    from_resampled[:3, 3] = 0.5 * scale - 0.5
    shift = np.zeros(3)
    if spec.shape is not None:
        target = np.array(spec.shape, float)
        crop_start = np.maximum((resampled - target) // 2, 0)
        pad_before = (target - np.minimum(resampled, target)) // 2
        shift = crop_start - pad_before
    from_model = np.eye(4)
    from_model[:3, 3] = shift
    return oriented.affine_ras @ from_resampled @ from_model


@dataclass(frozen=True)
class TokenGrid:
    """Where a model's tokens sit: token index (a, b, c) (spec axis order) -> RAS mm of its centre."""

    shape: tuple[int, int, int]
    affine_ras: np.ndarray

    @classmethod
    def of_model_input(cls, volume: CTVolume, spec: PreprocessSpec, patch: Sequence[int],
                       shape: Sequence[int]) -> TokenGrid:
        """Tokens of `patch` voxels (spec axis order) over the model input `preprocess(volume, spec)`."""
        patch_size = np.array(patch, float)
        to_voxels = np.eye(4)
        to_voxels[:3, :3] = np.diag(patch_size)
        to_voxels[:3, 3] = (patch_size - 1) / 2  # token centre in input voxels
        return cls(tuple(int(n) for n in shape), model_grid_affine(volume, spec) @ to_voxels)

    def axis_toward(self, direction: str) -> int:
        """The token axis that runs closest to an anatomical direction ('S', 'L', 'P', ...; either sense)."""
        world = {"R": 0, "L": 0, "A": 1, "P": 1, "S": 2, "I": 2}[direction]
        return int(np.abs(self.affine_ras[world, :3]).argmax())

    def resample_to(self, values: np.ndarray, volume: CTVolume) -> np.ndarray:
        """A token-grid array -> `volume`'s (i, j, k) voxel grid, float32: linear between token centres, the edge
        tokens' values up to the grid's outer faces, 0 beyond them (outside the model's field of view).

        Both grids are axis-aligned with each other (the preprocessing only permutes, flips and scales axes), so
        the interpolation is separable: one small weight matrix per CT axis.
        """
        token_from_voxel = np.linalg.inv(self.affine_ras) @ volume.affine_ras
        linear = token_from_voxel[:3, :3]
        token_axis = np.abs(linear).argmax(axis=0)  # the token axis each CT axis runs along
        off_axis = np.abs(linear).sum() - np.abs(linear[token_axis, range(3)]).sum()
        if sorted(token_axis) != [0, 1, 2] or off_axis > 1e-4 * np.abs(linear).sum():
            raise CTFoundationError(f"{volume.source or 'CT'}: the token grid is not axis-aligned with the CT's "
                                    "voxels; cannot resample the map")
        weights = [
            _linear_weights(linear[axis_t, axis_v], token_from_voxel[axis_t, 3], volume.shape_ijk[axis_v],
                            self.shape[axis_t])
            for axis_v, axis_t in enumerate(token_axis)
        ]
        letters = "abc"
        spec = "".join(letters) + "," + ",".join(f"{v}{letters[t]}" for v, t in zip("ijk", token_axis)) + "->ijk"
        return np.einsum(spec, values.astype(np.float32), *weights, optimize=True).astype(np.float32)


def _linear_weights(step: float, offset: float, n_voxels: int, n_tokens: int) -> np.ndarray:
    """(n_voxels, n_tokens) linear interpolation weights along one axis; rows of voxels outside the token grid's
    extent [-0.5, n_tokens - 0.5] are 0, those between the outer token centres and the faces take the edge token."""
    position = step * np.arange(n_voxels) + offset
    inside = (position >= -0.5) & (position <= n_tokens - 0.5)
    position = np.clip(position, 0, n_tokens - 1)
    low = np.minimum(np.floor(position).astype(int), n_tokens - 1)
    high = np.minimum(low + 1, n_tokens - 1)
    fraction = (position - low).astype(np.float32)
    weights = np.zeros((n_voxels, n_tokens), np.float32)
    rows = np.arange(n_voxels)
    np.add.at(weights, (rows, low), 1 - fraction)
    np.add.at(weights, (rows, high), fraction)
    weights[~inside] = 0
    return weights


@dataclass
class FindingMaps:
    """Per-finding token maps of one CT: `values` (findings, a, b, c) in logit units, each map summing to its
    finding's zero-shot logit difference ln(P / (1 - P)); `grid` places them in patient space."""

    names: list[str]
    values: np.ndarray
    grid: TokenGrid
    model: str = ""

    def token_map(self, name: str) -> np.ndarray:
        return self.values[self._index(name)]

    def in_ct(self, name: str, volume: CTVolume) -> np.ndarray:
        """The map of `name` on `volume`'s (i, j, k) voxel grid (float32, logit units per token); its geometry is
        `volume.affine_ras`, so it overlays the CT as is."""
        return self.grid.resample_to(self.token_map(name), volume)

    def hottest_ras(self, name: str, volume: CTVolume) -> np.ndarray:
        """RAS mm of the map's maximum over the CT's voxels (the centre of its hottest region in the CT)."""
        values = self.in_ct(name, volume)
        index = np.unravel_index(int(np.argmax(values)), values.shape)
        return volume.affine_ras[:3, :3] @ np.array(index, float) + volume.affine_ras[:3, 3]

    def axial_average(self) -> FindingMaps:
        """The maps averaged along the axial (superior) token axis and spread back evenly over it: each in-plane
        position keeps the exact sum of its column of terms, so every map still sums to its logit difference.

        Use it where only the in-plane position is trusted: CTViT's temporal transformer attends along each
        axial column and the head sees only the column mean, so a finding's share can sit at any height of its
        column (docs/maps.md).
        """
        axis = self.grid.axis_toward("S")
        mean = self.values.mean(axis=1 + axis, keepdims=True)
        return FindingMaps(self.names, np.broadcast_to(mean, self.values.shape).copy(), self.grid, self.model)

    def _index(self, name: str) -> int:
        if name not in self.names:
            raise CTFoundationError(f"no map for '{name}'; maps exist for {self.names}")
        return self.names.index(name)


def raw_token_terms(model: CTCLIP, codes: torch.Tensor, prompt_latents: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-token terms before the L2 normalisation, and the per-image factor that turns them into logits.

    codes: (B, t, h, w, d) quantised token grid; prompt_latents: (P, 2, L) [present, not present], L2-normalised.
    -> terms (B, P, t, h, w) float64: (p - n) . W[:, block(h, w)] . codes[t, h, w] / t, summing to (p - n) . W
    pool(codes); factor (B,) float64: exp(temperature) / |W pool(codes)|.
    """
    codes = codes.to(torch.float64)
    weight = model.to_visual_latent.weight.detach().cpu()
    difference = (prompt_latents[:, 0] - prompt_latents[:, 1]).to(weight)  # (P, L)
    raw_latent = model.pool_tokens(codes).to(weight) @ weight.t()  # (B, L), float32: W is too big for float64
    factor = float(model.logit_scale) / raw_latent.to(torch.float64).norm(dim=-1)
    return head_token_terms((difference @ weight).to(torch.float64), codes), factor


def head_token_terms(direction: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """direction (P, h*w*d): a latent-space direction read back through `to_visual_latent` ((p - n) . W), in the
    (h, w, d) order `pool_tokens` flattens; codes (B, t, h, w, d) -> (B, P, t, h, w) terms summing over (t, h, w)
    to direction . pool(codes). Differentiable, in the inputs' dtype (training uses it for its localisation loss)."""
    t, h, w, d = codes.shape[1:]
    return torch.einsum("phwd,bthwd->bpthw", direction.view(-1, h, w, d), codes) / t


def token_contributions(model: CTCLIP, codes: torch.Tensor, prompt_latents: torch.Tensor) -> torch.Tensor:
    """Exact per-token terms of the zero-shot logit differences, (B, P, t, h, w) float64 in logit units: they sum
    over (t, h, w) to logit(present) - logit(not present) of each finding."""
    terms, factor = raw_token_terms(model, codes, prompt_latents)
    return terms * factor[:, None, None, None, None]


@dataclass(frozen=True)
class MapFile:
    """One written map: its file, and the RAS mm position and value (logit units) of its maximum in the CT."""

    name: str
    path: Path
    hottest_ras_mm: tuple[float, float, float]
    maximum: float

    def record(self) -> dict:
        """JSON-ready, the file by name (it lies in the maps folder)."""
        return {"file": self.path.name, "hottest_ras_mm": [round(v, 2) for v in self.hottest_ras_mm],
                "maximum": round(self.maximum, 6)}


def write_map_niftis(maps: FindingMaps, volume: CTVolume, folder: Path, names: Sequence[str] | None = None,
                     grid: str = "ct") -> dict[str, MapFile]:
    """One NIfTI per finding (all, or `names`) in `folder`, float32 in logit units -> {finding: file}.

    grid "ct": on the CT's voxel grid and affine (`in_ct`), uncompressed `.nii` (the interpolated values do not
    compress, and writing stays fast); "tokens": the token grid with its own affine (`.nii.gz`, a few KB), in the
    same patient space, for viewers that resample for display (Slicer).
    """
    import nibabel as nib

    if grid not in MAP_GRIDS:
        raise CTFoundationError(f"map grid '{grid}': use one of {list(MAP_GRIDS)}")
    require_writable_folder(folder, "maps folder")
    written = {}
    for name in names or maps.names:
        path = Path(folder) / map_file_name(name, grid)
        values = maps.in_ct(name, volume)
        stored, affine = (values, volume.affine_ras) if grid == "ct" else (maps.token_map(name), maps.grid.affine_ras)
        image = nib.Nifti1Image(stored.astype(np.float32), affine)
        image.header["descrip"] = f"ctfoundation map {maps.model}"[:79].encode()
        payload = image.to_bytes()
        with atomic_write(path, "wb") as handle:
            handle.write(payload if grid == "ct" else gzip.compress(payload))
        peak = np.unravel_index(int(np.argmax(values)), values.shape)
        hottest = volume.affine_ras[:3, :3] @ np.array(peak, float) + volume.affine_ras[:3, 3]
        written[name] = MapFile(name, path, tuple(float(v) for v in hottest), float(values[peak]))
    return written


def maps_record(folder: Path, written: dict[str, MapFile], model: str, grid: str = "ct") -> dict:
    """What a result JSON says about the maps: where, what they are, and each finding's file and maximum."""
    return {"folder": str(folder), "model": model, "grid": grid,
            "units": "logit (each token's share of ln(P / (1 - P)))",
            "findings": {name: file.record() for name, file in written.items()}}


def read_map_files(files: Mapping[str, Path | str], model: str = "") -> FindingMaps:
    """Maps written by `write_map_niftis` (either grid; all of one CT, so on one grid) -> FindingMaps of those
    findings, placed by the files' own affines (e.g. the token-grid maps a Slicer detection kept)."""
    import nibabel as nib

    values, affines = [], []
    for name, path in files.items():
        try:
            image = nib.load(str(path))
            values.append(np.asarray(image.dataobj, dtype=np.float32))
        except (OSError, ValueError, nib.filebasedimages.ImageFileError) as error:
            raise CTFoundationError(f"map of '{name}': {path} cannot be read ({error})") from None
        affines.append(image.affine)
    if not values or any(v.shape != values[0].shape or not np.allclose(a, affines[0], atol=1e-4)
                         for v, a in zip(values, affines)):
        raise CTFoundationError(f"maps {[str(p) for p in files.values()]}: give the maps of one CT, on one grid")
    return FindingMaps(list(files), np.stack(values), TokenGrid(values[0].shape, affines[0]), model)


def map_file_name(name: str, grid: str = "ct") -> str:
    """'Lung nodule' -> 'Lung_nodule.nii' (CT grid) or 'Lung_nodule.nii.gz' (token grid)."""
    return name.replace(" ", "_") + MAP_GRIDS[grid]
