"""fVLM in training (alibaba-damo-academy/fvlm, BlipPretrain.forward): data, model, loss and export.

- Data: each volume goes through the library's own fVLM input preparation (`prepare_fvlm_input`: the spec's
  grid and HU window, crop to the organs, pad), with an organ label map (ids 1..n for the model's organs) from
  the library's anatomy sources. Per organ, the text is the report's sentences about it (the library's sentence
  grounding, regions mapped to fVLM organs through Resources/anatomy/anatomy.json; pleura counts as lung, as
  fVLM scores pleural effusion on the lung). An organ is abnormal when one of its sentences is not negated;
  a normal organ's text starts with the reference's template "<organ> shows no significant abnormalities."
  (followed by its negated sentences, if any).
- Model: the library's `FVLM` (exactly what `load_fvlm` / `FVLMRuntime` build), driven with gradients.
- Loss: per organ, image-text InfoNCE over the patients whose organ is intact (present and not touching the
  volume's faces), only for organs with at least one abnormal case in the (global) batch; the targets are the
  reference's dual false-negative reduction: besides the pair itself, two normal organs (texts that start with
  the template) and two identical texts are positives, each row normalised to sum 1. The loss is the sum over
  organs of (image->text + text->image) / 2. The temperature is clamped to [0.001, 0.5] before every step.
  Texts that start with the template and say more are encoded without it (as the reference does).
- Prompt term (optional, `train.prompt_weight` > 0 with `data.labels_csv`; not in the reference): for each of
  fVLM's zero-shot (organ, finding) items with a positive training case, the cross-entropy of the runtime's own
  [negative, positive] prompt logits (`FVLM.zero_shot_logits`) against the case's label, over the intact organs,
  summed over items: what CT-CLIP's VocabFine does for its prompts. Without it, "Not X." and "X." stay almost
  the same text to a small text tower trained for CPU minutes on reports, and zero-shot can point the wrong way.
- Image init (optional, `model.image_init`): the ViT from an MAE checkpoint (`load_mae_into_visual_encoder`).
- Export: `torch.save({"model": state_dict})` (the released checkpoint_*.pth layout) + constructors.json.
"""

from __future__ import annotations

import csv
import functools
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from torch.utils.data import Dataset

from CTFoundationLib.anatomy.masks import anatomy_table
from CTFoundationLib.anatomy.sentences import SentenceGrounder, default_grounder, split_sentences
from CTFoundationLib.errors import CTFoundationError, TrainingError
from CTFoundationLib.inference.fvlm import FVLMInput, prepare_fvlm_input
from CTFoundationLib.io.files import atomic_path
from CTFoundationLib.io.reading import read_ct
from CTFoundationLib.io.volume import CTVolume
from CTFoundationLib.models.checkpoint_io import as_state_dict, load_torch_file
from CTFoundationLib.models.fvlm import FVLM, ZERO_SHOT_ITEMS, FVLMConfig, ZeroShotItem
from CTFoundationLib.preprocess import OrganWindowSpec, PreprocessSpec
from training.ctrate import read_labels, read_reports
from training.modeling import FrozenTextPrefix, load_local_bert

NORMAL_TEMPLATE = "{organ} shows no significant abnormalities."
REGION_ORGANS = {"pleura": "lung"}  # regions without fVLM organ whose findings fVLM scores on an organ
# Vascular-wall findings that the grounding leaves in the mediastinum region (CT-RATE's "main vascular structures")
# and that fVLM scores on the aorta ("Arterial wall calcification").
AORTA_FINDING_WORDS = ("atheroma", "atheromatous", "atherosclerotic", "atherosclerosis", "plaque", "calcific",
                       "calcified", "calcification")
TEMPERATURE_RANGE = (0.001, 0.5)
OrganLabeller = Callable[[CTVolume, str], np.ndarray]  # (volume, volume name) -> uint8 ids 1..n on its grid


def normal_template(organ: str) -> str:
    return NORMAL_TEMPLATE.format(organ=organ)


