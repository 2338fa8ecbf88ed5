"""fVLM (alibaba-damo-academy/fvlm): organ-wise CT vision-language model, inference only.

Image: (B, 1, Z, Y, X) in [0, 1] (HU window -1150..350) -> 3D ViT-B with patches (16, 16, 32) -> tokens
flattened z-major, x fastest (index = (z * ny + y) * nx + x). Organ pooling: one learned query per organ
attends over that organ's tokens from blocks 3, 6, 9 (not normed) and the final normed output, then a
per-organ Linear and L2 norm. Text: BLIP 'med' BERT without token-type embedding; [CLS] -> Linear -> L2.
Zero-shot: softmax over [negative, positive] of organ_feat . prompt_feat / temp.
State-dict names are those of the reference BlipPretrain; dropout layers are omitted (eval only).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from CTFoundationLib.errors import CTFoundationError
from CTFoundationLib.models.checkpoint_io import (
    StateSource,
    apply_state_dict,
    as_state_dict,
    check_state_dict,
    load_torch_file,
    source_name,
)
from CTFoundationLib.vocab import FVLM_ORGANS

WHAT = "fVLM checkpoint"
OTHER_SIZES_ADVICE = ("pass its constructor JSON with --fvlm-config FILE "
                      "(in Python: config= of FVLMRuntime.from_registry)")


@dataclass(frozen=True)
class ZeroShotItem:
    """One CT-RATE finding scored on one organ with a [negative, positive] prompt pair."""

    organ: str
    finding: str
    negative: str
    positive: str


# fVLM's evaluation list (eval.py): 16 CT-RATE findings and their prompts.
ZERO_SHOT_ITEMS = tuple(ZeroShotItem(*row) for row in (
    ("lung", "Emphysema", "Not Emphysema.", "Emphysema."),
    ("lung", "Atelectasis", "Not Atelectatic.", "Atelectatic."),
    ("lung", "Lung nodule", "Not Nodule.", "Nodule."),
    ("lung", "Lung opacity", "Not Opacity.", "Opacity."),
    ("lung", "Pulmonary fibrotic sequela", "Not Pulmonary fibrotic.", "Pulmonary fibrotic."),
    ("lung", "Pleural effusion", "Not Pleural effusion.", "Pleural effusion."),
    ("lung", "Mosaic attenuation pattern", "Not Mosaic attenuation pattern.", "Mosaic attenuation pattern."),
    ("lung", "Peribronchial thickening", "Not Peribronchial thickening.", "Peribronchial thickening."),
    ("lung", "Consolidation", "Not Consolidation.", "Consolidation."),
    ("lung", "Bronchiectasis", "Not Bronchiectasis.", "Bronchiectasis."),
    ("lung", "Interlobular septal thickening", "Not Interlobular septal thickening.",
     "Interlobular septal thickening."),
    ("heart", "Cardiomegaly", "Not Cardiomegaly.", "Cardiomegaly."),
    ("heart", "Pericardial effusion", "Not Pericardial effusion.", "Pericardial effusion."),
    ("heart", "Coronary artery wall calcification", "Not Coronary artery wall calcification.",
     "Coronary artery wall calcification."),
    ("esophagus", "Hiatal hernia", "Not Hiatal hernia.", "Hiatal hernia."),
    ("aorta", "Arterial wall calcification", "Not Arterial wall calcification.", "Arterial wall calcification."),
))

# Checkpoint entries the model does not use: BERT MLM head, position-id buffer, unused token-type table.
_UNUSED_PREFIXES = ("text_encoder.cls.",)
_UNUSED_KEYS = ("text_encoder.embeddings.position_ids", "text_encoder.embeddings.token_type_embeddings.weight")


def is_unused_checkpoint_key(key: str) -> bool:
    """True for checkpoint entries that fVLM inference does not read."""
    return key.startswith(_UNUSED_PREFIXES) or key in _UNUSED_KEYS


@dataclass(frozen=True)
class FVLMConfig:
    """Sizes of fVLM. Defaults: the released model (ViT-B, CXR-BERT-sized text tower, 256-d embeddings)."""

    in_channels: int = 1
    img_size: tuple[int, int, int] = (112, 256, 352)  # (Z, Y, X); position-embedding grid = img_size // patch
    patch_size: tuple[int, int, int] = (16, 16, 32)
    vit_hidden: int = 768  # also the pooling width (the reference hard-codes 768 there)
    vit_mlp: int = 3072
    vit_layers: int = 12
    vit_heads: int = 12
    vit_qkv_bias: bool = True
    pool_levels: tuple[int, ...] = (3, 6, 9)  # blocks whose (un-normed) outputs join the final normed output
    pool_heads: int = 4
    organs: tuple[str, ...] = FVLM_ORGANS
    embed_dim: int = 256
    vocab_size: int = 30522
    text_hidden: int = 768
    text_layers: int = 12
    text_heads: int = 12
    text_intermediate: int = 3072
    max_position_embeddings: int = 512
    text_layer_norm_eps: float = 1e-12
    max_txt_len: int = 384  # prompts are padded to this length

    @property
    def pos_grid(self) -> tuple[int, int, int]:
        return tuple(s // p for s, p in zip(self.img_size, self.patch_size))

    @classmethod
    def from_reference_constructors(cls, constructors: Mapping[str, Mapping]) -> FVLMConfig:
        """From a fixture's `constructors` block: ViT(...), the med BertConfig and BlipPretrain(...) arguments.

        The pooling width follows the ViT width (the fixture's documented deviation; both are 768 for real).
        An optional "organ_pooling" section (ours; the reference hard-codes it) gives "organs", "levels"
        and "heads" of a model trained with another organ list or depth.
        """
        vit = constructors["ViT"]
        bert = next(v for k, v in constructors.items() if k.startswith("BertConfig"))
        blip = constructors["BlipPretrain"]
        pooling = constructors.get("organ_pooling", {})
        unknown = sorted(set(pooling.get("organs", ())) - set(FVLM_ORGANS))
        if unknown:
            raise ValueError(f"organ_pooling.organs {unknown} are not fVLM organs {list(FVLM_ORGANS)}")
        if bert.get("hidden_act", "gelu") != "gelu" or bert.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError("only hidden_act 'gelu' with absolute position embeddings is implemented")
        if bert.get("add_cross_attention", False):
            raise ValueError("the text tower with cross-attention layers is not implemented")
        return cls(
            in_channels=vit["in_channels"], img_size=tuple(vit["img_size"]), patch_size=tuple(vit["patch_size"]),
            vit_hidden=vit["hidden_size"], vit_mlp=vit["mlp_dim"], vit_layers=vit["num_layers"],
            vit_heads=vit["num_heads"], vit_qkv_bias=vit.get("qkv_bias", False), embed_dim=blip["embed_dim"],
            vocab_size=bert["vocab_size"], text_hidden=bert["hidden_size"], text_layers=bert["num_hidden_layers"],
            text_heads=bert["num_attention_heads"], text_intermediate=bert["intermediate_size"],
            max_position_embeddings=bert["max_position_embeddings"],
            text_layer_norm_eps=bert.get("layer_norm_eps", 1e-12), max_txt_len=blip["max_txt_len"],
            organs=tuple(pooling.get("organs", FVLM_ORGANS)), pool_levels=tuple(pooling.get("levels", (3, 6, 9))),
            pool_heads=pooling.get("heads", 4),
        )

    def to_reference_constructors(self) -> dict:
        """The constructor JSON `from_reference_constructors` reads back into this config."""
        return {
            "ViT": {"in_channels": self.in_channels, "img_size": list(self.img_size),
                    "patch_size": list(self.patch_size), "hidden_size": self.vit_hidden, "mlp_dim": self.vit_mlp,
                    "num_layers": self.vit_layers, "num_heads": self.vit_heads, "qkv_bias": self.vit_qkv_bias},
            "BertConfig": {"vocab_size": self.vocab_size, "hidden_size": self.text_hidden,
                           "num_hidden_layers": self.text_layers, "num_attention_heads": self.text_heads,
                           "intermediate_size": self.text_intermediate,
                           "max_position_embeddings": self.max_position_embeddings,
                           "layer_norm_eps": self.text_layer_norm_eps},
            "BlipPretrain": {"embed_dim": self.embed_dim, "max_txt_len": self.max_txt_len},
            "organ_pooling": {"organs": list(self.organs), "levels": list(self.pool_levels), "heads": self.pool_heads},
        }


def read_fvlm_config(path: Path) -> FVLMConfig:
    """An fVLM constructor JSON (the reference's "ViT", "BertConfig", "BlipPretrain" sections) as a config."""
    try:
        constructors = json.loads(path.read_text())
        return FVLMConfig.from_reference_constructors(constructors.get("constructors", constructors))
    except (OSError, ValueError, TypeError, KeyError, StopIteration, AttributeError) as error:
        raise CTFoundationError(
            f"fVLM config {path}: not a usable fVLM constructor JSON ({error}); it needs the sections "
            '"ViT", "BertConfig" and "BlipPretrain" as in a fixture config.json'
        ) from error


# ---------------------------------------------------------------- image tower


class PatchEmbedding(nn.Module):
    """Conv patch embedding + learned position embedding, resized trilinearly to other token grids."""

    def __init__(self, cfg: FVLMConfig) -> None:
        super().__init__()
        self.grid = cfg.pos_grid
        self.patch_embeddings = nn.Conv3d(cfg.in_channels, cfg.vit_hidden, cfg.patch_size, stride=cfg.patch_size)
        self.position_embeddings = nn.Parameter(torch.zeros(1, math.prod(self.grid), cfg.vit_hidden))

    def position_embedding(self, grid: tuple[int, ...]) -> Tensor:
        """(1, nz * ny * nx, C) for token grid (nz, ny, nx); align_corners=False when resized."""
        if grid == self.grid:
            return self.position_embeddings
        table = self.position_embeddings.transpose(1, 2).reshape(1, -1, *self.grid)
        return F.interpolate(table, size=grid, mode="trilinear", align_corners=False).flatten(2).transpose(1, 2)

    def forward(self, image: Tensor) -> Tensor:
        """(B, 1, Z, Y, X) -> (B, L, C); trailing voxels that do not fill a patch are dropped."""
        x = self.patch_embeddings(image)
        return x.flatten(2).transpose(1, 2) + self.position_embedding(tuple(x.shape[2:]))


class SelfAttention(nn.Module):
    """MONAI-style SABlock: packed qkv split as (qkv, heads, dim_head), scale dim_head**-0.5."""

    def __init__(self, width: int, heads: int, qkv_bias: bool) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, bias=qkv_bias)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, width))


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(width, hidden)
        self.linear2 = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear2(F.gelu(self.linear1(x)))


