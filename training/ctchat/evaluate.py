"""Predictions for a question set and their scores, in the reference's file formats.

Predictions file: a JSON list aligned with the question file, each `{"id", "image", "conversations_out":
[{"question", "answer", "type"}, ...]}` (the reference's `conversations_out[k]["answer"]`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from CTFoundationLib.errors import TrainingError
from CTFoundationLib.inference.chat import ChatSession
from CTFoundationLib.models.ctchat.modeling import CTChatModel, GenerationSettings

from .metrics import scores_by_type
from .vqa import KINDS, plain_question, read_items


def predict(model: CTChatModel, items: list[dict], image_embeddings: Callable[[str], torch.Tensor],
            settings: GenerationSettings = GenerationSettings(max_new_tokens=128),
            progress: Callable[[], None] | None = None) -> list[dict]:
    """Answer every human turn of every item, in order, as one chat session per item (greedy by default)."""
    predictions = []
    for item in items:
        session = ChatSession(model, image_embeddings(item["image"]), settings=settings)
        out = []
        for turn in item["conversations"][::2]:
            kind = turn.get("type", "conversation")
            answer = session.ask(plain_question(turn["value"]), KINDS.get(kind, "free"))
            out.append({"question": turn["value"], "answer": answer.text, "type": kind})
        predictions.append({"id": item.get("id"), "image": item.get("image"), "conversations_out": out})
        if progress is not None:
            progress()
    return predictions


def scored_rows(items: list[dict], predictions: list[dict]) -> list[tuple[str, str, str]]:
    """(type, reference answer, predicted answer) of every question; the files must be aligned."""
    if len(items) != len(predictions):
        raise TrainingError(f"{len(predictions)} predictions for {len(items)} question items; give the files "
                            "that belong together")
    rows = []
    for item, predicted in zip(items, predictions):
        turns = item["conversations"]
        answers = predicted.get("conversations_out", [])
        if len(answers) != len(turns) // 2:
            raise TrainingError(f"item {item.get('id')}: {len(answers)} answers for {len(turns) // 2} questions")
        for k in range(0, len(turns), 2):
            rows.append((turns[k].get("type", "short_answer"), turns[k + 1]["value"], answers[k // 2]["answer"]))
    return rows


def score_files(questions: Path, predictions: Path, with_meteor: bool = True) -> dict[str, dict]:
    """Metrics per question type of a predictions file against its question file."""
    try:
        predicted = json.loads(Path(predictions).read_text())
    except (OSError, ValueError) as error:
        raise TrainingError(f"{predictions}: not a readable predictions JSON file ({error})") from None
    return scores_by_type(scored_rows(read_items(questions), predicted), with_meteor)
