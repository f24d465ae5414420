"""Training and cross-validation of the routing and capability classifiers.

Tiergate's documented data format is JSON Lines, one row per prompt::

    {"id": "...", "prompt": "...", "weak_score": 0.0, "strong_score": 1.0, "category": "..."}

``weak_score``/``strong_score`` are the quality of the local (weak) and closed (strong) model's
answers on the same scale within a file (correctness 0/1, a judge score rescaled to [0, 1], ...);
``category`` is optional. Capability files use ``{"id", "prompt", "capability"}`` (plus
``commercial_use``/``source`` where the data has them). Users can bring their own logs in this
format to ``tiergate train`` and ``tiergate eval``. The fitted models are written and read by
:mod:`router.artifact`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from router.artifact import (
    DEFAULT_MODEL_NAME,
    default_model_path,
    load_capability_model,
    load_fitted,
    save_profile_router,
    save_scorer,
    sha256_file,
)
from router.classifier import (
    CapabilityRouting,
    GapRouting,
    LearnedScorer,
    PromptClassifier,
    ServedCapability,
)
from router.errors import ConfigError
from router.profile import CapabilityAccuracy, LocalProfile
from router.profiler import LABEL_PRIOR, label_accuracy
from router.scoring import CAPABILITIES
from router.serving import CapabilityReader, gap_logit, logistic

#: Routing-label choices measured in docs/model-card.md; the shipped model uses the defaults.
DEFAULT_MARGIN = 0.0


class DataFormatError(ConfigError):
    """A data file does not follow Tiergate's documented JSONL row schema."""

    code = "data_format_error"


@dataclass(frozen=True, slots=True)
class RoutingRow:
    """One labelled prompt: the weak and strong model's answer quality on it."""

    id: str
    prompt: str
    weak_score: float
    strong_score: float
    category: str | None = None
    dataset: str = ""
    weak_model: str = ""

    @property
    def prompt_set(self) -> str:
        """The prompt set the row belongs to (its id's prefix: ``mmlu``, ``mmlu-pro``...): files
        that label the same prompts for other weak models share it."""
        return self.id.split("/", 1)[0] if "/" in self.id else self.dataset


@dataclass(frozen=True, slots=True)
class CapabilityRow:
    """One prompt with its capability label (and the source it came from, for grouped CV)."""

    id: str
    prompt: str
    capability: str
    source: str = ""


def _read_jsonl(path: Path) -> Iterable[tuple[int, dict[str, Any]]]:
    try:
        with path.open("rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                try:  # decoded line by line, so the error can name the line
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    msg = f"{path}:{lineno}: not valid UTF-8 ({exc.reason})"
                    raise DataFormatError(msg) from exc
                if lineno == 1:  # the byte-order mark some editors and Windows tools write
                    line = line.removeprefix("\ufeff")
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataFormatError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from exc
                if not isinstance(row, dict):
                    raise DataFormatError(f"{path}:{lineno}: each line must be a JSON object")
                yield lineno, row
    except OSError as exc:
        raise DataFormatError(f"cannot read {path}: {exc.strerror}") from exc


def _field(path: Path, lineno: int, row: dict[str, Any], key: str, kind: type) -> Any:
    if key not in row:  # most often a file in another schema: say so, not "must be a str"
        raise DataFormatError(f"{path}:{lineno}: missing field {key!r}")
    value = row[key]
    if key == "id" and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind):
        what = "a string or an integer" if key == "id" else f"a {kind.__name__}"
        raise DataFormatError(f"{path}:{lineno}: field {key!r} must be {what}")
    return value


def _unique_id(path: Path, lineno: int, row: dict[str, Any], seen: dict[str, int]) -> str:
    # Outputs are joined back by id, and a repeated row would count twice in a fit or an APGR.
    row_id = str(_field(path, lineno, row, "id", str))
    if row_id in seen:
        raise DataFormatError(f"{path}:{lineno}: id {row_id!r} repeats line {seen[row_id]}")
    seen[row_id] = lineno
    return row_id


def load_prompts(path: str | Path) -> list[tuple[str | int, str]]:
    """``(id, prompt)`` pairs of a JSONL file, at least one, ids unique; reads no other field
    (``tiergate score``). The id is the file's own, a string or an integer, so that the rows
    written for it join back to the file's rows by id."""
    p = Path(path)
    seen: dict[str, int] = {}
    rows = []
    for n, row in _read_jsonl(p):
        _unique_id(p, n, row, seen)  # also checks its type; 7 and "7" are the same id
        rows.append((row["id"], _field(p, n, row, "prompt", str)))
    if not rows:
        raise DataFormatError(f"{p}: no rows")
    return rows


