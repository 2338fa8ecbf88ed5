"""`ctfoundation train-demo` and `ctfoundation eval-demo`: the small CT-CLIP demo model, built on this machine.

The training code lives in the repository's `training` package (installed with the `training` extra);
the full-scale CT-RATE recipes run as `python -m training.run CONFIG` (see training/configs/).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import CTFoundationError, WeightsError
from .weights import resolve_weights

DEMO_MODEL = "ct-clip-demo"
DEMO_VERSION = 4  # bump when a change alters what train-demo builds (2: prompts tokenised with the whole vocabulary;
# 3: demo set v7; 4: contrastive + VocabFine on demo set v9)
OFFICIAL_MODEL = "ct-clip-v2"


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


def installed_demo(home: Path | None = None) -> Path | None:
    """The installed demo checkpoint; None when it is missing, incomplete or built by an older DEMO_VERSION
    (reads only its training record: running an installed demo needs no training code)."""
    try:
        checkpoint = resolve_weights(DEMO_MODEL, home=home)
        record = json.loads((checkpoint.parent / "training_record.json").read_text())
    except (WeightsError, OSError, ValueError):
        return None
    return checkpoint if record.get("demo_version") == DEMO_VERSION else None


def installed(model_id: str) -> bool:
    try:
        resolve_weights(model_id)
    except WeightsError:
        return False
    return True


def prepare_demo_model() -> None:
    """Before ct-clip-demo runs: say that it is the demo model and whether official weights are present, and
    train it (once, a few minutes; data from $CTFOUNDATION_DATA or ../shared/data) when it is not built yet."""
    if installed(OFFICIAL_MODEL):
        print(f"note: official {OFFICIAL_MODEL} weights are installed; `--model {OFFICIAL_MODEL}` uses them", file=sys.stderr)
    else:
        print(f"note: no official CT-CLIP weights are installed ({OFFICIAL_MODEL}); using {DEMO_MODEL}, trained on demo "
              "data, not for diagnosis", file=sys.stderr)
    if installed_demo() is None:
        build = training_demo()
        print(f"{DEMO_MODEL} is not built yet (or was built by an older version): training it now (a few minutes on CPU)",
              file=sys.stderr)
        build.train_demo(build.default_data_root(), say=lambda line: print(line, file=sys.stderr))


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
    for recipe in ("contrastive", "vocabfine"):
        train.add_argument(f"--{recipe}-steps", type=int, help=f"steps of the {recipe} stage (default: its demo config's)")
    train.set_defaults(run=run_train_demo)
    evaluate = subparsers.add_parser(
        "eval-demo", help="zero-shot AUROC of ct-clip-demo on the held-out demo cases (trains it first if needed)"
    )
    data_argument(evaluate)
    evaluate.set_defaults(run=run_eval_demo)


def run_train_demo(args: argparse.Namespace) -> int:
    build = training_demo()
    steps = {recipe: count for recipe in build.STAGES if (count := getattr(args, f"{recipe}_steps")) is not None}
    record = build.train_demo(data_root(args), steps=steps)
    print(f"test (held-out) mean AUROC: {record['test_mean_auroc']:.3f}; record: training_record.json beside the model")
    return 0


def run_eval_demo(args: argparse.Namespace) -> int:
    training_demo().eval_demo(data_root(args))
    return 0


