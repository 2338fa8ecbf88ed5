"""Names the models score, as plain data (no torch): the 18 CT-RATE abnormalities and fVLM's organs."""

from __future__ import annotations

# The 18 CT-RATE abnormalities, in the order of the reference's zero-shot and LiPro scripts.
CT_RATE_ABNORMALITIES: tuple[str, ...] = (
    "Medical material",
    "Arterial wall calcification",
    "Cardiomegaly",
    "Pericardial effusion",
    "Coronary artery wall calcification",
    "Hiatal hernia",
    "Lymphadenopathy",
    "Emphysema",
    "Atelectasis",
    "Lung nodule",
    "Lung opacity",
    "Pulmonary fibrotic sequela",
    "Pleural effusion",
    "Mosaic attenuation pattern",
    "Peribronchial thickening",
    "Consolidation",
    "Bronchiectasis",
    "Interlobular septal thickening",
)

FVLM_ORGANS: tuple[str, ...] = ("lung", "heart", "esophagus", "aorta")  # fVLM organ mask ids 1..4