def organ_of_path(path: str | None) -> str | None:
    """The fVLM organ of a RadGenome location path: that of the deepest anatomy.json entry on it, else
    REGION_ORGANS of its region; None when it belongs to no fVLM organ."""
    if not path:
        return None
    best, depth = None, -1
    for info in anatomy_table().values():
        if info.fvlm_organ and info.path and (path == info.path or path.startswith(info.path + "/")):
            if info.path.count("/") > depth:
                best, depth = info.fvlm_organ, info.path.count("/")
    return best or REGION_ORGANS.get(path.split("/")[0])


def organ_of_sentence(grounded) -> str | None:
    """The fVLM organ a grounded sentence is about (`organ_of_path`, plus mediastinal vascular-wall findings)."""
    organ = organ_of_path(grounded.path)
    if organ is None and grounded.region == "mediastinum":
        said = " ".join(m.text.lower() for m in grounded.mentions if m.region == "mediastinum")
        if any(word in said for word in AORTA_FINDING_WORDS):
            return "aorta"
    return organ


def organ_texts(report: str, organs: Sequence[str],
                grounder: SentenceGrounder | None = None) -> tuple[list[str], list[bool]]:
    """Per organ: (its text, whether it is abnormal) from the report's grounded sentences."""
    sentences: dict[str, list] = {organ: [] for organ in organs}
    for grounded in (grounder or default_grounder()).ground_report(report):
        organ = organ_of_sentence(grounded)
        if organ in sentences:
            sentences[organ].append(grounded)
    texts, abnormal = [], []
    for organ in organs:
        said = sentences[organ]
        positive = [s.text for s in said if not s.negated]
        if positive:
            texts.append(" ".join(s.text for s in said))
        else:
            texts.append(" ".join([normal_template(organ), *(s.text for s in said)]))
        abnormal.append(bool(positive))
    return texts, abnormal


def one_sentence(text: str, organ: str, generator: torch.Generator | None = None) -> str:
    """One sentence of an organ text drawn at random; a normal organ's keeps its template in front."""
    template = normal_template(organ)
    normal = text.startswith(template)
    sentences = split_sentences(text[len(template):] if normal else text)
    if not sentences:
        return text
    chosen = sentences[int(torch.randint(len(sentences), (1,), generator=generator))]
    return f"{template} {chosen}" if normal else chosen


@dataclass(frozen=True)
class FVLMCase:
    name: str
    path: Path
    texts: tuple[str, ...]
    abnormal: tuple[bool, ...]
    findings: tuple[float, ...] = ()  # 0/1 label of each prompt item (`prompt_items`), when trained on


def prompt_items(organs: Sequence[str], labels_csv: Path) -> tuple[ZeroShotItem, ...]:
    """fVLM's zero-shot items on the model's organs whose finding has a positive case in labels_csv (a pair
    without one teaches the prompt nothing about the finding)."""
    columns = read_csv_header(labels_csv)
    candidates = [item for item in ZERO_SHOT_ITEMS if item.organ in organs and item.finding in columns]
    if not candidates:
        return ()
    labels = np.stack(list(read_labels(labels_csv, tuple(item.finding for item in candidates)).values()))
    return tuple(item for item, positives in zip(candidates, labels.sum(axis=0)) if positives > 0)


def read_csv_header(path: Path) -> list[str]:
    with open(path, newline="") as handle:
        return next(csv.reader(handle), [])


def load_fvlm_cases(volumes: dict[str, Path], reports_csv: Path, organs: Sequence[str],
                    labels_csv: Path | None = None, items: Sequence[ZeroShotItem] = ()) -> list[FVLMCase]:
    """Cases of every volume with a report, in `volumes` order; `volumes`: VolumeName -> file. With items, each
    case carries its labels_csv label of every item's finding (a volume without a labels row is left out)."""
    reports = read_reports(reports_csv)
    labels = read_labels(labels_csv, tuple(item.finding for item in items)) if items and labels_csv else {}
    grounder = default_grounder()
    cases = []
    for name, path in volumes.items():
        if name in reports and (not items or name in labels):
            texts, abnormal = organ_texts(reports[name], organs, grounder)
            findings = tuple(float(v) for v in labels[name]) if items else ()
            cases.append(FVLMCase(name, path, tuple(texts), tuple(abnormal), findings))
    if not cases:
        raise TrainingError(f"none of the {len(volumes)} volumes has a row in {reports_csv}")
    return cases


