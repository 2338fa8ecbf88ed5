"""`ctfoundation index`, `search` and `retrieval-metrics`: the similar-case index of CT-CLIP latents."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tqdm import tqdm

from CTFoundationLib.cli.ctclip import add_model_arguments, load_ctclip, step_progress
from CTFoundationLib.errors import CTInputError
from CTFoundationLib.inference.embeddings import index_cases
from CTFoundationLib.io.cases import discover_cases
from CTFoundationLib.io.files import write_json_atomic
from CTFoundationLib.io.reading import read_ct
from CTFoundationLib.io.reports import case_annotations
from CTFoundationLib.report.keyimages import thumbnail_png
from CTFoundationLib.retrieval import TARGETS, CaseIndex, describe_hit, format_index_metrics, index_metrics


def register(subparsers) -> None:
    index = subparsers.add_parser("index", help="add CT cases to a similar-case index (CT-CLIP image and report "
                                                "latents, thumbnails)")
    index.add_argument("inputs", type=Path, nargs="+", help="CT files, DICOM folders, folders of cases or a CSV "
                                                            "(columns path, optional case_id and report)")
    index.add_argument("--index", type=Path, required=True, help="index folder (created or updated)")
    index.add_argument("--reports", type=Path, help="CT-RATE reports CSV (VolumeName, Findings_EN) giving the "
                                                    "cases' reports; else a `report` column or a .txt beside the CT")
    index.add_argument("--labels", type=Path, help="CT-RATE labels CSV (VolumeName + the 18 abnormalities) giving "
                                                   "the cases' findings (needed for the image->image mAP)")
    add_model_arguments(index)
    index.set_defaults(run=run_index)

    search = subparsers.add_parser("search", help="most similar cases in an index: image->image, image->report, "
                                                  "report->image")
    search.add_argument("--index", type=Path, required=True)
    query = search.add_mutually_exclusive_group(required=True)
    query.add_argument("--ct", type=Path, help="query CT (file or DICOM folder)")
    query.add_argument("--case", help="query by a case already in the index (it is left out of the results)")
    query.add_argument("--text", help="query report text (report->image)")
    search.add_argument("--target", choices=TARGETS, default="images",
                        help="rank the cases' images (default) or their reports (image->report)")
    search.add_argument("-k", type=int, default=5, help="number of cases to list")
    search.add_argument("--json", type=Path, help="also write the hits as JSON (thumbnail paths, findings, report)")
    add_model_arguments(search)
    search.set_defaults(run=run_search)

    metrics = subparsers.add_parser("retrieval-metrics", help="CT-CLIP's retrieval metrics of an index: Recall@K "
                                                              "report<->image, mAP@K image->image")
    metrics.add_argument("--index", type=Path, required=True)
    metrics.add_argument("-k", type=int, nargs="+", default=[1, 5, 10, 50], help="K values (default 1 5 10 50)")
    metrics.add_argument("--json", type=Path, help="also write the metrics as JSON")
    metrics.set_defaults(run=run_metrics)


def run_index(args: argparse.Namespace) -> int:
    found = discover_cases(args.inputs, embeddings=True)
    cases = found.cases
    for skipped in found.skipped:
        print(f"skipped {skipped.path}: {skipped.reason}", file=sys.stderr)
    annotations = case_annotations(cases, args.reports, args.labels)
    with step_progress("ct-clip") as progress:
        with_reports = any(annotation.report for annotation in annotations.values())
        runtime = load_ctclip(args, progress, with_text=with_reports)
        bar = tqdm(total=len(cases), desc="index", unit="case", file=sys.stderr, disable=None)
        with bar:
            index, unreadable = index_cases(cases, args.index, runtime, annotations, thumbnail_png,
                                            on_case=lambda case: bar.update())
    for case_id, why in unreadable.items():
        print(f"skipped {case_id}: {why}", file=sys.stderr)
    reports = len(index.with_report_latent())
    labelled = sum(index.metadata(case_id).labels is not None for case_id in index.case_ids)
    print(f"{args.index}: {len(index)} cases ({len(unreadable)} could not be read); {reports} with a report, "
          f"{labelled} with labels")
    return 1 if unreadable else 0


def run_search(args: argparse.Namespace) -> int:
    if args.k < 1:
        raise CTInputError(f"-k {args.k}: give a positive number of cases")
    if args.case is not None:  # the stored latents answer it: no model needed
        index = CaseIndex.open(args.index)
        query, exclude = index.latent(args.case), args.case
    else:
        with step_progress("ct-clip") as progress:
            runtime = load_ctclip(args, progress, with_text=args.text is not None)
            index = CaseIndex.open(args.index, model_id=runtime.model_id,
                                   checkpoint_sha256=runtime.checkpoint_sha256)
            if args.text is not None:
                query = runtime.encode_texts([args.text])[0].numpy()
            else:
                query = runtime.encode_volume(read_ct(args.ct))[0][0].numpy()
        exclude = ()
    hits = [describe_hit(index, hit) for hit in index.search(query, args.k, exclude, target=args.target)]
    for rank, hit in enumerate(hits, start=1):
        print(f"{rank:3d}. {hit['score']:+.4f}  {hit['case_id']}  {hit['source_path']}")
        if hit["findings"] is not None:
            print(f"     findings: {', '.join(hit['findings']) or 'none'}")
        if hit["report"] is not None:
            print(f"     report: {hit['report']}")
    if args.json is not None:
        write_json_atomic(args.json, {"index": str(args.index), "model": index.model_id, "target": args.target,
                                      "hits": hits})
    return 0


def run_metrics(args: argparse.Namespace) -> int:
    index = CaseIndex.open(args.index)
    metrics = index_metrics(index, args.k)
    print(f"{args.index}: {len(index)} cases of {index.model_id} (CT-CLIP's retrieval protocol)")
    print(format_index_metrics(metrics))
    if args.json is not None:
        write_json_atomic(args.json, {"index": str(args.index), "model": index.model_id,
                                      **json.loads(json.dumps(metrics.__dict__))})
    return 0
