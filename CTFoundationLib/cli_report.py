"""`ctfoundation report`: findings JSON and a readable HTML page per CT, plus index.html and summary.csv."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from .anatomy import AnatomyRequest
from .cases import discover_cases
from .chat import CHAT_TEMPLATES, DEFAULT_CHAT_MODEL, ChatRuntime, load_chat_model
from .cli_chat import add_llm_arguments, chat_model_options, generation_settings
from .cli_ctclip import add_model_arguments, build_runtime
from .cli_ground import add_fvlm_arguments, fvlm_scoring
from .detection import CTCLIPRuntime, load_thresholds
from .errors import CTFoundationError
from .report import REPORT_FILE, BatchProgress, BatchSummary, ReportSection, Shard, run_batch
from .report.anatomy_section import anatomy_section
from .report.narrative import narrative_section

MAX_EXIT_FAILURES = 100  # the exit code is the number of failed cases, capped here


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
    report.add_argument(
        "--narrative", nargs="?", const=DEFAULT_CHAT_MODEL, choices=sorted(CHAT_TEMPLATES), metavar="CHAT_MODEL",
        help=f"add a report written by CT-CHAT (default {DEFAULT_CHAT_MODEL}); needs --model ct-clip-v2",
    )
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
    cases = discover_cases(args.inputs)
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
        summary = report_cases(args, cases, on_model_step, on_case_step)
    print_summary(summary, len(cases), args.shard)
    return min(len(summary.with_status("failed")), MAX_EXIT_FAILURES)


def report_cases(args: argparse.Namespace, cases: list, on_model_step, on_case_step) -> BatchSummary:
    """Load the model(s) the arguments name once, then report every case (of the shard) into args.out."""
    if args.narrative and args.model != "ct-clip-v2":
        raise CTFoundationError(f"--narrative needs --model ct-clip-v2 (CT-CHAT's image encoder), not {args.model}")
    thresholds = load_thresholds(args.thresholds)
    try:  # before the model loads: an unusable --out fails at once
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CTFoundationError(f"--out {args.out}: cannot create the output folder ({error.strerror or error})") from None
    runtime = build_runtime(args, args.model != "ct-clip-lipro", on_model_step)
    sections = report_sections(args, runtime, on_model_step)
    return run_batch(runtime, cases, args.out, thresholds=thresholds, sections=sections, shard=args.shard,
                     force=args.force, progress=on_case_step)


def report_sections(args: argparse.Namespace, encoder: CTCLIPRuntime, progress) -> list[ReportSection]:
    """The optional sections the arguments ask for (per-anatomy findings with --anatomy, CT-CHAT's with --narrative)."""
    sections = []
    if args.anatomy:
        request = AnatomyRequest(use_totalsegmentator=not args.no_totalsegmentator, device=args.device)
        sections.append(anatomy_section(request, fvlm_scoring(args, progress)))
    if args.narrative:
        sections.append(narrative(args, encoder, progress))
    return sections


def narrative(args: argparse.Namespace, encoder: CTCLIPRuntime, progress: Callable[[str], None]) -> ReportSection:
    """The CT-CHAT report section; CT-CHAT reads the detection model's CT-CLIP v2 token grid."""
    settings = generation_settings(args)
    model = load_chat_model(args.narrative, progress=progress, **chat_model_options(args))
    encoder.keep_tokens = True  # detection's image pass also gives CT-CHAT its token grid: one pass per CT
    return narrative_section(ChatRuntime(model, encoder, progress=progress, cache_tokens=False), args.narrative, settings)


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
