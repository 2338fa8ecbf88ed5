"""CT-CHAT (ibrahimethemhamamci/CT-CHAT): CT-CLIP token grid -> attn-pool projector -> LoRA-tuned chat LLM.

The projected image embeddings (one per projector query: 256 for CT-CHAT) take the place of the `<image>` marker;
decoding streams text, stops on an event and reuses earlier turns' key/value cache. The language model runs through
transformers; templates and tokens are in `templates`, file loading in `loading`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import GenerationConfig, StoppingCriteria, TextStreamer
from transformers.generation.utils import GenerateDecoderOnlyOutput

from CTFoundationLib.errors import ChatError, ContextLengthError
from CTFoundationLib.models.ctchat.loading import (
    apply_lora,
    check_projector_width,
    find_adapter_folder,
    load_llm,
    load_llm_tokenizer,
    resolve_precision,
    set_embedding_tables,
    trainables_file,
)
from CTFoundationLib.models.ctchat.projector import AttnPoolProjector, load_projector, read_state_dict
from CTFoundationLib.models.ctchat.templates import (
    IMAGE_PLACEHOLDER,
    IMAGE_TOKEN_INDEX,
    N_IMAGE_EMBEDDINGS,
    ConversationTemplate,
    get_template,
    tokenize_prompt,
)
from CTFoundationLib.models.devices import select_device

Progress = Callable[[str], None]
# generate()'s key/value cache: `cache` in transformers 5.x (the old name warns on every turn and goes in 6.0),
# `past_key_values` in 4.x
CACHE_ARGUMENT = "cache" if "cache" in GenerateDecoderOnlyOutput.__dataclass_fields__ else "past_key_values"


def embed_with_image(embedding: nn.Module, ids: Sequence[int], image: Tensor | None) -> Tensor:
    """Input embeddings (1, L - 1 + 256, H): text token embeddings with `image` (1, 256, H) at the marker.

    Without an image the prompt must hold no marker: (1, L, H).
    """
    ids_tensor = torch.tensor(ids, dtype=torch.long, device=embedding.weight.device)
    markers = (ids_tensor == IMAGE_TOKEN_INDEX).nonzero().flatten().tolist()
    if len(markers) != (0 if image is None else 1):
        raise ChatError(
            f"the prompt holds {len(markers)} {IMAGE_PLACEHOLDER} placeholders for {0 if image is None else 1} "
            "image; put exactly one in the first question of a conversation about a CT"
        )
    text = embedding(ids_tensor.clamp(min=0))
    if image is None:
        return text[None]
    at = markers[0]
    image = image[0].to(device=text.device, dtype=text.dtype)
    return torch.cat([text[:at], image, text[at + 1:]])[None]


@dataclass(frozen=True)
class GenerationSettings:
    """Decoding options. temperature 0 = greedy (the reference validates with 0); > 0 samples."""

    max_new_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None


@dataclass
class Generation:
    """One generated answer and how it went."""

    text: str
    new_tokens: int
    stopped: bool  # cancelled through the stop event
    hit_limit: bool  # ended at max_new_tokens (or the context end) instead of the stop token
    first_token_s: float | None
    seconds: float

    @property
    def tokens_per_s(self) -> float | None:
        """Decoding speed after the first token (the prefill excluded)."""
        if self.first_token_s is None or self.new_tokens < 2 or self.seconds <= self.first_token_s:
            return None
        return (self.new_tokens - 1) / (self.seconds - self.first_token_s)


class CTChatModel:
    """A loaded CT-CHAT: tokenizer with CT-CHAT's tokens, LLM (LoRA merged), projector, conversation template."""

    def __init__(self, llm: nn.Module, tokenizer, projector: AttnPoolProjector, template: ConversationTemplate,
                 context_length: int | None = None) -> None:
        self.llm, self.tokenizer, self.projector, self.template = llm.eval(), tokenizer, projector.eval(), template
        config_length = getattr(llm.config, "max_position_embeddings", None) or 2048
        self.context_length = min(context_length or config_length, config_length)
        self._stop_ids = stop_token_ids(llm, tokenizer, template.stop)

    @classmethod
    def load(
        cls,
        llm: str | Path,
        lora: str | Path | None = None,
        projector: str | Path | None = None,
        template: str = "llama3",
        device: str = "auto",
        precision: str = "auto",
        context_length: int | None = None,
        progress: Progress | None = None,
    ) -> CTChatModel:
        """Load a CT-CHAT.

        llm: the base LLM, a Hugging Face model folder or a .gguf file. lora: CT-CHAT's adapter folder (any
        name; searched for adapter_config.json); its non_lora_trainables.bin gives the projector and the
        resized embeddings. projector: a weights file to take the projector (and embeddings) from instead.
        precision: auto (bf16/fp16 on GPU, fp32 on CPU), fp32, bf16, fp16, or 8bit / 4bit (bitsandbytes, CUDA).
        """
        progress = progress or (lambda step: None)
        device_ = select_device(device)
        dtype, quantization = resolve_precision(precision, device_)
        adapter = find_adapter_folder(Path(lora)) if lora is not None else None
        weights_file = trainables_file(adapter, projector)
        progress("load tokenizer")
        tokenizer = load_llm_tokenizer(Path(llm))
        progress("load language model")
        model = load_llm(Path(llm), device_, dtype, quantization)
        progress("load CT-CHAT weights")
        set_embedding_tables(model, tokenizer, read_state_dict(weights_file), weights_file)
        if adapter is not None:
            progress("apply LoRA adapter")
            model = apply_lora(model, adapter, Path(llm), merge=quantization is None)
        projector_ = load_projector(weights_file)
        check_projector_width(projector_, model, weights_file)
        embedding = model.get_input_embeddings().weight
        projector_.to(device=embedding.device, dtype=embedding.dtype if quantization is None else dtype)
        return cls(model, tokenizer, projector_, get_template(template), context_length)

    @property
    def embedding(self) -> nn.Module:
        return self.llm.get_input_embeddings()

    @torch.inference_mode()
    def image_embeddings(self, token_grid: Tensor) -> Tensor:
        """CT-CLIP token grid (1, t, h, w, C) -> (1, image_positions, LLM width) in the LLM's dtype."""
        parameter = next(self.projector.parameters())
        out = self.projector(token_grid.to(device=parameter.device, dtype=parameter.dtype))
        return out.to(self.embedding.weight.dtype)

    def prompt_ids(self, prompt: str) -> list[int]:
        return tokenize_prompt(self.tokenizer, prompt)

    @property
    def image_positions(self) -> int:
        """Embeddings one image takes: the projector's query count (256 for CT-CHAT, fewer for a small demo)."""
        return self.projector.config.n_queries

    def sequence_length(self, ids: Sequence[int]) -> int:
        """Positions the prompt takes in the context: each `<image>` marker becomes image_positions embeddings."""
        return len(expand_positions(ids, self.image_positions))

    @torch.inference_mode()
    def generate(
        self,
        prompt: str,
        image: Tensor | None,
        settings: GenerationSettings = GenerationSettings(),
        on_text: Callable[[str], None] | None = None,
        stop_event=None,
        cache: PromptCache | None = None,
    ) -> Generation:
        """Answer the rendered `prompt` (its `<image>` replaced by `image` (1, 256, H)).

        on_text receives the answer's text piece by piece as it is decoded; stop_event (a threading.Event)
        ends decoding early when set; cache (one per conversation) keeps the key/values of the positions
        the next prompt repeats. Raises ContextLengthError when the prompt leaves no room to answer.
        """
        ids = self.prompt_ids(prompt)
        max_new = self.room_for_answer(ids, settings.max_new_tokens)
        positions = expand_positions(ids, self.image_positions)
        embeds = embed_with_image(self.embedding, ids, image)
        streamer = CallbackStreamer(self.tokenizer, on_text)
        stopper = EventStoppingCriteria(stop_event)
        if settings.seed is not None:
            torch.manual_seed(settings.seed)
        output = self.llm.generate(
            inputs_embeds=embeds,
            attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device),
            generation_config=self._generation_config(settings, max_new),
            streamer=streamer,
            stopping_criteria=[stopper],
            **{CACHE_ARGUMENT: cache.reusable(positions) if cache is not None else None},
        )
        new_ids = output.sequences[0, output.sequences.shape[1] - streamer.new_tokens:].tolist()
        if cache is not None:
            cache.store(getattr(output, CACHE_ARGUMENT), positions + new_ids)
        text = self.tokenizer.decode(new_ids, skip_special_tokens=True).strip()
        ended = bool(new_ids) and new_ids[-1] in self._stop_ids
        return Generation(
            text=text.removesuffix(self.template.stop).strip() if self.template.stop else text,
            new_tokens=streamer.new_tokens,
            stopped=stopper.fired,
            hit_limit=not ended and not stopper.fired,
            first_token_s=streamer.first_token_s,
            seconds=time.perf_counter() - streamer.started,
        )

    def room_for_answer(self, ids: Sequence[int], max_new_tokens: int) -> int:
        """max_new_tokens, cut to what the context still holds; ContextLengthError when nothing is left."""
        used = self.sequence_length(ids)
        room = self.context_length - used
        if room < 1:
            raise ContextLengthError(
                f"the conversation needs {used} positions (its text plus {self.image_positions} image embeddings) but "
                f"the model holds {self.context_length}; start a new conversation or ask a shorter question"
            )
        return min(max_new_tokens, room)

    def _generation_config(self, settings: GenerationSettings, max_new: int) -> GenerationConfig:
        sampling = settings.temperature > 0
        return GenerationConfig(
            max_new_tokens=max_new,
            do_sample=sampling,
            temperature=settings.temperature if sampling else None,
            top_p=settings.top_p if sampling else None,
            eos_token_id=sorted(self._stop_ids),
            pad_token_id=self.tokenizer.pad_token_id,
            return_dict_in_generate=True,
        )


