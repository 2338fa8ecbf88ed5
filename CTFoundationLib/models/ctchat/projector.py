"""CT-CHAT vision projector, type 'attn_pool+mlp2x_gelu' (ibrahimethemhamamci/CT-CHAT).

CTViT token grid (B, t, h, w, 512) -> flattened (B, N, 512) -> CoCa attentional pooler with 256 learned
queries and 8 heads -> LayerNorm -> MLP (Linear, exact GELU, Linear) -> (B, 256, LLM width).
State-dict names are those of the reference module (`attn_pool.*`, `ln.*`, `proj.*`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from CTFoundationLib.errors import CheckpointError
from CTFoundationLib.models.checkpoint_io import (
    StateSource,
    apply_state_dict,
    as_state_dict,
    load_torch_file,
    source_name,
)

WHAT = "CT-CHAT projector checkpoint"

# Key prefixes of the projector in real files: stage-1 mm_projector.bin, LoRA-stage non_lora_trainables.bin.
PROJECTOR_PREFIXES = ("base_model.model.model.mm_projector.", "model.mm_projector.", "mm_projector.")
_PROJECTOR_ROOTS = ("attn_pool.", "ln.", "proj.")


@dataclass(frozen=True)
class ProjectorConfig:
    """Sizes of the projector. Defaults: CT-CHAT on Llama-3.1-8B (512-wide CTViT tokens -> 4096)."""

    token_dim: int = 512  # mm_hidden_size: query / pooled width
    context_dim: int = 512  # mm_context_size: width of the CTViT tokens
    llm_hidden_size: int = 4096
    mlp_depth: int = 2  # 'mlp{depth}x_gelu'
    n_queries: int = 256
    n_heads: int = 8

    @classmethod
    def from_llava_config(cls, cfg: Mapping[str, object]) -> ProjectorConfig:
        """From a LLaVA-style config.json: mm_projector_type, mm_hidden_size, mm_context_size, hidden_size."""
        kind = str(cfg.get("mm_projector_type", ""))
        match = re.fullmatch(r"attn_pool\+(?:mlp(\d+)x_gelu|linear)", kind)
        if not match:
            raise ValueError(f"unsupported mm_projector_type {kind!r}; expected 'attn_pool+mlpNx_gelu'")
        token_dim = int(cfg["mm_hidden_size"])
        return cls(
            token_dim=token_dim,
            context_dim=int(cfg.get("mm_context_size", token_dim)),
            llm_hidden_size=int(cfg["hidden_size"]),
            mlp_depth=int(match.group(1) or 1),
        )

    @classmethod
    def from_reference_constructors(cls, constructors: Mapping[str, Mapping]) -> ProjectorConfig:
        """From a fixture's `constructors` block (`config.<name>` arguments of build_vision_projector)."""
        args = constructors["build_vision_projector(config)"]
        llava = {key.removeprefix("config.").split(" ")[0]: value for key, value in args.items()}
        pooler = constructors.get("resulting AttentionalPoolProjector", {})
        base = cls.from_llava_config(llava)
        return replace(base, n_queries=int(pooler.get("n_queries", base.n_queries)),
                       n_heads=int(pooler.get("n_head", base.n_heads)))

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Tensor], n_heads: int = 8) -> ProjectorConfig:
        """Sizes read from the weight shapes (the head count is not visible in them)."""
        n_queries, token_dim = state["attn_pool.query"].shape
        depth = len([k for k in state if re.fullmatch(r"proj\.\d+\.weight", k)])
        return cls(token_dim=token_dim, context_dim=state["attn_pool.to_kv.weight"].shape[1],
                   llm_hidden_size=state["proj.0.weight"].shape[0], mlp_depth=depth,
                   n_queries=n_queries, n_heads=n_heads)


