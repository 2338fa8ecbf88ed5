"""The demo fVLM (`python -m training.demo build|eval --model fvlm-demo`): the fVLM recipe on the demo cases.

Reuses the demo cases of the CT-CLIP demo ($CTFOUNDATION_HOME/demo_data/<key>, built once). Organs: those of
training/configs/fvlm_demo_constructors.json that exist here without downloads: the lungs from the library's
built-in anatomy (per case) and the descending aorta the demo builder finds on the base CT (every case keeps the
base's pose and grid, so its mask holds for all). Prepared inputs are cached once per case
($CTFOUNDATION_HOME/fvlm_inputs/<key>/<split>). Trained on `train`, evaluated on the held-out `test` split
through the runtime (`FVLMRuntime`, the code `ground` runs) with fVLM's prompts and the organ-wise table of
`CTFoundationLib.evaluation.fvlm`, and the pointing game of its organ maps (training/demo/pointing.py); exported and
imported into the weights cache as `fvlm-demo`.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from CTFoundationLib import __version__
from CTFoundationLib.errors import TrainingError, WeightsError
from CTFoundationLib.evaluation.ctclip import Evaluation
from CTFoundationLib.evaluation.fvlm import evaluate_organs, format_organ_evaluation, organ_means, per_organ_mean_auroc
from CTFoundationLib.inference.fvlm import FVLMRuntime
from CTFoundationLib.io.files import write_json_atomic
from CTFoundationLib.io.reading import read_ct
from CTFoundationLib.io.volume import CTVolume
from CTFoundationLib.models.fvlm import ZERO_SHOT_ITEMS, ZeroShotItem, read_fvlm_config
from CTFoundationLib.preprocess import FVLM_DEMO, FVLM_DEMO_WINDOWS
from CTFoundationLib.weights import import_model, load_registry, resolve_weights
from CTFoundationLib.weights.cache import cache_root

from ..config import load_config
from ..ctrate import find_volumes, read_labels
from ..fvlm import AnatomyLabeller, FVLMDataset, load_fvlm_cases, prompt_items
from ..trainer import Trainer
from .build import CONFIGS, Say, demo_data, minilm_folder, stage_record
from .findings import DEMO_FINDINGS
from .pointing import PointingResult, add_case, case_masks, pointing_report
from .synth import DemoDataSpec, load_base

MODEL_ID = "fvlm-demo"
DEMO_VERSION = load_registry().get(MODEL_ID).runtime.demo_version
CONFIG = CONFIGS / "fvlm_demo.yaml"
CHECKPOINT = "fvlm_demo.pth"
EXPECTED = "about 20 minutes on 2 CPU cores"


@dataclass(frozen=True)
class DemoLabeller:
    """Organ ids of every demo case: those of the base CT (each case keeps its pose and grid), made once: the
    built-in anatomy's organs (lungs) and the demo builder's descending aorta."""

    organs: tuple[str, ...]
    labels: np.ndarray  # uint8 ids 1..n on the demo working grid

    @classmethod
    def from_base(cls, organs: tuple[str, ...], data_root: Path) -> DemoLabeller:
        base = load_base(Path(data_root))
        volume = CTVolume(base.hu, base.affine, source="demo base CT")
        labels = AnatomyLabeller(organs)(volume, "demo base CT")
        if "aorta" in organs:
            labels[base.anatomy.aorta] = organs.index("aorta") + 1
        return cls(organs, labels)

    def __call__(self, volume: CTVolume, name: str) -> np.ndarray:
        if volume.shape_ijk != self.labels.shape:
            raise TrainingError(f"{name}: grid {volume.shape_ijk} is not the demo base's {self.labels.shape}")
        return self.labels.copy()


def demo_items(organs: tuple[str, ...]) -> list[ZeroShotItem]:
    """fVLM's (organ, finding) prompt pairs that the demo cases have: inserted findings on the model's organs."""
    return [item for item in ZERO_SHOT_ITEMS if item.organ in organs and item.finding in DEMO_FINDINGS]


def split_dataset(data: Path, split: str, labeller: DemoLabeller, home: Path | None,
                  sentence_per_item: bool = False, with_prompts: bool = False) -> FVLMDataset:
    """A demo split; with_prompts: its cases carry the labels of fVLM's prompt items (`prompt_items`)."""
    labels_csv = data / f"{split}_labels.csv"
    items = prompt_items(labeller.organs, labels_csv) if with_prompts else ()
    cases = load_fvlm_cases(find_volumes(data / split), data / f"{split}_reports.csv", labeller.organs, labels_csv,
                            items)
    cache = cache_root(home) / "fvlm_inputs" / data.name / split
    return FVLMDataset(cases, labeller.organs, FVLM_DEMO, FVLM_DEMO_WINDOWS, labeller, cache, sentence_per_item,
                       items)


