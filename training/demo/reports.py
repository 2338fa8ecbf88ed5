"""Report text for demo cases, from templates in the wording of real CT-RATE reports.

The sentences follow the order and phrasing of the CT-RATE Findings (two or three of trachea, mediastinum,
heart, pericardium, lymph nodes; then pleura, lung parenchyma, sometimes bones); each inserted finding gets
a sentence naming its type, size, side and lobe; absent findings often get the negative sentence real
reports use. Impressions list the positives.
"""

from __future__ import annotations

import numpy as np

from .findings import Inserted

OPENING = (
    ("Trachea, both main bronchi are open.", "Trachea and both main bronchi are open.",
     "Trachea and both main bronchi are normal.", "Trachea and lumen of both main bronchi are open."),
    ("Mediastinal main vascular structures are normal.",
     "Calibration of mediastinal main vascular structures is natural.",
     "Mediastinal main vascular structures, heart contour, size are normal."),
    ("Heart contour and size are normal.", "Heart contour, size is normal.",
     "Heart dimensions and compartments appear natural."),
    ("Pericardial effusion-thickening was not observed.", "Pericardial effusion was not detected."),
    ("No enlarged lymph nodes in pathological size and appearance were detected in the mediastinum and hilar regions.",
     "No lymph node was detected in mediastinal and bilateral hilar pathological size and appearance."),
)
CLOSING = (
    "No lytic-destructive lesions were detected in the bone structures within the sections.",
    "Degenerative changes are observed in the bone structures within the sections.",
)

POSITIVE = {
    "Lung nodule": (
        "Multiple nodules are observed in both lungs, the largest measuring {size} mm in the {zone} "
        "of the {side} lung.",
        "There are multiple nodules in both lungs, the largest {size} mm in diameter in the {side} lung {zone}.",
        "Nodules are observed in both lungs, the largest measuring {size} mm in the {zone} of the {side} lung.",
    ),
    "Pleural effusion": (
        "Pleural effusion with a thickness of {size} mm was observed in the {side} hemithorax.",
        "There is pleural effusion in the {side} hemithorax, measuring {size} mm in its thickest part.",
    ),
    "Consolidation": (
        "Consolidation areas are observed in the {zone} of the {side} lung.",
        "There is an area of consolidation in the {side} lung {zone}.",
        "Focal consolidation was observed in the {side} lung {zone}.",
    ),
    "Lung opacity": (
        "Ground-glass opacities are observed in the {zone} of the {side} lung.",
        "There are areas of ground glass density in the {side} lung {zone}.",
        "Focal ground glass areas are observed in the {zone} of the {side} lung.",
    ),
    "Emphysema": (
        "There are emphysematous changes in both lungs, more prominent in the {zone}.",
        "Centrilobular and paraseptal emphysematous changes are observed in both lungs.",
        "Emphysematous changes are present in both lungs.",
    ),
    "Arterial wall calcification": (
        "There are wall calcifications in the {kind}.",
        "Calcific atheroma plaques are observed in the {kind}.",
        "Calcified atheroma plaques were observed in the mediastinal main vascular structures.",
    ),
}
DEVICE = {
    "pacemaker": (
        "There is a pacemaker and electrodes extending to the ventricle on the {side} chest wall.",
        "The pacemaker material terminates in the right atrium and ventricle.",
        "Cardiac pacemaker is observed in the {side} hemithorax.",
    ),
    "port catheter": (
        "A port catheter extending from the {side} subclavian vein to the superior vena cava is observed.",
        "Port catheter material is observed on the {side} chest wall, extending to the superior vena cava.",
    ),
    "central venous catheter": (
        "A central venous catheter was observed in the superior vena cava.",
        "A catheter extending from the {side} internal jugular vein to the superior vena cava was observed.",
    ),
}
NEGATIVE = {
    "Lung nodule": ("No mass or nodule was detected in both lungs.",
                    "In the evaluation of both lung parenchyma; "
                    "No mass nodule infiltration was detected in both lungs."),
    "Pleural effusion": ("Pleural effusion-thickening was not detected.", "No pleural effusion was detected."),
    "Consolidation": ("No pneumonic infiltration or consolidation area was detected in the lung parenchyma.",),
    "Lung opacity": ("No ground glass opacity was observed in the lung parenchyma.",),
    "Emphysema": ("No emphysematous changes were observed in both lungs.",),
    "Arterial wall calcification": ("No calcific atheroma plaque was observed in the main vascular structures.",),
}
IMPRESSION = {
    "Lung nodule": "Multiple nodules in both lungs.",
    "Pleural effusion": "Pleural effusion in the {side} hemithorax.",
    "Consolidation": "Consolidation in the {side} lung {zone}.",
    "Lung opacity": "Ground glass opacity in the {zone} of the {side} lung.",
    "Emphysema": "Emphysema in both lungs.",
    "Arterial wall calcification": "Atherosclerotic changes in the {kind}.",
    "Medical material": "{kind} material.",
}
NEGATIVE_MENTION_PROBABILITY = 0.7


def finding_sentence(finding: Inserted, rng: np.random.Generator) -> str:
    if finding.name == "Medical material":
        templates = DEVICE[finding.kind]
    else:
        templates = POSITIVE[finding.name]
    return both_sides(str(rng.choice(templates)).format(size=int(finding.size_mm), side=finding.side, zone=finding.zone,
                                                         kind=finding.kind))


def both_sides(text: str) -> str:
    """Grammar of a template filled with side 'both'."""
    return text.replace("in the both hemithorax", "in both hemithoraces").replace("the both lung", "both lungs")


def write_report(findings: list[Inserted], rng: np.random.Generator) -> tuple[str, str]:
    """(Findings_EN, Impressions_EN) for a case with these inserted findings."""
    present = {f.name: f for f in findings}
    opening = sorted(rng.choice(len(OPENING), size=int(rng.integers(2, 4)), replace=False))
    sentences = [str(rng.choice(OPENING[i])) for i in opening]
    if "Arterial wall calcification" in present:
        sentences.insert(1, finding_sentence(present["Arterial wall calcification"], rng))
    if "Medical material" in present:
        sentences.insert(2, finding_sentence(present["Medical material"], rng))
    for name in ("Pleural effusion", "Emphysema", "Lung opacity", "Consolidation", "Lung nodule",
                 "Arterial wall calcification"):
        if name in present:
            if name != "Arterial wall calcification":
                sentences.append(finding_sentence(present[name], rng))
        elif rng.random() < NEGATIVE_MENTION_PROBABILITY:
            sentences.append(str(rng.choice(NEGATIVE[name])))
    if rng.random() < 0.5:
        sentences.append(str(rng.choice(CLOSING)))
    impressions = [
        both_sides(IMPRESSION[f.name].format(side=f.side, zone=f.zone, kind=f.kind)) for f in findings
    ]
    impressions = [line[0].upper() + line[1:] for line in impressions]
    return " ".join(sentences), (" ".join(f"• {line}" for line in impressions)
                                 or "No significant pathology was detected.")
