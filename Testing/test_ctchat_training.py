"""CT-CHAT training on a tiny random Llama with SmolLM2's real tokenizer: both stages learn (loss finite and
falling), a run resumes from its checkpoint, and the exported LoRA folder loaded through the runtime gives the
training-time model's logits."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from small_chat_models import make_tiny_llm, smollm2_tokenizer_folder

from CTFoundationLib.errors import TrainingError
from CTFoundationLib.models.ctchat.modeling import CTChatModel, embed_with_image
from CTFoundationLib.models.ctchat.templates import IMAGE_TOKEN_INDEX
from training.ctchat.data import PLAIN, collate, segments, tokenize_item
from training.ctchat.model import IGNORE_INDEX
from training.ctchat.train import ChatTrainConfig, prepare_model, train_stage
from training.ctchat.vqa import QA, conversation_item

GRID = (1, 2, 2, 2, 16)  # (B, t, h, w, C) CT-CLIP-like token grid


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    tokenizer = smollm2_tokenizer_folder(tmp_path_factory.getbasetemp())
    return make_tiny_llm(tmp_path_factory.mktemp("tiny-llm"), tokenizer, seed=3)


def grids_and_items(count: int = 32) -> tuple[dict, list[dict]]:
    """Token grids whose sign of the mean decides the answer, so that the image carries what the answer needs."""
    generator = torch.Generator().manual_seed(0)
    grids, items = {}, []
    for index in range(count):
        name = f"case_{index}.nii.gz"
        positive = index % 2 == 0
        grids[name] = torch.randn(GRID, generator=generator) * 0.3 + (1.0 if positive else -1.0)
        qa = QA("Is there a pleural effusion? (a) yes (b) no", "(a) yes" if positive else "(b) no", "multiple_choice")
        items.append(conversation_item(name, [qa], f"{name}#0"))
    return grids, items


def stage_config(tiny_llm, tmp_path, stage: str, **changes) -> ChatTrainConfig:
    base = dict(stage=stage, llm=tiny_llm, template="chatml_direct", output_dir=tmp_path / stage, steps=14,
                batch_size=8, lr=3e-3, warmup_ratio=0.0, projector={"n_queries": 4, "n_heads": 4},
                lora={"r": 4, "alpha": 8, "dropout": 0.0}, log_every=1, save_every=7)
    return ChatTrainConfig(**{**base, **changes})


def mean(values):
    return sum(values) / len(values)


def test_answers_are_the_only_labels_in_both_formats(tiny_llm):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llm)
    item = conversation_item("a.nii.gz", [QA("Is there X?", "Yes.", "short_answer"), QA("Where?", "Left.",
                                                                                        "short_answer")], "a")
    rendered = "".join(text for text, _ in segments(item, "chatml_direct"))
    assert rendered.endswith("<|im_start|>assistant\nLeft.<|im_end|>") and rendered.count("<image>") == 1
    example = tokenize_item(item, tokenizer, "chatml_direct")
    answers = tokenizer.decode([t for t in example.labels if t != IGNORE_INDEX])
    assert answers == "Yes.<|im_end|>Left.<|im_end|>"
    plain = tokenize_item(item, tokenizer, PLAIN)
    assert plain.input_ids[0] == IMAGE_TOKEN_INDEX and tokenizer.decode(plain.input_ids[1:]) == "Yes.\n"
    batch = collate([example, plain], {"a.nii.gz": torch.zeros(GRID)}, 4, 0)
    assert batch["input_ids"].shape[1] == len(example.input_ids) + 3
    assert (batch["input_ids"] == IMAGE_TOKEN_INDEX).sum(1).tolist() == [4, 4]


def test_a_fresh_projector_speaks_at_the_scale_of_the_token_embeddings(tiny_llm, tmp_path):
    """Default init gave the demo's SmolLM2 image embeddings ~13x its token embeddings' size: a loud, nearly
    image-independent prefix the LLM learned to ignore. A fresh projector is scaled to the embeddings' RMS, and
    its keys start standardised per channel."""
    grids, _ = grids_and_items(8)
    sample = torch.cat(list(grids.values()))
    model = prepare_model(stage_config(tiny_llm, tmp_path, "pretrain"), sample, None)
    base = model.embedding.weight[: model.base_rows]
    with torch.no_grad():
        out = model.projector(sample)
    torch.testing.assert_close(out.pow(2).mean().sqrt(), base.pow(2).mean().sqrt(), rtol=1e-4, atol=0)
    assert not torch.allclose(out[0], out[1])  # a positive and a negative case project differently
    ln = model.projector.attn_pool.ln_k  # and its keys see every channel standardised over the sample
    keys = ln(sample.flatten(1, 3)).flatten(0, 1)
    torch.testing.assert_close(keys.mean(0), torch.zeros(GRID[-1]), atol=1e-4, rtol=0)
    torch.testing.assert_close(keys.std(0), torch.ones(GRID[-1]), atol=1e-4, rtol=0)


def test_gradient_checkpointing_recomputes_the_llm_layers_for_the_same_gradients(tiny_llm, tmp_path):
    """The full-scale configs recompute the LLM's layers in the backward pass (transformers' activation
    checkpointing): the same gradients as without it, each layer's MLP run twice, and no deprecation notice from
    transformers or peft on the way."""
    grids, items = grids_and_items(4)
    gradients, layer_runs = [], []
    for checkpointing in (False, True):
        torch.manual_seed(0)  # peft's LoRA initialisation
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            config = stage_config(tiny_llm, tmp_path, "lora", gradient_checkpointing=checkpointing)
            model = prepare_model(config, torch.cat(list(grids.values())), None).train()
        assert not [str(w.message) for w in caught if issubclass(w.category, (DeprecationWarning, FutureWarning))]
        examples = [tokenize_item(item, model.tokenizer, "chatml_direct") for item in items]
        batch = collate(examples, grids, model.projector.config.n_queries, model.tokenizer.pad_token_id)
        runs = []
        mlp = model.llm.get_base_model().model.layers[0].mlp  # counted by its forward: the recompute runs no hooks
        forward = mlp.forward
        mlp.forward = lambda *args, forward=forward: runs.append(1) or forward(*args)
        model(**batch).backward()
        layer_runs.append(len(runs))
        gradients.append({name: p.grad for name, p in model.named_parameters() if p.grad is not None})
    assert layer_runs == [1, 2]
    plain, checkpointed = gradients
    assert plain.keys() == checkpointed.keys() and any("lora_B" in name for name in plain)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6)


def test_both_stages_learn_resume_and_export_round_trip(tiny_llm, tmp_path):
    grids, items = grids_and_items()
    stage1 = train_stage(stage_config(tiny_llm, tmp_path, "pretrain", lr=1e-2), items, grids, say=lambda _: None)
    assert all(torch.isfinite(torch.tensor(stage1.losses)))
    # a frozen random LLM moves slowly through the projector alone; the fall is still well above the noise
    assert mean(stage1.losses[-4:]) < mean(stage1.losses[:4]) - 0.2
    assert stage1.output.name == "mm_projector.bin"
    trainable = {n for n, p in stage1.model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("projector.") for n in trainable)

    config2 = stage_config(tiny_llm, tmp_path, "lora", init_projector=stage1.output, lr=2e-3)
    stage2 = train_stage(config2, items, grids, say=lambda _: None)
    assert all(torch.isfinite(torch.tensor(stage2.losses)))
    assert mean(stage2.losses[-4:]) < mean(stage2.losses[:4])
    names = {n for n, p in stage2.model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in names) and any(n.startswith("projector.") for n in names)
    assert any("embed_tokens" in n for n in names) and any("lm_head" in n for n in names)
    # the base vocabulary's rows never move; the added tokens' rows do
    base = stage2.model.base_rows
    saved = torch.load(stage2.output / "non_lora_trainables.bin", weights_only=True)
    table = saved["base_model.model.model.embed_tokens.weight"]
    assert table.shape[0] == base + 5  # <pad> + CT-CHAT's 4 task tokens
    from transformers import AutoModelForCausalLM

    start = AutoModelForCausalLM.from_pretrained(tiny_llm).get_input_embeddings().weight.detach()
    assert torch.equal(table[:base], start)
    choice_row = table[base + 1]  # "<multiple_choice>", in every question
    assert not torch.allclose(choice_row, start.mean(0), atol=1e-4)
    assert any("lora_B" in k for k in __import__("safetensors.torch").torch.load_file(
        stage2.output / "adapter_model.safetensors"))

    # resume: a rerun to more steps starts at the saved step 14
    more = train_stage(stage_config(tiny_llm, tmp_path, "lora", init_projector=stage1.output, steps=16, lr=2e-3),
                       items, grids, say=lambda _: None)
    steps = [json.loads(line)["step"] for line in (tmp_path / "lora" / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 15)) + [15, 16] and more.steps == 16

    # round trip: the exported folder through the runtime = the training-time model
    model = more.model.eval()
    runtime = CTChatModel.load(tiny_llm, more.output, template="chatml_direct", device="cpu", precision="fp32")
    assert runtime.image_positions == 4
    prompt = runtime.template.render([(items[0]["conversations"][0]["value"], None)])
    ids = runtime.prompt_ids(prompt)
    grid = grids["case_0.nii.gz"]
    with torch.no_grad():
        expected = model.logits(torch.tensor([sum(([t] * (4 if t == IMAGE_TOKEN_INDEX else 1) for t in ids), [])]),
                                grid)
        embeds = embed_with_image(runtime.embedding, ids, runtime.image_embeddings(grid))
        got = runtime.llm(inputs_embeds=embeds).logits
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)


def test_finding_slots_spell_each_findings_name_where_it_is_present(tiny_llm):
    from transformers import AutoTokenizer

    from training.ctchat.slots import FindingSlots

    tokenizer = AutoTokenizer.from_pretrained(tiny_llm)
    slots = FindingSlots.from_tokenizer(tokenizer, ("Pleural effusion", "Emphysema", "Consolidation"))
    words = [tokenizer(text, add_special_tokens=False).input_ids
             for text in (" pleural effusion", " emphysema", " consolidation")]
    assert slots.length == sum(map(len, words)) + 1
    comma, stop = (tokenizer(text, add_special_tokens=False).input_ids for text in (",", "."))
    ids = slots.target_ids({"Emphysema"})
    assert ids == comma * len(words[0]) + words[1] + comma * len(words[2]) + stop
    assert tokenizer.decode(slots.target_ids({"Pleural effusion", "Consolidation"})).replace(",", "") \
        == " pleural effusion consolidation."
    table = torch.randn(len(tokenizer), 8, generator=torch.Generator().manual_seed(0))
    for present in (set(), {"Emphysema"}, {"Pleural effusion", "Consolidation"}, set(slots.names)):
        assert slots.read(table[slots.target_ids(present)], table) == present


def test_finding_slot_pretraining_teaches_the_projector_to_state_held_out_findings(tiny_llm, tmp_path):
    """Grids where channel 0 carries effusion and channel 1 emphysema: after stage 1 on finding slots the projector
    of a held-out grid lands nearer the names of exactly its findings; mm_projector.bin and log.jsonl are written."""
    from CTFoundationLib.models.ctchat.projector import load_projector
    from training.ctchat.slots import FindingSlots, pretrain_on_finding_slots

    generator = torch.Generator().manual_seed(1)
    names = ("Pleural effusion", "Emphysema")
    grids, present = {}, {}
    for index in range(80):
        case = {name for bit, name in enumerate(names) if (index >> bit) & 1}
        grid = torch.randn(GRID, generator=generator) * 0.3
        for channel, name in enumerate(names):
            grid[..., channel] += 1.0 if name in case else -1.0
        grids[f"case_{index}.nii.gz"], present[f"case_{index}.nii.gz"] = grid, case
    held_out = [f"case_{index}.nii.gz" for index in range(64, 80)]
    train = {name: grids[name] for name in grids if name not in held_out}
    config = stage_config(tiny_llm, tmp_path, "pretrain", steps=600, batch_size=16, lr=3e-3, log_every=50)
    stage1 = pretrain_on_finding_slots(config, names, present, train, say=lambda _: None)
    assert mean(stage1.losses[-10:]) < 0.5 * mean(stage1.losses[:10])
    assert stage1.output == tmp_path / "pretrain" / "mm_projector.bin"
    log = [json.loads(line) for line in (tmp_path / "pretrain" / "log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == list(range(50, 601, 50)) and log[0]["objective"] == "finding_slots"

    slots = FindingSlots.from_tokenizer(stage1.model.tokenizer, names)
    projector = load_projector(stage1.output).eval()  # the exported file, as stage 2 and the runtime read it
    assert projector.config.n_queries == slots.length
    table = stage1.model.embedding.weight.detach()
    with torch.no_grad():
        read = [slots.read(projector(grids[name])[0], table) for name in held_out]
    assert read == [present[name] for name in held_out]

    no_slot = r"case_10.nii.gz: finding 'Emphysema' has no slot; the slots are Pleural effusion$"
    with pytest.raises(TrainingError, match=no_slot):
        pretrain_on_finding_slots(config, names[:1], present, train, say=lambda _: None)


def test_a_stage_in_bf16_runs_after_an_fp32_stage_in_the_same_process(tiny_llm, tmp_path):
    """`python -m training.demo build --model ct-chat-demo` trains ct-clip-demo (fp32) and then CT-CHAT's stage 2
    (bf16) in one process; accelerate refused the second precision until each stage got a fresh state."""
    from accelerate import Accelerator

    Accelerator(mixed_precision="no")
    grids, items = grids_and_items(8)
    stage = train_stage(stage_config(tiny_llm, tmp_path, "pretrain", steps=2, mixed_precision="bf16"), items, grids,
                        say=lambda _: None)
    assert stage.steps == 2 and all(torch.isfinite(torch.tensor(stage.losses)))

