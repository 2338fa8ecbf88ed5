"""`ctfoundation train-demo` and `ctfoundation eval-demo`: the small CT-CLIP demo model, built on this machine.

The training code lives in the repository's `training` package (installed with the `training` extra);
the full-scale CT-RATE recipes run as `python -m training.run CONFIG` (see training/configs/).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .errors import CTFoundationError


def training_demo():
    """The `training.demo.build` module, or a clear error when the training package is not installed."""
    try:
        from training.demo import build
    except ImportError as error:
        raise CTFoundationError(
            f"the training code is not available ({error}); install it with `pip install -e '.[training]'` "
            "from the repository"
        ) from None
    return build


def data_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data", type=Path, default=None,
        help="the shared data folder with ct/ (default: $CTFOUNDATION_DATA, else ../shared/data beside the repository)",
    )


def data_root(args: argparse.Namespace) -> Path:
    return args.data or training_demo().default_data_root()


def register(subparsers) -> None:
    train = subparsers.add_parser(
        "train-demo", help="synthesise demo cases, train, export and install the ct-clip-demo model (a few minutes)"
    )
    data_argument(train)
    train.add_argument("--steps", type=int, help="training steps (default: the demo config's)")
    train.set_defaults(run=run_train_demo)
    evaluate = subparsers.add_parser(
        "eval-demo", help="zero-shot AUROC of ct-clip-demo on the held-out demo cases (trains it first if needed)"
    )
    data_argument(evaluate)
    evaluate.set_defaults(run=run_eval_demo)


def run_train_demo(args: argparse.Namespace) -> int:
    build = training_demo()
    record = build.train_demo(data_root(args), steps=args.steps)
    print(f"test (held-out) mean AUROC: {record['test_mean_auroc']:.3f}; record: training_record.json beside the model")
    return 0


def run_eval_demo(args: argparse.Namespace) -> int:
    training_demo().eval_demo(data_root(args))
    return 0


