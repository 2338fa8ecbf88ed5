"""CT-CHAT's two training stages on `accelerate` (CPU, one GPU, or `accelerate launch` for several).

    python -m training.ctchat train training/configs/ctchat_pretrain.yaml     # stage 1: projector only
    python -m training.ctchat train training/configs/ctchat_lora.yaml         # stage 2: LoRA + projector + new rows

A run writes `log.jsonl` (step, loss, lr, seconds), checkpoints of what trains (`checkpoints/step_N/trainable.pt`:
trainable weights, optimiser, scheduler, step; read with weights_only=True; a rerun resumes from the latest), and
at the end stage 1's `mm_projector.bin` or stage 2's LoRA folder with `non_lora_trainables.bin` (`export`).
Schedules are the reference's: linear warm-up over warmup_ratio of the steps, then cosine to 0.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import yaml
from torch import Tensor

from CTFoundationLib.errors import TrainingError

from .data import PLAIN, collate, tokenize_item
from .model import LoraSettings, TrainableCTChat, build_trainable

STAGES = ("pretrain", "lora")
Say = Callable[[str], None]


@dataclass
class ChatTrainConfig:
    """One stage. Defaults: the reference's Llama-3.1 scripts (pretrain: lr 1e-3, batch 12, 1 epoch; lora: lr 2e-5,
    projector lr 2e-5, r 128, alpha 256, batch 3 x 12 accumulation, 10 epochs); bf16 and gradient checkpointing."""

    stage: str = "pretrain"
    llm: Path | None = None  # Hugging Face folder or .gguf
    template: str = "llama3"  # stage 2's conversation template
    pretrain_format: str = PLAIN  # stage 1's: the reference's plain captions, or a template name (the demo's)
    data: Path | None = None  # conversation JSON (training.ctchat.vqa)
    kinds: list[str] | None = None  # only these question kinds (stage 1: report_generation)
    images: Path | None = None  # folder of the volumes (CT-RATE layout or flat), encoded once with `encoder`
    encoder: str = "ct-clip-v2"
    projector: dict = field(default_factory=dict)  # ProjectorConfig fields; llm_hidden_size from the LLM
    init_projector: Path | None = None  # stage 2: stage 1's mm_projector.bin
    lora: dict = field(default_factory=dict)  # LoraSettings fields
    output_dir: Path = Path("runs/ctchat")
    steps: int | None = None  # None: epochs x batches
    epochs: float = 1.0
    batch_size: int = 12
    grad_accum: int = 1
    lr: float = 1e-3
    projector_lr: float | None = None  # the reference's mm_projector_lr
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    max_length: int = 4096
    mixed_precision: str = "no"  # "bf16" on GPUs
    gradient_checkpointing: bool = False
    seed: int = 0
    log_every: int = 1
    save_every: int = 2000
    resume: bool = True

    @classmethod
    def load(cls, path: Path, overrides: dict | None = None) -> ChatTrainConfig:
        """A YAML file (relative paths from its folder), then `overrides`; unknown keys are errors."""
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as error:
            raise TrainingError(f"{path}: not a readable YAML config ({error})") from None
        raw.update(overrides or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise TrainingError(f"{path}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        for key in ("llm", "data", "images", "init_projector", "output_dir"):
            if raw.get(key) is not None:
                value = Path(str(raw[key])).expanduser()
                raw[key] = value if value.is_absolute() else (Path(path).parent / value).resolve()
        config = cls(**raw)
        config.check(str(path))
        return config

    def check(self, source: str = "config") -> None:
        if self.stage not in STAGES:
            raise TrainingError(f"{source}: stage must be one of {', '.join(STAGES)}, not {self.stage!r}")
        if self.llm is None:
            raise TrainingError(f"{source}: llm (the base model folder or .gguf file) is required")


@dataclass
class StageResult:
    model: TrainableCTChat
    steps: int
    seconds: float
    losses: list[float]
    output: Path


def lr_factor(step: int, total: int, warmup_ratio: float) -> float:
    """Linear warm-up over ceil(warmup_ratio x total) steps, then cosine to 0 at `total`."""
    warmup = math.ceil(warmup_ratio * total)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def select_items(items: list[dict], config: ChatTrainConfig) -> list[dict]:
    if not config.kinds:
        return items
    chosen = [item for item in items if item["conversations"][0].get("type") in config.kinds]
    if not chosen:
        raise TrainingError(f"no conversation of kind {', '.join(config.kinds)} in {config.data}")
    return chosen


def prepare_model(config: ChatTrainConfig, sample_grids: Tensor, model: TrainableCTChat | None) -> TrainableCTChat:
    """The stage's model: built from the config (or continued from `model`), frozen / LoRA-wrapped as the stage says."""
    if model is None:
        width = sample_grids.shape[-1]
        fields_ = {"token_dim": width, "context_dim": width, **config.projector}
        model = build_trainable(config.llm, fields_, config.init_projector, seed=config.seed)
        if config.init_projector is None:
            model.standardize_projector_input(sample_grids)
            model.match_projector_scale(sample_grids)  # after: it measures the standardised projector's output
    if config.stage == "pretrain":
        model.freeze_for_pretraining()
    else:
        model.add_lora(LoraSettings(**config.lora), config.gradient_checkpointing)
    return model


