"""The serving form: the proxy scores with numpy alone, exactly as the scikit-learn models do, and
loads only serving forms Tiergate wrote."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from router.artifact import (
    DEFAULT_MODEL_NAME,
    METADATA_FILE,
    SERVING_FILE,
    default_model_path,
    load_fitted,
    load_scorer,
    router_capability,
    save_profile_router,
    save_scorer,
    sha256_file,
)
from router.capability import GatedCapability, SplitCapability, load_reader, save_split
from router.classifier import LearnedScorer, ServedCapability
from router.errors import ArtifactError
from router.pii import pii_kinds
from router.profile import CapabilityAccuracy, LocalProfile, default_profile, load_profile
from router.scoring import CAPABILITIES
from router.serving import ProfileScorer, ServingScorer
from router.stakes import assess_stakes
from router.training import (
    CapabilityRow,
    DataFormatError,
    RoutingRow,
    fit_capability,
    fit_gap_routing,
    fit_routing,
    load_capability_rows,
    load_routing_rows,
    train_profile_router,
)
from tests.test_artifact import (
    artifact_fixture,  # noqa: F401 (a fixture)
    serving_entry,
)
from tests.test_classifier import EASY, HARD
from tests.test_features import TRICKY
from tests.test_training import capability_rows, routing_rows, write_jsonl

REPO = Path(__file__).resolve().parent.parent
SHIPPED = default_model_path()
#: The shipped router's capability model: the split over two gates (capability-v5, capability-v8).
SHIPPED_CAPABILITY = "capability-v9"

SAMPLE = [
    *HARD,
    *EASY,
    *TRICKY,
    "",
    "unseen vocabulary zzqx",
    "hi " * 5000 + "```code```",
    "Email jane@example.com and call +1 415 555 0100 about my card 4111 1111 1111 1111",
    "Summarise this report.\n" + "lorem ipsum " * 400 + "\nProve it step by step: x^2 = 4?",
    "Write a SQL query: SELECT name FROM users WHERE age > 30; then explain the plan.",
    "Should I refinance my mortgage or invest in index funds? Compare the trade-offs.",
]


def assert_serves_like_sklearn(served: ServingScorer, fitted: LearnedScorer) -> None:
    """Scores to 1e-12 of ``predict_proba``, capabilities as ``predict``, the same stakes and PII,
    and the learned scorer's own answers to the bit."""
    proba = fitted.routing.predict_proba(SAMPLE)[:, 1]
    predicted = fitted.capability.predict(SAMPLE)
    for text, p, capability in zip(SAMPLE, proba, predicted, strict=True):
        for has_tools in (False, True):
            a = served.analyze(text, has_tools=has_tools)
            assert abs(a.score - p) <= 1e-12
            assert a.capability == capability
            kinds = pii_kinds(text)
            assert (a.pii, a.pii_kinds) == (bool(kinds), kinds)
            assert (a.stakes, a.stakes_reason) == assess_stakes(
                text, has_tools=has_tools, pii=bool(kinds)
            )
            assert a == fitted.analyze(text, has_tools=has_tools)
        assert served.score(text) == fitted.score(text)


@pytest.fixture(scope="module")
def word_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An artifact of the word + structure routing design (router-v1/v2)."""
    tmp = tmp_path_factory.mktemp("serving-words")
    routing = load_routing_rows(write_jsonl(tmp / "routing.jsonl", routing_rows()))
    caps = load_capability_rows(write_jsonl(tmp / "caps.jsonl", capability_rows()))
    capability = fit_capability(caps)
    scorer = LearnedScorer(fit_routing(routing, None), capability, "t-words")
    return save_scorer(scorer, tmp / "model")


V3 = REPO / "models" / "router-v3"


def test_router_v3_still_serves_like_its_sklearn_estimators() -> None:
    served = load_scorer(V3)
    assert isinstance(served, ServingScorer)
    assert (served.name, served.version) == ("learned", "router-v3")
    assert_serves_like_sklearn(served, load_fitted(V3))


@pytest.mark.skipif(not (SHIPPED / SERVING_FILE).is_file(), reason="no shipped model")
def test_the_shipped_model_reads_the_shipped_capability_model() -> None:
    """The shipped model is a profile head over the shipped capability model: `tiergate classify`
    gives that model's capability, and the score is the head's formula over its probabilities."""
    served = load_scorer(SHIPPED, default_profile())
    assert isinstance(served, ProfileScorer)
    assert (served.name, served.version) == ("learned", DEFAULT_MODEL_NAME)
    capability = router_capability(SHIPPED)
    head = dict(served.head)
    local = np.array([default_profile().accuracy(c) for c in capability.capabilities])
    for text in SAMPLE:
        q = capability.probabilities(text)
        g = np.clip((q * head["gap_strong"] * (1 - local)).sum(), 1e-3, 1 - 1e-3)
        z = float(head["intercept"]) + float(head["gap_slope"]) * np.log(g / (1 - g))
        a = served.analyze(text)
        assert a.capability == capability.predict(text)
        assert a.score == pytest.approx(1 / (1 + np.exp(-z)), abs=1e-12)


@pytest.mark.skipif(not (SHIPPED / SERVING_FILE).is_file(), reason="no shipped model")
def test_the_proxy_loader_imports_neither_sklearn_nor_scipy() -> None:
    script = """
