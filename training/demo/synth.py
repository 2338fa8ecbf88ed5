"""Demo cases: real sample chest CTs, randomly re-posed, with inserted findings, written in the CT-RATE layout.

Bases (from the shared data folder, never copied into the repository): the RICORD non-contrast chest CT,
the only one with whole lungs, takes the lung, pleural and device findings (60 % of the cases); the two
TotalSegmentator chest crops (heart and great vessels, slivers of lung) take the arterial wall
calcifications on their aorta / pulmonary-artery masks and devices (20 % each). Every case: a base drawn
with those weights, on a 3 mm grid in the base's own pose (random re-posing, even by 2 degrees and 3 mm, kept
the small demo model from learning the diffuse findings on so few cases), each of the base's findings independently with probability
`prevalence`, image noise, then a report from the templates. Output, for each split
(train, valid, test): `<split>/<split>_<n>/<split>_<n>_a/<split>_<n>_a_1.nii.gz` (int16 HU, proper
affine), `<split>_reports.csv`, `<split>_labels.csv` (18 CT-RATE columns) and `<split>_findings.json`
(type, centre voxel/mm, size, side, zone of every inserted finding).
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
from CTFoundationLib.models.ctclip import CT_RATE_ABNORMALITIES
from CTFoundationLib.reading import read_ct
from CTFoundationLib.report_tables import write_csv
from CTFoundationLib.volume import CTVolume
from CTFoundationLib.weights.cache import write_json_atomic

from .findings import DEMO_FINDINGS, INSERTERS, SPACING_MM, Anatomy, find_anatomy
from .reports import write_report

GENERATOR_VERSION = 6  # bump when the cases change, so cached demo data is rebuilt


LUNG_BASE_FINDINGS = tuple(name for name in DEMO_FINDINGS if name != "Arterial wall calcification")
VESSEL_BASE_FINDINGS = ("Arterial wall calcification", "Medical material")


@dataclass(frozen=True)
class BaseCT:
    """A base CT of the shared data, the findings it can take and its share of the cases."""

    name: str
    ct: str
    findings: tuple[str, ...]
    weight: float
    artery_mask: str | None = None
    artery_name: str = ""


BASES = (
    BaseCT("ricord", "ct/ricord1a_419639-000082_chest_noncontrast/ct_3mm_iso.nii.gz", LUNG_BASE_FINDINGS, 0.6),
    BaseCT("totalseg-aorta", "ct/totalseg_chest_crop_aorta/ct.nii.gz", VESSEL_BASE_FINDINGS, 0.2,
           "ct/totalseg_chest_crop_aorta/aorta_mask.nii.gz", "aorta"),
    BaseCT("totalseg-pulmonary", "ct/totalseg_chest_crop_pulmonary/ct.nii.gz", VESSEL_BASE_FINDINGS, 0.2,
           "ct/totalseg_chest_crop_pulmonary/pulmonary_artery_mask.nii.gz", "main vascular structures"),
)


def base_index(seed: int) -> int:
    """Which base a case seed draws (by the bases' weights)."""
    weights = np.array([base.weight for base in BASES])
    return int(np.random.default_rng([seed, 1]).choice(len(BASES), p=weights / weights.sum()))


@dataclass(frozen=True)
class DemoDataSpec:
    """How many cases per split, the seed, and how often each finding is inserted."""

    train: int = 200
    valid: int = 40
    test: int = 60
    seed: int = 7
    prevalence: float = 0.4

    def key(self) -> str:
        return f"v{GENERATOR_VERSION}-s{self.seed}-{self.train}-{self.valid}-{self.test}-p{self.prevalence:g}"


def to_working_grid(volume: CTVolume, mask: CTVolume | None) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """LPS voxel order at 3 mm isotropic (trilinear; nearest for the mask) -> (hu, mask, RAS affine)."""
    volume = volume.reoriented("LPS")
    size = [max(1, round(n * s / SPACING_MM)) for n, s in zip(volume.shape_ijk, volume.spacing_ijk_mm)]
    hu = F.interpolate(torch.from_numpy(volume.hu.astype(np.float32))[None, None], size=size, mode="trilinear")[0, 0]
    affine = volume.affine_ras.copy()
    affine[:3, :3] = affine[:3, :3] / np.array(volume.spacing_ijk_mm) * SPACING_MM
    affine[:3, 3] += affine[:3, :3] @ (0.5 * (np.array(volume.spacing_ijk_mm) / SPACING_MM - 1))
    grid_mask = None
    if mask is not None:
        m = torch.from_numpy(mask.reoriented("LPS").hu.astype(np.float32))[None, None]
        grid_mask = F.interpolate(m, size=size, mode="nearest")[0, 0].numpy() > 0.5
    return hu.numpy(), grid_mask, affine


@dataclass(frozen=True)
class LoadedBase:
    """A base on the working grid: HU (float32, LPS voxel order), its anatomy (found once: every case keeps the
    base's pose) and the RAS affine."""

    base: BaseCT
    hu: np.ndarray
    anatomy: Anatomy
    affine: np.ndarray


def load_bases(data_root: Path) -> list[LoadedBase]:
    """Each base on the working grid; a clear error when the shared data is not there."""
    check_bases(data_root)
    loaded = []
    for base in BASES:
        mask = read_ct(data_root / base.artery_mask) if base.artery_mask else None
        hu, grid_mask, affine = to_working_grid(read_ct(data_root / base.ct), mask)
        loaded.append(LoadedBase(base, hu, find_anatomy(hu, grid_mask, base.artery_name), affine))
    return loaded


def check_bases(data_root: Path) -> None:
    """A clear error when a base CT or mask of the shared data is not there (reads nothing)."""
    for base in BASES:
        for relative in filter(None, (base.ct, base.artery_mask)):
            if not (data_root / relative).is_file():
                raise TrainingError(
                    f"demo data: {data_root / relative} not found; give the shared data folder (--data, CTFOUNDATION_DATA)")


def make_case(loaded: LoadedBase, seed: int, prevalence: float) -> tuple[np.ndarray, list, tuple[str, str]]:
    """One case: the base with inserted findings -> (int16 HU, inserted records, (findings, impressions))."""
    rng = np.random.default_rng(seed)
    hu, artery = loaded.hu.copy(), loaded.anatomy.artery
    inserted = []
    for name in DEMO_FINDINGS:
        if name not in loaded.base.findings or (name == "Arterial wall calcification" and (artery is None or artery.sum() < 50)):
            continue
        if rng.random() < prevalence:
            inserted.append(INSERTERS[name](hu, loaded.anatomy, rng))
    hu += rng.normal(0.0, rng.uniform(5.0, 20.0), size=hu.shape).astype(np.float32)
    hu = np.clip(np.round(hu), -1024, 3071).astype(np.int16)
    return hu, inserted, write_report(inserted, rng)


_BASES: list = []  # the bases on the working grid, loaded once per worker process


def _load_worker_bases(data_root: Path) -> None:
    _BASES[:] = load_bases(data_root)


def synthesise_case(out: Path, split: str, n: int, seed: int, prevalence: float) -> tuple[dict, dict, dict]:
    """Write case `n` of `split`; returns its reports row, labels row and manifest entry."""
    loaded = _BASES[base_index(seed)]
    hu, inserted, (findings_text, impressions) = make_case(loaded, seed, prevalence)
    name = f"{split}_{n}_a_1.nii.gz"
    folder = out / split / f"{split}_{n}" / f"{split}_{n}_a"
    folder.mkdir(parents=True, exist_ok=True)
    affine = loaded.affine
    nib.save(nib.Nifti1Image(hu, affine), str(folder / name))
    present = {f.name for f in inserted}
    findings = [
        {**asdict(f), "centre_ras_mm": [round(float(v), 1) for v in affine[:3, :3] @ f.centre_ijk + affine[:3, 3]]}
        for f in inserted
    ]
    return (
        {"VolumeName": name, "Findings_EN": findings_text, "Impressions_EN": impressions},
        {"VolumeName": name, **{k: int(k in present) for k in CT_RATE_ABNORMALITIES}},
        {"name": name, "base": loaded.base.name, "seed": seed, "findings": findings},
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
    check_bases(Path(data_root))  # fail early, in this process; the workers load the bases themselves
    workers = min(2, os.cpu_count() or 1)
    context = multiprocessing.get_context("spawn")  # forking a process that already runs torch threads can hang
    with ProcessPoolExecutor(workers, context, _load_worker_bases, (Path(data_root),)) as pool:
        for split in ("train", "valid", "test"):
            write_split(out, split, getattr(spec, split), spec, pool, progress)
    write_json_atomic(marker, {"key": spec.key(), "spec": asdict(spec), "bases": [b.name for b in BASES]})
    return out
