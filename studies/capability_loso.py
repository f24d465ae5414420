"""Which capability model carries to sources it never saw? Leave-one-source-out, per option.

Every option is fitted on the ``commercial_use: true`` rows of ``capabilities.jsonl`` with one
source held out, and scored on that source; Auto-J (research-only licence, never trained on) is
scored by a model fitted on all commercial rows. Options:

* ``tfidf``: router-v3's capability model (word 1-2-gram TF-IDF + structure features, logistic
  regression; :func:`router.training.fit_capability`), the baseline;
* ``minilm_static``: the shipped embedding (:mod:`router.embedding`, distilled from
  all-MiniLM-L6-v2 by :mod:`router.distill`) + multinomial logistic regression
  (:class:`router.capability_training.CapabilityClassifier`), with and without
  :data:`router.capability.DESCRIPTIONS`;
* ``minilm_static_knn`` / ``minilm_static_centroid``: cosine kNN (k=10, distance-weighted) and
  nearest class centroid over the same vectors;
* ``wordllama``: wordllama's bundled 256-d token table (``pip install wordllama==0.4.0.post1``;
  its own tokenizer file loaded explicitly) + the same logistic regression; skipped when the
  package is not installed.

Writes ``studies/results/capability_loso.json`` (per option: pooled and per-source accuracy and
macro-F1, Auto-J figures; the confusion matrices of the shipped option)::

    python -m studies.capability_loso [--data ../shared/data/capabilities.jsonl]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier, NearestCentroid

from router.capability import DESCRIPTIONS, load_capability
from router.capability_training import DEFAULT_C, CapabilityClassifier, leave_one_source_out
from router.embedding import StaticEmbedding
from router.scoring import CAPABILITIES
from router.serving import clip
from router.training import fit_capability, load_capability_rows

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "capabilities.jsonl"
OUT = ROOT / "studies" / "results" / "capability_loso.json"

Fit = Callable[[list[str], list[str]], Any]


class _Embedded:
    """A classifier over prompt vectors, as a predictor over prompt strings."""

    def __init__(self, embed: Callable[[Sequence[str]], np.ndarray], model: Any) -> None:
        self.embed, self.model = embed, model

    def predict(self, texts: Sequence[str]) -> Any:
        return self.model.predict(self.embed(texts))


def _with_descriptions(texts: list[str], labels: list[str]) -> tuple[list[str], list[str]]:
    extra = [(t, c) for c in CAPABILITIES for t in DESCRIPTIONS[c]]
    return texts + [t for t, _ in extra], labels + [c for _, c in extra]


def _cached(embed: Callable[[str], np.ndarray]) -> Callable[[Sequence[str]], np.ndarray]:
    memo: dict[str, np.ndarray] = {}

    def many(texts: Sequence[str]) -> np.ndarray:
        for t in texts:
            if t not in memo:
                memo[t] = embed(t)
        return np.vstack([memo[t] for t in texts])

    return many


def _vector_option(
    embed: Callable[[Sequence[str]], np.ndarray], make: Callable[[], Any], descriptions: bool
) -> Fit:
    def fit(texts: list[str], labels: list[str]) -> _Embedded:
        if descriptions:
            texts, labels = _with_descriptions(texts, labels)
        return _Embedded(embed, make().fit(embed(texts), labels))

    return fit


def _lr() -> LogisticRegression:
    return LogisticRegression(C=DEFAULT_C, class_weight="balanced", max_iter=5000)


def _wordllama() -> Callable[[str], np.ndarray] | None:
    try:
        import wordllama  # type: ignore[import-not-found]
        from safetensors.numpy import load_file  # type: ignore[import-not-found]
        from tokenizers import Tokenizer  # type: ignore[import-not-found]
    except ImportError:
        return None
    base = Path(wordllama.__file__).parent
    table = load_file(str(base / "weights" / "l2_supercat_256.safetensors"))["embedding.weight"]
    table = table.astype(np.float32)
    # The wheel ships tokenizers/, while its loader looks for tokenizer/: load the file directly.
    tok = Tokenizer.from_file(str(base / "tokenizers" / "l2_supercat_tokenizer_config.json"))

    def embed(text: str) -> np.ndarray:
        ids = tok.encode(clip(text), add_special_tokens=False).ids
        v = table[ids].mean(axis=0, dtype=np.float64) if ids else np.zeros(table.shape[1])
        n = float(np.linalg.norm(v))
        return v / n if n else v

    return embed


def options(embedding: StaticEmbedding) -> dict[str, Fit]:
    """The candidate capability models, each as ``fit(prompts, labels) -> predictor``."""
    static = _cached(embedding.embed)
    out: dict[str, Fit] = {
        "tfidf": fit_capability_texts,
        "tfidf+descriptions": lambda t, y: fit_capability_texts(*_with_descriptions(t, y)),
        "minilm_static": lambda t, y: CapabilityClassifier(embedding, descriptions=False).fit(t, y),
        "minilm_static+descriptions": lambda t, y: CapabilityClassifier(embedding).fit(t, y),
        "minilm_static_knn+descriptions": _vector_option(
            static, lambda: KNeighborsClassifier(10, weights="distance", metric="cosine"), True
        ),
        "minilm_static_centroid+descriptions": _vector_option(
            static, lambda: NearestCentroid(metric="euclidean"), True
        ),
    }
    wl = _wordllama()
    if wl is not None:
        cached = _cached(wl)
        out["wordllama"] = _vector_option(cached, _lr, False)
        out["wordllama+descriptions"] = _vector_option(cached, _lr, True)
    return out


def fit_capability_texts(texts: list[str], labels: list[str]) -> Any:
    """router-v3's capability recipe on plain prompts and labels."""
    from router.training import CapabilityRow

    rows = [CapabilityRow(str(i), t, c) for i, (t, c) in enumerate(zip(texts, labels, strict=True))]
    return fit_capability(rows)


SHIPPED = "minilm_static+descriptions"


def main(argv: list[str] | None = None) -> int:
    """Run every option and write the summary JSON."""
    parser = argparse.ArgumentParser(prog="python -m studies.capability_loso")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--only", nargs="*", help="run only these options")
    args = parser.parse_args(argv)
    every = load_capability_rows(args.data, commercial_only=False)
    commercial = load_capability_rows(args.data, commercial_only=True)
    ids = {r.id for r in commercial}
    research = [r for r in every if r.id not in ids]
    embedding = load_capability().embedding
    results: dict[str, Any] = {}
    for name, fit in options(embedding).items():
        if args.only and name not in args.only:
            continue
        start = time.perf_counter()
        res = leave_one_source_out(commercial, fit, test_only=research)
        if name != SHIPPED:
            res["pooled"].pop("confusion")
            res["test_only"].pop("confusion")
        res["seconds"] = round(time.perf_counter() - start, 1)
        results[name] = res
        pooled, autoj = res["pooled"], res["test_only"]
        print(
            f"{name:36s} LOSO acc {pooled['accuracy']:.3f} F1 {pooled['macro_f1']:.3f}"
            f" | Auto-J acc {autoj['accuracy']:.3f} F1 {autoj['macro_f1']:.3f}",
            flush=True,
        )
    summary = {
        "data": str(args.data.name),
        "protocol": (
            "train on commercial_use=true rows minus one source, score that source; Auto-J "
            "(research-only) scored by a model fitted on all commercial rows"
        ),
        "shipped": SHIPPED,
        "labels": list(CAPABILITIES),
        "options": results,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    if args.only and OUT.is_file():  # keep the other options' figures
        old = json.loads(OUT.read_text())
        summary["options"] = {**old.get("options", {}), **results}
    OUT.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
