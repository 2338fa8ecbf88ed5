"""One training loop for the three recipes, on `accelerate` (single CPU/GPU, multi-GPU, multi-node alike).

Launch with `python -m training.run CONFIG` or `accelerate launch [--multi_gpu ...] -m training.run CONFIG`.
Mixed precision (bf16) and data parallelism come from accelerate; checkpoints are accelerate states
(`output_dir/checkpoints/step_N`: weights, optimiser, scheduler, RNG) and a run resumes from the latest
one. Every `log_every` steps loss, learning rate and temperature go to `output_dir/log.jsonl` and the bar.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import DataLoaderConfiguration, DistributedDataParallelKwargs
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm import tqdm

from CTFoundationLib.errors import TrainingError
from CTFoundationLib.inference.ctclip import load_tokenizer
from CTFoundationLib.models.ctclip import load_ctclip
from CTFoundationLib.preprocess import ORGAN_WINDOWS, SPECS, PreprocessSpec
from CTFoundationLib.vocab import CT_RATE_ABNORMALITIES
from training import fvlm
from training.accelerator import stage_accelerator
from training.config import TrainingConfig
from training.ctrate import CTRateDataset, find_volumes, load_cases, read_metadata
from training.export import save_checkpoint
from training.finding_masks import FindingMasks
from training.modeling import (
    FrozenTextPrefix,
    TrainableCTCLIP,
    build_clip,
    enable_gradient_checkpointing,
    read_cluster_size,
)
from training.recipes import (
    LiProHead,
    Localisation,
    contrastive_step,
    lipro_step,
    positive_class_weights,
    vocabfine_step,
)

Logger = Callable[[dict], None]


@dataclass
class TrainingResult:
    checkpoint: Path
    steps: int
    seconds: float
    losses: list[float]


class DataWait:
    """How long the training loop waits for its batches: the loader's share of the wall time (0 when it keeps up)."""

    def __init__(self, started: float) -> None:
        self.waited_s, self.last_log = 0.0, started

    def timed(self, batches: Iterable[dict]) -> Iterator[dict]:
        """The batches, adding the seconds spent waiting for each one."""
        iterator = iter(batches)
        while True:
            asked = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            self.waited_s += time.perf_counter() - asked
            yield batch

    def since_last_log(self) -> dict[str, float]:
        """data_wait_s (seconds waited since the last log) and data_wait_fraction (of the wall time since then)."""
        now = time.perf_counter()
        record = {"data_wait_s": round(self.waited_s, 3),
                  "data_wait_fraction": round(self.waited_s / max(now - self.last_log, 1e-9), 4)}
        self.waited_s, self.last_log = 0.0, now
        return record


def training_dataset(config: TrainingConfig) -> CTRateDataset | fvlm.FVLMDataset:
    data = config.data
    if data.root is None or data.reports_csv is None:
        raise TrainingError(f"{config.source}: data.root and data.reports_csv are required")
    if config.train.recipe == "fvlm":
        return fvlm_dataset(config)
    needs_labels = config.train.recipe != "contrastive"
    if needs_labels and data.labels_csv is None:
        raise TrainingError(f"{config.source}: {config.train.recipe} needs data.labels_csv")
    cases = load_cases(data.root, data.reports_csv, data.labels_csv if needs_labels else None)
    metadata = read_metadata(data.metadata_csv) if data.metadata_csv else None
    if data.preprocess not in SPECS:
        raise TrainingError(f"{config.source}: data.preprocess must be one of {sorted(SPECS)}")
    return CTRateDataset(cases, SPECS[data.preprocess], data.stored_values, metadata, data.cache_images)


def finding_masks(config: TrainingConfig, spec: PreprocessSpec) -> FindingMasks | None:
    """The token targets of the localisation term on this model's token grid over inputs preprocessed by `spec`
    (None when the term is off)."""
    if config.train.localisation_weight == 0:
        return None
    vision, train = config.model.clip_config().vision, config.train
    findings = CT_RATE_ABNORMALITIES if train.localisation_findings == "all" else train.localisation_findings
    return FindingMasks(config.data.finding_masks, spec, (vision.temporal_patch_size, *vision.patch_size),
                        train.localisation_radius_mm, findings)


