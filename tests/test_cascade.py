"""The cascade's pure parts: answer statistics, the confidence model and its artifact, the
judgement and the streaming hold-back."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sklearn.base import clone

from router.cascade import (
    CASCADE_FILE,
    HoldBack,
    answer_stats,
    feature_names,
    features,
    judge,
    load_cascade,
)
from router.cascade_training import (
    CascadeConfidence,
    cascade_features,
    grouped_out_of_fold,
    save_cascade,
)
from router.errors import ArtifactError


def _entry(token: str, logprob: float, *alts: tuple[str, float]) -> dict[str, Any]:
    top = [{"token": token, "logprob": logprob}, *({"token": t, "logprob": lp} for t, lp in alts)]
    top.sort(key=lambda t: -float(t["logprob"]))
    return {"token": token, "logprob": logprob, "top_logprobs": top}


def test_answer_stats_read_margin_quantiles_entropy_length_and_stop() -> None:
    tokens = [
        _entry("B", math.log(0.6), ("A", math.log(0.3))),
        _entry(".", math.log(0.9)),
        _entry(" yes", math.log(0.5), (" no", math.log(0.5))),
    ]
    stats = answer_stats(tokens, "stop")
    assert stats.first_margin == pytest.approx(math.log(0.6) - math.log(0.3))
    assert stats.first_logprob == pytest.approx(math.log(0.6))
    assert stats.min_logprob == pytest.approx(math.log(0.5))
    assert stats.median_logprob == pytest.approx(math.log(0.6))
    # 0.6, 0.3 and the remaining 0.1 as one outcome.
    expected = -sum(p * math.log(p) for p in (0.6, 0.3, 0.1))
    assert stats.first_entropy == pytest.approx(expected)
    assert stats.log_tokens == pytest.approx(math.log(4))
    assert stats.stopped == 1.0
    held = answer_stats(tokens, "stop", limit=2)
    assert held.log_tokens == pytest.approx(math.log(3))
    assert held.min_logprob == pytest.approx(math.log(0.6))
    assert answer_stats(tokens, "length").stopped == 0.0


def test_an_empty_answer_has_no_confidence_to_offer() -> None:
    stats = answer_stats([], "stop")
    assert stats.first_logprob < -10 and stats.log_tokens == 0.0


def test_a_confident_answer_is_kept_and_a_doubtful_one_escalates_unless_it_must_stay() -> None:
    assert judge(0.8, 0.5).decision == "kept"
    low = judge(0.2, 0.5)
    assert (low.decision, low.reason) == ("escalated", "low_confidence")
    private = judge(0.2, 0.5, may_escalate=False)
    assert (private.decision, private.reason) == ("kept", "local_only")
    assert private.as_record() == {
        "decision": "kept",
        "confidence": 0.2,
        "threshold": 0.5,
        "reason": "local_only",
    }


def _chunk(text: str | None, entries: int = 1, finish: str | None = None) -> dict[str, Any]:
    delta = {"content": text} if text is not None else {}
    logprobs = {"content": [_entry(text or "", -0.1)] * entries} if text else None
    choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
    return {"choices": [choice]}


def test_hold_back_waits_for_n_tokens_or_the_end_of_a_short_answer() -> None:
    hold = HoldBack(tokens=3)
    assert not hold.add(_chunk(None))  # the role chunk
    assert not hold.add(_chunk("a"))
    assert not hold.add(_chunk("b"))
    assert hold.add(_chunk("c"))
    assert hold.text() == "abc" and len(hold.chunks) == 4
    assert hold.stats().stopped == 0.0
    short = HoldBack(tokens=16)
    assert not short.add(_chunk("Paris"))
    assert short.add(_chunk(None, finish="stop"))
    assert short.stats().stopped == 1.0 and short.text() == "Paris"


def _synthetic(n: int = 400, seed: int = 0) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    # Answers whose first-token margin says whether they are right, plus noise features.
    rng = np.random.default_rng(seed)
    right = rng.integers(0, 2, n)
    rows = []
    for r in right:
        margin = rng.normal(2.0 if r else 0.3, 0.5)
        first = _entry("A", -0.1, ("B", -0.1 - abs(margin)))
        tokens = [first, _entry("x", float(-abs(rng.normal(1, 0.5))))]
        rows.append(answer_stats(tokens, "stop"))
    prompts = [(float(rng.random()), int(rng.integers(50, 500))) for _ in range(n)]
    return cascade_features(rows, prompts), right


def test_confidence_model_learns_the_margin_and_serves_what_it_fitted(tmp_path: Path) -> None:
    x, y = _synthetic()
    model = CascadeConfidence(C=0.5)
    assert model.fit(x, y) is model
    assert list(model.classes_) == [0, 1] and model.n_features_in_ == len(feature_names())
    assert clone(model).get_params() == {"C": 0.5}
    confidence = model.confidence(x)
    assert confidence[y == 1].mean() > confidence[y == 0].mean() + 0.3
    form = model.serving("cascade-test")
    np.testing.assert_allclose(form.confidence_of(x), confidence, rtol=1e-9)
    path = save_cascade(model, tmp_path / "cascade-test", {"metrics": {"auc": 1}})
    loaded, meta = load_cascade(path)
    assert meta["features"] == list(feature_names()) and meta["metrics"] == {"auc": 1}
    np.testing.assert_allclose(loaded.confidence_of(x), confidence, rtol=1e-9)
    with pytest.raises(ArtifactError):
        save_cascade(model, path)  # a live artifact is never edited


def test_prompt_only_model_reads_no_answer() -> None:
    x, y = _synthetic()
    prompt_x = x[:, : len(feature_names(False))]
    form = CascadeConfidence().fit(prompt_x, y).serving()
    assert not form.reads_answer
    stats = answer_stats([_entry("A", -0.1)], "stop")
    assert form.confidence(stats, 0.3, 100) == form.confidence(None, 0.3, 100)
    assert features(None, 0.3, 100) == pytest.approx([0.3, math.log1p(100)])


def test_out_of_fold_confidence_never_sees_its_own_group() -> None:
    x, y = _synthetic(300)
    groups = np.repeat(["a", "b", "c"], 100)
    oof = grouped_out_of_fold(CascadeConfidence(), x, y, groups)
    fitted_without_a = CascadeConfidence().fit(x[100:], y[100:])
    np.testing.assert_allclose(oof[:100], fitted_without_a.confidence(x[:100]))


def test_a_tampered_or_foreign_confidence_model_is_refused(tmp_path: Path) -> None:
    x, y = _synthetic()
    path = save_cascade(CascadeConfidence().fit(x, y), tmp_path / "cascade-x")
    (path / CASCADE_FILE).write_bytes((path / CASCADE_FILE).read_bytes() + b"\0")
    with pytest.raises(ArtifactError, match="sha256"):
        load_cascade(path)
    other = save_cascade(CascadeConfidence().fit(x, y), tmp_path / "cascade-y")
    meta = json.loads((other / "metadata.json").read_text())
    meta["format"] = "tiergate-classifier"
    (other / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError):
        load_cascade(other)


def test_the_shipped_confidence_model_loads_with_its_curve_and_local_model() -> None:
    model, meta = load_cascade()
    assert model.version == "cascade-v1" and model.reads_answer
    assert len(model.curve) == 11 and model.curve[0]["closed_share"] == 0.0
    assert meta["local_model"]["file"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    confident = answer_stats([_entry("A", -0.01, ("B", -6.0))], "stop")
    assert 0.0 < model.confidence(confident, 0.3, 200) < 1.0


def test_the_shipped_confidence_model_reads_the_default_scorer_s_score() -> None:
    # Its first feature is the routing score the gateway passes, the default scorer's.
    from router.artifact import default_model_path, load_scorer

    model, meta = load_cascade()
    assert model.scorer == meta["scorer"] == load_scorer(default_model_path()).version
