"""`python -m training.demo build|eval [--model ct-clip-demo|fvlm-demo]`: build a demo model into the weights
cache, or evaluate it (ct-clip-demo by default)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from CTFoundationLib.errors import report_errors
from CTFoundationLib.resources import shared_data_root

from .build import MODEL_ID, STAGES, eval_demo, installed_demo, train_demo
from .fvlm_demo import EXPECTED, eval_fvlm_demo, installed_fvlm_demo, train_fvlm_demo

MODELS = (MODEL_ID, "fvlm-demo", "ct-chat-demo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training.demo", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    build = commands.add_parser("build", help="synthesise demo cases, train, export and install ct-clip-demo "
                                              "(about 10 minutes on 2 CPU cores)")
    build.add_argument("--if-missing", action="store_true", help="do nothing when a current build is installed")
    for recipe in STAGES:
        build.add_argument(f"--{recipe}-steps", type=int, help=f"steps of the {recipe} stage (default: its config's)")
    build.add_argument("--fvlm-steps", type=int, help="steps of the fvlm-demo training (default: its config's)")
    build.add_argument("--chat-steps", type=int, nargs=2, metavar=("PRETRAIN", "LORA"),
                       help="with --model ct-chat-demo: steps of its two stages (default 80 25)")
    evaluate = commands.add_parser("eval", help="zero-shot AUROC and the maps' pointing game of ct-clip-demo on the "
                                                "held-out demo cases (builds it first if needed)")
    for command in (build, evaluate):
        command.add_argument("--model", choices=MODELS, default=MODEL_ID,
                             help=f"which demo model (fvlm-demo: {EXPECTED}; ct-chat-demo: the demo CT-CHAT, about "
                                  "25 minutes on 2 cores; both build ct-clip-demo first when missing; default: "
                                  "%(default)s)")
        command.add_argument("--data", type=Path, default=None,
                             help="the shared data folder with ct/ (default: $CTFOUNDATION_DATA, else ../shared/data)")
    return parser


def run(args: argparse.Namespace) -> int:
    data = args.data or shared_data_root()
    if args.model == "fvlm-demo":
        return run_fvlm(args, data)
    if args.model == "ct-chat-demo":
        return run_chat_demo(args, data)
    if args.command == "eval":
        eval_demo(data)
        return 0
    if args.if_missing and installed_demo() is not None:
        print(f"ct-clip-demo is installed: {installed_demo()}")
        return 0
    steps = {recipe: count for recipe in STAGES if (count := getattr(args, f"{recipe}_steps")) is not None}
    record = train_demo(data, steps=steps)
    print(f"test (held-out) mean AUROC: {record['test_mean_auroc']:.3f}; record: training_record.json beside the model")
    return 0


def run_fvlm(args: argparse.Namespace, data: Path) -> int:
    if args.command == "eval":
        eval_fvlm_demo(data)
        return 0
    if args.if_missing and installed_fvlm_demo() is not None:
        print(f"fvlm-demo is installed: {installed_fvlm_demo()}")
        return 0
    record = train_fvlm_demo(data, steps=args.fvlm_steps)
    print(f"demo fVLM per-organ mean AUROC (test, held-out): {record['test_per_organ_mean_auroc']:.3f}; "
          "record: training_record.json beside the model")
    return 0


def run_chat_demo(args: argparse.Namespace, data: Path) -> int:
    from training.ctchat.demo import build_chat_demo, evaluate_chat_demo, installed_chat_demo

    if args.command == "eval":
        if installed_chat_demo() is None:
            print("ct-chat-demo is not built yet: building it now")
            build_chat_demo(data)
            return 0
        evaluate_chat_demo(data)
        return 0
    if args.if_missing and installed_chat_demo() is not None:
        print(f"ct-chat-demo is installed: {installed_chat_demo()}")
        return 0
    steps = dict(zip(("pretrain", "lora"), args.chat_steps)) if args.chat_steps else None
    build_chat_demo(data, steps=steps)
    return 0


if __name__ == "__main__":
    arguments = build_parser().parse_args()
    sys.exit(report_errors(lambda: run(arguments)))
