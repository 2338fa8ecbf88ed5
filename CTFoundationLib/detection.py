"""CT-CLIP v2 detection of the 18 CT-RATE abnormalities: one image pass per volume, prompt latents cached.

`CTCLIPRuntime` holds one loaded checkpoint (+ tokenizer) and turns CT volumes into image latents,
token grids and findings; texts into text latents. Zero-shot checkpoints (CT-CLIP v2, VocabFine) score
"{name} is present." against "{name} is not present."; the LiPro checkpoint uses its linear head.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import CheckpointError, CTFoundationError
from .models.ctclip import (
    CT_RATE_ABNORMALITIES,
    CTCLIPConfig,
    encode_zero_shot_prompts,
    load_ctclip,
    tokenize,
    zero_shot_probabilities,
)
from .preprocess import CTCLIP_V2, PreprocessSpec, preprocess
from .results import DetectionResult, Finding  # noqa: F401  (re-exported: their historical home)
from .volume import CTVolume
from .weights.cache import cache_root, read_json, sha256_file, write_json_atomic

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
Progress = Callable[[str], None]


def select_device(device: str = "auto") -> torch.device:
    """'auto' -> CUDA when present, else CPU; 'cuda' without a GPU is a clear error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CTFoundationError("--device cuda was asked for but PyTorch sees no CUDA GPU; use --device cpu")
    return torch.device(device)


def load_thresholds(source: Path | Mapping[str, float] | None, names: Sequence[str] = CT_RATE_ABNORMALITIES) -> dict:
    """Per-finding decision thresholds from a JSON file ({name: value} or {"thresholds": {...}}) or a mapping."""
    if source is None:
        return {}
    if isinstance(source, Mapping):
        table = dict(source)
    else:
        try:
            table = json.loads(Path(source).read_text())
        except (OSError, ValueError) as error:
            raise CTFoundationError(f"thresholds file {source} cannot be read as JSON ({error})") from error
        table = table.get("thresholds", table) if isinstance(table, dict) else None
    if not isinstance(table, dict):
        raise CTFoundationError(f"thresholds {source}: expected a JSON object mapping finding names to numbers")
    unknown = sorted(set(table) - set(names))
    if unknown:
        raise CTFoundationError(f"thresholds {source}: unknown findings {unknown}; use the names {list(names)}")
    bad = {k: v for k, v in table.items() if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0}
    if bad:
        raise CTFoundationError(f"thresholds {source}: values must be probabilities in [0, 1], got {bad}")
    return {name: float(value) for name, value in table.items()}


def file_sha256(path: Path, cache_file: Path | None = None) -> str:
    """sha256 of a file, remembered in `cache_file` by (path, size, mtime) so big checkpoints hash once."""
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    known = read_json(cache_file, {}) if cache_file else {}
    if key in known:
        return known[key]
    digest = sha256_file(path)
    if cache_file:
        known[key] = digest
        write_json_atomic(cache_file, known)
    return digest


def load_tokenizer(folder: Path):
    """The CXR-BERT (BERT WordPiece) tokenizer from a local folder holding vocab.txt, lower-casing as CT-CLIP."""
    from transformers import BertTokenizerFast

    vocab = folder / "vocab.txt" if folder.is_dir() else folder
    if not vocab.is_file():
        raise CheckpointError(
            f"text encoder {folder}: no vocab.txt found. Give the CXR-BERT folder "
            "(`ctfoundation weights download cxr-bert`) or a vocab.txt file."
        )
    with open(vocab, encoding="utf-8") as handle:
        size = len({line.rstrip("\r\n") for line in handle})  # distinct tokens: a repeated line adds none
    # transformers 4 takes the file as `vocab_file`; transformers 5 ignores that silently (a 5-token vocabulary that
    # makes every word [UNK]) and takes it as `vocab`: keep the one whose vocabulary is the file's
    for argument in ("vocab_file", "vocab"):
        try:
            tokenizer = BertTokenizerFast(**{argument: str(vocab)}, do_lower_case=True)
        except (TypeError, ValueError, OSError):
            continue
        if len(tokenizer) == size:
            return tokenizer
    raise CheckpointError(f"text encoder {vocab}: transformers could not build a WordPiece tokenizer of its {size} entries")