import json, sys
from router.app import configured_scorer
from router.config import Settings
from router.registry import default_loader
from router.artifact import default_model_path
scorer = configured_scorer(Settings(local_backend="none"))
swapped = default_loader(default_model_path())
text = "Prove that the square root of 2 is irrational, step by step."
print(json.dumps({
    "types": [type(scorer).__name__, type(swapped).__name__],
    "version": scorer.version,
    "score": scorer.analyze(text).score,
    "swapped_score": swapped.analyze(text).score,
    "loaded": sorted(m for m in ("sklearn", "scipy", "joblib") if m in sys.modules),
}))
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIERGATE_")}
    env["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
    out = subprocess.run(
        [sys.executable, "-c", script],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["types"] == ["ProfileScorer", "ProfileScorer"]  # not the heuristic fallback
    assert got["version"] == DEFAULT_MODEL_NAME
    assert got["loaded"] == []  # neither sklearn nor scipy (nor joblib) was imported
    # The same model, scored in this process.
    text = "Prove that the square root of 2 is irrational, step by step."
    assert got["score"] == load_scorer(SHIPPED).score(text)
    assert got["swapped_score"] == got["score"]


def test_saved_artifact_serves_like_the_fitted_scorer(artifact: Path) -> None:
    served = load_scorer(artifact)
    assert isinstance(served, ServingScorer) and served.version == "t-1"
    fitted = load_fitted(artifact)
    assert_serves_like_sklearn(served, fitted)
    entry = serving_entry(artifact)
    assert entry["format_version"] == 2 and entry["routing"] == "logistic"
    assert entry["sha256"] == sha256_file(artifact / SERVING_FILE)
    with np.load(artifact / SERVING_FILE, allow_pickle=False) as form:  # plain arrays only
        assert form["table"].dtype == np.float64 and form["vocabulary"].dtype.kind == "U"


def test_the_routing_score_reads_the_capability_probabilities(artifact: Path) -> None:
    with np.load(artifact / SERVING_FILE, allow_pickle=False) as form:
        cap_coef, table, names = form["cap_coef"], form["table"], form["capabilities"]
    assert cap_coef.shape == (1, len(names)) and np.abs(cap_coef).max() > 0
    assert not table[:, 0].any()  # no word weights of its own: the words speak through them


def test_a_word_model_is_written_as_format_1_and_serves(word_artifact: Path) -> None:
    """A model that reads no capability probabilities is written as serving format 1 (no
    ``cap_coef``), which Tiergate versions before format 2 can read too."""
    entry = serving_entry(word_artifact)
    assert entry["format_version"] == 1
    with np.load(word_artifact / SERVING_FILE, allow_pickle=False) as npz:
        assert "cap_coef" not in npz.files
    served = load_scorer(word_artifact)
    assert isinstance(served, ServingScorer)
    assert_serves_like_sklearn(served, load_fitted(word_artifact))


# --- router-v4: the score reads the local model's profile ----------------------------------------

PROFILES = REPO / "models" / "profiles"
MATHS = "Solve for x: 3x^2 - 5x + 2 = 0. Show your steps."
CODE = "Write a Python function that merges two sorted lists."


def _profile(accuracy: dict[str, float], model: str = "test-model") -> LocalProfile:
    return LocalProfile(
        model=model,
        source="declared",
        capabilities={c: CapabilityAccuracy(a) for c, a in accuracy.items()},
    )


def test_a_better_local_model_never_raises_the_score() -> None:
    """Monotone in the profile: raising any capability's local accuracy lowers the score or
    leaves it, and raising the prompt's own capability lowers it strictly."""
    served = load_scorer(SHIPPED)
    assert isinstance(served, ProfileScorer)
    base = dict.fromkeys(CAPABILITIES, 0.3)
    for text in (MATHS, CODE, "Hello", "Write a short poem about autumn leaves."):
        own = served.analyze(text).capability
        assert own is not None
        before = served.with_profile(_profile(base)).score(text)
        for capability in CAPABILITIES:
            after = served.with_profile(_profile({**base, capability: 0.9})).score(text)
            assert after <= before + 1e-12, (text, capability)
            if capability == own:
                assert after < before - 0.01, (text, capability)


def test_swapping_the_profile_moves_the_score_the_right_way() -> None:
    """The same maths prompt scores lower with an 8B model's profile than with the bundled
    135M model's, and lower with Llama-3.1-8B's than with Mistral-7B's (weaker at maths)."""
    served = load_scorer(SHIPPED)
    assert isinstance(served, ProfileScorer)
    smol = load_scorer(SHIPPED, default_profile()).analyze(MATHS)
    llama = served.with_profile(load_profile(PROFILES / "Llama-3.1-8B-Instruct.yaml"))
    mistral = served.with_profile(load_profile(PROFILES / "Mistral-7B-Instruct-v0.2.yaml"))
    assert smol.capability == "math"
    assert smol.local_accuracy == pytest.approx(default_profile().accuracy("math"))
    assert llama.score(MATHS) < mistral.score(MATHS) < smol.score
    assert llama.analyze(MATHS).local_profile == "Meta-Llama-3.1-8B-Instruct"


def test_the_shipped_model_is_format_4_and_router_v3_still_loads() -> None:
    entry = serving_entry(SHIPPED)
    assert (entry["format_version"], entry["routing"]) == (4, "profile")
    assert entry["capability"] == {
        "name": SHIPPED_CAPABILITY,
        "sha256": sha256_file(REPO / "models" / SHIPPED_CAPABILITY / METADATA_FILE),
    }
    split = router_capability(SHIPPED)
    assert isinstance(split, SplitCapability)
    gate, label = split.score, split.label
    assert isinstance(gate, GatedCapability) and isinstance(label, GatedCapability)
    assert (gate.first.version, gate.then.version) == ("capability-v3", "capability-v4")
    assert (label.first.version, label.then.version) == ("capability-v6", "capability-v7")
    chosen = json.loads((REPO / "studies" / "results" / "capability_gate.json").read_text())
    assert chosen["chosen"] == f"gate_{gate.threshold:g}"  # the threshold the study chose
    assert label.threshold == gate.threshold  # not re-chosen (studies/capability_v6.py)
    # The score reads the gate router-v8 was fitted over: router-v9's head is router-v8's.
    v8 = load_scorer(REPO / "models" / "router-v8")
    assert isinstance(v8, ProfileScorer)
    served = load_scorer(SHIPPED, v8.profile)
    assert isinstance(served, ProfileScorer)
    assert list(served.head["capabilities"]) == list(v8.head["capabilities"])
    for name in ("gap_strong", "gap_slope", "intercept"):
        np.testing.assert_allclose(served.head[name], v8.head[name], rtol=0, atol=1e-8)
    # ... and names the capability by capability-v8's gate, where the two disagree too.
    disagree = 0
    for text in SAMPLE:
        got = served.analyze(text)
        assert got.capability == label.predict(text)
        assert got.score == pytest.approx(v8.analyze(text).score, abs=1e-8)
        disagree += got.capability != gate.predict(text)
    assert disagree > 0
    v3 = load_scorer(V3)
    assert isinstance(v3, ServingScorer) and v3.version == "router-v3"
    a = v3.analyze(MATHS)
    assert 0.0 <= a.score <= 1.0 and a.local_accuracy is not None  # the policy signal still works


def test_a_profile_score_needs_a_profile_and_a_non_negative_slope() -> None:
    served = load_scorer(SHIPPED)
    assert isinstance(served, ProfileScorer)
    head = dict(served.head)
    with pytest.raises(ValueError, match="invert"):
        ProfileScorer(served.capability, {**head, "gap_slope": np.array(-1.0)}, "x", served.profile)
    with pytest.raises(ValueError, match="capabilities do not match"):
        ProfileScorer(
            served.capability, {**head, "gap_strong": head["gap_strong"][:-1]}, "x", served.profile
        )
    with np.load(V3 / SERVING_FILE, allow_pickle=False) as npz:
        form = {key: npz[key] for key in npz.files}
    form.update(routing=np.array("profile"), gap_strong=np.full(8, 0.8), gap_slope=np.array(1.0))
    with pytest.raises(ValueError, match="needs a local profile"):
        ServingScorer(form, "x")
    form.pop("gap_slope")
    with pytest.raises(ValueError, match="gap_strong/gap_slope"):
        ServingScorer(form, "x", default_profile())


def test_an_inverted_gap_is_refused_at_fit_time() -> None:
    """Labels that fall as the gap rises cannot back a score: the fit refuses rather than ship
    an inverted one. Maths: both models right or both wrong (a gap of 0.25 by accuracy, never
    materially better); chat: the weak model at 0.9, the strong one always a little better."""
    caps = [
        CapabilityRow(f"m{i}", f"Prove that {i} is irrational step by step", "math")
        for i in range(6)
    ] + [CapabilityRow(f"c{i}", f"hi there, how are you {i}", "chat") for i in range(6)]
    capability = fit_capability(caps)
    rows = []
    for i in range(40):
        maths = i % 2 == 0
        prompt = caps[i % 6].prompt if maths else caps[6 + i % 6].prompt
        weak, strong = (float(i % 4 == 0),) * 2 if maths else (0.9, 1.0)
        rows.append(RoutingRow(f"s/{i}", prompt, weak, strong, weak_model="w"))
    with pytest.raises(DataFormatError, match="inverted"):
        fit_gap_routing(rows, capability)


class KeywordCapabilities:
    """A served capability model for tests: maths words -> math, else chat (numpy only)."""

    capabilities = CAPABILITIES
    version = "kw-1"

    def probabilities(self, text: str) -> np.ndarray:
        p = np.full(len(CAPABILITIES), 0.01)
        p[CAPABILITIES.index("math" if "prove" in text.lower() else "chat")] = 1.0
        return p / p.sum()


def test_a_profile_head_over_a_standalone_capability_model_serves_as_fitted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Serving form 4: the head alone, pinned to a capability artifact by its sidecar's sha256;
    the proxy's loader scores as the fitted GapRouting does and refuses another capability."""
    import types

    reader = KeywordCapabilities()
    fake = types.ModuleType("router.capability")
    fake.load_reader = lambda directory: reader  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "router.capability", fake)
    cap_dir = tmp_path / "capability-test"
    cap_dir.mkdir()
    (cap_dir / METADATA_FILE).write_text('{"format": "tiergate-capability"}')
    rows = [
        RoutingRow(
            f"s/{i}", f"Prove that {i} is prime" if i % 2 else f"hi {i}", w, 1.0, weak_model=m
        )
        for i in range(40)
        for m, w in (("weak", 0.0 if i % 2 else 1.0),)
    ]
    routing = fit_gap_routing(rows, ServedCapability(reader).fit())
    out = save_profile_router(routing, cap_dir, tmp_path / "models" / "v4")
    (out / cap_dir.name).symlink_to(cap_dir)  # carried inside the artifact
    served = load_scorer(out, default_profile())
    assert isinstance(served, ProfileScorer)
    routing.set_params(profile=default_profile())
    texts = ["Prove that 7 is prime", "hi there"]
    assert [served.score(t) for t in texts] == pytest.approx(
        routing.predict_proba(texts)[:, 1].tolist(), abs=1e-12
    )
    assert served.analyze(texts[0]).capability == "math"
    assert served.score(texts[0]) > served.score(texts[1])
    (cap_dir / METADATA_FILE).write_text('{"format": "tiergate-capability", "changed": 1}')
    with pytest.raises(ArtifactError, match="not the one it was fitted on"):
        load_scorer(out)


SHIPPED_SCORES = Path(__file__).parent / "fixtures" / "shipped_scores.json"


def _analysis(a: Any) -> dict[str, Any]:
    return {
        "score": a.score,
        "capability": a.capability,
        "stakes": a.stakes,
        "stakes_reason": a.stakes_reason,
        "pii": a.pii,
        "pii_kinds": list(a.pii_kinds),
        "local_accuracy": a.local_accuracy,
        "local_profile": a.local_profile,
    }


def _assert_same(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert got.keys() == want.keys()
    for key, value in want.items():
        if isinstance(value, float):
            assert got[key] == pytest.approx(value, abs=1e-9, rel=0), key
        else:
            assert got[key] == value, key


def test_shipped_models_score_as_before() -> None:
    # Every shipped model, through every loader, gives the scores, capabilities and stakes the
    # fixture recorded before the scoring code was reorganised (a refactor changes no route).
    from router.capability import load_capability

    fixture = json.loads(SHIPPED_SCORES.read_text())
    prompts = fixture["prompts"]
    for name in ("router-v5", "router-v4", "router-v3"):
        scorer = load_scorer(REPO / "models" / name)
        for text, want in zip(prompts, fixture[name], strict=True):
            assert scorer.score(text) == pytest.approx(want["score"], abs=1e-9, rel=0)
            _assert_same(_analysis(scorer.analyze(text)), want["analyze"])
            _assert_same(_analysis(scorer.analyze(text, has_tools=True)), want["analyze_tools"])
    fitted = load_fitted(REPO / "models" / "router-v3")
    want_fitted = fixture["router-v3-fitted"]
    for text, want in zip(prompts, want_fitted["analyze"], strict=True):
        _assert_same(_analysis(fitted.analyze(text)), want)
    np.testing.assert_allclose(
        fitted.routing.predict_proba(prompts)[:, 1], want_fitted["routing_proba"], atol=1e-9, rtol=0
    )
    np.testing.assert_allclose(
        fitted.capability.predict_proba(prompts), want_fitted["capability_proba"], atol=1e-9, rtol=0
    )
    for name in ("capability-v2", "capability-v1"):
        capability = load_capability(REPO / "models" / name)
        got = [capability.probabilities(text) for text in prompts]
        np.testing.assert_allclose(got, fixture[name], atol=1e-9, rtol=0)


def test_a_router_names_the_router_whose_score_it_reproduces(tmp_path: Path) -> None:
    served = load_scorer(SHIPPED)
    assert isinstance(served, ProfileScorer) and served.score_of == "router-v8"
    assert served.with_profile(default_profile()).score_of == "router-v8"
    copy = tmp_path / "router-x"
    shutil.copytree(SHIPPED, copy)
    meta = json.loads((copy / METADATA_FILE).read_text())
    meta["score_of"] = 8
    (copy / METADATA_FILE).write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="score_of"):
        load_scorer(copy)


def test_a_router_trained_over_a_split_scores_with_one_model_and_labels_with_the_other(
    tmp_path: Path,
) -> None:
    # tiergate train --capability over a split of the two static heads (capability-v3 scores,
    # capability-v6 labels): the head is the one fitted over capability-v3 alone, and the
    # label is capability-v6's.
    data = write_jsonl(tmp_path / "r.jsonl", routing_rows(24))
    models = REPO / "models"
    split = save_split(tmp_path / "cap-split", models / "capability-v3", models / "capability-v6")
    over_split = train_profile_router(
        [data], split, tmp_path / "router-s", cv=False, metadata={"score_of": "router-a"}
    )
    alone = train_profile_router([data], models / "capability-v3", tmp_path / "router-a", cv=False)
    s, a = load_scorer(over_split), load_scorer(alone)
    assert isinstance(s, ProfileScorer) and isinstance(a, ProfileScorer)
    assert (s.score_of, a.score_of) == ("router-a", None)
    label, scored = load_reader(models / "capability-v6"), load_reader(models / "capability-v3")
    differ = 0
    for text in SAMPLE:
        assert s.score(text) == pytest.approx(a.score(text), abs=1e-9)
        assert s.analyze(text).capability == label.predict(text)
        differ += label.predict(text) != scored.predict(text)
    assert differ > 0  # the two static heads disagree somewhere, so the label's source shows


def test_the_shipped_static_split_scores_as_router_v6_and_labels_as_capability_v6() -> None:
    v6, v10 = (
        load_scorer(REPO / "models" / "router-v6"),
        load_scorer(REPO / "models" / "router-v10"),
    )
    assert isinstance(v6, ProfileScorer) and isinstance(v10, ProfileScorer)
    assert v10.score_of == "router-v6" and not v10.costly
    label = load_reader(REPO / "models" / "capability-v6")
    for text in SAMPLE:
        got = v10.analyze(text)
        assert got.score == pytest.approx(v6.analyze(text).score, abs=1e-12)
        assert got.capability == label.predict(text)
