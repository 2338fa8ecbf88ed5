"""CT-CLIP v2 detection of the 18 CT-RATE abnormalities: one image pass per volume, prompt latents cached.

`CTCLIPRuntime` holds one loaded checkpoint (+ tokenizer) and turns CT volumes into image latents,
token grids and findings; texts into text latents. Zero-shot checkpoints (CT-CLIP v2, VocabFine) score
"{name} is present." against "{name} is not present."; the LiPro checkpoint uses its linear head.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

from CTFoundationLib.errors import CheckpointError, CTFoundationError, WeightsError
from CTFoundationLib.inference.common import (
    Progress,
    StepTimer,
    cached_tensor,
    default_cache_dir,
    file_sha256,
    load_thresholds,
)
from CTFoundationLib.inference.maps import (
    FindingMaps,
    TokenGrid,
    maps_record,
    token_contributions,
    write_map_niftis,
)
from CTFoundationLib.inference.results import DetectionResult, Finding
from CTFoundationLib.io.files import atomic_path
from CTFoundationLib.io.volume import CTVolume
from CTFoundationLib.models.ctclip import (
    CTCLIPConfig,
    attach_text_tower,
    encode_zero_shot_prompts,
    load_ctclip,
    read_ctclip_config,
    tokenize,
    zero_shot_probabilities,
)
from CTFoundationLib.models.devices import select_device
from CTFoundationLib.preprocess import CTCLIP_V2, SPECS, PreprocessSpec, preprocess_tensor
from CTFoundationLib.vocab import CT_RATE_ABNORMALITIES
from CTFoundationLib.weights import load_registry, resolve_weights

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def vocab_file(folder: Path) -> Path:
    """The vocab.txt of a CXR-BERT folder (or the file itself); a clear error when there is none."""
    vocab = folder / "vocab.txt" if folder.is_dir() else folder
    if not vocab.is_file():
        raise CheckpointError(
            f"text encoder {folder}: no vocab.txt found. Give the CXR-BERT folder "
            "(`ctfoundation weights download cxr-bert`) or a vocab.txt file."
        )
    return vocab


def load_tokenizer(folder: Path):
    """The CXR-BERT (BERT WordPiece) tokenizer from a local folder holding vocab.txt, lower-casing as CT-CLIP."""
    from transformers import BertTokenizerFast

    vocab = vocab_file(folder)
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
    raise CheckpointError(
        f"text encoder {vocab}: transformers could not build a WordPiece tokenizer of its {size} entries")


class CTCLIPRuntime:
    """One CT-CLIP v2 checkpoint ready for inference.

    checkpoint: CT-CLIP_v2.pt / CT_VocabFine_v2.pt / CT_LiPro_v2.pt or a file in the same layout.
    tokenizer_source: CXR-BERT folder or vocab.txt (needed for zero-shot and text; not for LiPro).
    config: model sizes for non-standard checkpoints (default: full-size v2).
    thresholds: the model's own per-finding thresholds, used when `detect` is given none.
    notice: what the registry says to show whenever the model is used (e.g. a demo model's limits).
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
        notice: str = "",
    ) -> None:
        if dtype not in DTYPES:
            raise CTFoundationError(f"dtype must be one of {sorted(DTYPES)}, got {dtype}")
        self.model_id, self.spec, self.dtype, self.notice = model_id, spec, dtype, notice
        self.thresholds = dict(thresholds or {})
        self.checkpoint = Path(checkpoint)
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.device = select_device(device)
        self._timed = StepTimer(progress, label=lambda step: step.replace("_", " "))
        self.timings_s = self._timed.seconds
        require_input_size(config or CTCLIPConfig.full_size(), spec, model_id)
        self._config = config
        with self._timed("load_model"):  # the image tower; the text tower follows when text is first encoded
            self.model = load_ctclip(self.checkpoint, config, device=self.device, dtype=DTYPES[dtype], with_text=False)
            self.checkpoint_sha256 = file_sha256(self.checkpoint, self.cache_dir / "checkpoint_hashes.json")
        # transformers is imported only when text is encoded: cached prompt latents need the vocabulary's hash alone
        self.vocab = vocab_file(Path(tokenizer_source)) if tokenizer_source else None
        self._tokenizer = None
        self._prompt_latents: torch.Tensor | None = None
        self.keep_tokens = False  # True: keep the last volume's token grid, for a second reader of the same CT
        self._kept: tuple[CTVolume, torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def from_registry(
        cls,
        model_id: str = "ct-clip-v2",
        *,
        weights: Path | str | None = None,
        model_config: Path | str | None = None,
        text_encoder: Path | str | None = None,
        device: str = "auto",
        dtype: str = "fp32",
        with_text: bool | None = None,
        home: Path | str | None = None,
        progress: Progress | None = None,
    ) -> CTCLIPRuntime:
        """A registered CT-CLIP checkpoint, its input spec, sizes, tokenizer and thresholds as the registry says.

        weights / model_config / text_encoder: local files instead of the installed ones (a weights file brings
        no thresholds). with_text: load the tokenizer (default: when the model's task needs prompts).
        """
        spec = load_registry().get(model_id)
        if spec.family != "ct-clip":
            raise WeightsError(f"{model_id} is not a CT-CLIP model; use one of {load_registry().ids('ct-clip')}")
        runtime = spec.runtime
        checkpoint = resolve_weights(model_id, weights, home=home)

        def installed(name: str | None, given: Path | str | None) -> Path | None:
            """`given`, else the file the registry names in the installed model's folder (None: neither)."""
            if given is not None or not name:
                return Path(given) if given is not None else None
            folder = checkpoint.parent if weights is None else resolve_weights(model_id, home=home).parent
            return folder / name

        config_file = installed(runtime.constructors, model_config)
        config = read_ctclip_config(config_file) if config_file else None
        tokenizer = None
        if runtime.needs_text if with_text is None else with_text:
            tokenizer = installed(runtime.tokenizer, text_encoder) or resolve_weights(
                runtime.text_encoder or "cxr-bert", home=home)
        return cls(
            checkpoint,
            tokenizer,
            model_id=model_id,
            config=config,
            device=device,
            dtype=dtype,
            spec=preprocess_spec(model_id, runtime.preprocess or "ct-clip-v2"),
            progress=progress,
            thresholds=None if weights else load_thresholds(installed(runtime.thresholds, None)),
            notice=runtime.notice,
        )

    @property
    def tokenizer(self):
        """The WordPiece tokenizer of `vocab`, loaded on first use (None without a vocabulary)."""
        if self._tokenizer is None and self.vocab is not None:
            self._tokenizer = load_tokenizer(self.vocab)
        return self._tokenizer

    @property
    def latent_dim(self) -> int:
        return self.model.config.dim_latent

    @property
    def method(self) -> str:
        return "lipro" if self.model.classifier is not None else "zero-shot"

    def prepare(self, volume: CTVolume) -> torch.Tensor:
        """CT volume -> (1, 1, 240, 480, 480) model input, preprocessed on the model's device."""
        with self._timed("preprocess"):
            return preprocess_tensor(volume, self.spec, self.device)[None]

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
            return self._text_model().encode_text(ids, mask).float().cpu()

    def prompt_latents(self) -> torch.Tensor:
        """(18, 2, 512) [present, not present] latents, cached on disk per checkpoint and vocabulary."""
        if self._prompt_latents is None:
            path = self._prompt_cache_path()
            if path.is_file():
                with self._timed("encode_prompts_cached"):
                    self._prompt_latents = cached_tensor(path, "prompt_latents",
                                                         (len(CT_RATE_ABNORMALITIES), 2, self.latent_dim))
            if self._prompt_latents is None:
                with self._timed("encode_prompts"):
                    latents = encode_zero_shot_prompts(self._text_model(), self._require_tokenizer()).float().cpu()
                with atomic_path(path) as temporary:
                    save_file({"prompt_latents": latents.contiguous()}, temporary)
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

    def _text_model(self):
        """The model with its text tower, loaded from the checkpoint on first need (transformers comes with it)."""
        if self.model.text_transformer is None:
            with self._timed("load_text_tower"):
                attach_text_tower(self.model, self.checkpoint)
        return self.model

    def require_maps(self) -> None:
        """A CTFoundationError unless this checkpoint has finding maps (zero-shot heads do, LiPro does not)."""
        if self.method == "lipro":
            raise CTFoundationError(
                f"{self.model_id}: maps need a zero-shot checkpoint (the LiPro head takes relu of the normalised "
                "latent, which does not split into per-token terms); use CT-CLIP_v2.pt or CT_VocabFine_v2.pt")

    def finding_maps(self, volume: CTVolume) -> FindingMaps:
        """Per-finding token maps of one CT (one image pass, shared with `detect` under `keep_tokens`): each token's
        exact share of the finding's zero-shot logit difference, placed in patient space (see inference.maps)."""
        self.require_maps()
        _, tokens = self.encode_volume(volume, return_tokens=True)
        with self._timed("maps"):
            terms = token_contributions(self.model, tokens, self.prompt_latents())[0]
            vision = self.model.config.vision
            grid = TokenGrid.of_model_input(volume, self.spec, (vision.temporal_patch_size, *vision.patch_size),
                                            terms.shape[1:])
        return FindingMaps(list(CT_RATE_ABNORMALITIES), terms.float().numpy(), grid, self.model_id)

    def write_maps(self, volume: CTVolume, folder: Path, names: Sequence[str] | None = None, grid: str = "ct"
                   ) -> dict:
        """`finding_maps` of the CT as one NIfTI per finding (all, or `names`) in `folder` (grid: "ct" or
        "tokens", see `write_map_niftis`); returns the `maps_record` for a result JSON."""
        maps = self.finding_maps(volume)
        with self._timed("write_maps"):
            written = write_map_niftis(maps, volume, Path(folder), names, grid)
        return maps_record(Path(folder), written, self.model_id, grid)

    def _require_tokenizer(self):
        if self.tokenizer is None:
            raise CheckpointError(
                f"{self.model_id} needs the CXR-BERT tokenizer for text: pass --text-encoder DIR "
                "(`ctfoundation weights download cxr-bert`)"
            )
        return self.tokenizer

    def _prompt_cache_path(self) -> Path:
        if self.vocab is None:
            self._require_tokenizer()
        vocab_hash = hashlib.sha256(self.vocab.read_bytes()).hexdigest()[:12]
        return self.cache_dir / "prompt_latents" / f"{self.checkpoint_sha256[:16]}-{vocab_hash}.safetensors"


def preprocess_spec(model_id: str, name: str) -> PreprocessSpec:
    """The registry's preprocess name of a model as its PreprocessSpec."""
    if name not in SPECS:
        raise CTFoundationError(f"model {model_id}: the registry names preprocess '{name}'; known: {sorted(SPECS)}")
    return SPECS[name]


def require_input_size(config: CTCLIPConfig, spec: PreprocessSpec, model_id: str) -> None:
    """The preprocessing must give the input the model takes: (D, H, W) with (H, W) its image size and D a multiple
    of its temporal patch; else a clear error before any work (a crop of another size is another field of view)."""
    depth, *in_plane = spec.shape
    vision = config.vision
    if tuple(in_plane) != tuple(vision.image_size) or depth % vision.temporal_patch_size:
        raise CTFoundationError(
            f"{model_id}: the model config takes {vision.image_size[0]} x {vision.image_size[1]} slices in stacks of "
            f"{vision.temporal_patch_size}, but its preprocessing '{spec.name}' gives "
            f"{' x '.join(map(str, spec.shape))}; give the constructor JSON that belongs to these weights "
            "(--model-config), or use the registry model whose preprocessing matches")
