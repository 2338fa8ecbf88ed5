"""CT-CHAT (ibrahimethemhamamci/CT-CHAT): CT-CLIP token grid -> attn-pool projector -> LoRA-tuned chat LLM.

What is reproduced from the reference, as data and rules:
- the conversation templates `llama3` (with CT-CHAT's system prompt and its `<provided>` rule), `vicuna_v1`,
  `mistral_instruct` and `chatml_direct`, rendered as the reference renders them;
- the tokens CT-CHAT adds to the base tokenizer, in its order and spelling: `<pad>` (only when the tokenizer
  has no pad token, as in training), then `<multiple_choice>`, `<long_answer>`, `<short_answe>`,
  `<report_generation>`;
- the prompt is tokenised piece by piece around `<image>` (a leading BOS kept once), and the 256 projected
  image embeddings take the place of the `<image>` marker;
- the resized `embed_tokens` / `lm_head` and the projector come from `non_lora_trainables.bin`; the LoRA
  adapter (any folder name) is applied with peft and merged.
The language model itself runs through transformers (Hugging Face folders or GGUF files).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import GenerationConfig, StoppingCriteria, TextStreamer

from ..errors import ChatError, CheckpointError, ContextLengthError, DependencyError
from .ctchat_projector import AttnPoolProjector, llm_embedding_weights, load_projector, read_state_dict

IMAGE_PLACEHOLDER = "<image>"
PROVIDED_TOKEN = "<provided>"
IMAGE_TOKEN_INDEX = -200  # stands for `<image>` in token id lists; never embedded
N_IMAGE_EMBEDDINGS = 256
PAD_TOKEN = "<pad>"
TASK_TOKENS = ("<multiple_choice>", "<long_answer>", "<short_answe>", "<report_generation>")
# What the reference demo appends to a question for each answer type ("free" is its "Vanilla"). The demo
# writes "<short_answer>", which is not the added token "<short_answe>": it is tokenised as plain text.
ANSWER_SUFFIXES = {
    "free": "",
    "short": " <short_answer>",
    "long": " <long_answer>",
    "multiple_choice": " <multiple_choice>",
    "report": " <report_generation>",
}
NON_LORA_FILE = "non_lora_trainables.bin"
PRECISIONS = ("auto", "fp32", "bf16", "fp16", "8bit", "4bit")
Progress = Callable[[str], None]

LLAMA3_SYSTEM_PROMPT = (
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
    ". You are CT-CHAT, an AI assistant specializing in Chest CT imaging, dedicated to providing "
    "accurate and relevant information exclusively related to Chest CT scans and associated medical "
    "topics. You are equipped to answer questions and offer detailed analyses only when the CT "
    "volume/scan/image is provided, indicated by the <provided> token. If this token is not present and "
    "users inquire about specific findings, pathologies, or request descriptions related to a Chest CT, "
    "respond by requesting the necessary data with the phrase: “Please provide the CT volume.” Once the "
    "<provided> token is present in the question, you are authorized to address questions about "
    "pathologies, anatomical or clinical findings, diagnostic descriptions, report generation, "
    "comparisons, or any other questions regarding the image. If it does not appear in the question, "
    "even when special tokens <multiple_choice>, <report_generation>, <long_answer>, and <short_answer> "
    "are given, ignore the question and ask for the CT volume. Always look for the <provided> token, "
    "even if there are special tokens. If there is a <provided> token in any question (including new and "
    "previous ones), never ask for the CT volume again and answer the question. You can ignore the "
    "<provided> token check and answer the question directly if and only if the question is about "
    "general medical knowledge, not about the provided CT volume (such as typical findings on a Chest CT "
    "or management of the patient). For example, “What are the typical imaging findings of acute "
    "respiratory distress syndrome (ARDS) on a chest CT?” is a general question not specific. If user "
    "asks a CT specific question after non-spesific question, look for the <provided> token as well even "
    "if the special tokens are given. It is crucial to avoid discussing topics outside of Chest CT "
    "imaging and directly related medical information, ensuring that all responses are clear, concise, "
    "and focused on the provided Chest CT data for the highest level of accuracy and relevance. If the "
    "user greets you with something like “hello,” respond appropriately."
)


@dataclass(frozen=True)
class ConversationTemplate:
    """One of the reference's conversation formats.

    style: "headers" (role + text + sep, the reference's MPT style), "colon" ("ROLE: text" with sep after
    user turns and sep2 after answers, its TWO style) or "inst" ("[INST] ... [/INST] answer sep2", LLAMA_2).
    """

    name: str
    system: str
    roles: tuple[str, str]
    style: str
    sep: str
    sep2: str = ""

    @property
    def stop(self) -> str:
        """The text that ends an answer (the reference's stop string)."""
        return self.sep if self.style == "headers" else self.sep2

    def render(self, turns: Sequence[tuple[str, str | None]]) -> str:
        """Prompt text of [(user text, answer or None), ...]; a None answer leaves the assistant turn open."""
        render = {"headers": self._headers, "colon": self._colon, "inst": self._inst}[self.style]
        return render(turns)

    def _headers(self, turns: Sequence[tuple[str, str | None]]) -> str:
        user, assistant = self.roles
        text = self.system + self.sep
        for question, answer in turns:
            text += user + question + self.sep + assistant + ("" if answer is None else answer + self.sep)
        return text

    def _colon(self, turns: Sequence[tuple[str, str | None]]) -> str:
        user, assistant = self.roles
        text = self.system + self.sep
        for question, answer in turns:
            text += f"{user}: {question}{self.sep}"
            text += f"{assistant}:" if answer is None else f"{assistant}: {answer}{self.sep2}"
        return text

    def _inst(self, turns: Sequence[tuple[str, str | None]]) -> str:
        text = ""
        for index, (question, answer) in enumerate(turns):
            if index == 0 and self.system:
                question = f"<<SYS>>\n{self.system}\n<</SYS>>\n\n{question}"
            text += f"{self.sep}[INST] {question} [/INST]"
            text += "" if answer is None else f" {answer} {self.sep2}"
        return text.removeprefix(self.sep)


TEMPLATES = {
    template.name: template
    for template in (
        ConversationTemplate(
            "llama3", LLAMA3_SYSTEM_PROMPT,
            ("<|start_header_id|>user<|end_header_id|>\n\n", "<|start_header_id|>assistant<|end_header_id|>\n\n"),
            "headers", "<|eot_id|>",
        ),
        ConversationTemplate(
            "vicuna_v1",
            "A chat between a curious user and an artificial intelligence assistant. "
            "The assistant gives helpful, detailed, and polite answers to the user's questions.",
            ("USER", "ASSISTANT"), "colon", " ", "</s>",
        ),
        ConversationTemplate("mistral_instruct", "", ("USER", "ASSISTANT"), "inst", "", "</s>"),
        ConversationTemplate(
            "chatml_direct", "<|im_start|>system\nAnswer the questions.",
            ("<|im_start|>user\n", "<|im_start|>assistant\n"), "headers", "<|im_end|>",
        ),
    )
}


def get_template(name: str) -> ConversationTemplate:
    if name not in TEMPLATES:
        raise ChatError(f"unknown conversation template {name!r}; use one of {sorted(TEMPLATES)}")
    return TEMPLATES[name]


def user_message(question: str, answer_type: str, first_with_image: bool) -> str:
    """A question as CT-CHAT's demo sends it: `<image>\\n<provided>` on the first turn with a CT, answer-type token."""
    if answer_type not in ANSWER_SUFFIXES:
        raise ChatError(f"unknown answer type {answer_type!r}; use one of {sorted(ANSWER_SUFFIXES)}")
    prefix = f"{IMAGE_PLACEHOLDER}\n{PROVIDED_TOKEN}" if first_with_image else ""
    return prefix + question.strip() + ANSWER_SUFFIXES[answer_type]


def add_ctchat_tokens(tokenizer) -> list[str]:
    """Add CT-CHAT's tokens as its training did; returns those added, in order (their ids follow the base vocabulary)."""
    added = []
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
        added.append(PAD_TOKEN)
    for token in TASK_TOKENS:
        tokenizer.add_tokens(token, special_tokens=True)
        added.append(token)
    return added


def tokenize_prompt(tokenizer, prompt: str) -> list[int]:
    """Token ids with IMAGE_TOKEN_INDEX where `<image>` stands.

    Each piece between placeholders is tokenised on its own; when the tokenizer starts pieces with BOS, only
    the first piece keeps it (the reference's tokenizer_image_token).
    """
    pieces = [tokenizer(piece).input_ids for piece in prompt.split(IMAGE_PLACEHOLDER)]
    bos = tokenizer.bos_token_id
    skip = 1 if bos is not None and pieces[0][:1] == [bos] else 0
    ids = list(pieces[0])
    for piece in pieces[1:]:
        ids += [IMAGE_TOKEN_INDEX, *piece[skip:]]
    return ids


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
        require_chat_packages(Path(llm), lora is not None)
        from ..detection import select_device

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
        """CT-CLIP token grid (1, t, h, w, C) -> (1, 256, LLM width) in the LLM's dtype."""
        parameter = next(self.projector.parameters())
        out = self.projector(token_grid.to(device=parameter.device, dtype=parameter.dtype))
        return out.to(self.embedding.weight.dtype)

    def prompt_ids(self, prompt: str) -> list[int]:
        return tokenize_prompt(self.tokenizer, prompt)

    @staticmethod
    def sequence_length(ids: Sequence[int]) -> int:
        """Positions the prompt takes in the context: each `<image>` marker becomes 256 embeddings."""
        return len(expand_positions(ids))

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
        positions = expand_positions(ids)
        embeds = embed_with_image(self.embedding, ids, image)
        streamer = CallbackStreamer(self.tokenizer, on_text)
        stopper = EventStoppingCriteria(stop_event)
        if settings.seed is not None:
            torch.manual_seed(settings.seed)
        output = self.llm.generate(
            inputs_embeds=embeds,
            attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device),
            past_key_values=cache.reusable(positions) if cache is not None else None,
            generation_config=self._generation_config(settings, max_new),
            streamer=streamer,
            stopping_criteria=[stopper],
        )
        new_ids = output.sequences[0, output.sequences.shape[1] - streamer.new_tokens:].tolist()
        if cache is not None:
            cache.store(output.past_key_values, positions + new_ids)
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
                f"the conversation needs {used} positions (its text plus {N_IMAGE_EMBEDDINGS} image embeddings) but "
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


