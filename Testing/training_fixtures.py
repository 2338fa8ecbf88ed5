"""A tiny CT-RATE-layout dataset made of the real shared CTs (linked, never copied) and real report texts."""

from __future__ import annotations

import csv
import re
from pathlib import Path

from conftest import data_root
from small_models import bert_vocab

from CTFoundationLib.preprocess import PreprocessSpec
from CTFoundationLib.vocab import CT_RATE_ABNORMALITIES

CTS = (
    "ct/ricord1a_419639-000082_chest_noncontrast/ct_3mm_iso.nii.gz",
    "ct/totalseg_chest_crop_aorta/ct.nii.gz",
    "ct/totalseg_chest_crop_pulmonary/ct.nii.gz",
)
REPORTS = "reports/ctclip_text_classifier/train.csv"

# 12 mm voxels, 16 x 32 x 32: the real preprocessing code at a size a test trains in seconds.
TINY_SPEC = PreprocessSpec("tiny-test", "SLP", (12.0, 12.0, 12.0), (-1000.0, 1000.0), (-1.0, 1.0), (16, 32, 32), -1.0)


def tiny_constructors() -> dict:
    """A CT-CLIP v2 of the reference's structure sized for the 16 x 32 x 32 tiny input (4 x 2 x 2 tokens)."""
    return {
        "CTViT": {"dim": 16, "codebook_size": 16, "image_size": 32, "patch_size": 16, "temporal_patch_size": 4,
                  "spatial_depth": 1, "temporal_depth": 1, "dim_head": 8, "heads": 2},
        "BertConfig": {"vocab_size": 30522, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "intermediate_size": 64, "max_position_embeddings": 512,
                       "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0},
        "CTCLIP": {"dim_image": 2 * 2 * 16, "dim_text": 32, "dim_latent": 16},
    }


def real_reports(count: int) -> list[dict]:
    """The first `count` expert-labelled CT-RATE reports (text and the 18 labels)."""
    with open(data_root() / REPORTS, newline="", encoding="utf-8") as handle:
        return [row for _, row in zip(range(count), csv.DictReader(handle))]


def make_ctrate_split(folder: Path, split: str = "train", count: int = 3) -> dict[str, Path]:
    """`count` volumes in the CT-RATE layout (symlinks to the shared CTs) with reports (the last three sentences
    of real reports, so that a tiny random text tower tells them apart quickly) and labels CSVs."""
    rows = real_reports(count)
    reports, labels = [], []
    for n, row in enumerate(rows, start=1):
        name = f"{split}_{n}_a_1.nii.gz"
        target = folder / split / f"{split}_{n}" / f"{split}_{n}_a" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(data_root() / CTS[(n - 1) % len(CTS)])
        sentences = re.split(r"(?<=\.)\s+", row["report_text"].strip())
        reports.append({"VolumeName": name, "Findings_EN": " ".join(sentences[-3:]), "Impressions_EN": ""})
        labels.append({"VolumeName": name, **{k: row[k] for k in CT_RATE_ABNORMALITIES}})
    paths = {"root": folder / split, "reports_csv": folder / f"{split}_reports.csv",
             "labels_csv": folder / f"{split}_labels.csv"}
    for key, table in (("reports_csv", reports), ("labels_csv", labels)):
        with open(paths[key], "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(table[0]))
            writer.writeheader()
            writer.writerows(table)
    return paths


def tokenizer_path() -> Path:
    return bert_vocab()
