"""The `ctfoundation` command line. Each feature module adds its sub-commands through `register(subparsers)`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from . import __version__
from .allocator import reuse_freed_memory
from .errors import CTFoundationError

FEATURE_MODULES = (
    "cli_input", "cli_ctclip", "cli_weights", "cli_ground", "cli_report", "cli_labels", "cli_chat", "cli_training",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ctfoundation", description="Chest-CT foundation models, headless.")
    parser.add_argument("--version", action="version", version=f"ctfoundation {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from importlib import import_module

    for name in FEATURE_MODULES:
        import_module(f".{name}", __package__).register(subparsers)
    return parser


def report_errors(run: Callable[[], int | None]) -> int:
    """Exit code of a command body: its own, 2 with one `error:` line on a CTFoundationError, 130 on Ctrl-C."""
    try:
        return int(run() or 0)
    except CTFoundationError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    reuse_freed_memory()
    return report_errors(lambda: args.run(args))


if __name__ == "__main__":
    sys.exit(main())
