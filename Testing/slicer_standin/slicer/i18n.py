"""Stand-in for slicer.i18n: no translation."""


def tr(text: str) -> str:
    return text
