"""The three CT-CLIP recipes as loss functions on one batch: contrastive pre-training, VocabFine and LiPro.

- contrastive: symmetric InfoNCE between each volume and its report (all weights train).
- vocabfine (reference ct_vocabfine_train.py): for every finding, the pair ["<name> is present.", "<name> is
  not present."] ordered [true statement, false statement] by the label, scored against the volume (cosine x
  exp(temperature)), soft-maxed, and regressed to [1, 0] with a mean squared error. The reference takes
  three backward passes of six findings each on one volume; their sum is 3 x the mean over all 18 findings,
  which is what we minimise (per volume, averaged over the batch). All weights train. Optional (not the
  reference's): a localisation term where the data has finding masks (`localisation_loss`).
- lipro (reference ct_lipro_train.py): the trained model is frozen; a linear head on dropout(ReLU(latent))
  is trained with BCE-with-logits and per-class pos_weight.
  The frozen model runs in eval mode here (the reference leaves it in train mode, so its codebook drifts by
  EMA while "frozen"; we keep the loaded codebook).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from CTFoundationLib.models.ctclip import tokenize, zero_shot_prompts
from CTFoundationLib.vocab import CT_RATE_ABNORMALITIES
from training.modeling import TrainableCTCLIP, contrastive_loss

VOCABFINE_GROUPS = 3  # the reference back-propagates the 18 findings in 3 groups of 6


def contrastive_step(model: nn.Module, batch: dict, tokenizer) -> Tensor:
    """model: a TrainableCTCLIP, possibly wrapped for data parallelism."""
    device = batch["image"].device
    ids, mask = tokenize(tokenizer, batch["text"])
    images, texts, logit_scale, _ = model(batch["image"], ids.to(device), mask.to(device))
    return contrastive_loss(texts, images, logit_scale)


@dataclass(frozen=True)
class Localisation:
    """VocabFine's optional localisation term (see `localisation_loss`): its weight in the loss and the
    softmax temperature over the per-token terms (logit units)."""

    weight: float
    temperature: float


def vocabfine_step(model: nn.Module, batch: dict, tokenizer, names: Sequence[str] = CT_RATE_ABNORMALITIES,
                   localisation: Localisation | None = None) -> Tensor:
    """model: a TrainableCTCLIP, possibly wrapped for data parallelism. localisation: add its term for the batch's
    `token_targets` ((B, len(names), t, h, w) bool)."""
    device = batch["image"].device
    ids, mask = tokenize(tokenizer, zero_shot_prompts(names))
    images, prompts, logit_scale, terms = model(batch["image"], ids.to(device), mask.to(device),
                                                prompt_terms=localisation is not None)
    prompts = prompts.view(len(names), 2, -1)  # [present, not present] per finding
    logits = torch.einsum("bl,pkl->bpk", images, prompts) * logit_scale
    present = batch["labels"].to(device).bool()[..., None]
    true_first = torch.where(present, logits, logits.flip(-1))  # [true statement, false statement]
    probabilities = true_first.softmax(dim=-1)
    targets = torch.tensor([1.0, 0.0], device=device).expand_as(probabilities)
    loss = VOCABFINE_GROUPS * F.mse_loss(probabilities, targets)
    if localisation is None:
        return loss
    where = batch["token_targets"].to(device) & present[..., None, None]  # positives only
    return loss + localisation.weight * localisation_loss(terms, where, localisation.temperature)


def localisation_loss(terms: Tensor, targets: Tensor, temperature: float) -> Tensor:
    """Mean over the (image, finding) pairs with a target of -log(the softmax mass, over all tokens, of
    terms / temperature on the target tokens): it rewards a finding's map (its per-token terms, inference.maps)
    for peaking where the finding is. terms (B, P, t, h, w) in logit units; targets: bool, same shape. 0 when
    no pair has a target."""
    flat_targets = targets.flatten(2)
    pairs = flat_targets.any(dim=-1)
    if not pairs.any():
        return terms.sum() * 0.0  # keeps the graph (and data-parallel gradient hooks) intact
    log_mass = (terms.flatten(2)[pairs].float() / temperature).log_softmax(dim=-1)
    on_target = log_mass.masked_fill(~flat_targets[pairs], float("-inf")).logsumexp(dim=-1)
    return -on_target.mean()


class LiProHead(nn.Module):
    """Linear probe on the frozen model's image latent: classifier(dropout(relu(latent)))."""

    def __init__(self, classifier: nn.Linear, dropout: float = 0.3) -> None:
        super().__init__()
        self.classifier, self.dropout = classifier, nn.Dropout(dropout)

    def forward(self, latents: Tensor) -> Tensor:
        return self.classifier(self.dropout(F.relu(latents)))


def lipro_step(model: TrainableCTCLIP, head: LiProHead, batch: dict, pos_weight: Tensor) -> Tensor:
    with torch.no_grad():
        latents, _, _, _ = model(batch["image"])
    logits = head(latents)
    return F.binary_cross_entropy_with_logits(logits, batch["labels"].to(logits), pos_weight=pos_weight.to(logits))


def positive_class_weights(labels: Tensor) -> Tensor:
    """Per-class negatives / positives of the training labels (N, K), as the reference's fixed weights are;
    1 for a class without positives."""
    positives = labels.sum(dim=0)
    negatives = labels.shape[0] - positives
    return torch.where(positives > 0, negatives / positives.clamp(min=1), torch.ones_like(positives))
