"""The app factory: which scorer and store a configuration gets, the lifespan that builds the
services, and one error handler that answers every failure as JSON."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

import router.app
from router.app import build_outcome_store, configured_scorer, create_app
from router.artifact import default_model_path
from router.outcomes import SQLiteOutcomeStore
from router.scoring import HeuristicScorer
from tests.conftest import REPO, make_settings, policy_yaml
from tests.fake_provider import FakeProvider
from tests.scripted_local import ScriptedLocal


def test_the_shipped_model_scores_unless_the_configured_one_cannot_load(
    tmp_path: Path, fake: FakeProvider
) -> None:
    settings = make_settings(tmp_path, policy_yaml(fake))
    assert not isinstance(configured_scorer(settings), HeuristicScorer)
    missing = settings.model_copy(update={"classifier_path": tmp_path / "no-such-model"})
    assert isinstance(configured_scorer(missing), HeuristicScorer)


def test_a_store_version_that_cannot_load_says_how_to_serve_a_router_again(
    tmp_path: Path, fake: FakeProvider, caplog: pytest.LogCaptureFixture
) -> None:
    """After an upgrade, a model store's current version the new release cannot load leaves
    the proxy on the heuristic scorer. The warning ended in the load error's "retrain with
    `tiergate train`", which puts nothing in the store; it now says what does."""
    import shutil

    from router.artifact import STATIC_MODEL_NAME
    from router.locations import shipped
    from router.registry import ModelStore

    models = ModelStore(tmp_path / "store")
    shutil.copytree(shipped("models", STATIC_MODEL_NAME), models.versions_dir / "v0001")
    serving = models.versions_dir / "v0001" / "serving.npz"
    # Any load error will do: one for an older prompt window or library takes the same path.
    serving.write_bytes(serving.read_bytes() + b"changed")
    models.promote("v0001")
    settings = make_settings(tmp_path, policy_yaml(fake), model_store=models.root)
    with caplog.at_level("WARNING", logger="tiergate.app"):
        assert isinstance(configured_scorer(settings), HeuristicScorer)
    assert "current version v0001 of the model store" in caplog.text
    assert f"tiergate models adopt {default_model_path()} --store {models.root}" in caplog.text


def test_serving_with_a_profile_that_measured_only_some_capabilities_warns(
    tmp_path: Path, fake: FakeProvider, caplog: pytest.LogCaptureFixture
) -> None:
    """`tiergate profile --capability chat` writes a valid profile of one capability; served,
    the other eight read as its mean, so the start says so (and still serves)."""
    import json
    import logging

    partial = tmp_path / "chat-only.json"
    partial.write_text(
        json.dumps(
            {
                "format": "tiergate-profile",
                "format_version": 1,
                "model": "quick look",
                "source": "measured",
                "capabilities": {"chat": {"accuracy": 1.0, "low": 0.21, "high": 1.0, "n": 1}},
            }
        )
    )
    settings = make_settings(tmp_path, policy_yaml(fake)).model_copy(
        update={"local_profile": partial}
    )
    with caplog.at_level(logging.WARNING, logger="tiergate.app"):
        assert not isinstance(configured_scorer(settings), HeuristicScorer)
    assert f"{partial}: this measured profile gives 1 of 9 capabilities" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tiergate.app"):
        configured_scorer(make_settings(tmp_path, policy_yaml(fake)))  # the bundled, complete
    assert "capabilities" not in caplog.text


