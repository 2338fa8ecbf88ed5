"""`ctfoundation detect` and `ctfoundation embed`: CT-CLIP v2 on one CT, from the command line."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from .cases import EMBEDDING_SUFFIX, discover_cases
from .cli_input import add_input_arguments, read_input
from .cli_training import DEMO_MODEL, prepare_demo_model
from .detection import CTCLIPRuntime, DetectionResult, load_thresholds
from .errors import CTFoundationError, CTInputError
from .models.ctclip import CTCLIPConfig
from .preprocess import SPECS
from .reading import read_ct
from .retrieval import CaseIndex, CaseMetadata, source_fingerprint
from .sanity import summarize
from .weights import load_registry, resolve_weights
from .weights.cache import write_json_atomic

CTCLIP_MODELS = ("ct-clip-v2", "ct-clip-vocabfine", "ct-clip-lipro", DEMO_MODEL)
TEXT_ENCODER = "cxr-bert"
INDEX_SAVE_INTERVAL_S = 60.0  # `index` writes the index at most this often while it runs, and at the end


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Which CT-CLIP checkpoint, where its files are, and where it runs."""
    parser.add_argument("--model", choices=CTCLIP_MODELS, default="ct-clip-v2")
    parser.add_argument("--weights", type=Path, help="checkpoint file (default: the installed weights of --model)")
    parser.add_argument("--model-config", type=Path, help="JSON of reference constructor arguments, for other sizes")
    parser.add_argument("--text-encoder", type=Path, help="CXR-BERT folder or vocab.txt (default: installed cxr-bert)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda[:N]")
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


def build_runtime(args: argparse.Namespace, needs_text: bool, progress: Callable[[str], None]) -> CTCLIPRuntime:
    """The runtime for --model: its registry entry says which input spec, sizes and tokenizer it uses."""
    if args.model == DEMO_MODEL and args.weights is None:
        prepare_demo_model()
    runtime_spec = load_registry().get(args.model).runtime
    if runtime_spec.notice:
        print(f"note: {runtime_spec.notice}", file=sys.stderr)
    config = read_model_config(args.model_config or model_file(args.model, runtime_spec.constructors))
    checkpoint = resolve_weights(args.model, args.weights)
    tokenizer = None
    if needs_text:
        tokenizer = args.text_encoder or model_file(args.model, runtime_spec.tokenizer)
        tokenizer = tokenizer or resolve_weights(TEXT_ENCODER)
    return CTCLIPRuntime(
        checkpoint,
        tokenizer,
        model_id=args.model,
        config=config,
        device=args.device,
        dtype=args.dtype,
        spec=input_spec(args.model, runtime_spec.preprocess or "ct-clip-v2"),
        progress=progress,
        thresholds=None if args.weights else load_thresholds(model_file(args.model, runtime_spec.thresholds)),
    )


def input_spec(model_id: str, name: str):
    """The registry's preprocess name of a model as its PreprocessSpec."""
    if name not in SPECS:
        raise CTFoundationError(f"model {model_id}: the registry names preprocess '{name}'; known: {sorted(SPECS)}")
    return SPECS[name]


def model_file(model_id: str, name: str | None) -> Path | None:
    """A file of an installed model named by its registry `runtime` section (None when not named)."""
    return resolve_weights(model_id).parent / name if name else None


def read_model_config(path: Path | None) -> CTCLIPConfig | None:
    if path is None:
        return None
    try:
        constructors = json.loads(path.read_text())
        section = constructors.get("constructors", constructors) if isinstance(constructors, dict) else constructors
        return CTCLIPConfig.from_reference_constructors(section)
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise CTFoundationError(
            f"--model-config {path}: not a usable CT-CLIP constructor JSON ({error}); it needs the sections "
            '"CTViT", "BertConfig" and "CTCLIP" as in a fixture config.json'
        ) from error


def register(subparsers) -> None:
    detect = subparsers.add_parser("detect", help="probabilities of the 18 CT-RATE abnormalities (CT-CLIP v2)")
    add_input_arguments(detect)
    add_model_arguments(detect)
    detect.add_argument("--thresholds", type=Path, help="JSON {finding: threshold} for the positive flags")
    detect.add_argument("--out", type=Path, help="write the result JSON here")
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
    register_retrieval(subparsers)


def run_detect(args: argparse.Namespace) -> int:
    volume = read_input(args)
    summary = summarize(volume)
    thresholds = load_thresholds(args.thresholds)
    with step_progress("ct-clip") as progress:
        runtime = build_runtime(args, args.model != "ct-clip-lipro", progress)
        result = runtime.detect(volume, thresholds)
    for warning in summary["warnings"]:
        print(f"warning [{warning['code']}]: {warning['message']}", file=sys.stderr)
    print(format_findings(result))
    if args.out:
        write_json_atomic(args.out, {"input": summary, "detection": result.to_dict()})
        print(f"result: {args.out}")
    return 0


def format_findings(result: DetectionResult) -> str:
    lines = [f"{result.model} ({result.method}, {result.device}, {result.dtype})", f"{'finding':36} P(present)  positive"]
    for finding in sorted(result.findings, key=lambda f: -f.probability):
        flag = {True: "yes", False: "no", None: "-"}[finding.positive]
        lines.append(f"{finding.name:36} {finding.probability:10.3f}  {flag}")
    return "\n".join(lines)


