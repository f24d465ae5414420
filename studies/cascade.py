"""The cascade's model card figures: the local model answers first, and escalates when it doubts.

    PYTHONPATH=. python -m studies.cascade [--per-subject N] [--write-model] [--write-card]

1. Runs the bundled SmolLM2 (in process, ``n_threads=1``, greedy, ``max_tokens`` = the default
   hold-back) through :class:`router.backends.local.LlamaCppBackend` with ``logprobs`` on the MMLU
   rows of ``../shared/data`` whose answer keys ``studies/data/mmlu_keys.json`` holds (five
   subjects, keys with provenance), and grades each answer by exact match of its first choice
   letter. Generations are cached under ``var/cascade/`` (keyed by the GGUF's sha256), so a rerun
   only refits.
2. Fits the confidence model (:class:`router.cascade_training.CascadeConfidence`) with
   cross-validation by source (each MMLU subject held out in turn) and scores every row out of
   fold, once with the answer's statistics (the cascade) and once with the prompt's features
   alone (prompt-only routing, same learner, same folds); the shipped router's own score is the
   second baseline.
3. Reports APGR and CPT(50%) of the cascade against both baselines on the same rows with paired
   bootstrap intervals, quality and closed share against the confidence threshold, and the local
   compute an escalated request spends before it goes to the closed model.

Writes ``studies/results/cascade.json``; ``--write-model`` also fits on every row and writes
``models/cascade-v1``; ``--write-card`` rewrites the cascade block of ``models/README.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import re
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score

from router.artifact import default_model_path, load_scorer, sha256_file
from router.backends.local import LlamaCppBackend
from router.cascade import DEFAULT_HOLD_BACK, DEFAULT_THRESHOLD, answer_stats
from router.cascade_training import (
    CascadeConfidence,
    cascade_features,
    grouped_out_of_fold,
    save_cascade,
)
from router.config import Settings
from router.metrics import paired

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "routellm_mmlu_mixtral_vs_gpt4turbo.jsonl"
KEYS = ROOT / "studies" / "data" / "mmlu_keys.json"
GGUF = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE = ROOT / "var" / "cascade"
RESULTS = ROOT / "studies" / "results" / "cascade.json"
MODEL_DIR = ROOT / "models" / "cascade-v1"
CARD = ROOT / "models" / "README.md"
MARKERS = ("<!-- cascade-v1:start -->", "<!-- cascade-v1:end -->")
TOP_LOGPROBS = 5
_CHOICE = (
    re.compile(r"^\s*\(?([A-D])(?:[.):]|\s*$)"),
    re.compile(r"answer is:?\s*\(?([A-D])\b"),
    re.compile(r"(?:^|\s)\(?([A-D])[.)]"),
)


def load_items(per_subject: int | None = None) -> list[dict[str, Any]]:
    """The MMLU rows that have a key, with it (at most ``per_subject`` of each subject), checked
    against the keys file's prompt prefixes."""
    keys = json.loads(KEYS.read_text())
    with DATA.open(encoding="utf-8") as fh:  # one row per "\n" (prompts hold U+2028)
        rows = [json.loads(line) for line in fh if line.strip()]
    by_id = {r["id"]: r for r in rows}
    for subject, checks in keys["check"].items():
        for row_id, prefix in checks.items():
            if not by_id[row_id]["prompt"].startswith(prefix):
                raise SystemExit(f"{KEYS}: {row_id} no longer matches {DATA.name} ({subject})")
    by_subject: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        subject = r["category"]
        if subject in keys["keys"]:
            index = int(r["id"].rsplit("/", 1)[1])
            by_subject.setdefault(subject, []).append({**r, "key": keys["keys"][subject][index]})
    # The first ``per_subject`` rows of each subject (in file order), taken in turn.
    items = []
    for n in range(max(len(v) for v in by_subject.values())):
        if per_subject is not None and n >= per_subject:
            break
        items.extend(v[n] for v in by_subject.values() if n < len(v))
    return items


def answer_letter(answer: str) -> str | None:
    """The choice an answer names: a letter that opens it, else one after "answer is", else the
    first letter written as a choice ("B." or "(B)"); None when it names none."""
    for pattern in _CHOICE:
        found = pattern.search(answer)
        if found is not None:
            return found.group(1)
    return None


