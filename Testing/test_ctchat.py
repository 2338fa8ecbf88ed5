"""CT-CHAT runtime on a tiny random Llama with SmolLM2's real tokenizer: templates, tokens, image splice,
LoRA + non_lora_trainables.bin loading, greedy decoding, stop, context guard and loading errors."""

from __future__ import annotations

import hashlib
import html
import json
import threading
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from small_chat_models import TINY_HIDDEN, make_ctchat_adapter, make_tiny_llm, smollm2_tokenizer_folder, with_bos
from small_models import bert_vocab, make_small_ctclip
from transformers import AutoTokenizer

from CTFoundationLib import dependencies
from CTFoundationLib.cli import main
from CTFoundationLib.errors import ChatError, CheckpointError, ContextLengthError, DependencyError
from CTFoundationLib.inference.chat import ChatRuntime, load_chat_model
from CTFoundationLib.inference.ctclip import CTCLIPRuntime, read_ctclip_config
from CTFoundationLib.io.reading import read_ct
from CTFoundationLib.models.ctchat.modeling import (
    CTChatModel,
    GenerationSettings,
    PromptCache,
    embed_with_image,
    expand_positions,
)
from CTFoundationLib.models.ctchat.templates import (
    IMAGE_TOKEN_INDEX,
    LLAMA3_SYSTEM_PROMPT,
    TEMPLATES,
    add_ctchat_tokens,
    tokenize_prompt,
    user_message,
)

RICORD_3MM = "ricord1a_419639-000082_chest_noncontrast/ct_3mm_iso.nii.gz"
TURNS = [("<image>\n<provided>Is there an effusion? <short_answer>", "No."), ("Where? <long_answer>", None)]
USER3, ASSISTANT3 = "<|start_header_id|>user<|end_header_id|>\n\n", "<|start_header_id|>assistant<|end_header_id|>\n\n"
# sha256 of the reference's llama3 system prompt (llava/conversation.py, conv_llama3.system), 2140 characters.
LLAMA3_SYSTEM_SHA256 = "0933abea48062d9706e8c3669382b6215047526ba27c7bd04d259d8e9fa23edf"


