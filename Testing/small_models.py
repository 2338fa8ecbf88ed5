"""Small CT-CLIP v2 checkpoints made on the fly: the real code path and input size, tiny widths."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from conftest import data_root
from CTFoundationLib.models.ctclip import CTCLIP, CTCLIPConfig


def small_constructors(dim: int = 16, latent: int = 32) -> dict:
    """Reference-style constructor arguments for a CT-CLIP v2 that takes the real (1, 240, 480, 480) input."""
    return {
        "CTViT": {
            "dim": dim,
            "codebook_size": 32,
            "image_size": 480,
            "patch_size": 20,
            "temporal_patch_size": 10,
            "spatial_depth": 1,
            "temporal_depth": 1,
            "dim_head": 8,
            "heads": 2,
        },
        "BertConfig": {
            "vocab_size": 30522,
            "hidden_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            "max_position_embeddings": 512,
        },
        "CTCLIP": {"dim_image": 24 * 24 * dim, "dim_text": 32, "dim_latent": latent},
    }


def make_small_ctclip(folder: Path, lipro: bool = False, seed: int = 0) -> tuple[Path, Path, CTCLIPConfig]:
    """Write a random small checkpoint in the official layout (+ its constructors JSON); returns paths + config."""
    constructors = small_constructors()
    config = CTCLIPConfig.from_reference_constructors(constructors)
    torch.manual_seed(seed)
    model = CTCLIP(config)
    with torch.no_grad():
        model.temperature.fill_(4.6)  # exp(4.6) = 100, as trained CLIP models reach
    state = {key: value.clone() for key, value in model.state_dict().items()}
    state["text_transformer.embeddings.position_ids"] = torch.arange(512)[None]
    if lipro:
        state = {f"trained_model.{key}": value for key, value in state.items()}
        state["classifier.weight"] = torch.randn(18, config.dim_latent) * 0.5
        state["classifier.bias"] = torch.randn(18) * 0.1
    folder.mkdir(parents=True, exist_ok=True)
    checkpoint = folder / ("small_lipro.pt" if lipro else "small_ctclip.pt")
    torch.save(state, checkpoint)
    config_path = folder / "constructors.json"
    config_path.write_text(json.dumps(constructors))
    return checkpoint, config_path, config


def bert_vocab() -> Path:
    """A real WordPiece vocabulary (bert-base-uncased) standing in for CXR-BERT's, which has the same size."""
    return data_root() / "vocab" / "bert-base-uncased_vocab.txt"
