"""The module's logic on the model process, run as Slicer's process would be: a fresh Python with Slicer core
(slicer-core, Qt imitated), two detections and a CT-CHAT turn from `CTFoundationLogic`, then Unload models.
PyTorch must never be imported into that process, and the second detection must not load the model again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from small_chat_models import make_ctchat_adapter, make_tiny_llm, smollm2_tokenizer_folder
from small_models import bert_vocab, make_small_ctclip

REPO = Path(__file__).resolve().parents[1]
TESTING = Path(__file__).resolve().parent  # slicer_core_app: real Slicer core, Qt and ctk imitated
RICORD_3MM = "ricord1a_419639-000082_chest_noncontrast/ct_3mm_iso.nii.gz"

SLICER_SIDE = """
import json, sys
settings = json.loads(sys.argv[1])
sys.path[:0] = settings["path"]
import slicer_core_app
slicer = slicer_core_app.start()
import CTFoundation

logic = CTFoundation.CTFoundationLogic()
parameters = logic.getParameterNode()
parameters.weightsFile, parameters.modelConfigFile, parameters.textEncoder = settings["ctclip"]
parameters.weightsHome, parameters.device = settings["home"], "cpu"
node = slicer.util.loadVolume(settings["ct"])
first = logic.detect(node, model="ct-clip-v2")
second = logic.detect(node, model="ct-clip-v2")
chat = logic.chat(node, model="ct-chat-llama3.1-8b", maxNewTokens=4, **settings["chat"])
tokens = []
answer = chat.ask("Is there a pleural effusion?", "short", onToken=tokens.append)
unloaded = logic.unloadModels()
logic.stopModelProcess()
print(json.dumps({
    "heavy": sorted(name for name in ("torch", "transformers", "peft", "monai") if name in sys.modules),
    "rows": [first.tableNode.GetNumberOfRows(), second.tableNode.GetNumberOfRows()],
    "same": [f.probability for f in first.result.findings] == [f.probability for f in second.result.findings],
    "timings": [sorted(first.result.timings_s), sorted(second.result.timings_s)],
    "answer": answer, "tokens": "".join(tokens), "unloaded": unloaded,
}))
"""


def test_slicer_process_never_imports_torch_and_reuses_the_model(ct_dir, tmp_path) -> None:
    checkpoint, config, _ = make_small_ctclip(tmp_path / "small")
    llm = make_tiny_llm(tmp_path / "llm", smollm2_tokenizer_folder(tmp_path))
    make_ctchat_adapter(tmp_path / "release" / "8b", llm)
    settings = {
        "path": [str(TESTING), str(REPO / "CTFoundation"), str(REPO)],
        "ctclip": [str(checkpoint), str(config), str(bert_vocab())],
        "home": str(tmp_path / "home"),
        "ct": str(ct_dir / RICORD_3MM),
        "chat": {"llm": str(llm), "lora": str(tmp_path / "release"), "template": "chatml_direct"},
    }
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    run = subprocess.run([sys.executable, "-c", SLICER_SIDE, json.dumps(settings)], cwd=tmp_path, env=environment,
                         capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])

    assert report["heavy"] == []
    assert report["rows"] == [18, 18] and report["same"]
    first, second = report["timings"]
    assert "load_model" in first and "load_model" not in second and "encode_image" in second
    assert report["answer"] and report["tokens"].strip() == report["answer"].strip()
    assert report["unloaded"] == ["ct-chat", "ct-clip"]