def load_routing_rows(path: str | Path) -> list[RoutingRow]:
    """Rows of a routing file in the documented schema, validated (scores in [0, 1], ids
    unique)."""
    p = Path(path)
    rows = []
    seen: dict[str, int] = {}
    for n, row in _read_jsonl(p):
        weak = _field(p, n, row, "weak_score", float)
        strong = _field(p, n, row, "strong_score", float)
        if not all(math_isfinite(s) and 0.0 <= s <= 1.0 for s in (weak, strong)):
            raise DataFormatError(f"{p}:{n}: weak_score/strong_score must be numbers in [0, 1]")
        category = row.get("category")
        rows.append(
            RoutingRow(
                id=_unique_id(p, n, row, seen),
                prompt=_field(p, n, row, "prompt", str),
                weak_score=weak,
                strong_score=strong,
                category=str(category) if category is not None else None,
                dataset=p.stem,
                weak_model=str(row.get("weak_model") or ""),
            )
        )
    if not rows:
        raise DataFormatError(f"{p}: no rows")
    return rows


@dataclass(frozen=True, slots=True)
class WeakLabel:
    """One prompt of an evaluation log and how well the local model answered it, in [0, 1]."""

    prompt: str
    weak_score: float
    weak_model: str = ""


def load_weak_labels(path: str | Path) -> list[WeakLabel]:
    """``prompt``, ``weak_score`` and, when present, ``weak_model`` of each row of a JSONL file
    (the routing schema's fields, nothing else required): what ``tiergate profile
    --from-labels`` estimates a profile from. A score outside [0, 1] is refused, as a profile's
    accuracy is a rate."""
    p = Path(path)
    rows = []
    for n, row in _read_jsonl(p):
        weak = _field(p, n, row, "weak_score", float)
        if not (math_isfinite(weak) and 0.0 <= weak <= 1.0):
            raise DataFormatError(f"{p}:{n}: weak_score must be a number in [0, 1]")
        model = row.get("weak_model")
        if model is not None and not isinstance(model, str):
            raise DataFormatError(f"{p}:{n}: field 'weak_model' must be a str")
        rows.append(WeakLabel(_field(p, n, row, "prompt", str), weak, model or ""))
    if not rows:
        raise DataFormatError(f"{p}: no rows")
    return rows


def math_isfinite(x: float) -> bool:
    """True for a finite float (NaN and infinities are not valid scores)."""
    return bool(np.isfinite(x))


def load_capability_rows(path: str | Path, *, commercial_only: bool = True) -> list[CapabilityRow]:
    """Capability-labelled rows; with ``commercial_only`` rows marked ``commercial_use: false``
    (research-only licences) are skipped, as the shipped model requires."""
    p = Path(path)
    rows = []
    for n, row in _read_jsonl(p):
        if commercial_only and row.get("commercial_use") is False:
            continue
        cap = _field(p, n, row, "capability", str)
        if cap not in CAPABILITIES:
            raise DataFormatError(f"{p}:{n}: unknown capability {cap!r}")
        rows.append(
            CapabilityRow(
                id=str(_field(p, n, row, "id", str)),
                prompt=_field(p, n, row, "prompt", str),
                capability=cap,
                source=str(row.get("source", "")),
            )
        )
    return rows


# --- training -------------------------------------------------------------------------------


def routing_target(
    rows: Sequence[RoutingRow], *, margin: float = DEFAULT_MARGIN, balance: bool = False
) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """Binary target and sample weights for the routing classifier.

    ``y = 1`` when ``strong_score - weak_score > margin`` ("materially better"). Because every
    file keeps its scores on one scale and APGR is invariant to affine rescaling, the sign of the
    within-row gap is comparable across correctness (0/1) and judge (score/10) files where raw
    scores are not.

    By default every row weighs the same, so the pooled base rates come through: data sets differ
    in how often the strong model wins, and on mixed traffic telling task types apart
    (multiple-choice trivia vs. open chat vs. maths) *is* most of the routing signal. With
    ``balance`` every (data set, class) cell gets the same total weight instead, which only
    optimises ranking within one data set; it is worse on the pooled mixed evaluation
    (docs/model-card.md).
    """
    gap = np.array([r.strong_score - r.weak_score for r in rows])
    y = (gap > margin).astype(np.int64)
    weights = np.ones(len(rows))
    if balance:
        cells = np.array([f"{r.dataset}\x00{label}" for r, label in zip(rows, y, strict=True)])
        names, counts = np.unique(cells, return_counts=True)
        per = {n: len(rows) / (len(names) * c) for n, c in zip(names, counts, strict=True)}
        weights = np.array([per[c] for c in cells])
    return y, weights


