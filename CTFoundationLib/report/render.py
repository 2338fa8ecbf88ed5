"""HTML pages of a batch report, from the Jinja2 templates in Resources/report (autoescaped)."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import jinja2
from markupsafe import Markup

from CTFoundationLib.report.keyimages import KeyImage
from CTFoundationLib.resources import RESOURCES

TEMPLATES = RESOURCES / "report"
NOT_FOR_CLINICAL_USE = (
    "Research software — not for clinical use. Findings are model outputs, not diagnoses; "
    "a radiologist must read the images."
)


@lru_cache(maxsize=1)
def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def render_case(result: dict, images: Sequence[KeyImage], sections: Sequence[tuple[str, str, str]]) -> str:
    """report.html of one finished case.

    result: the case's result.json content; sections: (key, title, html fragment) of the optional sections.
    """
    findings = sorted(result["detection"]["findings"], key=lambda f: -f["probability"])
    groups: dict[str, list[KeyImage]] = {}
    for image in images:
        groups.setdefault(image.through, []).append(image)
    return _environment().get_template("case.html.j2").render(
        result=result,
        findings=findings,
        image_groups=groups,
        sections=[(key, title, Markup(fragment)) for key, title, fragment in sections],
        notice=NOT_FOR_CLINICAL_USE,
    )


def render_index(rows: Sequence[dict], generated: str) -> str:
    """index.html across cases; rows as `summary.summary_rows` gives them."""
    counts = {status: sum(row["status"] == status for row in rows) for status in ("ok", "failed", "pending", "skipped")}
    return _environment().get_template("index.html.j2").render(
        rows=rows, counts=counts, generated=generated, notice=NOT_FOR_CLINICAL_USE
    )
