"""The weights registry: which files each model needs, where they come from and under which licence.

The built-in registry is `Resources/models.json` beside the library (schema beside it). A site can point
`CTFOUNDATION_REGISTRY` at its own JSON file of the same form: its models and licences replace or extend
the built-in ones (or replace the whole registry with `"replace": true`). `CTFOUNDATION_MIRROR` swaps
the Hugging Face Hub base URL for a Hub-compatible mirror.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from CTFoundationLib.errors import WeightsError
from CTFoundationLib.resources import RESOURCES

BUILTIN_REGISTRY = RESOURCES / "models.json"
SCHEMA_PATH = RESOURCES / "models.schema.json"
DEFAULT_ENDPOINT = "https://huggingface.co"
FAMILIES = ("ct-clip", "fvlm", "ct-chat", "text-encoder", "llm")
SOURCE_TYPES = ("hf", "url", "manual", "local")


@dataclass(frozen=True)
class License:
    """A licence the user may have to acknowledge once before getting weights."""

    id: str
    name: str
    url: str
    summary: str
    acknowledge: bool


@dataclass(frozen=True)
class Source:
    """Where one file (or Hub folder) comes from: type 'hf', 'url', 'manual' or 'local' (built here by `command`)."""

    type: str
    repo: str = ""
    repo_type: str = "model"
    revision: str = "main"
    path: str = ""
    url: str = ""
    instructions: str = ""
    command: str = ""
    select: str | None = None
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    auth: bool = False

    def describe(self) -> str:
        """Short human description: 'hf:dataset:owner/name@rev/path', the URL, or 'manual'."""
        if self.type == "hf":
            return f"hf:{self.repo_type}:{self.repo}@{self.revision}/{self.path}"
        if self.type == "local":
            return f"built on this machine ({self.command})"
        return self.url if self.type == "url" else f"manual ({self.url})"


@dataclass(frozen=True)
class FileSpec:
    """One file of a model, or one Hub folder (`folder=True`) expanded at download time."""

    name: str
    source: Source
    size: int | None = None
    sha256: str | None = None
    folder: bool = False
    format: str = "any"
    optional: bool = False


@dataclass(frozen=True)
class RuntimeSpec:
    """How the runtime uses a model's files (all optional; paths are relative to the model folder).

    preprocess: name of the input `PreprocessSpec`; constructors: JSON of the reference constructor arguments
    (None: full size); tokenizer: vocab.txt or tokenizer folder (None: that of the `text_encoder` model);
    thresholds: per-finding thresholds JSON; notice: shown whenever it is used; task: CT-CLIP's "zero-shot"
    (prompt pairs, needs the text side) or "linear-probe"; template: CT-CHAT's conversation template;
    demo_version: for a demo model built on this machine, the build an installed copy must come from.
    """

    preprocess: str | None = None
    constructors: str | None = None
    tokenizer: str | None = None
    thresholds: str | None = None
    notice: str = ""
    task: str = "zero-shot"
    text_encoder: str | None = None
    template: str | None = None
    demo_version: int | None = None

    @property
    def needs_text(self) -> bool:
        """Whether scoring needs the text side (prompt latents): zero-shot does, a linear probe does not."""
        return self.task != "linear-probe"


@dataclass(frozen=True)
class ModelSpec:
    """A model entry: its files, licence, access and dependencies."""

    id: str
    title: str
    family: str
    license: License
    gated: bool
    page: str
    depends_on: tuple[str, ...]
    files: tuple[FileSpec, ...]
    resources: dict[str, Any] = field(default_factory=dict)
    entry: str | None = None
    notes: str = ""
    runtime: RuntimeSpec = field(default_factory=lambda: RuntimeSpec())

    @property
    def manual(self) -> bool:
        """True when at least one file can only be obtained by hand or built on this machine."""
        return any(f.source.type in ("manual", "local") for f in self.files)

    def entry_name(self) -> str:
        """What resolve_weights returns, relative to the model folder."""
        if self.entry is not None:
            return self.entry
        single = len(self.files) == 1 and not self.files[0].folder
        return self.files[0].name if single else "."


@dataclass
class Registry:
    """All known models and licences, plus the Hub endpoint in use."""

    models: dict[str, ModelSpec]
    licenses: dict[str, License]
    endpoint: str = DEFAULT_ENDPOINT
    origin: str = str(BUILTIN_REGISTRY)

    def get(self, model_id: str) -> ModelSpec:
        """The model entry, or a WeightsError naming the known ids."""
        try:
            return self.models[model_id]
        except KeyError:
            known = ", ".join(sorted(self.models))
            raise WeightsError(f"unknown model '{model_id}'; known models: {known}") from None

    def closure(self, model_id: str) -> list[ModelSpec]:
        """The model and everything it depends on, dependencies first, each once."""
        order: list[ModelSpec] = []
        self._visit(model_id, order, [])
        return order

    def ids(self, family: str) -> list[str]:
        """The ids of one family's models, in registry order (e.g. the CT-CLIP checkpoints a command offers)."""
        return [model_id for model_id, spec in self.models.items() if spec.family == family]

    def _visit(self, model_id: str, order: list[ModelSpec], stack: list[str]) -> None:
        if model_id in stack:
            raise WeightsError(f"registry {self.origin}: dependency cycle {' -> '.join(stack + [model_id])}")
        spec = self.get(model_id)
        if spec in order:
            return
        for dep in spec.depends_on:
            self._visit(dep, order, stack + [model_id])
        order.append(spec)