class TransformerBlock(nn.Module):
    """Pre-norm block: x + SA(LN1(x)), then x + MLP(LN2(x))."""

    def __init__(self, cfg: FVLMConfig) -> None:
        super().__init__()
        self.mlp = MLP(cfg.vit_hidden, cfg.vit_mlp)
        self.norm1 = nn.LayerNorm(cfg.vit_hidden)
        self.attn = SelfAttention(cfg.vit_hidden, cfg.vit_heads, cfg.vit_qkv_bias)
        self.norm2 = nn.LayerNorm(cfg.vit_hidden)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ImageEncoder(nn.Module):
    """3D ViT returning the pooling levels: outputs of `pool_levels` blocks and the final normed output."""

    def __init__(self, cfg: FVLMConfig) -> None:
        super().__init__()
        if max(cfg.pool_levels) >= cfg.vit_layers:
            raise ValueError(f"pool levels {cfg.pool_levels} need more than {cfg.vit_layers} ViT blocks")
        self.pool_levels = cfg.pool_levels
        self.patch_embedding = PatchEmbedding(cfg)
        self.blocks = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.vit_layers))
        self.norm = nn.LayerNorm(cfg.vit_hidden)

    def forward(self, image: Tensor) -> Tensor:
        """(B, 1, Z, Y, X) -> (len(pool_levels) + 1, B, L, C)."""
        x = self.patch_embedding(image)
        levels = []
        for index, block in enumerate(self.blocks):
            x = block(x)
            if index in self.pool_levels:
                levels.append(x)
        return torch.stack([*levels, self.norm(x)])