def test_serving_another_local_model_with_the_bundled_profile_warns(
    tmp_path: Path, fake: FakeProvider, caplog: pytest.LogCaptureFixture
) -> None:
    """Without TIERGATE_LOCAL_PROFILE the score reads the bundled SmolLM2's profile: for an
    external server or another GGUF that routes for a model that is not running, so the start
    says so; with the bundled GGUF, or a profile set, it does not."""
    import logging

    base = make_settings(tmp_path, policy_yaml(fake))
    others = {
        "external": base.model_copy(
            update={"local_backend": "openai_http", "local_base_url": "http://gpu-box:8080/v1"}
        ),
        "gguf": base.model_copy(update={"local_model_path": tmp_path / "llama-3.1-8b.gguf"}),
    }
    for name, settings in others.items():
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="tiergate.app"):
            configured_scorer(settings)
        assert "TIERGATE_LOCAL_PROFILE" in caplog.text, name
    for settings in (
        base,
        base.model_copy(update={"local_backend": "none"}),
        others["external"].model_copy(
            update={"local_profile": REPO / "models/profiles/Llama-3.1-8B-Instruct.yaml"}
        ),
    ):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="tiergate.app"):
            configured_scorer(settings)
        assert "TIERGATE_LOCAL_PROFILE" not in caplog.text, settings.local_backend


