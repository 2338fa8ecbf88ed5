"""The trainable CT-CHAT: base LLM (+ peft LoRA in stage 2), the runtime's projector, CT-CHAT's added tokens.

Stage 1 ("pretrain", the reference's `--tune_mm_mlp_adapter`): the LLM frozen, only the projector learns.
Stage 2 ("lora"): LoRA on every Linear of the LLM (the reference's `find_all_linear_names`: lm_head excluded), the
projector, the added tokens' rows of `embed_tokens` and `lm_head` trainable; saved as the reference saves them
(a peft folder + `non_lora_trainables.bin` with the projector under `base_model.model.model.mm_projector.` and
the whole resized tables), which is what `CTFoundationLib.models.ctchat.loading` reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from CTFoundationLib.models.ctchat.loading import (
    load_llm,
    load_llm_tokenizer,
    quiet_peft_probe,
    untie_output_embeddings,
)
from CTFoundationLib.models.ctchat.projector import AttnPoolProjector, ProjectorConfig, load_projector
from CTFoundationLib.models.ctchat.templates import IMAGE_TOKEN_INDEX, add_ctchat_tokens
from training.modeling import checkpoint_transformers_model

IGNORE_INDEX = -100
PROJECTOR_KEY_PREFIX = "base_model.model.model.mm_projector."
NON_LORA_TABLE_KEYS = {"embed_tokens": "base_model.model.model.embed_tokens.weight",
                       "lm_head": "base_model.model.lm_head.weight"}


@dataclass(frozen=True)
class LoraSettings:
    """The reference's LoRA (LLaMA3.1-V_finetune_lora_ctchat.sh): r 128, alpha 256, dropout 0.05, no bias."""

    r: int = 128
    alpha: int = 256
    dropout: float = 0.05
    targets: tuple[str, ...] | None = None  # None: every Linear of the LLM but lm_head (the reference's choice)


