"""Run a training recipe from a YAML config, then export thresholds and prompt latents beside the checkpoint.

    python -m training.run training/configs/ctclip_pretrain.yaml --set train.steps=1000
    accelerate launch --multi_gpu --num_processes 8 -m training.run training/configs/ctclip_pretrain.yaml

Writes train.output_dir/{log.jsonl, checkpoints/step_N/} while training (a rerun resumes from the latest
state), then the official-layout checkpoint (export.checkpoint, default output_dir/model.pt) and, when a
validation split with labels is configured, `thresholds.json` (CT-CLIP's ROC-corner rule) and
`prompt_latents.safetensors` next to it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from CTFoundationLib.errors import TrainingError, report_errors
from CTFoundationLib.evaluation.ctclip import format_evaluation
from CTFoundationLib.inference.ctclip import CTCLIPRuntime
from CTFoundationLib.preprocess import SPECS
from training.config import TrainingConfig, load_config
from training.ctrate import CTRateDataset, load_cases, read_metadata
from training.export import write_prompt_latents, write_thresholds
from training.trainer import Trainer
from training.validation import evaluate_split, labels_of, score_dataset, thresholds_of


def parse_overrides(items: list[str]) -> dict[str, dict]:
    """["train.steps=10", ...] -> {"train": {"steps": 10}} (values parsed as YAML scalars)."""
    overrides: dict[str, dict] = {}
    for item in items:
        key, equals, value = item.partition("=")
        section, dot, name = key.partition(".")
        if not (equals and dot and section and name):
            raise TrainingError(f"--set {item}: expected SECTION.KEY=VALUE, e.g. train.steps=10")
        try:
            overrides.setdefault(section, {})[name] = yaml.safe_load(value)
        except yaml.YAMLError as error:
            raise TrainingError(f"--set {item}: the value is not valid YAML ({error})") from None
    return overrides


def validation_dataset(config: TrainingConfig) -> CTRateDataset | None:
    data = config.data
    if not (data.validation_root and data.validation_reports_csv and data.validation_labels_csv):
        return None
    cases = load_cases(data.validation_root, data.validation_reports_csv, data.validation_labels_csv)
    metadata = read_metadata(data.validation_metadata_csv) if data.validation_metadata_csv else None
    return CTRateDataset(cases, SPECS[data.preprocess], data.stored_values, metadata)


def export_thresholds(config: TrainingConfig, checkpoint: Path) -> None:
    """Score the validation split with the exported file and write thresholds + prompt latents beside it."""
    if not config.export.thresholds:
        return
    dataset = validation_dataset(config)
    if dataset is None:
        print("no labelled validation split configured: thresholds not chosen", file=sys.stderr)
        return
    runtime = CTCLIPRuntime(
        checkpoint, config.model.tokenizer, config=config.model.clip_config(), spec=SPECS[config.data.preprocess],
    )
    probabilities = score_dataset(runtime, dataset)
    labels = labels_of(dataset)
    evaluation = evaluate_split(probabilities, labels)
    thresholds = thresholds_of(evaluation)
    write_thresholds(checkpoint.with_name("thresholds.json"), thresholds, str(config.data.validation_root), len(labels))
    if runtime.method == "zero-shot":
        write_prompt_latents(checkpoint.with_name("prompt_latents.safetensors"), runtime.prompt_latents())
    print(format_evaluation(evaluation))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.run", description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path, help="YAML config (see training/configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = parser.parse_args(argv)

    def body() -> None:
        config = load_config(args.config, parse_overrides(args.overrides))
        trainer = Trainer(config)
        result = trainer.train()
        if trainer.accelerator.is_main_process:
            print(f"{config.train.recipe}: {result.steps} steps in {result.seconds:.0f} s -> {result.checkpoint}")
            if config.train.recipe != "fvlm":  # fVLM's findings are scored per organ, without thresholds
                export_thresholds(config, result.checkpoint)

    return report_errors(body)


if __name__ == "__main__":
    sys.exit(main())