def organ_token_flags(organ_mask: Tensor, patch_size: Sequence[int], n_organs: int) -> Tensor:
    """(B, [1,] Z, Y, X) organ ids (1..n_organs) -> (B, n_organs, L) bool: the token's patch holds the organ.

    Equals max_pool3d((mask == id), kernel = stride = patch) > 0, including dropping partial patches.
    """
    mask = organ_mask[:, 0] if organ_mask.dim() == 5 else organ_mask
    (pz, py, px), batch = patch_size, mask.shape[0]
    nz, ny, nx = (size // p for size, p in zip(mask.shape[1:], patch_size))
    patches = mask[:, : nz * pz, : ny * py, : nx * px].reshape(batch, nz, pz, ny, py, nx, px)
    flags = [(patches == organ_id).any(dim=6).any(dim=4).any(dim=2) for organ_id in range(1, n_organs + 1)]
    return torch.stack(flags, dim=1).flatten(2)


# ---------------------------------------------------------------- text tower (BLIP 'med' BERT, text mode)


class BertEmbeddings(nn.Module):
    """Word + absolute position embeddings -> LayerNorm (no token-type embedding is added)."""

    def __init__(self, cfg: FVLMConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.text_hidden)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.text_hidden)
        self.LayerNorm = nn.LayerNorm(cfg.text_hidden, eps=cfg.text_layer_norm_eps)

    def forward(self, input_ids: Tensor) -> Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.LayerNorm(self.word_embeddings(input_ids) + self.position_embeddings(positions))


