"""CT-CLIP in training: the library's `CTCLIP` modules driven with gradients.

The library's `encode_image` / `encode_text` are inference-only; here the same submodules run with autograd.
CTViT's vector quantiser trains as vector-quantize-pytorch 1.1.2 (the reference's) does in train mode:
cosine-similarity code choice, straight-through gradient, codebook moved by an exponential moving average
(decay 0.8) of the unit-normalised tokens assigned to each code. CTViT builds its quantiser with the library's
default `threshold_ema_dead_code=0`, so no code is restarted. The contrastive loss is the reference's symmetric
InfoNCE with the learned temperature (logit scale = exp(temperature)).
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from CTFoundationLib.errors import TrainingError
from CTFoundationLib.inference.maps import head_token_terms
from CTFoundationLib.models.checkpoint_io import as_state_dict, load_torch_file
from CTFoundationLib.models.ctclip import CTCLIP, LIPRO_PREFIX, CTCLIPConfig

CLUSTER_SIZE_KEY = "visual_transformer.vq._codebook.cluster_size"
CODE_CHUNK = 4096  # tokens scored against the codebook at a time (bounds the (tokens x codes) matrix)


class CodebookEMA(nn.Module):
    """Train-mode quantiser for a CTViT codebook: straight-through codes, EMA codebook (no dead-code restarts).

    The codebook is the (1, codes, dim) `embed` buffer of the model's quantiser, passed at each call and
    updated in place; this module keeps the EMA use count of each code.
    """

    def __init__(self, codebook_size: int, decay: float = 0.8) -> None:
        super().__init__()
        self.decay = decay
        self.register_buffer("cluster_size", torch.zeros(1, codebook_size))

    def forward(self, tokens: Tensor, codebook: Tensor) -> Tensor:
        """(..., dim) encoder tokens -> (..., dim) codebook rows (float32) with the tokens' gradient."""
        with torch.autocast(tokens.device.type, enabled=False):
            tokens = tokens.float()
            flat = F.normalize(tokens.detach().reshape(-1, tokens.shape[-1]), dim=-1)
            embed = codebook[0]
            unit_codes = F.normalize(embed, dim=-1).t()
            indices = torch.cat([(part @ unit_codes).argmax(dim=-1) for part in flat.split(CODE_CHUNK)])
            codes = embed[indices].view(tokens.shape)
            if self.training:
                self._update(embed, flat, indices)
            return tokens + (codes - tokens).detach()

    @torch.no_grad()
    def _update(self, embed: Tensor, flat: Tensor, indices: Tensor) -> None:
        bins = torch.bincount(indices, minlength=embed.shape[0]).to(flat.dtype)
        self.cluster_size[0].lerp_(bins, 1 - self.decay)
        sums = torch.zeros_like(embed).index_add_(0, indices, flat)
        means = F.normalize(sums / bins.clamp(min=1)[:, None], dim=-1)
        embed.lerp_(torch.where((bins == 0)[:, None], embed, means), 1 - self.decay)