def demo_runtime(checkpoint: Path, home: Path | None) -> FVLMRuntime:
    folder = checkpoint.parent
    return FVLMRuntime(checkpoint, folder / "vocab.txt", read_fvlm_config(folder / "constructors.json"), "cpu",
                       cache_root(home) / "runtime", spec=FVLM_DEMO, model_id=MODEL_ID)


def score_split(runtime: FVLMRuntime, data: Path, split: str, labeller: DemoLabeller,
                items: list[ZeroShotItem], pointing: PointingResult | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(P(positive) (N, items), labels (N, items)) of a demo split, each case scored by the runtime; pointing: also
    play the pointing game with each case's organ maps (from the same pass) into it."""
    from tqdm import tqdm

    labels_by_name = read_labels(data / f"{split}_labels.csv", tuple(item.finding for item in items))
    volumes = find_volumes(data / split)
    probabilities, labels = [], []
    runtime.keep_windows = pointing is not None
    for name, path in tqdm(volumes.items(), desc=f"score {split}", unit="case", file=sys.stderr, disable=None):
        volume = read_ct(path)
        result = runtime.score(volume, labeller(volume, name))
        if pointing is not None:
            masks = case_masks(data, split, name, volume)
            for maps in runtime.finding_maps(volume).values():
                add_case(pointing, maps, masks, volume)
        scored = {(f.organ, f.name): f.probability for f in result.findings}
        missing = [item for item in items if (item.organ, item.finding) not in scored]
        if missing:
            raise TrainingError(f"{name}: {MODEL_ID} could not score {[m.organ for m in missing]} "
                                f"({[s.reason for s in result.organs if s.status != 'scored']})")
        probabilities.append([scored[(item.organ, item.finding)] for item in items])
        labels.append(labels_by_name[name])
    return np.array(probabilities), np.array(labels).astype(int)


def auroc_record(evaluation: Evaluation) -> dict[str, dict]:
    return {f.name: {"auroc": round(f.metrics["auroc"].value, 4), "positives": f.positives}
            for f in evaluation.findings}


def train_fvlm_demo(data_root: Path, home: Path | None = None, spec: DemoDataSpec = DemoDataSpec(),
                    steps: int | None = None, say: Say = print) -> dict:
    """Build (or reuse) the demo cases, train, export, evaluate on `test` and install fvlm-demo; its record."""
    started = time.perf_counter()
    data = demo_data(Path(data_root), home, spec, say)
    staging = cache_root(home) / "build" / MODEL_ID
    shutil.rmtree(staging, ignore_errors=True)
    minilm = minilm_folder()
    overrides = {
        "model": {"tokenizer": str(minilm / "vocab.txt"), "text_init": str(minilm)},
        "data": {"root": str(data / "train"), "reports_csv": str(data / "train_reports.csv"),
                 "labels_csv": str(data / "train_labels.csv")},
        "train": {"output_dir": str(staging / "run"), **({"steps": steps} if steps is not None else {})},
        "export": {"checkpoint": str(staging / CHECKPOINT)},
    }
    config = load_config(CONFIG, overrides)
    organs = config.model.fvlm_config().organs
    labeller = DemoLabeller.from_base(organs, Path(data_root))
    dataset = split_dataset(data, "train", labeller, home, config.data.organ_text == "sentence",
                            config.train.prompt_weight > 0)
    say(f"training {MODEL_ID} ({EXPECTED}): {config.train.steps} steps of {config.train.batch_size} cases, "
        f"organs {list(organs)}; the first pass prepares and caches each case's input")
    result = Trainer(config, dataset).train()
    stage = stage_record(result)
    say(f"fvlm: {result.steps} steps in {result.seconds:.0f} s, loss {stage['loss_first']} -> {stage['loss_last']}")
    shutil.copyfile(minilm / "vocab.txt", staging / "vocab.txt")
    items = demo_items(organs)
    runtime = demo_runtime(staging / CHECKPOINT, home)
    test = evaluate_organs(*score_split(runtime, data, "test", labeller, items), items)
    record = {
        "model": MODEL_ID, "demo_version": DEMO_VERSION, "software": f"ctfoundation {__version__}",
        "command": "python -m training.demo build --model fvlm-demo", "seed": config.train.seed,
        "data": asdict(spec), "data_key": spec.key(), "config": CONFIG.name, "organs": list(organs),
        "batch_size": config.train.batch_size, "stages": {"fvlm": stage},
        "total_seconds": round(time.perf_counter() - started, 1),
        "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "test": auroc_record(test),
        "test_organ_mean_auroc": {organ: round(v, 4) for organ, v in organ_means(test, items).items()},
        "test_per_organ_mean_auroc": round(per_organ_mean_auroc(test, items), 4),
        "notice": "trained on demo data (synthetic findings inserted into sample CTs), not for diagnosis",
    }
    write_json_atomic(staging / "training_record.json", record)
    shutil.rmtree(staging / "run", ignore_errors=True)
    import_model(MODEL_ID, staging, home=home, accept_licenses=True, link=True)
    say(f"installed {MODEL_ID}: {resolve_weights(MODEL_ID, home=home)}")
    return record


def installed_fvlm_demo(home: Path | None = None) -> Path | None:
    """The installed fvlm-demo checkpoint, or None when missing, incomplete or from an older DEMO_VERSION."""
    try:
        return resolve_weights(MODEL_ID, home=home)
    except WeightsError:
        return None


def eval_fvlm_demo(data_root: Path, home: Path | None = None, say: Say = print) -> float:
    """Print the organ-wise table and `demo fVLM per-organ mean AUROC: <value>` on the held-out test split."""
    checkpoint = installed_fvlm_demo(home)
    if checkpoint is None:
        say(f"{MODEL_ID} is not built yet (or was built by an older version): training it now ({EXPECTED})")
        train_fvlm_demo(data_root, home, say=say)
        checkpoint = resolve_weights(MODEL_ID, home=home)
    runtime = demo_runtime(checkpoint, home)
    record = json.loads((checkpoint.parent / "training_record.json").read_text())
    spec = DemoDataSpec(**record["data"])
    data = demo_data(Path(data_root), home, spec, say)
    organs = runtime.organs
    labeller = DemoLabeller.from_base(organs, Path(data_root))
    items = demo_items(organs)
    pointing = PointingResult()
    evaluation = evaluate_organs(*score_split(runtime, data, "test", labeller, items, pointing), items)
    say(f"{MODEL_ID} on the {spec.test} held-out demo cases, per organ and inserted finding (fVLM's prompts):")
    say(format_organ_evaluation(evaluation, items))
    value = per_organ_mean_auroc(evaluation, items)
    say(f"demo fVLM per-organ mean AUROC: {value:.3f}")
    say(pointing_report(pointing, spec.test, "fVLM "))
    return value