def fvlm_dataset(config: TrainingConfig) -> fvlm.FVLMDataset:
    """The fVLM training split: organ texts from the reports, organ masks from data.masks (or built-in anatomy)."""
    data, organs = config.data, config.model.fvlm_config().organs
    if data.preprocess not in ORGAN_WINDOWS:
        raise TrainingError(f"{config.source}: recipe fvlm needs data.preprocess one of {sorted(ORGAN_WINDOWS)}")
    items = fvlm.prompt_items(organs, data.labels_csv) if config.train.prompt_weight > 0 else ()
    cases = fvlm.load_fvlm_cases(find_volumes(data.root), data.reports_csv, organs, data.labels_csv, items)
    cache = Path(config.train.output_dir) / "inputs" if data.cache_images else None
    return fvlm.FVLMDataset(cases, organs, SPECS[data.preprocess], ORGAN_WINDOWS[data.preprocess],
                            fvlm.AnatomyLabeller(organs, data.masks, data.mask_scheme), cache,
                            data.organ_text == "sentence", items)


def initial_model(config: TrainingConfig) -> TrainableCTCLIP | fvlm.TrainableFVLM:
    """A fresh model (contrastive, fvlm) or the init checkpoint with its codebook use counts (fine-tuning)."""
    model = config.model
    if config.train.recipe == "fvlm":
        return fvlm.TrainableFVLM(fvlm.build_fvlm(model.fvlm_config(), model.text_init, config.train.seed,
                                                  model.query_init_std, model.image_init, model.image_init_grid))
    if model.init_checkpoint is None:
        return TrainableCTCLIP(build_clip(model.clip_config(), model.text_init, config.train.seed,
                                          model.temperature_init))
    path = model.init_checkpoint
    clip = load_ctclip(path, model.clip_config())
    for parameter in clip.parameters():
        parameter.requires_grad_(True)
    return TrainableCTCLIP(clip, read_cluster_size(path))


def make_optimizer(params: list[dict], config: TrainingConfig) -> torch.optim.Optimizer:
    """Adam without weight decay (the reference's choice for wd 0), else AdamW."""
    train = config.train
    if train.weight_decay == 0:
        return torch.optim.Adam(params, lr=train.lr, betas=train.betas, eps=1e-8)
    return torch.optim.AdamW(params, lr=train.lr, betas=train.betas, eps=1e-8, weight_decay=train.weight_decay)


def lr_factor(step: int, config: TrainingConfig) -> float:
    """Linear warm-up from min_lr over warmup_steps, then constant (reference CT-CLIP) or cosine to min_lr
    (fine-tuning, fVLM)."""
    train = config.train
    floor = train.min_lr / train.lr
    if step < train.warmup_steps:
        return floor + (1 - floor) * (step + 1) / train.warmup_steps
    if train.schedule == "constant":
        return 1.0
    progress = (step - train.warmup_steps) / max(1, train.steps - train.warmup_steps)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def parameter_groups(model: TrainableCTCLIP, config: TrainingConfig) -> list[dict]:
    """Text tower at text_lr (when set), everything else at lr."""
    tower = model.fvlm.text_encoder if isinstance(model, fvlm.TrainableFVLM) else model.clip.text_transformer
    text = [p for p in tower.parameters() if p.requires_grad]
    text_ids = {id(p) for p in text}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in text_ids]
    return [{"params": rest, "lr": config.train.lr}, {"params": text, "lr": config.train.text_lr or config.train.lr}]


def freeze_text_layers(model: TrainableCTCLIP | fvlm.TrainableFVLM, count: int) -> None:
    """Keep the text embeddings and the first `count` BERT layers fixed (0: everything trains), run once per
    distinct text (`FrozenTextPrefix`)."""
    if count <= 0:
        return
    is_fvlm = isinstance(model, fvlm.TrainableFVLM)
    bert = model.fvlm.text_encoder if is_fvlm else model.clip.text_transformer
    layers = bert.encoder["layer"] if is_fvlm else bert.encoder.layer
    for module in (bert.embeddings, *layers[:count]):
        for parameter in module.parameters():
            parameter.requires_grad_(False)
    model.frozen_text = FrozenTextPrefix(bert.embeddings, layers, count)