class FrozenTextPrefix:
    """A BERT text tower's fixed part (embeddings and the first `count` layers) run once per distinct text and
    kept, so that a training step runs only the trainable layers: the same texts come back every epoch (reports)
    or every step (prompts). Fixed layers run without dropout (eval mode), which is what makes their output a
    function of the text. Up to `max_bytes` of states are kept; texts beyond that are run each time.

    The tower: `embeddings(input_ids)` and `layers[i](hidden, additive_mask)`, as transformers' BertModel and
    fVLM's TextEncoder have them."""

    def __init__(self, embeddings: nn.Module, layers: nn.ModuleList, count: int, max_bytes: int = 2**30) -> None:
        self.embeddings, self.layers, self.count, self.max_bytes = embeddings, layers, count, max_bytes
        self.states: dict[bytes, Tensor] = {}  # token ids of a text (unpadded) -> (tokens, dim_text)
        self.stored_bytes = 0

    def text_cls(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(K, L) ids and right-padded 0/1 mask -> (K, dim_text) last-layer [CLS] state (float32), the value of
        the whole tower with the fixed layers in eval mode."""
        lengths = attention_mask.sum(dim=1)
        positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        if not torch.equal(attention_mask.bool(), positions < lengths[:, None]):
            raise ValueError("FrozenTextPrefix expects right-padded texts (mask: ones, then zeros)")
        hidden = nn.utils.rnn.pad_sequence(self._prefix_states(input_ids, lengths.tolist()), batch_first=True)
        return self._run(self.layers[self.count :], hidden, attention_mask[:, : hidden.shape[1]])[:, 0].float()

    def _prefix_states(self, input_ids: Tensor, lengths: list[int]) -> list[Tensor]:
        keys = [row[:n].numpy().tobytes() for row, n in zip(input_ids.cpu(), lengths)]
        missing = {key: i for i, key in enumerate(keys) if key not in self.states}
        fresh = {}
        if missing:
            rows = list(missing.values())
            row_lengths = torch.tensor([lengths[i] for i in rows], device=input_ids.device)
            width = int(row_lengths.max())
            mask = torch.arange(width, device=input_ids.device) < row_lengths[:, None]
            states = self._fixed_layers(input_ids[rows, :width], mask)
            for key, state, i in zip(missing, states, rows):
                fresh[key] = state[: lengths[i]].clone()  # its own storage: a view would keep the padded batch
                if self.stored_bytes + fresh[key].nbytes <= self.max_bytes:
                    self.states[key] = fresh[key]
                    self.stored_bytes += fresh[key].nbytes
        return [self.states.get(key, fresh.get(key)) for key in keys]

    def _fixed_layers(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        modules = [self.embeddings, *self.layers[: self.count]]
        modes = [module.training for module in modules]
        try:
            for module in modules:
                module.eval()
            with torch.no_grad():
                return self._run(modules[1:], self.embeddings(input_ids), attention_mask)
        finally:
            for module, mode in zip(modules, modes):
                module.train(mode)

    @staticmethod
    def _run(layers, hidden: Tensor, attention_mask: Tensor) -> Tensor:
        """Layers over (K, L, d) states; the 0/1 mask as an additive (K, 1, 1, L) bias (the dtype's minimum gives
        padding exactly zero weight, as fVLM's -10000 does in float32)."""
        bias = (1.0 - attention_mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min
        for layer in layers:
            out = layer(hidden, bias)
            hidden = out[0] if isinstance(out, tuple) else out  # transformers < 5 returns a tuple
        return hidden


class TrainableCTCLIP(nn.Module):
    """CTCLIP + its train-mode quantiser as one module (what accelerate wraps for data parallelism).
    `frozen_text`: set when the first text layers are fixed (`FrozenTextPrefix`)."""

    def __init__(self, clip: CTCLIP, cluster_size: Tensor | None = None) -> None:
        super().__init__()
        self.clip = clip
        self.frozen_text: FrozenTextPrefix | None = None
        self.quantizer = CodebookEMA(clip.config.vision.codebook_size)
        if cluster_size is not None:
            self.quantizer.cluster_size.copy_(cluster_size.reshape(self.quantizer.cluster_size.shape))

    def image_tokens(self, volumes: Tensor) -> Tensor:
        """(B, 1, D, H, W) model-ready volumes -> (B, t, h, w, dim) quantised token grid (float32)."""
        vit = self.clip.visual_transformer
        return self.quantizer(vit.encode(vit.embed_patches(volumes)), vit.vq._codebook.embed)

    def text_latents(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(K, L) token ids and mask -> (K, dim_latent) L2-normalised latents (float32)."""
        text_cls = self.frozen_text.text_cls if self.frozen_text else self.clip.text_cls
        return F.normalize(self.clip.to_text_latent(text_cls(input_ids, attention_mask)).float(), dim=-1)

    def prompt_token_terms(self, tokens: Tensor, prompt_latents: Tensor) -> Tensor:
        """Each token's share of each prompt pair's zero-shot logit difference, as the finding maps
        (inference.maps) compute it: tokens (B, t, h, w, d), prompt_latents (P, 2, L) [present, not present]
        -> (B, P, t, h, w) in logit units, summing over the tokens to logit(present) - logit(not present)."""
        with torch.autocast(tokens.device.type, enabled=False):
            weight = self.clip.to_visual_latent.weight
            raw_latents = self.clip.to_visual_latent(self.clip.pool_tokens(tokens.float()))
            scale = self.clip.temperature.exp() / raw_latents.norm(dim=-1)
            terms = head_token_terms((prompt_latents[:, 0] - prompt_latents[:, 1]).float() @ weight, tokens.float())
            return terms * scale[:, None, None, None, None]

    def forward(
        self, volumes: Tensor | None = None, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
        prompt_terms: bool = False,
    ) -> tuple[Tensor | None, Tensor | None, Tensor, Tensor | None]:
        """(image latents or None, text latents or None, logit scale exp(temperature), per-token terms or None);
        the one entry point, so that data-parallel wrappers see every parameter used. prompt_terms: the texts
        are [present, not present] prompt pairs; also return `prompt_token_terms` of the images."""
        tokens = self.image_tokens(volumes) if volumes is not None else None
        images = self.clip.image_latents_from_tokens(tokens) if tokens is not None else None
        texts = self.text_latents(input_ids, attention_mask) if input_ids is not None else None
        terms = None
        if prompt_terms:
            terms = self.prompt_token_terms(tokens, texts.view(texts.shape[0] // 2, 2, -1))
        return images, texts, self.clip.temperature.exp(), terms


def contrastive_loss(text_latents: Tensor, image_latents: Tensor, logit_scale: Tensor) -> Tensor:
    """Mean of text->image and image->text cross-entropy over cosine * logit_scale; pair i matches i."""
    logits = text_latents @ image_latents.t() * logit_scale
    targets = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2


def enable_gradient_checkpointing(clip: CTCLIP) -> None:
    """Recompute activations in the backward pass: every CTViT layer and every BERT layer (less memory)."""
    checkpoint_transformers_model(clip.text_transformer)
    vit = clip.visual_transformer
    for layer in [*vit.enc_spatial_transformer.layers, *vit.enc_temporal_transformer.layers]:
        layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)


def checkpoint_transformers_model(model: nn.Module) -> None:
    """transformers' own activation checkpointing, non-reentrant: `activation_checkpointing_enable` where it exists
    (transformers 5 deprecated the older `gradient_checkpointing_enable`). A model that recomputes its layers keeps
    no key/value cache, so `use_cache` goes off (else transformers says so at the first forward)."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False


def build_clip(
    config: CTCLIPConfig, text_init: Path | None = None, seed: int = 0, temperature_init: float | None = None
) -> CTCLIP:
    """A fresh CTCLIP of this config; the text tower from a local BERT folder if given."""
    torch.manual_seed(seed)
    clip = CTCLIP(config)
    init_codebook(clip)
    if temperature_init is not None:
        with torch.no_grad():
            clip.temperature.fill_(temperature_init)
    if text_init is not None:
        load_text_tower(clip, Path(text_init))
    return clip


def init_codebook(clip: CTCLIP) -> None:
    """A fresh codebook as vector-quantize-pytorch's cosine-similarity codebook starts: unit-norm rows of a
    Kaiming-uniform draw (the library's randn buffer only holds loaded values; unit codes keep every code on
    the scale the EMA moves them to)."""
    embed = clip.visual_transformer.vq._codebook.embed
    with torch.no_grad():
        embed.copy_(F.normalize(nn.init.kaiming_uniform_(torch.empty_like(embed[0])), dim=-1)[None])


def load_local_bert(folder: Path):
    """A pretrained BertModel without pooler from a local Hugging Face folder (never the Hub); TrainingError when
    the folder is not one."""
    from transformers import BertModel
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # not the load report of the pooler weights the towers leave out on purpose
    hf_logging.disable_progress_bar()
    try:
        return BertModel.from_pretrained(str(folder), add_pooling_layer=False, local_files_only=True)
    except (OSError, ValueError) as error:
        raise TrainingError(f"model.text_init {folder}: not a local BERT model folder ({error})") from None
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def load_text_tower(clip: CTCLIP, folder: Path) -> None:
    """Copy pretrained BERT weights (a local Hugging Face folder, never the Hub) into the text tower."""
    pretrained = load_local_bert(folder)
    ours, theirs = clip.text_transformer.config, pretrained.config
    fields = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    different = {f: (getattr(ours, f), getattr(theirs, f)) for f in fields if getattr(ours, f) != getattr(theirs, f)}
    if different:
        raise TrainingError(
            f"model.text_init {folder} does not fit the BertConfig of model.constructors: {different} (ours, theirs)"
        )
    clip.text_transformer.load_state_dict(pretrained.state_dict(), strict=True)


def read_cluster_size(checkpoint_path: Path) -> Tensor | None:
    """The codebook use counts stored in an official-layout checkpoint (None when absent)."""
    state = as_state_dict(load_torch_file(checkpoint_path, "init checkpoint"), checkpoint_path, "init checkpoint")
    return state.get(CLUSTER_SIZE_KEY, state.get(LIPRO_PREFIX + CLUSTER_SIZE_KEY))
