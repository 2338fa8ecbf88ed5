"""`ctfoundation chat`: talk with CT-CHAT about one CT, one-shot (--question / --report) or interactively."""

from __future__ import annotations

import argparse
import sys
import threading
from pathlib import Path

from CTFoundationLib.cli.ct import add_input_arguments, device_name, read_input
from CTFoundationLib.cli.ctclip import step_progress
from CTFoundationLib.errors import ChatError
from CTFoundationLib.inference.chat import ANSWER_TYPES, DEFAULT_CHAT_MODEL, ChatAnswer, ChatRuntime, ChatSession
from CTFoundationLib.io.files import require_writable_folder, write_json_atomic
from CTFoundationLib.io.sanity import summarize
from CTFoundationLib.models.ctchat.loading import PRECISIONS
from CTFoundationLib.models.ctchat.modeling import GenerationSettings
from CTFoundationLib.models.ctchat.templates import TEMPLATES
from CTFoundationLib.models.devices import DEVICE_HELP
from CTFoundationLib.weights import load_registry

INTERACTIVE_HELP = (
    "Type a question and press Enter. Commands: /type " + "|".join(ANSWER_TYPES) + " (answer type), /report, "
    "/reset (new conversation), /quit. Ctrl-C stops an answer."
)


def register(subparsers) -> None:
    chat = subparsers.add_parser("chat", help="ask CT-CHAT about a CT (one-shot or interactive)")
    add_input_arguments(chat)
    chat.add_argument("--model", choices=load_registry().ids("ct-chat"), default=DEFAULT_CHAT_MODEL)
    chat.add_argument("--question", action="append", help="ask this and exit (repeat for several turns)")
    chat.add_argument("--answer-type", choices=ANSWER_TYPES, default="free", help="task token added to questions")
    chat.add_argument("--report", action="store_true", help="generate a report (after any --question) and exit")
    chat.add_argument("--transcript", type=Path, help="write the conversation to this JSON file")
    chat.add_argument("--ctclip", type=Path, help="CT-CLIP v2 checkpoint (default: installed ct-clip-v2)")
    chat.add_argument("--ctclip-config", type=Path, help="CT-CLIP constructor JSON, for non-standard sizes")
    chat.add_argument("--device", type=device_name, default="auto", help=DEVICE_HELP)
    add_llm_arguments(chat)
    chat.set_defaults(run=run_chat)


def add_llm_arguments(parser: argparse.ArgumentParser) -> None:
    """Where CT-CHAT's language side is (default: the installed weights of the chat model), how it decodes."""
    parser.add_argument("--llm", type=Path, help="base LLM: Hugging Face model folder or .gguf file")
    lora = parser.add_mutually_exclusive_group()
    lora.add_argument("--lora", type=Path, help="CT-CHAT LoRA folder (any name; holds non_lora_trainables.bin)")
    lora.add_argument("--no-lora", action="store_true", help="base LLM without adapter (needs --projector)")
    parser.add_argument("--projector", type=Path,
                        help="projector weights (non_lora_trainables.bin or mm_projector.bin)")
    parser.add_argument("--template", choices=sorted(TEMPLATES), help="conversation format (default: the model's)")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto", help="8bit/4bit need CUDA + bitsandbytes")
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, help="random seed when sampling")


def chat_model_options(args: argparse.Namespace) -> dict:
    """load_chat_model's keyword arguments from add_llm_arguments' options (device and progress aside)."""
    if args.no_lora and args.projector is None:
        raise ChatError("--no-lora needs --projector (without the adapter the projector must come from a file)")
    return {"llm": args.llm, "lora": args.lora, "use_lora": not args.no_lora, "projector": args.projector,
            "template": args.template, "precision": args.precision}


