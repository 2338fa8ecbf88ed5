"""Training configs: YAML files of four sections (model, data, train, export) read into dataclasses.

Relative paths in a config are taken from the config file's folder. Unknown keys are errors, so a typo
never silently falls back to a default. See training/configs/*.yaml for the reference recipes.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from CTFoundationLib.errors import TrainingError
from CTFoundationLib.models.ctclip import FULL_SIZE_CONSTRUCTORS, CTCLIPConfig
from CTFoundationLib.models.fvlm import FVLMConfig
from CTFoundationLib.preprocess import SPECS
from CTFoundationLib.vocab import CT_RATE_ABNORMALITIES
from training.ctrate import STORED_VALUES

RECIPES = ("contrastive", "vocabfine", "lipro", "fvlm")


@dataclass
class ModelSection:
    """constructors: "full_size", a JSON file, or inline {"CTViT", "BertConfig", "CTCLIP"} arguments (recipe fvlm:
    {"ViT", "BertConfig", "BlipPretrain"[, "organ_pooling"]}; full_size = the released fVLM).
    init_checkpoint: an official-layout checkpoint to start from (VocabFine, LiPro, or resuming elsewhere).
    text_init: a local BERT folder for the text tower (e.g. CXR-BERT, MiniLM); tokenizer: vocab.txt/folder.
    image_init (fvlm): a local MAE checkpoint for the ViT (torch file with the state dict bare or under "model",
    or .safetensors; encoder keys patch_embed.*, pos_embed, blocks.N.*, norm.*; the decoder is ignored), as the
    reference starts from mae_pretrain_vit_base.pth; image_init_grid: its token grid [nz, ny, nx] when it is a 3-D
    MAE of another grid than the ViT's (a 2-D MAE's s x s grid is found from the file).
    temperature_init: starting value of the learned temperature (logit scale = exp of it) of a fresh model;
    None keeps the reference's 1.0. query_init_std (fvlm): organ queries drawn with this std (0: the reference's
    zeros, an even average over the organ's tokens at the start)."""

    constructors: Any = "full_size"
    init_checkpoint: Path | None = None
    text_init: Path | None = None
    image_init: Path | None = None
    image_init_grid: tuple[int, int, int] | None = None
    tokenizer: Path | None = None
    temperature_init: float | None = None
    query_init_std: float = 0.0

    def constructor_arguments(self) -> dict:
        if self.constructors == "full_size":
            return json.loads(json.dumps(FULL_SIZE_CONSTRUCTORS))
        if isinstance(self.constructors, dict):
            return self.constructors
        if not isinstance(self.constructors, (str, Path)):
            raise TrainingError(f"model.constructors: full_size, a JSON file or a mapping, not {self.constructors!r}")
        path = Path(self.constructors)
        try:
            loaded = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise TrainingError(f"model.constructors {path}: not a readable JSON file ({error})") from None
        if not isinstance(loaded, dict):
            raise TrainingError(f"model.constructors {path}: the file holds no mapping of constructor arguments")
        return loaded.get("constructors", loaded)

    def clip_config(self) -> CTCLIPConfig:
        """The CTCLIPConfig of `constructors`; a TrainingError saying what does not fit."""
        arguments = self.constructor_arguments()
        try:
            return CTCLIPConfig.from_reference_constructors(arguments)
        except (ValueError, TypeError, KeyError, AttributeError) as error:
            raise TrainingError(f"model.constructors: not usable CT-CLIP constructor arguments ({error})") from None

    def fvlm_config(self) -> FVLMConfig:
        """The FVLMConfig of `constructors` (full_size: the released fVLM, its four organs)."""
        if self.constructors == "full_size":
            return FVLMConfig()
        try:
            return FVLMConfig.from_reference_constructors(self.constructor_arguments())
        except (ValueError, TypeError, KeyError, AttributeError, StopIteration) as error:
            raise TrainingError(f"model.constructors: not usable fVLM constructor arguments ({error})") from None


@dataclass
class DataSection:
    """A CT-RATE split: root (the split folder), reports_csv, labels_csv (VocabFine, LiPro, validation),
    metadata_csv + stored_values "raw" for first-release volumes; validation_* the same for the validation
    split that thresholds are chosen on. The training text is each report's whole Findings (the reference's).
    masks (recipe fvlm): a folder with each volume's segmentation, `<masks>/<volume stem>/` (one NIfTI per
    structure) or `<masks>/<volume stem>.nii.gz` (a label map of `mask_scheme`); None: the built-in anatomy.
    organ_text (fvlm): "all" (each organ's whole text, the reference's) or "sentence" (one of its sentences drawn
    at random each time the case is read). finding_masks (vocabfine with train.localisation_weight): a folder of
    finding masks, `<finding_masks>/<volume stem>/<Finding_name>.nii.gz` (training/finding_masks.py)."""

    root: Path | None = None
    reports_csv: Path | None = None
    labels_csv: Path | None = None
    metadata_csv: Path | None = None
    stored_values: str = "hu"
    validation_root: Path | None = None
    validation_reports_csv: Path | None = None
    validation_labels_csv: Path | None = None
    validation_metadata_csv: Path | None = None
    preprocess: str = "ct-clip-v2"
    masks: Path | None = None
    mask_scheme: str = "total"
    organ_text: str = "all"
    finding_masks: Path | None = None
    num_workers: int = 4
    cache_images: bool = False