class FVLMDataset(Dataset):
    """Items {"image": (1, Z, Y, X) float32, "labels": (Z, Y, X) uint8, "texts": [organ texts],
    "abnormal": (n_organs,) bool, "findings": (n_items,) float32 labels of `items` (empty without)}. With
    `cache_dir`, each prepared input is written once as float16 image + uint8 labels (`<name>.npz`) and read
    from there afterwards. sentence_per_item: each item carries one sentence of each organ text drawn at random
    (`one_sentence`) instead of the whole text."""

    def __init__(self, cases: list[FVLMCase], organs: Sequence[str], spec: PreprocessSpec,
                 windows: OrganWindowSpec, organ_labels: OrganLabeller, cache_dir: Path | None = None,
                 sentence_per_item: bool = False, items: Sequence[ZeroShotItem] = ()) -> None:
        self.sentence_per_item, self.items = sentence_per_item, tuple(items)
        if not cases:
            raise TrainingError("the fVLM training set is empty")
        self.cases, self.organs, self.spec, self.windows = cases, tuple(organs), spec, windows
        self.organ_labels, self.cache_dir = organ_labels, cache_dir

    def __len__(self) -> int:
        return len(self.cases)

    def prepared(self, index: int) -> FVLMInput:
        case = self.cases[index]
        cached = self.cache_dir / f"{case.name}.npz" if self.cache_dir else None
        if cached is not None and cached.is_file():
            with np.load(cached) as stored:
                return FVLMInput(stored["image"].astype(np.float32), stored["labels"], self.organs)
        volume = read_ct(case.path)
        inp = prepare_fvlm_input(volume, self.organ_labels(volume, case.name), self.organs, self.spec, self.windows)
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(cached) as temporary, open(temporary, "wb") as handle:
                np.savez(handle, image=inp.image.astype(np.float16), labels=inp.labels)
        return inp

    def __getitem__(self, index: int) -> dict:
        inp, case = self.prepared(index), self.cases[index]
        return {"image": torch.from_numpy(np.ascontiguousarray(inp.image))[None],
                "labels": torch.from_numpy(np.ascontiguousarray(inp.labels)),
                "texts": self.texts(case), "abnormal": torch.tensor(case.abnormal),
                "findings": torch.tensor(case.findings, dtype=torch.float32)}

    def texts(self, case: FVLMCase) -> list[str]:
        if not self.sentence_per_item:
            return list(case.texts)
        return [one_sentence(text, organ) for text, organ in zip(case.texts, self.organs)]


def collate_fvlm(items: list[dict]) -> dict:
    """Images and labels padded at their end to the batch's largest shape (0: outside the window)."""
    shape = np.max([item["labels"].shape for item in items], axis=0)

    def padded(tensor: Tensor) -> Tensor:
        pads = [p for size, target in zip(reversed(tensor.shape[-3:]), reversed(shape)) for p in (0, target - size)]
        return F.pad(tensor, pads)

    return {"image": torch.stack([padded(item["image"]) for item in items]),
            "labels": torch.stack([padded(item["labels"]) for item in items]),
            "texts": [item["texts"] for item in items],
            "abnormal": torch.stack([item["abnormal"] for item in items]),
            "findings": torch.stack([item["findings"] for item in items])}


def intact_organs(labels: Tensor, n_organs: int) -> Tensor:
    """(B, Z, Y, X) organ ids -> (B, n_organs) bool: present and not on any face of the volume (the reference
    drops organs cut by its random crop)."""
    faces = torch.cat([face.flatten(1) for face in (labels[:, 0], labels[:, -1], labels[:, :, 0], labels[:, :, -1],
                                                     labels[:, :, :, 0], labels[:, :, :, -1])], dim=1)
    ids = torch.arange(1, n_organs + 1, device=labels.device)
    present = (labels.flatten(1)[:, :, None] == ids).any(dim=1)
    on_face = (faces[:, :, None] == ids).any(dim=1)
    return present & ~on_face


def soft_targets(texts: Sequence[str], normal: Sequence[bool]) -> Tensor:
    """(N, N) targets of the dual false-negative reduction: 1 on the diagonal and where both organs are normal or
    both texts are identical; rows normalised to sum 1."""
    flags = torch.tensor(list(normal), dtype=torch.bool)
    same_text = torch.tensor([[a == b for b in texts] for a in texts], dtype=torch.bool)
    positives = same_text | (flags[:, None] & flags[None, :])
    positives |= torch.eye(len(texts), dtype=torch.bool)
    targets = positives.float()
    return targets / targets.sum(dim=1, keepdim=True)


