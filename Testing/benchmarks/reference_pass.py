"""Time one zero-shot forward pass of the REFERENCE CT-CLIP v2 code (not ours) on CPU, full size.

What it times: `CTCLIP.forward(text_tokens, volume, device=cpu)` of ibrahimethemhamamci/CT-CLIP @ a2a155c,
called as scripts/zero_shot.py calls it for ONE pathology ("Medical material": the pair "... is present." /
"... is not present." tokenised with padding="max_length", max_length=512), under eval() and no_grad().
Each call runs the BERT text tower on both prompts AND re-encodes the image (CTViT + quantiser), as the
reference loop does for every one of its 18 pathologies. No warm-up beyond what the reference does (none).

Run it with a Python that has the reference's dependencies (torch, transformers 4.30.x, einops,
vector-quantize-pytorch 1.1.2, beartype), never with the project's venv:

    /tmp/refvenv/bin/python Testing/benchmarks/reference_pass.py --checkout /tmp/refbench/CT-CLIP \
        --checkpoint /tmp/ctfoundation-bench/ct_clip_v2_fullsize_random.pt \
        --volume /tmp/refbench/ricord_input.pt --vocab ../shared/data/vocab/bert-base-uncased_vocab.txt \
        --constructors /tmp/ctfoundation-bench/constructors.json [--passes 1]

--checkout holds the reference's transformer_maskgit/ and CT_CLIP/ folders; --volume is a torch.save'd
(1, 1, 240, 480, 480) float32 tensor (CTCLIPRuntime.prepare output). Prints one JSON line on stdout:
reference_pass_s (mean over --passes), passes_s, versions, threads, logits and the softmax pair
[P(present), P(absent)] as zero_shot.py computes it, and notes on how the checkpoint was loaded.

To run the unmodified reference files on a CPU-only torch, four things are shimmed here (none in the
timed computation): transformer_maskgit/__init__.py is bypassed (it imports training-only modules:
accelerate, nibabel, cv2, ema_pytorch, pandas); `torchvision` is an empty stub (imported at module level,
used only by training losses / SSL augmentations; the PyPI torchvision wheel needs CUDA torch); the
hard-coded `torch.device('cuda')` in ctvit.py / attention.py is mapped to the CPU; and CTCLIP's
`BertTokenizer.from_pretrained('microsoft/BiomedVLP-CXR-BERT-specialized')` (a hub download, the result
unused by forward) returns the tokenizer built from --vocab. The reference's own `print("test all
pooling")` inside forward goes to stderr so that stdout stays one JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import types
from pathlib import Path
from typing import Any

import torch

# The remaining CTCLIP arguments of scripts/run_zero_shot.py.
CTCLIP_FLAGS: dict[str, bool] = {
    "extra_latent_projection": False,
    "use_mlm": False,
    "downsample_image_embeds": False,
    "use_all_token_embeds": False,
}
# Strict load, except for keys absent from a checkpoint whose values cannot reach the zero-shot logits
# (the project's random bench checkpoint omits them): BERT pooler, first-frame / to_pixels decoder layers,
# the zero-element null_kv, context_norm (cross-attention only), VQ training buffers (initted defaults to True).
UNREAD_PREFIXES: tuple[str, ...] = (
    "text_transformer.pooler.",
    "visual_transformer.to_patch_emb_first_frame.",
    "visual_transformer.to_pixels",
    "visual_transformer.vq._codebook.initted",
    "visual_transformer.vq._codebook.cluster_size",
)


def unread_by_zero_shot(constructors: dict[str, dict[str, Any]]) -> tuple[str, ...]:
    """Key prefixes a checkpoint may lack: UNREAD_PREFIXES and each layer's null_kv / context_norm."""
    return UNREAD_PREFIXES + tuple(
        f"visual_transformer.enc_{stage}_transformer.layers.{layer}.1.{name}"
        for stage in ("spatial", "temporal")
        for layer in range(constructors["CTViT"][f"{stage}_depth"])
        for name in ("null_kv", "context_norm.")
    )


class _TorchCudaAsCpu:
    """`torch` as seen by the reference CTViT modules: only `torch.device('cuda')` is answered with the CPU."""

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    @staticmethod
    def device(*args: Any, **kwargs: Any) -> torch.device:
        device = torch.device(*args, **kwargs)
        return torch.device("cpu") if device.type == "cuda" else device


def import_reference(checkout: Path, tokenizer: Any, cuda: bool = False) -> tuple[type, type]:
    """Make the checkout importable (with the shims in the module docstring; `cuda`: its own device kept);
    return (CTViT, CTCLIP)."""
    sys.path[:0] = [str(checkout / "transformer_maskgit"), str(checkout / "CT_CLIP")]
    for name in ("torchvision", "torchvision.transforms", "torchvision.utils"):
        sys.modules.setdefault(name, types.ModuleType(name))
    vision = sys.modules["torchvision"]
    vision.transforms, vision.utils = sys.modules["torchvision.transforms"], sys.modules["torchvision.utils"]
    package = types.ModuleType("transformer_maskgit")
    package.__path__ = [str(checkout / "transformer_maskgit" / "transformer_maskgit")]
    sys.modules["transformer_maskgit"] = package

    import ct_clip.ct_clip as ct_clip_module
    import transformer_maskgit.attention as attention_module
    import transformer_maskgit.ctvit as ctvit_module

    if not cuda:
        ctvit_module.torch = attention_module.torch = _TorchCudaAsCpu()
    ct_clip_module.BertTokenizer = types.SimpleNamespace(from_pretrained=lambda *args, **kwargs: tokenizer)
    return ctvit_module.CTViT, ct_clip_module.CTCLIP