class AttentionalPooler(nn.Module):
    """Learned queries attend over the context tokens: (B, N, context_dim) -> (B, n_queries, token_dim)."""

    def __init__(self, cfg: ProjectorConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.query = nn.Parameter(torch.randn(cfg.n_queries, cfg.token_dim))
        self.ln_k = nn.LayerNorm(cfg.context_dim)
        self.ln_q = nn.LayerNorm(cfg.token_dim)
        self.to_q = nn.Linear(cfg.token_dim, cfg.token_dim, bias=False)
        self.to_kv = nn.Linear(cfg.context_dim, 2 * cfg.token_dim, bias=False)
        self.to_out = nn.Linear(cfg.token_dim, cfg.token_dim, bias=False)

    def forward(self, context: Tensor) -> Tensor:
        batch, n_tokens = context.shape[:2]
        q = self.to_q(self.ln_q(self.query))  # same queries for every CT: computed once
        k, v = self.to_kv(self.ln_k(context)).chunk(2, dim=-1)  # first half keys, second half values
        heads = (self.n_heads, q.shape[-1] // self.n_heads)
        q = q.view(1, -1, *heads).transpose(1, 2).expand(batch, -1, -1, -1)
        k = k.view(batch, n_tokens, *heads).transpose(1, 2)
        v = v.view(batch, n_tokens, *heads).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)  # softmax over the N tokens, scale dim_head**-0.5
        return self.to_out(out.transpose(1, 2).flatten(2))


class AttnPoolProjector(nn.Module):
    """CT-CHAT 'attn_pool+mlp2x_gelu' projector: CTViT tokens -> (B, n_queries, llm_hidden_size)."""

    def __init__(self, cfg: ProjectorConfig = ProjectorConfig()) -> None:
        super().__init__()
        self.config = cfg
        self.attn_pool = AttentionalPooler(cfg)
        self.ln = nn.LayerNorm(cfg.token_dim)
        layers: list[nn.Module] = [nn.Linear(cfg.token_dim, cfg.llm_hidden_size)]
        for _ in range(1, cfg.mlp_depth):
            layers += [nn.GELU(), nn.Linear(cfg.llm_hidden_size, cfg.llm_hidden_size)]
        self.proj = nn.Sequential(*layers)

    def forward(self, tokens: Tensor) -> Tensor:
        """tokens: grid (B, t, h, w, C) (flattened row-major, as CT-CHAT's encode_images) or (B, N, C)."""
        if tokens.dim() == 5:
            tokens = tokens.flatten(1, 3)
        if tokens.dim() != 3:
            raise ValueError(f"expected (B, t, h, w, C) or (B, N, C) tokens, got shape {tuple(tokens.shape)}")
        return self.proj(self.ln(self.attn_pool(tokens)))


def read_state_dict(source: StateSource) -> dict[str, Tensor]:
    """A CT-CHAT weights file (mm_projector.bin, non_lora_trainables.bin, ...) or an in-memory state dict."""
    obj = source if isinstance(source, Mapping) else load_torch_file(source, WHAT)
    return as_state_dict(obj, source_name(source), WHAT)


def split_projector_state(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(projector weights with their prefix removed, every other entry under its original name).

    Prefixed keys (PROJECTOR_PREFIXES) are the projector; a file with no prefixed key is taken as a bare
    projector state dict (its `attn_pool.` / `ln.` / `proj.` keys).
    """
    def strip(key: str) -> str | None:
        return next((key[len(p):] for p in PROJECTOR_PREFIXES if key.startswith(p)), None)

    prefixed = {k: strip(k) for k in state}
    bare = all(name is None for name in prefixed.values())
    projector, other = {}, {}
    for key, value in state.items():
        name = key if bare and key.startswith(_PROJECTOR_ROOTS) else prefixed[key]
        (projector if name is not None else other)[name if name is not None else key] = value
    return projector, other


def llm_embedding_weights(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The resized LLM tables stored beside the projector: {'embed_tokens': ..., 'lm_head': ...} (those present)."""
    found = {}
    for key, value in state.items():
        for name in ("embed_tokens", "lm_head"):
            if key.endswith(f"{name}.weight"):
                found[name] = value
    return found


def load_projector(source: StateSource, config: ProjectorConfig | None = None) -> AttnPoolProjector:
    """Build the projector and load its weights from a CT-CHAT file or state dict, whatever the key prefix.

    Non-projector entries are ignored (see `llm_embedding_weights`). Without `config` the sizes are read
    from the weight shapes (8 heads). Weights are cast to the model's float32; returns the model in eval mode.
    """
    name = source_name(source)
    projector_state, _ = split_projector_state(read_state_dict(source))
    if not projector_state:
        raise CheckpointError(
            f"{WHAT} {name} holds no projector weights "
            f"(keys starting with {' or '.join(PROJECTOR_PREFIXES)}). Use CT-CHAT's non_lora_trainables.bin "
            "or mm_projector.bin."
        )
    if config is None:
        try:
            config = ProjectorConfig.from_state_dict(projector_state)
        except KeyError as exc:
            raise CheckpointError(f"{WHAT} {name} lacks the projector weight {exc}; it is incomplete.") from None
    model = AttnPoolProjector(config)
    apply_state_dict(model, projector_state, source=name, what=WHAT, extra_is_error=True)
    return model.eval()
