"""Errors the library raises on bad input. Each message says what is wrong, where, and what to do."""

from __future__ import annotations

import sys
import tempfile
import traceback
from collections.abc import Callable


class CTFoundationError(Exception):
    """Base class: the CLI prints these as one clear line instead of a traceback."""


class CTInputError(CTFoundationError):
    """A CT file or folder that cannot be read or is not a usable chest CT."""


class CheckpointError(CTFoundationError):
    """A model checkpoint that is missing, of the wrong kind, or damaged."""


class WeightsError(CTFoundationError):
    """Getting, verifying or placing model weights failed."""


class RetrievalError(CTFoundationError):
    """A case index that is missing, damaged or built with another model, or unusable retrieval input."""


class OutputError(CTFoundationError):
    """An output file or folder that cannot be written (permissions, a full disk)."""


class AnatomyError(CTFoundationError):
    """Anatomy masks (segmentation files, mask folders, TotalSegmentator) that cannot be read or used."""


class ReportLabelError(CTFoundationError):
    """A report CSV, labeller file or labeller training set that cannot be used."""


class EvaluationError(CTFoundationError):
    """Prediction or label files that cannot be evaluated together."""


class DependencyError(CTFoundationError):
    """A Python package the task needs is missing or too old in this environment (e.g. inside Slicer)."""


class WorkerError(CTFoundationError):
    """A background task could not start, failed, or was cancelled."""


class ChatError(CTFoundationError):
    """A CT-CHAT conversation that cannot go on: unknown template or answer type, a busy session, a bad prompt."""


class ContextLengthError(ChatError):
    """The conversation no longer fits the language model's context; start a new one."""


class TrainingError(CTFoundationError):
    """A training config, dataset or run that cannot be used (what is wrong, which file, what to do)."""


EXIT_ERROR = 2  # a CTFoundationError (bad input, missing weights, an unwritable output); argparse's usage errors too
EXIT_INTERNAL = 3  # an exception the program did not anticipate: a bug
EXIT_INTERRUPTED = 130  # Ctrl-C
# 0 is success and 1 a run in which some cases failed (`report`, `index`): no count of cases can take 2, 3 or 130.


def report_errors(run: Callable[[], int | None]) -> int:
    """Exit code of a command body: its own; EXIT_ERROR with one `error:` line on a CTFoundationError;
    EXIT_INTERNAL with one line and the traceback saved to a file on any other exception; EXIT_INTERRUPTED on
    Ctrl-C."""
    try:
        return int(run() or 0)
    except CTFoundationError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:  # one line for the user, the whole story in a file for the bug report
        with tempfile.NamedTemporaryFile("w", prefix="ctfoundation-error-", suffix=".txt", delete=False) as log:
            log.write("".join(traceback.format_exception(error)))
        print(f"internal error: {type(error).__name__}: {error}. This is a bug; please report it with {log.name}",
              file=sys.stderr)
        return EXIT_INTERNAL
