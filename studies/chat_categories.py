"""How the shipped router reads an authored multi-category chat set (issue #16's categories).

``studies/data/chat_categories_dev.jsonl`` holds 160 prompts written for Tiergate, 20 for each
of the categories issue #16's hidden benchmark names (writing, roleplay, reasoning, math,
coding, extraction, stem, humanities). They carry no answers and no judgements, so there is no
APGR here; the study measures only what the prompts and their categories allow:

1. capability agreement, overall (bootstrap stratified by category) and per category, under
   the issue's strict mapping (stem and humanities -> knowledge_qa) and its loose one (stem and
   humanities -> knowledge_qa, reasoning or chat), with the confusion table;
2. per category, the mean routing score with its bootstrap interval, under each profile in
   ``models/profiles/`` (the bundled one first), and whether maths, reasoning and coding all
   score above writing, roleplay and humanities;
3. the longest shared word run check that the set was written under: rows sharing a run of 8
   words with any prompt in ``../shared/data/*.jsonl`` or the capability seeds.

The scorer is loaded through :func:`router.artifact.load_scorer`, as ``tiergate score`` and
``tiergate classify`` load it; ``--capability DIR`` reads the labels from a standalone
capability model instead::

    python -m studies.chat_categories [--model models/router-v4] [--out PATH]

Writes ``studies/results/chat_categories.json`` by default.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from router.artifact import (
    default_model_path,
    load_capability_model,
    load_scorer,
    read_sidecar,
)
from router.profile import default_profile_path, load_profile, profile_dir
from router.scoring import CAPABILITIES

ROOT = Path(__file__).resolve().parent.parent
DEV_FILE = ROOT / "studies" / "data" / "chat_categories_dev.jsonl"
SHARED = ROOT.parent / "shared" / "data"
#: Every capability seed set (the capability models' authored training prompts).
SEEDS = sorted((ROOT / "studies" / "data").glob("capability_seeds*.jsonl"))
RESULTS = ROOT / "studies" / "results" / "chat_categories.json"

CATEGORIES: tuple[str, ...] = (
    "writing",
    "roleplay",
    "reasoning",
    "math",
    "coding",
    "extraction",
    "stem",
    "humanities",
)
_SAME = {
    "writing": "creative_writing",
    "roleplay": "roleplay",
    "reasoning": "reasoning",
    "math": "math",
    "coding": "coding",
    "extraction": "extraction",
}
#: Issue #16's mapping from benchmark category to the capabilities that count as agreeing.
STRICT: dict[str, frozenset[str]] = {
    **{c: frozenset({cap}) for c, cap in _SAME.items()},
    "stem": frozenset({"knowledge_qa"}),
    "humanities": frozenset({"knowledge_qa"}),
}
LOOSE: dict[str, frozenset[str]] = {
    **STRICT,
    "stem": frozenset({"knowledge_qa", "reasoning", "chat"}),
    "humanities": frozenset({"knowledge_qa", "reasoning", "chat"}),
}
#: Where the strong model's advantage is largest, and where the two models tie (issue #16).
HIGH: tuple[str, ...] = ("math", "reasoning", "coding")
LOW: tuple[str, ...] = ("writing", "roleplay", "humanities")
N_BOOTSTRAP = 2000


def load_rows(path: Path = DEV_FILE) -> list[dict[str, Any]]:
    """A chat-category set's rows (id, category, prompt, author): the dev set by default."""
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def agreement(
    categories: Sequence[str], predicted: Sequence[str], mapping: Mapping[str, frozenset[str]]
) -> np.ndarray:
    """1.0 where a prompt's predicted capability is one its category maps to, else 0.0."""
    return np.array([float(p in mapping[c]) for c, p in zip(categories, predicted, strict=True)])


def resamples(
    strata: Sequence[str], *, n: int = N_BOOTSTRAP, seed: int = 0
) -> Iterator[np.ndarray]:
    """``n`` bootstrap draws of row indices, each stratum resampled within itself (the set has a
    fixed number of prompts per category by design)."""
    labels = np.asarray(strata)
    groups = [np.flatnonzero(labels == s) for s in dict.fromkeys(strata)]
    rng = np.random.default_rng(seed)
    for _ in range(n):
        yield np.concatenate([rng.choice(g, size=len(g)) for g in groups])


def _interval(point: float, draws: Iterable[float]) -> dict[str, float]:
    lo, hi = np.percentile(list(draws), [2.5, 97.5])
    return {"mean": point, "low": float(lo), "high": float(hi)}