def expand_positions(ids: Sequence[int]) -> list[int]:
    """What each context position holds: a token id, or IMAGE_TOKEN_INDEX for each of the 256 image positions."""
    positions: list[int] = []
    for token in ids:
        positions += [token] * (N_IMAGE_EMBEDDINGS if token == IMAGE_TOKEN_INDEX else 1)
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


def resolve_precision(precision: str, device: torch.device) -> tuple[torch.dtype, str | None]:
    """(compute dtype, None | '8bit' | '4bit') for a precision name on a device."""
    if precision not in PRECISIONS:
        raise ChatError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    on_gpu = device.type == "cuda"
    if precision in ("8bit", "4bit") and not on_gpu:
        raise ChatError(f"{precision} weights need a CUDA GPU (bitsandbytes); on CPU use fp32 or bf16")
    if precision == "fp16" and not on_gpu:
        raise ChatError("fp16 needs a GPU; on CPU use fp32 (or bf16 to halve the memory)")
    gpu_half = torch.bfloat16 if on_gpu and torch.cuda.is_bf16_supported() else torch.float16
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision == "auto":
        return (gpu_half if on_gpu else torch.float32), None
    return dtypes.get(precision, gpu_half), (precision if precision.endswith("bit") else None)


def llm_source(path: Path) -> tuple[Path, dict]:
    """(folder, extra from_pretrained arguments) for a Hugging Face model folder or a .gguf file."""
    if path.is_file() and path.suffix == ".gguf":
        return path.parent, {"gguf_file": path.name}
    if path.is_dir() and (path / "config.json").is_file():
        return path, {}
    raise CheckpointError(
        f"base LLM {path}: not a Hugging Face model folder (config.json and weights) nor a .gguf file. "
        "Give the folder of the base model CT-CHAT was trained on, e.g. Meta-Llama-3.1-8B-Instruct."
    )