def run_embed(args: argparse.Namespace) -> int:
    volume = read_input(args)
    with step_progress("ct-clip") as progress:
        runtime = build_runtime(args, False, progress)
        latent, tokens = runtime.encode_volume(volume, return_tokens=args.tokens)
    tensors = {"image_latent": latent[0].contiguous()}
    if tokens is not None:
        tensors["token_grid"] = tokens[0].contiguous()
    save_embedding(args.out, tensors, runtime, source=str(args.ct))
    print(f"{args.out}: " + ", ".join(f"{k} {tuple(v.shape)}" for k, v in tensors.items()))
    return 0


def run_embed_text(args: argparse.Namespace) -> int:
    with step_progress("ct-clip") as progress:
        runtime = build_runtime(args, True, progress)
        latents = runtime.encode_texts(args.texts)
    save_embedding(args.out, {"text_latents": latents.contiguous()}, runtime, texts=json.dumps(args.texts))
    print(f"{args.out}: text_latents {tuple(latents.shape)}")
    return 0


def save_embedding(path: Path, tensors: dict[str, torch.Tensor], runtime: CTCLIPRuntime, **metadata: str) -> None:
    if path.suffix != ".safetensors":
        raise CTFoundationError(f"{path}: the output must be a .safetensors file")
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"model": runtime.model_id, "checkpoint_sha256": runtime.checkpoint_sha256, **metadata}
    save_file(tensors, str(path), metadata=meta)



def register_retrieval(subparsers) -> None:
    index = subparsers.add_parser("index", help="add CT cases to a similar-case index (CT-CLIP image latents)")
    index.add_argument("inputs", type=Path, nargs="+", help="CT files, DICOM folders, folders of cases or a CSV")
    index.add_argument("--index", type=Path, required=True, help="index folder (created or updated)")
    add_model_arguments(index)
    index.set_defaults(run=run_index)

    search = subparsers.add_parser("search", help="most similar cases in an index, by a CT or by report text")
    search.add_argument("--index", type=Path, required=True)
    query = search.add_mutually_exclusive_group(required=True)
    query.add_argument("--ct", type=Path, help="query CT (file or DICOM folder)")
    query.add_argument("--text", help="query report text")
    search.add_argument("-k", type=int, default=5, help="number of cases to list")
    add_model_arguments(search)
    search.set_defaults(run=run_search)


def run_index(args: argparse.Namespace) -> int:
    cases = discover_cases(args.inputs, embeddings=True)
    failures = 0
    with step_progress("ct-clip") as progress:
        runtime = build_runtime(args, False, progress)
        index = CaseIndex.open_or_create(
            args.index, model_id=runtime.model_id, checkpoint_sha256=runtime.checkpoint_sha256, dim=runtime.latent_dim
        )
        added, last_save = 0, time.monotonic()
        for case in tqdm(cases, desc="index", unit="case", file=sys.stderr, disable=None):
            try:
                fingerprint = source_fingerprint(case.path)
                if index.contains(case.case_id, fingerprint):
                    continue
                latent = case_latent(case.path, runtime)
            except CTFoundationError as error:
                failures += 1
                print(f"skipped {case.case_id}: {error}", file=sys.stderr)
                continue
            index.add(case.case_id, latent.numpy(), CaseMetadata(str(case.path), fingerprint))
            added += 1
            if time.monotonic() - last_save > INDEX_SAVE_INTERVAL_S:  # an interrupted run keeps most of its work
                index.save()
                last_save = time.monotonic()
        if added:
            index.save()
    print(f"{args.index}: {len(index)} cases ({failures} could not be read)")
    return 1 if failures else 0


def case_latent(path: Path, runtime: CTCLIPRuntime) -> torch.Tensor:
    """(512,) image latent of a CT, or of an embedding file saved by `ctfoundation embed` with this checkpoint."""
    if path.suffix != EMBEDDING_SUFFIX:
        return runtime.encode_volume(read_ct(path))[0][0]
    try:
        with safe_open(str(path), "pt") as stored:
            sha256 = (stored.metadata() or {}).get("checkpoint_sha256")
            if sha256 != runtime.checkpoint_sha256:
                raise CTInputError(
                    f"{path}: embedded with checkpoint {str(sha256)[:12]}…, not {runtime.checkpoint_sha256[:12]}…; "
                    "re-embed it with this model"
                )
            if "image_latent" not in stored.keys():
                raise CTInputError(f"{path}: holds no image_latent (a text embedding?); make it with `ctfoundation embed`")
            return stored.get_tensor("image_latent")
    except SafetensorError as error:
        raise CTInputError(f"{path}: not a readable embedding file ({error})") from None


def run_search(args: argparse.Namespace) -> int:
    with step_progress("ct-clip") as progress:
        runtime = build_runtime(args, args.text is not None, progress)
        index = CaseIndex.open(args.index, model_id=runtime.model_id, checkpoint_sha256=runtime.checkpoint_sha256)
        if args.text is not None:
            query = runtime.encode_texts([args.text])[0]
        else:
            query = runtime.encode_volume(read_ct(args.ct))[0][0]
    hits = index.search(query.numpy(), k=min(args.k, len(index)))
    for rank, hit in enumerate(hits, start=1):
        print(f"{rank:3d}. {hit.score:+.4f}  {hit.case_id}  {hit.metadata.source_path}")
    return 0