def run_chat(args: argparse.Namespace) -> int:
    options, settings = chat_model_options(args), generation_settings(args)
    if args.transcript:
        require_writable_folder(args.transcript.parent, "--transcript")
    volume = read_input(args)
    for warning in summarize(volume)["warnings"]:
        print(f"warning [{warning['code']}]: {warning['message']}", file=sys.stderr)
    with step_progress("ct-chat") as progress:
        runtime = ChatRuntime.from_registry(
            args.model, ctclip=args.ctclip, ctclip_config=args.ctclip_config, device=args.device, progress=progress,
            **options,
        )
        session = runtime.session(volume, settings=settings)
    if runtime.notice:
        print(f"note: {runtime.notice}", file=sys.stderr)
    try:
        if args.question or args.report:
            for question in args.question or []:
                print(f"you> {question}")
                answer_streamed(session, args.answer_type, question)
            if args.report:
                answer_streamed(session, "report", None)
        else:
            interactive(session, args.answer_type)
    finally:
        if args.transcript:
            write_json_atomic(args.transcript, {"model": args.model, "ct": str(args.ct), "turns": session.transcript()})
            print(f"transcript: {args.transcript}", file=sys.stderr)
    return 0


def generation_settings(args: argparse.Namespace) -> GenerationSettings:
    if args.max_new_tokens < 1 or args.temperature < 0 or not 0 < args.top_p <= 1:
        raise ChatError("--max-new-tokens must be >= 1, --temperature >= 0 and --top-p in (0, 1]")
    return GenerationSettings(args.max_new_tokens, args.temperature, args.top_p, args.seed)


def answer_streamed(session: ChatSession, answer_type: str, question: str | None) -> ChatAnswer:
    """Ask (question None: the report) in a worker thread, print the answer as it streams; Ctrl-C stops it."""
    print("ct-chat> ", end="", flush=True)
    stop = threading.Event()
    outcome: dict[str, object] = {}

    def emit(text: str) -> None:
        print(text, end="", flush=True)

    def work() -> None:
        try:
            outcome["answer"] = (session.generate_report(emit, stop) if question is None
                                 else session.ask(question, answer_type, emit, stop))
        except BaseException as error:  # handed to the main thread, raised there
            outcome["error"] = error

    worker = threading.Thread(target=work, name="ct-chat-answer")
    worker.start()
    try:
        worker.join()
    except KeyboardInterrupt:
        stop.set()
        worker.join()
    print()
    if "error" in outcome:
        raise outcome["error"]
    answer = outcome["answer"]
    print(status_line(answer), file=sys.stderr)
    return answer


def status_line(answer: ChatAnswer) -> str:
    speed = f", {answer.tokens_per_s:.1f} tokens/s" if answer.tokens_per_s else ""
    first = f", first token {answer.first_token_s:.2f} s" if answer.first_token_s is not None else ""
    ending = " [stopped]" if answer.stopped else " [length limit reached]" if answer.hit_limit else ""
    return f"({answer.new_tokens} tokens in {answer.seconds:.1f} s{first}{speed}){ending}"


def interactive(session: ChatSession, answer_type: str) -> None:
    print(INTERACTIVE_HELP, file=sys.stderr)
    while True:
        try:
            line = input(f"you [{answer_type}]> ").strip()
        except EOFError:
            return
        if line in ("/quit", "/exit"):
            return
        if line.startswith("/type"):
            answer_type = pick_answer_type(line, answer_type)
        elif line == "/reset":
            session.reset()
            print("(new conversation about the same CT)", file=sys.stderr)
        elif line:
            try:  # e.g. the context is full: say so and keep the prompt, so /reset can follow
                answer_streamed(session, *(("report", None) if line == "/report" else (answer_type, line)))
            except ChatError as error:
                print(f"error: {error}", file=sys.stderr)


def pick_answer_type(line: str, current: str) -> str:
    wanted = line.removeprefix("/type").strip()
    if wanted in ANSWER_TYPES:
        return wanted
    print(f"answer types: {', '.join(ANSWER_TYPES)}", file=sys.stderr)
    return current
