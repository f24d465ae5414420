"""``tiergate retrain``: learn from labelled outcomes, and promote only what proves itself.

1. **Training set**: every labelled outcome whose prompt was stored (the policy's
   ``store_prompts``) becomes a routing row: the label ``value`` v (how likely the closed answer
   was materially better, see :class:`~router.outcomes.Label`) gives ``strong_score = 1`` (the
   closed answer is the reference) and ``weak_score = 1 - v``, so the row's gain is ``v`` and
   APGR stays defined however the labels are balanced. Several labels on one request are
   averaged. The base training files (MMLU, GSM8K, Arena-Bench) are added unchanged.
2. **Held-out slice**: a fixed share of labelled requests, chosen by a hash of the request id, is
   never trained on, so the slice stays the same across retrains. The gate scores it with labels
   from *trusted* sources only (shadow verdicts and escalations, which the system produces),
   because user feedback can be wrong or gamed: a candidate must not be judged by the labels it
   may have been misled by (a held-out request's feedback is left out of its value there).
   With fewer than ``min_trusted_eval`` trusted held-out rows the gate refuses
   (``trusted_only=False`` falls back to all labels instead).
3. **Candidate** (the capability classifier is kept). A profile router (serving form 4, whose
   score reads the local model's profile; ``candidate="profile"``, what ``"auto"`` picks for
   it) keeps its head and relearns the **local profile**: per capability, the q-weighted mean
   quality of the local answers (a row's weak score, ``1 - v``; every label with a value is
   about a local answer), shrunk by ``profile_prior`` pseudo-rows towards the configured
   profile (``TIERGATE_LOCAL_PROFILE`` or the bundled one). It is always relearnt over the
   configured profile, never over an earlier learnt one. For a scikit-learn router,
   ``"auto"`` is ``"residual"``: the base routing classifier is kept unchanged and a traffic
   head, fitted on the labelled outcomes alone with its regularisation chosen by
   cross-validation on them, is mixed in where a domain gate says a prompt looks like logged
   traffic rather than base data (:mod:`router.residual`, which says why); a gap head
   (``tiergate train`` on routing files) has no structure features for it and is refitted.
   ``candidate="refit"`` refits one routing classifier on base rows
   (:func:`router.training.routing_target`, hard target) plus the outcomes, all together
   weighing ``outcome_weight`` times one base file. Either of those two takes a label as a
   probability: it enters as both classes weighted ``v`` and ``1 - v`` (cross-entropy against
   the soft target), so a 0.6 and a 0.95 verdict are not flattened into the same "1".
4. **Gate**: candidate and current are compared on the held-out slice and on a fixed evaluation
   slice of the base data, by APGR (RouteLLM's definition, :mod:`router.metrics`) with a paired
   percentile bootstrap of the *difference* (same resampled rows for both models). "Noise" is
   that 95% interval. The default gate promotes when the candidate is not worse beyond noise on
   either set (the interval of the difference is not entirely below zero) and its APGR on the
   held-out slice is higher than the current model's by at least ``min_gain``;
   ``require_significant`` asks instead for the whole interval to be above ``min_gain``.
5. **Artifact**: every candidate is written as a new version with its lineage (parent version,
   label counts, both comparisons, the gate decision); only a passing one becomes ``current``,
   and only while its parent still is (a promote or rollback meanwhile refuses it).
   A profile candidate is the parent's head with the learnt ``profile.json`` beside it
   (:func:`router.artifact.save_learned_profile`), which the proxy then serves in place of the
   configured profile it was learnt over.
"""

from __future__ import annotations

import hashlib
import time
from collections import defaultdict
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from router.artifact import (
    is_profile_router,
    load_fitted,
    load_scorer,
    save_learned_profile,
    save_scorer,
)
from router.classifier import CapabilityRouting, LearnedScorer, PromptClassifier
from router.errors import ArtifactError, ConfigError
from router.metrics import apgr_from_curve, routing_curve
from router.outcomes import OutcomeStore, lock_beside
from router.profile import LocalProfile, default_profile
from router.registry import ModelStore, restart_advice
from router.residual import ResidualRouting, fit_residual
from router.serving import ProfileScorer, profile_vector
from router.training import (
    DEFAULT_ROUTING_PARAMS,
    PROFILE_PRIOR,
    WORD_ROUTING_PARAMS,
    RoutingRow,
    estimate_profile,
    load_routing_rows,
    routing_target,
)