def bootstrap_mean(
    values: Sequence[float] | np.ndarray,
    strata: Sequence[str] | None = None,
    *,
    n: int = N_BOOTSTRAP,
) -> dict[str, float]:
    """The mean and its 95% percentile bootstrap interval; ``strata``: resample within each."""
    v = np.asarray(values, dtype=float)
    labels = list(strata) if strata is not None else [""] * len(v)
    return _interval(float(v.mean()), (v[idx].mean() for idx in resamples(labels, n=n)))


def confusion(categories: Sequence[str], predicted: Sequence[str]) -> dict[str, dict[str, int]]:
    """Counts of predicted capability per category, every capability listed."""
    table = {c: dict.fromkeys(CAPABILITIES, 0) for c in dict.fromkeys(categories)}
    for c, p in zip(categories, predicted, strict=True):
        table[c][p] += 1
    return table


def _words(text: str) -> list[str]:
    return re.sub(r"[^\w\s]", " ", text.lower()).split()


def _runs(text: str, n: int) -> set[str]:
    w = _words(text)
    return {" ".join(w[i : i + n]) for i in range(len(w) - n + 1)}


def shared_runs(
    rows: Sequence[Mapping[str, Any]], others: Iterable[str], n: int = 8
) -> dict[str, list[str]]:
    """Rows sharing a run of ``n`` words (lower-cased, punctuation stripped) with any text in
    ``others``: row id -> the shared runs. Empty when the set is clean."""
    seen: set[str] = set()
    for text in others:
        seen |= _runs(text, n)
    found = {r["id"]: sorted(_runs(r["prompt"], n) & seen) for r in rows}
    return {k: v for k, v in found.items() if v}


def reference_prompts() -> Iterable[str]:
    """Every prompt of ``../shared/data/*.jsonl`` and of the capability seeds."""
    for path in [*sorted(SHARED.glob("*.jsonl")), *SEEDS]:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    yield str(json.loads(line).get("prompt", ""))


def profile_paths() -> list[Path]:
    """The bundled profile first, then every other profile file in ``models/profiles``."""
    first = default_profile_path()
    rest = sorted(
        p
        for p in profile_dir().iterdir()
        if p.suffix in {".json", ".yaml", ".yml"} and p.resolve() != first.resolve()
    )
    return [first, *rest]


def _by_category(
    categories: Sequence[str], values: np.ndarray, **kw: Any
) -> dict[str, dict[str, float]]:
    cats = np.asarray(categories)
    return {c: bootstrap_mean(values[cats == c], **kw) for c in CATEGORIES}


def _labels(model: Path, capability: Path | None, prompts: Sequence[str]) -> tuple[list[str], str]:
    if capability is None:
        scorer = load_scorer(model)
        # The capability model the router's sidecar names (its own, for older routers).
        cap = read_sidecar(model).get("serving", {}).get("capability", {})
        source = str(cap.get("name", scorer.version))
        return [str(scorer.analyze(p).capability) for p in prompts], source
    reader = load_capability_model(capability)
    names = reader.capabilities
    return [names[int(np.argmax(reader.probabilities(p)))] for p in prompts], reader.version


def measure(
    rows: Sequence[Mapping[str, Any]], model: Path, capability: Path | None = None
) -> dict[str, Any]:
    """Agreement, confusion and per-category scores of ``model`` on ``rows``."""
    cats = [str(r["category"]) for r in rows]
    prompts = [str(r["prompt"]) for r in rows]
    predicted, label_source = _labels(model, capability, prompts)
    out: dict[str, Any] = {"model": model.name, "capability_labels_from": label_source}
    for name, mapping in (("strict", STRICT), ("loose", LOOSE)):
        hits = agreement(cats, predicted, mapping)
        out[f"agreement_{name}"] = {
            "overall": bootstrap_mean(hits, cats),
            "per_category": _by_category(cats, hits),
        }
    out["confusion"] = confusion(cats, predicted)
    scores: dict[str, Any] = {}
    group = np.array([1.0 if c in HIGH else 0.0 if c in LOW else np.nan for c in cats])
    for path in profile_paths():
        profile = load_profile(path)
        scorer = load_scorer(model, profile)
        s = np.array([scorer.analyze(p).score for p in prompts])
        per = _by_category(cats, s)
        keep = ~np.isnan(group)
        gap = _group_gap(s[keep], group[keep], [c for c, k in zip(cats, keep, strict=True) if k])
        scores[path.name] = {
            "profile_model": profile.model,
            "source": profile.source,
            "per_category": per,
            "high_above_low": min(per[c]["mean"] for c in HIGH) > max(per[c]["mean"] for c in LOW),
            "high_minus_low": gap,
        }
    out["scores"] = scores
    return out


