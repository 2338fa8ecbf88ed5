"""Loading CT-CHAT's language side: the base LLM (Hugging Face folder or GGUF, optionally 8/4-bit), its
tokenizer, the resized `embed_tokens` / `lm_head` and projector from `non_lora_trainables.bin`, and the LoRA
adapter (any folder name) applied with peft and merged."""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

from CTFoundationLib.errors import ChatError, CheckpointError, DependencyError
from CTFoundationLib.models.ctchat.projector import AttnPoolProjector, llm_embedding_weights
from CTFoundationLib.models.ctchat.templates import add_ctchat_tokens

NON_LORA_FILE = "non_lora_trainables.bin"
PRECISIONS = ("auto", "fp32", "bf16", "fp16", "8bit", "4bit")


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
    """The file the projector and resized embeddings come from: --projector, else the adapter's
    non_lora_trainables.bin."""
    if projector is not None:
        return Path(projector)
    if adapter is None:
        raise CheckpointError(f"CT-CHAT needs its projector: give the LoRA folder (with {NON_LORA_FILE}) "
                              "or a projector file")
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
        with quiet_peft_probe():
            model = PeftModel.from_pretrained(model, adapter, is_trainable=False)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise CheckpointError(
            f"LoRA adapter {adapter} does not fit the base LLM {llm} ({first_line(error)}). It was trained on "
            f"{adapter_base_name(adapter)}; give that model with --llm."
        ) from None
    return model.merge_and_unload() if merge else model


@contextlib.contextmanager
def quiet_peft_probe() -> Iterator[None]:
    """peft asks the LLM for `is_gradient_checkpointing`, which transformers 5 deprecated: its FutureWarning is
    for peft's authors, not for someone loading or training CT-CHAT."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        yield


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