def parameter_groups(model: TrainableCTChat, config: ChatTrainConfig) -> list[dict]:
    """Projector at projector_lr (when set), the rest at lr."""
    projector = [p for p in model.projector.parameters() if p.requires_grad]
    ids = {id(p) for p in projector}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    groups = [{"params": projector, "lr": config.projector_lr or config.lr}]
    return groups + ([{"params": rest, "lr": config.lr}] if rest else [])


def trainable_state(model: TrainableCTChat) -> dict[str, Tensor]:
    return {name: p.detach().cpu().clone() for name, p in model.named_parameters() if p.requires_grad}


def train_stage(config: ChatTrainConfig, items: list[dict], grids: dict[str, Tensor],
                model: TrainableCTChat | None = None, say: Say = print) -> StageResult:
    """Train one stage on conversation items and their token grids; returns the trained model (and exports it)."""
    from accelerate.utils import set_seed

    from training.accelerator import stage_accelerator

    accelerator = stage_accelerator(mixed_precision=config.mixed_precision,
                                    gradient_accumulation_steps=config.grad_accum)
    set_seed(config.seed)
    items = select_items(items, config)
    # 16 CTs: enough tokens for the projector's channel statistics, still small at CT-CLIP's 24^3 x 512 grids
    model = prepare_model(config, torch.cat(list(grids.values())[:16]), model)
    template = config.pretrain_format if config.stage == "pretrain" else config.template
    examples = [tokenize_item(item, model.tokenizer, template, config.max_length) for item in items]
    n_queries = model.projector.config.n_queries
    world, rank = accelerator.num_processes, accelerator.process_index  # each process takes its own batches
    batches_per_epoch = max(1, len(examples) // (config.batch_size * world))
    total = config.steps or max(1, round(config.epochs * batches_per_epoch / config.grad_accum))
    optimizer = torch.optim.AdamW(parameter_groups(model, config), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, config.warmup_ratio))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    core: TrainableCTChat = accelerator.unwrap_model(model)
    output = Path(config.output_dir)
    start = resume(output, core, optimizer, scheduler) if config.resume else 0
    order = random.Random(config.seed)
    say(f"{config.stage}: {total} steps of {config.batch_size} x {config.grad_accum} conversations "
        f"({len(examples)} in all, {n_queries} image queries), from step {start}")
    losses, started, step = [], time.perf_counter(), start
    pad = core.tokenizer.pad_token_id if core.tokenizer.pad_token_id is not None else 0
    shuffled = list(range(len(examples)))
    micro = start * config.grad_accum
    while step < total:
        epoch, offset = divmod(micro, batches_per_epoch)
        order.seed(config.seed + epoch)
        order.shuffle(shuffled)
        first = (offset * world + rank) * config.batch_size
        chosen = shuffled[first: first + config.batch_size]
        batch = collate([examples[i] for i in chosen], grids, n_queries, pad)
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        model.train()
        with accelerator.accumulate(model), accelerator.autocast():
            loss = model(**batch)
            if not torch.isfinite(loss):
                raise TrainingError(f"the loss became {loss.item()}; lower lr or check the data")
            accelerator.backward(loss)
            if config.max_grad_norm is not None and accelerator.sync_gradients:
                accelerator.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        micro += 1
        if micro % config.grad_accum:
            continue
        step += 1
        losses.append(float(loss.detach()))
        if step % config.log_every == 0 or step == total:
            log_record(output, {"stage": config.stage, "step": step, "loss": round(losses[-1], 6),
                                "lr": scheduler.get_last_lr()[0], "seconds": round(time.perf_counter() - started, 1)},
                       accelerator.is_main_process)
        if step % config.save_every == 0 or step == total:
            save_checkpoint(output, step, core, optimizer, scheduler, accelerator.is_main_process)
    from .export import export_stage

    exported = export_stage(core, config, output) if accelerator.is_main_process else output
    return StageResult(core, step, time.perf_counter() - started, losses, exported)


def log_record(output: Path, record: dict, main: bool) -> None:
    if main:
        output.mkdir(parents=True, exist_ok=True)
        with open(output / "log.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")


def save_checkpoint(output: Path, step: int, model: TrainableCTChat, optimizer, scheduler, main: bool) -> None:
    """checkpoints/step_N/trainable.pt (only what trains: the frozen LLM is never copied); older ones removed."""
    if not main:
        return
    folder = output / "checkpoints" / f"step_{step}"
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"params": trainable_state(model), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "step": step}, folder / "trainable.pt")
    for old in (output / "checkpoints").glob("step_*"):
        if old != folder:
            for file in old.iterdir():
                file.unlink()
            old.rmdir()


def resume(output: Path, model: TrainableCTChat, optimizer, scheduler) -> int:
    """The step of the latest checkpoint under output/checkpoints (its state loaded), or 0."""
    found = sorted(output.glob("checkpoints/step_*/trainable.pt"), key=lambda p: int(p.parent.name.split("_")[1]))
    if not found:
        return 0
    state = torch.load(found[-1], map_location="cpu", weights_only=True)
    missing = model.load_state_dict(state["params"], strict=False)
    wrong = [k for k in state["params"] if k in missing.unexpected_keys]
    if wrong:
        raise TrainingError(f"{found[-1]}: holds weights this stage does not train ({wrong[0]}); "
                            "remove the run folder or use another output_dir")
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return int(state["step"])