def soft_infonce(image_feats: Tensor, text_feats: Tensor, targets: Tensor, temp: Tensor) -> Tensor:
    """(image->text + text->image) / 2 cross-entropy with soft targets; features (N, E), L2-normed."""
    sim = image_feats @ text_feats.t() / temp
    loss_i2t = -(F.log_softmax(sim, dim=1) * targets).sum(dim=1).mean()
    loss_t2i = -(F.log_softmax(sim.t(), dim=1) * targets).sum(dim=1).mean()
    return (loss_i2t + loss_t2i) / 2


def text_for_encoder(text: str, organ: str) -> str:
    """The reference encodes a normal organ's text without the template when it says more than it."""
    template = normal_template(organ)
    return text[len(template):].strip() if text.startswith(template) and text != template else text


class TrainableFVLM(nn.Module):
    """The library's FVLM with one training entry point (what accelerate wraps for data parallelism).
    `frozen_text`: set when the first text layers are fixed (`FrozenTextPrefix`)."""

    def __init__(self, fvlm: FVLM) -> None:
        super().__init__()
        self.fvlm = fvlm
        self.frozen_text: FrozenTextPrefix | None = None

    def text_features(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(N, T) token ids and mask -> (N, E) L2-normed features (float32), as `FVLM.encode_text`."""
        if self.frozen_text is None:
            return self.fvlm.encode_text(input_ids, attention_mask).float()
        return F.normalize(self.fvlm.text_proj(self.frozen_text.text_cls(input_ids, attention_mask)), dim=-1).float()

    def forward(self, image: Tensor, labels: Tensor, input_ids: Tensor, attention_mask: Tensor
                ) -> tuple[Tensor, Tensor, Tensor]:
        """(organ features (B, n_organs, E), text features (N, E), temperature)."""
        with torch.no_grad():
            self.fvlm.temp.clamp_(*TEMPERATURE_RANGE)
        organ_feats = self.fvlm.encode_organs(image, labels).float()
        return organ_feats, self.text_features(input_ids, attention_mask), self.fvlm.temp


def _gather(tensor: Tensor) -> Tensor:
    """Concatenate across processes; this process's part keeps its gradient (the reference's all_gather)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(tensor.contiguous()))


def _gather_objects(values: list) -> list:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, values)
    return [value for part in gathered for value in part]


def fvlm_step(model: nn.Module, batch: dict, tokenize: Callable, organs: Sequence[str],
              items: Sequence[ZeroShotItem] = (), prompt_weight: float = 0.0) -> Tensor:
    """The summed per-organ soft InfoNCE of one batch (+ prompt_weight x `prompt_loss` of `items`); model: a
    TrainableFVLM, possibly wrapped."""
    labels, abnormal = batch["labels"], batch["abnormal"]
    intact = intact_organs(labels, len(organs))
    flat = [(b, o) for b in range(len(batch["texts"])) for o in range(len(organs)) if intact[b, o]]
    encoded = [text_for_encoder(batch["texts"][b][o], organs[o]) for b, o in flat]
    prompts = [text for item in items for text in (item.negative, item.positive)] if prompt_weight > 0 else []
    ids, mask = tokenize(encoded + prompts or ["."])
    organ_feats, text_feats, temp = model(batch["image"], labels, ids.to(labels.device), mask.to(labels.device))
    text_table = torch.zeros(*intact.shape, text_feats.shape[-1], device=text_feats.device, dtype=text_feats.dtype)
    if flat:
        rows, cols = zip(*flat)
        text_table = text_table.index_put((torch.tensor(rows), torch.tensor(cols)), text_feats[: len(flat)])
    status = (abnormal.to(intact.device) & intact).sum(dim=0)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(status)
    # every parameter in the graph (data parallelism); absent organs' NaN features carry no gradient
    total = organ_feats.nan_to_num(0.0).sum() * 0.0 + text_feats.sum() * 0.0
    for o, organ in enumerate(organs):
        if status[o] == 0:
            continue
        patients = torch.nonzero(intact[:, o]).flatten()
        image_feat = _gather(organ_feats[patients, o])
        text_feat = _gather(text_table[patients, o])
        texts = _gather_objects([batch["texts"][int(b)][o] for b in patients])
        if not texts:
            continue
        targets = soft_targets(texts, [t.startswith(normal_template(organ)) for t in texts]).to(image_feat.device)
        if len(torch.unique(targets)) == 1:  # nothing to contrast (the reference skips it too)
            continue
        total = total + soft_infonce(image_feat, text_feat, targets, temp)
    if prompts:
        fvlm = getattr(model, "module", model).fvlm
        prompt_feats = text_feats[len(flat):].view(len(items), 2, -1)
        total = total + prompt_weight * prompt_loss(fvlm, organ_feats, prompt_feats, batch["findings"], intact, items)
    return total