#: The base files retraining may use (licences allow shipping a model trained on them).
BASE_FILES: tuple[str, ...] = (
    "routellm_mmlu_mixtral_vs_gpt4turbo.jsonl",
    "routellm_gsm8k_mixtral_vs_gpt4turbo.jsonl",
    "arenabench_v1_mixtral_vs_gpt4turbo.jsonl",
)
TRUSTED_SOURCES: frozenset[str] = frozenset({"shadow", "escalation"})
#: Candidate designs (see the module docstring); ``auto`` picks by the current model's kind.
DESIGNS: tuple[str, ...] = ("auto", "profile", "residual", "refit")
OUTCOMES_DATASET = "outcomes"


class NotEnoughLabelsError(ConfigError):
    """Too few labelled outcomes for the gate to judge a candidate; nothing was trained."""

    code = "not_enough_labels"


@dataclass(frozen=True)
class GateConfig:
    """When a candidate may replace the current model (see the module docstring)."""

    min_gain: float = 0.0
    require_significant: bool = False
    n_bootstrap: int = 1000
    holdout: float = 0.3
    base_eval: float = 0.2
    base_eval_cap: int = 300
    min_trusted_eval: int = 20
    trusted_only: bool = True
    outcome_weight: float = 10.0
    base_train_cap: int | None = None
    seed: int = 0
    candidate: str = "auto"
    gate_base_sample: int = 3000
    profile_prior: float = PROFILE_PRIOR

    def __post_init__(self) -> None:
        # Without resamples the noise intervals are NaN, and NaN is never "worse beyond noise".
        if self.n_bootstrap < 1:
            raise ConfigError(f"n_bootstrap must be at least 1, not {self.n_bootstrap}")


@dataclass(frozen=True)
class Comparison:
    """Candidate vs current APGR on one evaluation set, with the paired bootstrap interval."""

    name: str
    n: int
    current: float
    candidate: float
    diff: float
    diff_low: float
    diff_high: float
    current_ci: tuple[float, float]
    candidate_ci: tuple[float, float]

    @property
    def worse_beyond_noise(self) -> bool:
        """The whole 95% interval of (candidate - current) is below zero."""
        return self.diff_high < 0


@dataclass
class RetrainReport:
    """What one retrain did, as printed by ``tiergate retrain`` and kept in the lineage."""

    parent: str
    version: str
    labels: dict[str, Any]
    comparisons: list[Comparison]
    decision: str
    reasons: list[str]
    promoted: bool
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        out = asdict(self)
        out["comparisons"] = [
            {**asdict(c), "worse_beyond_noise": c.worse_beyond_noise} for c in self.comparisons
        ]
        return out


def bucket(key: str, salt: str) -> float:
    """A stable pseudo-random number in [0, 1) for ``key`` (hash-based, never reshuffled)."""
    digest = hashlib.sha256(f"{salt}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def labelled_rows(
    store: OutcomeStore, only: Collection[str] | None = None
) -> tuple[list[RoutingRow], dict[str, Any]]:
    """Routing rows from labelled outcomes (label values averaged per request) and counts;
    ``only``: the values of these sources alone (the gate's trusted labels)."""
    values: dict[str, list[float]] = defaultdict(list)
    sources: dict[str, set[str]] = defaultdict(set)
    counts: dict[str, int] = defaultdict(int)
    for label in store.labels():
        if only is not None and label["source"] not in only:
            continue
        counts[f"source/{label['source']}"] += 1
        if label.get("value") is None:
            counts["without_value"] += 1
            continue
        values[label["request_id"]].append(float(label["value"]))
        sources[label["request_id"]].add(label["source"])
    rows = []
    for request_id, vals in values.items():
        record = store.get(request_id)
        if record is None or not record.get("prompt"):
            counts["without_prompt"] += 1
            continue
        v = float(np.mean(vals))
        rows.append(
            RoutingRow(
                id=request_id,
                prompt=str(record["prompt"]),
                weak_score=1.0 - v,
                strong_score=1.0,
                category=",".join(sorted(sources[request_id])),
                dataset=OUTCOMES_DATASET,
            )
        )
    counts["usable"] = len(rows)
    return rows, dict(counts)


def _apgr(
    scores: np.ndarray[Any, Any], weak: np.ndarray[Any, Any], strong: np.ndarray[Any, Any]
) -> float:
    return apgr_from_curve(
        routing_curve(scores, weak, strong), float(weak.mean()), float(strong.mean())
    )


