"""Fitting the cascade's confidence model: it learns the margin, reads no answer when built
from the prompt alone, scores out of fold by group, and its artifact refuses tampering."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sklearn.base import clone

from router.cascade import CASCADE_FILE, answer_stats, feature_names, features, load_cascade
from router.cascade_training import (
    CascadeConfidence,
    cascade_features,
    grouped_out_of_fold,
    save_cascade,
)
from router.errors import ArtifactError
from tests.test_cascade import _entry


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
