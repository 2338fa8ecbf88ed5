"""Demo cases: a real sample chest CT with inserted findings, written in the CT-RATE layout.

The base (from the shared data folder, never copied into the repository) is the RICORD unenhanced chest CT:
whole lungs, chest wall and a descending aorta of blood attenuation, so it takes every demo finding (the
TotalSegmentator crops of the shared data are contrast-enhanced and cut through the lungs). Every case: the
base on a 3 mm grid in its own pose (random re-posing, even by 2 degrees and 3 mm, kept the small demo model
from learning the diffuse findings on so few cases), each finding independently with probability
`prevalence`, image noise, then a report from the templates. Output, for each split (train, valid, test):
`<split>/<split>_<n>/<split>_<n>_a/<split>_<n>_a_1.nii.gz` (int16 HU, proper affine), `<split>_reports.csv`,
`<split>_labels.csv` (18 CT-RATE columns), `<split>_findings.json` (type, centre voxel/mm, size, side,
zone of every inserted finding) and `<split>_masks/<volume stem>/<Finding_name>.nii.gz` (the voxels each finding's
inserter changed, uint8 on the case's grid: the layout of `data.finding_masks`, training/finding_masks.py).
"""

from __future__ import annotations

import json
import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from CTFoundationLib.errors import TrainingError
from CTFoundationLib.io.files import write_json_atomic
from CTFoundationLib.io.reading import read_ct
from CTFoundationLib.io.tables import write_csv
from CTFoundationLib.io.volume import CTVolume
from CTFoundationLib.vocab import CT_RATE_ABNORMALITIES

from ..finding_masks import mask_file_name
from .findings import DEMO_FINDINGS, INSERTERS, SPACING_MM, Anatomy, find_anatomy
from .reports import write_report

GENERATOR_VERSION = 10  # bump when the cases change, so cached demo data is rebuilt


BASE_CT = "ct/ricord1a_419639-000082_chest_noncontrast/ct_3mm_iso.nii.gz"


@dataclass(frozen=True)
class DemoDataSpec:
    """How many cases per split, the seed, and how often each finding is inserted."""

    train: int = 400
    valid: int = 40
    test: int = 60
    seed: int = 7
    prevalence: float = 0.4

    def key(self) -> str:
        return f"v{GENERATOR_VERSION}-s{self.seed}-{self.train}-{self.valid}-{self.test}-p{self.prevalence:g}"


def to_working_grid(volume: CTVolume) -> tuple[np.ndarray, np.ndarray]:
    """LPS voxel order at 3 mm isotropic (trilinear) -> (hu, RAS affine)."""
    volume = volume.reoriented("LPS")
    size = [max(1, round(n * s / SPACING_MM)) for n, s in zip(volume.shape_ijk, volume.spacing_ijk_mm)]
    hu = F.interpolate(torch.from_numpy(volume.hu.astype(np.float32))[None, None], size=size, mode="trilinear")[0, 0]
    affine = volume.affine_ras.copy()
    affine[:3, :3] = affine[:3, :3] / np.array(volume.spacing_ijk_mm) * SPACING_MM
    affine[:3, 3] += affine[:3, :3] @ (0.5 * (np.array(volume.spacing_ijk_mm) / SPACING_MM - 1))
    return hu.numpy(), affine


@dataclass(frozen=True)
class LoadedBase:
    """The base on the working grid: HU (float32, LPS voxel order), its anatomy (found once: every case keeps the
    base's pose) and the RAS affine."""

    hu: np.ndarray
    anatomy: Anatomy
    affine: np.ndarray


def load_base(data_root: Path) -> LoadedBase:
    """The base CT on the working grid with its anatomy; a clear error when the shared data is not there."""
    path = check_base(data_root)
    hu, affine = to_working_grid(read_ct(path))
    anatomy = find_anatomy(hu)
    if anatomy.aorta is None:
        raise TrainingError(f"demo data: no descending aorta found in {path}; is it the shared RICORD chest CT?")
    return LoadedBase(hu, anatomy, affine)


def check_base(data_root: Path) -> Path:
    """The base CT's path; a clear error when it is not there (reads nothing)."""
    path = Path(data_root) / BASE_CT
    if not path.is_file():
        raise TrainingError(f"demo data: {path} not found; give the shared data folder (--data, CTFOUNDATION_DATA)")
    return path


