"""CT-CLIP v2 for inference: CTViT image encoder, BERT text encoder, checkpoint loader, zero-shot scoring.

Numerically equivalent to the reference (ibrahimethemhamamci/CT-CLIP, CTViT + CTCLIP classes and
scripts/zero_shot.py) and loads its state dicts unchanged: submodule names equal the reference's.
Axis conventions: volumes are (B, C, D, H, W) with D the axial (slice) axis; token grids are
(B, t, h, w, dim) with t the axial token axis.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from CTFoundationLib.errors import CheckpointError, CTFoundationError
from CTFoundationLib.models.checkpoint_io import as_state_dict, load_torch_file
from CTFoundationLib.vocab import CT_RATE_ABNORMALITIES

ATTENTION_LOGIT_SCALE = 8.0  # CTViT multiplies the cosine attention logits by a fixed 8, not 1/sqrt(d)
V1_MESSAGE = "v1 weights are not supported by the v2 runtime"
LIPRO_PREFIX = "trained_model."
BERT_BASE_HIDDEN_SIZE = 768  # transformers' BertConfig default
TEXT_TOWER_PREFIX = "text_transformer."  # the BERT tower's keys (left out by with_text=False)

# Reference keys that inference does not use: accepted in a checkpoint, then dropped (never kept in memory).
IGNORED_CHECKPOINT_KEYS = re.compile(
    r"(to_text_latent_extra|to_visual_latent_extra)\.weight"
    r"|text_transformer\.embeddings\.position_ids"
    r"|text_transformer\.pooler\..+"
    r"|visual_transformer\.(to_pixels|to_pixels_first_frame|to_patch_emb_first_frame)\..+"
    r"|visual_transformer\.vq\._codebook\.(initted|cluster_size)"
    r"|visual_transformer\.enc_(spatial|temporal)_transformer\.layers\.\d+\.1\.(null_kv|context_norm\.(gamma|beta))"
)

_UNSUPPORTED_CTCLIP_FLAGS = ("use_mlm", "downsample_image_embeds", "use_all_token_embeds")
_V1_PATCH_VECTOR = 15 * 30 * 30  # v1 CTViT: temporal patch 15, in-plane patch 30
_MAX_LISTED_KEYS = 8

FULL_SIZE_CONSTRUCTORS: dict[str, dict[str, Any]] = {
    "CTViT": {
        "dim": 512,
        "codebook_size": 8192,
        "image_size": 480,
        "patch_size": 20,
        "temporal_patch_size": 10,
        "spatial_depth": 4,
        "temporal_depth": 4,
        "dim_head": 32,
        "heads": 8,
    },
    # CXR-BERT-specialized (BiomedVLP): BERT-base shape, vocabulary 30,522.
    "BertConfig": {
        "vocab_size": 30522,
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "intermediate_size": 3072,
        "max_position_embeddings": 512,
        "type_vocab_size": 2,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-12,
        "pad_token_id": 0,
    },
    "CTCLIP": {"dim_image": 294912, "dim_text": 768, "dim_latent": 512},
}


# ----------------------------------------------------------------------------------------------
# Configuration


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2:
        raise ValueError(f"expected an int or a pair, got {value!r}")
    return pair  # type: ignore[return-value]


@dataclasses.dataclass(frozen=True)
class CTViTConfig:
    """The reference `CTViT(...)` arguments that shape the encoder (defaults are the reference's)."""

    dim: int
    codebook_size: int
    image_size: tuple[int, int]
    patch_size: tuple[int, int]
    temporal_patch_size: int
    spatial_depth: int
    temporal_depth: int
    dim_head: int = 64
    heads: int = 8
    channels: int = 1

    def __post_init__(self) -> None:
        if any(size % patch for size, patch in zip(self.image_size, self.patch_size)):
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")

    @classmethod
    def from_reference(cls, args: Mapping[str, Any]) -> CTViTConfig:
        """From `CTViT(...)` keyword arguments; training-only ones (dropout, GAN, VGG) are ignored."""
        names = {field.name for field in dataclasses.fields(cls)}
        kwargs = {key: value for key, value in args.items() if key in names}
        required = [field.name for field in dataclasses.fields(cls) if field.default is dataclasses.MISSING]
        missing = [name for name in required if name not in kwargs]
        if missing:
            raise ValueError(f"CTViT constructor arguments lack {missing}")
        kwargs["image_size"] = _pair(kwargs["image_size"])
        kwargs["patch_size"] = _pair(kwargs["patch_size"])
        return cls(**kwargs)

    @property
    def grid_hw(self) -> tuple[int, int]:
        """In-plane token grid (h, w)."""
        return self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1]

    @property
    def patch_dim(self) -> int:
        return self.channels * self.temporal_patch_size * self.patch_size[0] * self.patch_size[1]

    @property
    def ff_inner_dim(self) -> int:
        return int(4 * (2 / 3) * self.dim)