class BertSelfAttention(nn.Module):
    def __init__(self, cfg: FVLMConfig) -> None:
        super().__init__()
        self.heads = cfg.text_heads
        self.query = nn.Linear(cfg.text_hidden, cfg.text_hidden)
        self.key = nn.Linear(cfg.text_hidden, cfg.text_hidden)
        self.value = nn.Linear(cfg.text_hidden, cfg.text_hidden)

    def forward(self, x: Tensor, additive_mask: Tensor) -> Tensor:
        batch, length, width = x.shape
        q, k, v = (layer(x).view(batch, length, self.heads, -1).transpose(1, 2)
                   for layer in (self.query, self.key, self.value))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=additive_mask)
        return out.transpose(1, 2).reshape(batch, length, width)


class BertAddNorm(nn.Module):
    """LayerNorm(dense(h) + residual)."""

    def __init__(self, width_in: int, cfg: FVLMConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(width_in, cfg.text_hidden)
        self.LayerNorm = nn.LayerNorm(cfg.text_hidden, eps=cfg.text_layer_norm_eps)

    def forward(self, hidden: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dense(hidden) + residual)


class BertAttention(nn.Module):
    def __init__(self, cfg: FVLMConfig) -> None:
        super().__init__()
        self.self = BertSelfAttention(cfg)
        self.output = BertAddNorm(cfg.text_hidden, cfg)

    def forward(self, x: Tensor, additive_mask: Tensor) -> Tensor:
        return self.output(self.self(x, additive_mask), x)


class BertIntermediate(nn.Module):
    def __init__(self, cfg: FVLMConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.text_hidden, cfg.text_intermediate)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.dense(x))


