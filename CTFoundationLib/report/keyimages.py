"""Key images of a CT for reports: axial, coronal and sagittal slices in CT windows, as PNG.

Display conventions (radiological, as Slicer shows them):
- axial, seen from the feet: patient's right on the image left, anterior at the top;
- coronal, seen from the front: patient's right on the image left, superior at the top;
- sagittal, seen from the patient's left: anterior on the image left, superior at the top.
Slices are cut from the voxel grid reoriented to the nearest anatomical axes (an oblique grid is shown
as stored, not resampled) and resized so one image pixel covers the same millimetres in both directions.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from CTFoundationLib.io.volume import CTVolume

DISPLAY_AXES = "LPI"  # grid axis 0 grows toward the patient's left, 1 posterior, 2 inferior
# plane -> (grid axis the plane cuts, grid axis down the image rows, grid axis across the columns)
PLANES = {"axial": (2, 1, 0), "coronal": (1, 2, 0), "sagittal": (0, 2, 1)}
# plane -> anatomical direction at the image's (top, bottom, left, right) edge
PLANE_EDGES = {"axial": ("A", "P", "R", "L"), "coronal": ("S", "I", "R", "L"), "sagittal": ("S", "I", "A", "P")}
# plane -> the RAS world axis along which its position is given
PLANE_WORLD_AXIS = {"axial": "z", "coronal": "y", "sagittal": "x"}
OVERLAY_OPACITY = 0.4
MARK_COLOUR = (255, 220, 0)


@dataclass(frozen=True)
class Window:
    """A CT display window: HU in [level - width/2, level + width/2] maps linearly onto 0..255."""

    name: str
    width: float
    level: float

    def to_uint8(self, hu: np.ndarray) -> np.ndarray:
        low = self.level - self.width / 2
        return np.clip((hu - low) * (255.0 / self.width), 0, 255).round().astype(np.uint8)


CHEST_WINDOW = Window("chest", width=400.0, level=40.0)
LUNG_WINDOW = Window("lung", width=1500.0, level=-600.0)


@dataclass(frozen=True)
class Overlay:
    """A mask drawn tinted over the key images. mask_ijk: bool, the same (i, j, k) shape as the volume's `hu`."""

    label: str
    mask_ijk: np.ndarray
    colour: tuple[int, int, int] = (255, 64, 64)
    opacity: float = OVERLAY_OPACITY


@dataclass(frozen=True)
class MarkedPoint:
    """A localised finding: key images are added through it and it is circled where a slice passes through it."""

    label: str
    ras_mm: tuple[float, float, float]


@dataclass
class KeyImage:
    """One rendered slice. position_mm: RAS coordinate of the slice along `world_axis`
    (axial z, coronal y, sagittal x)."""

    plane: str
    window: str
    through: str
    position_mm: float
    width: int
    height: int
    png: bytes

    @property
    def world_axis(self) -> str:
        return PLANE_WORLD_AXIS[self.plane]

    @property
    def edges(self) -> tuple[str, str, str, str]:
        """Anatomical direction at the (top, bottom, left, right) image edge."""
        return PLANE_EDGES[self.plane]

    def data_uri(self) -> str:
        return "data:image/png;base64," + base64.b64encode(self.png).decode("ascii")

    def describe(self) -> dict:
        """JSON-serialisable facts (no pixels)."""
        return {
            "plane": self.plane,
            "window": self.window,
            "through": self.through,
            "position_mm": round(self.position_mm, 2),
            "world_axis": self.world_axis,
            "width": self.width,
            "height": self.height,
        }


