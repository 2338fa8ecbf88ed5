"""`ctfoundation info` and `ctfoundation preprocess`: read a CT, report it, write model-ready tensors."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from CTFoundationLib.errors import CTFoundationError, CTInputError
from CTFoundationLib.io.reading import read_ct
from CTFoundationLib.io.sanity import summarize
from CTFoundationLib.preprocess import SPECS, preprocess


def add_input_arguments(parser: argparse.ArgumentParser) -> None:
    """The CT argument and the reading options every command that reads a CT shares."""
    parser.add_argument("ct", type=Path, help="NIfTI or NRRD file, or a DICOM series folder")
    parser.add_argument("--series", metavar="UID", help="DICOM SeriesInstanceUID to read (default: most slices)")
    parser.add_argument(
        "--rescale",
        type=parse_rescale,
        metavar="SLOPE,INTERCEPT",
        help="turn stored values into HU with this slope and intercept (replaces any in the file)",
    )


def parse_rescale(text: str) -> tuple[float, float]:
    try:
        slope, intercept = (float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected SLOPE,INTERCEPT such as 1,-1024; got '{text}'") from None
    if slope == 0 or not (math.isfinite(slope) and math.isfinite(intercept)):
        raise argparse.ArgumentTypeError(
            f"the rescale needs a finite, non-zero slope and a finite intercept; got '{text}'")
    return slope, intercept


def read_input(args: argparse.Namespace):
    return read_ct(args.ct, series_uid=args.series, rescale=args.rescale)


def register(subparsers) -> None:
    info = subparsers.add_parser("info", help="geometry, HU range, orientation and warnings of a CT")
    add_input_arguments(info)
    info.add_argument("--json", action="store_true", help="print JSON instead of text")
    info.set_defaults(run=run_info)

    prep = subparsers.add_parser("preprocess", help="write the model-ready float32 tensor of a CT (.npy)")
    add_input_arguments(prep)
    prep.add_argument("--model", choices=sorted(SPECS), default="ct-clip-v2")
    prep.add_argument("--out", type=Path, required=True, help="output .npy file")
    prep.set_defaults(run=run_preprocess)


def run_info(args: argparse.Namespace) -> int:
    summary = summarize(read_input(args))
    print(json.dumps(summary, indent=1) if args.json else format_summary(summary))
    return 0


def format_summary(summary: dict) -> str:
    def triple(values, fmt):
        return " x ".join(fmt.format(v) for v in values)

    meta = summary["metadata"]
    lines = [
        f"source:       {summary['source']} ({meta.get('format', '?')})",
        f"shape (ijk):  {triple(summary['shape_ijk'], '{}')}",
        f"spacing (mm): {triple(summary['spacing_ijk_mm'], '{:.3f}')}",
        f"extent (mm):  {triple(summary['extent_ijk_mm'], '{:.1f}')}",
        f"orientation:  {summary['orientation']} (axis i, j, k grow toward these directions)",
        f"HU range:     {summary['hu_range'][0]:.0f} .. {summary['hu_range'][1]:.0f} ({summary['dtype']})",
    ]
    if meta.get("series_description") or meta.get("study_description"):
        lines.append(f"series:       {meta.get('study_description', '')} / {meta.get('series_description', '')}")
    warnings = summary["warnings"]
    lines.append(f"warnings:     {len(warnings) or 'none'}")
    lines += [f"  [{w['code']}] {w['message']}" for w in warnings]
    return "\n".join(lines)


def run_preprocess(args: argparse.Namespace) -> int:
    if args.out.suffix != ".npy":
        raise CTInputError(f"{args.out}: the output must be a .npy file")
    tensor = preprocess(read_input(args), SPECS[args.model])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.save(args.out, tensor)
    print(f"{args.out}: {args.model} tensor {tuple(tensor.shape)} float32, "
          f"values {tensor.min():.3f}..{tensor.max():.3f}")
    return 0


def device_name(text: str) -> str:
    """An argparse type: a device PyTorch can run on here (checked before any CT is read or model loaded)."""
    from CTFoundationLib.models.devices import select_device

    try:
        select_device(text)
    except CTFoundationError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text