class TrainableCTChat(nn.Module):
    """LLM + projector; `forward(batch)` returns the mean cross-entropy over the answer tokens."""

    def __init__(self, llm: nn.Module, tokenizer, projector: AttnPoolProjector, base_rows: int) -> None:
        super().__init__()
        self.llm, self.projector = llm, projector
        self.tokenizer, self.base_rows = tokenizer, base_rows

    @property
    def embedding(self) -> nn.Module:
        return self.llm.get_input_embeddings()

    def input_embeddings(self, input_ids: Tensor, grids: Tensor | None) -> Tensor:
        """(B, L, H): token embeddings with each sample's projected image at its IMAGE_TOKEN_INDEX position.

        The collate step has already expanded every marker to n_queries positions (all holding the marker id).
        """
        embeds = self.embedding(input_ids.clamp(min=0))
        if grids is None:
            return embeds
        image = self.projector(grids.to(next(self.projector.parameters()).dtype)).to(embeds.dtype)
        is_image = (input_ids == IMAGE_TOKEN_INDEX).unsqueeze(-1)
        rows = is_image.squeeze(-1).sum(1)
        if bool((rows != image.shape[1]).any()):
            raise ValueError(f"each sample needs {image.shape[1]} image positions, got {rows.tolist()}")
        placed = torch.zeros_like(embeds).masked_scatter(is_image, image.flatten(0, 1))
        return torch.where(is_image, placed, embeds)

    def forward(self, input_ids: Tensor, labels: Tensor, attention_mask: Tensor, grids: Tensor | None) -> Tensor:
        """Mean token cross-entropy of the labelled positions; lm_head runs only where a label follows."""
        embeds = self.input_embeddings(input_ids, grids)
        backbone = self.llm.get_base_model() if hasattr(self.llm, "get_base_model") else self.llm
        hidden = backbone.model(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        logits = self.llm.get_output_embeddings()(hidden[:, :-1][keep])
        return nn.functional.cross_entropy(logits.float(), targets[keep])

    def logits(self, input_ids: Tensor, grids: Tensor | None) -> Tensor:
        """Full logits (B, L, V) of a batch without padding (the export round trip compares these)."""
        return self.llm(inputs_embeds=self.input_embeddings(input_ids, grids)).logits

    @torch.no_grad()
    def standardize_projector_input(self, grids: Tensor) -> None:
        """Set a fresh projector's ln_k affine so that each channel of the normalised tokens has mean 0 and std 1
        over `grids` (the per-token LayerNorm then affine is exactly that per-channel standardisation).

        What tells the demo's findings apart lies in channels that vary little across CTs: a linear probe on
        the pooled tokens reaches ~0.94 held-out accuracy only on standardised features, and the projector alone
        learns presence markedly faster from this start. State-dict compatible: only the init changes."""
        ln = self.projector.attn_pool.ln_k
        tokens = grids.flatten(1, -2) if grids.dim() == 5 else grids
        normed = nn.functional.layer_norm(tokens.to(ln.weight.dtype), ln.normalized_shape, eps=ln.eps)
        mean, std = normed.mean((0, 1)), normed.std((0, 1)).clamp(min=1e-6)
        ln.weight.copy_(1 / std)
        ln.bias.copy_(-mean / std)

    @torch.no_grad()
    def match_projector_scale(self, grids: Tensor) -> None:
        """Scale a fresh projector's last Linear so its outputs have the RMS of the LLM's token embeddings.

        At default init the outputs are ~13x the embeddings' size and nearly the same for every CT (the pooled
        tokens differ little before training): the LLM then sees a loud constant and learns to ignore it."""
        target = self.embedding.weight[: self.base_rows].pow(2).mean().sqrt()
        out = self.projector(grids.to(next(self.projector.parameters()).dtype))
        last = self.projector.proj[-1]
        factor = target / out.pow(2).mean().sqrt()
        last.weight.mul_(factor)
        last.bias.mul_(factor)

    # --- stages -----------------------------------------------------------------------------------------------

    def freeze_for_pretraining(self) -> None:
        """Stage 1: only the projector learns."""
        self.llm.requires_grad_(False)
        self.projector.requires_grad_(True)

    def add_lora(self, settings: LoraSettings, gradient_checkpointing: bool = False) -> None:
        """Stage 2: peft LoRA on every Linear of the LLM but lm_head; projector and added-token rows trainable."""
        from peft import LoraConfig, get_peft_model

        targets = list(settings.targets or sorted({name.split(".")[-1] for name, module in self.llm.named_modules()
                                                   if isinstance(module, nn.Linear) and "lm_head" not in name}))
        config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout, bias="none",
                            target_modules=targets, task_type="CAUSAL_LM")
        if gradient_checkpointing:
            checkpoint_transformers_model(self.llm)
            self.llm.enable_input_require_grads()
        with quiet_peft_probe():
            self.llm = get_peft_model(self.llm, config)
        self.projector.requires_grad_(True)
        self.train_added_rows()

    def train_added_rows(self) -> None:
        """embed_tokens and lm_head learn, but a gradient hook keeps the base vocabulary's rows fixed."""
        for weight in (self.embedding.weight, self.llm.get_output_embeddings().weight):
            weight.requires_grad_(True)
            weight.register_hook(self._mask_base_rows)

    def _mask_base_rows(self, grad: Tensor) -> Tensor:
        grad = grad.clone()
        grad[: self.base_rows] = 0
        return grad

    # --- saving -----------------------------------------------------------------------------------------------

    def non_lora_state(self) -> dict[str, Tensor]:
        """What the reference writes to non_lora_trainables.bin: projector + the resized tables (all rows)."""
        state = {PROJECTOR_KEY_PREFIX + k: v.detach().cpu().clone() for k, v in self.projector.state_dict().items()}
        state[NON_LORA_TABLE_KEYS["embed_tokens"]] = self.embedding.weight.detach().cpu().clone()
        state[NON_LORA_TABLE_KEYS["lm_head"]] = self.llm.get_output_embeddings().weight.detach().cpu().clone()
        return state

    def projector_state(self) -> dict[str, Tensor]:
        """Stage 1's mm_projector.bin (the reference's key names)."""
        return {"model.mm_projector." + k: v.detach().cpu().clone() for k, v in self.projector.state_dict().items()}


def build_trainable(llm_path: Path, projector_fields: dict | None = None, projector_file: Path | None = None,
                    dtype: torch.dtype = torch.float32, seed: int = 0) -> TrainableCTChat:
    """The base LLM with CT-CHAT's tokens added (new rows: the mean of the old), lm_head untied, and a fresh
    projector (ProjectorConfig fields `projector_fields`, output width the LLM's) or stage 1's from `projector_file`."""
    tokenizer = load_llm_tokenizer(llm_path)
    llm = load_llm(llm_path, torch.device("cpu"), dtype, None)
    base_rows = len(tokenizer)
    add_ctchat_tokens(tokenizer)
    llm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    untie_output_embeddings(llm)
    with torch.no_grad():
        for weight in (llm.get_input_embeddings().weight, llm.get_output_embeddings().weight):
            weight[base_rows:] = weight[:base_rows].mean(0)
    llm.config.use_cache = False
    width = llm.get_input_embeddings().weight.shape[1]
    if projector_file is not None:
        projector = load_projector(projector_file).train()
    else:
        torch.manual_seed(seed)
        projector = AttnPoolProjector(ProjectorConfig(**{**(projector_fields or {}), "llm_hidden_size": width}))
    return TrainableCTChat(llm, tokenizer, projector.to(dtype), base_rows)