def test_a_local_window_unlike_the_models_context_is_warned_about(
    tmp_path: Path,
    fake: FakeProvider,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The policy's context_window decides what the local model is sent; TIERGATE_N_CTX what
    it holds. The default policy says to keep them equal; a start where they differ says so."""
    monkeypatch.setattr(router.app.LlamaCppBackend, "load", lambda self: None)
    caplog.set_level("WARNING", logger="tiergate.app")
    for n_ctx, warned in ((2048, False), (1024, True)):  # the test policy's window is 2048
        caplog.clear()
        app = create_app(make_settings(tmp_path, policy_yaml(fake), n_ctx=n_ctx))
        with TestClient(app):
            pass
        message = "policy model 'local' has context_window 2048, but the local model holds "
        assert (message + "TIERGATE_N_CTX=1024 tokens" in caplog.text) is warned


def test_a_closed_model_without_a_price_is_named_at_start_and_in_readyz(
    tmp_path: Path, fake: FakeProvider, caplog: pytest.LogCaptureFixture
) -> None:
    """The test policy's claude model is one the installed litellm's table no longer lists: its
    calls would count $0, so the start says so and /readyz marks it."""
    import logging

    with caplog.at_level(logging.WARNING, logger="tiergate.gateway"):
        app = create_app(make_settings(tmp_path, policy_yaml(fake)), local_backend=ScriptedLocal())
        with TestClient(app) as client:
            closed = client.get("/readyz").json()["closed"]
    assert "no price for closed model(s) claude:" in caplog.text
    assert (closed["gpt-4o"]["priced"], closed["claude"]["priced"]) == (True, False)


def test_an_anthropic_model_without_a_search_price_is_named_at_start(
    tmp_path: Path, fake: FakeProvider, caplog: pytest.LogCaptureFixture
) -> None:
    """litellm's table prices claude-haiku-4-5 but names no price per web search: its web
    searches counted $0 in costs and budgets, unsaid. The start says so (on a reload too,
    ``warn_unpriced``); a policy price with ``web_search_per_1k`` silences it."""
    haiku = policy_yaml(fake).replace("claude-3-5-sonnet-20241022\n", "claude-haiku-4-5\n")
    price = "    price: {input_per_mtok: 1, output_per_mtok: 5, web_search_per_1k: 10}\n"
    priced = haiku.replace("claude-haiku-4-5\n", "claude-haiku-4-5\n" + price)
    for policy, warned in ((haiku, True), (priced, False)):
        said = _start_warnings(tmp_path, policy, caplog)
        assert ("no web search price for closed model(s) claude:" in said) is warned


def test_an_azure_model_without_an_endpoint_is_unavailable_and_passed_over(
    tmp_path: Path, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An ``azure/`` model with its key but no endpoint (no ``api_base``, no AZURE_API_BASE)
    was counted available by /readyz and chosen; its call failed as it was made. It is
    unavailable, named why, and a request goes to the next closed model."""
    fake.reset()
    monkeypatch.setenv("AZURE_API_KEY", "az-test-key")
    for env in ("AZURE_API_BASE", "AZURE_OPENAI_ENDPOINT"):
        monkeypatch.delenv(env, raising=False)
    azure = "  az:\n    tier: closed\n    litellm_model: azure/prod-chat\n"
    policy = (
        policy_yaml(fake, on_failure="closed")
        .replace("  gpt-4o:\n", azure + "  gpt-4o:\n", 1)
        .replace("closed_models: [gpt-4o, claude]", "closed_models: [az, gpt-4o, claude]")
        .replace("auto-best: {threshold: 0.05}", "auto-best: {threshold: 0.0}")
    )
    app = create_app(make_settings(tmp_path, policy), local_backend=ScriptedLocal())
    with TestClient(app) as client:
        closed = client.get("/readyz").json()["closed"]
        answer = client.post(
            "/v1/chat/completions",
            json={"model": "auto-best", "messages": [{"role": "user", "content": "Why?"}]},
        )
    assert closed["az"] == {
        "available": False,
        "reason": "no endpoint: set the model's api_base or AZURE_API_BASE",
        "priced": False,
        "cooldown": None,
    }
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-tiergate-model"] == "gpt-4o"


def test_an_anthropic_model_without_an_output_limit_is_named_at_start(
    tmp_path: Path, fake: FakeProvider, caplog: pytest.LogCaptureFixture
) -> None:
    """The test policy's claude model is one litellm's model map does not list, and the policy
    gives it no max_output_tokens: a request without max_tokens is sent 4096, maybe below its
    own limit, so the start says so; a max_output_tokens silences it."""
    limited = policy_yaml(fake).replace(
        "claude-3-5-sonnet-20241022\n", "claude-3-5-sonnet-20241022\n    max_output_tokens: 8192\n"
    )
    for policy, warned in ((policy_yaml(fake), True), (limited, False)):
        said = _start_warnings(tmp_path, policy, caplog)
        message = "no output limit for Anthropic model(s) claude: litellm's model map"
        assert (message in said) is warned
        assert ("sent max_tokens 4096; give each its limit" in said) is warned


def _start_warnings(tmp_path: Path, policy: str, caplog: pytest.LogCaptureFixture) -> str:
    """What the gateway warns of when an app serving ``policy`` starts."""
    import logging

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tiergate.gateway"):
        app = create_app(make_settings(tmp_path, policy), local_backend=ScriptedLocal())
        with TestClient(app):
            pass
    return caplog.text


def test_a_bedrock_application_profile_without_an_output_limit_is_named_at_start(
    tmp_path: Path, fake: FakeProvider, caplog: pytest.LogCaptureFixture
) -> None:
    """An application inference profile's ARN hides its model: the start says that a request
    without max_tokens is sent none and held at no output limit; a max_output_tokens silences
    it (tests/test_cli.py has `policy check` say the same)."""
    arn = "bedrock/arn:aws:bedrock:us-east-1:123456789012:application-inference-profile/abc123"
    hidden = policy_yaml(fake).replace("anthropic/claude-3-5-sonnet-20241022\n", f"'{arn}'\n")
    limited = hidden.replace(f"'{arn}'\n", f"'{arn}'\n    max_output_tokens: 8192\n")
    for policy, warned in ((hidden, True), (limited, False)):
        message = "cannot tell the model behind Bedrock application inference profile(s) claude"
        assert (message in _start_warnings(tmp_path, policy, caplog)) is warned


def test_outcomes_go_to_sqlite_without_a_redis_url(tmp_path: Path, fake: FakeProvider) -> None:
    store = build_outcome_store(make_settings(tmp_path, policy_yaml(fake)))
    assert isinstance(store, SQLiteOutcomeStore)


def test_every_failure_is_answered_as_json_in_the_fronts_shape(
    tmp_path: Path, fake: FakeProvider
) -> None:
    fake.reset()
    app = create_app(make_settings(tmp_path, policy_yaml(fake)), local_backend=ScriptedLocal())
    with TestClient(app) as client:
        missing = client.get("/v1/no-such-route")
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "not_found"
        # The openai SDK's embeddings.create read "no such route": which, and what is served?
        embeddings = client.post("/v1/embeddings", json={"model": "auto", "input": "hi"})
        assert embeddings.status_code == 404
        message = embeddings.json()["error"]["message"]
        assert message.startswith("Tiergate does not serve POST /v1/embeddings: ")
        assert "/v1/chat/completions" in message
        listing = client.delete("/v1/models")
        assert listing.status_code == 404 and listing.headers["allow"] == "GET"
        assert listing.json()["error"]["message"].startswith(
            "Tiergate does not serve DELETE /v1/models (/v1/models takes GET only): "
        )
        bad = client.post("/v1/chat/completions", json={"model": "auto"})
        assert bad.status_code == 400
        assert bad.json()["error"]["type"] == "invalid_request_error"
        anthropic = client.post("/v1/messages", json={"model": "auto"})
        assert anthropic.status_code == 400 and anthropic.json()["type"] == "error"


def test_the_proxy_hands_back_what_loading_freed_before_it_serves(
    tmp_path: Path, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[bool] = []
    monkeypatch.setattr(router.app, "release_freed_memory", lambda: calls.append(True) or True)
    app = create_app(make_settings(tmp_path, policy_yaml(fake)), local_backend=ScriptedLocal())
    assert not calls
    with TestClient(app) as client:
        assert calls == [True]
        assert client.get("/healthz").status_code == 200


def test_a_proxy_started_on_an_adopted_version_does_not_load_it_again(
    tmp_path: Path, fake: FakeProvider, caplog: pytest.LogCaptureFixture
) -> None:
    """A store's first version is an adopted router (the shipped one, after a first retrain)
    whose model is named e.g. router-v9, not v0001: the watcher took the model the proxy had
    just started with for another version, loaded it again at every start and logged "model
    v0001 now serving (was router-v9)". A later promotion still swaps."""
    import logging

    from router.registry import ModelStore
    from tests.conftest import wait_for

    store = ModelStore(tmp_path / "store")
    store.adopt(REPO / "models" / "router-v6")
    store.adopt(REPO / "models" / "router-v6")  # v0002: another version of the same model
    settings = make_settings(
        tmp_path, policy_yaml(fake), model_store=store.root, model_watch_s=0.01
    )
    app = create_app(settings, local_backend=ScriptedLocal())
    with caplog.at_level(logging.INFO, logger="tiergate.registry"), TestClient(app) as client:
        assert client.get("/healthz").status_code == 200  # the watcher has looked once
        store.promote("v0002")
        assert wait_for(lambda: "model v0002 now serving" in caplog.text)
    assert "model v0001 now serving" not in caplog.text
    assert "model v0002 now serving (was v0001)" in caplog.text


def test_a_responses_stream_stopped_at_shutdown_numbers_its_error_after_the_last_event() -> None:
    """A Responses stream the server stops at shutdown ends with an ``error`` event numbered
    after the last event it sent (keep-alives aside), as OpenAI numbers every event."""
    import asyncio
    import json
    from typing import Any

    from router.app import StoppedAtShutdown
    from tests.conftest import run

    delta = {"type": "response.output_text.delta", "delta": "Hi", "sequence_number": 3}
    sent: list[dict[str, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        start = {"type": "http.response.start", "status": 200}
        await send({**start, "headers": [(b"content-type", b"text/event-stream")]})
        frame = b"event: response.output_text.delta\ndata: " + json.dumps(delta).encode()
        for body in (frame + b"\n\n", b": keep-alive\n\n"):
            await send({"type": "http.response.body", "body": body, "more_body": True})
        raise asyncio.CancelledError  # as the server cancels it when its shutdown timeout is up

    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    async def send(message: Any) -> None:
        sent.append(message)

    scope = {"type": "http", "path": "/v1/responses"}
    run(StoppedAtShutdown(app, lambda: True)(scope, receive, send))
    last = sent[-1]
    assert last["more_body"] is False and last["body"].startswith(b"event: error\n")
    error = json.loads(last["body"].partition(b"data: ")[2])
    assert (error["code"], error["sequence_number"]) == ("server_shutting_down", 4)
