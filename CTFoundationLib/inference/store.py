"""Loaded models kept between jobs, for a long-lived process (the Slicer model process, `host.server`).

    store = ModelStore()
    runtime = store.ctclip({"model_id": "ct-clip-v2", "device": "cpu"}, progress=print)   # loads
    runtime = store.ctclip({"model_id": "ct-clip-v2", "device": "cpu"}, progress=print)   # the same object

A model is kept under the options it was loaded from (registry id, weights, config, text encoder, device, dtype,
weights folder) and the size and modification time of its weights file, so another device, dtype or weights file
(or the same file rewritten) loads again. One model per kind (CT-CLIP, fVLM, CT-CHAT) is kept: loading another
of the same kind frees the previous one first. `unload()` frees them all.
"""

from __future__ import annotations

import gc
import json
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from CTFoundationLib.errors import CTFoundationError
from CTFoundationLib.weights import resolve_weights

Loaded = tuple[str, Any]  # (key, model)
Progress = Callable[[str], None]


def weights_signature(model_id: str, weights: Path | str | None, home: Path | str | None) -> list:
    """[path, size, mtime_ns] of the weights a model would load (an unresolvable one: the loader says why)."""
    try:
        path = resolve_weights(model_id, weights, home=home)
        stat = path.stat()
    except (CTFoundationError, OSError):
        return [str(weights)]
    return [str(path), stat.st_size, stat.st_mtime_ns]


def options_key(kind: str, options: Mapping[str, Any], weights: list) -> str:
    return json.dumps([kind, dict(options), weights], sort_keys=True, default=str)


class ModelStore:
    """The models of one process, by kind; `loads` counts the loads per kind (what a test can check)."""

    def __init__(self) -> None:
        self._slots: dict[str, Loaded] = {}
        self.loads: Counter[str] = Counter()
        self._progress: Progress = lambda step: None

    def _notify(self, step: str) -> None:
        """The progress callback the kept models hold: it reaches the job that uses them now."""
        self._progress(step)

    def _get(self, kind: str, key: str, load: Callable[[], Any], progress: Progress | None) -> tuple[Any, bool]:
        """(model, reused): the kept model of `kind` when it has this key, else the previous one freed and
        `load()` called."""
        self._progress = progress or (lambda step: None)
        kept = self._slots.get(kind)
        if kept is not None and kept[0] == key:
            return kept[1], True
        self.free(kind)
        model = load()
        self._slots[kind] = (key, model)
        self.loads[kind] += 1
        return model, False

    def ctclip(self, options: Mapping[str, Any], progress: Progress | None = None):
        """CTCLIPRuntime.from_registry(**options), kept. A reused runtime's step timings start empty (a result's
        `timings_s` lists what this job did: no `load_model` when the model was already loaded)."""
        from CTFoundationLib.inference.ctclip import CTCLIPRuntime

        weights = weights_signature(options.get("model_id", "ct-clip-v2"), options.get("weights"),
                                    options.get("home"))
        runtime, reused = self._get("ct-clip", options_key("ct-clip", options, weights),
                                    lambda: CTCLIPRuntime.from_registry(**options, progress=self._notify), progress)
        if reused:
            runtime.timings_s.clear()
        runtime.keep_tokens = False  # a report with a narrative turns it on for its own run
        return runtime

    def fvlm(self, options: Mapping[str, Any], progress: Progress | None = None):
        """FVLMScoring.from_registry(**options), kept when fVLM is installed (a skipped scoring is not kept:
        fVLM installed later is then found)."""
        from CTFoundationLib.inference.grounding import FVLMScoring

        weights = weights_signature("fvlm", options.get("weights"), options.get("home"))
        scoring, reused = self._get("fvlm", options_key("fvlm", options, weights),
                                    lambda: FVLMScoring.from_registry(**options, progress=self._notify), progress)
        if scoring.runtime is None:
            self.free("fvlm")
        return scoring

    def chat_model(self, model_id: str, options: Mapping[str, Any], progress: Progress | None = None):
        """load_chat_model(model_id, **options) (a report's narrative), kept under the CT-CHAT kind."""
        from CTFoundationLib.inference.chat import load_chat_model

        weights = weights_signature(model_id, options.get("lora"), options.get("home"))
        model, _reused = self._get("ct-chat", options_key(f"model:{model_id}", options, weights),
                                   lambda: load_chat_model(model_id, progress=self._notify, **options), progress)
        return model

    def chat(self, model_id: str, options: Mapping[str, Any], progress: Progress | None = None):
        """ChatRuntime.from_registry(model_id, **options), kept; its key includes the device and the CT-CLIP
        checkpoint it encodes with."""
        from CTFoundationLib.inference.chat import ChatRuntime

        weights = weights_signature(model_id, options.get("lora"), options.get("home"))
        runtime, _reused = self._get("ct-chat", options_key(f"runtime:{model_id}", options, weights),
                                     lambda: ChatRuntime.from_registry(model_id, progress=self._notify, **options),
                                     progress)
        return runtime

    def kept(self) -> dict[str, str]:
        """Kind -> the key of the model kept for it."""
        return {kind: key for kind, (key, _model) in self._slots.items()}

    def free(self, kind: str) -> bool:
        """Drop the kept model of `kind`; True when there was one."""
        if self._slots.pop(kind, None) is None:
            return False
        release_memory()
        return True

    def unload(self) -> list[str]:
        """Drop every kept model; returns the kinds that were loaded."""
        kinds = sorted(self._slots)
        self._slots.clear()
        release_memory()
        return kinds


def release_memory() -> None:
    """Collect the dropped models and empty PyTorch's GPU cache (the process gives freed CPU memory back to the
    system with `host.allocator.trim_freed_memory`)."""
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
