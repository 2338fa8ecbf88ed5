"""Training-time augmentation of model inputs.

`random_shift` moves each image of a batch by a random whole number of voxels along each axis, filling what comes
in with the preprocessing's pad value (`data.shift_voxels`). Meant for training sets whose cases share one pose
(the demo cases are one base CT with inserted findings), where a head can read a finding against anatomy that sits
at the same tokens in every case. On the demo it did not make the finding maps point better and up to one token of
shift stalled the contrastive stage at chance (docs/maps.md), so the demo recipe does not use it.
"""

from __future__ import annotations

import torch


def shift_one(image: torch.Tensor, offsets: list[int], fill: float) -> torch.Tensor:
    """image (C, *axes) moved by `offsets` voxels along the spatial axes (content at i goes to i + offset)."""
    out = torch.full_like(image, fill)
    source, target = [slice(None)], [slice(None)]
    for offset, size in zip(offsets, image.shape[1:]):
        source.append(slice(max(0, -offset), size - max(0, offset)))
        target.append(slice(max(0, offset), size - max(0, -offset)))
    out[tuple(target)] = image[tuple(source)]
    return out


def random_shift(images: torch.Tensor, max_voxels: tuple[int, ...], fill: float,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """images (B, C, *axes), each shifted by its own offsets drawn uniformly from [-m, m] per axis."""
    bounds = torch.tensor(max_voxels)
    draws = torch.rand(len(images), len(max_voxels), generator=generator)
    offsets = (draws * (2 * bounds + 1)).floor().long() - bounds
    return torch.stack([shift_one(image, o.tolist(), fill) for image, o in zip(images, offsets)])