def _group_gap(s: np.ndarray, high: np.ndarray, strata: Sequence[str]) -> dict[str, float]:
    # Mean score of maths/reasoning/coding minus that of writing/roleplay/humanities.
    def gap(idx: np.ndarray) -> float:
        return float(s[idx][high[idx] == 1].mean() - s[idx][high[idx] == 0].mean())

    return _interval(gap(np.arange(len(s))), (gap(idx) for idx in resamples(strata)))


def _iv(m: Mapping[str, float], pct: bool = False) -> str:
    if pct:
        return f"{m['mean']:.0%} [{m['low']:.0%}, {m['high']:.0%}]"
    return f"{m['mean']:.2f} [{m['low']:.2f}, {m['high']:.2f}]"


def summary_line(res: Mapping[str, Any]) -> str:
    """One Markdown table row: agreement (strict, loose) and whether the bundled profile's
    score ranks maths/reasoning/coding above writing/roleplay/humanities."""
    bundled = next(iter(res["scores"].values()))
    return (
        f"| {res['model']} ({res['capability_labels_from']}) "
        f"| {_iv(res['agreement_strict']['overall'], True)} "
        f"| {_iv(res['agreement_loose']['overall'], True)} "
        f"| {_iv(bundled['high_minus_low'])} "
        f"| {'yes' if bundled['high_above_low'] else 'no'} |"
    )


def tables(res: Mapping[str, Any]) -> str:
    """The Markdown tables the model card quotes: agreement per category, the confusion table,
    and the mean score per category under each profile."""
    a, b = res["agreement_strict"], res["agreement_loose"]
    lines = [
        "| category | agreement, strict | agreement, loose |",
        "| --- | ---: | ---: |",
        *(
            f"| {c} | {_iv(a['per_category'][c], True)} | {_iv(b['per_category'][c], True)} |"
            for c in CATEGORIES
        ),
        f"| **all 160** | **{_iv(a['overall'], True)}** | **{_iv(b['overall'], True)}** |",
        "",
        "| category \\ predicted | " + " | ".join(CAPABILITIES) + " |",
        "| --- |" + " ---: |" * len(CAPABILITIES),
        *(
            f"| {c} | " + " | ".join(str(res["confusion"][c][k]) for k in CAPABILITIES) + " |"
            for c in CATEGORIES
        ),
        "",
    ]
    names = list(res["scores"])
    lines += [
        "| category | " + " | ".join(names) + " |",
        "| --- |" + " ---: |" * len(names),
        *(
            f"| {c} | " + " | ".join(_iv(res["scores"][n]["per_category"][c]) for n in names) + " |"
            for c in CATEGORIES
        ),
        "| maths/reasoning/coding minus writing/roleplay/humanities | "
        + " | ".join(_iv(res["scores"][n]["high_minus_low"]) for n in names)
        + " |",
        "| every high category above every low one | "
        + " | ".join("yes" if res["scores"][n]["high_above_low"] else "no" for n in names)
        + " |",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the study; see the module docstring."""
    parser = argparse.ArgumentParser(prog="python -m studies.chat_categories")
    parser.add_argument("--model", help="router artifact directory (default: the shipped one)")
    parser.add_argument(
        "--capability", help="a standalone capability model directory to read the labels from"
    )
    parser.add_argument(
        "--data", default=str(DEV_FILE), help="the set to read (JSONL; default: the dev set)"
    )
    parser.add_argument("--out", default=str(RESULTS), help="where to write the JSON results")
    args = parser.parse_args(argv)
    rows = load_rows(Path(args.data))
    model = Path(args.model) if args.model else default_model_path()
    res = measure(rows, model, Path(args.capability) if args.capability else None)
    overlap = shared_runs(rows, reference_prompts())
    res.update(data=Path(args.data).name, n=len(rows), rows_sharing_8_word_runs=overlap)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
    print(tables(res))
    print(f"\nrows sharing an 8-word run with shared data or seeds: {len(overlap)}")
    print("\n| model | agreement strict | agreement loose | high minus low score | ranked |")
    print("| --- | ---: | ---: | ---: | --- |")
    print(summary_line(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
