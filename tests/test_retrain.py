"""Retraining and the model store: the gate, versions with lineage, and the live hot swap."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import replace
from itertools import count
from pathlib import Path
from typing import Any

import httpx
import pytest

from router.artifact import default_model_path, load_fitted, load_scorer, save_scorer
from router.classifier import LearnedScorer
from router.cli import main
from router.errors import ConfigError
from router.outcomes import Label, OutcomeRecord, SQLiteOutcomeStore
from router.profile import LocalProfile, default_profile, load_profile
from router.registry import ModelStore
from router.retrain import GateConfig, NotEnoughLabelsError, RetrainReport, compare, retrain
from router.serving import ServingScorer
from router.training import CapabilityRow, fit_scorer, load_routing_rows
from tests.conftest import live, policy_yaml
from tests.fake_provider import FakeProvider
from tests.test_gateway import ScriptedLocal

CONFIG = GateConfig(n_bootstrap=200, min_trusted_eval=10)


def base_file(tmp_path: Path) -> Path:
    """A tiny routing file: maths prompts need the strong model, greetings do not."""
    rows = (
        [
            {
                "id": f"b{i}",
                "prompt": f"compute the integral number {i} alpha",
                "weak_score": 0.0,
                "strong_score": 1.0,
            }
            for i in range(40)
        ]
        + [
            {
                "id": f"c{i}",
                "prompt": f"hello friend beta {i}",
                "weak_score": 1.0,
                "strong_score": 1.0,
            }
            for i in range(40)
        ]
        + [
            {
                "id": f"d{i}",
                "prompt": f"mixed alpha beta {i}",
                "weak_score": 0.0,
                "strong_score": 0.5,
            }
            for i in range(20)
        ]
    )
    path = tmp_path / "base.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def first_version(tmp_path: Path, base: Path) -> ModelStore:
    from router.training import load_routing_rows

    # The routing model reads the capability model's probabilities, so that model must tell the
    # two topics apart by their words alone: each topic comes in the base data's one-line form
    # and in the traffic's form (traffic_prompt), with numbers in both.
    caps = [
        CapabilityRow(f"k{i}-{form}", text, cap, "s")
        for i in range(10)
        for form, (topic, cap) in enumerate(
            [("compute the integral alpha", "math"), ("hello friend beta", "chat")] * 2
        )
        for text in [f"{topic} {i}" if form < 2 else f"Question {i}?\n{topic} {i}\nany idea?"]
    ]
    scorer = fit_scorer(load_routing_rows(base), caps, version="v0001")
    models = ModelStore(tmp_path / "models")
    save_scorer(scorer, models.versions_dir / "v0001")
    models.promote("v0001")
    return models


def outcome(store: SQLiteOutcomeStore, prompt: str, rid: str | None = None) -> str:
    rid = rid or f"req_{uuid.uuid4().hex}"
    store.submit(
        OutcomeRecord(
            id=rid,
            ts=time.time(),
            tenant="t",
            alias="auto",
            tier="local",
            model="local",
            rule="default",
            score=0.5,
            threshold=0.5,
            policy_version="p",
            model_version="v0001",
            status="ok",
            http_status=200,
            stream=False,
            latency_ms=1.0,
            prompt=prompt,
        )
    )
    return rid


def traffic_prompt(i: int, hard: bool, *, shifted: bool = True) -> str:
    """Traffic in a format the base data never showed (several lines, questions). ``shifted``:
    the base model is wrong on it (its 'hello friend' prompts need the strong model, its
    'compute the integral' ones do not); otherwise the base model is right."""
    topic = "hello friend beta" if hard == shifted else "compute the integral alpha"
    return f"Question {i}?\n{topic} {i}\nany idea?\nthanks?"


def label_traffic(
    store: SQLiteOutcomeStore,
    *,
    source: str,
    honest: bool,
    n: int,
    start: int = 0,
    shifted: bool = True,
) -> None:
    """``n`` labelled requests of :func:`traffic_prompt`, half of them hard. Their ids are
    fixed, so the held-out slice (a hash of the id) is the same every run: with random ids it
    held 17 trusted rows one run in many where the candidate tied the current model."""
    for i in range(start, start + n):
        hard = i % 2 == 0
        rid = outcome(store, traffic_prompt(i, hard, shifted=shifted), f"req_{source}_{i:05d}")
        value = float(hard) if honest else float(not hard)
        store.label(Label(rid, "t", source, value, time.time()))


@pytest.fixture
def outcomes(tmp_path: Path) -> Iterator[SQLiteOutcomeStore]:
    store = SQLiteOutcomeStore(tmp_path / "o.db")
    store.start()
    yield store
    store.close()


@pytest.mark.slow  # retrains the classifier
def test_gate_promotes_a_better_candidate(tmp_path: Path, outcomes: SQLiteOutcomeStore) -> None:
    base = base_file(tmp_path)
    models = first_version(tmp_path, base)
    label_traffic(outcomes, source="shadow", honest=True, n=120)
    label_traffic(outcomes, source="feedback", honest=True, n=60, start=1000)
    outcomes.flush()
    report = retrain(outcomes, models, [base], CONFIG)
    labelled, base_cmp = report.comparisons
    assert report.promoted, report.reasons
    assert labelled.name.startswith("labelled held-out (trusted")
    assert labelled.candidate > labelled.current + 0.15
    assert not base_cmp.worse_beyond_noise
    assert models.current() == "v0002"
    meta = models.metadata("v0002")
    assert meta["lineage"]["parent"] == "v0001"
    assert meta["lineage"]["labels"]["source/shadow"] == 120
    assert meta["lineage"]["gate"]["decision"] == "promoted"
    assert load_fitted(models.path("v0002")).version == "v0002"


def test_compare_scores_the_served_model_like_the_trained_one(tmp_path: Path) -> None:
    # The learning-loop benchmark compares the proxy's serving scorer with the starting model.
    base = base_file(tmp_path)
    models = first_version(tmp_path, base)
    trained = load_fitted(models.path("v0001"))
    served = load_scorer(models.path("v0001"))
    assert isinstance(served, ServingScorer)
    rows = load_routing_rows(base)
    same = compare("x", rows, trained, served, n_bootstrap=50)
    assert same.diff == 0.0 and same.current == same.candidate
    assert same.current > 0.5  # the base model ranks its own training rows better than chance


@pytest.mark.slow  # retrains the classifier
def test_gate_refuses_a_candidate_trained_on_adversarial_feedback(
    tmp_path: Path, outcomes: SQLiteOutcomeStore
) -> None:
    base = base_file(tmp_path)
    models = first_version(tmp_path, base)
    # The base model is right on this traffic; a tenant's feedback says the opposite.
    label_traffic(outcomes, source="shadow", honest=True, n=60, shifted=False)
    label_traffic(outcomes, source="feedback", honest=False, n=300, start=1000, shifted=False)
    outcomes.flush()
    report = retrain(outcomes, models, [base], CONFIG)
    labelled, _ = report.comparisons
    assert not report.promoted
    assert labelled.candidate < labelled.current
    assert models.current() == "v0001"  # the serving model did not move
    assert models.metadata("v0002")["lineage"]["gate"]["decision"] == "refused"  # kept for audit


@pytest.mark.slow  # retrains the classifier
@pytest.mark.parametrize("design", ["residual", "refit"])
def test_retrain_cli_runs_the_chosen_candidate_design(
    tmp_path: Path,
    outcomes: SQLiteOutcomeStore,
    capsys: pytest.CaptureFixture[str],
    design: str,
) -> None:
    from router.retrain import BASE_FILES

    base = base_file(tmp_path)
    models = first_version(tmp_path, base)
    folder = tmp_path / "data"
    folder.mkdir()
    for name in BASE_FILES:  # the CLI reads the base files by their names in --base
        (folder / name).write_text(base.read_text())
    label_traffic(outcomes, source="shadow", honest=True, n=120)
    outcomes.flush()
    argv = ["retrain", "--store", str(models.root), "--base", str(folder)]
    argv += ["--db", str(tmp_path / "o.db"), "--bootstrap", "200", "--json"]
    assert main([*argv, "--candidate", design]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["extra"]["candidate"]["design"] == design
    assert report["decision"] in ("promoted", "refused")
    assert models.metadata("v0002")["lineage"]["candidate"]["design"] == design


def test_models_cli_promote_and_rollback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = base_file(tmp_path)
    models = first_version(tmp_path, base)
    store = str(models.root)
    assert main(["models", "list", "--store", store]) == 0
    assert "-- 1 version in" in capsys.readouterr().out
    models.adopt(models.path("v0001"))  # a second version (a copy) to move between
    assert main(["models", "promote", "v0002", "--store", store]) == 0
    assert models.current() == "v0002"
    assert main(["models", "rollback", "--store", store]) == 0
    assert models.current() == "v0001"
    assert main(["models", "list", "--store", store]) == 0
    out = capsys.readouterr().out
    assert "* v0001" in out and "  v0002" in out and "-- 2 versions in" in out
    assert main(["models", "promote", "v0099", "--store", store]) == 2


def test_hot_swap_under_concurrent_traffic(tmp_path: Path, fake: FakeProvider) -> None:
    fake.reset()
    base = base_file(tmp_path)
    models = first_version(tmp_path, base)
    first = load_fitted(models.path("v0001"))
    save_scorer(
        LearnedScorer(first.routing, first.capability, "v0002"), models.versions_dir / "v0002"
    )
    version_seen: list[str] = []

    async def traffic(url: str, n: int) -> list[int]:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:

            async def one(i: int) -> int:
                r = await client.post(
                    "/v1/chat/completions",
                    json={"model": "auto", "messages": [{"role": "user", "content": f"hi {i}"}]},
                )
                version_seen.append(r.headers.get("x-tiergate-model-version", ""))
                return r.status_code

            statuses = []
            for start in range(0, n, 8):
                statuses += await asyncio.gather(*(one(i) for i in range(start, start + 8)))
                if start == 80:
                    models.promote("v0002")
                if start == 240:
                    models.rollback()
            return statuses

    with live(
        tmp_path,
        policy_yaml(fake),
        scorer=first,
        local_backend_obj=ScriptedLocal(queue_size=64),
        model_store=models.root,
        model_watch_s=0.05,
    ) as srv:
        statuses = asyncio.run(traffic(srv.url, 400))
        final = srv.gateway.scorer.version
        swapped = srv.gateway.scorer
    assert statuses == [200] * 400  # no request failed while the model was swapped twice
    assert version_seen[0] == "v0001" and final == "v0001"
    assert "v0002" in version_seen  # the promoted model served in between, without a restart
    middle = version_seen.index("v0002")
    assert "v0001" in version_seen[middle:]  # and the rollback took effect too
    assert isinstance(swapped, ServingScorer)  # swapped in from its serving form (numpy only)


@pytest.mark.slow  # retrains the classifier
def test_retrain_cli_seeds_an_empty_store_with_the_serving_model(
    tmp_path: Path,
    outcomes: SQLiteOutcomeStore,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from router.retrain import BASE_FILES

    base = base_file(tmp_path)
    serving = first_version(tmp_path / "serving", base).path("v0001")
    monkeypatch.setenv("TIERGATE_CLASSIFIER_PATH", str(serving))
    folder = tmp_path / "data"
    folder.mkdir()
    for name in BASE_FILES:
        (folder / name).write_text(base.read_text())
    label_traffic(outcomes, source="shadow", honest=True, n=120)
    outcomes.flush()
    store = tmp_path / "empty-store"
    argv = ["retrain", "--store", str(store), "--base", str(folder)]
    assert main([*argv, "--db", str(tmp_path / "o.db"), "--bootstrap", "200", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    models = ModelStore(store)
    assert report["parent"] == "v0001"
    assert models.metadata("v0002")["lineage"]["parent"] == "v0001"
    assert (models.path("v0001") / "model.joblib").read_bytes() == (
        serving / "model.joblib"
    ).read_bytes()
    assert models.current() in ("v0001", "v0002")


def test_a_current_version_an_older_tiergate_wrote_says_how_to_start_again(
    tmp_path: Path, outcomes: SQLiteOutcomeStore, capsys: pytest.CaptureFixture[str]
) -> None:
    """After an upgrade, a store whose current version the new release cannot load (written
    with other library versions, or an older prompt window) cannot be retrained from. The
    refusal said "retrain with `tiergate train`", which puts nothing in the store; it now says
    to adopt a shipped router into the store and promote it, and the store is left as it was."""
    models = first_version(tmp_path, base_file(tmp_path))
    sidecar = models.path("v0001") / "metadata.json"
    meta = json.loads(sidecar.read_text())
    meta["libraries"]["scikit-learn"] = "1.0.2"  # as a release pinned to another one wrote it
    sidecar.write_text(json.dumps(meta))
    label_traffic(outcomes, source="shadow", honest=True, n=40)
    outcomes.flush()
    argv = ["retrain", "--store", str(models.root), "--db", str(tmp_path / "o.db")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "current version v0001 cannot be loaded" in err
    assert f"tiergate models adopt {default_model_path()} --store {models.root}" in err
    assert models.version_ids() == ["v0001"] and models.current() == "v0001"


def test_a_retrain_that_cannot_run_leaves_the_store_empty(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing to learn from (no outcome store yet), or the shipped router cannot load (its
    encoder not fetched): the run ends with its reason and stores nothing; above all not the
    static stand-in a proxy serves meanwhile, which would outlive the missing encoder."""
    from router.encoder import ENV_ENCODER_PATH

    store = tmp_path / "store"
    monkeypatch.delenv("TIERGATE_CLASSIFIER_PATH", raising=False)
    argv = ["retrain", "--store", str(store), "--db", str(tmp_path / "none.db")]
    assert main(argv) == 1
    assert "no outcome store" in capsys.readouterr().err
    assert not store.exists()
    empty = SQLiteOutcomeStore(tmp_path / "o.db")  # an outcome store, with nothing in it
    empty.start()
    empty.close()
    monkeypatch.setenv(ENV_ENCODER_PATH, str(tmp_path / "absent.safetensors"))
    assert main([*argv[:-1], str(tmp_path / "o.db")]) == 2
    assert "tiergate fetch-model" in capsys.readouterr().err
    assert ModelStore(store).current() is None and ModelStore(store).version_ids() == []


