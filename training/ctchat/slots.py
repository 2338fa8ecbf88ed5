"""Projector pre-training on finding slots (the demo CT-CHAT's stage 1): the LLM frozen, only the projector learns.

Each image query has a fixed meaning: the queries are cut into one run per finding, as long as the finding's name
in the LLM's tokens, then one query for ".". For a CT the target of a run is the LLM's own token embeddings of the
finding's name where the finding is present and a filler token's (",") where it is absent, so the image reaches
the LLM as the list of its findings written in words. The loss is the mean squared distance to those embeddings,
relative to the embeddings' mean square.

Why not the reference's captioning objective at this scale: trained through the frozen LLM's answers, the demo's
projector stayed at the "no" prior after 150 CPU steps; regressing onto the slots reads presence held-out at ~0.92
within a minute, and stage 2's LoRA then learns to answer from them in a few dozen steps (docs/training.md).
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from CTFoundationLib.errors import TrainingError
from CTFoundationLib.models.ctchat.loading import load_llm_tokenizer

from .train import ChatTrainConfig, Say, StageResult, log_record, lr_factor, prepare_model
from .vqa import lower_finding

FILLER, END = ",", "."


@dataclass(frozen=True)
class FindingSlots:
    """The image queries' layout: finding `names[k]` owns the queries `spans[k]`, filled with `name_ids[k]`."""

    names: tuple[str, ...]
    name_ids: tuple[tuple[int, ...], ...]
    filler_id: int
    end_id: int

    @classmethod
    def from_tokenizer(cls, tokenizer, names: Sequence[str]) -> FindingSlots:
        def ids(text: str) -> tuple[int, ...]:
            return tuple(tokenizer(text, add_special_tokens=False).input_ids)

        filler, end = ids(FILLER), ids(END)
        if len(filler) != 1 or len(end) != 1:
            raise TrainingError(f"the tokenizer splits {FILLER!r} or {END!r} into several tokens; no slot layout")
        return cls(tuple(names), tuple(ids(" " + lower_finding(name)) for name in names), filler[0], end[0])

    @property
    def length(self) -> int:
        """The number of image queries the layout needs."""
        return sum(len(ids) for ids in self.name_ids) + 1

    @property
    def spans(self) -> list[slice]:
        starts = [0]
        for ids in self.name_ids:
            starts.append(starts[-1] + len(ids))
        return [slice(a, b) for a, b in zip(starts, starts[1:])]

    def target_ids(self, present: set[str]) -> list[int]:
        """The token ids a CT with the findings `present` should be projected onto, one per query."""
        ids = [token for name, name_ids in zip(self.names, self.name_ids)
               for token in (name_ids if name in present else [self.filler_id] * len(name_ids))]
        return ids + [self.end_id]

    def read(self, image: Tensor, embedding: Tensor) -> set[str]:
        """The findings a projected image (queries, H) states: runs nearer their name's embeddings than the filler's."""
        found = set()
        for name, ids, span in zip(self.names, self.name_ids, self.spans):
            run = image[span].float()
            named = (run - embedding[list(ids)].float()).pow(2).sum()
            filled = (run - embedding[self.filler_id].float()).pow(2).sum()
            if named < filled:
                found.add(name)
        return found


def pretrain_on_finding_slots(config: ChatTrainConfig, names: Sequence[str], present: Mapping[str, set[str]],
                              grids: dict[str, Tensor], say: Say = print) -> StageResult:
    """Stage 1 on finding slots: `present` maps each image to its findings (an image it lacks has none); config's
    steps, batch_size (images), lr, weight_decay, warmup_ratio, seed and output_dir apply. Writes log.jsonl and
    mm_projector.bin as `train_stage` does; the projector gets as many queries as the layout needs."""
    from .export import export_stage

    if config.stage != "pretrain" or not config.steps:
        raise TrainingError("finding-slot pre-training is stage 1 (stage: pretrain) with a number of steps")
    if not grids:
        raise TrainingError("finding-slot pre-training got no token grids; encode the volumes first (token_grids)")
    unknown = {(image, finding) for image in grids for finding in present.get(image, set()) - set(names)}
    if unknown:
        image, finding = min(unknown)
        raise TrainingError(f"{image}: finding {finding!r} has no slot; the slots are {', '.join(names)}")
    slots = FindingSlots.from_tokenizer(load_llm_tokenizer(config.llm), names)
    config = replace(config, projector={**config.projector, "n_queries": slots.length})
    model = prepare_model(config, torch.cat(list(grids.values())[:16]), None)
    table = model.embedding.weight.detach()
    scale = table[: model.base_rows].pow(2).mean()
    images = sorted(grids)
    targets = {name: table[slots.target_ids(present.get(name, set()))] for name in images}
    optimizer = torch.optim.AdamW(model.projector.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config.steps, config.warmup_ratio))
    say(f"pretrain (finding slots): {config.steps} steps of {config.batch_size} CTs ({len(images)} in all, "
        f"{slots.length} image queries)")
    rng, losses, started = random.Random(config.seed), [], time.perf_counter()
    model.projector.train()
    for step in range(1, config.steps + 1):
        batch = rng.sample(images, min(config.batch_size, len(images)))
        projected = model.projector(torch.cat([grids[name] for name in batch]))
        loss = (projected - torch.stack([targets[name] for name in batch])).pow(2).mean() / scale
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if step % config.log_every == 0 or step == config.steps:
            log_record(config.output_dir, {"stage": "pretrain", "objective": "finding_slots", "step": step,
                                           "loss": round(losses[-1], 6), "lr": scheduler.get_last_lr()[0],
                                           "seconds": round(time.perf_counter() - started, 1)}, True)
    exported = export_stage(model, config, config.output_dir)
    return StageResult(model, config.steps, time.perf_counter() - started, losses, exported)