def latest_checkpoint(output_dir: Path) -> tuple[Path, int] | None:
    found = [(p, int(p.name.split("_")[1])) for p in (output_dir / "checkpoints").glob("step_*") if p.is_dir()]
    return max(found, key=lambda item: item[1]) if found else None


class Trainer:
    """Holds the accelerator, model, optimiser and data of one run."""

    def __init__(self, config: TrainingConfig, dataset: CTRateDataset | None = None) -> None:
        self.config, train = config, config.train
        self.accelerator = stage_accelerator(
            mixed_precision=train.mixed_precision,
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=train.recipe == "vocabfine")],
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        )
        set_seed(train.seed)
        self.output_dir = Path(train.output_dir)
        self.tokenizer = load_tokenizer(Path(config.model.tokenizer)) if config.model.tokenizer else None
        if self.tokenizer is None and train.recipe != "lipro":
            raise TrainingError(f"{config.source}: model.tokenizer is required for {train.recipe}")
        self.dataset = dataset or training_dataset(config)
        if isinstance(self.dataset, CTRateDataset):
            self.dataset.finding_masks = finding_masks(config, self.dataset.spec)
        self.model = initial_model(config)
        self.is_fvlm = train.recipe == "fvlm"
        if train.gradient_checkpointing:
            if self.is_fvlm:
                fvlm.enable_gradient_checkpointing(self.model.fvlm)
            else:
                enable_gradient_checkpointing(self.model.clip)
        freeze_text_layers(self.model, train.freeze_text_layers)
        self.head = self.pos_weight = None
        if train.recipe == "lipro":
            self._prepare_lipro()
        trainable = self.head if self.head is not None else self.model
        params = [{"params": list(self.head.parameters())}] if self.head else parameter_groups(self.model, config)
        self.optimizer = make_optimizer(params, config)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: lr_factor(step, config))
        loader = DataLoader(
            self.dataset, batch_size=train.batch_size, shuffle=True, drop_last=train.recipe in ("contrastive", "fvlm"),
            num_workers=config.data.num_workers, collate_fn=fvlm.collate_fvlm if self.is_fvlm else None,
        )
        if len(loader) == 0:
            raise TrainingError(f"{config.source}: {len(self.dataset)} cases make no full batch of {train.batch_size}")
        if train.epochs is not None:
            train.steps = train.epochs * len(loader)
        prepared = self.accelerator.prepare(trainable, self.optimizer, loader, self.scheduler)
        trainable, self.optimizer, self.loader, self.scheduler = prepared
        if self.head is not None:
            self.head = trainable
            self.model.to(self.accelerator.device)
        else:
            self.model = trainable

    def _prepare_lipro(self) -> None:
        clip = self.model.clip
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        self.model.eval()
        clip.attach_lipro_classifier()
        self.head = LiProHead(clip.classifier, self.config.train.dropout)
        weights = self.config.train.pos_weight
        if weights == "auto":
            labels = torch.stack([torch.from_numpy(case.labels) for case in self.dataset.cases])
            self.pos_weight = positive_class_weights(labels)
        else:
            self.pos_weight = torch.tensor([float(w) for w in weights])

    @property
    def core(self) -> TrainableCTCLIP | fvlm.TrainableFVLM:
        return self.accelerator.unwrap_model(self.model)

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """fVLM's texts, truncated at max_txt_len (padding beyond the longest changes nothing, see encode_text)."""
        tokens = self.tokenizer(texts, padding="longest", truncation=True,
                                max_length=self.core.fvlm.config.max_txt_len, return_tensors="pt")
        return tokens["input_ids"], tokens["attention_mask"]

    def loss(self, batch: dict) -> torch.Tensor:
        recipe = self.config.train.recipe
        if recipe == "fvlm":
            return fvlm.fvlm_step(self.model, batch, self.tokenize, self.core.fvlm.config.organs,
                                  self.dataset.items, self.config.train.prompt_weight)
        if recipe == "lipro":
            return lipro_step(self.model, self.head, batch, self.pos_weight)
        if recipe == "contrastive":
            return contrastive_step(self.model, batch, self.tokenizer)
        train = self.config.train
        localisation = None
        if train.localisation_weight > 0:
            localisation = Localisation(train.localisation_weight, train.localisation_temperature)
        return vocabfine_step(self.model, batch, self.tokenizer, localisation=localisation)

    def train(self, log: Logger | None = None) -> TrainingResult:
        """Run (or resume) to train.steps; returns the exported checkpoint and the logged losses."""
        train, accelerator = self.config.train, self.accelerator
        start = self._resume()
        steps_per_epoch = len(self.loader)
        started, losses = time.perf_counter(), []
        bar = tqdm(total=train.steps, initial=start, desc=train.recipe, disable=not accelerator.is_main_process)
        step, waits = start, DataWait(started)
        while step < train.steps:
            epoch, offset = divmod(step, steps_per_epoch)
            self.loader.set_epoch(epoch)
            batches = accelerator.skip_first_batches(self.loader, offset) if offset else self.loader
            for batch in waits.timed(batches):
                loss = self._step(batch)
                step += 1
                losses.append(loss)
                bar.update(1)
                if step % train.log_every == 0 or step == train.steps:
                    self._log(step, loss, time.perf_counter() - started, waits.since_last_log(), bar, log)
                if step % train.save_every == 0 or step == train.steps:
                    self._save_state(step)
                if step >= train.steps:
                    break
        bar.close()
        checkpoint = self.export()
        return TrainingResult(checkpoint, step, time.perf_counter() - started, losses)

    def _step(self, batch: dict) -> float:
        trainable = self.head if self.head is not None else self.model
        trainable.train()
        with self.accelerator.autocast():
            loss = self.loss(batch)
        if not torch.isfinite(loss):
            raise TrainingError(f"the loss became {loss.item()}; lower train.lr or check the data")
        self.accelerator.backward(loss)
        if self.config.train.max_grad_norm is not None:
            self.accelerator.clip_grad_norm_(trainable.parameters(), self.config.train.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    def _log(self, step: int, loss: float, seconds: float, data_wait: dict[str, float], bar: tqdm,
             log: Logger | None) -> None:
        if self.is_fvlm:  # fVLM divides by its temperature; CT-CLIP multiplies by exp(temperature)
            temperature = float(self.core.fvlm.temp.detach())
            scale = 1.0 / temperature
        else:
            temperature = float(self.core.clip.temperature.detach())
            scale = math.exp(temperature)
        record = {
            "step": step, "loss": round(loss, 6), "lr": self.scheduler.get_last_lr()[0],
            "temperature": round(temperature, 5), "logit_scale": round(scale, 4), "seconds": round(seconds, 1),
        } | data_wait
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{record['lr']:.2e}", scale=f"{record['logit_scale']:.2f}")
        if self.accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            with open(self.output_dir / "log.jsonl", "a") as handle:
                handle.write(json.dumps(record) + "\n")
            if log:
                log(record)

    def _save_state(self, step: int) -> None:
        folder = self.output_dir / "checkpoints" / f"step_{step}"
        self.accelerator.save_state(str(folder))
        if self.accelerator.is_main_process:
            kept = sorted((self.output_dir / "checkpoints").glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
            for old in kept[: -self.config.train.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        self.accelerator.wait_for_everyone()

    def _resume(self) -> int:
        found = latest_checkpoint(self.output_dir) if self.config.train.resume else None
        if found is None:
            return 0
        folder, step = found
        self.accelerator.load_state(str(folder))
        self.accelerator.print(f"resumed from {folder} (step {step})")
        return step

    def export(self) -> Path:
        """The trained model in the official layout (train.output_dir/model.pt unless export.checkpoint)."""
        path = Path(self.config.export.checkpoint or self.output_dir / "model.pt")
        if self.accelerator.is_main_process:
            core = self.core
            if self.is_fvlm:
                fvlm.save_fvlm_checkpoint(core.fvlm, path)
            else:
                save_checkpoint(core.clip, path, core.quantizer.cluster_size)
        self.accelerator.wait_for_everyone()
        return path
