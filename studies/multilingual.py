"""How the shipped router reads the same requests written in other languages.

``studies/data/multilingual_dev.jsonl`` holds 145 prompts written for Tiergate: 16 tasks (two
per capability: coding, math, reasoning, extraction, summarization, knowledge QA, creative
writing, role-play) each in English, Spanish, French, German, Chinese, Japanese and Arabic, and
33 lines of small talk in eleven languages. No answers, no judgements: the study measures

1. per language, how often a task's capability is the one the scorer gives its English text;
2. per language, the mean routing score under the bundled model's profile and under the
   published Llama-3.1-8B profile, with 95% bootstrap intervals;
3. for small talk, the capability and whether the default policy keeps it local.

The scorer and policy load as ``tiergate score`` and the proxy load them::

    python -m studies.multilingual [--model DIR] [--out PATH]

Writes ``studies/results/multilingual.json`` by default.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from router.artifact import default_model_path, load_scorer
from router.policy import evaluate, load_policy
from router.profile import default_profile_path, load_profile, profile_dir
from router.signals import extract_signals
from studies.chat_categories import bootstrap_mean

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "studies" / "data" / "multilingual_dev.jsonl"
RESULTS = ROOT / "studies" / "results" / "multilingual.json"
POLICY = ROOT / "policies" / "default.yaml"
LANGUAGES = ("en", "es", "fr", "de", "zh", "ja", "ar")


def _profiles() -> list[Path]:
    return [default_profile_path(), profile_dir() / "Llama-3.1-8B-Instruct.yaml"]


def measure(rows: Sequence[dict[str, Any]], model: Path) -> dict[str, Any]:
    """Agreement with English and mean scores per language; small talk's decisions."""
    tasks = [r for r in rows if r["capability"] != "chat"]
    talk = [r for r in rows if r["capability"] == "chat"]
    policy = load_policy(POLICY)
    out: dict[str, Any] = {"model": model.name, "data": DATA.name, "n": len(rows)}
    by_profile: dict[str, Any] = {}
    labels: dict[str, str] = {}
    for path in _profiles():
        profile = load_profile(path)
        scorer = load_scorer(model, profile)
        analyses = {r["id"]: scorer.analyze(r["prompt"]) for r in rows}
        labels = {k: str(a.capability) for k, a in analyses.items()}
        scores = {}
        for lang in LANGUAGES:
            s = [analyses[r["id"]].score for r in tasks if r["lang"] == lang]
            scores[lang] = bootstrap_mean(s)
        kept = {}
        for r in talk:
            body = {"model": "auto", "messages": [{"role": "user", "content": r["prompt"]}]}
            decision = evaluate(policy, extract_signals(body, scorer))
            kept[r["id"]] = {
                "capability": labels[r["id"]],
                "tier": str(decision.tier),
                "rule": decision.rule,
            }
        by_profile[path.name] = {"mean_score": scores, "small_talk": kept}
    agree: dict[str, Any] = {}
    for lang in LANGUAGES:
        same = [
            float(labels[r["id"]] == labels[r["id"].rsplit(".", 1)[0] + ".en"])
            for r in tasks
            if r["lang"] == lang
        ]
        authored = [float(labels[r["id"]] == r["capability"]) for r in tasks if r["lang"] == lang]
        agree[lang] = {
            "same_as_english": bootstrap_mean(same),
            "as_authored": bootstrap_mean(authored),
        }
    out["agreement"] = agree
    out["profiles"] = by_profile
    return out


def tables(res: dict[str, Any]) -> str:
    """The result as Markdown, for the model card."""
    names = list(res["profiles"])
    head = "| language | same capability as English | as authored | " + " | ".join(
        f"mean score, {n}" for n in names
    )
    lines = [head + " |", "| --- | ---: | ---: |" + " ---: |" * len(names)]
    for lang in LANGUAGES:
        a = res["agreement"][lang]
        cells = [f"{a['same_as_english']['mean']:.2f}", f"{a['as_authored']['mean']:.2f}"]
        for n in names:
            m = res["profiles"][n]["mean_score"][lang]
            cells.append(f"{m['mean']:.2f} [{m['low']:.2f}, {m['high']:.2f}]")
        lines.append(f"| {lang} | " + " | ".join(cells) + " |")
    for n in names:
        talk = res["profiles"][n]["small_talk"]
        local = sum(v["tier"] == "local" for v in talk.values())
        lines.append(f"\nSmall talk under {n}: {local} of {len(talk)} lines stay local.")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="router directory (default: the shipped)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    with open(DATA, encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    model = Path(args.model) if args.model else default_model_path()
    res = measure(rows, model)
    Path(args.out).write_text(json.dumps(res, indent=1, ensure_ascii=False) + "\n")
    print(tables(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