def compare(
    name: str,
    rows: Sequence[RoutingRow],
    current: Any,
    candidate: Any,
    *,
    n_bootstrap: int,
    seed: int = 0,
) -> Comparison:
    """Paired bootstrap comparison of two routers' APGR on ``rows``; ``current`` and
    ``candidate`` are scorers (:class:`router.scoring.Scorer`: a trained ``LearnedScorer`` or
    the proxy's ``ServingScorer``), scored the way the proxy scores."""
    prompts = [r.prompt for r in rows]
    cur = np.array([current.score(p) for p in prompts])
    cand = np.array([candidate.score(p) for p in prompts])
    weak = np.array([r.weak_score for r in rows])
    strong = np.array([r.strong_score for r in rows])
    rng = np.random.default_rng(seed)
    boot = []
    for _ in range(n_bootstrap):
        idx = rng.integers(0, len(rows), len(rows))
        a, b = _apgr(cur[idx], weak[idx], strong[idx]), _apgr(cand[idx], weak[idx], strong[idx])
        if np.isfinite(a) and np.isfinite(b):
            boot.append((a, b, b - a))
    arr = np.array(boot) if boot else np.full((1, 3), np.nan)
    lo, hi = np.percentile(arr, [2.5, 97.5], axis=0)
    a, b = _apgr(cur, weak, strong), _apgr(cand, weak, strong)
    return Comparison(
        name=name,
        n=len(rows),
        current=a,
        candidate=b,
        diff=b - a,
        diff_low=float(lo[2]),
        diff_high=float(hi[2]),
        current_ci=(float(lo[0]), float(hi[0])),
        candidate_ci=(float(lo[1]), float(hi[1])),
    )


def gate(comparisons: Sequence[Comparison], config: GateConfig) -> tuple[bool, list[str]]:
    """Apply the gate to ``[labelled, base]`` comparisons; ``(passed, reasons)``."""
    reasons = []
    passed = True
    for c in comparisons:
        if not np.isfinite(c.diff):
            passed = False
            reasons.append(
                f"{c.name}: APGR undefined (n={c.n}): no label there says the closed answer "
                "was better, so no router can gain on these rows"
            )
        elif c.worse_beyond_noise:
            passed = False
            reasons.append(
                f"{c.name}: worse beyond noise ({c.diff:+.3f}, 95% CI "
                f"[{c.diff_low:+.3f}, {c.diff_high:+.3f}])"
            )
    labelled = comparisons[0]
    gain = labelled.diff_low if config.require_significant else labelled.diff
    what = "CI low" if config.require_significant else "gain"
    if np.isfinite(labelled.diff) and not (np.isfinite(gain) and gain > config.min_gain):
        passed = False
        reasons.append(f"{labelled.name}: {what} {gain:+.3f} not above {config.min_gain:+.3f}")
    if passed:
        reasons.append("not worse beyond noise on either set, and better on labelled traffic")
    return passed, reasons


def split_outcomes(
    rows: Sequence[RoutingRow], config: GateConfig
) -> tuple[list[RoutingRow], list[RoutingRow]]:
    """(train, held-out) by a hash of the request id: the held-out slice is fixed for good."""
    held = [r for r in rows if bucket(r.id, "holdout") < config.holdout]
    train = [r for r in rows if bucket(r.id, "holdout") >= config.holdout]
    return train, held


def eval_rows(
    held: Sequence[RoutingRow], trusted: Sequence[RoutingRow], config: GateConfig
) -> tuple[list[RoutingRow], str]:
    """The held-out rows the gate scores: those with a trusted label, valued by their trusted
    labels alone (``trusted``: :func:`labelled_rows` over :data:`TRUSTED_SOURCES`), never
    averaged with feedback on the same request, which may be what misled the candidate (see the
    module docstring)."""
    by_id = {r.id: r for r in trusted}
    scored = [by_id[r.id] for r in held if r.id in by_id]
    if len(scored) >= config.min_trusted_eval or config.trusted_only:
        return scored, "trusted (shadow, escalation)"
    return list(held), "all sources"


