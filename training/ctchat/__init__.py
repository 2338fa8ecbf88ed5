"""CT-CHAT training: VQA data (vqa), the two-stage recipe (model, data, train), export, evaluation, the demo."""