@dataclass
class TrainSection:
    """Optimisation. Defaults are the reference CTClipTrainer's: batch 8, Adam (betas 0.9/0.99) lr 1.25e-6,
    no weight decay, gradient-norm clip 0.5, 100,001 steps, constant learning rate. text_lr: another rate for
    the text tower; freeze_text_layers: N > 0 keeps the text embeddings and the first N BERT layers fixed (run once
    per distinct text, without dropout).
    epochs: when set, steps = epochs x batches per epoch; min_lr: where the cosine ends and the warm-up starts.
    prompt_weight (fvlm): > 0 adds that times the loss of fVLM's zero-shot prompt pairs against data.labels_csv
    (`training.fvlm.prompt_loss`). localisation_weight (vocabfine, not the reference's): > 0 adds that times
    `recipes.localisation_loss`, which rewards each positive finding's map for peaking on the tokens whose centre
    lies within localisation_radius_mm of its mask (data.finding_masks), over a softmax of the per-token terms
    divided by localisation_temperature (logit units); localisation_findings: "all" or the CT-RATE findings whose
    masks it uses (the others train as plain VocabFine)."""

    recipe: str = "contrastive"
    batch_size: int = 8
    lr: float = 1.25e-6
    text_lr: float | None = None
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.99)
    max_grad_norm: float | None = 0.5
    steps: int = 100001
    epochs: int | None = None
    warmup_steps: int = 0
    min_lr: float = 0.0
    schedule: str = "constant"
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    seed: int = 0
    freeze_text_layers: int = 0
    log_every: int = 10
    save_every: int = 1000
    keep_checkpoints: int = 2
    output_dir: Path = Path("runs/ct-clip")
    resume: bool = True
    dropout: float = 0.3
    pos_weight: Any = "auto"
    prompt_weight: float = 0.0
    localisation_weight: float = 0.0
    localisation_temperature: float = 0.1
    localisation_radius_mm: float = 15.0
    localisation_findings: Any = "all"


@dataclass
class ExportSection:
    """Where the final official-layout checkpoint goes, and whether to choose thresholds on validation."""

    checkpoint: Path | None = None
    thresholds: bool = True


@dataclass
class TrainingConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    export: ExportSection = field(default_factory=ExportSection)
    source: Path | None = None

    def check(self) -> TrainingConfig:
        train = self.train
        if train.recipe not in RECIPES:
            raise TrainingError(f"{self.source}: train.recipe must be one of {RECIPES}, got {train.recipe!r}")
        if train.mixed_precision not in ("no", "bf16", "fp16"):
            raise TrainingError(f"{self.source}: train.mixed_precision must be no, bf16 or fp16")
        if train.schedule not in ("constant", "cosine"):
            raise TrainingError(f"{self.source}: train.schedule must be constant or cosine")
        if min(train.batch_size, train.steps, train.log_every, train.save_every) < 1:
            raise TrainingError(
                f"{self.source}: train.batch_size, steps, log_every and save_every must be positive")
        if train.keep_checkpoints < 1:
            raise TrainingError(f"{self.source}: train.keep_checkpoints must be at least 1")
        if train.recipe in ("vocabfine", "lipro") and self.model.init_checkpoint is None:
            raise TrainingError(f"{self.source}: {train.recipe} fine-tunes a trained model: set model.init_checkpoint")
        if not _is_pos_weight(train.pos_weight):
            raise TrainingError(f"{self.source}: train.pos_weight must be auto or {len(CT_RATE_ABNORMALITIES)} numbers "
                                f"(CT-RATE's finding order), got {train.pos_weight!r}")
        self._check_data()
        if train.prompt_weight > 0 and (train.recipe != "fvlm" or self.data.labels_csv is None):
            raise TrainingError(f"{self.source}: train.prompt_weight is for recipe fvlm and needs data.labels_csv")
        self._check_localisation()
        self._check_image_init()
        if train.recipe == "fvlm":
            self.model.fvlm_config()
        else:
            self.model.clip_config()
        return self

    def _check_localisation(self) -> None:
        train, masks = self.train, self.data.finding_masks
        if train.localisation_weight < 0 or train.localisation_temperature <= 0 or train.localisation_radius_mm < 0:
            raise TrainingError(f"{self.source}: train.localisation_weight and localisation_radius_mm must be >= 0 "
                                "and localisation_temperature > 0")
        if train.localisation_weight > 0 and (train.recipe != "vocabfine" or masks is None):
            raise TrainingError(f"{self.source}: train.localisation_weight is for recipe vocabfine and needs "
                                "data.finding_masks (a folder of finding masks)")
        if masks is not None and train.localisation_weight == 0:
            raise TrainingError(f"{self.source}: data.finding_masks is read only for the localisation term; set "
                                "train.localisation_weight > 0 or remove the key")
        findings = train.localisation_findings
        if findings != "all" and (isinstance(findings, str) or not set(findings) <= set(CT_RATE_ABNORMALITIES)):
            raise TrainingError(f"{self.source}: train.localisation_findings must be all or a list of CT-RATE "
                                f"findings ({', '.join(CT_RATE_ABNORMALITIES)}), got {findings!r}")
        if masks is not None and not masks.is_dir():
            raise TrainingError(f"{self.source}: data.finding_masks {masks} is not a folder")

    def _check_image_init(self) -> None:
        image_init = self.model.image_init
        if image_init is None:
            if self.model.image_init_grid is not None:
                raise TrainingError(f"{self.source}: model.image_init_grid is the grid of model.image_init; set both")
            return
        if self.train.recipe != "fvlm":
            raise TrainingError(f"{self.source}: model.image_init (an MAE checkpoint for the ViT) is for recipe fvlm")
        if not image_init.is_file():
            raise TrainingError(f"{self.source}: model.image_init {image_init} is not a file; point it at the MAE "
                                "checkpoint (e.g. mae_pretrain_vit_base.pth) or remove the key")

    def _check_data(self) -> None:
        data = self.data
        if data.organ_text not in ("all", "sentence"):
            raise TrainingError(f"{self.source}: data.organ_text must be all or sentence, got {data.organ_text!r}")
        if data.preprocess not in SPECS:
            raise TrainingError(f"{self.source}: data.preprocess must be one of {sorted(SPECS)}, "
                                f"got {data.preprocess!r}")
        if data.stored_values not in STORED_VALUES:
            raise TrainingError(f"{self.source}: data.stored_values must be one of {STORED_VALUES}, "
                                f"got {data.stored_values!r}")
        if data.stored_values == "raw":
            for root, metadata in (("root", "metadata_csv"), ("validation_root", "validation_metadata_csv")):
                if getattr(data, root) is not None and getattr(data, metadata) is None:
                    raise TrainingError(f"{self.source}: data.stored_values is raw, so data.{root} needs "
                                        f"data.{metadata} (rescale and spacing of each volume)")


