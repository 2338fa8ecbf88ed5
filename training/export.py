"""Write trained models in exactly the official CT-CLIP v2 checkpoint layout, plus thresholds and prompt latents.

The official files are `torch.save` of the reference `CTCLIP.state_dict()`: besides what inference uses they
hold modules the reference builds but never runs (the CLOOB `_extra` projections, CTViT's decoder heads and
first-frame embedding, empty `null_kv`, the cross-attention norms, BERT's pooler, `position_ids`, the
codebook's `initted` / `cluster_size`). We write all of them, so the reference's strict `CTCLIP.load` and our
`load_ctclip` both take the file. Unused weights get neutral values (zeros; ones for norm gains; the
`_extra` projections copy the trained ones). LiPro files nest the model under `trained_model.` and add
`classifier.weight` / `classifier.bias`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from CTFoundationLib.errors import TrainingError
from CTFoundationLib.io.files import atomic_path, write_json_atomic
from CTFoundationLib.models.ctclip import CTCLIP, LIPRO_PREFIX, CTCLIPConfig
from CTFoundationLib.vocab import CT_RATE_ABNORMALITIES
from training.modeling import CLUSTER_SIZE_KEY


def unused_reference_tensors(config: CTCLIPConfig, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The reference keys that inference never reads, with shapes derived from `config`."""
    vision, bert = config.vision, config.bert_config()
    frame = vision.channels * vision.patch_size[0] * vision.patch_size[1]
    dim, hidden = vision.dim, bert.hidden_size
    extra: dict[str, Tensor] = {
        "text_transformer.embeddings.position_ids": torch.arange(bert.max_position_embeddings)[None],
        "text_transformer.pooler.dense.weight": torch.zeros(hidden, hidden),
        "text_transformer.pooler.dense.bias": torch.zeros(hidden),
        "to_text_latent_extra.weight": state["to_text_latent.weight"].clone(),
        "to_visual_latent_extra.weight": state["to_visual_latent.weight"].clone(),
        "visual_transformer.to_patch_emb_first_frame.1.weight": torch.ones(frame),
        "visual_transformer.to_patch_emb_first_frame.1.bias": torch.zeros(frame),
        "visual_transformer.to_patch_emb_first_frame.2.weight": torch.zeros(dim, frame),
        "visual_transformer.to_patch_emb_first_frame.2.bias": torch.zeros(dim),
        "visual_transformer.to_patch_emb_first_frame.3.weight": torch.ones(dim),
        "visual_transformer.to_patch_emb_first_frame.3.bias": torch.zeros(dim),
        "visual_transformer.to_pixels_first_frame.0.weight": torch.zeros(frame, dim),
        "visual_transformer.to_pixels_first_frame.0.bias": torch.zeros(frame),
        "visual_transformer.to_pixels.0.weight": torch.zeros(vision.patch_dim, dim),
        "visual_transformer.to_pixels.0.bias": torch.zeros(vision.patch_dim),
        "visual_transformer.vq._codebook.initted": torch.ones(1),
        CLUSTER_SIZE_KEY: torch.zeros(1, vision.codebook_size),
    }
    for stage, depth in (("spatial", vision.spatial_depth), ("temporal", vision.temporal_depth)):
        for index in range(depth):
            prefix = f"visual_transformer.enc_{stage}_transformer.layers.{index}.1."
            extra[prefix + "null_kv"] = torch.zeros(vision.heads, 0, vision.dim_head)
            extra[prefix + "context_norm.gamma"] = torch.ones(dim)
            extra[prefix + "context_norm.beta"] = torch.zeros(dim)
    return extra


def official_state_dict(clip: CTCLIP, cluster_size: Tensor | None = None) -> dict[str, Tensor]:
    """The complete reference state dict of `clip` (CPU, float32; without a LiPro classifier)."""
    state = {k: v.detach().float().cpu().clone() for k, v in clip.state_dict().items()
             if not k.startswith("classifier.")}
    state.update(unused_reference_tensors(clip.config, state))
    if cluster_size is not None:
        state[CLUSTER_SIZE_KEY] = cluster_size.detach().float().cpu().reshape(1, -1).clone()
    return state


def save_checkpoint(clip: CTCLIP, path: Path, cluster_size: Tensor | None = None) -> Path:
    """Write `clip` as CT-CLIP_v2.pt / CT_VocabFine_v2.pt do, or as CT_LiPro_v2.pt when it has a classifier."""
    state = official_state_dict(clip, cluster_size)
    if clip.classifier is not None:
        state = {LIPRO_PREFIX + key: value for key, value in state.items()}
        state["classifier.weight"] = clip.classifier.weight.detach().float().cpu().clone()
        state["classifier.bias"] = clip.classifier.bias.detach().float().cpu().clone()
    path = Path(path)
    with atomic_path(path) as temporary:
        torch.save(state, temporary)
    return path


def write_thresholds(path: Path, thresholds: Mapping[str, float], validation: str, cases: int) -> None:
    """A thresholds JSON that `CTFoundationLib.inference.ctclip.load_thresholds` reads, with how it was made."""
    if not all(math.isfinite(v) for v in thresholds.values()):
        raise TrainingError(f"{path}: thresholds must be finite numbers")
    write_json_atomic(
        Path(path),
        {
            "thresholds": dict(thresholds),
            "protocol": "CT-CLIP: thresholds 0..1 in 100 steps, positive = p > t, closest to the ROC corner (0, 1)",
            "validation": {"split": validation, "cases": cases},
        },
    )


def write_prompt_latents(path: Path, prompt_latents: Tensor, names: Sequence[str] = CT_RATE_ABNORMALITIES) -> None:
    """(18, 2, L) [present, not present] prompt latents as safetensors, with the finding names."""
    save_file({"prompt_latents": prompt_latents.contiguous()}, str(path), metadata={"names": json.dumps(list(names))})
