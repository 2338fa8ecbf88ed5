"""Evaluation: CT-CLIP's zero-shot protocol, the report labeller, sentence-grounding accuracy. No torch."""