def test_two_first_retrains_on_an_empty_store_seed_it_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CronJob's first run and one started by hand, on a store nothing has seeded: both
    found it empty and both adopted the shipped model (v0001 and a copy, v0002, each saying
    "was empty"). Their loads of it are made to overlap, the widest window there is."""
    import threading

    import router.artifact

    monkeypatch.delenv("TIERGATE_CLASSIFIER_PATH", raising=False)
    empty = SQLiteOutcomeStore(tmp_path / "o.db")
    empty.start()
    empty.close()
    load, together, calls = router.artifact.load_scorer, threading.Barrier(2, timeout=20), count()

    def load_side_by_side(*args: Any, **kwargs: Any) -> Any:
        scorer = load(*args, **kwargs)
        if next(calls) < 2:  # the first two loads, the seeds', end together
            with suppress(threading.BrokenBarrierError):
                together.wait()
        return scorer

    monkeypatch.setattr(router.artifact, "load_scorer", load_side_by_side)
    argv = ["retrain", "--store", str(tmp_path / "store"), "--db", str(tmp_path / "o.db")]
    codes: list[int] = []
    runs = [threading.Thread(target=lambda: codes.append(main(argv))) for _ in range(2)]
    for run in runs:
        run.start()
    for run in runs:
        run.join()
    # each is skipped (0: no labels yet), or finds the other holding the store (2)
    assert 0 in codes and set(codes) <= {0, 2}
    models = ModelStore(tmp_path / "store")
    assert models.version_ids() == ["v0001"] and models.current() == "v0001"
    assert capsys.readouterr().err.count("was empty: adopted") == 1


# --- profile routers (router-v4 and later): the loop relearns the local profile ---------------

WORDS = ("autumn", "cat", "river", "teacher", "mountain", "robot", "garden", "dragon", "sea")


def maths_prompt(i: int) -> str:
    return f"Solve for x: {i % 9 + 2}x + {3 * i + 1} = {7 * i + 5}. Show your working."


def writing_prompt(i: int) -> str:
    return f"Write a short poem about a {WORDS[i % len(WORDS)]} and the number {i}."


def declared(tmp_path: Path, *, math: float, writing: float) -> Path:
    """A declared profile of a local model called Test-8B (what the operator configured)."""
    path = tmp_path / "test-8b.yaml"
    path.write_text(
        "format: tiergate-profile\nformat_version: 1\nmodel: Test-8B\nsource: declared\n"
        f"capabilities:\n  math: {{accuracy: {math}}}\n  creative_writing: {{accuracy: {writing}}}"
        "\n  chat: {accuracy: 0.8}\n"
    )
    return path


def profile_store(tmp_path: Path) -> ModelStore:
    """A model store serving a copy of the shipped router-v6."""
    from router.artifact import DEFAULT_MODEL_NAME
    from router.locations import shipped

    models = ModelStore(tmp_path / "models")
    models.adopt(shipped("models", DEFAULT_MODEL_NAME))
    return models


def profile_base_file(tmp_path: Path) -> Path:
    """Base rows where the local model does maths and cannot write (as the traffic says)."""
    rows = [
        {
            "id": f"pb{i}",
            "prompt": (maths_prompt if i % 2 else writing_prompt)(500 + i),
            "weak_score": float(i % 2),
            "strong_score": 1.0,
        }
        for i in range(100)
    ]
    path = tmp_path / "profile-base.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def label_skills(
    store: SQLiteOutcomeStore, *, source: str, honest: bool, n: int, start: int = 0
) -> None:
    """``n`` locally served requests, half maths (the local answer was right) and half writing
    (it was not), each labelled by ``source``: feedback rates the served answer (quality),
    shadow says whether the closed one was better. ``honest=False`` inverts the labels."""
    for i in range(start, start + n):
        maths = i % 2 == 0
        rid = f"req_{source}_{i}"  # fixed ids: the held-out share is the same on every run
        outcome(store, (maths_prompt if maths else writing_prompt)(i), rid)
        quality = float(maths == honest)
        store.label(
            Label(
                rid,
                "t",
                source,
                1.0 - quality,
                time.time(),
                quality=quality if source == "feedback" else None,
            )
        )


def honest_retrain(
    tmp_path: Path, outcomes: SQLiteOutcomeStore
) -> tuple[ModelStore, LocalProfile, RetrainReport]:
    """The operator declared the local model weak at maths and good at writing; honest labels
    say the opposite, so the current router sends maths closed and keeps writing local. One
    retrain over the shipped router-v6."""
    prior = load_profile(declared(tmp_path, math=0.1, writing=0.9))
    models = profile_store(tmp_path)
    label_skills(outcomes, source="shadow", honest=True, n=80)
    label_skills(outcomes, source="feedback", honest=True, n=120, start=1000)
    outcomes.flush()
    report = retrain(outcomes, models, [profile_base_file(tmp_path)], CONFIG, profile=prior)
    return models, prior, report


def test_retrain_relearns_the_local_profile_from_honest_labels(
    tmp_path: Path, outcomes: SQLiteOutcomeStore
) -> None:
    models, prior, report = honest_retrain(tmp_path, outcomes)
    labelled, base_cmp = report.comparisons
    assert report.promoted, report.reasons
    assert labelled.candidate > labelled.current + 0.3
    assert not base_cmp.worse_beyond_noise
    assert models.current() == "v0002"
    learnt = report.extra["candidate"]["profile"]
    assert report.extra["candidate"]["design"] == "profile"
    assert learnt["math"]["learned"] > 0.6 and learnt["creative_writing"]["learned"] < 0.4
    assert learnt["chat"]["learned"] == pytest.approx(0.8, abs=0.05)  # no labels: the prior
    served = load_scorer(models.path("v0002"), prior)
    assert served.profile is not None and served.profile.source == "learned"
    assert served.profile.accuracy("math") == pytest.approx(learnt["math"]["learned"], abs=1e-4)
    assert served.score(maths_prompt(7)) < served.score(writing_prompt(7))
    meta = models.metadata("v0002")
    assert meta["lineage"]["parent"] == "v0001"
    assert meta["profile"]["prior"]["fingerprint"] == prior.fingerprint()
    # The head is the parent's: only the profile was learnt.
    assert (models.path("v0002") / "serving.npz").read_bytes() == (
        models.path("v0001") / "serving.npz"
    ).read_bytes()
    assert {r["version"]: r["design"] for r in models.listing()} == {
        "v0001": None,
        "v0002": "profile",
    }


def test_a_rollback_while_a_retrain_runs_is_not_undone_by_it(
    tmp_path: Path, outcomes: SQLiteOutcomeStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The operator rolls back while a retrain fits its candidate: the candidate passed a gate
    against the version rolled back from, never against the one serving now, so it is written
    (refused, saying why) and the rollback stands."""
    import router.retrain

    prior = load_profile(declared(tmp_path, math=0.1, writing=0.9))
    models = profile_store(tmp_path)
    models.adopt(default_model_path())
    models.promote("v0002")
    label_skills(outcomes, source="shadow", honest=True, n=80)
    label_skills(outcomes, source="feedback", honest=True, n=120, start=1000)
    outcomes.flush()
    fit = router.retrain.fit_profile_candidate

    def fit_during_a_rollback(*args: Any, **kwargs: Any) -> Any:
        ModelStore(models.root).rollback()  # `tiergate models rollback`, another process
        return fit(*args, **kwargs)

    monkeypatch.setattr(router.retrain, "fit_profile_candidate", fit_during_a_rollback)
    report = retrain(outcomes, models, [profile_base_file(tmp_path)], CONFIG, profile=prior)
    assert report.comparisons[0].candidate > report.comparisons[0].current + 0.3  # a good one
    assert not report.promoted and models.current() == "v0001"
    assert report.reasons == [
        "the current version moved from v0002 to v0001 while this retrain ran, so the "
        "candidate was compared with v0002, not with v0001: run tiergate retrain again"
    ]
    assert models.metadata("v0003")["lineage"]["gate"]["decision"] == "refused"


