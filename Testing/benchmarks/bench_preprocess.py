"""Time and peak memory of reading the RICORD DICOM series (255 slices) and CT-CLIP-preprocessing it.

Run: .venv/bin/python Testing/benchmarks/bench_preprocess.py [DICOM_FOLDER]
"""

from __future__ import annotations

import resource
import sys
import time
from pathlib import Path

import torch

from CTFoundationLib.io.reading import read_ct
from CTFoundationLib.preprocess import CTCLIP_V2, preprocess

DEFAULT = Path(__file__).resolve().parents[3] / "shared/data/ct/ricord1a_419639-000082_chest_noncontrast/dicom"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; baseline RSS {peak_rss_mb():.0f} MB")
    start = time.perf_counter()
    volume = read_ct(folder)
    read_s = time.perf_counter() - start
    print(f"read DICOM {volume.shape_ijk}: {read_s:.2f} s, peak RSS {peak_rss_mb():.0f} MB")
    start = time.perf_counter()
    tensor = preprocess(volume, CTCLIP_V2)
    prep_s = time.perf_counter() - start
    print(f"CT-CLIP preprocess -> {tensor.shape}: {prep_s:.2f} s, peak RSS {peak_rss_mb():.0f} MB")
    print(f"total {read_s + prep_s:.2f} s")


if __name__ == "__main__":
    main()
