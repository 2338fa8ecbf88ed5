"""Evaluate predicted probabilities of the 18 CT-RATE findings with CT-CLIP's protocol (the paper's table).

    python training/evaluate.py PREDICTIONS LABELS [--bootstrap 1000] [--seed 0] [--json OUT] [--csv OUT]

PREDICTIONS: a CSV (case id, then finding columns), a JSON {case id: {finding: probability}}, a folder of
`ctfoundation detect --out CASE.json` results (case id = file name), or CT-CLIP's `predicted_weights.npz`.
LABELS: a CSV such as CT-RATE's validation labels (VolumeName + 18 columns) or CT-CLIP's `labels_weights.npz`.
Case ids match without folders and volume suffixes ('valid_1_a_1.nii.gz' = 'valid_1_a_1').
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from CTFoundationLib.errors import EvaluationError, report_errors
from CTFoundationLib.evaluation.ctclip import (
    align,
    evaluate,
    evaluation_rows,
    format_evaluation,
    read_labels,
    read_predictions,
)
from CTFoundationLib.io.files import write_json_atomic
from CTFoundationLib.io.tables import write_csv


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("predictions", type=Path)
    parser.add_argument("labels", type=Path)
    parser.add_argument("--bootstrap", type=int, default=1000, help="resamples for the 95%% intervals (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the resampling (default 0)")
    parser.add_argument("--json", type=Path, help="write the results as JSON here")
    parser.add_argument("--csv", type=Path, help="write the table as CSV here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> None:
        probabilities, labels, names, unlabelled = align(read_predictions(args.predictions), read_labels(args.labels))
        if unlabelled:
            print(f"warning: {unlabelled} predicted cases have no label and are left out", file=sys.stderr)
        result = evaluate(probabilities, labels, names, n_bootstrap=args.bootstrap, seed=args.seed)
        print(format_evaluation(result))
        print(f"mean AUROC: {result.mean['auroc'].value:.3f}")
        if args.json:
            write_json_atomic(args.json, result.to_dict())
        if args.csv:
            rows = evaluation_rows(result)
            write_csv(args.csv, list(rows[0]), rows, EvaluationError)

    return report_errors(body)


if __name__ == "__main__":
    sys.exit(main())