def load_registry(path: Path | None = None) -> Registry:
    """Load the built-in registry merged with the override ($CTFOUNDATION_REGISTRY or `path`)."""
    data = _read_json(BUILTIN_REGISTRY)
    origin = str(BUILTIN_REGISTRY)
    env = os.environ.get("CTFOUNDATION_REGISTRY")
    override_path = path or (Path(env) if env else None)
    if override_path is not None:
        data = _merge(data, _read_json(override_path))
        origin = f"{BUILTIN_REGISTRY} + {override_path}"
    endpoint = os.environ.get("CTFOUNDATION_MIRROR") or data.get("hub_endpoint") or DEFAULT_ENDPOINT
    return _build(data, endpoint.rstrip("/"), origin)


def _read_json(path: Path) -> dict[str, Any]:
    """Parse a registry file; say which file and what to do when it is unreadable."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise WeightsError(f"registry file {path} not found; fix CTFOUNDATION_REGISTRY or unset it") from None
    except (OSError, ValueError) as error:
        raise WeightsError(f"registry file {path} is not readable JSON ({error}); fix or remove it") from None
    if not isinstance(data, dict) or data.get("schema_version") != 1 or not isinstance(data.get("models"), dict):
        raise WeightsError(f"registry file {path}: expected an object with schema_version 1 and a 'models' object")
    _schema_check(data, path)
    return data


def _schema_check(data: dict[str, Any], path: Path) -> None:
    """Validate against models.schema.json when `jsonschema` is installed (the semantic checks always run)."""
    try:
        import jsonschema
    except ImportError:
        return
    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(schema).iter_errors(data))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "(top level)"
        raise WeightsError(f"registry file {path} does not match the schema at {where}: {error.message}")


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Override entries replace built-in ones of the same id; `replace: true` drops the built-ins."""
    if override.get("replace"):
        return override
    merged = dict(base)
    merged["licenses"] = {**base.get("licenses", {}), **override.get("licenses", {})}
    merged["models"] = {**base["models"], **override["models"]}
    if "hub_endpoint" in override:
        merged["hub_endpoint"] = override["hub_endpoint"]
    return merged


def _build(data: dict[str, Any], endpoint: str, origin: str) -> Registry:
    licenses = {key: _license(key, value, origin) for key, value in data.get("licenses", {}).items()}
    models = {key: _model(key, value, licenses, origin) for key, value in data["models"].items()}
    for spec in models.values():
        for dep in spec.depends_on:
            if dep not in models:
                raise WeightsError(f"registry {origin}: model '{spec.id}' depends on unknown model '{dep}'")
    registry = Registry(models=models, licenses=licenses, endpoint=endpoint, origin=origin)
    for model_id in models:
        registry.closure(model_id)  # raises on cycles
    return registry


