"""Training recipes for the CTFoundation models: CT-CLIP contrastive pre-training, VocabFine, LiPro, export,
and the small demo model built on synthetic-finding cases (training.demo).

Run with `python -m training.run CONFIG.yaml` (single process) or `accelerate launch -m training.run CONFIG.yaml`
(multi-GPU / multi-node). Needs the `training` extra: `pip install ctfoundation[training]`.
"""