DEFAULT_ROUTING_PARAMS: dict[str, Any] = {"C": 1.0, "solver": "liblinear"}
#: The word-feature routing model (``fit_routing(..., capability=None)``).
WORD_ROUTING_PARAMS: dict[str, Any] = {
    "C": 1.0,
    "ngram_max": 2,
    "min_df": 2,
    "solver": "liblinear",
}
DEFAULT_CAPABILITY_PARAMS: dict[str, Any] = {"C": 4.0, "ngram_max": 2, "min_df": 2}


def fit_routing(
    rows: Sequence[RoutingRow],
    capability: PromptClassifier | None,
    *,
    margin: float = DEFAULT_MARGIN,
    balance: bool = False,
    params: dict[str, Any] | None = None,
) -> PromptClassifier:
    """Fit the binary routing classifier on routing rows: a :class:`CapabilityRouting` over the
    fitted ``capability`` model's probabilities (the shipped design), or with
    ``capability=None`` the word + structure :class:`PromptClassifier`."""
    y, w = routing_target(rows, margin=margin, balance=balance)
    if len(set(y.tolist())) < 2:
        raise DataFormatError("routing data needs prompts where the strong model is better and not")
    model: PromptClassifier
    if capability is None:
        model = PromptClassifier(**{**WORD_ROUTING_PARAMS, **(params or {})})
    else:
        model = CapabilityRouting(
            capability=capability, **{**DEFAULT_ROUTING_PARAMS, **(params or {})}
        )
    return model.fit([r.prompt for r in rows], y, sample_weight=w)


#: Folds and shrinkage of the cross-fitted local profiles the gap routing is fitted against.
PROFILE_FOLDS = 5
PROFILE_PRIOR = LABEL_PRIOR
#: The shipped model whose word TF-IDF capability classifier `tiergate train` reuses when it is
#: given no capability file, and which the router-v3-era benches and the retrain loop adapt.
TFIDF_MODEL_NAME = "router-v3"
MIN_CROSSFIT_ROWS = 200


def crossfit_local_accuracy(
    rows: Sequence[RoutingRow],
    q: NDArray[np.float64],
    *,
    folds: int = PROFILE_FOLDS,
    prior: float = PROFILE_PRIOR,
    seed: int = 0,
) -> NDArray[np.float64]:
    """Each row's local profile (accuracy per capability class, ``q``'s columns), estimated from
    the labels of the *other* folds of its weak model's rows: the q-weighted mean weak score,
    shrunk towards that model's mean by ``prior`` pseudo-rows. A row's own label never informs
    its profile, as a profile measured apart from the traffic would not."""
    out = np.zeros_like(q)
    weak = np.array([r.weak_score for r in rows])
    models = np.array([r.weak_model or r.dataset for r in rows])
    rng = np.random.default_rng(seed)
    for name in sorted(set(models.tolist())):
        idx = np.flatnonzero(models == name)
        # With few rows a left-out estimate is biased against each row's own label (and the
        # prior outweighs the data): small logs are read in sample, with a lighter prior.
        k_folds = folds if idx.size >= MIN_CROSSFIT_ROWS else 1
        shrink = min(prior, idx.size / 10)
        fold = rng.integers(0, k_folds, idx.size)
        for k in range(k_folds):
            te = idx[fold == k]
            tr = idx[fold != k] if k_folds > 1 else idx
            if te.size == 0:
                continue
            out[te] = label_accuracy(weak[tr], q[tr], shrink)
    return out


def estimate_profile(
    rows: Sequence[RoutingRow],
    q: NDArray[np.float64],
    capabilities: Sequence[str],
    *,
    model: str,
    prior: float = PROFILE_PRIOR,
    toward: Sequence[float] | None = None,
    source: str = "declared",
    notes: str = "estimated from labelled rows (router.training.estimate_profile)",
) -> LocalProfile:
    """A profile of one weak model from its labelled rows (all of them): per capability the
    q-weighted mean weak score, shrunk by ``prior`` pseudo-rows towards ``toward`` (a prior
    accuracy per capability, such as the configured profile's) or, by default, the rows' mean
    weak score as in :func:`crossfit_local_accuracy`; ``n`` is the capability's probability
    mass in rows."""
    mass = q.sum(axis=0)
    acc = label_accuracy(np.array([r.weak_score for r in rows]), q, prior, toward)
    entries = {
        c: CapabilityAccuracy(float(a), n=round(float(m)))
        for c, a, m in zip(capabilities, acc, mass, strict=True)
    }
    return LocalProfile(model=model, source=source, capabilities=entries, notes=notes)


