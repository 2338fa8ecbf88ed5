"""Reading PyTorch weight files safely and loading them into our modules with clear errors.

Every failure is a `CheckpointError` naming the file, what is wrong and what to do.
"""

from __future__ import annotations

import logging
import pickle
import re
import warnings
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from CTFoundationLib.errors import CheckpointError

log = logging.getLogger(__name__)

StateSource = str | Path | Mapping[str, object]


def source_name(source: object) -> str:
    """How error messages name a checkpoint source."""
    return str(source) if isinstance(source, (str, Path)) else "(in-memory state dict)"


def load_torch_file(path: str | Path, what: str) -> object:
    """torch.load(weights_only=True) on CPU; zip-format files are memory-mapped (no full read)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} not found: {path} is not a file. Check the path or download the weights again.")
    try:
        with warnings.catch_warnings():
            # torch's note on a pickle protocol it did not write would reach the user beside the one-line error
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as exc:
        unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if unsafe:
            raise CheckpointError(
                f"{what} {path} holds a Python object ({unsafe.group(1)}), not only tensors, so it was not loaded "
                "(weights_only, for safety). Use the weights file as released by the model authors."
            ) from None
        reason = "not a PyTorch weights file"
    except Exception as exc:  # torch raises RuntimeError/EOFError/OSError/... for damaged files
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else 'unreadable'}"
    raise CheckpointError(
        f"{what} {path} cannot be read ({reason}); the file is damaged, incomplete or of another kind. "
        "Download it again."
    )


def as_state_dict(obj: object, source: object, what: str) -> dict[str, Tensor]:
    """Check that `obj` is a flat {str: Tensor} mapping and return it as a dict."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{what} {source} is a {type(obj).__name__}, not a dictionary of weights. Is it the right file?"
        )
    bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(
            f"{what} {source} is not a plain state dict: entries {bad[:5]} are not named tensors. Is it the right file?"
        )
    return dict(obj)


def apply_state_dict(
    module: nn.Module,
    state: Mapping[str, Tensor],
    *,
    source: object,
    what: str,
    ignore: Callable[[str], bool] = lambda key: False,
    extra_is_error: bool = False,
    other_sizes_advice: str = "pick the matching configuration or file",
) -> None:
    """Copy `state` into `module` after `check_state_dict`."""
    check_state_dict(module, state, source=source, what=what, ignore=ignore, extra_is_error=extra_is_error,
                     other_sizes_advice=other_sizes_advice)
    module.load_state_dict({k: state[k] for k in module.state_dict()}, strict=True)


def check_state_dict(
    module: nn.Module,
    state: Mapping[str, Tensor],
    *,
    source: object,
    what: str,
    ignore: Callable[[str], bool] = lambda key: False,
    extra_is_error: bool = False,
    other_sizes_advice: str = "pick the matching configuration or file",
) -> None:
    """Check that `state` fits `module` (which may live on the meta device): names and shapes.

    Missing weights and shape mismatches raise CheckpointError (the latter ends with `other_sizes_advice`: how the
    user passes the file's sizes); keys the module does not have are silently skipped when `ignore(key)`,
    otherwise raise (`extra_is_error`) or are logged.
    """
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    if missing:
        raise CheckpointError(
            f"{what} {source} lacks {len(missing)} of the {len(expected)} weights the model needs, "
            f"e.g. {missing[:5]}. It is incomplete or belongs to another model; use the released checkpoint."
        )
    wrong = [f"{k}: file {tuple(state[k].shape)}, model {tuple(v.shape)}" for k, v in expected.items()
             if state[k].shape != v.shape]
    if wrong:
        raise CheckpointError(
            f"{what} {source} has weights of the wrong shape ({'; '.join(wrong[:5])}). "
            f"It was trained with other sizes than this configuration; {other_sizes_advice}."
        )
    extra = [k for k in state if k not in expected and not ignore(k)]
    if extra and extra_is_error:
        raise CheckpointError(
            f"{what} {source} has weights this model does not define, e.g. {extra[:5]}: "
            "it is a different variant of the model; check the configuration."
        )
    if extra:
        log.warning("%s %s: %d unused weights ignored, e.g. %s", what, source, len(extra), extra[:5])
