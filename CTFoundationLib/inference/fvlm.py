"""fVLM organ-wise zero-shot detection on a CT + organ masks, in the reference's numbers (fvlm eval.py).

Pipeline (`prepare_fvlm_input`, then `score_windows`):
1. CT and organ labels (1 lung, 2 heart, 3 esophagus, 4 aorta; `AnatomyMasks.fvlm_labels`) viewed as
   (Z sup, Y post, X left), resampled to 3 x 1 x 1 mm (trilinear for HU, nearest for labels), HU window
   -1150..350 -> 0..1 (the `FVLM` spec);
2. cropped to the box of all organs widened by (5, 20, 20) voxels and padded symmetrically with 0 to at least
   (112, 256, 352) (`FVLM_WINDOWS`);
3. mode "organ" (eval.py): for each organ present, a window of at least (112, 288, 352) centred on it, padded at
   its end to a multiple of (16, 16, 32); the window's mask keeps only that organ, which is pooled from the
   ViT tokens and scored against its findings' [negative, positive] prompts; P(positive) = softmax second entry
   (mean over windows: one per organ). Windows with identical bounds are encoded once.
   mode "whole": one pass over the whole padded volume with every organ, organs dropped by the reference's
   validity rules (`window_validity`): touching the window border (2 voxels) or under 90 % of the organ inside.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from CTFoundationLib import __version__
from CTFoundationLib.errors import AnatomyError, CheckpointError, CTFoundationError
from CTFoundationLib.inference.common import Progress, StepTimer, default_cache_dir, file_sha256
from CTFoundationLib.inference.ctclip import load_tokenizer
from CTFoundationLib.inference.maps import FindingMaps, TokenGrid, model_grid_affine
from CTFoundationLib.inference.results import Finding
from CTFoundationLib.io.volume import CTVolume
from CTFoundationLib.models.devices import select_device
from CTFoundationLib.models.fvlm import (
    FVLM,
    ZERO_SHOT_ITEMS,
    FVLMConfig,
    ZeroShotItem,
    encode_prompt_pairs,
    load_fvlm,
    read_fvlm_config,
    zero_shot_token_terms,
)
from CTFoundationLib.preprocess import FVLM as FVLM_SPEC
from CTFoundationLib.preprocess import (
    FVLM_WINDOWS,
    ORGAN_WINDOWS,
    SPECS,
    OrganWindowSpec,
    PreprocessSpec,
    crop_to_labels,
    organ_window,
    pad_end_to_multiple,
    pad_symmetric,
    resample_hu,
    resample_labels,
)
from CTFoundationLib.weights import load_registry, resolve_weights

BORDER_MARGIN = 2  # voxels: an organ this close to the window border is cut off (whole mode)
MIN_ORGAN_FRACTION = 0.9  # of the organ's voxels inside the window (whole mode)
MODES = ("organ", "whole")


@dataclass
class FVLMInput:
    """fVLM's processed volume: image (Z, Y, X) float32 in [0, 1] and organ ids (Z, Y, X) uint8, same grid;
    origin: the index on the resampled (3 x 1 x 1 mm) grid of its voxel 0 (crop start minus padding), to place
    tokens back in the CT."""

    image: np.ndarray
    labels: np.ndarray
    organs: tuple[str, ...]
    origin: tuple[int, int, int] = (0, 0, 0)

    def organ_voxels(self) -> dict[str, int]:
        counts = np.bincount(self.labels.ravel(), minlength=len(self.organs) + 1)
        return {organ: int(counts[i + 1]) for i, organ in enumerate(self.organs)}


def prepare_fvlm_input(volume: CTVolume, organ_labels: np.ndarray, organs: tuple[str, ...],
                       spec: PreprocessSpec = FVLM_SPEC, windows: OrganWindowSpec = FVLM_WINDOWS) -> FVLMInput:
    """CT + organ ids on its grid (i, j, k) -> the processed, organ-cropped, padded volume (steps 1-2)."""
    if organ_labels.shape != volume.shape_ijk:
        raise AnatomyError(f"organ labels of shape {organ_labels.shape} do not match the CT {volume.shape_ijk}")
    if not organ_labels.any():
        raise AnatomyError(f"none of the fVLM organs {list(organs)} is in the anatomy masks of {volume.source}")
    oriented = volume.reoriented(spec.axis_codes)
    oriented_labels = CTVolume(organ_labels, volume.affine_ras).reoriented(spec.axis_codes).hu
    image = resample_hu(oriented.hu, oriented.spacing_ijk_mm, spec)
    labels = resample_labels(oriented_labels, oriented.spacing_ijk_mm, spec)
    if not labels.any():
        raise AnatomyError(f"the organ masks of {volume.source} vanish at fVLM's 3 x 1 x 1 mm grid (too small)")
    box = crop_to_labels(image, labels, windows.box_margin)
    # pad_symmetric puts (missing // 2) voxels before the crop
    origin = tuple(b.start - max(m - (b.stop - b.start), 0) // 2 for b, m in zip(box, windows.min_shape))
    return FVLMInput(pad_symmetric(image[box], windows.min_shape, spec.pad_value),
                     pad_symmetric(labels[box], windows.min_shape, 0), organs, origin)


def window_validity(labels: np.ndarray, organ_voxels: Mapping[str, int], organs: Sequence[str],
                    skip: str | None = None) -> dict[str, str | None]:
    """Per organ in a window's labels: None when it may be scored, else why not (forward_test_win's rules).

    An organ within BORDER_MARGIN voxels of any window face is cut off; one with under MIN_ORGAN_FRACTION of its
    whole-volume voxels inside is incomplete. `skip` (the window's target organ) is exempt from both.
    """
    border = np.zeros(labels.shape, bool)
    for axis in range(labels.ndim):
        index = [slice(None)] * labels.ndim
        index[axis] = np.r_[0:BORDER_MARGIN, labels.shape[axis] - BORDER_MARGIN:labels.shape[axis]]
        border[tuple(index)] = True
    on_border = set(np.unique(labels[border]).tolist())
    counts = np.bincount(labels.ravel(), minlength=len(organs) + 1)
    verdict = {}
    for organ_id, organ in enumerate(organs, start=1):
        if counts[organ_id] == 0:
            continue
        fraction = counts[organ_id] / organ_voxels[organ]
        if organ != skip and organ_id in on_border:
            verdict[organ] = f"touches the window border (within {BORDER_MARGIN} voxels)"
        elif organ != skip and fraction < MIN_ORGAN_FRACTION:
            verdict[organ] = f"only {fraction:.0%} of the organ is inside the window"
        else:
            verdict[organ] = None
    return verdict


@dataclass
class OrganFinding(Finding):
    organ: str = ""


@dataclass
class OrganStatus:
    """How one organ fared: 'scored', 'absent' (no mask) or 'dropped' (validity rules), with the window used."""

    organ: str
    status: str
    reason: str | None = None
    voxels: int = 0
    window_zyx: list[list[int]] | None = None  # [start, stop) per axis in the processed volume


@dataclass
class FVLMResult:
    """Per-organ P(positive) of fVLM's findings for one volume. JSON-serialisable via `to_dict`."""

    model: str
    checkpoint: str
    checkpoint_sha256: str
    device: str
    mode: str
    organs: list[OrganStatus]
    findings: list[OrganFinding]
    timings_s: dict[str, float] = field(default_factory=dict)
    software: str = f"ctfoundation {__version__}"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ScoredWindow:
    """What an organ was scored from: its window's start (processed voxels), pooling levels and token flags."""

    start: tuple[int, int, int]
    tokens: tuple[int, int, int]  # the token grid's shape (Z, Y, X)
    levels: torch.Tensor
    flags: torch.Tensor


@dataclass
class _WindowScores:
    probabilities: dict[ZeroShotItem, float]
    statuses: dict[str, OrganStatus]
    windows: dict[str, ScoredWindow] = field(default_factory=dict)


@torch.inference_mode()
def score_windows(model: FVLM, inp: FVLMInput, prompt_feats: torch.Tensor, items: Sequence[ZeroShotItem],
                  mode: str = "organ", roi: tuple[int, int, int] = FVLM_WINDOWS.roi,
                  progress: Progress | None = None) -> _WindowScores:
    """Step 3: P(positive) per item whose organ could be scored, every organ's status, and each scored organ's
    window (for its token maps).

    prompt_feats: (len(items), 2, E) from `encode_prompt_pairs`. Runs on the model's device.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode}")
    say = progress or (lambda message: None)
    organs, voxels = inp.organs, inp.organ_voxels()
    statuses = {o: OrganStatus(o, "absent", "no mask of this organ", 0) for o in organs if voxels[o] == 0}
    present = [o for o in organs if voxels[o] > 0]
    windows = {o: organ_window(inp.labels == organs.index(o) + 1, roi) for o in present} if mode == "organ" \
        else dict.fromkeys(present, tuple(slice(0, n) for n in inp.labels.shape))
    levels_by_window: dict[tuple, torch.Tensor] = {}
    feats, scored = {}, {}
    for number, organ in enumerate(present, start=1):
        bounds = windows[organ]
        key = tuple((s.start, s.stop) for s in bounds)
        target = organs.index(organ) + 1
        labels = inp.labels[bounds]
        labels = np.where(labels == target, labels, 0).astype(np.uint8) if mode == "organ" else labels
        labels = pad_end_to_multiple(labels, model.config.patch_size, 0)
        reason = window_validity(labels, voxels, organs, organ if mode == "organ" else None).get(organ)
        statuses[organ] = OrganStatus(organ, "dropped" if reason else "scored", reason, voxels[organ],
                                      [list(k) for k in key])
        if reason:
            continue
        if key not in levels_by_window:
            say(f"fvlm: encode window {len(levels_by_window) + 1} ({organ}, {number}/{len(present)})")
            image = pad_end_to_multiple(inp.image[bounds], model.config.patch_size, 0.0)
            levels_by_window[key] = model.visual_encoder(_as_batch(image, model))
        flags = model.organ_token_flags(_as_batch(labels, model))
        feats[organ] = model.pool_organs(levels_by_window[key], flags)[0, organs.index(organ)]
        tokens = tuple(n // p for n, p in zip(labels.shape, model.config.patch_size))
        scored[organ] = ScoredWindow(tuple(s.start for s in bounds), tokens, levels_by_window[key], flags)
    if not feats:
        return _WindowScores({}, statuses)
    organ_feats = torch.full((len(organs), prompt_feats.shape[-1]), float("nan"), device=prompt_feats.device)
    for organ, feat in feats.items():
        organ_feats[organs.index(organ)] = feat
    p_positive = model.zero_shot_p_positive(organ_feats, prompt_feats, items).tolist()
    probabilities = {item: p for item, p in zip(items, p_positive) if item.organ in feats}
    return _WindowScores(probabilities, statuses, scored)


def window_token_grid(volume: CTVolume, spec: PreprocessSpec, offset: Sequence[int], patch: Sequence[int],
                      tokens: Sequence[int]) -> TokenGrid:
    """Where the tokens of a window sit in the CT: the window's voxel 0 is `offset` voxels into the resampled grid
    (`FVLMInput.origin` + the window's start), token (a, b, c) covers `patch` voxels from there (ViT patches)."""
    patch_size = np.asarray(patch, float)
    to_voxels = np.eye(4)
    to_voxels[:3, :3] = np.diag(patch_size)
    to_voxels[:3, 3] = np.asarray(offset, float) + (patch_size - 1) / 2  # the token's centre
    return TokenGrid(tuple(int(n) for n in tokens), model_grid_affine(volume, spec) @ to_voxels)


def _as_batch(array: np.ndarray, model: FVLM) -> torch.Tensor:
    device = next(model.parameters()).device
    return torch.from_numpy(np.ascontiguousarray(array))[None, None].to(device)


class FVLMRuntime:
    """One fVLM checkpoint (+ CXR-BERT tokenizer) ready for organ-wise zero-shot scoring.

    checkpoint: fVLM `checkpoint_*.pth` ({'model': ...}) or a bare state dict file.
    tokenizer_source: CXR-BERT folder or vocab.txt. config: sizes for non-standard checkpoints.
    spec: the input `PreprocessSpec` (its organ windows: `ORGAN_WINDOWS`); model_id: the name results carry.
    The prompts are encoded once per runtime (`prompt_features`).
    """

    def __init__(self, checkpoint: Path, tokenizer_source: Path, config: FVLMConfig | None = None,
                 device: str = "auto", cache_dir: Path | None = None, progress: Progress | None = None,
                 items: Sequence[ZeroShotItem] = ZERO_SHOT_ITEMS, spec: PreprocessSpec = FVLM_SPEC,
                 model_id: str = "fvlm") -> None:
        self.checkpoint = Path(checkpoint)
        self.model_id, self.spec, self.windows = model_id, spec, ORGAN_WINDOWS[spec.name]
        self.device = select_device(device)
        self._progress = progress or (lambda message: None)
        self._timed = StepTimer(self._progress, label=lambda step: f"fvlm: {step.replace('_', ' ')}")
        self.timings_s = self._timed.seconds
        with self._timed("load_model"):
            self.model = load_fvlm(self.checkpoint, config).to(self.device)
            cache = Path(cache_dir) if cache_dir else default_cache_dir()
            self.checkpoint_sha256 = file_sha256(self.checkpoint, cache / "checkpoint_hashes.json")
        self.organs = self.model.config.organs
        self.items = [item for item in items if item.organ in self.organs]
        self.tokenizer = load_tokenizer(Path(tokenizer_source))
        self._prompt_feats: torch.Tensor | None = None
        self.keep_windows = False  # True: keep the last score's windows (pooling levels), for `finding_maps`
        self._kept: tuple[CTVolume, tuple[int, int, int], dict[str, ScoredWindow]] | None = None

    @classmethod
    def from_registry(
        cls,
        model_id: str = "fvlm",
        *,
        weights: Path | str | None = None,
        config: Path | str | None = None,
        text_encoder: Path | str | None = None,
        device: str = "auto",
        home: Path | str | None = None,
        progress: Progress | None = None,
    ) -> FVLMRuntime:
        """The installed fVLM (or `weights`) with the sizes, tokenizer and input spec the registry names in its
        folder (`runtime.constructors`, `.tokenizer`, `.preprocess`), else the released sizes and the registry's
        text encoder; `config` / `text_encoder` replace them."""
        runtime = load_registry().get(model_id).runtime
        checkpoint = resolve_weights(model_id, weights, home=home)

        def installed(name: str | None, given: Path | str | None) -> Path | str | None:
            """`given`, else the file the registry names in the installed model's folder (None: neither)."""
            if given is not None or not name:
                return given
            return (checkpoint.parent if weights is None else resolve_weights(model_id, home=home).parent) / name

        config, text_encoder = installed(runtime.constructors, config), installed(runtime.tokenizer, text_encoder)
        tokenizer = resolve_weights(runtime.text_encoder or "cxr-bert", text_encoder, home=home)
        return cls(checkpoint, tokenizer, read_fvlm_config(Path(config)) if config else None, device,
                   progress=progress, spec=SPECS[runtime.preprocess or FVLM_SPEC.name], model_id=model_id)

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts padded to max_txt_len (384) like the reference (padding='max_length', truncation)."""
        tokens = self.tokenizer(texts, padding="max_length", truncation=True,
                                max_length=self.model.config.max_txt_len, return_tensors="pt")
        if int(tokens["input_ids"].max()) >= self.model.config.vocab_size:
            raise CheckpointError(
                f"the tokenizer's vocabulary is larger than the fVLM checkpoint's ({self.model.config.vocab_size}); "
                "give the CXR-BERT tokenizer that fVLM was trained with"
            )
        return tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device)

    def prompt_features(self) -> torch.Tensor:
        """(n_items, 2, E) [negative, positive] prompt features, encoded on first use only."""
        if self._prompt_feats is None:
            with self._timed("encode_prompts"), torch.inference_mode():
                self._prompt_feats = encode_prompt_pairs(self.model, self.tokenize, self.items)
        return self._prompt_feats

    def score(self, volume: CTVolume, organ_labels: np.ndarray, thresholds: Mapping[str, float] | None = None,
              mode: str = "organ") -> FVLMResult:
        """Organ-wise findings of one CT; organ_labels: (i, j, k) uint8 ids 1..4 on the CT's grid."""
        started = time.perf_counter()
        with self._timed("preprocess"):
            inp = prepare_fvlm_input(volume, organ_labels, self.organs, self.spec, self.windows)
        prompts = self.prompt_features()
        with self._timed("encode_and_score"):
            scores = score_windows(self.model, inp, prompts, self.items, mode, self.windows.roi, self._progress)
        thresholds = thresholds or {}
        findings = [
            OrganFinding(item.finding, round(p, 6), thresholds.get(item.finding),
                         (p >= thresholds[item.finding]) if item.finding in thresholds else None, item.organ)
            for item, p in scores.probabilities.items()
        ]
        self.timings_s["score_total"] = round(time.perf_counter() - started, 3)
        self._kept = (volume, inp.origin, scores.windows) if self.keep_windows else None
        return FVLMResult(self.model_id, str(self.checkpoint), self.checkpoint_sha256, str(self.device), mode,
                          [scores.statuses[o] for o in self.organs], findings, dict(self.timings_s))

    def finding_maps(self, volume: CTVolume) -> dict[str, FindingMaps]:
        """Per scored organ, its findings' token maps from the last `score` of this volume object under
        `keep_windows` (no second pass): each token's exact share of the finding's logit difference
        (`zero_shot_token_terms`), 0 outside the organ, on the organ window's token grid placed in the CT
        (`window_token_grid`). The maps sum to the logit difference minus the per-finding constant."""
        if self._kept is None or self._kept[0] is not volume:
            raise CTFoundationError("fVLM maps come from the last score() of the same CT with keep_windows = True: "
                                    "set it, then score the CT")
        _, origin, windows = self._kept
        maps = {}
        with self._timed("maps"), torch.inference_mode():  # the kept levels are inference tensors
            for organ, window in windows.items():
                items = [item for item in self.items if item.organ == organ]
                prompts = self.prompt_features()[[self.items.index(item) for item in items]]
                terms, _ = zero_shot_token_terms(self.model, window.levels, window.flags, prompts, items)
                offset = tuple(o + w for o, w in zip(origin, window.start))
                grid = window_token_grid(volume, self.spec, offset, self.model.config.patch_size, window.tokens)
                values = terms.cpu().float().numpy().reshape(len(items), *window.tokens)
                maps[organ] = FindingMaps([item.finding for item in items], values, grid, self.model_id)
        return maps
