"""CT-CHAT: conversation templates and tokens, the attention-pool projector, LLM + LoRA loading, generation."""
