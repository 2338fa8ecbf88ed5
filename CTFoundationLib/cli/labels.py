"""`ctfoundation label-reports`: the 18 CT-RATE findings (0/1) of the free-text reports in a CSV."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from CTFoundationLib.io.tables import REPORT_TEXT_COLUMN as TEXT_COLUMN
from CTFoundationLib.vocab import CT_RATE_ABNORMALITIES


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `label-reports` command."""
    parser = subparsers.add_parser("label-reports", help="the 18 CT-RATE findings (0/1) of free-text reports in a CSV")
    parser.add_argument("reports", type=Path, metavar="CSV", help=f"CSV with a {TEXT_COLUMN!r} column")
    parser.add_argument("--out", type=Path, required=True, help="output CSV: the input rows plus 18 finding columns")
    parser.add_argument("--text-column", default=TEXT_COLUMN, help=f"column holding the report (default {TEXT_COLUMN})")
    parser.add_argument(
        "--train-csv",
        type=Path,
        help="hand-labelled reports to train the labeller on (default: the cached labeller, else "
        "$CTFOUNDATION_DATA/reports/ctclip_text_classifier/train.csv)",
    )
    parser.set_defaults(run=run_label_reports)


def run_label_reports(args: argparse.Namespace) -> int:
    from CTFoundationLib.evaluation.labeller import load_or_train, read_report_csv, write_labelled_csv  # scikit-learn

    header, rows = read_report_csv(args.reports, args.text_column)
    labeller = load_or_train(args.train_csv)
    labels = labeller.labels([row[args.text_column] or "" for row in rows])
    write_labelled_csv(args.out, header, rows, labels)
    counts = ", ".join(f"{name} {count}" for name, count in zip(CT_RATE_ABNORMALITIES, labels.sum(0)) if count)
    print(f"labelled {len(rows)} reports -> {args.out}", file=sys.stderr)
    print(f"positive findings: {counts or 'none'}", file=sys.stderr)
    return 0