def _license(key: str, raw: dict[str, Any], origin: str) -> License:
    try:
        return License(key, raw["name"], raw["url"], raw["summary"], bool(raw["acknowledge"]))
    except (KeyError, TypeError) as error:
        raise WeightsError(f"registry {origin}: licence '{key}' lacks {error}") from None


def _model(key: str, raw: dict[str, Any], licenses: dict[str, License], origin: str) -> ModelSpec:
    where = f"registry {origin}: model '{key}'"
    try:
        license_ = licenses[raw["license"]]
    except KeyError:
        raise WeightsError(f"{where}: licence '{raw.get('license')}' is not defined under 'licenses'") from None
    if raw.get("family") not in FAMILIES:
        raise WeightsError(f"{where}: family must be one of {', '.join(FAMILIES)}")
    files = tuple(_file(f, where) for f in raw.get("files", []))
    if not files:
        raise WeightsError(f"{where}: no files listed")
    names = [f.name for f in files]
    if len(set(names)) != len(names):
        raise WeightsError(f"{where}: file names repeat")
    return ModelSpec(
        id=key,
        title=raw.get("title", key),
        family=raw["family"],
        license=license_,
        gated=bool(raw.get("gated", False)),
        page=raw.get("page", ""),
        depends_on=tuple(raw.get("depends_on", [])),
        files=files,
        resources=dict(raw.get("resources", {})),
        entry=raw.get("entry"),
        notes=raw.get("notes", ""),
        runtime=_runtime(raw.get("runtime", {}), where),
    )


def _runtime(raw: Any, where: str) -> RuntimeSpec:
    known = {f.name for f in fields(RuntimeSpec)}
    if not isinstance(raw, dict) or set(raw) - known:
        raise WeightsError(f"{where}: 'runtime' takes the keys {sorted(known)}, got {raw!r}")
    return RuntimeSpec(**raw)


def _file(raw: dict[str, Any], where: str) -> FileSpec:
    name = str(raw.get("name", ""))
    if not name or name.startswith("/") or ".." in name.split("/") or "\\" in name:
        raise WeightsError(f"{where}: file name '{name}' must be a relative path inside the model folder")
    source = _source(raw.get("source") or {}, f"{where}, file '{name}'")
    folder = bool(raw.get("folder", False))
    if folder and source.type != "hf":
        raise WeightsError(f"{where}, file '{name}': folder entries need an 'hf' source")
    if name == "." and not folder:
        raise WeightsError(f"{where}: only a folder entry may be named '.'")
    sha = raw.get("sha256")
    return FileSpec(
        name=name,
        source=source,
        size=raw.get("size"),
        sha256=sha.lower() if sha else None,
        folder=folder,
        format=raw.get("format", "any"),
        optional=bool(raw.get("optional", False)),
    )


def _source(raw: dict[str, Any], where: str) -> Source:
    kind = raw.get("type")
    if kind not in SOURCE_TYPES:
        raise WeightsError(f"{where}: source type must be one of {', '.join(SOURCE_TYPES)}")
    if kind == "hf" and not raw.get("repo"):
        raise WeightsError(f"{where}: an 'hf' source needs 'repo'")
    if kind in ("url", "manual") and not raw.get("url"):
        raise WeightsError(f"{where}: a '{kind}' source needs 'url'")
    if kind == "local" and not raw.get("command"):
        raise WeightsError(f"{where}: a 'local' source needs 'command'")
    return Source(
        type=kind,
        repo=raw.get("repo", ""),
        repo_type=raw.get("repo_type", "model"),
        revision=raw.get("revision", "main"),
        path=raw.get("path", ""),
        url=raw.get("url", ""),
        instructions=raw.get("instructions", ""),
        command=raw.get("command", ""),
        select=raw.get("select"),
        include=tuple(raw.get("include", ())),
        exclude=tuple(raw.get("exclude", ())),
        auth=bool(raw.get("auth", False)),
    )
