"""Train the report labeller and measure it on a fixed held-out split of CT-CLIP's hand-labelled reports.

    python training/train_labeller.py [--train-csv PATH] [--test-fraction 0.25] [--seed 0] [--json OUT] [--install]

Prints per-finding precision, recall, F1 and support on the held-out reports, then the averages.
--install then trains on every report and caches the labeller where `ctfoundation label-reports` looks
(the same as its own training on first use).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from CTFoundationLib.errors import report_errors
from CTFoundationLib.evaluation.labeller import (
    ReportLabeller,
    cached_labeller_path,
    default_training_csv,
    format_agreement,
    label_agreement,
    read_labelled_reports,
    split_indices,
    train_labeller,
)
from CTFoundationLib.io.files import write_json_atomic


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-csv", type=Path, default=default_training_csv(), help="report_text + 18 label columns")
    parser.add_argument("--test-fraction", type=float, default=0.25, help="held-out share (default 0.25)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split (default 0)")
    parser.add_argument("--json", type=Path, help="write the held-out figures as JSON here")
    parser.add_argument("--install", action="store_true", help="then train on all reports and cache the labeller")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> None:
        texts, labels = read_labelled_reports(args.train_csv)
        train, held_out = split_indices(len(texts), args.test_fraction, args.seed)
        labeller = ReportLabeller.fit([texts[i] for i in train], labels[train])
        agreement = label_agreement(labels[held_out], labeller.labels([texts[i] for i in held_out]))
        print(f"trained on {len(train)} reports, measured on {len(held_out)} held-out (seed {args.seed})")
        print(format_agreement(agreement))
        if args.json:
            write_json_atomic(args.json, {**agreement, "seed": args.seed, "n_train": len(train)})
        if args.install:
            train_labeller(args.train_csv).save(cached_labeller_path())
            print(f"labeller trained on all {len(texts)} reports -> {cached_labeller_path()}")

    return report_errors(body)


if __name__ == "__main__":
    sys.exit(main())
