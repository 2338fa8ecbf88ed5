"""`ctfoundation index` and `ctfoundation search`: the similar-case index of CT-CLIP image latents."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from CTFoundationLib.cli.ctclip import add_model_arguments, load_ctclip, step_progress
from CTFoundationLib.inference.embeddings import index_cases
from CTFoundationLib.io.cases import discover_cases
from CTFoundationLib.io.reading import read_ct
from CTFoundationLib.retrieval import CaseIndex


def register(subparsers) -> None:
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
    found = discover_cases(args.inputs, embeddings=True)
    cases = found.cases
    for skipped in found.skipped:
        print(f"skipped {skipped.path}: {skipped.reason}", file=sys.stderr)
    with step_progress("ct-clip") as progress:
        runtime = load_ctclip(args, progress, with_text=False)
        bar = tqdm(total=len(cases), desc="index", unit="case", file=sys.stderr, disable=None)
        with bar:
            index, unreadable = index_cases(cases, args.index, runtime, on_case=lambda case: bar.update())
    for case_id, why in unreadable.items():
        print(f"skipped {case_id}: {why}", file=sys.stderr)
    print(f"{args.index}: {len(index)} cases ({len(unreadable)} could not be read)")
    return 1 if unreadable else 0


def run_search(args: argparse.Namespace) -> int:
    with step_progress("ct-clip") as progress:
        runtime = load_ctclip(args, progress, with_text=args.text is not None)
        index = CaseIndex.open(args.index, model_id=runtime.model_id, checkpoint_sha256=runtime.checkpoint_sha256)
        if args.text is not None:
            query = runtime.encode_texts([args.text])[0]
        else:
            query = runtime.encode_volume(read_ct(args.ct))[0][0]
    hits = index.search(query.numpy(), k=min(args.k, len(index)))
    for rank, hit in enumerate(hits, start=1):
        print(f"{rank:3d}. {hit.score:+.4f}  {hit.case_id}  {hit.metadata.source_path}")
    return 0