def make_case(loaded: LoadedBase, seed: int, prevalence: float, masks: dict[str, np.ndarray] | None = None
              ) -> tuple[np.ndarray, list, tuple[str, str]]:
    """One case: the base with inserted findings -> (int16 HU, inserted records, (findings, impressions)).

    masks: when given, receives each inserted finding's voxels (those its inserter changed) by name.
    """
    rng = np.random.default_rng(seed)
    hu = loaded.hu.copy()
    inserted = []
    for name in DEMO_FINDINGS:
        if rng.random() < prevalence:
            before = hu.copy() if masks is not None else None
            inserted.append(INSERTERS[name](hu, loaded.anatomy, rng))
            if masks is not None:
                masks[name] = hu != before
    hu += rng.normal(0.0, rng.uniform(5.0, 20.0), size=hu.shape).astype(np.float32)
    hu = np.clip(np.round(hu), -1024, 3071).astype(np.int16)
    return hu, inserted, write_report(inserted, rng)


_BASE: list = []  # the base on the working grid, loaded once per worker process


def _load_worker_base(data_root: Path) -> None:
    _BASE[:] = [load_base(data_root)]


def synthesise_case(out: Path, split: str, n: int, seed: int, prevalence: float) -> tuple[dict, dict, dict]:
    """Write case `n` of `split`; returns its reports row, labels row and manifest entry."""
    loaded = _BASE[0]
    masks: dict[str, np.ndarray] = {}
    hu, inserted, (findings_text, impressions) = make_case(loaded, seed, prevalence, masks)
    name = f"{split}_{n}_a_1.nii.gz"
    folder = out / split / f"{split}_{n}" / f"{split}_{n}_a"
    folder.mkdir(parents=True, exist_ok=True)
    affine = loaded.affine
    nib.save(nib.Nifti1Image(hu, affine), str(folder / name))
    mask_folder = out / f"{split}_masks" / name.removesuffix(".nii.gz")
    mask_folder.mkdir(parents=True, exist_ok=True)
    for finding, mask in masks.items():
        nib.save(nib.Nifti1Image(mask.astype(np.uint8), affine), str(mask_folder / mask_file_name(finding)))
    present = {f.name for f in inserted}
    findings = [
        {**asdict(f), "centre_ras_mm": [round(float(v), 1) for v in affine[:3, :3] @ f.centre_ijk + affine[:3, 3]]}
        for f in inserted
    ]
    return (
        {"VolumeName": name, "Findings_EN": findings_text, "Impressions_EN": impressions},
        {"VolumeName": name, **{k: int(k in present) for k in CT_RATE_ABNORMALITIES}},
        {"name": name, "seed": seed, "findings": findings},
    )


def write_split(out: Path, split: str, count: int, spec: DemoDataSpec, pool: Executor, progress) -> None:
    offset = {"train": 0, "valid": 1_000_000, "test": 2_000_000}[split]
    seeds = [spec.seed * 10_000_000 + offset + n for n in range(1, count + 1)]
    jobs = [pool.submit(synthesise_case, out, split, n, seed, spec.prevalence) for n, seed in enumerate(seeds, 1)]
    rows = []
    for job in jobs:
        rows.append(job.result())
        progress(1)
    for kind, table in (("reports", [r[0] for r in rows]), ("labels", [r[1] for r in rows])):
        write_csv(out / f"{split}_{kind}.csv", list(table[0]), table, TrainingError)
    write_json_atomic(out / f"{split}_findings.json", {r[2].pop("name"): r[2] for r in rows})


def build_demo_data(
    data_root: Path, out: Path, spec: DemoDataSpec, progress: Callable[[int], None] = lambda n: None
) -> Path:
    """Write all splits under `out` (skipped when a complete set for this spec is there); returns `out`."""
    marker = out / "complete.json"
    if marker.is_file() and json.loads(marker.read_text()).get("key") == spec.key():
        return out
    check_base(Path(data_root))  # fail early, in this process; the workers load the base themselves
    workers = min(2, os.cpu_count() or 1)
    context = multiprocessing.get_context("spawn")  # forking a process that already runs torch threads can hang
    with ProcessPoolExecutor(workers, context, _load_worker_base, (Path(data_root),)) as pool:
        for split in ("train", "valid", "test"):
            write_split(out, split, getattr(spec, split), spec, pool, progress)
    write_json_atomic(marker, {"key": spec.key(), "spec": asdict(spec), "base": BASE_CT})
    return out
