"""`ctfoundation detect`, `embed` and `embed-text`: CT-CLIP on one CT or on texts; the CT-CLIP options every
model command shares."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from tqdm import tqdm

from CTFoundationLib.cli.ct import add_input_arguments, device_name, read_input
from CTFoundationLib.inference.common import load_thresholds
from CTFoundationLib.inference.ctclip import CTCLIPRuntime
from CTFoundationLib.inference.embeddings import save_embedding
from CTFoundationLib.inference.maps import MAP_GRIDS
from CTFoundationLib.inference.results import DetectionResult, detection_report
from CTFoundationLib.io.files import require_writable_folder, write_json_atomic
from CTFoundationLib.io.sanity import summarize
from CTFoundationLib.models.devices import DEVICE_HELP
from CTFoundationLib.weights import load_registry


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Which CT-CLIP checkpoint, where its files are, and where it runs."""
    parser.add_argument("--model", choices=load_registry().ids("ct-clip"), default="ct-clip-v2")
    parser.add_argument("--weights", type=Path, help="checkpoint file (default: the installed weights of --model)")
    parser.add_argument("--model-config", type=Path, help="JSON of reference constructor arguments, for other sizes")
    parser.add_argument("--text-encoder", type=Path, help="CXR-BERT folder or vocab.txt (default: installed cxr-bert)")
    parser.add_argument("--device", type=device_name, default="auto", help=DEVICE_HELP)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")


@contextlib.contextmanager
def step_progress(name: str) -> Iterator[Callable[[str], None]]:
    """A one-line tqdm status (step name and elapsed time) on stderr; yields the step callback."""
    bar = tqdm(desc=name, bar_format="{desc} [{elapsed}]", file=sys.stderr, disable=None)

    def progress(step: str) -> None:
        bar.set_description_str(f"{name}: {step}")

    try:
        yield progress
    finally:
        bar.close()


def ctclip_options(args: argparse.Namespace) -> dict:
    """CTCLIPRuntime.from_registry's options from add_model_arguments' (plain data: a worker request can hold it)."""
    return {"model_id": args.model, "weights": args.weights, "model_config": args.model_config,
            "text_encoder": args.text_encoder, "device": args.device, "dtype": args.dtype}


def load_ctclip(args: argparse.Namespace, progress: Callable[[str], None], with_text: bool | None = None):
    """The CT-CLIP runtime the arguments name; its registry notice (e.g. a demo model's) goes to stderr."""
    runtime = CTCLIPRuntime.from_registry(**ctclip_options(args), with_text=with_text, progress=progress)
    if runtime.notice:
        print(f"note: {runtime.notice}", file=sys.stderr)
    return runtime


def register(subparsers) -> None:
    detect = subparsers.add_parser("detect", help="probabilities of the 18 CT-RATE abnormalities (CT-CLIP v2)")
    add_input_arguments(detect)
    add_model_arguments(detect)
    detect.add_argument("--thresholds", type=Path, help="JSON {finding: threshold} for the positive flags")
    detect.add_argument("--out", type=Path, help="write the result JSON here")
    detect.add_argument("--maps", type=Path, metavar="DIR",
                        help="write a localisation map per finding (NIfTI on the CT's grid) into DIR; docs/maps.md")
    detect.add_argument("--map-grid", choices=tuple(MAP_GRIDS), default="ct",
                        help="maps on the CT's voxel grid (.nii, the CT's size in float32) or on the model's token "
                             "grid (.nii.gz, a few KB, the same patient space)")
    detect.set_defaults(run=run_detect)

    embed = subparsers.add_parser("embed", help="CT-CLIP image latent (and token grid) of a CT, or text latents")
    add_input_arguments(embed)
    add_model_arguments(embed)
    embed.add_argument("--tokens", action="store_true", help="also store the (24, 24, 24, 512) token grid")
    embed.add_argument("--out", type=Path, required=True, help="output .safetensors file")
    embed.set_defaults(run=run_embed)

    text = subparsers.add_parser("embed-text", help="CT-CLIP text latents of free texts")
    add_model_arguments(text)
    text.add_argument("texts", nargs="+", help="texts to embed (quote each)")
    text.add_argument("--out", type=Path, required=True, help="output .safetensors file")
    text.set_defaults(run=run_embed_text)


def run_detect(args: argparse.Namespace) -> int:
    if args.out:
        require_writable_folder(args.out.parent, "--out")
    if args.maps:
        require_writable_folder(args.maps, "--maps")
    volume = read_input(args)
    summary = summarize(volume)
    thresholds = load_thresholds(args.thresholds)
    maps = None
    with step_progress("ct-clip") as progress:
        runtime = load_ctclip(args, progress)
        if args.maps:
            runtime.require_maps()  # before the image pass: a LiPro checkpoint has none
        runtime.keep_tokens = bool(args.maps)  # the maps reuse detection's image pass
        result = runtime.detect(volume, thresholds)
        if args.maps:
            maps = runtime.write_maps(volume, args.maps, grid=args.map_grid)
    for warning in summary["warnings"]:
        print(f"warning [{warning['code']}]: {warning['message']}", file=sys.stderr)
    print(format_findings(result))
    if maps:
        print(f"maps: {args.maps} ({len(maps['findings'])} NIfTI files, one per finding)")
    if args.out:
        write_json_atomic(args.out, detection_report(summary, result, maps))
        print(f"result: {args.out}")
    return 0


def format_findings(result: DetectionResult) -> str:
    lines = [f"{result.model} ({result.method}, {result.device}, {result.dtype})",
             f"{'finding':36} P(present)  positive"]
    for finding in sorted(result.findings, key=lambda f: -f.probability):
        flag = {True: "yes", False: "no", None: "-"}[finding.positive]
        lines.append(f"{finding.name:36} {finding.probability:10.3f}  {flag}")
    return "\n".join(lines)


def run_embed(args: argparse.Namespace) -> int:
    require_writable_folder(args.out.parent, "--out")
    volume = read_input(args)
    with step_progress("ct-clip") as progress:
        runtime = load_ctclip(args, progress, with_text=False)
        latent, tokens = runtime.encode_volume(volume, return_tokens=args.tokens)
    tensors = {"image_latent": latent[0]}
    if tokens is not None:
        tensors["token_grid"] = tokens[0]
    save_embedding(args.out, tensors, runtime, source=str(args.ct))
    print(f"{args.out}: " + ", ".join(f"{k} {tuple(v.shape)}" for k, v in tensors.items()))
    return 0


def run_embed_text(args: argparse.Namespace) -> int:
    with step_progress("ct-clip") as progress:
        runtime = load_ctclip(args, progress, with_text=True)
        latents = runtime.encode_texts(args.texts)
    save_embedding(args.out, {"text_latents": latents}, runtime, texts=json.dumps(args.texts))
    print(f"{args.out}: text_latents {tuple(latents.shape)}")
    return 0
