"""The GPU path in one run (issue 20's figures): CT-CLIP v2 encode, preprocessing on the device, detect, batch
reports, CT-CHAT decoding and a training step, and the reference's own code on the same device.

Parts (--parts, all by default):
  encode      image encode per volume, fp32 (TF32 off), TF32 (CUDA only) and bf16 autocast, batch 1 and --batch;
              peak device memory; agreement with fp32 (latent cosine, max |delta P(present)| over the 18 findings)
  preprocess  the same PreprocessSpec on the CPU and on the device: time and max |difference|
  detect      `CTCLIPRuntime.detect` of a loaded model, preprocessing included
  report      batch reports (`report_cases`, --read-workers) over --cases copies of the NIfTI and of the DICOM
              series: cases/s and, on CUDA, the GPU busy fraction sampled by NVML while it runs
  chat        CT-CHAT prefill (first token) and decoding tokens/s of `CTChatModel.generate`: a random Llama-3.1-8B
              shape in bf16 on CUDA, the real SmolLM2-135M on CPU; then a fixed number of tokens through
              transformers' generate (dynamic cache; on CUDA also static cache + torch.compile, to judge whether
              the product should use it)
  train       one full contrastive step (forward, backward, Adam) at --train-batch, bf16 autocast on CUDA, with and
              without gradient checkpointing: seconds, volumes/s, peak memory
  reference   with --reference-python/--reference-checkout: reference_pass.py (the reference's own code) on
              the same device: one zero-shot pass and its image tower alone

Model: a full-size random-weight CT-CLIP v2 (written once to --workdir), or with --small the tests' small one on the
3 mm RICORD (CPU smoke run: figures are not comparable with the targets). Times are medians of --repeats after one
warm-up, with the device synchronised around each. Prints a table and writes every figure to --json.

Run: python Testing/benchmarks/bench_gpu.py [--device cuda|cpu] [--parts encode,detect,...] [--small]
       [--batch 8] [--cases 32] [--read-workers 8] [--repeats 10] [--json figures.json]
       [--reference-python PY --reference-checkout DIR]   (setting them up: reference_pass.py's docstring)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "Testing"), str(REPO / "CTFoundation"), str(Path(__file__).parent)]
SHARED = REPO.parent / "shared/data"
RICORD = SHARED / "ct/ricord1a_419639-000082_chest_noncontrast"
VOCAB = SHARED / "vocab/bert-base-uncased_vocab.txt"
PARTS = ("encode", "preprocess", "detect", "report", "chat", "train", "reference")
LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_s(call: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median wall seconds of `call` after one warm-up call."""
    call()
    times = []
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        call()
        synchronize(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


@contextlib.contextmanager
def peak_memory(device: torch.device, figures: dict, key: str) -> Iterator[None]:
    """figures[key]: the device's peak allocated GB inside the block (CUDA only)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    yield
    if device.type == "cuda":
        figures[key] = round(torch.cuda.max_memory_allocated(device) / 1e9, 2)


@contextlib.contextmanager
def precision(model, mode: str) -> Iterator[None]:
    """fp32 (TF32 off), tf32 (TF32 matmuls and convolutions) or bf16 (the runtime's autocast)."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, model.autocast_dtype)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = mode == "tf32"
    model.autocast_dtype = torch.bfloat16 if mode == "bf16" else None
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, model.autocast_dtype = saved


class Setup:
    """The model files and inputs every part shares."""

    def __init__(self, args: argparse.Namespace) -> None:
        from CTFoundationLib.io.reading import read_ct

        self.args, self.device = args, torch.device(args.device)
        args.workdir.mkdir(parents=True, exist_ok=True)
        if args.small:
            from CTFoundationTesting.small_ctclip import make_small_ctclip

            self.checkpoint, self.constructors, self.config = make_small_ctclip(args.workdir / "small")
            self.nifti = RICORD / "ct_3mm_iso.nii.gz"
        else:
            from bench_ctclip import make_full_size_checkpoint, write_constructors

            from CTFoundationLib.models.ctclip import CTCLIPConfig

            self.checkpoint = args.workdir / "ct_clip_v2_fullsize_random.pt"
            if not self.checkpoint.exists():
                make_full_size_checkpoint(self.checkpoint)
            self.constructors = write_constructors(args.workdir / "constructors.json")
            self.config = CTCLIPConfig.full_size()
            self.nifti = RICORD / "ct_1p5mm_iso.nii.gz"
        self.dicom = RICORD / "dicom"
        self.volume = read_ct(self.nifti)

    def runtime(self, device: torch.device | None = None):
        from CTFoundationLib.inference.ctclip import CTCLIPRuntime

        return CTCLIPRuntime(self.checkpoint, VOCAB, config=self.config, device=str(device or self.device),
                             cache_dir=self.args.workdir / "runtime_cache")


def encode_part(setup: Setup) -> dict:
    device, args, figures = setup.device, setup.args, {}
    runtime = setup.runtime()
    model, tensor = runtime.model, runtime.prepare(setup.volume)
    batch = tensor.expand(args.batch, *tensor.shape[1:]).contiguous()
    latents = {}
    for mode in ("fp32", "tf32", "bf16"):
        if mode == "tf32" and device.type != "cuda":
            continue
        with precision(model, mode), peak_memory(device, figures, f"peak_gb_{mode}"):
            figures[f"encode_{mode}_ms"] = 1e3 * median_s(lambda: model.encode_image(tensor), device, args.repeats)
            latents[mode] = model.encode_image(tensor)[0].float()
            if args.batch > 1:
                batch_s = median_s(lambda: model.encode_image(batch), device, max(1, args.repeats // 2))
                figures[f"encode_{mode}_batch{args.batch}_ms_per_volume"] = 1e3 * batch_s / args.batch
    reference = runtime.probabilities(latents["fp32"].cpu())
    for mode, latent in latents.items():
        if mode != "fp32":
            figures[f"{mode}_latent_cosine"] = float(torch.nn.functional.cosine_similarity(latent, latents["fp32"]))
            figures[f"{mode}_max_delta_p"] = float((runtime.probabilities(latent.cpu()) - reference).abs().max())
    return figures


def preprocess_part(setup: Setup) -> dict:
    from CTFoundationLib.preprocess import preprocess_tensor

    spec, cpu = setup.runtime().spec, torch.device("cpu")
    figures = {"preprocess_cpu_ms": 1e3 * median_s(lambda: preprocess_tensor(setup.volume, spec, cpu), cpu,
                                                   setup.args.repeats)}
    if setup.device.type != "cpu":
        on_device = lambda: preprocess_tensor(setup.volume, spec, setup.device)  # noqa: E731
        figures["preprocess_device_ms"] = 1e3 * median_s(on_device, setup.device, setup.args.repeats)
        difference = (on_device().cpu() - preprocess_tensor(setup.volume, spec, cpu)).abs().max()
        figures["preprocess_device_vs_cpu_max_abs"] = float(difference)
    return figures


def detect_part(setup: Setup) -> dict:
    runtime = setup.runtime()
    runtime.prompt_latents()  # cached prompts, as in every detect after the first
    return {"detect_loaded_s": median_s(lambda: runtime.detect(setup.volume), setup.device, setup.args.repeats)}


def report_part(setup: Setup) -> dict:
    from CTFoundationLib.io.cases import Case
    from CTFoundationLib.report.pipeline import report_cases

    figures, args = {}, setup.args
    ctclip = {"model_id": "ct-clip-v2", "weights": setup.checkpoint, "model_config": setup.constructors,
              "text_encoder": VOCAB, "device": args.device}
    for kind, source in (("nifti", setup.nifti), ("dicom", setup.dicom)):
        cases = [Case(f"{kind}_{index:03d}", source) for index in range(args.cases)]
        with tempfile.TemporaryDirectory(dir=args.workdir) as out, GpuBusy(setup.device) as busy:
            started = time.perf_counter()
            report_cases(cases, Path(out), ctclip=ctclip, read_workers=args.read_workers)
            seconds = time.perf_counter() - started
        figures[f"report_{kind}_cases_per_s"] = args.cases / seconds
        if busy.fraction is not None:
            figures[f"report_{kind}_gpu_busy_fraction"] = busy.fraction
    return figures


class GpuBusy:
    """The mean NVML utilisation of the device while the block runs (None without CUDA or NVML)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.samples, self.fraction = device, [], None
        self.done = threading.Event()

    def __enter__(self) -> GpuBusy:
        if self.device.type == "cuda":
            threading.Thread(target=self._sample, daemon=True).start()
        return self

    def _sample(self) -> None:
        while not self.done.wait(0.05):
            with contextlib.suppress(Exception):  # NVML absent: no figure rather than a failed benchmark
                self.samples.append(torch.cuda.utilization(self.device) / 100)

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.fraction = statistics.mean(self.samples) if self.samples else None


def chat_part(setup: Setup) -> dict:
    """The product's path: ChatRuntime over the CT-CLIP runtime, a first turn and a follow-up on its cache."""
    from CTFoundationLib.inference.chat import ChatRuntime
    from CTFoundationLib.models.ctchat.modeling import GenerationSettings

    model, figures = chat_model(setup), {}
    runtime = ChatRuntime(model, setup.runtime(), cache_dir=setup.args.workdir / "chat_cache")
    settings = GenerationSettings(max_new_tokens=setup.args.new_tokens)
    session = runtime.session(setup.volume, settings=settings)
    for turn, question in enumerate(("Describe the findings in this chest CT.", "Is there a pleural effusion?")):
        answer = session.ask(question, "long")
        figures |= {f"chat_turn{turn}_first_token_s": answer.first_token_s,
                    f"chat_turn{turn}_tokens_per_s": answer.tokens_per_s, f"chat_turn{turn}_tokens": answer.new_tokens}
    caches = {"dynamic": {}}
    if setup.device.type == "cuda":
        caches["static_compiled"] = {"cache_implementation": "static"}
    return figures | decoding_figures(model.llm, runtime.image_embeddings(setup.volume), setup.args.new_tokens, caches)


def chat_model(setup: Setup):
    """CTChatModel: a random Llama-3.1-8B shape in bf16 on CUDA; the real SmolLM2-135M on CPU."""
    from small_chat_models import save_projector, smollm2_gguf

    from CTFoundationLib.models.ctchat.modeling import CTChatModel

    token_dim = setup.config.vision.dim
    if setup.device.type != "cuda":
        projector = save_projector(setup.args.workdir / "projector_576.bin", 576, token_dim)
        return CTChatModel.load(smollm2_gguf(), None, projector, template="chatml_direct", device="cpu")
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = setup.args.workdir / "llama8b_shape"
    if not (folder / "config.json").exists():
        torch.manual_seed(0)
        with torch.device(setup.device):
            llm = LlamaForCausalLM(LlamaConfig(**LLAMA_8B, torch_dtype="bfloat16")).to(torch.bfloat16)
        llm.save_pretrained(folder)
        smollm_tokenizer_to(folder)
    projector = save_projector(setup.args.workdir / "projector_4096.bin", LLAMA_8B["hidden_size"], token_dim)
    return CTChatModel.load(folder, None, projector, template="llama3", device="cuda", precision="bf16")


def smollm_tokenizer_to(folder: Path) -> None:
    """A tokenizer for the random Llama (its ids stay below the vocabulary size; the text is not read)."""
    from small_chat_models import smollm2_gguf
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(smollm2_gguf().parent, gguf_file=smollm2_gguf().name).save_pretrained(folder)


def decoding_figures(llm, image: torch.Tensor, tokens: int, caches: dict[str, dict]) -> dict:
    """Tokens/s of transformers' generate forced to `tokens` new tokens (a random projector's answer may end at
    once), per named set of generate options (the dynamic cache; the static cache, compiled by transformers)."""
    embeds = torch.cat([image, llm.get_input_embeddings()(torch.arange(40, device=image.device))[None]], dim=1)
    figures = {}
    for name, options in caches.items():
        run = lambda: llm.generate(inputs_embeds=embeds, max_new_tokens=tokens, min_new_tokens=tokens,  # noqa: E731
                                   do_sample=False, **options)
        run()  # warm-up (compiles the static-cache graph)
        seconds = median_s(run, image.device, 3)
        figures[f"generate_{name}_tokens_per_s"] = tokens / seconds
    return figures


def train_part(setup: Setup) -> dict:
    """A full contrastive step at --train-batch, without and with gradient checkpointing."""
    runtime = setup.runtime()
    volume, tokenizer, size = runtime.prepare(setup.volume), runtime.tokenizer, setup.args.train_batch
    batch = {"image": volume.expand(size, *volume.shape[1:]).contiguous(),
             "text": ["Lungs are clear. No pleural effusion."] * size}
    return train_step_figures(setup, batch, tokenizer, False) | train_step_figures(setup, batch, tokenizer, True)


def train_step_figures(setup: Setup, batch: dict, tokenizer, checkpointing: bool) -> dict:
    from training.modeling import TrainableCTCLIP, build_clip, enable_gradient_checkpointing
    from training.recipes import contrastive_step

    device, figures, suffix = setup.device, {}, "_checkpointing" if checkpointing else ""
    model = TrainableCTCLIP(build_clip(setup.config)).to(device)
    if checkpointing:
        enable_gradient_checkpointing(model.clip)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-6)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = contrastive_step(model, batch, tokenizer)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    with peak_memory(device, figures, f"train_peak_gb{suffix}"):
        seconds = median_s(step, device, max(1, setup.args.repeats // 3))
    return figures | {f"train_step_s{suffix}": seconds, f"train_volumes_per_s{suffix}": len(batch["text"]) / seconds}


def reference_part(setup: Setup) -> dict:
    args = setup.args
    if args.reference_python is None or args.reference_checkout is None:
        return {}
    volume = args.workdir / "reference_input.pt"
    torch.save(setup.runtime(torch.device("cpu")).prepare(setup.volume), volume)
    command = [str(args.reference_python), str(Path(__file__).parent / "reference_pass.py"),
               "--checkout", str(args.reference_checkout), "--checkpoint", str(setup.checkpoint),
               "--volume", str(volume), "--vocab", str(VOCAB), "--constructors", str(setup.constructors),
               "--device", args.device, "--passes", str(max(2, args.repeats))]
    result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
    return {"reference_pass_ms": 1e3 * result["reference_pass_s"],
            "reference_image_tower_ms": 1e3 * result["image_tower_s"],
            "reference_peak_gb": result.get("peak_gb")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    parser.add_argument("--small", action="store_true", help="the tests' small CT-CLIP on the 3 mm RICORD")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "ctfoundation-bench")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--cases", type=int, default=32, help="cases per batch report (copies of one CT)")
    parser.add_argument("--read-workers", type=int, default=8)
    parser.add_argument("--train-batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", type=Path, help="write every figure here")
    parser.add_argument("--reference-python", type=Path)
    parser.add_argument("--reference-checkout", type=Path)
    args = parser.parse_args()
    unknown = set(args.parts.split(",")) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}; choose from {', '.join(PARTS)}")

    setup = Setup(args)
    name = torch.cuda.get_device_name(setup.device) if setup.device.type == "cuda" else "CPU"
    figures = {"device": name, "torch": torch.__version__, "small_model": args.small}
    for part in PARTS:
        if part in args.parts.split(","):
            started = time.perf_counter()
            figures |= globals()[f"{part}_part"](setup)
            print(f"[{part}: {time.perf_counter() - started:.0f} s]", file=sys.stderr)
    for key, value in figures.items():
        print(f"{key:44s} {value:.4g}" if isinstance(value, float) else f"{key:44s} {value}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
