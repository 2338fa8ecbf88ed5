"""Model weights manager: registry, local cache, verified downloads, offline import.

Public API (Slicer and other commands use these; nothing here imports slicer or qt):

    resolve_weights(model_id, override=None, *, home=None) -> Path
    download_model(model_id, *, home=None, with_deps=True, accept_licenses=False, options=None) -> Path
    import_model(model_id, source, *, home=None, accept_licenses=False, link=False) -> Path
    model_status(spec, home) / all_status(registry, home), verify_model(spec, home), remove_model(model_id, home)
    pending_licenses(model_ids, ...) and acknowledge_license(licence, home) for the one-time licence prompt

`home` is the cache root ($CTFOUNDATION_HOME, default ~/.cache/ctfoundation); Slicer passes its own.
"""

from __future__ import annotations

from pathlib import Path

from CTFoundationLib.errors import WeightsError
from CTFoundationLib.weights.cache import (
    Manifest,
    acknowledge_license,
    cache_root,
    get_token,
    is_license_acknowledged,
    model_dir,
    save_token,
    token_source,
)
from CTFoundationLib.weights.download import DownloadOptions, download_files, manual_message
from CTFoundationLib.weights.importer import import_weights
from CTFoundationLib.weights.manage import (
    INSTALLED,
    MISSING,
    PARTIAL,
    ModelStatus,
    VerifyResult,
    all_status,
    model_status,
    remove_model,
    resolve_weights,
    verify_model,
)
from CTFoundationLib.weights.registry import License, ModelSpec, Registry, load_registry

__all__ = [
    "INSTALLED", "MISSING", "PARTIAL", "DownloadOptions", "License", "Manifest", "ModelSpec", "ModelStatus",
    "Registry", "VerifyResult", "WeightsError", "acknowledge_license", "all_status", "cache_root", "check_downloadable",
    "download_model", "get_token", "import_model", "is_license_acknowledged", "load_registry", "model_dir",
    "model_status", "pending_licenses", "remove_model", "resolve_weights", "save_token", "token_source",
    "verify_model",
]


def pending_licenses(
    specs: list[ModelSpec], home: Path | str | None = None
) -> list[License]:
    """Licences of these models that still need the user's one-time acknowledgement (each once)."""
    pending: list[License] = []
    for spec in specs:
        if not is_license_acknowledged(spec.license, home) and spec.license not in pending:
            pending.append(spec.license)
    return pending


def check_downloadable(specs: list[ModelSpec]) -> None:
    """Fail early, before any prompt or network, when a model can only be obtained by hand."""
    for spec in specs:
        manual = next((f for f in spec.files if f.source.type in ("manual", "local")), None)
        if manual is not None:
            raise WeightsError(manual_message(spec, manual))


def _require_licenses(specs: list[ModelSpec], home: Path | str | None, accept: bool) -> None:
    pending = pending_licenses(specs, home)
    if pending and not accept:
        names = "; ".join(f"{lic.name} ({lic.url})" for lic in pending)
        raise WeightsError(
            f"licence not yet acknowledged: {names}. Read it, then accept it once "
            f"(`ctfoundation weights download ... --yes`, or acknowledge_license() from code)"
        )
    for license_ in pending:
        acknowledge_license(license_, home)


def download_model(
    model_id: str, *, home: Path | str | None = None, with_deps: bool = True, accept_licenses: bool = False,
    options: DownloadOptions | None = None, registry: Registry | None = None,
) -> Path:
    """Download a model (and, by default, the models it depends on); return what resolve_weights returns.

    Already verified files are skipped; interrupted files resume. `accept_licenses=True` records the
    acknowledgement of licences the caller has shown to the user.
    """
    registry = registry or load_registry()
    specs = registry.closure(model_id) if with_deps else [registry.get(model_id)]
    todo = [s for s in specs if model_status(s, home).state != INSTALLED]
    check_downloadable(todo)
    _require_licenses(todo, home, accept_licenses)
    options = options or DownloadOptions()
    for spec in todo:
        download_files(spec, registry, home, options)
    return resolve_weights(model_id, home=home, registry=registry)


def import_model(
    model_id: str, source: Path | str, *, home: Path | str | None = None, accept_licenses: bool = False,
    link: bool = False, registry: Registry | None = None,
) -> Path:
    """Import weights obtained elsewhere (offline) after checking them; return the model's entry path.

    The files are copied; `link=True` hard-links them instead (then the cache and `source` share their bytes).
    """
    registry = registry or load_registry()
    spec = registry.get(model_id)
    _require_licenses([spec], home, accept_licenses)
    import_weights(spec, source, home, link=link)
    return resolve_weights(model_id, home=home, registry=registry)