def fit_gap_routing(
    rows: Sequence[RoutingRow],
    capability: PromptClassifier | ServedCapability,
    *,
    margin: float = DEFAULT_MARGIN,
    params: dict[str, Any] | None = None,
) -> GapRouting:
    """Fit router-v4's :class:`~router.classifier.GapRouting` on routing rows: each row against
    its weak model's cross-fitted profile (:func:`crossfit_local_accuracy`), one intercept per
    prompt set during the fit."""
    y, w = routing_target(rows, margin=margin)
    if len(set(y.tolist())) < 2:
        raise DataFormatError("routing data needs prompts where the strong model is better and not")
    prompts = [r.prompt for r in rows]
    local = crossfit_local_accuracy(rows, capability.predict_proba(prompts))
    model = GapRouting(capability=capability, **(params or {}))
    try:
        return model.fit(
            prompts,
            y,
            sample_weight=w,
            local_accuracy=local,
            strong=[r.strong_score for r in rows],
            groups=[r.prompt_set for r in rows],
        )
    except ValueError as exc:  # an inverted gap: the data cannot back a score
        raise DataFormatError(f"cannot fit the routing score: {exc}") from exc


def gap_scores(
    model: GapRouting, rows: Sequence[RoutingRow], local: NDArray[np.float64]
) -> NDArray[np.float64]:
    """``model``'s scores for ``rows``, each read against its own local profile ``local``."""
    q = model.capability_model().predict_proba([r.prompt for r in rows])
    out: NDArray[np.float64] = logistic(
        model.intercept_[0] + model.slope_ * gap_logit(q, model.strong_, local)
    )
    return out


def cross_validate_gap(
    rows: Sequence[RoutingRow],
    capability: PromptClassifier | ServedCapability,
    *,
    n_bootstrap: int = 200,
) -> dict[str, Any]:
    """Leave-one-prompt-set-out CV of :func:`fit_gap_routing` (files that share prompts leave
    together); each held-out file is scored against its weak model's cross-fitted profile and
    reported on its own (``leave_one_source_out/<file>``)."""
    out: dict[str, Any] = {}
    local = crossfit_local_accuracy(rows, capability.predict_proba([r.prompt for r in rows]))
    sets = sorted({r.prompt_set for r in rows})
    if len(sets) < 2:
        return out
    for held in sets:
        train = [r for r in rows if r.prompt_set != held]
        try:
            model = fit_gap_routing(train, capability)
        except DataFormatError as exc:  # the other sets alone cannot back a score: say so
            out[f"leave_one_source_out/{held}"] = {"error": str(exc)}
            continue
        for d in sorted({r.dataset for r in rows if r.prompt_set == held}):
            idx = [i for i, r in enumerate(rows) if r.dataset == d]
            test = [rows[i] for i in idx]
            scores = gap_scores(model, test, local[idx])
            out[f"leave_one_source_out/{d}"] = _oof_report(scores, test, n_bootstrap)
    return out


def fit_capability(
    rows: Sequence[CapabilityRow], *, params: dict[str, Any] | None = None
) -> PromptClassifier:
    """Fit the 9-class capability classifier on capability rows."""
    model = PromptClassifier(
        **{**DEFAULT_CAPABILITY_PARAMS, "class_weight": "balanced", **(params or {})}
    )
    return model.fit([r.prompt for r in rows], [r.capability for r in rows])


def fit_scorer(
    routing_rows: Sequence[RoutingRow],
    capability_rows: Sequence[CapabilityRow],
    *,
    version: str = DEFAULT_MODEL_NAME,
    progress: Callable[[str], None] | None = None,
) -> LearnedScorer:
    """Fit both classifiers and wrap them as a :class:`LearnedScorer` (no I/O).

    ``progress`` is called with a step name before each fit (the CLI drives a tqdm bar with it).
    """
    if progress:
        progress("capability classifier")
    capability = fit_capability(capability_rows)
    if progress:
        progress("routing classifier")
    routing = fit_routing(routing_rows, capability)
    return LearnedScorer(routing, capability, version)


