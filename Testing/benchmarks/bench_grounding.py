"""Region-level accuracy of sentence grounding on RadGenome-ChestCT abnormality sentences, per split and region.

Run: .venv/bin/python Testing/benchmarks/bench_grounding.py [train_vqa_abnormality.csv]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from CTFoundationLib.evaluation.grounding import region_accuracy

DEFAULT = Path(__file__).resolve().parents[3] / "shared/data/reports/radgenome_subset2000/train_vqa_abnormality.csv"


def main() -> None:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT
    for held_out in (False, True):
        start = time.perf_counter()
        score = region_accuracy(path, held_out=held_out)
        seconds = time.perf_counter() - start
        part = "held-out (20 % of patients)" if held_out else "development (80 % of patients)"
        print(f"{part}: region accuracy {score.accuracy:.3f} on {score.cases} sentences, "
              f"{score.no_region} without any region, {1000 * seconds / score.cases:.2f} ms/sentence")
        for region, (correct, total) in sorted(score.per_region.items()):
            print(f"  {region:22} {correct / total:.3f}  ({total})")
        print("  most frequent errors (gold -> predicted):",
              ", ".join(f"{g} -> {p} ({n})" for (g, p), n in score.confusions.most_common(6)))


if __name__ == "__main__":
    main()