def expand_positions(ids: Sequence[int], image_positions: int = N_IMAGE_EMBEDDINGS) -> list[int]:
    """What each context position holds: a token id, or IMAGE_TOKEN_INDEX for each of the image's positions."""
    positions: list[int] = []
    for token in ids:
        positions += [token] * (image_positions if token == IMAGE_TOKEN_INDEX else 1)
    return positions


@dataclass
class PromptCache:
    """Key/value cache of one conversation (one image), reused by its next turn where the positions repeat."""

    positions: list[int] = field(default_factory=list)  # what the cached positions hold (expand_positions)
    kv: Any = None  # the transformers Cache that generate() returned

    def reusable(self, positions: list[int]):
        """The cache cut to the prefix it shares with `positions` (leaving one position to compute), or None."""
        keep = min(common_prefix_length(self.positions, positions), len(positions) - 1)
        if self.kv is None or keep < 1:
            self.clear()
            return None
        surplus = self.kv.get_seq_length() - keep
        if surplus > 0:
            self.kv.crop(-surplus)  # a negative count removes that many positions (transformers 4.x and 5.x)
        self.positions = self.positions[:keep]
        return self.kv

    def store(self, kv, positions: list[int]) -> None:
        """Keep what generate() left: the cache covers `positions` up to its length (the last token is not in it)."""
        self.kv, self.positions = kv, positions[:kv.get_seq_length()]

    def clear(self) -> None:
        self.kv, self.positions = None, []


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def stop_token_ids(llm: nn.Module, tokenizer, stop: str) -> set[int]:
    """Ids that end an answer: the model's and tokenizer's EOS, and the template's stop string as one token."""
    eos = llm.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    encoded = tokenizer(stop, add_special_tokens=False).input_ids if stop else []
    if len(encoded) != 1 and stop:
        raise ChatError(f"the stop text {stop!r} is not one token of this tokenizer; use a template made for this LLM")
    return ids | set(encoded)


class CallbackStreamer(TextStreamer):
    """transformers streamer that hands decoded text pieces to a callback and times the first token."""

    def __init__(self, tokenizer, on_text: Callable[[str], None] | None) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.on_text = on_text
        self.started = time.perf_counter()
        self.first_token_s: float | None = None
        self.new_tokens = 0

    def put(self, value: Tensor) -> None:
        if not self.next_tokens_are_prompt:
            self.new_tokens += value.numel()
            if self.first_token_s is None:
                self.first_token_s = time.perf_counter() - self.started
        super().put(value)

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text and self.on_text is not None:
            self.on_text(text)


class EventStoppingCriteria(StoppingCriteria):
    """Ends generation once the event (threading.Event or anything with is_set()) is set."""

    def __init__(self, event) -> None:
        self.event = event
        self.fired = False

    def __call__(self, input_ids: Tensor, scores: Tensor, **kwargs) -> Tensor:
        self.fired = self.fired or bool(self.event is not None and self.event.is_set())
        return torch.full((input_ids.shape[0],), self.fired, dtype=torch.bool, device=input_ids.device)


# --- loading ------------------------------------------------------------------------------------------
