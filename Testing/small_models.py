"""Small CT-CLIP v2 checkpoints made on the fly (the library's maker, shared with the Slicer self-test)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from conftest import data_root, fixtures_root
from CTFoundationTesting.small_ctclip import make_small_ctclip  # noqa: F401  (used by the tests)

from CTFoundationLib.models.fvlm import FVLM, FVLMConfig


def bert_vocab() -> Path:
    """A real WordPiece vocabulary (bert-base-uncased) standing in for CXR-BERT's, which has the same size."""
    return data_root() / "vocab" / "bert-base-uncased_vocab.txt"


def small_fvlm_constructors() -> dict:
    """Reference-style constructor arguments of an fVLM that takes the real windows (patch 16 x 16 x 32, 10 blocks
    for the pooling levels 3, 6, 9) with tiny widths and the full 30,522-token vocabulary."""
    return {
        "ViT": {"in_channels": 1, "img_size": [112, 256, 352], "patch_size": [16, 16, 32], "hidden_size": 16,
                "mlp_dim": 32, "num_layers": 10, "num_heads": 2, "qkv_bias": True},
        "BertConfig": {"vocab_size": 30522, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "intermediate_size": 64, "max_position_embeddings": 512},
        "BlipPretrain": {"embed_dim": 16, "max_txt_len": 384},
    }


def make_small_fvlm(folder: Path, seed: int = 0) -> tuple[Path, Path, FVLMConfig]:
    """Write a random small fVLM checkpoint as released ({'model', 'epoch'}) + its constructors JSON."""
    constructors = small_fvlm_constructors()
    config = FVLMConfig.from_reference_constructors(constructors)
    torch.manual_seed(seed)
    model = FVLM(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():  # init leaves these constant; make organs differ
            if name == "query_tokens" or parameter.dim() == 1:
                parameter.add_(torch.randn_like(parameter) * 0.1)
        model.temp.fill_(0.05)
    folder.mkdir(parents=True, exist_ok=True)
    checkpoint = folder / "checkpoint_small.pth"
    torch.save({"model": model.state_dict(), "epoch": 0}, checkpoint)
    config_path = folder / "fvlm_constructors.json"
    config_path.write_text(json.dumps(constructors))
    return checkpoint, config_path, config


def fullsize_layout(manifest: str, path: Path) -> Path:
    """The full-size released checkpoint's layout (every key, shape and dtype a `*_fullsize_keys.json` lists) in a
    file of a few hundred KB: each tensor is a broadcast zero, so only one value per tensor is stored.

    manifest: "ctclip_v2" (a plain state dict) or "fvlm" (`{"model": ...}` as fVLM saves, without type embeddings).
    """
    listing = json.loads((fixtures_root() / f"{manifest}_fullsize_keys.json").read_text())
    entries = listing["keys"] if manifest == "ctclip_v2" else (
        listing["variants"]["add_type_embeddings=False"]["keys_in_saved_checkpoint_model_entry"])
    state = {e["key"]: torch.zeros((), dtype=getattr(torch, e["dtype"])).expand(e["shape"]) for e in entries}
    torch.save(state if manifest == "ctclip_v2" else {"model": state}, path)
    return path