@dataclasses.dataclass(frozen=True)
class CTCLIPConfig:
    """Sizes of the whole model: CTViT config, BertConfig keyword arguments, CTCLIP head widths."""

    vision: CTViTConfig
    text: Mapping[str, Any]
    dim_text: int = 512
    dim_image: int = 512
    dim_latent: int = 512

    def __post_init__(self) -> None:
        h, w = self.vision.grid_hw
        if self.dim_image != h * w * self.vision.dim:
            raise ValueError(
                f"dim_image {self.dim_image} must be h*w*dim = {h}*{w}*{self.vision.dim} = {h * w * self.vision.dim} "
                f"for v2 axial-mean pooling ({V1_MESSAGE} if this is a v1 configuration)"
            )
        hidden = self.text.get("hidden_size", BERT_BASE_HIDDEN_SIZE)  # image work needs no transformers
        if self.dim_text != hidden:
            raise ValueError(f"dim_text {self.dim_text} differs from the BERT hidden_size {hidden}")

    @classmethod
    def from_reference_constructors(cls, constructors: Mapping[str, Mapping[str, Any]]) -> CTCLIPConfig:
        """From the reference's constructor arguments {"CTViT": {...}, "BertConfig": {...}, "CTCLIP": {...}}.

        This is the layout of a fixture's config.json "constructors" and the way to describe a fine-tuned
        variant; CTCLIP's encoder arguments and free-text notes are ignored.
        """
        if not isinstance(constructors, Mapping):
            raise ValueError(f"constructor arguments must be a JSON object, got {type(constructors).__name__}")
        missing = [name for name in ("CTViT", "BertConfig", "CTCLIP") if name not in constructors]
        if missing:
            raise ValueError(f"constructor arguments lack the section(s) {missing}")
        not_objects = [name for name in ("CTViT", "BertConfig", "CTCLIP")
                       if not isinstance(constructors[name], Mapping)]
        if not_objects:
            raise ValueError(f"constructor section(s) {not_objects} must be JSON objects")
        clip = constructors["CTCLIP"]
        unsupported = [flag for flag in _UNSUPPORTED_CTCLIP_FLAGS if clip.get(flag)]
        if unsupported:
            raise ValueError(f"CTCLIP options {unsupported} are not supported (CT-CLIP v2 uses none of them)")
        return cls(
            vision=CTViTConfig.from_reference(constructors["CTViT"]),
            text=dict(constructors["BertConfig"]),
            dim_text=clip.get("dim_text", 512),
            dim_image=clip.get("dim_image", 512),
            dim_latent=clip.get("dim_latent", 512),
        )

    @classmethod
    def full_size(cls) -> CTCLIPConfig:
        """The released CT-CLIP v2 (CTViT 512-d, 24x24 in-plane tokens, CXR-BERT, 512-d latents)."""
        return cls.from_reference_constructors(FULL_SIZE_CONSTRUCTORS)

    def bert_config(self):
        """The text tower's transformers BertConfig (imports transformers)."""
        from transformers import BertConfig

        return BertConfig(**self.text)


def read_ctclip_config(path: Path) -> CTCLIPConfig:
    """A CT-CLIP constructor JSON (the reference's "CTViT", "BertConfig", "CTCLIP" sections, optionally under
    "constructors") as a config."""
    try:
        constructors = json.loads(Path(path).read_text())
        section = constructors.get("constructors", constructors) if isinstance(constructors, dict) else constructors
        return CTCLIPConfig.from_reference_constructors(section)
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise CTFoundationError(
            f"model config {path}: not a usable CT-CLIP constructor JSON ({error}); it needs the sections "
            '"CTViT", "BertConfig" and "CTCLIP" as in a fixture config.json'
        ) from error