class BertLayer(nn.Module):
    def __init__(self, cfg: FVLMConfig) -> None:
        super().__init__()
        self.attention = BertAttention(cfg)
        self.intermediate = BertIntermediate(cfg)
        self.output = BertAddNorm(cfg.text_intermediate, cfg)

    def forward(self, x: Tensor, additive_mask: Tensor) -> Tensor:
        x = self.attention(x, additive_mask)
        return self.output(self.intermediate(x), x)


class TextEncoder(nn.Module):
    """BERT encoder: token ids (N, T) + attention mask (N, T) -> last hidden states (N, T, H)."""

    def __init__(self, cfg: FVLMConfig) -> None:
        super().__init__()
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = nn.ModuleDict({"layer": nn.ModuleList(BertLayer(cfg) for _ in range(cfg.text_layers))})

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        x = self.embeddings(input_ids)
        additive_mask = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -10000.0
        for layer in self.encoder["layer"]:
            x = layer(x, additive_mask)
        return x


# ---------------------------------------------------------------- full model


class FVLM(nn.Module):
    """fVLM: image organ features, text features and organ-wise zero-shot scores."""

    def __init__(self, cfg: FVLMConfig = FVLMConfig()) -> None:
        super().__init__()
        self.config = cfg
        width, n_organs = cfg.vit_hidden, len(cfg.organs)
        self.visual_encoder = ImageEncoder(cfg)
        self.text_encoder = TextEncoder(cfg)
        self.text_proj = nn.Linear(cfg.text_hidden, cfg.embed_dim)
        self.temp = nn.Parameter(torch.tensor(0.07))
        self.attention = nn.MultiheadAttention(width, cfg.pool_heads, batch_first=True)
        self.vision_projs = nn.ModuleList(nn.Linear(width, cfg.embed_dim) for _ in range(n_organs))
        self.query_tokens = nn.Parameter(torch.zeros(n_organs, width))

    def organ_token_flags(self, organ_mask: Tensor) -> Tensor:
        """(B, [1,] Z, Y, X) organ ids -> (B, n_organs, L) bool."""
        return organ_token_flags(organ_mask, self.config.patch_size, len(self.config.organs))

    def pool_organs(self, levels: Tensor, flags: Tensor) -> Tensor:
        """Levels (n_levels, B, L, C) + flags (B, n_organs, L) -> L2-normed organ features (B, n_organs, E).

        Each organ's query attends over its tokens of all levels (level-major, as the reference concatenates
        them). Organs without any token get NaN features.
        """
        n_levels, batch, length, width = levels.shape
        attn, heads = self.attention, self.attention.num_heads
        w_q, w_k, w_v = attn.in_proj_weight.chunk(3)
        b_q, b_k, b_v = attn.in_proj_bias.chunk(3)
        context = levels.transpose(0, 1).reshape(batch, n_levels * length, width)
        q = F.linear(self.query_tokens, w_q, b_q).view(1, -1, heads, width // heads).transpose(1, 2)
        k = F.linear(context, w_k, b_k).view(batch, -1, heads, width // heads).transpose(1, 2)
        v = F.linear(context, w_v, b_v).view(batch, -1, heads, width // heads).transpose(1, 2)
        present = flags.any(dim=-1, keepdim=True)
        allowed = (flags | ~present).repeat(1, 1, n_levels)[:, None]  # absent organs: any finite result
        pooled = F.scaled_dot_product_attention(q.expand(batch, -1, -1, -1), k, v, attn_mask=allowed)
        pooled = attn.out_proj(pooled.transpose(1, 2).reshape(batch, -1, width))
        weight = torch.stack([proj.weight for proj in self.vision_projs])
        bias = torch.stack([proj.bias for proj in self.vision_projs])
        feats = F.normalize(torch.einsum("boc,oec->boe", pooled, weight) + bias, dim=-1)
        return feats.masked_fill(~present, float("nan"))

    def encode_organs(self, image: Tensor, organ_mask: Tensor) -> Tensor:
        """Image (B, 1, Z, Y, X) in [0, 1] + organ ids of the same grid -> (B, n_organs, E)."""
        return self.pool_organs(self.visual_encoder(image), self.organ_token_flags(organ_mask))

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Tokenised texts (N, T) -> L2-normed features (N, E) from the [CLS] state.

        Trailing columns that no text attends to (max_length padding) are dropped first: their -10000 mask
        gives them exactly zero attention weight in float32, so the [CLS] state does not change.
        """
        used = int(attention_mask.any(dim=0).nonzero().max()) + 1
        hidden = self.text_encoder(input_ids[:, :used], attention_mask[:, :used])
        return F.normalize(self.text_proj(hidden[:, 0]), dim=-1)

    def organ_indices(self, items: Sequence[ZeroShotItem]) -> list[int]:
        return [self.config.organs.index(item.organ) for item in items]

    def zero_shot_logits(self, organ_feats: Tensor, prompt_feats: Tensor, items: Sequence[ZeroShotItem]) -> Tensor:
        """Organ features (..., n_organs, E) x prompt pairs (n_items, 2, E) -> logits (..., n_items, 2)."""
        feats = organ_feats[..., self.organ_indices(items), :]
        return torch.einsum("...ie,ike->...ik", feats, prompt_feats) / self.temp

    def zero_shot_p_positive(self, organ_feats: Tensor, prompt_feats: Tensor,
                             items: Sequence[ZeroShotItem]) -> Tensor:
        """P(positive) = softmax over [negative, positive] logits, second entry: (..., n_items)."""
        return self.zero_shot_logits(organ_feats, prompt_feats, items).softmax(dim=-1)[..., 1]


def zero_shot_token_terms(model: FVLM, levels: Tensor, flags: Tensor, prompt_feats: Tensor,
                          items: Sequence[ZeroShotItem]) -> tuple[Tensor, Tensor]:
    """Exact per-token split of each item's logit difference logit(positive) - logit(negative) for its organ.

    levels (n_levels, 1, L, C) and flags (1, n_organs, L) of one window (`pool_organs`' inputs); prompt_feats
    (n_items, 2, E) [negative, positive]. -> terms (n_items, L) float64, each token position's share summed over
    the levels, and the constant (n_items,): terms.sum(-1) + constant = the logit difference.

    Why it is exact: per head, the pooled vector is sum_j a_j (W_v x_j + b_v) with attention weights a_j summing
    to 1, so it is sum_j a_j W_v x_j + b_v; out_proj and the organ's projection are affine, so the organ feature
    before the L2 norm is sum_j (token j's term) + a constant, and the norm |z| and 1 / temp are one factor.
    Tokens outside the organ have weight 0, hence term 0.
    """
    n_levels, _, length, width = levels.shape
    attn, heads = model.attention, model.attention.num_heads
    w_q, w_k, w_v = attn.in_proj_weight.double().chunk(3)
    b_q, b_k, b_v = attn.in_proj_bias.double().chunk(3)
    context = levels[:, 0].double().reshape(n_levels * length, width)  # level-major, as pool_organs
    q = F.linear(model.query_tokens.double(), w_q, b_q).view(-1, heads, width // heads)  # (O, H, d)
    k = F.linear(context, w_k, b_k).view(-1, heads, width // heads)  # (N, H, d)
    values = (context @ w_v.t()).view(-1, heads, width // heads)  # b_v goes to the constant
    allowed = flags[0].repeat(1, n_levels)[:, None]  # (O, 1, N)
    scores = torch.einsum("ohd,nhd->ohn", q, k) / math.sqrt(width // heads)
    weights = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)  # (O, H, N)
    w_o, b_o = attn.out_proj.weight.double(), attn.out_proj.bias.double()
    organs = model.organ_indices(items)
    projection = torch.stack([model.vision_projs[o].weight for o in organs]).double()  # (I, E, C)
    constant_feat = torch.einsum("iec,c->ie", projection, w_o @ b_v + b_o) + torch.stack(
        [model.vision_projs[o].bias for o in organs]).double()  # (I, E)
    pooled = torch.einsum("ihn,nhd->ihd", weights[organs], values).reshape(len(items), width)
    feature = torch.einsum("iec,ic->ie", projection, pooled @ w_o.t()) + constant_feat  # before the L2 norm
    direction = (prompt_feats[:, 1] - prompt_feats[:, 0]).double()  # (I, E)
    scale = 1.0 / (feature.norm(dim=-1) * float(model.temp.detach()))  # (I,)
    back = torch.einsum("ie,iec,cm->im", direction, projection, w_o).view(len(items), heads, -1)  # (I, H, d)
    terms = torch.einsum("ihn,nhd,ihd->in", weights[organs], values, back) * scale[:, None]
    constant = (constant_feat * direction).sum(-1) * scale
    return terms.view(len(items), n_levels, length).sum(dim=1), constant


Tokenize = Callable[[list[str]], tuple[Tensor, Tensor]]


def encode_prompt_pairs(model: FVLM, tokenize: Tokenize,
                        items: Sequence[ZeroShotItem] = ZERO_SHOT_ITEMS) -> Tensor:
    """Encode every item's [negative, positive] prompts once -> (n_items, 2, E).

    `tokenize(texts)` returns (input_ids, attention_mask), padded to `model.config.max_txt_len` like the
    reference (padding='max_length', truncation).
    """
    texts = [text for item in items for text in (item.negative, item.positive)]
    return model.encode_text(*tokenize(texts)).view(len(items), 2, -1)


# ---------------------------------------------------------------- checkpoints


def read_state_dict(source: StateSource) -> dict[str, Tensor]:
    """Model weights from a released checkpoint_*.pth ({'model': ...}), a bare state dict file or a mapping."""
    obj = source if isinstance(source, Mapping) else load_torch_file(source, WHAT)
    if isinstance(obj, Mapping) and "model" in obj:
        obj = obj["model"]
    return as_state_dict(obj, source_name(source), WHAT)


def load_fvlm(source: StateSource, config: FVLMConfig | None = None) -> FVLM:
    """Build fVLM and load a checkpoint as released (unused MLM-head / token-type entries are ignored).

    Without `config`, the released sizes are used with the vocabulary and position count read from the file.
    Returns the model in eval mode (float32, CPU).
    """
    state = read_state_dict(source)
    model = FVLM(config or _released_config(state))
    apply_state_dict(model, state, source=source_name(source), what=WHAT, ignore=is_unused_checkpoint_key,
                     other_sizes_advice=OTHER_SIZES_ADVICE)
    return model.eval()


def check_fvlm_checkpoint(source: StateSource, config: FVLMConfig | None = None) -> None:
    """CheckpointError unless load_fvlm(source, config) would accept it; no weight is read or materialised."""
    state = read_state_dict(source)
    with torch.device("meta"):
        model = FVLM(config or _released_config(state))
    check_state_dict(model, state, source=source_name(source), what=WHAT, ignore=is_unused_checkpoint_key,
                     other_sizes_advice=OTHER_SIZES_ADVICE)


def _released_config(state: Mapping[str, Tensor]) -> FVLMConfig:
    """The released sizes, with the vocabulary and position count the checkpoint has."""
    table = state.get("text_encoder.embeddings.word_embeddings.weight")
    positions = state.get("text_encoder.embeddings.position_embeddings.weight")
    if table is None or positions is None:
        return FVLMConfig()
    return replace(FVLMConfig(), vocab_size=table.shape[0], max_position_embeddings=positions.shape[0])
