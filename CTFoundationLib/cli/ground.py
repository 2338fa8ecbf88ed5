"""`ctfoundation ground`: anatomy-grounded findings of one CT (CT-CLIP + fVLM per segment, report sentences),
written as grounded.json and one NIfTI mask per anatomy segment."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from CTFoundationLib.anatomy.masks import AnatomyRequest
from CTFoundationLib.cli.ct import add_input_arguments, read_input
from CTFoundationLib.cli.ctclip import add_model_arguments, load_ctclip, step_progress
from CTFoundationLib.errors import CTFoundationError
from CTFoundationLib.inference.common import load_thresholds
from CTFoundationLib.inference.fvlm import MODES
from CTFoundationLib.inference.grounding import GROUNDED_FILE, FVLMMapsRequest, FVLMScoring, GroundedCase, ground_ct
from CTFoundationLib.inference.maps import MAP_GRIDS
from CTFoundationLib.io.files import require_writable_folder


def register(subparsers) -> None:
    ground = subparsers.add_parser("ground", help="findings per anatomy segment (CT-CLIP + fVLM) with report sentences")
    add_ground_arguments(ground)
    ground.set_defaults(run=run_ground)


def add_ground_arguments(ground: argparse.ArgumentParser) -> None:
    """The arguments of `ground` (also those of the Slicer worker's ground task)."""
    add_input_arguments(ground)
    add_model_arguments(ground)
    ground.add_argument("--thresholds", type=Path, help="CT-CLIP thresholds JSON {finding: threshold}")
    source = ground.add_argument_group("anatomy (first given wins; default: TotalSegmentator if installed, "
                                       "else the built-in lungs/airway/body/bone)")
    source.add_argument("--segmentation", type=Path, help="label map file or folder of binary masks <name>.nii.gz")
    source.add_argument("--label-scheme", choices=("total", "total_v1"), default="total",
                        help="TotalSegmentator class ids of a label map (default: v2 'total')")
    source.add_argument("--radgenome-masks", type=Path, help="RadGenome seg_<volume> folder of anatomy masks")
    source.add_argument("--radgenome-regions", type=Path, help="RadGenome seg_<volume> folder of region masks")
    source.add_argument("--no-totalsegmentator", action="store_true", help="do not run TotalSegmentator")
    add_fvlm_arguments(ground)
    ground.add_argument("--fvlm-maps", type=Path, metavar="DIR",
                        help="write fVLM's token map of each scored finding inside its organ into DIR (NIfTI, "
                             "docs/maps.md)")
    ground.add_argument("--fvlm-map-grid", choices=tuple(MAP_GRIDS), default="tokens",
                        help="the organ window's token grid (.nii.gz, a few KB; default) or the CT's voxel grid")
    ground.add_argument("--report", help="report or answer text, or a file holding it")
    ground.add_argument("--out", type=Path, required=True, help="output folder")


def add_fvlm_arguments(parser: argparse.ArgumentParser) -> None:
    fvlm = parser.add_argument_group("fVLM (optional: skipped, and said so, when its weights are not installed)")
    fvlm.add_argument("--fvlm-weights", type=Path, help="fVLM checkpoint (default: the installed fvlm weights)")
    fvlm.add_argument("--fvlm-config", type=Path, help="JSON of reference constructor arguments, for other sizes")
    fvlm.add_argument("--fvlm-thresholds", type=Path, help="fVLM thresholds JSON {finding: threshold}")
    fvlm.add_argument("--fvlm-mode", choices=MODES, default="organ",
                      help="organ: one window per organ (fVLM eval.py); whole: one pass over the volume")


def read_report(value: str | None) -> str:
    if value is None:
        return ""
    path = Path(value)
    if len(value) < 4096 and path.is_file():
        try:
            return path.read_text()
        except (OSError, UnicodeDecodeError) as error:
            raise CTFoundationError(f"--report {path}: cannot read it as text ({error})") from error
    return value


def fvlm_options(args: argparse.Namespace) -> dict:
    """FVLMScoring.from_registry's options from add_fvlm_arguments' (without device and progress)."""
    return {"weights": args.fvlm_weights, "config": args.fvlm_config, "thresholds": args.fvlm_thresholds,
            "mode": args.fvlm_mode, "text_encoder": args.text_encoder}


def anatomy_request(args: argparse.Namespace) -> AnatomyRequest:
    return AnatomyRequest(args.segmentation, args.label_scheme, args.radgenome_masks, args.radgenome_regions,
                          not args.no_totalsegmentator, args.device)


def run_ground(args: argparse.Namespace) -> int:
    require_writable_folder(args.out, "--out")
    if args.fvlm_maps:
        require_writable_folder(args.fvlm_maps, "--fvlm-maps")
    volume = read_input(args)
    text = read_report(args.report)
    with step_progress("ground") as progress:
        thresholds = load_thresholds(args.thresholds)  # option files and models first: a bad one fails at once,
        runtime = load_ctclip(args, progress)  # not after the anatomy
        scoring = FVLMScoring.from_registry(**fvlm_options(args), device=args.device, progress=progress)
        case = ground_ct(volume, args.out, runtime, scoring, anatomy_request(args), text, thresholds, progress,
                         FVLMMapsRequest(args.fvlm_maps, args.fvlm_map_grid) if args.fvlm_maps else None)
    if scoring.runtime is None:
        print(f"note: {scoring.skipped}", file=sys.stderr)
    elif scoring.notice:
        print(f"note: {scoring.notice}", file=sys.stderr)
    print(format_case(case))
    print(f"result: {args.out / GROUNDED_FILE} and {len(case.segments)} masks in {args.out / 'masks'}")
    return 0


def format_case(case: GroundedCase) -> str:
    lines = [f"anatomy: {case.anatomy['source']}", f"{'segment':28} {'region':20} {'ml':>8}  positive findings"]
    for name, segment in case.segments.items():
        positives = ", ".join(f.name for f in segment.findings if f.positive) or "-"
        sentences = f"  [{len(segment.sentences)} sentence(s)]" if segment.sentences else ""
        lines.append(f"{name:28} {segment.region or '-':20} {segment.volume_ml:8.0f}  {positives}{sentences}")
    lines += [f"unavailable: {key} ({why})" for key, why in case.anatomy["unavailable"].items()
              if key.startswith("fvlm:")]
    return "\n".join(lines)