# ----------------------------------------------------------------------------------------------
# CTViT building blocks


class _Indexed(nn.Module):
    """Holds children under the reference's positional names ("0", "1", ...) so state-dict keys match."""

    def __init__(self, children: Mapping[int, nn.Module]) -> None:
        super().__init__()
        for index, child in children.items():
            self.add_module(str(index), child)

    def __getitem__(self, index: int) -> nn.Module:
        return self._modules[str(index)]


class _GainLayerNorm(nn.Module):
    """LayerNorm with a learned gain and a constant zero `beta` buffer (in the checkpoints, never trained)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))
        self.register_buffer("beta", torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, x.shape[-1:], self.gamma, self.beta)


class _PEG(nn.Module):
    """Position generator: depthwise 3x3x3 conv, zero padding, causal (2 before, 0 after) on the first axis."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dsconv = nn.Conv3d(dim, dim, 3, groups=dim)

    def forward(self, x: Tensor, grid: tuple[int, int, int, int]) -> Tensor:
        """x (S, n, d) token buffer, read RAW as a grid=(b, t, h, w) volume as the reference does -> (S, n, d).

        In the temporal stage the buffer is ((b h w), t, d), so the conv then runs over (h, w, t) with the causal
        padding on h (cubic grids) or over scrambled axes (t != h): reproduced on purpose.
        """
        volume = x.reshape(*grid, x.shape[-1]).permute(0, 4, 1, 2, 3)
        volume = F.pad(volume, (1, 1, 1, 1, 2, 0)).contiguous(memory_format=torch.channels_last_3d)
        return self.dsconv(volume).permute(0, 2, 3, 4, 1).reshape(x.shape)


class _Attention(nn.Module):
    """Self-attention: q from LayerNorm(x), k/v from raw x; q, k L2-normalised, scaled by learned q/k_scale."""

    def __init__(self, dim: int, dim_head: int, heads: int) -> None:
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        self.norm = _GainLayerNorm(dim)
        self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_kv = nn.Linear(dim, 2 * heads * dim_head, bias=False)
        self.q_scale = nn.Parameter(torch.ones(dim_head))
        self.k_scale = nn.Parameter(torch.ones(dim_head))
        self.to_out = nn.Linear(heads * dim_head, dim, bias=False)

    def forward(self, x: Tensor, bias: Tensor | None) -> Tensor:
        """x (S, n, dim), bias (1, heads, n, n) added to the logits or None -> (S, n, dim)."""
        s, n, _ = x.shape
        q = self.to_q(self.norm(x)).view(s, n, self.heads, self.dim_head).transpose(1, 2)
        k, v = self.to_kv(x).view(s, n, 2, self.heads, self.dim_head).permute(2, 0, 3, 1, 4)
        q = (F.normalize(q, dim=-1) * self.q_scale).to(v.dtype)
        k = (F.normalize(k, dim=-1) * self.k_scale).to(v.dtype)
        mask = None if bias is None else bias.to(v.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=ATTENTION_LOGIT_SCALE)
        return self.to_out(out.transpose(1, 2).reshape(s, n, -1))


class _FeedForward(_Indexed):
    """LayerNorm -> Linear(dim, 2*inner) -> GEGLU (first half value, second half gate) -> Linear(inner, dim)."""

    def __init__(self, dim: int, inner: int) -> None:
        super().__init__(
            {0: nn.LayerNorm(dim), 1: nn.Linear(dim, 2 * inner, bias=False), 4: nn.Linear(inner, dim, bias=False)}
        )

    def forward(self, x: Tensor) -> Tensor:
        value, gate = self[1](self[0](x)).chunk(2, dim=-1)
        return self[4](F.gelu(gate).mul_(value))


class _Layer(_Indexed):
    """Children 0 = PEG, 1 = self-attention, 3 = feed-forward (2, the reference's unused cross-attention, is empty)."""

    def __init__(self, config: CTViTConfig) -> None:
        super().__init__(
            {
                0: _PEG(config.dim),
                1: _Attention(config.dim, config.dim_head, config.heads),
                3: _FeedForward(config.dim, config.ff_inner_dim),
            }
        )

    def forward(self, x: Tensor, grid: tuple[int, int, int, int], bias: Tensor | None) -> Tensor:
        x = x + self[0](x, grid)
        x = x + self[1](x, bias)
        return x + self[3](x)