def prompt_loss(fvlm: FVLM, organ_feats: Tensor, prompt_feats: Tensor, findings: Tensor, intact: Tensor,
                items: Sequence[ZeroShotItem]) -> Tensor:
    """Sum over items of the mean cross-entropy of the runtime's [negative, positive] logits (`zero_shot_logits`,
    what `ground` scores) against the 0/1 findings (B, n_items), over the cases whose item organ is intact."""
    logits = fvlm.zero_shot_logits(organ_feats.nan_to_num(0.0), prompt_feats, items)  # (B, n_items, 2)
    keep = intact[:, fvlm.organ_indices(items)]
    cross_entropy = F.cross_entropy(logits[keep], findings.to(logits.device)[keep].long(), reduction="none")
    per_item = (keep / keep.sum(dim=0).clamp(min=1))[keep]  # each item's cases weigh 1 together
    return (cross_entropy * per_item).sum()


def enable_gradient_checkpointing(model: FVLM) -> None:
    """Recompute every ViT block and BERT layer in the backward pass (less memory)."""
    layers = [*model.visual_encoder.blocks, *model.text_encoder.encoder["layer"]]
    for layer in layers:
        layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)


def build_fvlm(config: FVLMConfig, text_init: Path | None = None, seed: int = 0, query_init_std: float = 0.0,
               image_init: Path | None = None, image_init_grid: tuple[int, int, int] | None = None) -> FVLM:
    """A fresh FVLM; the text tower from a local BERT folder and the ViT from a local MAE checkpoint when given
    (never the Hub). The organ queries start at zero as the reference's (uniform attention over the organ's
    tokens) unless query_init_std > 0."""
    torch.manual_seed(seed)
    model = FVLM(config)  # PyTorch's default initialisation; the position table as the reference's ViT
    nn.init.trunc_normal_(model.visual_encoder.patch_embedding.position_embeddings, std=0.02)
    with torch.no_grad():
        model.query_tokens.normal_(0.0, query_init_std) if query_init_std > 0 else model.query_tokens.zero_()
    if text_init is not None:
        load_bert_into_text_tower(model, Path(text_init))
    if image_init is not None:
        load_mae_into_visual_encoder(model, Path(image_init), image_init_grid)
    return model


def load_bert_into_text_tower(model: FVLM, folder: Path) -> None:
    """Copy a local BERT into the text tower. fVLM's tower adds no token-type embedding; BERT adds type 0 to
    every token, so that row is folded into the position embeddings (the same sum for one-segment texts)."""
    bert = load_local_bert(folder)
    state = {k: v for k, v in bert.state_dict().items()
             if not k.endswith(("position_ids", "token_type_embeddings.weight"))}
    state["embeddings.position_embeddings.weight"] = (
        state["embeddings.position_embeddings.weight"] + bert.embeddings.token_type_embeddings.weight[0])
    try:
        model.text_encoder.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise TrainingError(f"model.text_init {folder} does not fit the BertConfig of model.constructors "
                            f"({str(error).splitlines()[0]})") from None


