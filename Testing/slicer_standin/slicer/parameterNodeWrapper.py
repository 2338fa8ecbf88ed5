"""Stand-in for slicer.parameterNodeWrapper (see ../README.md): typed attributes stored on the node.

Supports what the module declares: str / bool / int / float (as parameters, with defaults and `Choice`)
and MRML node types (as node references, default None).
"""

from __future__ import annotations

import typing


class Choice:
    def __init__(self, choices) -> None:
        self.choices = list(choices)


def _field(name: str, annotation, default):
    base, validators = annotation, []
    if typing.get_origin(annotation) is typing.Annotated:
        base, *validators = typing.get_args(annotation)
    choice = next((v for v in validators if isinstance(v, Choice)), None)
    isNode = isinstance(base, type) and base.__name__.startswith("vtkMRML")

    def get(self):
        node = self.parameterNode
        if isNode:
            return node.GetNodeReference(name)
        return base(node.GetParameter(name)) if node.HasParameter(name) else default

    def set(self, value) -> None:
        node = self.parameterNode
        if isNode:
            node.SetNodeReferenceID(name, value.GetID() if value is not None else None)
            return
        if not isinstance(value, base):
            raise TypeError(f"{name}: expected {base.__name__}, got {type(value).__name__}")
        if choice is not None and value not in choice.choices:
            raise ValueError(f"{name}: {value!r} is not one of {choice.choices}")
        node.SetParameter(name, str(value))

    return property(get, set)


def parameterNodeWrapper(cls):
    hints = typing.get_type_hints(cls, include_extras=True)
    for name, annotation in hints.items():
        setattr(cls, name, _field(name, annotation, cls.__dict__.get(name)))

    def __init__(self, parameterNode) -> None:
        self.parameterNode = parameterNode

    cls.__init__ = __init__
    return cls