def require_chat_packages(llm: Path, with_lora: bool) -> None:
    """A DependencyError naming what `pip install 'ctfoundation[chat]'` would add, before any loading."""
    from ..dependencies import missing_requirements

    wanted = ["transformers>=4.56", "accelerate>=0.26", *(["peft>=0.13"] if with_lora else []),
              *(["gguf>=0.10"] if llm.suffix.lower() == ".gguf" else [])]
    missing = missing_requirements(wanted)
    if missing:
        raise DependencyError(f"CT-CHAT needs {', '.join(missing)}: pip install 'ctfoundation[chat]'")


def load_llm_tokenizer(path: Path):
    from transformers import AutoTokenizer

    folder, extra = llm_source(path)
    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True, **extra)
    except (OSError, ValueError, KeyError, ImportError) as error:
        raise CheckpointError(f"tokenizer of the base LLM {path} cannot be loaded ({first_line(error)})") from None


def load_llm(path: Path, device: torch.device, dtype: torch.dtype, quantization: str | None) -> nn.Module:
    """The base causal LM on `device` in `dtype` (or quantized with bitsandbytes, spread over the GPUs)."""
    from transformers import AutoModelForCausalLM

    folder, extra = llm_source(path)
    if quantization is not None:
        extra.update(quantization_config=bitsandbytes_config(quantization, dtype), device_map="auto")
    elif device.type == "cuda":
        extra.update(device_map="auto" if device.index is None else {"": device.index})
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True, **extra)
    except (OSError, ValueError, KeyError, RuntimeError, ImportError) as error:
        raise CheckpointError(f"base LLM {path} cannot be loaded ({first_line(error)})") from None
    return model if device.type == "cuda" else model.to(device)