def _is_pos_weight(value: Any) -> bool:
    if value == "auto":
        return True
    try:
        return len(value) == len(CT_RATE_ABNORMALITIES) and all(float(w) >= 0 for w in value)
    except (TypeError, ValueError):
        return False


_NUMBERS = {"int": int, "float": float}


def _typed(value: Any, kind: str, where: str) -> Any:
    """A YAML value as its field's type: numbers (YAML 1.1 reads 1e-5 as text), bools and the betas pair."""
    number = _NUMBERS.get(kind.removesuffix(" | None"))
    try:
        if number is not None and not isinstance(value, bool):
            return number(value)
        if kind == "bool" and not isinstance(value, bool):
            raise ValueError
        if kind.startswith("tuple[float"):
            pair = tuple(float(v) for v in value)
            if len(pair) != 2:
                raise ValueError
            return pair
        if kind.startswith("tuple[int"):  # a token grid (nz, ny, nx)
            grid = tuple(int(v) for v in value)
            if len(grid) != 3 or min(grid) < 1:
                raise ValueError
            return grid
    except (TypeError, ValueError):
        raise TrainingError(f"{where}: {value!r} is not a valid {kind}") from None
    return value


def _section(cls: type, raw: Any, name: str, base: Path, source: Path | None):
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        raise TrainingError(f"{source}: section '{name}' must be a mapping")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise TrainingError(f"{source}: unknown keys {unknown} in '{name}'; known: {sorted(fields)}")
    values = {}
    for key, value in raw.items():
        kind = str(fields[key].type)
        if value is not None and "Path" in kind:
            path = Path(str(value)).expanduser()
            value = path if path.is_absolute() else base / path
        elif value is not None:
            value = _typed(value, kind, f"{source}: {name}.{key}")
        values[key] = value
    if name == "model" and isinstance(values.get("constructors"), str) and values["constructors"] != "full_size":
        path = Path(values["constructors"]).expanduser()
        values["constructors"] = path if path.is_absolute() else base / path
    return cls(**values)


def load_config(path: Path, overrides: dict[str, dict[str, Any]] | None = None) -> TrainingConfig:
    """Read a YAML config; `overrides` ({"train": {"steps": 10}, ...}) replace values after reading."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise TrainingError(f"{path}: cannot read this YAML config ({error})") from None
    if not isinstance(raw, dict):
        raise TrainingError(f"{path}: a config is a mapping with sections model, data, train, export")
    for section, values in (overrides or {}).items():
        current = raw.get(section) or {}
        raw[section] = {**current, **values} if isinstance(current, dict) else current
    unknown = sorted(set(raw) - {"model", "data", "train", "export"})
    if unknown:
        raise TrainingError(f"{path}: unknown sections {unknown}; use model, data, train, export")
    base = path.resolve().parent
    sections = {
        name: _section(cls, raw.get(name), name, base, path)
        for name, cls in (("model", ModelSection), ("data", DataSection), ("train", TrainSection),
                          ("export", ExportSection))
    }
    return TrainingConfig(**sections, source=path).check()
