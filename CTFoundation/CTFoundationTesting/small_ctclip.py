"""Small random CT-CLIP v2 checkpoints made on the fly: the real code path and input size, tiny widths.

For tests: pytest (Testing/small_models.py) and the Slicer module's self-test, which must run where no
real weights are installed. The checkpoint is in the official layout and takes the real (1, 240, 480, 480)
input; its probabilities mean nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from CTFoundationLib.models.ctclip import CTCLIP, CTCLIPConfig
from CTFoundationLib.vocab import CT_RATE_ABNORMALITIES

BERT_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


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
    """Write a random small checkpoint (+ its constructors JSON) into `folder`; returns both paths and the config."""
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


def write_prompt_vocab(path: Path) -> Path:
    """A WordPiece vocab.txt with BERT's special tokens and every word of the zero-shot prompts.

    For self-tests where no real vocabulary is at hand; token ids stay far below the model's vocab size.
    """
    words = {"is", "present", "not", "."}
    for name in CT_RATE_ABNORMALITIES:
        words.update(name.lower().split())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([*BERT_SPECIAL_TOKENS, *sorted(words)]) + "\n", encoding="utf-8")
    return path
