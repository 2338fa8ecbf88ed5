"""`python -m training.ctchat data|train|predict|score`: CT-CHAT's VQA data, its two training stages, predictions
for a question set with a loaded model, and their scores per question type."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from CTFoundationLib.errors import TrainingError, report_errors


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training.ctchat", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    data = commands.add_parser("data", help="write conversation JSON from CT-RATE reports + labels and/or RadGenome")
    data.add_argument("--out", type=Path, required=True, help="the conversation JSON file to write")
    data.add_argument("--reports", type=Path, help="CT-RATE reports CSV (VolumeName, Findings_EN, Impressions_EN)")
    data.add_argument("--labels", type=Path, help="CT-RATE 18-finding labels CSV (with --reports)")
    data.add_argument("--radgenome", type=Path, help="folder of RadGenome's train_vqa_*.csv tables and templates")
    data.add_argument("--seed", type=int, default=0)
    train = commands.add_parser("train", help="train one stage from a YAML config (training/configs/ctchat_*.yaml)")
    train.add_argument("config", type=Path)
    predict = commands.add_parser("predict", help="answer a question set with a registered or local CT-CHAT")
    predict.add_argument("questions", type=Path, help="conversation JSON (the `data` command's format)")
    predict.add_argument("--images", type=Path, required=True, help="folder of the volumes the items name")
    predict.add_argument("--model", default="ct-chat-llama3.1-8b", help="registered CT-CHAT id")
    predict.add_argument("--llm", type=Path, help="base LLM folder or .gguf instead of the registered one")
    predict.add_argument("--lora", type=Path, help="LoRA folder instead of the registered one")
    predict.add_argument("--device", default="auto")
    predict.add_argument("--max-new-tokens", type=int, default=256)
    predict.add_argument("--out", type=Path, required=True, help="predictions JSON to write")
    score = commands.add_parser("score", help="text metrics per question type of a predictions file")
    score.add_argument("questions", type=Path)
    score.add_argument("predictions", type=Path)
    score.add_argument("--out", type=Path, help="also write the table as JSON")
    return parser


def run(args: argparse.Namespace) -> int:
    if args.command == "data":
        return write_data(args)
    if args.command == "train":
        return train(args.config)
    if args.command == "predict":
        return predict_file(args)
    from .evaluate import score_files
    from .metrics import format_scores

    table = score_files(args.questions, args.predictions)
    print(format_scores(table))
    if args.out:
        args.out.write_text(json.dumps(table, indent=1))
    return 0


def write_data(args: argparse.Namespace) -> int:
    from .vqa import ctrate_items, kind_counts, radgenome_items, write_items

    if args.reports is None and args.radgenome is None:
        raise TrainingError("give --reports with --labels (CT-RATE) and/or --radgenome FOLDER")
    items = []
    if args.reports is not None:
        if args.labels is None:
            raise TrainingError("--reports needs --labels (the 18-finding labels CSV of the same volumes)")
        items += ctrate_items(args.reports, args.labels, args.seed)
    if args.radgenome is not None:
        items += radgenome_items(args.radgenome, args.seed)
    write_items(items, args.out)
    print(f"{len(items)} conversations -> {args.out}; questions per kind: {kind_counts(items)}")
    return 0


def train(config_path: Path) -> int:
    from CTFoundationLib.inference.ctclip import CTCLIPRuntime
    from CTFoundationLib.weights.cache import cache_root

    from .data import token_grids
    from .train import ChatTrainConfig, train_stage
    from .vqa import read_items

    config = ChatTrainConfig.load(config_path)
    if config.data is None or config.images is None:
        raise TrainingError(f"{config_path}: data (conversation JSON) and images (volume folder) are required")
    items = read_items(config.data)
    volumes = {path.name: path for path in sorted(Path(config.images).rglob("*.nii.gz"))}
    missing = sorted({item["image"] for item in items} - set(volumes))
    if missing:
        raise TrainingError(f"{config.images}: no volume {missing[0]} ({len(missing)} missing); point images at "
                            "the folder that holds the conversations' volumes")
    encoder = CTCLIPRuntime.from_registry(config.encoder, with_text=False)
    grids = token_grids([item["image"] for item in items], volumes.__getitem__, encoder, cache_root() / "runtime")
    result = train_stage(config, items, grids)
    print(f"{config.stage}: {result.steps} steps in {result.seconds:.0f} s -> {result.output}")
    return 0


def predict_file(args: argparse.Namespace) -> int:
    from CTFoundationLib.inference.chat import ChatRuntime
    from CTFoundationLib.io.reading import read_ct
    from CTFoundationLib.models.ctchat.modeling import GenerationSettings

    from .evaluate import predict
    from .vqa import read_items

    items = read_items(args.questions)
    volumes = {path.name: path for path in sorted(Path(args.images).rglob("*.nii.gz"))}
    runtime = ChatRuntime.from_registry(args.model, device=args.device, llm=args.llm, lora=args.lora)

    def image(name: str):
        if name not in volumes:
            raise TrainingError(f"{args.images}: no volume {name}")
        return runtime.image_embeddings(read_ct(volumes[name]))

    predictions = predict(runtime.model, items, image, GenerationSettings(max_new_tokens=args.max_new_tokens))
    args.out.write_text(json.dumps(predictions, indent=1))
    print(f"{len(predictions)} items answered -> {args.out}")
    return 0


if __name__ == "__main__":
    arguments = build_parser().parse_args()
    sys.exit(report_errors(lambda: run(arguments)))