def bitsandbytes_config(quantization: str, dtype: torch.dtype):
    """4-bit NF4 with double quantization (as the reference loads), or 8-bit."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise DependencyError(f"{quantization} weights need bitsandbytes: pip install 'bitsandbytes>=0.43'") from None
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=dtype, bnb_4bit_use_double_quant=True,
                              bnb_4bit_quant_type="nf4")


def find_adapter_folder(folder: Path) -> Path:
    """The folder holding adapter_config.json: `folder` itself or the single one below it (any name)."""
    if (folder / "adapter_config.json").is_file():
        return folder
    found = sorted(p.parent for p in folder.rglob("adapter_config.json")) if folder.is_dir() else []
    if len(found) == 1:
        return found[0]
    where = "no such folder" if not folder.is_dir() else f"{len(found)} adapter_config.json files below it"
    raise CheckpointError(
        f"CT-CHAT LoRA folder {folder}: {where}. Give the folder with adapter_config.json, adapter_model.* "
        f"and {NON_LORA_FILE} (`ctfoundation weights download ct-chat-llama3.1-8b`)."
    )


def trainables_file(adapter: Path | None, projector: str | Path | None) -> Path:
    """The file the projector and resized embeddings come from: --projector, else the adapter's non_lora_trainables.bin."""
    if projector is not None:
        return Path(projector)
    if adapter is None:
        raise CheckpointError(f"CT-CHAT needs its projector: give the LoRA folder (with {NON_LORA_FILE}) or a projector file")
    path = adapter / NON_LORA_FILE
    if not path.is_file():
        raise CheckpointError(
            f"CT-CHAT LoRA folder {adapter} has no {NON_LORA_FILE} (it holds the projector and the resized "
            "embeddings). Download the complete folder again, or give the file with --projector."
        )
    return path


def set_embedding_tables(model: nn.Module, tokenizer, state: dict[str, Tensor], source: Path) -> None:
    """Add CT-CHAT's tokens, resize the LLM's tables, and fill them from `state` (mean rows when it has none)."""
    base_rows = len(tokenizer)
    added = add_ctchat_tokens(tokenizer)
    tables = llm_embedding_weights(state)
    for name, table in tables.items():
        if table.shape[0] != len(tokenizer):
            raise CheckpointError(
                f"{source}: its {name} has {table.shape[0]} rows, but the base LLM's tokenizer has {base_rows} "
                f"tokens + CT-CHAT's {len(added)} = {len(tokenizer)}. The base LLM is not the one this CT-CHAT "
                "was trained on; use the matching base model."
            )
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    embedding, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    with torch.no_grad():
        if "embed_tokens" not in tables:
            embedding[base_rows:] = embedding[:base_rows].mean(0)
            head[base_rows:] = head[:base_rows].mean(0)
            return
        check_table_width(tables["embed_tokens"], embedding, source)
        embedding.copy_(tables["embed_tokens"])
        if "lm_head" in tables and not torch.equal(tables["lm_head"], tables["embed_tokens"]):
            check_table_width(tables["lm_head"], head, source)
            untie_output_embeddings(model)
            model.get_output_embeddings().weight.copy_(tables["lm_head"])


def check_table_width(table: Tensor, weight: Tensor, source: Path) -> None:
    if table.shape[1] != weight.shape[1]:
        raise CheckpointError(
            f"{source}: embeddings {table.shape[1]} wide, the base LLM is {weight.shape[1]} wide; "
            "this CT-CHAT belongs to another base LLM"
        )


def untie_output_embeddings(model: nn.Module) -> None:
    """Give lm_head its own weight when it shares the input embedding's (CT-CHAT trains both separately)."""
    head = model.get_output_embeddings()
    if head.weight is model.get_input_embeddings().weight:
        head.weight = nn.Parameter(head.weight.detach().clone())
        model.config.tie_word_embeddings = False


def apply_lora(model: nn.Module, adapter: Path, llm: Path, merge: bool) -> nn.Module:
    """CT-CHAT's LoRA through peft; merged into the weights unless the base is quantized."""
    from peft import PeftModel

    try:
        model = PeftModel.from_pretrained(model, adapter, is_trainable=False)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise CheckpointError(
            f"LoRA adapter {adapter} does not fit the base LLM {llm} ({first_line(error)}). It was trained on "
            f"{adapter_base_name(adapter)}; give that model with --llm."
        ) from None
    return model.merge_and_unload() if merge else model


def adapter_base_name(adapter: Path) -> str:
    try:
        return json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path") or "?"
    except (OSError, ValueError):
        return "?"


def check_projector_width(projector: AttnPoolProjector, model: nn.Module, source: Path) -> None:
    width = model.get_input_embeddings().weight.shape[1]
    if projector.config.llm_hidden_size != width:
        raise CheckpointError(
            f"projector in {source} outputs {projector.config.llm_hidden_size}-wide embeddings but the base LLM is "
            f"{width} wide; it belongs to another base LLM"
        )


def first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:300]}" if text else type(error).__name__
