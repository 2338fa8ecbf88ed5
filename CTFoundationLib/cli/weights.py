"""`ctfoundation weights ...`: list, status, download, import, verify, path, remove (and token).

Messages and progress go to stderr; `path` and the `--json` outputs go to stdout for other tools.
The Hugging Face token is never printed.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from pathlib import Path

from CTFoundationLib.errors import WeightsError
from CTFoundationLib.weights import (
    INSTALLED,
    DownloadOptions,
    License,
    ModelSpec,
    Registry,
    all_status,
    cache_root,
    check_downloadable,
    download_model,
    import_model,
    is_license_acknowledged,
    load_registry,
    model_status,
    pending_licenses,
    remove_model,
    resolve_weights,
    save_token,
    token_source,
    verify_model,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `weights` command and its actions."""
    parser = subparsers.add_parser("weights", help="list, download, import and check model weights")
    actions = parser.add_subparsers(dest="weights_action", required=True, metavar="ACTION")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--home", type=Path, help="cache root (default: $CTFOUNDATION_HOME or ~/.cache/ctfoundation)")

    p = actions.add_parser("list", parents=[common], help="every model with its licence and state")
    p.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    p.set_defaults(run=run_list)

    p = actions.add_parser("status", parents=[common], help="details of the cache and of models")
    p.add_argument("models", nargs="*", metavar="MODEL")
    p.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    p.set_defaults(run=run_status)

    p = actions.add_parser("download", parents=[common], help="download models (and what they depend on)")
    p.add_argument("models", nargs="+", metavar="MODEL")
    p.add_argument("--yes", action="store_true", help="accept the licences shown (for scripts)")
    p.add_argument("--no-deps", action="store_true", help="do not download the models this one depends on")
    p.add_argument("--retries", type=int, default=5, help="retries per file on connection errors (default 5)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(run=run_download)

    p = actions.add_parser("import", parents=[common], help="check and place weights obtained elsewhere (offline)")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("source", type=Path, metavar="FILE_OR_FOLDER")
    p.add_argument("--yes", action="store_true", help="accept the licence shown (for scripts)")
    p.add_argument("--link", action="store_true",
                   help="hard-link instead of copying when on the same filesystem (the cache then shares the file)")
    p.set_defaults(run=run_import)

    p = actions.add_parser("verify", parents=[common],
                           help="re-hash installed files and check CT-CLIP/fVLM checkpoints; bad ones are set aside")
    p.add_argument("models", nargs="*", metavar="MODEL", help="default: every model with files in the cache")
    p.set_defaults(run=run_verify)

    p = actions.add_parser("path", parents=[common], help="print the local path of a model's weights")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--weights", type=Path, help="an explicit weights file; printed when it exists")
    p.set_defaults(run=run_path)

    p = actions.add_parser("remove", parents=[common], help="delete a model's files from the cache")
    p.add_argument("models", nargs="+", metavar="MODEL")
    p.set_defaults(run=run_remove)

    p = actions.add_parser("token", parents=[common], help="store the Hugging Face token in the cache settings")
    p.add_argument("--clear", action="store_true", help="remove the stored token")
    p.set_defaults(run=run_token)


def say(message: str) -> None:
    print(message, file=sys.stderr)


def _size(n: float | int | None) -> str:
    if not n:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return "-"


def _access(spec: ModelSpec) -> str:
    if any(f.source.type == "local" for f in spec.files):
        return "local"
    return "manual" if spec.manual else ("gated" if spec.gated else "public")


# --- list / status -------------------------------------------------------------------------------------


def run_list(args: argparse.Namespace) -> int:
    registry = load_registry()
    rows = []
    for status in all_status(registry, args.home):
        spec = registry.models[status.model_id]
        approx = spec.resources.get("approx_download_gb")
        size = _size(status.size_bytes) if status.size_bytes else (f"~{approx:g} GB" if approx else "?")
        rows.append([spec.id, spec.family, status.state, size, spec.license.id, _access(spec)])
    if args.json:
        keys = ("model", "family", "state", "size", "license", "access")
        print(json.dumps([dict(zip(keys, row)) for row in rows], indent=2))
        return 0
    _table(["MODEL", "FAMILY", "STATE", "SIZE", "LICENCE", "ACCESS"], rows)
    say(f"cache: {cache_root(args.home)}")
    return 0


def _table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip())


def run_status(args: argparse.Namespace) -> int:
    registry = load_registry()
    specs = [registry.get(m) for m in args.models] if args.models else list(registry.models.values())
    report = [_status_entry(spec, registry, args.home) for spec in specs]
    if args.json:
        summary = {"cache": str(cache_root(args.home)), "token": token_source(args.home), "models": report}
        print(json.dumps(summary, indent=2))
        return 0
    print(f"cache: {cache_root(args.home)}")
    print(f"Hugging Face token: {token_source(args.home)}")
    print(f"registry: {registry.origin} (hub: {registry.endpoint})")
    for entry in report:
        _print_status(entry)
    return 0


def _status_entry(spec: ModelSpec, registry: Registry, home: Path | None) -> dict:
    status = model_status(spec, home)
    return {
        "model": spec.id,
        "title": spec.title,
        "state": status.state,
        "path": str(status.folder),
        "size_bytes": status.size_bytes,
        "partial_bytes": status.partial_bytes,
        "files": sorted(status.present),
        "missing": status.missing,
        "set_aside": status.corrupt,
        "license": spec.license.name,
        "license_url": spec.license.url,
        "license_acknowledged": is_license_acknowledged(spec.license, home),
        "access": _access(spec),
        "page": spec.page,
        "depends_on": {dep: model_status(registry.get(dep), home).state for dep in spec.depends_on},
        "resources": spec.resources,
    }


