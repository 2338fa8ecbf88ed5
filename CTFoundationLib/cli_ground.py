"""`ctfoundation ground`: anatomy-grounded findings of one CT (CT-CLIP + fVLM per segment, report sentences),
written as grounded.json and one NIfTI mask per anatomy segment."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .anatomy import AnatomyRequest, build_anatomy
from .cli_ctclip import TEXT_ENCODER, add_model_arguments, build_runtime, step_progress
from .cli_input import add_input_arguments, read_input
from .detection import load_thresholds
from .errors import CTFoundationError, WeightsError
from .fvlm_runtime import MODES, FVLMRuntime
from .grounded import FVLMScoring, GroundedCase, ground_case
from .grounding import default_grounder
from .models.fvlm import ORGANS, FVLMConfig
from .sanity import summarize
from .weights import resolve_weights
from .weights.cache import write_json_atomic


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


def read_fvlm_config(path: Path | None) -> FVLMConfig | None:
    if path is None:
        return None
    try:
        constructors = json.loads(path.read_text())
        return FVLMConfig.from_reference_constructors(constructors.get("constructors", constructors))
    except (OSError, ValueError, TypeError, KeyError, StopIteration, AttributeError) as error:
        raise CTFoundationError(
            f"--fvlm-config {path}: not a usable fVLM constructor JSON ({error}); it needs the sections "
            '"ViT", "BertConfig" and "BlipPretrain" as in a fixture config.json'
        ) from error


def fvlm_weights(args: argparse.Namespace) -> tuple[Path | None, str | None]:
    """(checkpoint, None), or (None, why fVLM is skipped) when no weights are installed and none were given."""
    try:
        return resolve_weights("fvlm", args.fvlm_weights), None
    except WeightsError as error:
        if args.fvlm_weights is not None:
            raise
        return None, f"fVLM skipped: {error}"


def fvlm_scoring(args: argparse.Namespace, progress) -> FVLMScoring:
    """The fVLM runtime the arguments ask for, loaded once, or why fVLM is skipped."""
    checkpoint, skipped = fvlm_weights(args)
    if checkpoint is None:
        return FVLMScoring(None, skipped)
    runtime = FVLMRuntime(checkpoint, resolve_weights(TEXT_ENCODER, args.text_encoder),
                          read_fvlm_config(args.fvlm_config), args.device, progress=progress)
    return FVLMScoring(runtime, None, load_thresholds(args.fvlm_thresholds), args.fvlm_mode)


def run_ground(args: argparse.Namespace) -> int:
    volume = read_input(args)
    write_grounded(args, volume)
    return 0


def write_grounded(args: argparse.Namespace, volume, progress=None) -> GroundedCase:
    """Ground one CT as `args` say; write grounded.json and masks/<segment>.nii.gz into args.out."""
    summary = summarize(volume)
    text = read_report(args.report)
    request = AnatomyRequest(args.segmentation, args.label_scheme, args.radgenome_masks, args.radgenome_regions,
                             not args.no_totalsegmentator, args.device)
    with step_progress("ground") as bar:
        progress = progress or bar
        thresholds = load_thresholds(args.thresholds)  # option files and models first: a bad one fails at once,
        runtime = build_runtime(args, args.model != "ct-clip-lipro", progress)  # not after the anatomy
        scoring = fvlm_scoring(args, progress)
        anatomy = build_anatomy(volume, request, ORGANS, progress)
        ctclip = runtime.detect(volume, thresholds)
        fvlm, fvlm_record = scoring.score(volume, anatomy)
        sentences = default_grounder().ground_report(text)
        case = ground_case(anatomy, ctclip, fvlm, sentences, {"ct-clip": ctclip.to_dict(), "fvlm": fvlm_record},
                           str(args.ct))
    written = anatomy.save_nifti(args.out / "masks")
    result = case.to_dict()
    for name, path in written.items():
        result["segments"][name]["mask_file"] = str(path.relative_to(args.out))
    write_json_atomic(args.out / "grounded.json", {"input": summary, **result})
    if fvlm is None:
        print(f"note: {fvlm_record['reason']}", file=sys.stderr)
    print(format_case(case))
    print(f"result: {args.out / 'grounded.json'} and {len(written)} masks in {args.out / 'masks'}")
    return case


def format_case(case: GroundedCase) -> str:
    lines = [f"anatomy: {case.anatomy['source']}", f"{'segment':28} {'region':20} {'ml':>8}  positive findings"]
    for name, segment in case.segments.items():
        positives = ", ".join(f.name for f in segment.findings if f.positive) or "-"
        sentences = f"  [{len(segment.sentences)} sentence(s)]" if segment.sentences else ""
        lines.append(f"{name:28} {segment.region or '-':20} {segment.volume_ml:8.0f}  {positives}{sentences}")
    lines += [f"unavailable: {key} ({why})" for key, why in case.anatomy["unavailable"].items()
              if key.startswith("fvlm:")]
    return "\n".join(lines)
