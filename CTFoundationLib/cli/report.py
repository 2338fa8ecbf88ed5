"""`ctfoundation report`: findings JSON and a readable HTML page per CT, plus index.html and summary.csv."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from CTFoundationLib.cli.chat import add_llm_arguments, chat_model_options, generation_settings
from CTFoundationLib.cli.ctclip import add_model_arguments, ctclip_options
from CTFoundationLib.cli.ground import add_fvlm_arguments, fvlm_options
from CTFoundationLib.errors import CTFoundationError
from CTFoundationLib.inference.chat import DEFAULT_CHAT_MODEL
from CTFoundationLib.io.cases import discover_cases
from CTFoundationLib.report import REPORT_FILE, BatchProgress, BatchSummary, Shard
from CTFoundationLib.report.pipeline import report_cases
from CTFoundationLib.weights import load_registry

CASES_FAILED = 1  # exit code when some cases failed (fatal errors exit 2, see errors.report_errors)



def non_negative(text: str) -> int:
    """An argparse type: a whole number, 0 or more."""
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number 0 or more, got {text!r}")
    return int(text)

def register(subparsers) -> None:
    report = subparsers.add_parser(
        "report", help="batch reports: findings JSON + HTML page per CT, index.html and summary.csv"
    )
    add_report_arguments(report)
    report.set_defaults(run=run_report)


def add_report_arguments(report: argparse.ArgumentParser) -> None:
    """The `report` options (shared by the CLI and the Slicer worker's `report` task)."""
    report.add_argument("inputs", type=Path, nargs="+", help="CT files, DICOM folders, folders of cases or a CSV list")
    report.add_argument("--out", type=Path, required=True, help="output folder; cases finished in it are skipped")
    report.add_argument("--thresholds", type=Path, help="JSON {finding: threshold} for the positive flags")
    report.add_argument(
        "--shard", type=parse_shard, metavar="I/N", help="process only part I of N (1-based), e.g. 1/4 ... 4/4"
    )
    report.add_argument("--force", action="store_true", help="redo cases that are already finished")
    report.add_argument("--read-workers", type=non_negative, default=0, metavar="N",
                        help="read and decode the next N CTs in worker processes while the model works (worth it "
                             "on a GPU, where reading is slower than the model; default 0: read each in turn)")
    report.add_argument("--dicom-out", type=Path, metavar="DIR",
                        help="also write a DICOM SEG (anatomy, positive-finding regions) and a DICOM SR (the findings) "
                             "per DICOM case into DIR/<case>/; needs DICOM inputs")
    report.add_argument(
        "--narrative", nargs="?", const=DEFAULT_CHAT_MODEL, choices=load_registry().ids("ct-chat"),
        metavar="CHAT_MODEL",
        help=f"add a report written by CT-CHAT (default {DEFAULT_CHAT_MODEL}); needs its CT-CLIP as --model",
    )
    report.add_argument("--maps", action="store_true",
                        help="finding maps: key images through each positive finding's map maximum, and one NIfTI "
                             "map per finding in each case's maps/ folder (docs/maps.md)")
    add_model_arguments(report)
    anatomy = report.add_argument_group(
        "findings per anatomy (off by default: TotalSegmentator takes minutes per case, the built-in "
        "lungs/airway/body/bone segmentation a few seconds)")
    anatomy.add_argument("--anatomy", action="store_true",
                         help="add the per-anatomy findings section and draw the positive segments on the key images")
    anatomy.add_argument("--no-totalsegmentator", action="store_true",
                         help="use the built-in segmentation even when TotalSegmentator is installed")
    add_fvlm_arguments(report)
    add_llm_arguments(report.add_argument_group("CT-CHAT (with --narrative)"))


def parse_shard(text: str) -> Shard:
    try:
        return Shard.parse(text)
    except CTFoundationError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def run_report(args: argparse.Namespace) -> int:
    found = discover_cases(args.inputs)
    cases = found.cases
    notice = load_registry().get(args.model).runtime.notice
    if notice:
        print(f"note: {notice}", file=sys.stderr)
    bar = tqdm(total=0, desc="report", unit="case", file=sys.stderr, disable=None, dynamic_ncols=True, smoothing=0)
    current = {"case": "loading model"}

    def on_model_step(step: str) -> None:
        bar.set_postfix_str(f"{current['case']}: {step}")

    def on_case_step(event: BatchProgress) -> None:
        if bar.total != event.total:
            bar.reset(total=event.total)
        current["case"] = event.case_id
        if event.done > bar.n:
            bar.update(event.done - bar.n)
        bar.set_postfix_str(f"{event.case_id}: {event.step}")

    with bar:
        summary = report_cases(cases, args.out, **report_options(args), on_model_step=on_model_step,
                               on_case_step=on_case_step, skipped_inputs=found.skipped)
    print_summary(summary, len(cases), args.shard)
    for outcome in summary.outcomes:
        for note in outcome.notes:
            print(f"  {outcome.case_id}: {note}", file=sys.stderr)
    if args.dicom_out and any(o.status == "ok" and not o.notes for o in summary.outcomes):
        print(f"dicom:   {args.dicom_out}")
    for skipped in found.skipped:
        print(f"  skipped {skipped.path}: {skipped.reason}", file=sys.stderr)
    return CASES_FAILED if summary.with_status("failed") else 0


def report_options(args: argparse.Namespace) -> dict:
    """`report_cases`' options from the arguments (plain data: the Slicer worker's request holds the same)."""
    return {"ctclip": ctclip_options(args), "thresholds": args.thresholds, "anatomy": args.anatomy,
            "use_totalsegmentator": not args.no_totalsegmentator, "fvlm": fvlm_options(args),
            "narrative": args.narrative, "chat": chat_model_options(args), "generation": generation_settings(args),
            "shard": args.shard, "force": args.force, "dicom_out": args.dicom_out, "maps": args.maps,
            "read_workers": args.read_workers}


def print_summary(summary: BatchSummary, found: int, shard: Shard | None) -> None:
    ok, failed, skipped = (summary.with_status(status) for status in ("ok", "failed", "skipped"))
    part = f" (shard {shard}: {len(summary.outcomes)} of {found})" if shard else ""
    cases = "1 case" if found == 1 else f"{found} cases"
    print(f"{cases}{part}: {len(ok)} reported, {len(failed)} failed, {len(skipped)} already done")
    for outcome in failed:
        print(f"  failed {outcome.case_id}: {outcome.error}", file=sys.stderr)
    if len(summary.outcomes) == 1 and summary.outcomes[0].status != "failed":
        print(f"report: {summary.outcomes[0].folder / REPORT_FILE}")
    print(f"index:   {summary.index_html}")
    print(f"summary: {summary.summary_csv}")