class _Transformer(nn.Module):
    """Stack of layers over (S, n, dim) token sequences, then a gain-only LayerNorm."""

    def __init__(self, config: CTViTConfig, depth: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_Layer(config) for _ in range(depth))
        self.norm_out = _GainLayerNorm(config.dim)

    def forward(self, x: Tensor, grid: tuple[int, int, int, int], bias: Tensor | None = None) -> Tensor:
        for layer in self.layers:
            x = layer(x, grid, bias)
        return self.norm_out(x)


class _ContinuousPositionBias(nn.Module):
    """Spatial attention bias: MLP of sign(r)*log(1+|r|) of the (dy, dx) offset between two in-plane tokens."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.net = nn.ModuleList(
            [
                nn.Sequential(nn.Linear(2, dim), nn.LeakyReLU(0.1)),
                nn.Sequential(nn.Linear(dim, dim), nn.LeakyReLU(0.1)),
                nn.Linear(dim, heads),
            ]
        )

    def forward(self, h: int, w: int) -> Tensor:
        """-> (heads, h*w, h*w) for row-major positions; the MLP runs once per distinct offset, not per pair."""
        device = self.net[-1].weight.device
        dy, dx = torch.arange(1 - h, h, device=device), torch.arange(1 - w, w, device=device)
        offsets = torch.stack(torch.meshgrid(dy, dx, indexing="ij"), dim=-1)
        table = torch.sign(offsets) * torch.log(offsets.abs() + 1)
        for layer in self.net:
            table = layer(table)
        ys = torch.arange(h, device=device).repeat_interleave(w)
        xs = torch.arange(w, device=device).repeat(h)
        bias = table[ys[:, None] - ys[None, :] + h - 1, xs[:, None] - xs[None, :] + w - 1]
        return bias.permute(2, 0, 1).contiguous()


class _PatchEmbedding(_Indexed):
    """(B, C, D, H, W) -> (B, t, h, w, dim): patch vectors in (c, pt, p1, p2) order, LayerNorm, Linear, LayerNorm."""

    def __init__(self, config: CTViTConfig) -> None:
        dim, patch_dim = config.dim, config.patch_dim
        super().__init__({1: nn.LayerNorm(patch_dim), 2: nn.Linear(patch_dim, dim), 3: nn.LayerNorm(dim)})
        self.patch = (config.temporal_patch_size, *config.patch_size)

    def forward(self, video: Tensor) -> Tensor:
        b, c, depth, height, width = video.shape
        pt, ph, pw = self.patch
        patches = video.reshape(b, c, depth // pt, pt, height // ph, ph, width // pw, pw)
        patches = patches.permute(0, 2, 4, 6, 1, 3, 5, 7)  # (b, t, h, w, c, pt, p1, p2)
        # One axial token slab at a time, so the (tokens x patch_dim) matrix is never held whole.
        return torch.stack([self._embed(patches[:, i]) for i in range(patches.shape[1])], dim=1)

    def _embed(self, slab: Tensor) -> Tensor:
        """(b, h, w, c, pt, p1, p2) -> (b, h, w, dim)."""
        return self[3](self[2](self[1](slab.reshape(*slab.shape[:3], -1))))


class _Codebook(nn.Module):
    def __init__(self, codebook_size: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("embed", torch.randn(1, codebook_size, dim))


class _VectorQuantizer(nn.Module):
    """Cosine-similarity codebook lookup (vector-quantize-pytorch 1.1.2, eval): returns the RAW codebook row."""

    chunk_tokens = 4096

    def __init__(self, dim: int, codebook_size: int) -> None:
        super().__init__()
        self._codebook = _Codebook(codebook_size, dim)

    def forward(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """tokens (..., d) -> codes (..., d) float32, indices (...) int64; always float32, whatever the autocast."""
        with torch.autocast(tokens.device.type, enabled=False):
            embed = self._codebook.embed[0].float()
            unit_codes = F.normalize(embed, dim=-1).t()
            flat = tokens.reshape(-1, tokens.shape[-1]).float()
            parts = flat.split(self.chunk_tokens)
            indices = torch.cat([(F.normalize(part, dim=-1) @ unit_codes).argmax(dim=-1) for part in parts])
        return embed[indices].view(tokens.shape), indices.view(tokens.shape[:-1])


class CTViT(nn.Module):
    """CT-CLIP v2 image encoder: patch embedding, spatial then temporal transformer, cosine-sim VQ."""

    def __init__(self, config: CTViTConfig) -> None:
        super().__init__()
        self.config = config
        self.spatial_rel_pos_bias = _ContinuousPositionBias(config.dim, config.heads)
        self.to_patch_emb = _PatchEmbedding(config)
        self.enc_spatial_transformer = _Transformer(config, config.spatial_depth)
        self.enc_temporal_transformer = _Transformer(config, config.temporal_depth)
        self.vq = _VectorQuantizer(config.dim, config.codebook_size)

    def embed_patches(self, video: Tensor) -> Tensor:
        """(B, C, D, H, W) with (H, W) = image_size and D a multiple of the temporal patch -> (B, t, h, w, dim)."""
        cfg, shape = self.config, tuple(video.shape)
        depth_ok = len(shape) == 5 and shape[2] > 0 and shape[2] % cfg.temporal_patch_size == 0
        if not depth_ok or shape[1] != cfg.channels or shape[3:] != cfg.image_size:
            raise ValueError(
                f"expected a (B, {cfg.channels}, D, {cfg.image_size[0]}, {cfg.image_size[1]}) volume with D a positive "
                f"multiple of {cfg.temporal_patch_size}, got {tuple(video.shape)}"
            )
        return self.to_patch_emb(video)

    def encode(self, tokens: Tensor) -> Tensor:
        """(B, t, h, w, dim) patch tokens -> (B, t, h, w, dim) encoder output before quantisation."""
        b, t, h, w, d = tokens.shape
        grid = (b, t, h, w)
        with torch.autocast(tokens.device.type, enabled=False):
            bias = self.spatial_rel_pos_bias(h, w).unsqueeze(0)
        x = self.enc_spatial_transformer(tokens.reshape(b * t, h * w, d), grid, bias)
        x = x.view(b, t, h, w, d).permute(0, 2, 3, 1, 4).reshape(b * h * w, t, d)
        x = self.enc_temporal_transformer(x, grid)
        return x.view(b, h, w, t, d).permute(0, 3, 1, 2, 4)

    def forward(self, video: Tensor) -> tuple[Tensor, Tensor]:
        """(B, C, D, H, W) -> quantised grid (B, t, h, w, dim) float32 and codebook ids (B, t, h, w)."""
        return self.vq(self.encode(self.embed_patches(video)))


# ----------------------------------------------------------------------------------------------
# CT-CLIP


class CTCLIP(nn.Module):
    """CT-CLIP v2: BERT text tower, CTViT image tower, bias-free latent projections, learned temperature.

    `classifier` is the LiPro head (Linear(dim_latent, 18)) when a LiPro checkpoint was loaded, else None.
    `autocast_dtype` None computes in float32; torch.bfloat16 runs the towers under autocast.
    `with_text=False` leaves the BERT tower out (`text_transformer` None): image work needs neither it nor
    transformers.
    """

    def __init__(self, config: CTCLIPConfig, with_text: bool = True) -> None:
        super().__init__()
        self.config = config
        self.text_transformer = None
        if with_text:
            from transformers import BertModel

            self.text_transformer = BertModel(config.bert_config(), add_pooling_layer=False)
        self.visual_transformer = CTViT(config.vision)
        self.to_text_latent = nn.Linear(config.dim_text, config.dim_latent, bias=False)
        self.to_visual_latent = nn.Linear(config.dim_image, config.dim_latent, bias=False)
        self.temperature = nn.Parameter(torch.tensor(1.0))
        self.classifier: nn.Linear | None = None
        self.autocast_dtype: torch.dtype | None = None

    @property
    def device(self) -> torch.device:
        return self.temperature.device

    @property
    def logit_scale(self) -> Tensor:
        """exp(temperature): multiplies the cosine similarities."""
        return self.temperature.detach().exp()

    def attach_lipro_classifier(self, num_classes: int = len(CT_RATE_ABNORMALITIES)) -> None:
        self.classifier = nn.Linear(self.config.dim_latent, num_classes)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    @torch.inference_mode()
    def encode_image(self, volume: Tensor, return_tokens: bool = False) -> tuple[Tensor, Tensor | None]:
        """(B, 1, D, H, W) volume, HU/1000, (H, W) the configured image size -> (latent, token grid or None).

        latent: (B, dim_latent) L2-normalised, float32; D must be a multiple of the temporal patch (10).

        The token grid is the quantised (B, t, h, w, dim) grid, e.g. (B, 24, 24, 24, 512) for 240 slices.
        """
        with self._autocast():
            codes, _ = self.visual_transformer(volume.to(self.device, torch.float32))
        return self.image_latents_from_tokens(codes), (codes if return_tokens else None)

    @staticmethod
    def pool_tokens(codes: Tensor) -> Tensor:
        """v2 pooling: (B, t, h, w, dim) -> mean over t, flattened in (h, w, dim) order -> (B, h*w*dim)."""
        return codes.mean(dim=1).reshape(codes.shape[0], -1)

    def image_latents_from_tokens(self, codes: Tensor) -> Tensor:
        """(B, t, h, w, dim) quantised grid -> (B, dim_latent) L2-normalised, in float32."""
        with torch.autocast(codes.device.type, enabled=False):
            return F.normalize(self.to_visual_latent(self.pool_tokens(codes.float())), dim=-1)

    def text_cls(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(K, L) ids and 0/1 mask -> (K, dim_text) last-layer [CLS] state (token type 0, positions 0..L-1)."""
        if self.text_transformer is None:
            raise RuntimeError("this CTCLIP was loaded without its text tower (with_text=False)")
        out = self.text_transformer(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device))
        return out.last_hidden_state[:, 0].float()

    @torch.inference_mode()
    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(K, L) ids and mask (pad only to the longest text; padding does not change [CLS]) -> (K, dim_latent)."""
        with self._autocast():
            cls = self.text_cls(input_ids, attention_mask)
        return F.normalize(self.to_text_latent(cls), dim=-1)

    @torch.inference_mode()
    def similarity(self, text_latents: Tensor, image_latents: Tensor) -> Tensor:
        """(K, L) and (B, L) latents -> (K, B) cosine * exp(temperature)."""
        return text_latents @ image_latents.t() * self.logit_scale

    @torch.inference_mode()
    def lipro_probabilities(self, image_latents: Tensor) -> Tensor:
        """LiPro head: (B, L) normalised latents -> (B, classes) sigmoid(classifier(relu(latents)))."""
        if self.classifier is None:
            raise RuntimeError("this model has no LiPro classifier; load CT_LiPro_v2.pt to use it")
        return torch.sigmoid(self.classifier(F.relu(image_latents)))


# ----------------------------------------------------------------------------------------------
# Zero-shot scoring


def zero_shot_prompts(names: Sequence[str] = CT_RATE_ABNORMALITIES) -> list[str]:
    """2*len(names) texts: "<name> is present.", "<name> is not present." for each name in order."""
    return [text for name in names for text in (f"{name} is present.", f"{name} is not present.")]


def tokenize(tokenizer: Any, texts: Sequence[str], max_length: int = 512) -> tuple[Tensor, Tensor]:
    """Ids and attention mask (K, L), padded only to the longest text (the reference pads to 512: same [CLS])."""
    encoded = tokenizer(list(texts), padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
    return encoded["input_ids"], encoded["attention_mask"]


def encode_zero_shot_prompts(model: CTCLIP, tokenizer: Any, names: Sequence[str] = CT_RATE_ABNORMALITIES) -> Tensor:
    """All prompt latents in one batch -> (P, 2, dim_latent), [present, not present] per name; reuse across images."""
    latents = model.encode_text(*tokenize(tokenizer, zero_shot_prompts(names)))
    return latents.view(len(names), 2, -1)


def zero_shot_logits(image_latents: Tensor, prompt_latents: Tensor, logit_scale: Tensor | float) -> Tensor:
    """(B, L) image latents, (P, 2, L) prompt latents -> (B, P, 2) cosine * logit_scale."""
    return torch.einsum("bl,pkl->bpk", image_latents, prompt_latents.to(image_latents)) * logit_scale


def zero_shot_probabilities(image_latents: Tensor, prompt_latents: Tensor, logit_scale: Tensor | float) -> Tensor:
    """P(present) (B, P): softmax over each (present, not present) logit pair, first entry."""
    return zero_shot_logits(image_latents, prompt_latents, logit_scale).softmax(dim=-1)[..., 0]


# ----------------------------------------------------------------------------------------------
# Checkpoint loading

_ADVICE = (
    "Use a complete official CT-CLIP v2 file (CT-CLIP_v2.pt, CT_VocabFine_v2.pt or CT_LiPro_v2.pt; download it "
    "again if in doubt), or, for a fine-tuned variant with other sizes, pass its constructor JSON with "
    "--model-config FILE (in Python: model_config= of CTCLIPRuntime.from_registry)."
)


def load_ctclip(
    path: str | Path,
    config: CTCLIPConfig | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    with_text: bool = True,
) -> CTCLIP:
    """Load a CT-CLIP v2 checkpoint written by the reference, unchanged, into an eval-mode CTCLIP.

    Plain layout (CT-CLIP_v2.pt, CT_VocabFine_v2.pt): CTCLIP state-dict keys. LiPro layout (CT_LiPro_v2.pt):
    the same keys under "trained_model." plus classifier.{weight,bias}; then `model.classifier` is set.
    Keys matching IGNORED_CHECKPOINT_KEYS (the unused _extra projections, decoder, pooler, ...) are accepted
    and dropped; the file is memory-mapped so they are never read. config defaults to the full-size v2.
    dtype: torch.float32, or torch.bfloat16 autocast (weights stay float32; VQ, pooling and latents in float32).
    with_text=False: the image tower and heads only; the text tower's tensors are neither checked nor read.
    Raises CheckpointError for a missing, unreadable, v1 or mismatching file.
    """
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"dtype must be torch.float32 or torch.bfloat16, got {dtype}")
    model, tensors = _checked_checkpoint(Path(path), config, with_text)
    model.load_state_dict({key: value.float() for key, value in tensors.items()}, strict=True, assign=True)
    if with_text:
        _restore_text_index_buffers(model.text_transformer)
    model.autocast_dtype = None if dtype == torch.float32 else dtype
    return model.to(device).eval()


def attach_text_tower(model: CTCLIP, path: str | Path) -> CTCLIP:
    """Add the BERT tower of checkpoint `path` to `model` (loaded with with_text=False from the same file).

    Only the text tower's tensors are materialised; the image tower is neither read nor rebuilt again.
    Raises CheckpointError when the file's text tower does not fit the model's configuration.
    """
    from transformers import BertModel

    path = Path(path)
    tensors, _, _ = _split_layout(_read_checkpoint(path))
    text = {key.removeprefix(TEXT_TOWER_PREFIX): value for key, value in tensors.items()
            if key.startswith(TEXT_TOWER_PREFIX) and not IGNORED_CHECKPOINT_KEYS.fullmatch(key)}
    with torch.device("meta"):
        bert = BertModel(model.config.bert_config(), add_pooling_layer=False)
    _check_keys(path, bert, text, [])
    bert.load_state_dict({key: value.float() for key, value in text.items()}, strict=True, assign=True)
    _restore_text_index_buffers(bert)
    model.text_transformer = bert.to(model.device).eval()
    return model


def check_ctclip_checkpoint(path: str | Path, config: CTCLIPConfig | None = None) -> None:
    """CheckpointError unless load_ctclip(path, config) would accept the file; no weight is read or materialised."""
    _checked_checkpoint(Path(path), config)


def _checked_checkpoint(path: Path, config: CTCLIPConfig | None,
                        with_text: bool = True) -> tuple[CTCLIP, dict[str, Tensor]]:
    """The model built on the meta device and the file's tensors under its key names, after every check."""
    config = CTCLIPConfig.full_size() if config is None else config
    tensors, strays, lipro = _split_layout(_read_checkpoint(path))
    _reject_v1(path, tensors, config)
    tensors = {key: value for key, value in tensors.items() if not IGNORED_CHECKPOINT_KEYS.fullmatch(key)
               and (with_text or not key.startswith(TEXT_TOWER_PREFIX))}
    with torch.device("meta"):
        model = CTCLIP(config, with_text)
        if lipro:
            weight = tensors.get("classifier.weight")
            classes = weight.shape[0] if weight is not None and weight.ndim == 2 else len(CT_RATE_ABNORMALITIES)
            model.attach_lipro_classifier(classes)
    _check_keys(path, model, tensors, strays)
    return model, tensors