def base_rows(
    files: Sequence[Path], config: GateConfig
) -> tuple[list[RoutingRow], list[RoutingRow]]:
    """(base training rows, the fixed evaluation slice, at most ``base_eval_cap`` per file).

    Training uses every row (or ``base_train_cap`` per file, a fixed hash-chosen subset, to
    bound the retrain time), evaluation slice included: the current model saw those rows too, so
    the base comparison asks "did the new labels damage what the base data taught", not how
    either model generalises.
    """
    everything: list[RoutingRow] = []
    evaluation: list[RoutingRow] = []
    for path in files:
        if "alpacaeval" in path.name:
            raise ConfigError(f"{path.name}: AlpacaEval is CC BY-NC; it may not train a model")
        rows = load_routing_rows(path)
        picked = sorted(rows, key=lambda r: bucket(r.id, "base"))
        everything += picked[: config.base_train_cap] if config.base_train_cap else rows
        evaluation += [r for r in picked if bucket(r.id, "base") < config.base_eval][
            : config.base_eval_cap
        ]
    return everything, evaluation


def fit_candidate(
    base: Sequence[RoutingRow],
    outcomes: Sequence[RoutingRow],
    current: Any,
    version: str,
    config: GateConfig,
) -> tuple[LearnedScorer, dict[str, Any]]:
    """The current model's capability classifier with a new routing classifier, and what the
    fit chose; ``config.candidate`` picks the design (see the module docstring)."""
    if config.candidate == "residual":
        return _fit_residual(base, outcomes, current, version, config)
    if config.candidate != "refit":
        raise ConfigError(f"unknown candidate design {config.candidate!r} (residual, refit)")
    prompts = [r.prompt for r in base]
    y, w = routing_target(base) if base else (np.zeros(0, np.int64), np.zeros(0))
    targets, weights = list(y), list(w)
    one_file = len(base) / max(len({r.dataset for r in base}), 1) if base else len(outcomes)
    per_row = config.outcome_weight * one_file / max(len(outcomes), 1)
    for r in outcomes:
        v = _label_value(r)
        prompts += [r.prompt, r.prompt]
        targets += [1, 0]
        weights += [per_row * v, per_row * (1.0 - v)]
    root = _root(current.routing)
    # The current model's design: capability probabilities when it reads them, else words.
    routing: PromptClassifier = (
        CapabilityRouting(capability=current.capability, **DEFAULT_ROUTING_PARAMS)
        if root.capability_coef() is not None
        else PromptClassifier(**WORD_ROUTING_PARAMS)
    )
    routing.fit(prompts, np.array(targets), sample_weight=np.array(weights))
    return LearnedScorer(routing, current.capability, version), {"design": "refit"}


def _root(routing: Any) -> Any:
    """The base routing model a residual one adapts (a residual is replaced, never stacked)."""
    return routing.base_ if isinstance(routing, ResidualRouting) else routing


def _label_value(row: RoutingRow) -> float:
    return min(max(row.strong_score - row.weak_score, 0.0), 1.0)


def _fit_residual(
    base: Sequence[RoutingRow],
    outcomes: Sequence[RoutingRow],
    current: Any,
    version: str,
    config: GateConfig,
) -> tuple[LearnedScorer, dict[str, Any]]:
    # Always adapt the same base model: a promoted residual model is replaced, not stacked.
    root = _root(current.routing)
    sample = sorted(base, key=lambda r: bucket(r.id, "gate"))[: config.gate_base_sample]
    model, info = fit_residual(
        root,
        [r.prompt for r in outcomes],
        [_label_value(r) for r in outcomes],
        [r.prompt for r in sample],
        seed=config.seed,
    )
    return LearnedScorer(model, current.capability, version), {"design": "residual", **asdict(info)}


def fit_profile_candidate(
    outcomes: Sequence[RoutingRow],
    current: ProfileScorer,
    prior: LocalProfile,
    config: GateConfig,
) -> tuple[ProfileScorer, dict[str, Any]]:
    """The current profile router reading a local profile relearnt from ``outcomes`` over the
    configured ``prior`` (see the module docstring), and what changed per capability."""
    names = list(current.capability.capabilities)
    q = np.vstack([current.capability.probabilities(r.prompt) for r in outcomes])
    start = profile_vector(prior, names)
    learnt = estimate_profile(
        outcomes,
        q,
        names,
        model=prior.model,
        prior=config.profile_prior,
        toward=list(start),
        source="learned",
        notes=f"relearnt by tiergate retrain from {len(outcomes)} labelled outcomes over the "
        f"{prior.source} profile of {prior.model}",
    )
    learnt = replace(learnt, created=datetime.now(UTC).isoformat(timespec="seconds"))
    changes = {
        c: {
            "prior": round(float(p0), 4),
            "learned": round(learnt.accuracy(c), 4),
            "mass": round(float(m), 1),
        }
        for c, p0, m in zip(names, start, q.sum(axis=0), strict=True)
    }
    info = {
        "design": "profile",
        "prior": {
            "model": prior.model,
            "source": prior.source,
            "origin": prior.origin,
            "fingerprint": prior.fingerprint(),
        },
        "prior_rows": config.profile_prior,
        "profile": changes,
    }
    return current.with_profile(learnt), info