# MAE initialisation of the ViT. What the reference does (alibaba-damo-academy/fvlm, BlipPretrain.from_config in
# blip_pretrain.py, the same file as lavis/models/blip_models/blip_pretrain.py): torch.load of
# `mae_pretrain_vit_base.pth` (the name of facebookresearch/mae's ImageNet ViT-B/16 release: a 2-D MAE whose
# pos_embed is 1 class row + 14 x 14), its "model" entry; keys starting with "decoder" or "patch_embed" and the
# keys mask_token and cls_token are dropped (a 2-D RGB patch conv cannot be the 3-D one-channel one, so the patch
# embedding keeps its fresh init); "fc" -> "linear" (mlp.fc1/fc2) and "proj" -> "out_proj" (attn.proj); pos_embed
# loses its class row, is resized bilinearly (align_corners=False) from 14 x 14 to the ViT's 16 x 11 (Y, X) token
# grid and repeated over its 7 depth rows; then load_state_dict(strict=False), which skips what does not match
# without a word. Here a 2-D table is the 3-D grid (1, s, s), whose trilinear resize to (nz, ny, nx) is exactly
# that bilinear resize repeated over depth; a 3-D MAE's table is resized trilinearly from its own grid and its
# patch conv is copied when it fits; any other tensor that does not fit is an error instead of a silent skip.
MAE_SKIPPED = ("decoder", "mask_token", "cls_token")  # MAE's decoder and tokens; the ViT has no class token
MAE_RENAMES = (("patch_embed.proj.", "patch_embedding.patch_embeddings."), ("attn.proj.", "attn.out_proj."),
               ("mlp.fc1.", "mlp.linear1."), ("mlp.fc2.", "mlp.linear2."))
PATCH_CONV = "patch_embedding.patch_embeddings."
POSITIONS = "patch_embedding.position_embeddings"