def _read_checkpoint(path: Path) -> dict[str, Tensor]:
    """torch.load (weights only, memory-mapped when possible) -> flat dict of tensors, or CheckpointError."""
    what = "CT-CLIP checkpoint"
    try:
        return as_state_dict(load_torch_file(path, what), path, what)
    except CheckpointError as error:
        raise CheckpointError(f"{error} {_ADVICE}") from None


def _split_layout(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str], bool]:
    """Plain or LiPro layout -> (tensors under CTCLIP's key names, keys fitting neither layout, is LiPro)."""
    if not any(key.startswith(LIPRO_PREFIX) for key in state):
        return state, [], False
    tensors, strays = {}, []
    for key, value in state.items():
        if key.startswith(LIPRO_PREFIX):
            tensors[key[len(LIPRO_PREFIX) :]] = value
        elif key.startswith("classifier."):
            tensors[key] = value
        else:
            strays.append(key)
    return tensors, strays, True


def _reject_v1(path: Path, tensors: Mapping[str, Tensor], config: CTCLIPConfig) -> None:
    """CheckpointError when the head flattens a whole n*n*n token grid, or the patches are v1's 15x30x30."""
    head, patch = tensors.get("to_visual_latent.weight"), tensors.get("visual_transformer.to_patch_emb.2.weight")
    width = head.shape[-1] if head is not None and head.ndim == 2 else config.dim_image
    patch_len = patch.shape[-1] if patch is not None and patch.ndim == 2 else config.vision.patch_dim
    cells, rest = divmod(width, config.vision.dim)
    side = round(cells ** (1 / 3))
    v1_head = width != config.dim_image and rest == 0 and cells > 1 and side**3 == cells  # 1: a smaller v2 head
    v1_patch = patch_len != config.vision.patch_dim and patch_len == _V1_PATCH_VECTOR * config.vision.channels
    if v1_head or v1_patch:
        raise CheckpointError(
            f"{path}: {V1_MESSAGE} (to_visual_latent takes {width:,} inputs and patches are {patch_len:,} long; v2 "
            f"expects {config.dim_image:,} and {config.vision.patch_dim:,}). Use CT-CLIP_v2.pt, CT_VocabFine_v2.pt "
            "or CT_LiPro_v2.pt."
        )


