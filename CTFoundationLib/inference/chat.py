"""Conversations with CT-CHAT about one CT: sessions, streaming, stop, image cache, grounding hook.

    runtime = ChatRuntime.from_registry("ct-chat-llama3.1-8b")      # or CTChatModel.load(...) + CTCLIPRuntime
    session = runtime.session(volume)                                # the CT is encoded once (cached on disk)
    answer = session.ask("Is there a pleural effusion?", "short", on_token=print, stop_event=event)
    answer.sentences, answer.anatomy_paths                           # each sentence grounded to anatomy
    report = session.generate_report()

`ask` runs in the caller's thread and hands text pieces to `on_token` as they are decoded; a GUI runs it
in a worker thread and sets `stop_event` (a threading.Event) to stop. Each answer's sentences are grounded
to RadGenome anatomy paths with grounding.SentenceGrounder (the built-in lexicon unless another is given).
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from CTFoundationLib.anatomy.sentences import GroundedSentence, SentenceGrounder, default_grounder
from CTFoundationLib.dependencies import missing_requirements
from CTFoundationLib.errors import ChatError, DependencyError, WeightsError
from CTFoundationLib.inference.common import cached_tensor, default_cache_dir
from CTFoundationLib.inference.ctclip import CTCLIPRuntime
from CTFoundationLib.io.files import atomic_path
from CTFoundationLib.io.volume import CTVolume
from CTFoundationLib.models.ctchat.modeling import CTChatModel, GenerationSettings, Progress, PromptCache
from CTFoundationLib.models.ctchat.templates import ANSWER_SUFFIXES, user_message
from CTFoundationLib.weights import load_registry, resolve_weights

ANSWER_TYPES = tuple(ANSWER_SUFFIXES)
DEFAULT_CHAT_MODEL = "ct-chat-llama3.1-8b"
DEMO_CHAT_MODEL = "ct-chat-demo"  # built on this machine (`python -m training.demo build --model ct-chat-demo`)
REPORT_REQUEST = "Generate the radiology report for this chest CT volume."
TokenCallback = Callable[[str], None]


@dataclass
class ChatTurn:
    """One question and its answer, as kept in the session's history."""

    question: str
    answer_type: str
    user_text: str  # the question as sent to the model (placeholders and answer-type token included)
    answer: str
    stopped: bool


@dataclass
class ChatAnswer:
    """An answer with its timing and its sentences grounded to anatomy."""

    text: str
    answer_type: str
    stopped: bool
    hit_limit: bool
    new_tokens: int
    first_token_s: float | None
    seconds: float
    tokens_per_s: float | None
    sentences: list[GroundedSentence] = field(default_factory=list)

    @property
    def anatomy_paths(self) -> list[str]:
        """The RadGenome anatomy paths the answer talks about, in order of first mention (negated ones included)."""
        return list(dict.fromkeys(sentence.path for sentence in self.sentences if sentence.path))

    def to_dict(self) -> dict:
        return asdict(self)


