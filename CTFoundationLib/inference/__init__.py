"""The Python API by registry id: CT-CLIP (`ctclip.CTCLIPRuntime.from_registry`), fVLM, anatomy-grounded findings
(`grounding.ground_ct`), CT-CHAT sessions (`chat.ChatRuntime.from_registry`), embeddings and the case index, results."""