def build_reference(
    checkout: Path, checkpoint: Path, tokenizer: Any, constructors: dict[str, dict[str, Any]], cuda: bool = False
) -> tuple[torch.nn.Module, list[str]]:
    """Reference CTCLIP wired as scripts/run_zero_shot.py, checkpoint loaded (strict but for unread_by_zero_shot)."""
    from transformers import BertConfig, BertModel

    ctvit_class, ctclip_class = import_reference(checkout, tokenizer, cuda)
    text_encoder = BertModel(BertConfig(**constructors["BertConfig"]))
    text_encoder.resize_token_embeddings(len(tokenizer))
    image_encoder = ctvit_class(**constructors["CTViT"])
    model = ctclip_class(
        image_encoder=image_encoder,
        text_encoder=text_encoder,
        **constructors["CTCLIP"],
        **CTCLIP_FLAGS,
    )
    state = torch.load(str(checkpoint), map_location="cpu", weights_only=True, mmap=True)
    notes = []
    key = "text_transformer.embeddings.position_ids"
    if key in state and key not in model.state_dict():
        del state[key]
        notes.append(f"dropped {key}: this transformers keeps it as a non-persistent buffer")
    result = model.load_state_dict(state, strict=False)
    missing = result.missing_keys
    wrong = result.unexpected_keys + [name for name in missing
                                      if not name.startswith(unread_by_zero_shot(constructors))]
    if wrong:
        raise RuntimeError(f"checkpoint does not match the reference CTCLIP: {wrong[:10]} ({len(wrong)} keys)")
    if missing:
        notes.append(f"checkpoint lacks {len(missing)} keys that zero-shot forward never reads (kept at init)")
    return model.eval(), notes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkout", type=Path, required=True, help="reference CT-CLIP checkout")
    parser.add_argument("--checkpoint", type=Path, required=True, help="full-size CT-CLIP v2 state dict (.pt)")
    parser.add_argument("--volume", type=Path, required=True, help="torch.save'd (1, 1, 240, 480, 480) input")
    parser.add_argument("--vocab", type=Path, required=True, help="BERT vocab.txt for the tokenizer")
    parser.add_argument("--constructors", type=Path, required=True,
                        help="JSON of the reference constructor arguments (bench_ctclip.py writes the full-size ones)")
    parser.add_argument("--passes", type=int, default=1, help="timed forward passes (default 1)")
    parser.add_argument("--pathology", default="Medical material", help="the finding whose prompt pair is scored")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda: the reference's own device code unshimmed")
    args = parser.parse_args()

    import transformers
    from transformers import BertTokenizer

    tokenizer = BertTokenizer(vocab_file=str(args.vocab), do_lower_case=True)
    constructors = json.loads(args.constructors.read_text())
    device = torch.device(args.device)
    model, notes = build_reference(args.checkout.resolve(), args.checkpoint, tokenizer, constructors,
                                   cuda=device.type == "cuda")
    model = model.to(device)
    volume = torch.load(str(args.volume), map_location=device, weights_only=True).float()
    texts = [f"{args.pathology} is present.", f"{args.pathology} is not present."]
    with torch.no_grad(), contextlib.redirect_stdout(sys.stderr):
        text_tokens = tokenizer(texts, return_tensors="pt", padding="max_length", truncation=True, max_length=512).to(
            device
        )
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = timed_passes(lambda: model(text_tokens, volume, device=device), device, args.passes)
        logits = model(text_tokens, volume, device=device)
        # the image tower alone, as CTCLIP.forward calls it (after the passes above: warm)
        tower_times = timed_passes(lambda: model.visual_transformer(volume, return_encoded_tokens=True), device,
                                   args.passes)
        probabilities = torch.nn.Softmax(dim=0)(logits)
    result = {
        "pathology": args.pathology,
        "reference_pass_s": round(sum(times) / len(times), 3),
        "passes_s": [round(t, 3) for t in times],
        "image_tower_s": round(min(tower_times), 4),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "peak_gb": round(torch.cuda.max_memory_allocated(device) / 1e9, 2) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "logits": logits.tolist(),
        "probabilities": probabilities.tolist(),
        "notes": notes,
    }
    print(json.dumps(result))


def timed_passes(call: Any, device: torch.device, passes: int) -> list[float]:
    """Wall seconds of each call, the device synchronised around it."""
    times = []
    for _ in range(passes):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return times


if __name__ == "__main__":
    main()