class ChatSession:
    """A multi-turn conversation about one CT (or none: general questions only).

    image: the projected image embeddings (1, 256, H), computed once for the session.
    """

    def __init__(self, model: CTChatModel, image: torch.Tensor | None, grounder: SentenceGrounder | None = None,
                 settings: GenerationSettings = GenerationSettings(), source: str = "") -> None:
        self.model, self.image, self.settings, self.source = model, image, settings, source
        self.grounder = grounder or default_grounder()
        self.turns: list[ChatTurn] = []
        self._cache = PromptCache()  # earlier turns' key/values: a follow-up question computes only what is new
        self._busy = threading.Lock()

    def prompt(self, question: str, answer_type: str = "free") -> str:
        """The full prompt text the next `ask` would send (history included)."""
        return self.model.template.render([*self._history(), (self._user_text(question, answer_type), None)])

    def ask(self, question: str, answer_type: str = "free", on_token: TokenCallback | None = None,
            stop_event: threading.Event | None = None, settings: GenerationSettings | None = None) -> ChatAnswer:
        """Answer a question about the CT; answer_type is one of ANSWER_TYPES ('free' adds no task token).

        on_token gets the answer text piece by piece; setting stop_event ends it early (the partial answer
        is kept in the history, marked stopped). ContextLengthError when the conversation is too long.
        """
        if not question.strip():
            raise ChatError("the question is empty; type a question")
        if not self._busy.acquire(blocking=False):
            raise ChatError("this chat session is still answering; wait for the answer or stop it first")
        try:
            user_text = self._user_text(question, answer_type)
            prompt = self.model.template.render([*self._history(), (user_text, None)])
            result = self.model.generate(prompt, self.image, settings or self.settings, on_token, stop_event,
                                         self._cache)
            self.turns.append(ChatTurn(question, answer_type, user_text, result.text, result.stopped))
        finally:
            self._busy.release()
        return ChatAnswer(
            text=result.text, answer_type=answer_type, stopped=result.stopped, hit_limit=result.hit_limit,
            new_tokens=result.new_tokens, first_token_s=result.first_token_s, seconds=result.seconds,
            tokens_per_s=result.tokens_per_s, sentences=self.ground(result.text),
        )

    def generate_report(self, on_token: TokenCallback | None = None, stop_event: threading.Event | None = None,
                        request: str = REPORT_REQUEST) -> ChatAnswer:
        """A radiology report of the CT (the report-generation task), as one more turn of the conversation."""
        if self.image is None:
            raise ChatError("a report needs a CT: start the session with a volume")
        return self.ask(request, "report", on_token, stop_event)

    def ground(self, text: str) -> list[GroundedSentence]:
        """The answer's sentences, each with the anatomy it talks about."""
        return self.grounder.ground_report(text)

    def reset(self) -> None:
        """Forget the conversation (the CT stays encoded)."""
        self.turns.clear()
        self._cache.clear()

    def transcript(self) -> list[dict]:
        """The conversation as plain data (for saving with a scene or printing)."""
        return [asdict(turn) for turn in self.turns]

    def _history(self) -> list[tuple[str, str]]:
        return [(turn.user_text, turn.answer) for turn in self.turns]

    def _user_text(self, question: str, answer_type: str) -> str:
        return user_message(question, answer_type, first_with_image=self.image is not None and not self.turns)


# --- the CT side: token grid once per volume, cached on disk -----------------------------------------------


def volume_sha256(volume: CTVolume) -> str:
    """Hash of a volume's voxels (values, shape, dtype) and geometry; the same CT read twice hashes the same."""
    digest = hashlib.sha256()
    voxels = np.ascontiguousarray(volume.hu)
    digest.update(f"{voxels.dtype.str}|{voxels.shape}|".encode())
    digest.update(np.ascontiguousarray(volume.affine_ras, dtype=np.float64).tobytes())
    digest.update(memoryview(voxels).cast("B"))
    return digest.hexdigest()


def cached_token_grid(encoder: CTCLIPRuntime, volume: CTVolume, cache_dir: Path) -> torch.Tensor:
    """CT-CLIP token grid (1, 24, 24, 24, C) of a volume, from `cache_dir` when this volume was encoded before.

    Keyed by the volume hash and the CT-CLIP checkpoint's sha256.
    """
    path = cache_dir / "ctchat_tokens" / f"{volume_sha256(volume)[:32]}-{encoder.checkpoint_sha256[:16]}.safetensors"
    tokens = cached_tensor(path, "token_grid")
    if tokens is not None:
        return tokens
    _, tokens = encoder.encode_volume(volume, return_tokens=True)
    with atomic_path(path) as temporary:
        save_file({"token_grid": tokens.contiguous()}, temporary)
    return tokens