def _print_status(e: dict) -> None:
    print(f"\n{e['model']}: {e['state']}  ({e['title']})")
    print(f"  folder:   {e['path']}")
    acknowledged = "" if e["license_acknowledged"] else "  [not yet acknowledged]"
    print(f"  licence:  {e['license']} <{e['license_url']}>{acknowledged}")
    print(f"  access:   {e['access']}  {e['page']}")
    if e["files"]:
        print(f"  verified: {len(e['files'])} file(s), {_size(e['size_bytes'])}")
    if e["missing"]:
        print(f"  missing:  {', '.join(e['missing'])}")
    if e["set_aside"]:
        print(f"  set aside (failed checks, not used; delete when done): {', '.join(e['set_aside'])}")
    if e["partial_bytes"]:
        print(f"  partial:  {_size(e['partial_bytes'])} downloaded so far (resumes on the next download)")
    if e["depends_on"]:
        print("  needs:    " + ", ".join(f"{k} ({v})" for k, v in e["depends_on"].items()))


# --- download / import -----------------------------------------------------------------------------------


def confirm_licenses(licenses: list[License], assume_yes: bool) -> None:
    """Show each licence once and get an explicit yes (or --yes)."""
    for license_ in licenses:
        say(f"\nThese weights are licensed under {license_.name}\n  {license_.url}\n  {license_.summary}")
        if assume_yes:
            say("  accepted with --yes")
            continue
        if not sys.stdin or not sys.stdin.isatty():
            raise WeightsError(f"the licence {license_.name} must be accepted once: read it, then run again with --yes")
        answer = input("Type 'yes' to accept this licence: ").strip().lower()
        if answer not in ("yes", "y"):
            raise WeightsError(f"licence {license_.name} not accepted; nothing was downloaded")


class _Bars:
    """tqdm progress bars, one per file, on stderr."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bar = None

    def on_file(self, name: str, size: int | None) -> None:
        self.close()
        if not self.enabled:
            say(f"downloading {name} ({_size(size) if size else 'size unknown'})")
        else:
            from tqdm import tqdm

            self.bar = tqdm(total=size, desc=name, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr)

    def progress(self, done: int, total: int | None) -> None:
        if self.bar is not None:
            if total is not None and self.bar.total != total:
                self.bar.total = total
            self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def run_download(args: argparse.Namespace) -> int:
    registry = load_registry()
    specs: list[ModelSpec] = []
    for model_id in args.models:
        for spec in registry.closure(model_id) if not args.no_deps else [registry.get(model_id)]:
            if spec not in specs and model_status(spec, args.home).state != INSTALLED:
                specs.append(spec)
    check_downloadable(specs)
    confirm_licenses(pending_licenses(specs, args.home), args.yes)
    bars = _Bars(enabled=not args.no_progress and sys.stderr.isatty())
    options = DownloadOptions(
        retries=max(0, args.retries), progress=bars.progress, on_file=bars.on_file, on_event=lambda m: say(m)
    )
    try:
        for model_id in args.models:
            path = download_model(
                model_id, home=args.home, with_deps=not args.no_deps, accept_licenses=True, options=options,
                registry=registry,
            )
            bars.close()
            say(f"{model_id}: installed at {path}")
    finally:
        bars.close()
    return 0


def run_import(args: argparse.Namespace) -> int:
    registry = load_registry()
    spec = registry.get(args.model)
    confirm_licenses(pending_licenses([spec], args.home), args.yes)
    path = import_model(
        args.model, args.source, home=args.home, accept_licenses=True, link=args.link, registry=registry
    )
    say(f"{args.model}: imported and verified, at {path}")
    return 0


# --- verify / path / remove / token ------------------------------------------------------------------------


def run_verify(args: argparse.Namespace) -> int:
    registry = load_registry()
    if args.models:
        specs = [registry.get(m) for m in args.models]
    else:
        specs = [s for s in registry.models.values() if model_status(s, args.home).present]
    if not specs:
        say("nothing installed to verify")
        return 0
    failed = False
    for spec in specs:
        result = verify_model(spec, args.home)
        say(f"{spec.id}: {len(result.ok)} file(s) OK")
        for rel, why in result.bad.items():
            say(f"  BAD {rel}: {why}; set aside as {rel}.corrupt — download or import the right file again")
        for rel in result.missing:
            say(f"  MISSING {rel}: recorded but gone")
        state = model_status(spec, args.home).state
        failed |= bool(result.bad or result.missing) or (bool(args.models) and state != INSTALLED)
        if args.models and state != INSTALLED:
            say(f"  {spec.id} is {state}")
    return 1 if failed else 0


def run_path(args: argparse.Namespace) -> int:
    print(resolve_weights(args.model, args.weights, home=args.home))
    return 0


def run_remove(args: argparse.Namespace) -> int:
    registry = load_registry()
    for model_id in args.models:
        registry.get(model_id)  # unknown ids are an error
        freed = remove_model(model_id, args.home)
        say(f"{model_id}: removed ({_size(freed)} freed)" if freed else f"{model_id}: nothing to remove")
    return 0


def run_token(args: argparse.Namespace) -> int:
    if args.clear:
        say(f"token removed from {save_token(None, args.home)}")
        return 0
    if sys.stdin.isatty():
        token = getpass.getpass("Hugging Face token (input hidden): ")
    else:
        token = sys.stdin.readline()
    if not token.strip():
        raise WeightsError("no token given; nothing stored")
    say(f"token stored in {save_token(token, args.home)} (readable by you only)")
    return 0
