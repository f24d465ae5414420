"""The residual candidate: learns a shift on traffic, leaves base prompts alone, round-trips."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

import router.retrain as retrain_module
from router.artifact import load_fitted, load_scorer, save_scorer
from router.classifier import LearnedScorer, PromptClassifier
from router.metrics import apgr_from_curve, routing_curve
from router.outcomes import Label, SQLiteOutcomeStore
from router.residual import ResidualRouting, fit_residual
from router.retrain import GateConfig, retrain, split_outcomes
from router.serving import ServingScorer
from router.training import fit_routing, load_routing_rows
from tests.test_retrain import base_file, first_version, label_traffic, outcome, traffic_prompt

pytestmark = pytest.mark.slow  # each test fits a residual model on generated traffic

CONFIG = GateConfig(n_bootstrap=200, min_trusted_eval=10)


def _apgr(scores: np.ndarray, hard: np.ndarray) -> float:
    weak, strong = 1.0 - hard, np.ones(len(hard))
    return apgr_from_curve(routing_curve(scores, weak, strong), weak.mean(), 1.0)


def _base(
    tmp_path: Path, *, words: bool = False
) -> tuple[PromptClassifier, PromptClassifier, list[str]]:
    """The base routing model (the shipped design over capability probabilities, or with
    ``words`` the word + structure design of router-v1/v2), its capability model, and the base
    prompts."""
    base = base_file(tmp_path)
    models = first_version(tmp_path, base)
    scorer = load_fitted(models.path("v0001"))
    rows = load_routing_rows(base)
    routing = fit_routing(rows, None) if words else scorer.routing
    return routing, scorer.capability, [r.prompt for r in rows]


@pytest.mark.parametrize("words", [True, False], ids=["word-base", "capability-base"])
def test_residual_learns_a_shift_where_the_base_model_is_wrong(tmp_path: Path, words: bool) -> None:
    base, _, base_prompts = _base(tmp_path, words=words)
    prompts = [traffic_prompt(i, i % 2 == 0) for i in range(120)]
    hard = np.array([float(i % 2 == 0) for i in range(120)])
    model, info = fit_residual(base, prompts[:80], hard[:80], base_prompts)
    fresh, truth = prompts[80:], hard[80:]
    before = _apgr(base.predict_proba(fresh)[:, 1], truth)
    after = _apgr(model.predict_proba(fresh)[:, 1], truth)
    assert before < (0.3 if words else 0.45)  # the base model ranks this traffic backwards
    assert after > 0.74  # the candidate learnt it from 80 labels (0.75 is the oracle here)
    assert info.gate_on_outcomes > 0.9 and info.gate_on_base < 0.1
    # Base prompts keep their scores (the head only speaks where traffic lives) and their order.
    b0 = base.predict_proba(base_prompts)[:, 1]
    b1 = model.predict_proba(base_prompts)[:, 1]
    assert np.abs(b1 - b0).max() < 0.1
    assert np.corrcoef(b0, b1)[0, 1] > 0.99
    # Regularisation was chosen by cross-validation over the grid, not fixed.
    assert len(info.cv_log_loss) > 1 and info.head_lambda > 0


@pytest.mark.parametrize("words", [True, False], ids=["word-base", "capability-base"])
def test_residual_fast_path_and_artifact_round_trip(tmp_path: Path, words: bool) -> None:
    base, capability, base_prompts = _base(tmp_path, words=words)
    prompts = [traffic_prompt(i, i % 2 == 0) for i in range(60)]
    model, _ = fit_residual(base, prompts, [float(i % 2 == 0) for i in range(60)], base_prompts)
    assert (model.capability_coef() is None) == words  # the capability rows travel along
    scorer = LearnedScorer(model, capability, "v0002")
    texts = [*prompts[:5], *base_prompts[:5], "something else entirely"]
    batch = model.predict_proba(texts)[:, 1]
    assert np.allclose([scorer.score(t) for t in texts], batch, atol=1e-12)
    assert np.allclose([scorer.analyze(t).score for t in texts], batch, atol=1e-12)
    save_scorer(scorer, tmp_path / "art")
    back = load_fitted(tmp_path / "art")
    assert isinstance(back.routing, ResidualRouting)
    assert np.allclose(back.routing.predict_proba(texts)[:, 1], batch, atol=1e-12)
    # The proxy's loader serves it from its serving form (three routing rows and the shift).
    served = load_scorer(tmp_path / "art")
    assert isinstance(served, ServingScorer)
    assert np.allclose([served.analyze(t).score for t in texts], batch, atol=1e-12, rtol=0)
    assert [served.analyze(t).capability for t in texts] == list(capability.predict(texts))
    meta = json.loads((tmp_path / "art" / "metadata.json").read_text())
    assert meta["serving"]["routing"] == "residual"
    with pytest.raises(TypeError):
        model.fit(texts, [0, 1] * 5 + [0])


def test_retrain_never_trains_on_the_held_out_slice_and_adapts_the_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = base_file(tmp_path)
    models = first_version(tmp_path, base)
    store = SQLiteOutcomeStore(tmp_path / "o.db")
    store.start()
    try:
        label_traffic(store, source="shadow", honest=True, n=120)
        store.flush()
        seen: list[list[str]] = []
        roots: list[PromptClassifier] = []
        real = retrain_module.fit_residual

        def spy(root: PromptClassifier, prompts: list[str], *a: object, **k: object) -> object:
            seen.append(list(prompts))
            roots.append(root)
            return real(root, prompts, *a, **k)  # type: ignore[arg-type]

        monkeypatch.setattr(retrain_module, "fit_residual", spy)
        first = retrain(store, models, [base], CONFIG)
        assert first.promoted, first.reasons
        assert first.extra["candidate"]["design"] == "residual"
        rows, _ = retrain_module.labelled_rows(store)
        _, held = split_outcomes(rows, CONFIG)
        assert held and not {r.prompt for r in held} & set(seen[0])
        # A second retrain adapts the same root model again instead of stacking on the residual.
        rid = outcome(store, traffic_prompt(999, True))
        store.label(Label(rid, "t", "shadow", 1.0, time.time()))
        store.flush()
        retrain(store, models, [base], CONFIG)
        assert not isinstance(roots[1], ResidualRouting)
        assert roots[1] is not roots[0]  # loaded again from the store, yet the same model
        for name in ("word_coef_", "struct_coef_", "intercept_", "cap_coef_"):
            assert np.array_equal(getattr(roots[0], name), getattr(roots[1], name)), name
    finally:
        store.close()