def grade(answer: str, key: str) -> float:
    """Exact match: the choice the answer names is the key."""
    return float(answer_letter(answer) == key)


def _cache_path() -> Path:
    return CACHE / f"generations-{sha256_file(GGUF)[:16]}.jsonl"


def generate(items: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The local model's answer to every item, from the cache or generated now (and cached)."""
    path = _cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    done: dict[str, dict[str, Any]] = {}
    if path.is_file():
        with path.open(encoding="utf-8") as fh:
            for line in fh:
                record = json.loads(line)
                done[record["id"]] = record
    todo = [i for i in items if i["id"] not in done]
    if todo:
        asyncio.run(_generate(todo, path, done))
    return done


async def _generate(
    todo: list[dict[str, Any]], path: Path, done: dict[str, dict[str, Any]]
) -> None:
    settings = Settings(local_model_path=GGUF, n_threads=1, local_timeout_s=600.0)
    backend = LlamaCppBackend(settings)
    backend.load()
    model = SimpleNamespace(
        name="local", tier="local", litellm_model=None, api_base=None, api_key_env=None
    )
    model.timeout_s = 600.0
    try:
        with path.open("a") as out:
            for n, item in enumerate(todo, 1):
                body = {
                    "messages": [{"role": "user", "content": item["prompt"]}],
                    "max_tokens": DEFAULT_HOLD_BACK,
                    "temperature": 0,
                    "logprobs": True,
                    "top_logprobs": TOP_LOGPROBS,
                }
                started = time.perf_counter()
                result = await backend.complete(model, body)
                choice = result.body["choices"][0]
                record = {
                    "id": item["id"],
                    "answer": choice["message"]["content"],
                    "finish_reason": choice["finish_reason"],
                    "logprobs": choice["logprobs"]["content"],
                    "prompt_tokens": result.usage.prompt_tokens,
                    "completion_tokens": result.usage.completion_tokens,
                    "generation_s": result.usage.generation_s,
                    "wall_s": time.perf_counter() - started,
                }
                out.write(json.dumps(record) + "\n")
                out.flush()
                done[item["id"]] = record
                if n % 25 == 0:
                    print(f"generated {n}/{len(todo)}", flush=True)
    finally:
        await backend.aclose()


def threshold_table(confidence: Any, w: Any, g: Any) -> list[dict[str, float]]:
    """Closed share and quality when answers below each confidence threshold escalate."""
    out = []
    for t in np.round(np.linspace(0.0, 1.0, 11), 2):
        escalate = confidence < t
        out.append(
            {
                "threshold": float(t),
                "closed_share": float(escalate.mean()),
                "quality": float(np.where(escalate, g, w).mean()),
            }
        )
    return out


def _ci(d: dict[str, Any], key: str) -> str:
    lo, hi = d[f"{key}_diff_ci"]
    return f"{d[key] - d[key + '_baseline']:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def card(report: dict[str, Any]) -> str:
    """The model card's generated block (between the markers in models/README.md)."""
    vp, vs = report["vs_prompt_only"], report["vs_shipped_router"]
    auroc = report["confidence_auroc"]
    compute = report["local_compute_per_escalation"]
    po_apgr, po_cpt = vp["apgr_baseline"], vp["cpt50_baseline"]
    escalated_pct = compute["escalated_share"] * 100
    rows = "\n".join(
        f"| {t['threshold']:.1f} | {t['closed_share']:.2f} | {t['quality']:.3f} | "
        f"{p['closed_share']:.2f} | {p['quality']:.3f} |"
        for t, p in zip(report["threshold_cascade"], report["threshold_prompt_only"], strict=True)
    )
    subjects = "\n".join(
        f"| {name} | {s['n']} | {s['local_accuracy']:.3f} | {s['closed_accuracy']:.3f} | "
        f"{s['vs_prompt_only']['apgr']:.3f} | {s['vs_prompt_only']['apgr_baseline']:.3f} | "
        f"{_ci(s['vs_prompt_only'], 'apgr')} |"
        for name, s in report["by_subject"].items()
    )
    per = report.get("per_subject")
    scorer = report["training"]["scorer"]
    command = "python -m studies.cascade" + (f" --per-subject {per}" if per else "")
    return f"""Generated by `{command} --write-card` from
`studies/results/cascade.json`: {report["items"]} MMLU test rows ({", ".join(report["subjects"])}),
local model {report["local_model"]["file"]} (greedy, {report["hold_back_tokens"]} tokens at most),
closed model {report["closed_model"]} (its recorded correctness). Local accuracy
{report["local_accuracy"]:.3f}, closed {report["closed_accuracy"]:.3f}. Every score is out of fold:
each subject is scored by a model fitted on the other subjects.

| router (same rows) | APGR | CPT(50%) |
| --- | ---: | ---: |
| cascade (prompt + answer log-probabilities) | {vp["apgr"]:.3f} | {vp["cpt50"]:.3f} |
| prompt only (same learner, routing score + length) | {po_apgr:.3f} | {po_cpt:.3f} |
| shipped {scorer} score | {vs["apgr_baseline"]:.3f} | {vs["cpt50_baseline"]:.3f} |

Cascade minus prompt-only, with the 95% paired bootstrap interval: APGR {_ci(vp, "apgr")},
CPT(50%) {_ci(vp, "cpt50")}; cascade minus {scorer}: APGR {_ci(vs, "apgr")}, CPT(50%)
{_ci(vs, "cpt50")}. AUROC of the confidence for "the local answer is right": cascade
{auroc["cascade"]:.3f}, prompt only {auroc["prompt_only"]:.3f}.

Quality and closed share against the confidence threshold (escalate below it):

| threshold | cascade closed share | cascade quality | prompt-only closed | prompt-only q. |
| ---: | ---: | ---: | ---: | ---: |
{rows}

Per subject (cascade vs prompt-only APGR, difference with its paired interval):

| subject | rows | local acc. | closed acc. | cascade APGR | prompt-only APGR | difference |
| --- | ---: | ---: | ---: | ---: | ---: | ---: |
{subjects}

Extra local compute per escalated request (threshold {compute["threshold"]},
{escalated_pct:.0f}% escalated): {compute["local_tokens_mean"]:.0f} local
tokens (prompt and answer) and {compute["generation_s_mean"]:.1f} s of generation on average
(p90 {compute["generation_s_p90"]:.1f} s; {compute["machine"]}); a stream stops the local
model after the hold-back, so it spends at most that many answer tokens."""


def write_card(report: dict[str, Any]) -> None:
    """Replace the generated block of models/README.md."""
    text = CARD.read_text()
    start, end = MARKERS
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    CARD.write_text(f"{head}{start}\n{card(report)}\n{end}{tail}")


def main(argv: list[str] | None = None) -> int:
    """Generate (or read the cache), fit out of fold, report; see the module docstring."""
    parser = argparse.ArgumentParser(prog="python -m studies.cascade", description=__doc__)
    parser.add_argument(
        "--per-subject", type=int, default=None, help="the first N rows of each subject"
    )
    parser.add_argument("--generate-only", action="store_true")
    parser.add_argument("--write-model", action="store_true", help="write models/cascade-v1")
    parser.add_argument("--write-card", action="store_true", help="rewrite the card's block")
    args = parser.parse_args(argv)
    items = load_items(args.per_subject)
    generations = generate(items)
    if args.generate_only:
        return 0
    report, model = analyse(items, generations, fit_all=args.write_model)
    report["per_subject"] = args.per_subject
    RESULTS.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    print(json.dumps(report["headline"], indent=2))
    if model is not None:
        save_cascade(model, MODEL_DIR, report["training"])
        print(f"wrote {MODEL_DIR}")
    if args.write_card:
        write_card(report)
    return 0


def analyse(
    items: list[dict[str, Any]], generations: dict[str, dict[str, Any]], *, fit_all: bool
) -> tuple[dict[str, Any], CascadeConfidence | None]:
    """Out-of-fold confidence, the comparisons and the threshold table (module docstring)."""
    scorer = load_scorer(default_model_path())
    gens = [generations[i["id"]] for i in items]
    stats = [answer_stats(g["logprobs"], g["finish_reason"]) for g in gens]
    analyses = [scorer.analyze(i["prompt"]) for i in items]
    prompt_feats = [(a.score, len(i["prompt"])) for a, i in zip(analyses, items, strict=True)]
    x_full = cascade_features(stats, prompt_feats)
    x_prompt = cascade_features(None, prompt_feats)
    local = np.array([grade(g["answer"], i["key"]) for g, i in zip(gens, items, strict=True)])
    strong = np.array([i["strong_score"] for i in items])
    groups = np.array([i["category"] for i in items])
    conf_cascade = grouped_out_of_fold(CascadeConfidence(), x_full, local, groups)
    conf_prompt = grouped_out_of_fold(CascadeConfidence(), x_prompt, local, groups)
    shipped = np.array([a.score for a in analyses])
    compute_s = np.array([g["generation_s"] for g in gens])
    local_tokens = np.array([g["prompt_tokens"] + g["completion_tokens"] for g in gens])
    escalated = conf_cascade < DEFAULT_THRESHOLD
    by_subject = {}
    for subject in sorted(set(groups)):
        sel = groups == subject
        by_subject[subject] = {
            "n": int(sel.sum()),
            "local_accuracy": float(local[sel].mean()),
            "closed_accuracy": float(strong[sel].mean()),
            "vs_prompt_only": paired(
                1 - conf_cascade[sel], 1 - conf_prompt[sel], local[sel], strong[sel]
            ),
        }
    report: dict[str, Any] = {
        "items": len(items),
        "subjects": sorted(set(groups)),
        "local_model": {"file": GGUF.name, "sha256": sha256_file(GGUF)},
        "closed_model": items[0]["strong_model"],
        "local_accuracy": float(local.mean()),
        "closed_accuracy": float(strong.mean()),
        "hold_back_tokens": DEFAULT_HOLD_BACK,
        "vs_prompt_only": paired(1 - conf_cascade, 1 - conf_prompt, local, strong),
        "vs_shipped_router": paired(1 - conf_cascade, shipped, local, strong),
        "prompt_only_vs_shipped_router": paired(1 - conf_prompt, shipped, local, strong),
        "threshold_cascade": threshold_table(conf_cascade, local, strong),
        "threshold_prompt_only": threshold_table(conf_prompt, local, strong),
        "by_subject": by_subject,
        "confidence_auroc": {
            "cascade": float(roc_auc_score(local, conf_cascade)),
            "prompt_only": float(roc_auc_score(local, conf_prompt)),
        },
        "local_compute_per_escalation": {
            "threshold": DEFAULT_THRESHOLD,
            "escalated_share": float(escalated.mean()),
            "generation_s_mean": float(compute_s[escalated].mean()) if escalated.any() else 0.0,
            "generation_s_p90": (
                float(np.percentile(compute_s[escalated], 90)) if escalated.any() else 0.0
            ),
            "local_tokens_mean": (
                float(local_tokens[escalated].mean()) if escalated.any() else 0.0
            ),
            "completion_tokens_mean": float(np.mean([g["completion_tokens"] for g in gens])),
            "machine": "shared 2-core CPU under load from other jobs, n_threads=1",
        },
    }
    report["headline"] = {
        k: report[k]
        for k in (
            "items",
            "local_accuracy",
            "closed_accuracy",
            "confidence_auroc",
            "vs_prompt_only",
        )
    }
    report["headline"]["vs_shipped_router"] = report["vs_shipped_router"]
    report["training"] = {
        "data": {
            "file": DATA.name,
            "sha256": hashlib.sha256(DATA.read_bytes()).hexdigest(),
            "keys": KEYS.name,
            "keys_sha256": hashlib.sha256(KEYS.read_bytes()).hexdigest(),
            "rows": len(items),
        },
        "local_model": report["local_model"],
        "metrics": {
            "vs_prompt_only": report["vs_prompt_only"],
            "confidence_auroc": report["confidence_auroc"],
            "threshold_curve": report["threshold_cascade"],
        },
        "scorer": scorer.version,
    }
    model = CascadeConfidence().fit(x_full, local) if fit_all else None
    return report, model


if __name__ == "__main__":
    raise SystemExit(main())
