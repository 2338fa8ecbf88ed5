"""`python -m training.demo build|eval [--model ct-clip-demo|fvlm-demo|ct-chat-demo]`: build a demo model into
the weights cache, or evaluate it (ct-clip-demo by default; eval builds a missing model first)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from CTFoundationLib.errors import report_errors
from CTFoundationLib.resources import shared_data_root

from .build import MODEL_ID, STAGES, eval_demo, installed_demo, train_demo
from .fvlm_demo import EXPECTED, eval_fvlm_demo, installed_fvlm_demo, train_fvlm_demo


@dataclass(frozen=True)
class DemoCommands:
    """What `build` and `eval` call for one demo model."""

    installed: Callable[[], Path | None]
    build: Callable[[Path, argparse.Namespace], str]  # (data folder, arguments) -> the line to print
    evaluate: Callable[[Path], object]


def build_clip(data: Path, args: argparse.Namespace) -> str:
    steps = {stage: count for stage in STAGES if (count := getattr(args, f"{stage}_steps")) is not None}
    record = train_demo(data, steps=steps)
    return f"test (held-out) mean AUROC: {record['test_mean_auroc']:.3f}; record: training_record.json beside the model"


def build_fvlm(data: Path, args: argparse.Namespace) -> str:
    record = train_fvlm_demo(data, steps=args.fvlm_steps)
    return (f"demo fVLM per-organ mean AUROC (test, held-out): {record['test_per_organ_mean_auroc']:.3f}; "
            "record: training_record.json beside the model")


def build_chat(data: Path, args: argparse.Namespace) -> str:
    from training.ctchat.demo import EVALUATION_FILE, build_chat_demo

    steps = dict(zip(("pretrain", "lora"), args.chat_steps)) if args.chat_steps else None
    build_chat_demo(data, steps=steps)  # prints its held-out figures
    return f"record: {EVALUATION_FILE} beside the model"


def installed_chat() -> Path | None:
    from training.ctchat.demo import installed_chat_demo

    return installed_chat_demo()


def evaluate_chat(data: Path) -> object:
    from training.ctchat.demo import evaluate_chat_demo  # builds a missing model first, as the others do

    return evaluate_chat_demo(data)


DEMOS = {
    MODEL_ID: DemoCommands(installed_demo, build_clip, eval_demo),
    "fvlm-demo": DemoCommands(installed_fvlm_demo, build_fvlm, eval_fvlm_demo),
    "ct-chat-demo": DemoCommands(installed_chat, build_chat, evaluate_chat),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training.demo", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    build = commands.add_parser("build", help="synthesise demo cases, train, export and install ct-clip-demo "
                                              "(about 15 minutes on 2 CPU cores)")
    build.add_argument("--if-missing", action="store_true", help="do nothing when a current build is installed")
    for stage in STAGES:
        build.add_argument(f"--{stage}-steps", type=int, help=f"steps of the {stage} stage (default: its config's)")
    build.add_argument("--fvlm-steps", type=int, help="steps of the fvlm-demo training (default: its config's)")
    build.add_argument("--chat-steps", type=int, nargs=2, metavar=("PRETRAIN", "LORA"),
                       help="with --model ct-chat-demo: steps of its two stages (default: the recipe's)")
    evaluate = commands.add_parser("eval", help="held-out figures of a demo model (ct-clip-demo: zero-shot AUROC "
                                                "and the maps' pointing game); builds it first if needed")
    for command in (build, evaluate):
        command.add_argument("--model", choices=tuple(DEMOS), default=MODEL_ID,
                             help=f"which demo model (fvlm-demo: {EXPECTED}; ct-chat-demo: the demo CT-CHAT, about "
                                  "13 minutes on 2 cores; both build ct-clip-demo first when missing; default: "
                                  "%(default)s)")
        command.add_argument("--data", type=Path, default=None,
                             help="the shared data folder with ct/ (default: $CTFOUNDATION_DATA, else ../shared/data)")
    return parser


def run(args: argparse.Namespace) -> int:
    data = args.data or shared_data_root()
    demo = DEMOS[args.model]
    if args.command == "eval":
        demo.evaluate(data)
    elif args.if_missing and (installed := demo.installed()) is not None:
        print(f"{args.model} is installed: {installed}")
    else:
        print(demo.build(data, args))
    return 0


if __name__ == "__main__":
    arguments = build_parser().parse_args()
    sys.exit(report_errors(lambda: run(arguments)))
