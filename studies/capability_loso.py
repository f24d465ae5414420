"""Which capability model carries to sources it never saw? Leave-one-source-out, per option.

Every option is fitted on the ``commercial_use: true`` rows of ``capabilities.jsonl`` with one
source held out, and scored on that source; Auto-J (research-only licence, never trained on) is
scored by a model fitted on all commercial rows. Options:

* ``tfidf``: router-v3's capability model (word 1-2-gram TF-IDF + structure features, logistic
  regression; :func:`router.training.fit_capability`), the baseline, also with
  :data:`router.capability.DESCRIPTIONS` added to its rows;
* ``minilm_static_*``: the shipped embedding (:mod:`router.embedding`, distilled from
  all-MiniLM-L6-v2 by :mod:`router.distill`) under each head of
  :class:`router.capability_training.CapabilityClassifier`: ``logistic`` (rows; rows and
  descriptions), ``centroids`` (cosine to the rows' class means), ``prototypes`` (cosine to the
  descriptions' class means: shipped), and cosine kNN (k=10, distance-weighted) over rows and
  descriptions;
* ``wordllama_*``: the same heads over wordllama's bundled 256-d token table, pooled alike
  (``pip install wordllama==0.4.0.post1``; its own tokenizer file loaded explicitly), and both
  tables side by side under the prototype head; skipped when the package is not installed.

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
from sklearn.neighbors import KNeighborsClassifier

from router.capability import DESCRIPTIONS, load_capability
from router.capability_training import CapabilityClassifier, leave_one_source_out
from router.embedding import POOL_TOKENS, StaticEmbedding
from router.features import clip
from router.scoring import CAPABILITIES
from router.training import CapabilityRow, fit_capability, load_capability_rows

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


class Memo:
    """An embedding with its prompt vectors memoised (every fold embeds the same prompts)."""

    def __init__(self, embedding: Any) -> None:
        self.embedding, self.width = embedding, embedding.width
        self.memo: dict[str, np.ndarray] = {}

    def embed(self, text: str) -> np.ndarray:
        if text not in self.memo:
            self.memo[text] = self.embedding.embed(text)
        return self.memo[text]

    def embed_many(self, texts: Sequence[str]) -> np.ndarray:
        return np.vstack([self.embed(t) for t in texts])


class _WordLlama:
    """wordllama's bundled token table, pooled as :class:`router.embedding.StaticEmbedding`
    pools (all tokens, first and last POOL_TOKENS), over wordllama's own tokenizer."""

    def __init__(self) -> None:
        import wordllama  # type: ignore[import-not-found]
        from safetensors.numpy import load_file  # type: ignore[import-not-found]
        from tokenizers import Tokenizer  # type: ignore[import-not-found]

        base = Path(wordllama.__file__).parent
        weights = load_file(str(base / "weights" / "l2_supercat_256.safetensors"))
        self.table = weights["embedding.weight"].astype(np.float32)
        self.width = 3 * self.table.shape[1]
        # The wheel ships tokenizers/, while its loader looks for tokenizer/: load the file.
        self.tok = Tokenizer.from_file(
            str(base / "tokenizers" / "l2_supercat_tokenizer_config.json")
        )

    def embed(self, text: str) -> np.ndarray:
        ids = self.tok.encode(clip(text), add_special_tokens=False).ids
        d = self.table.shape[1]
        out = np.zeros(self.width)
        if ids:
            rows = self.table[ids]
            for i, part in enumerate((rows, rows[:POOL_TOKENS], rows[-POOL_TOKENS:])):
                v = part.mean(axis=0, dtype=np.float64)
                n = float(np.linalg.norm(v))
                out[i * d : (i + 1) * d] = v / n if n else v
        return out


class _Both:
    """Two embeddings side by side (each prompt vector the concatenation of both)."""

    def __init__(self, first: Any, second: Any) -> None:
        self.first, self.second = first, second
        self.width = first.width + second.width

    def embed(self, text: str) -> np.ndarray:
        return np.concatenate([self.first.embed(text), self.second.embed(text)])


def _with_descriptions(texts: list[str], labels: list[str]) -> tuple[list[str], list[str]]:
    extra = [(t, c) for c in CAPABILITIES for t in DESCRIPTIONS[c]]
    return texts + [t for t, _ in extra], labels + [c for _, c in extra]


def _knn(embedding: Memo) -> Fit:
    def fit(texts: list[str], labels: list[str]) -> _Embedded:
        texts, labels = _with_descriptions(texts, labels)
        knn = KNeighborsClassifier(10, weights="distance", metric="cosine")
        return _Embedded(embedding.embed_many, knn.fit(embedding.embed_many(texts), labels))

    return fit


def _heads(prefix: str, embedding: Any) -> dict[str, Fit]:
    def make(**kw: Any) -> Fit:
        return lambda t, y: CapabilityClassifier(embedding, **kw).fit(t, y)

    return {
        f"{prefix}_logistic": make(head="logistic", descriptions=False),
        f"{prefix}_logistic+descriptions": make(head="logistic"),
        f"{prefix}_centroids": make(head="prototype", descriptions=False),
        f"{prefix}_knn+descriptions": _knn(embedding),
        f"{prefix}_prototypes": make(head="prototype"),
    }


def options(embedding: StaticEmbedding) -> dict[str, Fit]:
    """The candidate capability models, each as ``fit(prompts, labels) -> predictor``."""
    out: dict[str, Fit] = {
        "tfidf": fit_capability_texts,
        "tfidf+descriptions": lambda t, y: fit_capability_texts(*_with_descriptions(t, y)),
        **_heads("minilm_static", Memo(embedding)),
    }
    try:
        wordllama = _WordLlama()
    except ImportError:
        print("wordllama is not installed: its options are skipped")
    else:
        out.update(_heads("wordllama", Memo(wordllama)))
        both = Memo(_Both(embedding, wordllama))
        out["minilm_static+wordllama_prototypes"] = lambda t, y: CapabilityClassifier(both).fit(
            t, y
        )
    return out


def licence_split(data: str | Path) -> tuple[list[CapabilityRow], list[CapabilityRow]]:
    """The rows of ``data`` that may train a shipped model (``commercial_use: true``) and the
    research-only rest, which is only ever scored."""
    commercial = load_capability_rows(data, commercial_only=True)
    ids = {r.id for r in commercial}
    research = [r for r in load_capability_rows(data, commercial_only=False) if r.id not in ids]
    return commercial, research


def fit_capability_texts(texts: list[str], labels: list[str]) -> Any:
    """router-v3's capability recipe on plain prompts and labels."""
    from router.training import CapabilityRow

    rows = [CapabilityRow(str(i), t, c) for i, (t, c) in enumerate(zip(texts, labels, strict=True))]
    return fit_capability(rows)


SHIPPED = "minilm_static_prototypes"


def main(argv: list[str] | None = None) -> int:
    """Run every option and write the summary JSON."""
    parser = argparse.ArgumentParser(prog="python -m studies.capability_loso")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--only", nargs="*", help="run only these options")
    args = parser.parse_args(argv)
    commercial, research = licence_split(args.data)
    # The static table (capability-v1's file), which every option here reads.
    embedding = load_capability(ROOT / "models" / "capability-v1").embedding
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