def key_images(
    volume: CTVolume,
    points: Sequence[MarkedPoint] = (),
    overlays: Sequence[Overlay] = (),
    windows: Sequence[Window] = (CHEST_WINDOW, LUNG_WINDOW),
    size_px: int = 384,
) -> list[KeyImage]:
    """Axial, coronal and sagittal slices through the volume centre and through each point, in each window.

    size_px: length of the longer image side in pixels. Order: by centre, then plane, then window.
    """
    grid = volume.reoriented(DISPLAY_AXES)
    masks = [(_display_mask(volume, overlay), overlay.colour, overlay.opacity) for overlay in overlays]
    marks = [_grid_voxel(grid, point) for point in points]
    centres = [("volume centre", tuple(n // 2 for n in grid.shape_ijk))]
    centres += [(point.label, mark) for point, mark in zip(points, marks)]
    images = []
    for through, voxel in centres:
        for plane, (cut, _, _) in PLANES.items():
            position = float((grid.affine_ras @ np.array([*voxel, 1.0]))[cut])
            for window in windows:
                image = _render_slice(grid, plane, voxel[cut], window, masks, marks, size_px)
                images.append(KeyImage(plane, window.name, through, position, *image.size, _png(image)))
    return images


def thumbnail_png(volume: CTVolume, plane: str = "coronal", window: Window = LUNG_WINDOW, size_px: int = 128) -> bytes:
    """A small PNG of the slice through the volume centre, for case lists (similar cases); size_px: longer side."""
    grid = volume.reoriented(DISPLAY_AXES)
    cut = PLANES[plane][0]
    return _png(_render_slice(grid, plane, grid.shape_ijk[cut] // 2, window, [], [], size_px))


def _render_slice(grid: CTVolume, plane: str, index: int, window: Window, masks, marks, size_px: int) -> Image.Image:
    """One windowed slice of the display grid, overlays tinted, resized to square mm pixels, marks circled."""
    cut, row_axis, col_axis = PLANES[plane]
    pixels = window.to_uint8(_plane(grid.hu, cut, index).astype(np.float32))
    if not masks and not marks:
        image = Image.fromarray(pixels, "L")
    else:
        rgb = np.repeat(pixels[..., None], 3, axis=2).astype(np.float32)
        for mask, colour, opacity in masks:
            inside = _plane(mask, cut, index)
            rgb[inside] = (1 - opacity) * rgb[inside] + opacity * np.asarray(colour, np.float32)
        image = Image.fromarray(rgb.round().astype(np.uint8), "RGB")
    rows, cols = pixels.shape
    spacing = grid.spacing_ijk_mm
    height_mm, width_mm = rows * spacing[row_axis], cols * spacing[col_axis]
    scale = size_px / max(height_mm, width_mm)
    size = (max(1, round(width_mm * scale)), max(1, round(height_mm * scale)))
    image = image.resize(size, Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(image)
    for mark in marks:
        if mark[cut] == index:
            x, y = (mark[col_axis] + 0.5) * size[0] / cols, (mark[row_axis] + 0.5) * size[1] / rows
            radius = max(6, size_px // 40)
            draw.ellipse((x - radius, y - radius, x + radius, y + radius), outline=MARK_COLOUR, width=2)
    return image


def _plane(array_ijk: np.ndarray, cut: int, index: int) -> np.ndarray:
    """The 2-D slice at `index` along `cut` (a view), transposed so rows run along the higher remaining grid axis."""
    return array_ijk[(slice(None),) * cut + (index,)].T


def _display_mask(volume: CTVolume, overlay: Overlay) -> np.ndarray:
    if overlay.mask_ijk.shape != volume.hu.shape:
        raise ValueError(
            f"overlay '{overlay.label}': mask shape {overlay.mask_ijk.shape} differs from the CT's {volume.hu.shape}"
        )
    return CTVolume(overlay.mask_ijk.astype(bool, copy=False), volume.affine_ras).reoriented(DISPLAY_AXES).hu


def _grid_voxel(grid: CTVolume, point: MarkedPoint) -> tuple[int, int, int]:
    """Nearest display-grid voxel of a RAS point; a point outside the volume is an error."""
    ijk = np.linalg.solve(grid.affine_ras, np.array([*point.ras_mm, 1.0]))[:3]
    voxel = tuple(int(v) for v in np.round(ijk))
    if any(not 0 <= v < n for v, n in zip(voxel, grid.shape_ijk)):
        raise ValueError(f"point '{point.label}' at RAS {tuple(point.ras_mm)} mm lies outside the CT volume")
    return voxel


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