def candidate_design(path: Path, requested: str) -> str:
    """The design a retrain of the artifact at ``path`` uses: ``requested``, with ``auto``
    resolved (``profile`` for a profile router, else ``residual``); a design the artifact
    cannot take is a :class:`ConfigError`."""
    if requested not in DESIGNS:
        raise ConfigError(f"unknown candidate design {requested!r} ({', '.join(DESIGNS)})")
    profile_router = is_profile_router(path)
    if requested == "auto":
        return "profile" if profile_router else "residual"
    if (requested == "profile") != profile_router:
        kind = "a profile router" if profile_router else "a scikit-learn router"
        fits = "profile" if profile_router else "residual or refit"
        raise ConfigError(f"{path} is {kind}: candidate design {requested!r} does not fit ({fits})")
    return requested


def _unloadable_current(models: ModelStore, parent: str, exc: ArtifactError) -> ArtifactError:
    return ArtifactError(
        f"model store {models.root}: its current version {parent} cannot be loaded by this "
        f"Tiergate ({exc}), nor retrained from: {restart_advice(models.root)}, then retrain"
    )


def retrain(
    outcomes: OutcomeStore,
    models: ModelStore,
    base_files: Sequence[Path],
    config: GateConfig | None = None,
    *,
    extra_rows: Sequence[RoutingRow] = (),
    profile: LocalProfile | None = None,
) -> RetrainReport:
    """One retrain: build, fit, compare, write a version, promote if it passes the gate.
    ``profile``: the configured local profile (default: the bundled model's), which a profile
    router is scored with and relearnt over. One runs at a time per store (``retrain.lock``):
    a second one stops at once instead of fitting for nothing and colliding on the version id."""
    free, claim = lock_beside(models.root / "retrain")
    if not free:
        raise ConfigError(
            f"another tiergate retrain is running on the model store {models.root} (it holds "
            f"{models.root / 'retrain.lock'}); this one stops: run it again once that one ends"
        )
    try:
        return _retrain(
            outcomes, models, base_files, config, extra_rows=extra_rows, profile=profile
        )
    finally:
        if claim is not None:
            claim.close()