class CTCLIPRuntime:
    """One CT-CLIP v2 checkpoint ready for inference.

    checkpoint: CT-CLIP_v2.pt / CT_VocabFine_v2.pt / CT_LiPro_v2.pt or a file in the same layout.
    tokenizer_source: CXR-BERT folder or vocab.txt (needed for zero-shot and text; not for LiPro).
    config: model sizes for non-standard checkpoints (default: full-size v2).
    thresholds: the model's own per-finding thresholds, used when `detect` is given none.
    cache_dir: where prompt latents and checkpoint hashes are kept (default: $CTFOUNDATION_HOME/runtime).
    """

    def __init__(
        self,
        checkpoint: Path,
        tokenizer_source: Path | None = None,
        model_id: str = "ct-clip-v2",
        config: CTCLIPConfig | None = None,
        device: str = "auto",
        dtype: str = "fp32",
        cache_dir: Path | None = None,
        spec: PreprocessSpec = CTCLIP_V2,
        progress: Progress | None = None,
        thresholds: Mapping[str, float] | None = None,
    ) -> None:
        if dtype not in DTYPES:
            raise CTFoundationError(f"dtype must be one of {sorted(DTYPES)}, got {dtype}")
        self.model_id, self.spec, self.dtype = model_id, spec, dtype
        self.thresholds = dict(thresholds or {})
        self.checkpoint = Path(checkpoint)
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.device = select_device(device)
        self._progress = progress or (lambda message: None)
        self.timings_s: dict[str, float] = {}
        with self._timed("load_model"):
            self.model = load_ctclip(self.checkpoint, config, device=self.device, dtype=DTYPES[dtype])
            self.checkpoint_sha256 = file_sha256(self.checkpoint, self.cache_dir / "checkpoint_hashes.json")
        self.tokenizer = load_tokenizer(Path(tokenizer_source)) if tokenizer_source else None
        self._prompt_latents: torch.Tensor | None = None
        self.keep_tokens = False  # True: keep the last volume's token grid, for a second reader of the same CT
        self._kept: tuple[CTVolume, torch.Tensor, torch.Tensor] | None = None

    @property
    def latent_dim(self) -> int:
        return self.model.config.dim_latent

    @property
    def method(self) -> str:
        return "lipro" if self.model.classifier is not None else "zero-shot"

    @contextlib.contextmanager
    def _timed(self, name: str) -> Iterator[None]:
        """Report the step to the progress callback and record its wall time in `timings_s`."""
        self._progress(name.replace("_", " "))
        start = time.perf_counter()
        yield
        self.timings_s[name] = round(time.perf_counter() - start, 3)

    def prepare(self, volume: CTVolume) -> torch.Tensor:
        """CT volume -> (1, 1, 240, 480, 480) model input."""
        with self._timed("preprocess"):
            return torch.from_numpy(preprocess(volume, self.spec))[None]

    def encode_volume(self, volume: CTVolume, return_tokens: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One image pass: L2-normalised latent (1, 512) and, on request, the quantised token grid (1, 24, 24, 24, 512).

        With `keep_tokens`, a second call for the same volume object reuses the pass (e.g. detection, then CT-CHAT).
        """
        if self._kept is not None and self._kept[0] is volume:
            return self._kept[1], (self._kept[2] if return_tokens else None)
        tensor = self.prepare(volume)
        with self._timed("encode_image"):
            latent, tokens = self.model.encode_image(tensor, return_tokens=return_tokens or self.keep_tokens)
        latent, tokens = latent.float().cpu(), (tokens.float().cpu() if tokens is not None else None)
        if self.keep_tokens:
            self._kept = (volume, latent, tokens)
        return latent, (tokens if return_tokens else None)

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Free texts -> L2-normalised latents (K, 512); each text tokenised without padding to 512."""
        with self._timed("encode_text"):
            ids, mask = tokenize(self._require_tokenizer(), texts)
            return self.model.encode_text(ids, mask).float().cpu()

    def prompt_latents(self) -> torch.Tensor:
        """(18, 2, 512) [present, not present] latents, cached on disk per checkpoint and vocabulary."""
        if self._prompt_latents is None:
            path = self._prompt_cache_path()
            if path.is_file():
                with self._timed("encode_prompts_cached"):
                    self._prompt_latents = load_file(path)["prompt_latents"]
            else:
                with self._timed("encode_prompts"):
                    latents = encode_zero_shot_prompts(self.model, self._require_tokenizer()).float().cpu()
                path.parent.mkdir(parents=True, exist_ok=True)
                temporary = path.with_suffix(f".tmp{os.getpid()}")
                save_file({"prompt_latents": latents.contiguous()}, temporary)
                os.replace(temporary, path)
                self._prompt_latents = latents
        return self._prompt_latents

    def probabilities(self, image_latents: torch.Tensor) -> torch.Tensor:
        """(B, 512) image latents -> (B, 18) P(present)."""
        if self.method == "lipro":
            return self.model.lipro_probabilities(image_latents.to(self.device)).float().cpu()
        return zero_shot_probabilities(image_latents, self.prompt_latents(), self.model.logit_scale.float().cpu())

    def detect(self, volume: CTVolume, thresholds: Mapping[str, float] | None = None) -> DetectionResult:
        """Findings for one volume: the image is encoded once and scored against all 18 findings."""
        started = time.perf_counter()
        latent, _ = self.encode_volume(volume)
        with self._timed("score"):
            probabilities = self.probabilities(latent)[0].tolist()
        thresholds = thresholds or self.thresholds
        findings = [
            Finding(name, round(p, 6), thresholds.get(name), (p >= thresholds[name]) if name in thresholds else None)
            for name, p in zip(CT_RATE_ABNORMALITIES, probabilities)
        ]
        self.timings_s["detect_total"] = round(time.perf_counter() - started, 3)
        return DetectionResult(
            model=self.model_id,
            method=self.method,
            checkpoint=str(self.checkpoint),
            checkpoint_sha256=self.checkpoint_sha256,
            device=str(self.device),
            dtype=self.dtype,
            findings=findings,
            timings_s=dict(self.timings_s),
        )

    def _require_tokenizer(self):
        if self.tokenizer is None:
            raise CheckpointError(
                f"{self.model_id} needs the CXR-BERT tokenizer for text: pass --text-encoder DIR "
                "(`ctfoundation weights download cxr-bert`)"
            )
        return self.tokenizer

    def _prompt_cache_path(self) -> Path:
        vocab = sorted(self._require_tokenizer().get_vocab().items())
        vocab_hash = hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:12]
        return self.cache_dir / "prompt_latents" / f"{self.checkpoint_sha256[:16]}-{vocab_hash}.safetensors"


def default_cache_dir() -> Path:
    """Runtime caches (prompt latents, checkpoint hashes) inside the weights cache ($CTFOUNDATION_HOME)."""
    return cache_root() / "runtime"