@pytest.fixture(scope="module")
def tokenizer_folder(tmp_path_factory) -> Path:
    return smollm2_tokenizer_folder(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def tiny_llm(tokenizer_folder, tmp_path_factory) -> Path:
    return make_tiny_llm(tmp_path_factory.mktemp("tiny-llm"), tokenizer_folder)


@pytest.fixture(scope="module")
def adapter(tiny_llm, tmp_path_factory) -> tuple[Path, dict]:
    """A CT-CHAT-style release: the adapter sits one level down in a folder whose name has no 'lora'."""
    root = tmp_path_factory.mktemp("ct_chat_release")
    folder = root / "llama_3.1_8b"
    folder.mkdir()
    return root, make_ctchat_adapter(folder, tiny_llm)


@pytest.fixture(scope="module")
def model(tiny_llm, adapter) -> CTChatModel:
    return CTChatModel.load(tiny_llm, adapter[0], template="chatml_direct", device="cpu")


def test_llama3_template_and_system_prompt_are_the_reference_ones():
    assert hashlib.sha256(LLAMA3_SYSTEM_PROMPT.encode()).hexdigest() == LLAMA3_SYSTEM_SHA256
    expected = (
        LLAMA3_SYSTEM_PROMPT + "<|eot_id|>"
        + USER3 + "<image>\n<provided>Is there an effusion? <short_answer><|eot_id|>" + ASSISTANT3 + "No.<|eot_id|>"
        + USER3 + "Where? <long_answer><|eot_id|>" + ASSISTANT3
    )
    assert TEMPLATES["llama3"].render(TURNS) == expected
    assert TEMPLATES["llama3"].stop == "<|eot_id|>"


def test_vicuna_mistral_and_chatml_templates_render_as_the_reference():
    vicuna_system = (
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions."
    )
    assert TEMPLATES["vicuna_v1"].render(TURNS) == (
        vicuna_system + " USER: <image>\n<provided>Is there an effusion? <short_answer> ASSISTANT: No.</s>"
        "USER: Where? <long_answer> ASSISTANT:"
    )
    assert TEMPLATES["mistral_instruct"].render(TURNS) == (
        "[INST] <image>\n<provided>Is there an effusion? <short_answer> [/INST] No. </s>"
        "[INST] Where? <long_answer> [/INST]"
    )
    assert TEMPLATES["chatml_direct"].render(TURNS) == (
        "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\n<provided>Is there an effusion? "
        "<short_answer><|im_end|><|im_start|>assistant\nNo.<|im_end|><|im_start|>user\nWhere? <long_answer><|im_end|>"
        "<|im_start|>assistant\n"
    )
    assert ([TEMPLATES[n].stop for n in ("vicuna_v1", "mistral_instruct", "chatml_direct")]
            == ["</s>", "</s>", "<|im_end|>"])


def test_user_message_marks_the_first_question_about_a_ct():
    assert user_message("  Is there an effusion? ", "short", True) == (
        "<image>\n<provided>Is there an effusion? <short_answer>"
    )
    assert user_message("Where?", "long", False) == "Where? <long_answer>"
    assert user_message("Report.", "report", False) == "Report. <report_generation>"
    assert user_message("Which?", "multiple_choice", False) == "Which? <multiple_choice>"
    assert user_message("Hello", "free", False) == "Hello"
    with pytest.raises(ChatError, match="unknown answer type"):
        user_message("Hello", "essay", False)


def test_added_tokens_follow_the_base_vocabulary_in_the_reference_order(tokenizer_folder):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    base = len(tokenizer)
    names = ["<pad>", "<multiple_choice>", "<long_answer>", "<short_answe>", "<report_generation>"]
    assert add_ctchat_tokens(tokenizer) == names
    assert tokenizer.convert_tokens_to_ids(names) == list(range(base, base + 5))
    assert tokenizer.pad_token == "<pad>" and tokenizer.pad_token_id == base
    assert tokenizer("<short_answe>", add_special_tokens=False).input_ids == [base + 3]
    assert len(tokenizer("<short_answer>", add_special_tokens=False).input_ids) > 1  # the demo's text, not the token
    fresh = AutoTokenizer.from_pretrained(tokenizer_folder, pad_token="<|im_end|>")  # has a pad: no <pad> added
    assert add_ctchat_tokens(fresh) == names[1:]


def test_prompt_tokens_keep_one_bos_and_mark_the_image(tokenizer_folder):
    tokenizer = with_bos(AutoTokenizer.from_pretrained(tokenizer_folder))
    bos = tokenizer.bos_token_id
    plain = AutoTokenizer.from_pretrained(tokenizer_folder)
    before, after = "System text. USER: ", "\n<provided>Is the heart enlarged?"
    ids = tokenize_prompt(tokenizer, before + "<image>" + after)
    expected = [bos, *plain(before).input_ids, IMAGE_TOKEN_INDEX, *plain(after).input_ids]
    assert ids == expected
    assert tokenize_prompt(plain, before + "<image>" + after) == expected[1:]


def test_image_embeddings_take_the_place_of_the_placeholder(model):
    ids = model.prompt_ids(TEMPLATES["chatml_direct"].render(TURNS[:1] + [("Next?", None)]))
    at = ids.index(IMAGE_TOKEN_INDEX)
    image = torch.randn(1, 256, TINY_HIDDEN)
    embeds = embed_with_image(model.embedding, ids, image)
    assert embeds.shape == (1, len(ids) - 1 + 256, TINY_HIDDEN)
    table = model.embedding.weight
    torch.testing.assert_close(embeds[0, :at], table[ids[:at]], rtol=0, atol=0)
    torch.testing.assert_close(embeds[0, at:at + 256], image[0], rtol=0, atol=0)
    torch.testing.assert_close(embeds[0, at + 256:], table[ids[at + 1:]], rtol=0, atol=0)
    assert model.sequence_length(ids) == embeds.shape[1]
    with pytest.raises(ChatError, match="1 <image> placeholders for 0 image"):
        embed_with_image(model.embedding, ids, None)
    with pytest.raises(ChatError, match="2 <image> placeholders"):
        embed_with_image(model.embedding, ids + ids, image)


def test_lora_and_non_lora_trainables_load_into_the_llm(model, tiny_llm, adapter, tokenizer_folder):
    root, state = adapter
    base_vocab = len(AutoTokenizer.from_pretrained(tokenizer_folder))
    tokenizer = model.tokenizer
    assert len(tokenizer) == base_vocab + 5 and tokenizer.pad_token_id == base_vocab
    assert tokenizer.convert_tokens_to_ids("<report_generation>") == base_vocab + 4
    llm = model.llm
    assert type(llm).__name__ == "LlamaForCausalLM"  # LoRA merged, no peft wrapper left
    torch.testing.assert_close(llm.get_input_embeddings().weight, state["base_model.model.model.embed_tokens.weight"])
    torch.testing.assert_close(llm.get_output_embeddings().weight, state["base_model.model.lm_head.weight"])
    lora = load_file(root / "llama_3.1_8b" / "adapter_model.safetensors")
    a = lora["base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"]
    b = lora["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"]
    base = load_file(tiny_llm / "model.safetensors")["model.layers.1.self_attn.v_proj.weight"]
    merged = base + (8 / 4) * b @ a  # lora_alpha / r
    assert not torch.allclose(merged, base, atol=1e-3)
    torch.testing.assert_close(llm.model.layers[1].self_attn.v_proj.weight, merged, rtol=1e-5, atol=1e-6)
    for key, value in model.projector.state_dict().items():
        torch.testing.assert_close(value, state["base_model.model.model.mm_projector." + key], rtol=0, atol=0)


def test_loading_a_lora_release_gives_no_library_notice(tiny_llm, adapter):
    """peft probes the LLM's `is_gradient_checkpointing`, which transformers 5 deprecated; someone loading CT-CHAT
    is not the one to act on that notice, so the console shows none."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        CTChatModel.load(tiny_llm, adapter[0], template="chatml_direct", device="cpu")
    assert not [str(w.message) for w in caught if issubclass(w.category, (DeprecationWarning, FutureWarning))]


def reference_greedy(model: CTChatModel, prompt: str, image: torch.Tensor, steps: int) -> str:
    """Greedy decoding by hand: argmax of the last logits, fed back as its embedding, until a stop id."""
    embeds = embed_with_image(model.embedding, model.prompt_ids(prompt), image)
    tokens: list[int] = []
    with torch.inference_mode():
        for _ in range(steps):
            next_id = int(model.llm(inputs_embeds=embeds).logits[0, -1].argmax())
            if next_id in model._stop_ids:
                break
            tokens.append(next_id)
            embeds = torch.cat([embeds, model.embedding.weight[next_id][None, None]], dim=1)
    return model.tokenizer.decode(tokens, skip_special_tokens=True).strip()


def test_greedy_decoding_is_deterministic_and_is_argmax_decoding(model):
    torch.manual_seed(3)
    image = model.image_embeddings(torch.randn(1, 24, 24, 24, 16))
    prompt = TEMPLATES["chatml_direct"].render([("<image>\n<provided>Findings? <long_answer>", None)])
    settings = GenerationSettings(max_new_tokens=10)
    pieces: list[str] = []
    first = model.generate(prompt, image, settings, on_text=pieces.append)
    second = model.generate(prompt, image, settings)
    assert first.text == second.text == reference_greedy(model, prompt, image, 10)
    assert first.text and "".join(pieces).strip() == first.text
    assert first.new_tokens == 10 and first.hit_limit and not first.stopped
    sampled = [model.generate(prompt, image, GenerationSettings(10, temperature=1.0, seed=7)).text for _ in range(2)]
    assert sampled[0] == sampled[1] != first.text


def test_stop_event_ends_the_answer(model):
    image = model.image_embeddings(torch.zeros(1, 24, 24, 24, 16))
    prompt = TEMPLATES["chatml_direct"].render([("<image>\n<provided>Findings?", None)])
    stop = threading.Event()
    result = model.generate(prompt, image, GenerationSettings(max_new_tokens=50), lambda text: stop.set(), stop)
    assert result.stopped and not result.hit_limit
    assert 1 <= result.new_tokens < 10


def test_context_guard_cuts_the_answer_then_refuses(tiny_llm, adapter):
    small = CTChatModel.load(tiny_llm, adapter[0], template="chatml_direct", device="cpu", context_length=300)
    image = small.image_embeddings(torch.zeros(1, 24, 24, 24, 16))
    prompt = TEMPLATES["chatml_direct"].render([("<image>\n<provided>Findings?", None)])
    used = small.sequence_length(small.prompt_ids(prompt))
    result = small.generate(prompt, image, GenerationSettings(max_new_tokens=200))
    assert result.new_tokens == 300 - used and result.hit_limit
    long_prompt = TEMPLATES["chatml_direct"].render([("<image>\n<provided>" + "Findings? " * 40, None)])
    with pytest.raises(ContextLengthError, match="holds 300; start a new conversation"):
        small.generate(long_prompt, image)


def test_loading_errors_say_what_is_wrong(tiny_llm, adapter, tmp_path, tokenizer_folder, monkeypatch):
    root, state = adapter
    folder = root / "llama_3.1_8b"
    with pytest.raises(CheckpointError, match="not a Hugging Face model folder"):
        CTChatModel.load(tmp_path, folder, device="cpu")
    with pytest.raises(CheckpointError, match="no such folder"):
        CTChatModel.load(tiny_llm, tmp_path / "missing", device="cpu")
    with pytest.raises(CheckpointError, match="needs its projector"):
        CTChatModel.load(tiny_llm, None, device="cpu")
    with pytest.raises(ChatError, match="fp16 needs a GPU"):
        CTChatModel.load(tiny_llm, folder, device="cpu", precision="fp16")
    with pytest.raises(ChatError, match="4bit weights need a CUDA GPU"):
        CTChatModel.load(tiny_llm, folder, device="cpu", precision="4bit")
    with monkeypatch.context() as patch:  # no peft in this environment: named before anything loads
        patch.setattr(dependencies, "installed_version", lambda name: None if name == "peft" else "99")
        with pytest.raises(DependencyError, match=r"CT-CHAT needs peft>=0.13: pip install 'ctfoundation\[chat\]'"):
            load_chat_model("ct-chat-llama3.1-8b", llm=tiny_llm, lora=folder, device="cpu")
    with pytest.raises(ChatError, match="not one token"):  # llama3's <|eot_id|> does not exist in this vocabulary
        CTChatModel.load(tiny_llm, folder, template="llama3", device="cpu")
    grown = dict(state, **{
        "base_model.model.lm_head.weight": torch.zeros(len(state["base_model.model.lm_head.weight"]) + 1, 64)})
    torch.save(grown, tmp_path / "other_vocab.bin")
    with pytest.raises(CheckpointError, match="not the one this CT-CHAT was trained on"):
        CTChatModel.load(tiny_llm, folder, projector=tmp_path / "other_vocab.bin", device="cpu")
    wider = make_tiny_llm(tmp_path / "wider", tokenizer_folder, hidden=96)
    with pytest.raises(CheckpointError, match="wide"):
        CTChatModel.load(wider, folder, device="cpu", template="chatml_direct")


def test_next_turn_reuses_the_cache_and_answers_the_same(model):
    image = model.image_embeddings(torch.ones(1, 24, 24, 24, 16))
    template, settings = TEMPLATES["chatml_direct"], GenerationSettings(max_new_tokens=6)
    cache = PromptCache()
    first = model.generate(template.render([("<image>\n<provided>Findings?", None)]), image, settings, cache=cache)
    cached = cache.kv.get_seq_length()
    assert cached == model.sequence_length(
        model.prompt_ids(template.render([("<image>\n<provided>Findings?", None)]))) + 5
    follow_up = template.render([("<image>\n<provided>Findings?", first.text), ("Size? <short_answer>", None)])
    kv = cache.kv
    reused = model.generate(follow_up, image, settings, cache=cache)
    assert cache.kv is kv  # extended in place, not rebuilt
    assert reused.text == model.generate(follow_up, image, settings).text  # the same answer as computed afresh
    assert cache.kv.get_seq_length() == model.sequence_length(model.prompt_ids(follow_up)) + 5
    assert cache.positions[:cached - 5] == expand_positions(model.prompt_ids(follow_up))[:cached - 5]


def test_cli_one_shot_question_and_report_with_transcript(tiny_llm, adapter, ct_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CTFOUNDATION_HOME", str(tmp_path / "home"))
    checkpoint, constructors, _ = make_small_ctclip(tmp_path / "ctclip")
    transcript = tmp_path / "chat.json"
    code = main([
        "chat", str(ct_dir / RICORD_3MM), "--llm", str(tiny_llm), "--lora", str(adapter[0]), "--ctclip",
        str(checkpoint), "--ctclip-config", str(constructors), "--template", "chatml_direct", "--device", "cpu",
        "--max-new-tokens", "5", "--question", "Is there an effusion?", "--answer-type", "short", "--report",
        "--transcript", str(transcript),
    ])
    out = capsys.readouterr()
    assert code == 0, out.err
    turns = json.loads(transcript.read_text())["turns"]
    assert [turn["user_text"] for turn in turns] == [
        "<image>\n<provided>Is there an effusion? <short_answer>",
        "Generate the radiology report for this chest CT volume. <report_generation>",
    ]
    lines = out.out.splitlines()
    assert lines[0] == "you> Is there an effusion?" and lines[1].startswith("ct-chat> ") and len(lines) == 3
    assert all(turn["answer"].strip() and turn["answer"] in line for turn, line in zip(turns, lines[1:]))
    assert out.err.count("(5 tokens in") == 2 and "[length limit reached]" in out.err
    assert len(list((tmp_path / "home" / "runtime" / "ctchat_tokens").glob("*.safetensors"))) == 1


def test_cli_refuses_no_lora_without_projector(capsys):
    assert main(["chat", "ct.nii.gz", "--no-lora"]) == 2
    assert "--no-lora needs --projector" in capsys.readouterr().err


def test_report_narrative_adds_a_grounded_generated_report(tiny_llm, adapter, ct_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CTFOUNDATION_HOME", str(tmp_path / "home"))
    checkpoint, constructors, _ = make_small_ctclip(tmp_path / "ctclip")
    out = tmp_path / "reports"
    passes, prepare = [], CTCLIPRuntime.prepare
    monkeypatch.setattr(CTCLIPRuntime, "prepare", lambda self, volume: passes.append(volume) or prepare(self, volume))
    code = main([
        "report", str(ct_dir / RICORD_3MM), "--out", str(out), "--weights", str(checkpoint), "--model-config",
        str(constructors), "--text-encoder", str(bert_vocab()), "--device", "cpu", "--narrative", "--llm",
        str(tiny_llm), "--lora", str(adapter[0]), "--template", "chatml_direct", "--max-new-tokens", "12",
    ])
    assert code == 0, capsys.readouterr().err
    assert len(passes) == 1  # detection's CT-CLIP pass also gave CT-CHAT its tokens
    assert not (tmp_path / "home" / "runtime" / "ctchat_tokens").exists()  # no per-case token files in a batch
    [folder] = [path for path in out.iterdir() if path.is_dir()]
    result = json.loads((folder / "result.json").read_text())
    narrative = result["sections"]["narrative"]
    assert narrative["model"] == "ct-chat-llama3.1-8b" and narrative["new_tokens"] == 12 and not narrative["complete"]
    model = CTChatModel.load(tiny_llm, adapter[0], template="chatml_direct", device="cpu")
    session = ChatRuntime(model, CTCLIPRuntime(checkpoint, config=read_ctclip_config(constructors), device="cpu"),
                          cache_dir=tmp_path / "home" / "runtime").session(
        read_ct(ct_dir / RICORD_3MM), settings=GenerationSettings(max_new_tokens=12))
    expected = session.generate_report()
    assert narrative["text"] == expected.text  # the same greedy report as a chat session writes
    assert [s["text"] for s in narrative["sentences"]] == [s.text for s in expected.sentences]
    page = (folder / "report.html").read_text()
    assert "Generated report (ct-chat-llama3.1-8b)" in page and "cut at the token limit" in page
    assert html.escape(expected.sentences[0].text, quote=False) in page


def test_report_narrative_needs_ctclip_v2(ct_dir, tmp_path, capsys):
    assert main(["report", str(ct_dir / RICORD_3MM), "--out", str(tmp_path), "--model", "ct-clip-lipro",
                 "--narrative"]) == 2
    assert ("narrative needs the detection model ct-clip-v2 (its image encoder), not ct-clip-lipro"
            in capsys.readouterr().err)