class ChatRuntime:
    """CT-CHAT with its CT-CLIP image encoder: makes sessions about CT volumes; keeps both models loaded."""

    def __init__(self, model: CTChatModel, encoder: CTCLIPRuntime, cache_dir: Path | None = None,
                 progress: Progress | None = None, cache_tokens: bool = True) -> None:
        """cache_tokens: keep each CT's token grid on disk (interactive chat); False for one pass per CT (batch)."""
        self.model, self.encoder, self.cache_tokens = model, encoder, cache_tokens
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.progress = progress or (lambda step: None)
        self.model_id: str | None = None
        self.notice: str | None = None  # the registry's notice of the model (a demo's), for the caller to show

    @classmethod
    def from_registry(
        cls,
        model_id: str = DEFAULT_CHAT_MODEL,
        *,
        ctclip: Path | str | None = None,
        ctclip_config: Path | str | None = None,
        device: str = "auto",
        home: Path | str | None = None,
        progress: Progress | None = None,
        **model_options,
    ) -> ChatRuntime:
        """Load a registered CT-CHAT and its CT-CLIP from the weights cache (ctclip / ctclip_config: a local
        checkpoint and its constructor JSON instead).

        model_options: load_chat_model's (llm, lora, use_lora, projector, template, precision). The default
        model falls back to the demo CT-CHAT when only that one is installed (`available_chat_model`).
        """
        if model_options.get("llm") is None and model_options.get("lora") is None:
            model_id = available_chat_model(model_id, home)
        encoder = CTCLIPRuntime.from_registry(chat_dependency(model_id, "ct-clip"), weights=ctclip,
                                              model_config=ctclip_config, with_text=False, device=device, home=home,
                                              progress=progress)  # first: it loads in seconds, the LLM in minutes
        model = load_chat_model(model_id, device=device, home=home, progress=progress, **model_options)
        runtime = cls(model, encoder, progress=progress)
        runtime.model_id, runtime.notice = model_id, load_registry().get(model_id).runtime.notice
        return runtime

    def image_embeddings(self, volume: CTVolume) -> torch.Tensor:
        """(1, 256, H) embeddings of a CT: CT-CLIP token grid (cached on disk) through the projector."""
        self.progress("encode CT")
        if self.cache_tokens:
            tokens = cached_token_grid(self.encoder, volume, self.cache_dir)
        else:
            tokens = self.encoder.encode_volume(volume, return_tokens=True)[1]
        return self.model.image_embeddings(tokens)

    def session(self, volume: CTVolume | None, grounder: SentenceGrounder | None = None,
                settings: GenerationSettings = GenerationSettings()) -> ChatSession:
        """A new conversation about `volume` (None: general questions, no CT)."""
        image = self.image_embeddings(volume) if volume is not None else None
        return ChatSession(self.model, image, grounder, settings, volume.source if volume is not None else "")


def load_chat_model(
    model_id: str = DEFAULT_CHAT_MODEL,
    *,
    llm: Path | None = None,
    lora: Path | None = None,
    use_lora: bool = True,
    projector: Path | None = None,
    template: str | None = None,
    device: str = "auto",
    precision: str = "auto",
    home: Path | None = None,
    progress: Progress | None = None,
) -> CTChatModel:
    """A registered CT-CHAT's language side; llm / lora / projector point at local files instead of the cache.

    use_lora=False runs the base LLM with the projector file only (e.g. a stage-1 mm_projector.bin).
    """
    base = resolve_weights(chat_dependency(model_id, "llm"), llm, home=home)
    adapter = resolve_weights(model_id, lora, home=home) if use_lora else None
    require_chat_packages(base, adapter is not None)
    template = template or load_registry().get(model_id).runtime.template or "llama3"
    return CTChatModel.load(base, adapter, projector, template, device=device, precision=precision,
                            progress=progress)


def available_chat_model(model_id: str, home: Path | str | None = None) -> str:
    """`model_id`, or the demo CT-CHAT when `model_id` is the default official model, which is not installed, and
    the demo is: a fresh machine can chat with what `make demo`-style builds installed."""
    from CTFoundationLib.weights.manage import INSTALLED, model_status

    if model_id != DEFAULT_CHAT_MODEL:
        return model_id
    registry = load_registry()
    if model_status(registry.get(model_id), home).state == INSTALLED or DEMO_CHAT_MODEL not in registry.models:
        return model_id
    demo = registry.get(DEMO_CHAT_MODEL)
    return DEMO_CHAT_MODEL if model_status(demo, home).state == INSTALLED else model_id


def chat_dependency(model_id: str, family: str) -> str:
    """The registry id of a CT-CHAT's base LLM (family "llm") or image encoder ("ct-clip")."""
    registry = load_registry()
    spec = registry.get(model_id)
    if spec.family != "ct-chat":
        raise WeightsError(f"{model_id} is not a CT-CHAT model; use one of {registry.ids('ct-chat')}")
    return next(dep for dep in spec.depends_on if registry.get(dep).family == family)


def require_chat_packages(llm: Path, with_lora: bool) -> None:
    """A DependencyError naming what `pip install 'ctfoundation[chat]'` would add, before any loading."""
    wanted = ["transformers>=4.56", "accelerate>=0.26", *(["peft>=0.13"] if with_lora else []),
              *(["gguf>=0.10"] if llm.suffix.lower() == ".gguf" else [])]
    missing = missing_requirements(wanted)
    if missing:
        raise DependencyError(f"CT-CHAT needs {', '.join(missing)}: pip install 'ctfoundation[chat]'")
