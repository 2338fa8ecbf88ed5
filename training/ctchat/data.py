"""Conversation items -> token ids and labels through the runtime's templates; CT-CLIP token grids, computed once
per volume by the runtime's encoder and kept in its cache (`inference.chat.cached_token_grid`).

Formats:
- "plain" (stage 1, the reference's `--version plain`): `<image>` + first answer + "\\n", loss on the answer;
- a template name (stage 2): the whole conversation rendered by `templates.get_template(name)`, loss on every
  answer and the separator that ends it (the reference masks the user turns the same way).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from CTFoundationLib.errors import TrainingError
from CTFoundationLib.models.ctchat.templates import IMAGE_PLACEHOLDER, IMAGE_TOKEN_INDEX, get_template, tokenize_prompt

from .model import IGNORE_INDEX

PLAIN = "plain"


@dataclass
class Example:
    """Token ids (IMAGE_TOKEN_INDEX once where the image goes), labels (IGNORE_INDEX where no loss) and image."""

    input_ids: list[int]
    labels: list[int]
    image: str | None


def conversation_turns(item: dict) -> list[tuple[str, str]]:
    turns = item["conversations"]
    return [(turns[i]["value"], turns[i + 1]["value"]) for i in range(0, len(turns), 2)]


def segments(item: dict, template_name: str) -> list[tuple[str, bool]]:
    """The rendered conversation cut into (text, is_answer) pieces; their concatenation is the full prompt."""
    turns = conversation_turns(item)
    if template_name == PLAIN:
        return [(IMAGE_PLACEHOLDER, False), (turns[0][1] + "\n", True)]
    template = get_template(template_name)
    pieces, done = [], ""
    for index, (question, answer) in enumerate(turns):
        asked = template.render([*turns[:index], (question, None)])
        answered = template.render(turns[: index + 1])
        if not asked.startswith(done) or not answered.startswith(asked):
            raise TrainingError(f"template {template_name} does not render turn by turn; cannot mask its answers")
        pieces += [(asked[len(done):], False), (answered[len(asked):], True)]
        done = answered
    return pieces


def tokenize_item(item: dict, tokenizer, template_name: str, max_length: int | None = None) -> Example:
    """Ids and labels of a conversation; the first piece is tokenised as the runtime tokenises a prompt
    (BOS and `<image>` handled by `tokenize_prompt`), later pieces without special tokens."""
    ids: list[int] = []
    labels: list[int] = []
    for index, (text, is_answer) in enumerate(segments(item, template_name)):
        piece = tokenize_prompt(tokenizer, text) if index == 0 else tokenizer(text, add_special_tokens=False).input_ids
        ids += piece
        labels += piece if is_answer else [IGNORE_INDEX] * len(piece)
    if max_length is not None:
        ids, labels = ids[:max_length], labels[:max_length]
    labels = [IGNORE_INDEX if token == IMAGE_TOKEN_INDEX else label for token, label in zip(ids, labels)]
    return Example(ids, labels, item.get("image"))


def collate(examples: Sequence[Example], grids: dict[str, Tensor], n_queries: int, pad_id: int) -> dict[str, Tensor]:
    """A right-padded batch; each image marker expanded to n_queries positions. Every example needs an image."""
    rows = []
    for example in examples:
        ids, labels = [], []
        for token, label in zip(example.input_ids, example.labels):
            count = n_queries if token == IMAGE_TOKEN_INDEX else 1
            ids += [token] * count
            labels += [label] * count
        rows.append((ids, labels))
    length = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for row, (ids, target) in enumerate(rows):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(ids)] = torch.tensor(target)
        mask[row, : len(ids)] = 1
    missing = [e.image for e in examples if e.image not in grids]
    if missing:
        raise TrainingError(f"no token grid for {missing[0]}; encode the volumes first (token_grids)")
    image = torch.cat([grids[e.image] for e in examples])
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask, "grids": image}


def token_grids(names: Sequence[str], volume_path: Callable[[str], Path], encoder, cache_dir: Path,
                progress: Callable[[], None] | None = None) -> dict[str, Tensor]:
    """name -> CT-CLIP token grid (1, t, h, w, C) for each distinct image, encoded once by the runtime's encoder
    (a CTCLIPRuntime) and cached in the runtime's cache folder (a second run only reads the files)."""
    from CTFoundationLib.inference.chat import cached_token_grid
    from CTFoundationLib.io.reading import read_ct

    grids = {}
    for name in dict.fromkeys(names):
        grids[name] = cached_token_grid(encoder, read_ct(volume_path(name)), cache_dir).float()
        if progress is not None:
            progress()
    return grids