def _listing(label: str, items: Sequence[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED_KEYS])
    more = f" (+{len(items) - _MAX_LISTED_KEYS} more)" if len(items) > _MAX_LISTED_KEYS else ""
    return f"{len(items)} {label}: {shown}{more}"


def _check_keys(path: Path, model: nn.Module, tensors: Mapping[str, Tensor], strays: Sequence[str]) -> None:
    """CheckpointError listing (capped) missing keys, unexpected keys and wrong shapes/dtypes, if any."""
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    missing = sorted(expected.keys() - tensors.keys())
    unexpected = sorted(tensors.keys() - expected.keys()) + list(strays)
    wrong = [
        f"{key} {tuple(tensors[key].shape)} {tensors[key].dtype} (expected {expected[key]} float)"
        for key in sorted(expected.keys() & tensors.keys())
        if tuple(tensors[key].shape) != expected[key] or not tensors[key].is_floating_point()
    ]
    found = (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong))
    problems = [_listing(label, items) for label, items in found if items]
    if problems:
        raise CheckpointError(f"{path} does not match the CT-CLIP v2 model: {'; '.join(problems)}. {_ADVICE}")


def _restore_text_index_buffers(bert: nn.Module) -> None:
    """Recreate BERT's non-persistent position/token-type index buffers after the meta-device build."""
    embeddings = bert.embeddings
    positions = torch.arange(bert.config.max_position_embeddings).expand(1, -1)
    embeddings.position_ids = positions
    embeddings.token_type_ids = torch.zeros_like(positions)
    left = [name for name, tensor in _named_tensors(bert) if tensor.is_meta]
    if left:
        raise RuntimeError(f"BERT tensors left unset after loading (transformers layout changed?): {left}")


def _named_tensors(module: nn.Module) -> Iterator[tuple[str, Tensor]]:
    yield from module.named_parameters()
    yield from module.named_buffers()
