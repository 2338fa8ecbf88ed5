"""Errors the library raises on bad input. Each message says what is wrong, where, and what to do."""


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


class ChatError(CTFoundationError):
    """A CT-CHAT conversation that cannot go on: unknown template or answer type, a busy session, a bad prompt."""


class ContextLengthError(ChatError):
    """The conversation no longer fits the language model's context; start a new one."""
