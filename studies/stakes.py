"""Precision and recall of the stakes rules (:mod:`router.stakes`) on a labelled prompt set.

Two sets of prompts written for this study, one JSON object a line: ``id``, ``domain``
(medical, legal, financial, safety), ``label`` (``high`` when someone's health, rights, money or
safety may hinge on the answer, else ``low``) and ``prompt``. The low ones are look-alikes: the
same domains' words in tasks where nothing hinges on the answer ("Summarise this contract
clause", "a recipe for vegetable stock", "kill the process").

* ``data/stakes.jsonl`` (290): the development set; the rules were written with it in view.
* ``data/stakes_test.jsonl`` (76): written after the rules were frozen and not used to change
  them; its figures are the ones to expect on new prompts.

Run ``python -m studies.stakes`` (``--errors`` lists every miss); the figures go to
docs/model-card.md.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable
from pathlib import Path

from router.stakes import assess_stakes

DATA = Path(__file__).resolve().parent / "data" / "stakes.jsonl"
TEST = DATA.with_name("stakes_test.jsonl")


def load(path: Path = DATA) -> list[dict[str, str]]:
    """The labelled rows."""
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def confusion(rows: Iterable[dict[str, str]]) -> dict[str, int]:
    """True/false positives and negatives of "high" against the labels."""
    counts = {"tp": 0, "fp": 0, "fn": 0, "tn": 0}
    for row in rows:
        got = assess_stakes(row["prompt"])[0] == "high"
        want = row["label"] == "high"
        counts[("t" if got == want else "f") + ("p" if got else "n")] += 1
    return counts


def precision_recall(counts: dict[str, int]) -> tuple[float, float]:
    """Precision and recall of "high" (1.0 where nothing was predicted or labelled high)."""
    tp, fp, fn = counts["tp"], counts["fp"], counts["fn"]
    return (tp / (tp + fp) if tp + fp else 1.0, tp / (tp + fn) if tp + fn else 1.0)


def report(rows: list[dict[str, str]]) -> list[str]:
    """Lines of precision and recall overall and per domain."""
    lines = [f"{'domain':10} {'rows':>5} {'high':>5} {'precision':>9} {'recall':>7}"]
    for domain in ("medical", "legal", "financial", "safety", "all"):
        part = [r for r in rows if domain in ("all", r["domain"])]
        precision, recall = precision_recall(confusion(part))
        high = sum(r["label"] == "high" for r in part)
        lines.append(f"{domain:10} {len(part):>5} {high:>5} {precision:>9.3f} {recall:>7.3f}")
    return lines


def main(argv: list[str] | None = None) -> None:
    """Print precision and recall overall and per domain, for each set."""
    parser = argparse.ArgumentParser(prog="python -m studies.stakes", description=__doc__)
    parser.add_argument(
        "--data", type=Path, action="append", help="labelled JSONL (default: both sets)"
    )
    parser.add_argument("--errors", action="store_true", help="list every misclassified prompt")
    args = parser.parse_args(argv)
    for path in args.data or [DATA, TEST]:
        rows = load(path)
        print(f"== {path.name}")
        print("\n".join(report(rows)))
        if args.errors:
            for row in rows:
                level, reason = assess_stakes(row["prompt"])
                if (level == "high") != (row["label"] == "high"):
                    kind = "FP" if level == "high" else "FN"
                    print(f"{kind} {row['domain']:9} {row['prompt'][:80]!r} ({reason})")


if __name__ == "__main__":
    main()
