"""Detection results as plain data (no torch): what `CTCLIPRuntime.detect` returns and the JSON stores.

Kept apart from the runtimes so that light processes (the Slicer GUI, report writers) can read results
without importing PyTorch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

from CTFoundationLib import __version__


@dataclass
class Finding:
    name: str
    probability: float
    threshold: float | None = None
    positive: bool | None = None


@dataclass
class DetectionResult:
    """Per-finding probabilities of one volume, with what produced them. JSON-serialisable via `to_dict`."""

    model: str
    method: str
    checkpoint: str
    checkpoint_sha256: str
    device: str
    dtype: str
    findings: list[Finding]
    timings_s: dict[str, float] = field(default_factory=dict)
    software: str = f"ctfoundation {__version__}"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> DetectionResult:
        """The inverse of `to_dict` (e.g. the `detection` part of a `detect --out` JSON)."""
        fields = dict(data)
        fields["findings"] = [Finding(**finding) for finding in fields["findings"]]
        return cls(**fields)

    def probability(self, name: str) -> float:
        return next(f.probability for f in self.findings if f.name == name)


def detection_report(summary: dict, result: DetectionResult, maps: dict | None = None) -> dict:
    """What `ctfoundation detect --out` (and the worker's detect task) writes: the input summary and the result,
    and with `--maps` the maps' record (inference.maps.maps_record)."""
    return {"input": summary, "detection": result.to_dict(), **({"maps": maps} if maps else {})}
