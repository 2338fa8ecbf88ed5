"""Exporting a trained stage in the files the runtime loads (`CTFoundationLib.models.ctchat.loading`).

- stage 1: `mm_projector.bin` (projector under `model.mm_projector.`, as the reference's pre-training saves it);
- stage 2: `lora/` = the peft adapter (adapter_config.json, adapter_model.safetensors) + `non_lora_trainables.bin`
  (projector under `base_model.model.model.mm_projector.`, the resized `embed_tokens` and `lm_head` tables), the
  layout of CT-CHAT's released folders.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from CTFoundationLib.models.ctchat.loading import NON_LORA_FILE

from .model import TrainableCTChat

PROJECTOR_FILE = "mm_projector.bin"
LORA_FOLDER = "lora"


def export_stage(model: TrainableCTChat, config, output: Path) -> Path:
    """Write the stage's files under `output`; returns the projector file (stage 1) or the LoRA folder (stage 2)."""
    output.mkdir(parents=True, exist_ok=True)
    if config.stage == "pretrain":
        path = output / PROJECTOR_FILE
        torch.save(model.projector_state(), path)
        return path
    return export_lora(model, output / LORA_FOLDER, str(config.llm), config.template)


def export_lora(model: TrainableCTChat, folder: Path, base_name: str, template: str) -> Path:
    """The peft adapter (embedding tables left to non_lora_trainables.bin) and non_lora_trainables.bin."""
    folder.mkdir(parents=True, exist_ok=True)
    model.llm.peft_config["default"].base_model_name_or_path = base_name
    model.llm.save_pretrained(folder, save_embedding_layers=False)
    torch.save(model.non_lora_state(), folder / NON_LORA_FILE)
    (folder / "ctchat_training.json").write_text(json.dumps({
        "template": template, "base_llm": base_name, "image_queries": model.projector.config.n_queries,
        "projector": {"token_dim": model.projector.config.token_dim, "n_heads": model.projector.config.n_heads,
                      "mlp_depth": model.projector.config.mlp_depth},
    }, indent=1))
    return folder
