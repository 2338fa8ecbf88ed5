"""The README's main job (for now): read the shared sample chest CT, check it, write model-ready tensors."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from .errors import CTFoundationError
from .preprocess import SPECS, preprocess
from .reading import read_ct
from .sanity import summarize

SAMPLE_CT = Path("ct/ricord1a_419639-000082_chest_noncontrast/dicom")


def run(data: Path, out: Path) -> dict:
    started = time.perf_counter()
    volume = read_ct(data / SAMPLE_CT)
    summary = summarize(volume)
    summary["tensors"] = {}
    out.mkdir(parents=True, exist_ok=True)
    for name, spec in SPECS.items():
        tensor = preprocess(volume, spec)
        path = out / f"{name}_input.npy"
        np.save(path, tensor)
        summary["tensors"][name] = {"file": path.name, "shape": list(tensor.shape), "axes": "C" + spec.axis_codes}
    summary["seconds"] = round(time.perf_counter() - started, 2)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--out", type=Path, default=Path("demo_output"))
    args = parser.parse_args(argv)
    try:
        summary = run(args.data, args.out)
    except CTFoundationError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"read {summary['source']}: {summary['shape_ijk']} voxels, {summary['orientation']}")
    print(f"warnings: {[w['code'] for w in summary['warnings']] or 'none'}")
    for name, tensor in summary["tensors"].items():
        print(f"{name}: {tensor['shape']} ({tensor['axes']}) -> {args.out / tensor['file']}")
    print(f"summary: {args.out / 'summary.json'} ({summary['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