def test_a_second_retrain_on_a_store_stops_at_once_and_the_first_finishes(
    tmp_path: Path, outcomes: SQLiteOutcomeStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A manual retrain started while the CronJob's runs: both would fit, then the later one
    would find its version id taken and fail. The second stops before any work, saying why."""
    import router.retrain

    prior = load_profile(declared(tmp_path, math=0.1, writing=0.9))
    models = profile_store(tmp_path)
    label_skills(outcomes, source="shadow", honest=True, n=80)
    label_skills(outcomes, source="feedback", honest=True, n=120, start=1000)
    outcomes.flush()
    base = [profile_base_file(tmp_path)]
    fit = router.retrain.fit_profile_candidate
    started: list[str] = []

    def fit_while_another_starts(*args: Any, **kwargs: Any) -> Any:
        if not started:
            started.append("second")
            with pytest.raises(ConfigError, match="another tiergate retrain is running"):
                retrain(outcomes, ModelStore(models.root), base, CONFIG, profile=prior)
        return fit(*args, **kwargs)

    monkeypatch.setattr(router.retrain, "fit_profile_candidate", fit_while_another_starts)
    report = retrain(outcomes, models, base, CONFIG, profile=prior)
    assert report.promoted, report.reasons
    assert models.version_ids() == ["v0001", "v0002"] and models.current() == "v0002"
    monkeypatch.setattr(router.retrain, "fit_profile_candidate", fit)
    assert retrain(outcomes, models, base, CONFIG, profile=prior).version == "v0003"  # released


def test_retrain_refuses_a_profile_learnt_from_adversarial_feedback(
    tmp_path: Path, outcomes: SQLiteOutcomeStore
) -> None:
    # The declared profile is right; a tenant's feedback says the local model cannot do maths
    # and writes well. The trusted shadow verdicts on held-out requests say otherwise.
    prior = load_profile(declared(tmp_path, math=0.9, writing=0.1))
    models = profile_store(tmp_path)
    label_skills(outcomes, source="shadow", honest=True, n=60)
    label_skills(outcomes, source="feedback", honest=False, n=300, start=1000)
    outcomes.flush()
    report = retrain(outcomes, models, [profile_base_file(tmp_path)], CONFIG, profile=prior)
    labelled, _ = report.comparisons
    learnt = report.extra["candidate"]["profile"]
    assert learnt["math"]["learned"] < 0.5 < learnt["creative_writing"]["learned"]  # misled
    assert not report.promoted
    assert labelled.worse_beyond_noise
    assert models.current() == "v0001"
    assert models.metadata("v0002")["lineage"]["gate"]["decision"] == "refused"
    assert load_scorer(models.path("v0001"), prior).profile == prior  # still the declared one


def test_the_gate_scores_held_out_requests_by_their_trusted_labels_alone(
    tmp_path: Path, outcomes: SQLiteOutcomeStore
) -> None:
    """A tenant gives inverted feedback on every answer, the shadow-judged ones included: the
    held-out slice the gate scores must still say what the judge said, not the judge's
    verdict averaged with the feedback that contradicts it."""
    prior = load_profile(declared(tmp_path, math=0.1, writing=0.9))
    models = profile_store(tmp_path)
    label_skills(outcomes, source="shadow", honest=True, n=80)
    label_skills(outcomes, source="feedback", honest=True, n=200, start=1000)
    for i in range(80):  # the same tenant's inverted feedback on the judged requests
        quality = float(i % 2 != 0)  # maths (even i) was right; it says wrong, and vice versa
        outcomes.label(Label(f"req_shadow_{i}", "t", "feedback", 1 - quality, 1.0, quality))
    outcomes.flush()
    report = retrain(outcomes, models, [profile_base_file(tmp_path)], CONFIG, profile=prior)
    labelled, _ = report.comparisons
    assert labelled.n >= 10 and labelled.candidate > labelled.current + 0.3, labelled
    assert report.promoted, report.reasons


def test_held_out_labels_that_never_favour_the_closed_answer_are_refused_saying_so(
    tmp_path: Path, outcomes: SQLiteOutcomeStore
) -> None:
    """Every shadow verdict says the local answer was as good: APGR has no gap to recover, so
    the gate refuses with one reason an operator can act on, not a "gain +nan"."""
    models = profile_store(tmp_path)
    for i in range(80):
        rid = outcome(outcomes, (maths_prompt if i % 2 else writing_prompt)(i), f"req_one_{i}")
        outcomes.label(Label(rid, "t", "shadow", 0.0, time.time()))
    outcomes.flush()
    report = retrain(outcomes, models, [profile_base_file(tmp_path)], CONFIG)
    assert not report.promoted and models.current() == "v0001"
    assert report.reasons == [
        f"labelled held-out (trusted (shadow, escalation)): APGR undefined "
        f"(n={report.comparisons[0].n}): no label there says the closed answer was better, "
        "so no router can gain on these rows"
    ]


def test_retrain_of_a_profile_router_needs_enough_labels(
    tmp_path: Path, outcomes: SQLiteOutcomeStore
) -> None:
    prior = load_profile(declared(tmp_path, math=0.1, writing=0.9))
    models = profile_store(tmp_path)
    label_skills(outcomes, source="shadow", honest=True, n=12)
    outcomes.flush()
    with pytest.raises(NotEnoughLabelsError):
        retrain(outcomes, models, [profile_base_file(tmp_path)], CONFIG, profile=prior)
    assert models.version_ids() == ["v0001"]  # nothing was written
    # Plenty of feedback and no shadow judging: the refusal says where trusted labels come from.
    label_skills(outcomes, source="feedback", honest=True, n=300, start=1000)
    outcomes.flush()
    with pytest.raises(NotEnoughLabelsError, match=r"shadow judging \(the policy's shadow\.s"):
        retrain(outcomes, models, [profile_base_file(tmp_path)], CONFIG, profile=prior)


@pytest.mark.parametrize("design", ["residual", "refit"])
def test_a_profile_router_takes_only_the_profile_design(
    tmp_path: Path, outcomes: SQLiteOutcomeStore, design: str
) -> None:
    from router.errors import ConfigError

    models = profile_store(tmp_path)
    label_skills(outcomes, source="shadow", honest=True, n=80)
    outcomes.flush()
    with pytest.raises(ConfigError, match="profile router"):
        retrain(outcomes, models, [profile_base_file(tmp_path)], GateConfig(candidate=design))


def test_the_proxy_serves_a_promoted_learnt_profile(
    tmp_path: Path,
    outcomes: SQLiteOutcomeStore,
    fake: FakeProvider,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    models, prior, report = honest_retrain(tmp_path, outcomes)
    assert report.promoted
    path = Path(prior.origin or "")
    learnt = load_scorer(models.path("v0002"), prior).profile
    assert learnt is not None
    body = {"model": "auto", "messages": [{"role": "user", "content": maths_prompt(3)}]}
    policy = (Path(__file__).resolve().parent.parent / "policies" / "default.yaml").read_text()
    (tmp_path / "proxy").mkdir()
    with live(
        tmp_path / "proxy",
        policy,
        scorer=None,
        local_backend="none",
        local_profile=path,
        model_store=models.root,
    ) as srv:
        route = srv.http.post("/v1/route", json=body).json()
    assert route["model_version"] == "v0002"
    assert route["signals"]["local_profile"] == "Test-8B (source: learned)"
    assert route["signals"]["local_accuracy"] == pytest.approx(learnt.accuracy("math"))
    assert route["decision"]["profile_entry"].startswith("Test-8B (source: learned): math")
    # policy explain reads the same model store and profile.
    monkeypatch.setenv("TIERGATE_MODEL_STORE", str(models.root))
    monkeypatch.setenv("TIERGATE_LOCAL_PROFILE", str(path))
    assert main(["policy", "explain", "--prompt", maths_prompt(3)]) == 0
    assert "profile  Test-8B (source: learned): math accuracy" in capsys.readouterr().out


def test_a_learnt_profile_is_not_read_over_another_local_model(
    tmp_path: Path, outcomes: SQLiteOutcomeStore
) -> None:
    models, prior, report = honest_retrain(tmp_path, outcomes)
    assert report.promoted
    # The operator swaps the local model: the profile learnt for Test-8B must not route it.
    other = default_profile()
    assert load_scorer(models.path("v0002"), other).profile == other
    # Rolling back to the parent serves the declared profile again.
    models.rollback()
    assert load_scorer(models.path(models.current() or ""), prior).profile == prior


def base_folder(tmp_path: Path, base: Path) -> Path:
    """A --base folder: ``base``'s rows under each of the names the CLI reads there."""
    from router.retrain import BASE_FILES

    folder = tmp_path / "data"
    folder.mkdir()
    for name in BASE_FILES:
        (folder / name).write_text(base.read_text())
    return folder


def _not_json(constant: str) -> None:
    """``json.loads``' ``parse_constant``: NaN and Infinity, which Python writes, are no JSON
    another reader (jq, JavaScript) can parse."""
    raise AssertionError(f"{constant} in JSON output")


def test_a_refused_candidate_exits_0_unless_asked_to_tell_it_apart(
    tmp_path: Path, outcomes: SQLiteOutcomeStore, capsys: pytest.CaptureFixture[str]
) -> None:
    """The nightly CronJob: a refusal is the gate doing its work, and a non-zero exit would
    make Kubernetes retry it. A script that acts on a promotion asks for --exit-code."""
    models = profile_store(tmp_path)
    for i in range(120):  # every verdict says the local answer was as good: refused
        rid = outcome(outcomes, (maths_prompt if i % 2 else writing_prompt)(i), f"req_one_{i}")
        outcomes.label(Label(rid, "t", "shadow", 0.0, time.time()))
    outcomes.flush()
    argv = ["retrain", "--store", str(models.root), "--db", str(tmp_path / "o.db")]
    argv += ["--base", str(base_folder(tmp_path, profile_base_file(tmp_path))), "--bootstrap", "50"]
    assert main([*argv, "--json"]) == 0
    report = json.loads(capsys.readouterr().out, parse_constant=_not_json)
    assert report["decision"] == "refused"
    labelled = report["comparisons"][0]  # APGR is undefined here: null, not NaN (not JSON)
    assert (labelled["current"], labelled["diff"]) == (None, None), labelled
    assert main([*argv, "--exit-code"]) == 3
    assert "gate     REFUSED: " in capsys.readouterr().out
    assert models.current() == "v0001" and models.version_ids() == ["v0001", "v0002", "v0003"]


def test_too_few_labels_skip_the_run_without_failing_it(
    tmp_path: Path, outcomes: SQLiteOutcomeStore, capsys: pytest.CaptureFixture[str]
) -> None:
    """A fresh install's nightly CronJob, before shadow judging has labelled 20 held-out
    requests: it exited 2, so every night's Job failed and was retried for nothing."""
    models = profile_store(tmp_path)
    for i in range(6):
        rid = outcome(outcomes, maths_prompt(i), f"req_few_{i}")
        outcomes.label(Label(rid, "t", "shadow", 1.0, time.time()))
    outcomes.flush()
    argv = ["retrain", "--store", str(models.root), "--db", str(tmp_path / "o.db")]
    argv += ["--base", str(base_folder(tmp_path, profile_base_file(tmp_path)))]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("retrain skipped, nothing trained") and "the gate needs 20" in out
    assert main([*argv, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["decision"] == "skipped" and report["promoted"] is False
    assert "not enough labelled outcomes" in report["reasons"][0]
    assert main([*argv, "--exit-code"]) == 4
    assert models.version_ids() == ["v0001"] and models.current() == "v0001"


def test_a_promoted_candidate_exits_0_with_exit_code(
    tmp_path: Path,
    outcomes: SQLiteOutcomeStore,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TIERGATE_LOCAL_PROFILE", str(declared(tmp_path, math=0.1, writing=0.9)))
    models = profile_store(tmp_path)
    label_skills(outcomes, source="shadow", honest=True, n=80)
    label_skills(outcomes, source="feedback", honest=True, n=120, start=1000)
    outcomes.flush()
    argv = ["retrain", "--store", str(models.root), "--db", str(tmp_path / "o.db")]
    argv += ["--base", str(base_folder(tmp_path, profile_base_file(tmp_path))), "--bootstrap", "50"]
    assert main([*argv, "--exit-code", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["decision"] == "promoted"
    assert models.current() == "v0002"


def test_retrain_finds_the_base_files_from_any_working_directory(
    tmp_path: Path,
    outcomes: SQLiteOutcomeStore,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """--base defaulted to ../shared/data of the working directory: run from elsewhere (the
    image's /app) it read nothing there, after seeding the store and fitting nothing. The
    default is now the checkout's, as the benchmarks and studies read them; an installed
    Tiergate, which has no checkout, asks for --base before it touches anything."""
    import router.locations
    import router.retrain
    from router.retrain import BASE_FILES

    read: list[Path] = []

    def retrain_reading(_outcomes: Any, _models: Any, base: list[Path], *_: Any, **__: Any) -> Any:
        read.extend(path.resolve() for path in base)  # from the working directory of the run
        raise NotEnoughLabelsError("stop before fitting")

    monkeypatch.setattr(router.retrain, "retrain", retrain_reading)
    monkeypatch.chdir(tmp_path)
    store = profile_store(tmp_path)
    argv = ["retrain", "--store", str(store.root), "--db", str(tmp_path / "o.db")]
    assert main(argv) == 0  # skipped: too few labels
    data = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
    assert read == [(data / name).resolve() for name in BASE_FILES]
    capsys.readouterr()
    monkeypatch.setattr(router.locations, "base_data_dir", lambda: None)  # an installed wheel
    assert (
        main(["retrain", "--store", str(tmp_path / "other"), "--db", str(tmp_path / "o.db")]) == 2
    )
    assert "pass --base DIR" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()  # nothing seeded


@pytest.mark.slow  # trains and retrains a classifier
def test_auto_retrains_what_tiergate_train_writes(
    tmp_path: Path, outcomes: SQLiteOutcomeStore
) -> None:
    # `tiergate train` on routing files writes a gap head without structure features, which the
    # residual head cannot adapt: the default design must still retrain it (by refitting).
    from router.training import train_artifact

    base = base_file(tmp_path)
    models = ModelStore(tmp_path / "models")
    models.adopt(train_artifact([base], tmp_path / "mine", cv=False))
    label_traffic(outcomes, source="shadow", honest=True, n=100)  # ~30 held out by id hash
    outcomes.flush()
    with pytest.raises(ConfigError, match="retrain it with --candidate refit"):
        retrain(outcomes, models, [base], replace(CONFIG, candidate="residual"))
    report = retrain(outcomes, models, [base], CONFIG)
    assert models.metadata(report.version)["lineage"]["candidate"]["design"] == "refit"


def test_the_printed_report_keeps_its_columns_under_their_headings() -> None:
    """The held-out set's name is longer than the base slice's: every figure of the table
    still ends where its heading does."""
    from router.retrain import Comparison, format_report

    def row(name: str, n: int) -> Comparison:
        return Comparison(name, n, 0.799, 0.875, 0.076, -0.115, 0.233, (0.7, 0.9), (0.8, 0.9))

    report = RetrainReport(
        parent="v0001",
        version="v0002",
        labels={"used": 119},
        comparisons=[
            row("labelled held-out (trusted (shadow, escalation))", 24),
            row("base eval slice", 559),
        ],
        decision="promoted",
        reasons=["not worse beyond noise on either set, and better on labelled traffic"],
        promoted=True,
    )
    head, *table = format_report(report).splitlines()[2:5]
    assert len(table) == 2 and head.startswith("evaluation set")
    end = len("evaluation set")
    for heading in (" n", "current APGR", "candidate", "diff [95% CI]"):
        end = head.index(heading, end) + len(heading)
        for line in table:
            assert line[end - 1] != " " and line[end : end + 1] in ("", " "), (heading, line)


def test_a_gate_without_bootstrap_resamples_is_refused() -> None:
    # No resamples leaves the noise intervals NaN, and a NaN interval is never "worse beyond
    # noise": such a gate would promote any candidate with a point gain.
    with pytest.raises(ConfigError, match="n_bootstrap must be at least 1"):
        GateConfig(n_bootstrap=0)