def read_mae_state(path: Path) -> dict[str, Tensor]:
    """An MAE checkpoint's tensors: .safetensors, or a torch file (weights only) holding the state dict bare or
    under "model" (facebookresearch/mae's layout) or "state_dict". An unreadable file is a TrainingError."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except (SafetensorError, OSError) as error:
            raise TrainingError(f"model.image_init {path}: not a readable safetensors file ({error})") from None
    try:
        obj = load_torch_file(path, "MAE checkpoint")
        if isinstance(obj, dict):
            obj = obj.get("model", obj.get("state_dict", obj))
        return as_state_dict(obj, path, "MAE checkpoint")
    except CTFoundationError as error:  # its message names the file
        raise TrainingError(f"model.image_init: {error}") from None


def vit_key(mae_key: str) -> str | None:
    """The visual-encoder name of an MAE encoder key; None for the decoder and the mask/class tokens."""
    if mae_key.startswith(MAE_SKIPPED):
        return None
    if mae_key == "pos_embed":
        return POSITIONS
    for old, new in MAE_RENAMES:
        mae_key = mae_key.replace(old, new)
    return mae_key


def mae_grid(state: dict[str, Tensor], positions: int, given: tuple[int, ...] | None,
             ours: tuple[int, ...]) -> tuple[int, ...]:
    """The MAE's token grid (Z, Y, X) of its `positions` table rows: (1, s, s) for a 2-D MAE (4-D patch conv),
    else `given` (model.image_init_grid), else ours when the counts agree."""
    conv = state.get("patch_embed.proj.weight")
    if conv is not None and conv.ndim == 4:
        side = math.isqrt(positions)
        if side * side != positions:
            raise ValueError(f"pos_embed: {positions} positions of a 2-D MAE are not a square grid")
        return (1, side, side)
    grid = tuple(given) if given else ours
    if math.prod(grid) != positions:
        raise ValueError(f"pos_embed has {positions} positions, not {_grid_text(grid)}; set "
                         "model.image_init_grid to the MAE's token grid [nz, ny, nx]")
    return grid


def mae_position_table(table: Tensor, has_class_row: bool, grid: tuple[int, ...], ours: tuple[int, ...]) -> Tensor:
    """MAE positions (1, [1 +] n, C) on `grid` (Z, Y, X; x fastest, as the ViT flattens) -> (1, prod(ours), C),
    resized trilinearly with align_corners=False (the runtime's resize) when the grids differ."""
    rows = table[:, 1:] if has_class_row else table
    if tuple(grid) == tuple(ours):
        return rows
    volume = rows.transpose(1, 2).reshape(1, -1, *grid)
    return F.interpolate(volume.float(), size=ours, mode="trilinear", align_corners=False).flatten(2).transpose(1, 2)


def mae_visual_state(state: dict[str, Tensor], model: FVLM, grid: tuple[int, int, int] | None
                     ) -> tuple[dict[str, Tensor], tuple[int, ...] | None]:
    """(the MAE encoder tensors under visual-encoder names, shapes checked; the MAE's token grid when its position
    table was resized, else None). A patch conv of another patch size or channel count stays out (the reference's
    rule); other misfits (width, MLP size) are ValueErrors."""
    target, ours = model.visual_encoder.state_dict(), model.config.pos_grid
    mapped, resized_from = {}, None
    for key, value in state.items():
        name = vit_key(key)
        if name is None or name not in target:
            continue
        if name == POSITIONS:
            if value.ndim != 3 or value.shape[0] != 1:
                raise ValueError(f"pos_embed {tuple(value.shape)} is not a (1, positions, width) table")
            positions = value.shape[1] - ("cls_token" in state)
            source = mae_grid(state, positions, grid, ours)
            value = mae_position_table(value, "cls_token" in state, source, ours)
            resized_from = source if source != ours else None
        if value.shape != target[name].shape and not name.startswith(PATCH_CONV):
            raise ValueError(f"{key} {tuple(value.shape)} does not fit the ViT's {name} {tuple(target[name].shape)}"
                             "; model.constructors must give the MAE's width and MLP size")
        mapped[name] = value
    conv = f"{PATCH_CONV}weight"
    if conv not in mapped or mapped[conv].shape != target[conv].shape:  # the conv's bias goes with its weight
        mapped = {k: v for k, v in mapped.items() if not k.startswith(PATCH_CONV)}
    if not mapped:
        raise ValueError("holds no MAE encoder tensor (pos_embed, blocks.N.*, norm.*) that the ViT has")
    return mapped, resized_from


def load_mae_into_visual_encoder(model: FVLM, path: Path, grid: tuple[int, int, int] | None = None) -> list[str]:
    """Copy an MAE's encoder into the ViT (see above); prints what was loaded and returns the visual-encoder keys
    that keep their fresh init. grid: the MAE's token grid (Z, Y, X) when it is 3-D and not the ViT's."""
    state = read_mae_state(path)
    try:
        mapped, resized_from = mae_visual_state(state, model, grid)
    except ValueError as error:
        raise TrainingError(f"model.image_init {path}: {error}") from None
    model.visual_encoder.load_state_dict(mapped, strict=False)
    fresh = sorted(set(model.visual_encoder.state_dict()) - set(mapped))
    resized = "" if resized_from is None else (
        f"; position table resized trilinearly from {_grid_text(resized_from)} to {_grid_text(model.config.pos_grid)}")
    print(f"model.image_init {path}: {len(mapped)} ViT tensors loaded from {len(state)} MAE tensors{resized}; "
          f"fresh: {', '.join(fresh) or 'none'}", file=sys.stderr)
    return fresh


def _grid_text(grid: Sequence[int]) -> str:
    return " x ".join(map(str, grid))


def save_fvlm_checkpoint(model: FVLM, path: Path) -> Path:
    """The released layout ({"model": state_dict}, float32, CPU) + constructors.json beside it."""
    state = {k: v.detach().float().cpu().clone() for k, v in model.state_dict().items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as temporary:
        torch.save({"model": state}, temporary)
    (path.parent / "constructors.json").write_text(
        json.dumps({"constructors": model.config.to_reference_constructors()}, indent=1))
    return path


@dataclass(frozen=True)
class AnatomyLabeller:
    """Organ ids from the library's anatomy sources: `<masks>/<stem>/` or `<masks>/<stem>.nii.gz` per volume,
    or the built-in anatomy when `masks` is None (organs it cannot make stay absent)."""

    organs: tuple[str, ...]
    masks: Path | None = None
    scheme: str = "total"

    def __call__(self, volume: CTVolume, name: str) -> np.ndarray:
        from CTFoundationLib.anatomy.masks import AnatomyRequest, build_anatomy

        if self.masks is None:
            request = AnatomyRequest(use_totalsegmentator=False)
        else:
            stem = name.removesuffix(".gz").removesuffix(".nii")
            folder = self.masks / stem
            request = AnatomyRequest(segmentation=folder if folder.is_dir() else self.masks / f"{stem}.nii.gz",
                                     label_scheme=self.scheme)
        return build_anatomy(volume, request, self.organs).fvlm_labels(self.organs)