def train_profile_router(
    data: Sequence[str | Path],
    capability: str | Path,
    out: str | Path,
    *,
    cv: bool = True,
    reader: CapabilityReader | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """``tiergate train --capability DIR``: fit router-v4's profile head on the routing files
    over a standalone capability model and save it (:func:`save_profile_router`). ``reader``:
    the capability model already loaded (a study passes one whose probabilities it keeps);
    ``metadata``: more sidecar fields (a study that reproduces a router's score names it as
    ``score_of``)."""
    distinct_files(data)
    rows = [r for f in data for r in load_routing_rows(f)]
    if reader is None:
        reader = load_capability_model(Path(capability))
    served = ServedCapability(reader).fit()
    routing = fit_gap_routing(rows, served)
    metrics = {"routing": cross_validate_gap(rows, served)} if cv else {}
    sidecar = {
        "data_files": [data_file_info(f, len(load_routing_rows(f))) for f in data],
        "rows": {"routing": len(rows)},
        "target": {"rule": "strong_score - weak_score > margin", "margin": DEFAULT_MARGIN},
        "gap": _gap_summary(routing),
        "cv_metrics": metrics,
        **(metadata or {}),
    }
    return save_profile_router(routing, Path(capability), out, metadata=sidecar)


def _gap_summary(routing: GapRouting) -> dict[str, Any]:
    classes = [str(c) for c in routing.capability_model().classes_]
    return {
        "strong_accuracy": dict(zip(classes, map(float, routing.strong_), strict=True)),
        "slope": routing.slope_,
        "prompt_set_intercepts": routing.group_intercepts_,
        "profiles": "each weak model's, cross-fitted from its labels "
        f"({PROFILE_FOLDS} folds, {PROFILE_PRIOR:g} pseudo-rows)",
    }


def distinct_files(data: Sequence[str | Path]) -> None:
    """Refuse a training file given twice (by its bytes): its rows would weigh double in the fit
    and count twice in the cross-validated figures."""
    seen: dict[str, Path] = {}
    for f in data:
        p = Path(f)
        try:
            digest = sha256_file(p)
        except OSError as exc:
            raise DataFormatError(f"cannot read {p}: {exc.strerror}") from exc
        if digest in seen:
            raise DataFormatError(f"{p}: the same data as {seen[digest]} (given twice)")
        seen[digest] = p


def data_file_info(path: str | Path, rows: int) -> dict[str, Any]:
    """The sidecar entry for one training file: name, sha256, row count used."""
    p = Path(path)
    return {"file": p.name, "sha256": sha256_file(p), "rows": rows}


# --- cross-validation and the train command ----------------------------------------------------


def _scores_report(
    model: PromptClassifier, rows: Sequence[RoutingRow], n_bootstrap: int
) -> dict[str, Any]:

    scores = model.predict_proba([r.prompt for r in rows])[:, 1]
    return _oof_report(scores, rows, n_bootstrap)


def _oof_report(
    scores: np.ndarray[Any, Any], rows: Sequence[RoutingRow], n_bootstrap: int
) -> dict[str, Any]:
    from router.metrics import evaluate, summary

    report = evaluate(
        scores,
        [r.weak_score for r in rows],
        [r.strong_score for r in rows],
        n_bootstrap=n_bootstrap,
    )
    return summary(report)


def cross_validate_routing(
    rows: Sequence[RoutingRow],
    capability: PromptClassifier | None,
    *,
    n_bootstrap: int = 200,
    n_splits: int = 5,
) -> dict[str, Any]:
    """Grouped CV of the routing classifier, as reported in the sidecar and model card
    (``capability``: as for :func:`fit_routing`; the capability model is fixed, not refitted
    per fold: it never sees routing labels).

    * ``leave_one_dataset_out/<d>``: train on every other data set, score all of ``d``.
    * ``grouped_by_category/<d>``: for a data set with at least ``n_splits`` categories (MMLU
      subjects), ``GroupKFold`` over its categories; the other data sets stay in training. The
      out-of-fold scores are pooled into one report.
    """
    from sklearn.model_selection import GroupKFold

    out: dict[str, Any] = {}
    datasets = sorted({r.dataset for r in rows})
    if len(datasets) >= 2:
        for d in datasets:
            train = [r for r in rows if r.dataset != d]
            test = [r for r in rows if r.dataset == d]
            out[f"leave_one_dataset_out/{d}"] = _scores_report(
                fit_routing(train, capability), test, n_bootstrap
            )
    for d in datasets:
        test = [r for r in rows if r.dataset == d]
        cats = np.array([r.category or "" for r in test])
        if len(set(cats.tolist())) < n_splits:
            continue
        others = [r for r in rows if r.dataset != d]
        oof = np.zeros(len(test))
        for tr, te in GroupKFold(n_splits).split(test, groups=cats):
            model = fit_routing(others + [test[i] for i in tr], capability)
            oof[te] = model.predict_proba([test[i].prompt for i in te])[:, 1]
        out[f"grouped_by_category/{d}"] = _oof_report(oof, test, n_bootstrap)
    return out


def cross_validate_capability(rows: Sequence[CapabilityRow]) -> dict[str, Any]:
    """Leave-one-source-out accuracy of the capability classifier (every source held out once).

    A capability that only one source provides cannot be predicted when that source is held out;
    this is the honest out-of-distribution number, and per-class recall shows where it fails.
    """
    from sklearn.metrics import accuracy_score, f1_score, recall_score
    from sklearn.model_selection import LeaveOneGroupOut

    sources = np.array([r.source for r in rows])
    y = np.array([r.capability for r in rows])
    pred = np.empty(len(rows), dtype=object)
    for tr, te in LeaveOneGroupOut().split(rows, groups=sources):
        model = fit_capability([rows[i] for i in tr])
        pred[te] = model.predict([rows[i].prompt for i in te])
    labels = sorted(set(y.tolist()))
    recall = recall_score(y, pred.astype(str), labels=labels, average=None, zero_division=0)
    return {
        "n": len(rows),
        "sources": sorted(set(sources.tolist())),
        "accuracy": float(accuracy_score(y, pred.astype(str))),
        "macro_f1": float(f1_score(y, pred.astype(str), average="macro", zero_division=0)),
        "recall": {c: float(r) for c, r in zip(labels, recall, strict=True)},
    }


def _is_capability_file(path: Path) -> bool:
    for _, row in _read_jsonl(path):
        return "capability" in row and "weak_score" not in row
    raise DataFormatError(f"{path}: no rows")


def train_artifact(
    data: Sequence[str | Path],
    out: str | Path,
    *,
    cv: bool = True,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """What ``tiergate train`` does: read files, fit, cross-validate, save with a full sidecar.

    Each ``--data`` file is a routing file or a capability file (told apart by its fields). With
    no capability file, the capability classifier of the default model is reused, so a retrain on
    logged traffic only refits the routing decision.
    """

    def step(name: str) -> None:
        if progress:
            progress(name)

    distinct_files(data)
    routing_rows: list[RoutingRow] = []
    capability_rows: list[CapabilityRow] = []
    files = []
    for f in data:
        p = Path(f)
        if _is_capability_file(p):
            caps = load_capability_rows(p)
            capability_rows += caps
            files.append({**data_file_info(p, len(caps)), "kind": "capability"})
        else:
            rows = load_routing_rows(p)
            routing_rows += rows
            files.append({**data_file_info(p, len(rows)), "kind": "routing"})
    if not routing_rows:
        raise DataFormatError("train needs at least one routing file (weak_score/strong_score)")
    step("read data")
    if capability_rows:
        capability = fit_capability(capability_rows)
    else:  # the last shipped TF-IDF capability model (router-v4 reads capability-v1 instead)
        capability = load_fitted(default_model_path().parent / TFIDF_MODEL_NAME).capability
    step("capability classifier")
    routing = fit_gap_routing(routing_rows, capability)
    step("routing classifier")
    metrics: dict[str, Any] = {}
    if cv:
        metrics["routing"] = cross_validate_gap(routing_rows, capability)
        if len({r.source for r in capability_rows}) >= 2:
            metrics["capability"] = cross_validate_capability(capability_rows)
        step("cross-validation")
    scorer = LearnedScorer(routing, capability, Path(out).name)
    metadata = {
        "data_files": files,
        "rows": {"routing": len(routing_rows), "capability": len(capability_rows)},
        "target": {
            "rule": "strong_score - weak_score > margin",
            "margin": DEFAULT_MARGIN,
            "balance": "none (every row weighs the same); one intercept per prompt set in the "
            "fit, their mean served",
        },
        "gap": _gap_summary(routing),
        "cv_metrics": metrics,
    }
    path = save_scorer(scorer, out, metadata=metadata)
    step("save")
    return path