def _retrain(
    outcomes: OutcomeStore,
    models: ModelStore,
    base_files: Sequence[Path],
    config: GateConfig | None,
    *,
    extra_rows: Sequence[RoutingRow],
    profile: LocalProfile | None,
) -> RetrainReport:
    config = config or GateConfig()
    started = time.monotonic()
    parent = models.current()
    if parent is None:
        raise ConfigError(f"model store {models.root} has no current version")
    configured = profile if profile is not None else default_profile()
    try:
        design = candidate_design(models.path(parent), config.candidate)
        current: Any = (
            load_scorer(models.path(parent), configured)
            if design == "profile"
            else load_fitted(models.path(parent))
        )
    except ArtifactError as exc:
        raise _unloadable_current(models, parent, exc) from exc
    if design == "profile" and not isinstance(current, ProfileScorer):
        raise ConfigError(f"{models.path(parent)}: its serving form is not a profile head")
    if design == "residual" and not _root(current.routing).use_structure:
        # A gap head (`tiergate train` on routing files) has no structure features to adapt.
        if config.candidate != "auto":
            raise ConfigError(
                f"{models.path(parent)} has no structure features for the residual head; "
                "retrain it with --candidate refit"
            )
        design = "refit"
    rows, counts = labelled_rows(outcomes)
    rows = [*rows, *extra_rows]
    train, held = split_outcomes(rows, config)
    trusted, _ = labelled_rows(outcomes, only=TRUSTED_SOURCES)
    # An extra row has one value; it is trusted as a whole when its sources say so.
    trusted += [r for r in extra_rows if set((r.category or "").split(",")) & TRUSTED_SOURCES]
    held_eval, held_kind = eval_rows(held, trusted, config)
    need = max(config.min_trusted_eval, 10)
    if len(held_eval) < need or not train:
        raise NotEnoughLabelsError(
            f"not enough labelled outcomes to retrain: {len(train)} to train on, "
            f"{len(held_eval)} held out with {held_kind} labels (the gate needs {need})"
            + (
                "; feedback never counts there: trusted labels come from shadow judging (the "
                "policy's shadow.sample_rate) and escalations, on the held-out "
                f"{config.holdout:.0%} of requests"
                if config.trusted_only and len(held_eval) < need
                else ""
            )
        )
    base_all, base_eval = base_rows(base_files, config)
    version = models.next_version()
    candidate: Any
    if design == "profile":
        candidate, fitted = fit_profile_candidate(train, current, configured, config)
    else:
        candidate, fitted = fit_candidate(
            base_all, train, current, version, replace(config, candidate=design)
        )
    comparisons = [
        compare(
            f"labelled held-out ({held_kind})",
            held_eval,
            current,
            candidate,
            n_bootstrap=config.n_bootstrap,
            seed=config.seed,
        ),
        compare(
            "base eval slice",
            base_eval,
            current,
            candidate,
            n_bootstrap=config.n_bootstrap,
            seed=config.seed,
        ),
    ]
    labels = {
        **counts,
        "used": len(train),
        "held_out": len(held),
        "held_out_scored": len(held_eval),
    }
    # The gate's decision and the promotion it allows are one step under the pointer lock: a
    # promote or rollback while the candidate was fitted moved `current` off `parent`, and a
    # candidate compared only with `parent` must not replace what an operator chose since.
    with models.locked():
        passed, reasons = gate(comparisons, config)
        if (now := models.current()) != parent:
            reasons = [*([] if passed else reasons), _moved(parent, now)]
            passed = False
        report = RetrainReport(
            parent=parent,
            version=version,
            labels=labels,
            comparisons=comparisons,
            decision="promoted" if passed else "refused",
            reasons=reasons,
            promoted=passed,
            extra={
                "gate": asdict(config),
                "base_files": [p.name for p in base_files],
                "candidate": fitted,
            },
        )
        report.seconds = time.monotonic() - started
        lineage = {
            "parent": parent,
            "labels": labels,
            "gate": {"decision": report.decision, "reasons": reasons, "config": asdict(config)},
            "comparisons": report.to_dict()["comparisons"],
            "base_files": [p.name for p in base_files],
            "candidate": fitted,
        }
        out = models.versions_dir / version
        if design == "profile":
            save_learned_profile(
                models.path(parent),
                out,
                candidate.profile,
                configured,
                metadata={"lineage": lineage},
            )
        else:
            save_scorer(candidate, out, metadata={"lineage": lineage})
        if passed:
            models.promote(version, reason=f"retrain gate passed against {parent}")
    return report


def _moved(parent: str, now: str | None) -> str:
    return (
        f"the current version moved from {parent} to {now} while this retrain ran, so the "
        f"candidate was compared with {parent}, not with {now}: run tiergate retrain again"
    )


def format_report(report: RetrainReport) -> str:
    """The human-readable report ``tiergate retrain`` prints."""
    width = max([42, *(len(c.name) for c in report.comparisons)])  # the names set the column
    lines = [
        f"retrain {report.parent} -> candidate {report.version}  ({report.seconds:.1f}s)",
        "labels   " + ", ".join(f"{k}={v}" for k, v in sorted(report.labels.items())),
        f"{'evaluation set':{width}} {'n':>5}  {'current APGR':>12}  {'candidate':>9}  "
        f"{'diff [95% CI]':>24}",
    ]
    for c in report.comparisons:
        diff = f"{c.diff:+.3f} [{c.diff_low:+.3f}, {c.diff_high:+.3f}]"
        lines.append(
            f"{c.name:{width}} {c.n:>5}  {c.current:>12.3f}  {c.candidate:>9.3f}  {diff:>24}"
        )
    fitted = report.extra.get("candidate") or {}
    if fitted.get("design") == "profile":
        lines.append(
            f"profile  {fitted['prior']['model']}, relearnt over its {fitted['prior']['source']}"
            " profile: "
            + ", ".join(
                f"{c} {e['prior']:.2f}->{e['learned']:.2f}" for c, e in fitted["profile"].items()
            )
        )
    lines.append(f"gate     {report.decision.upper()}: " + "; ".join(report.reasons))
    return "\n".join(lines)
