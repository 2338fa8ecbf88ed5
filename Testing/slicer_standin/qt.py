"""Stand-in for the `qt` names the module uses (see README.md). There is no event loop: tests call
`QTimer.fireActiveTimers()` where Qt would deliver timer events."""

from __future__ import annotations


class Signal:
    def __init__(self) -> None:
        self.slots = []

    def connect(self, slot) -> None:
        self.slots.append(slot)

    def emit(self, *args) -> None:
        for slot in list(self.slots):
            slot(*args)


class QTimer:
    active: list[QTimer] = []

    def __init__(self) -> None:
        self.timeout = Signal()
        self.interval = 0

    def setInterval(self, msec: int) -> None:
        self.interval = msec

    def start(self) -> None:
        if self not in QTimer.active:
            QTimer.active.append(self)

    def stop(self) -> None:
        if self in QTimer.active:
            QTimer.active.remove(self)

    def isActive(self) -> bool:
        return self in QTimer.active

    @classmethod
    def fireActiveTimers(cls) -> None:
        for timer in list(cls.active):
            timer.timeout.emit()


class QIcon:
    def __init__(self, path: str = "") -> None:
        self.path = path


class QColor:
    def __init__(self, *rgb) -> None:
        self.rgb = rgb


class QBrush:
    def __init__(self, color: QColor) -> None:
        self.color = color
