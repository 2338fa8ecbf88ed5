"""CT-CHAT's conversation side as data and rules (ibrahimethemhamamci/CT-CHAT).

- the conversation templates `llama3` (with CT-CHAT's system prompt and its `<provided>` rule), `vicuna_v1`,
  `mistral_instruct` and `chatml_direct`, rendered as the reference renders them;
- the tokens CT-CHAT adds to the base tokenizer, in its order and spelling: `<pad>` (only when the tokenizer
  has no pad token, as in training), then `<multiple_choice>`, `<long_answer>`, `<short_answe>`,
  `<report_generation>`;
- the prompt is tokenised piece by piece around `<image>` (a leading BOS kept once).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from CTFoundationLib.errors import ChatError

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
    """Add CT-CHAT's tokens as its training did; returns those added, in order
    (their ids follow the base vocabulary)."""
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
