"""The cascade end to end: a scripted local model whose log-probabilities are known answers
first; the gateway keeps or escalates, holds a stream back, explains, records and charges."""

from __future__ import annotations

import gc
import json
import logging
import textwrap
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from router.cascade import CascadeModel, feature_names
from router.cascade_training import save_cascade_form
from tests.conftest import (
    KeywordScorer,
    LiveServer,
    live,
    policy_yaml,
    sent_raw,
    silent_server,
    wait_for,
)
from tests.fake_provider import Behaviour, FakeProvider
from tests.scripted_local import ScriptedLocal
from tests.test_cooldown import Clock

CONFIDENT, DOUBTFUL = -0.1, -4.0  # the scripted tokens' log-probability


def _confidence_model(path: Path, scorer: str | None = None) -> Path:
    """Confidence read from the first token's log-probability alone: sigmoid(2 lp + 2), so
    -0.1 gives 0.86 (kept) and -4 gives 0.0025 (escalated)."""
    names = feature_names()
    coef = np.zeros(len(names))
    coef[names.index("first_logprob")] = 2.0
    form = CascadeModel(
        {
            "mean": np.zeros(len(names)),
            "scale": np.ones(len(names)),
            "coef": coef,
            "intercept": np.asarray(2.0),
            "features": np.asarray(names),
        }
    )
    curve = [{"threshold": 0.5, "closed_share": 0.4, "quality": 0.7}]
    meta: dict[str, Any] = {"metrics": {"threshold_curve": curve}}
    if scorer is not None:
        meta["scorer"] = scorer
    return save_cascade_form(form, path / "cascade-test", meta)


CASCADE_POLICY = """\
cascade: {threshold: 0.5, hold_back_tokens: 4}
"""


def _cascade_yaml(fake: FakeProvider, cascade: str, *, instead_of_best: bool = False) -> str:
    """The test policy, falling back to the closed tier, with ``cascade``'s settings and an
    ``auto-cascade`` alias beside ``auto-best`` (or instead of it)."""
    best = "  auto-best: {threshold: 0.05}\n"
    alias = "  auto-cascade: {cascade: true}\n"
    policy = policy_yaml(fake, on_failure="closed", extra=cascade)
    return policy.replace(best, alias if instead_of_best else best + alias)


@pytest.fixture
def scripted() -> ScriptedLocal:
    return ScriptedLocal(words=12)


@contextmanager
def _cascading(
    tmp_path: Path,
    fake: FakeProvider,
    scripted: ScriptedLocal,
    extra: str = "",
    *,
    fitted_on: str | None = None,
    windows: dict[str, int] | None = None,
    claude: str = "",
    **settings: Any,
) -> Iterator[LiveServer]:
    # ``windows``: a context_window for closed models, by their litellm_model; ``claude``: more
    # of the fallback claude's settings (YAML lines under it).
    fake.reset()
    policy = _cascade_yaml(fake, CASCADE_POLICY + extra)
    for litellm_model, window in (windows or {}).items():
        line = f"litellm_model: {litellm_model}\n"
        policy = policy.replace(line, f"{line}    context_window: {window}\n")
    policy = policy.replace("  claude:\n", f"  claude:\n{textwrap.indent(claude, '    ')}", 1)
    with live(
        tmp_path,
        policy,
        local_backend_obj=scripted,
        cascade_model_path=_confidence_model(tmp_path, fitted_on),
        local_price_per_mtok=1000.0,
        **settings,
    ) as srv:
        yield srv


@pytest.fixture
def server(tmp_path: Path, fake: FakeProvider, scripted: ScriptedLocal) -> Iterator[LiveServer]:
    with _cascading(tmp_path, fake, scripted) as srv:
        yield srv


def _record(server: LiveServer, request_id: str) -> dict[str, Any]:
    store = server.gateway.outcomes
    assert wait_for(lambda: store.get(request_id) is not None), "no outcome record"
    record = store.get(request_id)
    assert record is not None
    return record


def _ask(server: LiveServer, content: str = "What is 2+2?", **extra: Any) -> httpx.Response:
    body = {"model": "auto-cascade", "messages": [{"role": "user", "content": content}], **extra}
    return httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30)


def test_a_confident_local_answer_is_kept(
    server: LiveServer, scripted: ScriptedLocal, fake: FakeProvider
) -> None:
    scripted.logprob = CONFIDENT
    response = _ask(server)
    assert response.status_code == 200
    assert response.headers["x-tiergate-cascade"] == "kept"
    assert float(response.headers["x-tiergate-confidence"]) == pytest.approx(0.858, abs=0.01)
    assert response.headers["x-tiergate-tier"] == "local"
    answer = response.json()
    assert answer["choices"][0]["message"]["content"].startswith("w0 w1")
    assert answer["choices"][0]["logprobs"] is None  # the client did not ask for them
    assert fake.received == []
    record = _record(server, response.headers["x-request-id"])
    assert record["tier"] == "local"
    assert record["cascade"]["decision"] == "kept" and record["cascade"]["reason"] == "confident"
    assert record["cascade"]["local_completion_tokens"] == 12


def test_a_doubtful_local_answer_is_discarded_and_the_closed_model_answers(
    server: LiveServer, scripted: ScriptedLocal, fake: FakeProvider
) -> None:
    scripted.logprob = DOUBTFUL
    response = _ask(server)
    assert response.status_code == 200
    assert response.headers["x-tiergate-cascade"] == "escalated"
    assert float(response.headers["x-tiergate-confidence"]) < 0.01
    assert response.headers["x-tiergate-tier"] == "closed"
    assert response.headers["x-tiergate-model"] == "gpt-4o"
    assert response.headers["x-tiergate-fallback"] == "cascade->closed"
    text = response.json()["choices"][0]["message"]["content"]
    assert "closed model" in text and "w0" not in text
    assert len(fake.received) == 1 and "logprobs" not in fake.received[0].body
    record = _record(server, response.headers["x-request-id"])
    cascade = record["cascade"]
    assert record["tier"] == "closed" and cascade["decision"] == "escalated"
    assert cascade["reason"] == "low_confidence"
    assert (cascade["local_prompt_tokens"], cascade["local_completion_tokens"]) == (5, 12)
    # One record holds both parts, and the cost charges both calls.
    closed_cost = server.gateway.costs.closed_cost(
        "openai/gpt-4o", record["prompt_tokens"], record["completion_tokens"]
    )
    assert cascade["local_cost_usd"] == pytest.approx(17 * 1000.0 / 1e6)
    assert record["cost_usd"] == pytest.approx(closed_cost + cascade["local_cost_usd"])


def test_metrics_count_the_discarded_local_answer_under_the_local_model(
    server: LiveServer, scripted: ScriptedLocal
) -> None:
    # Its tokens went uncounted and its cost was added to the closed model's.
    scripted.logprob = DOUBTFUL
    response = _ask(server)
    record = _record(server, response.headers["x-request-id"])
    local_cost = record["cascade"]["local_cost_usd"]
    assert record["cascade"]["local_model"] == "local" and local_cost > 0
    text = httpx.get(server.url + "/metrics").text
    families = {f.name: f.samples for f in text_string_to_metric_families(text)}
    tokens = {(s.labels["model"], s.labels["type"]): s.value for s in families["tiergate_tokens"]}
    assert tokens == {
        ("gpt-4o", "input"): record["prompt_tokens"],
        ("gpt-4o", "output"): record["completion_tokens"],
        ("local", "input"): 5,
        ("local", "output"): 12,
    }
    cost = {
        (s.labels["tier"], s.labels["model"]): s.value
        for s in families["tiergate_cost_usd"]
        if s.name.endswith("_total")
    }
    assert cost == {
        ("local", "local"): pytest.approx(local_cost),
        ("closed", "gpt-4o"): pytest.approx(record["cost_usd"] - local_cost),
    }


def _stream(server: LiveServer, **extra: Any) -> tuple[httpx.Response, str, list[dict[str, Any]]]:
    body = {
        "model": "auto-cascade",
        "messages": [{"role": "user", "content": "Tell me a story."}],
        "stream": True,
        **extra,
    }
    chunks = []
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=30) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
        response = r
    text = "".join(
        (c["choices"][0].get("delta") or {}).get("content") or ""
        for c in chunks
        if c.get("choices")
    )
    return response, text, chunks


def test_a_kept_stream_releases_the_held_tokens_then_streams_on(
    server: LiveServer, scripted: ScriptedLocal, fake: FakeProvider
) -> None:
    scripted.logprob = CONFIDENT
    response, text, chunks = _stream(server, logprobs=True, top_logprobs=1)
    assert response.headers["x-tiergate-cascade"] == "kept"
    assert text == "".join(f"w{i} " for i in range(12))  # nothing held back is lost
    tops = [
        len(t["top_logprobs"])
        for c in chunks
        if c["choices"] and c["choices"][0].get("logprobs")
        for t in c["choices"][0]["logprobs"]["content"]
    ]
    assert tops == [1] * 12  # the client's top_logprobs, not the cascade's
    assert fake.received == []
    record = _record(server, response.headers["x-request-id"])
    assert record["cascade"]["decision"] == "kept"
    assert record["cascade"]["hold_back_ms"] is not None
    # The local part is the whole answer, not the tokens held when it was judged.
    assert record["cascade"]["local_completion_tokens"] == record["completion_tokens"] == 12


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_leaving_the_local_answer_is_charged_for_its_tokens(
    server: LiveServer, scripted: ScriptedLocal, stream: bool
) -> None:
    # It was charged the prompt estimate alone: the tokens the local model had generated for
    # the cascade were not counted, as they are for any other local answer.
    scripted.words, scripted.token_delay_s = 400, 0.2  # a stream leaves in its hold-back
    body = {"model": "auto-cascade", "messages": [{"role": "user", "content": "Hi?"}]}
    body["stream"] = stream
    with pytest.raises(httpx.ReadTimeout):  # the client hangs up after 0.6 s
        httpx.post(server.url + "/v1/chat/completions", json=body, timeout=0.6)
    assert wait_for(lambda: scripted.cancelled == 1, 5)
    store = server.gateway.outcomes
    assert wait_for(lambda: store.count() == 1)
    record = store.recent(1)[0]
    assert (record["status"], record["tier"]) == ("aborted", "local")
    assert 0 < record["completion_tokens"] < 400
    assert record["cost_usd"] == pytest.approx(
        (record["prompt_tokens"] + record["completion_tokens"]) * 1000.0 / 1e6
    )


def test_an_escalated_stream_never_shows_the_local_tokens(
    server: LiveServer, scripted: ScriptedLocal, fake: FakeProvider
) -> None:
    scripted.logprob = DOUBTFUL
    response, text, _ = _stream(server)
    assert response.headers["x-tiergate-cascade"] == "escalated"
    assert response.headers["x-tiergate-tier"] == "closed"
    assert "w0" not in text and "closed model" in text
    assert scripted.cancelled == 1  # the local stream was stopped after the hold-back
    record = _record(server, response.headers["x-request-id"])
    cascade = record["cascade"]
    assert cascade["decision"] == "escalated" and cascade["hold_back_ms"] is not None
    assert cascade["local_completion_tokens"] == 4  # the held tokens, charged
    assert record["cost_usd"] > cascade["local_cost_usd"] > 0


@pytest.mark.gguf
def test_an_escalated_stream_charges_the_local_generation_time(
    tmp_path: Path, fake: FakeProvider
) -> None:
    # The real model ends its stream on its worker thread after the cascade closed it: the
    # record read its generation time before then, 0 s, so GPU-hour pricing charged nothing.
    fake.reset()
    policy = _cascade_yaml(
        fake, "cascade: {threshold: 0.9999, hold_back_tokens: 4}\n", instead_of_best=True
    )
    with live(
        tmp_path,
        policy,
        gguf=True,
        cascade_model_path=_confidence_model(tmp_path),
        local_price_per_gpu_hour=3600.0,  # $1 a second
    ) as server:
        response, text, _ = _stream(server, max_tokens=64)
        assert response.headers["x-tiergate-cascade"] == "escalated" and "closed model" in text
        cascade = _record(server, response.headers["x-request-id"])["cascade"]
    assert cascade["local_completion_tokens"] >= 4
    assert cascade["local_generation_s"] > 0
    assert cascade["local_cost_usd"] == pytest.approx(cascade["local_generation_s"], rel=1e-3)


def _holding_back(
    tmp_path: Path, fake: FakeProvider, **settings: Any
) -> AbstractContextManager[LiveServer]:
    """A live server on a socket whose cascade holds back up to 512 tokens of a local stream."""
    fake.reset()
    policy = _cascade_yaml(
        fake, "cascade: {threshold: 0.5, hold_back_tokens: 512}\n", instead_of_best=True
    )
    return live(
        tmp_path,
        policy,
        socket=True,
        cascade_model_path=_confidence_model(tmp_path),
        local_price_per_mtok=1000.0,
        **settings,
    )


@pytest.mark.gguf
def test_a_client_leaving_in_the_hold_back_stops_the_model_and_pays_its_tokens(
    tmp_path: Path, fake: FakeProvider
) -> None:
    """The real model's stream is held back for the judgement, and its client leaves
    meanwhile. The cancellation reaches the local stream there, which stops generating and
    frees the slot at once. It was charged the prompt alone: the model counts its tokens on
    its worker thread as it stops, after the record was written, and held tokens are no
    streamed text to estimate from. It pays for the tokens held back."""
    body = {
        "model": "auto-cascade",
        "stream": True,
        "max_tokens": 1000,
        "temperature": 0.8,
        "messages": [{"role": "user", "content": "Write a very long story about a cat."}],
    }
    with _holding_back(tmp_path, fake, gguf=True) as server:
        local = server.gateway.local
        sock = sent_raw(server, body)
        assert wait_for(lambda: getattr(local._llm, "drawn", 0) >= 8, timeout_s=60)
        sock.close()  # in the hold-back: nothing was sent, not even the headers
        left = time.monotonic()
        assert wait_for(lambda: local.gate.running == 0, timeout_s=10)
        freed_s = time.monotonic() - left
        drawn = local._llm.drawn
        time.sleep(0.5)
        assert local._llm.drawn == drawn  # it stopped generating
        store = server.gateway.outcomes
        assert wait_for(lambda: store.count() == 1 and store.flush(), timeout_s=10)
        record = store.recent(1)[0]
    assert freed_s < 1.0  # the disconnect is noticed within DISCONNECT_POLL_S
    assert (record["status"], record["tier"]) == ("aborted", "local")
    assert 8 <= record["completion_tokens"] <= drawn
    assert record["cost_usd"] == pytest.approx(
        (record["prompt_tokens"] + record["completion_tokens"]) * 1000.0 / 1e6
    )


def test_a_client_leaving_in_the_hold_back_pays_its_tokens_without_the_gguf(
    tmp_path: Path, fake: FakeProvider
) -> None:
    """The test above on ScriptedLocal, which counts its tokens as the GGUF does, once it has
    stopped (``stop_s`` after its reader left): the client that left in the hold-back pays
    for the tokens held back, on every run, with no model to load."""
    scripted = ScriptedLocal(words=400)
    scripted.token_delay_s = 0.02
    body = {
        "model": "auto-cascade",
        "stream": True,
        "messages": [{"role": "user", "content": "Hi"}],
    }
    with _holding_back(tmp_path, fake, local_backend_obj=scripted) as server:
        sock = sent_raw(server, body)
        time.sleep(0.5)  # about 25 tokens held back
        sock.close()
        assert wait_for(lambda: scripted.cancelled == 1, timeout_s=10)
        store = server.gateway.outcomes
        assert wait_for(lambda: store.count() == 1 and store.flush(), timeout_s=10)
        record = store.recent(1)[0]
    assert (record["status"], record["tier"]) == ("aborted", "local")
    assert 8 <= record["completion_tokens"] < 400
    assert record["cost_usd"] == pytest.approx(
        (record["prompt_tokens"] + record["completion_tokens"]) * 1000.0 / 1e6
    )


def test_a_private_request_never_escalates(
    server: LiveServer, scripted: ScriptedLocal, fake: FakeProvider
) -> None:
    scripted.logprob = DOUBTFUL
    response = _ask(server, "My email is jane.doe@example.com, what is 2+2?")
    assert response.status_code == 200
    assert response.headers["x-tiergate-tier"] == "local"
    assert "x-tiergate-cascade" not in response.headers
    assert fake.received == []


def _on_external(
    tmp_path: Path,
    fake: FakeProvider,
    base_url: str,
    cascade: str = CASCADE_POLICY,
    **settings: Any,
) -> AbstractContextManager[LiveServer]:
    """A Tiergate whose cascade's local model is the external llama.cpp server at
    ``base_url``."""
    fake.reset()
    policy = _cascade_yaml(fake, cascade)
    return live(
        tmp_path,
        policy,
        local_backend="openai_http",
        local_base_url=base_url,
        cascade_model_path=_confidence_model(tmp_path),
        **settings,
    )


@contextmanager
def _on_a_silent_server(
    tmp_path: Path, fake: FakeProvider, **settings: Any
) -> Iterator[tuple[LiveServer, list[Any]]]:
    """A Tiergate whose cascade's local model is an external llama.cpp server that accepts
    connections and never answers; with the connections it accepted."""
    with (
        silent_server() as (root, accepted),
        _on_external(tmp_path, fake, f"{root}/v1", **settings) as srv,
    ):
        yield srv, accepted


@pytest.mark.parametrize(
    "logprobs",
    [{"content": 5}, {"content": [{"token": "w", "logprob": None}]}],
    ids=["not-a-list", "null"],
)
def test_a_local_stream_whose_log_probabilities_cannot_be_read_is_closed_at_once(
    tmp_path: Path, fake: FakeProvider, logprobs: Any
) -> None:
    """An external llama.cpp server streams log-probabilities that cannot be read. The local
    stream was left open, holding the server's slot and its connection until the garbage
    collector found it (the error's traceback keeps it in a cycle): it is closed at once, and
    the request escalates (below)."""
    gc.disable()  # only a close frees the slot, not a collection that happens to come
    try:
        with FakeProvider() as local, _on_external(tmp_path, fake, local.base_url) as srv:
            local.reset(Behaviour(bad_logprobs=logprobs, chunk_delay_s=0.05))
            response = _ask(srv, stream=True)
            running = srv.gateway.local.gate.running
            cut = wait_for(lambda: local.broken_streams == 1, 2)  # the server saw it go
            sent = local.sent_chunks
    finally:
        gc.enable()
    assert response.status_code == 200, response.text
    assert running == 0
    assert cut and sent < 8


#: Answers from an external local server that the cascade cannot read, and the requests
#: (streamed or not) that get them.
_UNREADABLE = {
    "log-probabilities not a list": (Behaviour(bad_logprobs={"content": 5}), (False, True)),
    "a null log-probability": (
        Behaviour(bad_logprobs={"content": [{"token": "w", "logprob": None}]}),
        (False, True),
    ),
    "an alternative without its log-probability": (
        Behaviour(
            bad_logprobs={"content": [{"token": "w", "logprob": -0.1, "top_logprobs": [{}]}]}
        ),
        (False, True),
    ),
    "an answer that is not an object": (Behaviour(mode="array_body"), (False, True)),
    "a chunk that is not JSON": (Behaviour(bad_chunk=b"{not json", logprob=CONFIDENT), (True,)),
    "a chunk that is not a chat chunk": (
        Behaviour(bad_chunk=b'{"choices": {"index": 0}}', logprob=CONFIDENT),
        (True,),
    ),
    "a stream that ends without a finish": (
        Behaviour(mode="interrupted", logprob=CONFIDENT),
        (True,),
    ),
}


@pytest.mark.parametrize(
    ("answer", "stream"),
    [(answer, stream) for answer, (_, streams) in _UNREADABLE.items() for stream in streams],
)
def test_a_local_answer_the_cascade_cannot_read_escalates(
    tmp_path: Path, fake: FakeProvider, answer: str, stream: bool
) -> None:
    """Nothing of the local answer has reached the client when the cascade finds it cannot
    read it, so the request escalates as on any failure of the local model: the closed model
    answers, and the one record says the local model failed, and why. Log-probabilities that
    could not be read were a 500 (``internal_error``) for the client."""
    with FakeProvider() as local, _on_external(tmp_path, fake, local.base_url) as srv:
        local.reset(_UNREADABLE[answer][0])
        response = _ask(srv, stream=stream)
        record = _record(srv, response.headers["x-request-id"])
    assert response.status_code == 200, response.text
    assert response.headers["x-tiergate-tier"] == "closed"
    assert response.headers["x-tiergate-cascade"] == "escalated"
    assert len(local.received) == 1 and len(fake.received) == 1
    assert (record["status"], record["tier"]) == ("ok", "closed")
    assert (record["cascade"]["decision"], record["cascade"]["reason"]) == (
        "escalated",
        "local_failed",
    )
    assert "local" in record["cascade"]["local_error"]


def test_log_probabilities_unreadable_after_the_hold_back_end_the_stream_as_a_bad_chunk(
    tmp_path: Path, fake: FakeProvider
) -> None:
    """A kept cascade stream, its hold-back read and judged, goes on sending log-probabilities
    the client asked for that cannot be read. Nothing can be escalated once the answer began:
    the stream ends with the error event a local stream's bad chunk gets
    (``upstream_bad_response``), and the one record says error, not an internal error."""
    with FakeProvider() as local, _on_external(tmp_path, fake, local.base_url) as srv:
        local.reset(Behaviour(logprob=CONFIDENT, bad_logprobs={"content": 5}, bad_logprobs_from=5))
        response = _ask(srv, stream=True, logprobs=True)
        record = _record(srv, response.headers["x-request-id"])
    assert response.status_code == 200, response.text
    assert response.headers["x-tiergate-cascade"] == "kept"
    events = [
        json.loads(line.removeprefix("data: "))
        for line in response.text.splitlines()
        if line.startswith("data: {")
    ]
    assert events[-1]["error"]["code"] == "upstream_bad_response", events[-1]
    assert fake.received == []
    assert (record["status"], record["tier"], record["error_type"]) == (
        "error",
        "local",
        "upstream_bad_response",
    )
    assert srv.gateway.outcomes.count() == 1


@pytest.mark.parametrize("stream", [False, True])
def test_a_cascade_escalates_at_once_while_its_external_local_server_cools(
    tmp_path: Path, fake: FakeProvider, stream: bool
) -> None:
    """A cascade asks the local model first: an external llama.cpp server that hangs cost each
    cascade request its timeout before it escalated, for ever. Its failures count as on a
    chain: after two the server cools, and the next request escalates at once
    (``local_unavailable``) without calling it."""
    with _on_a_silent_server(tmp_path, fake, local_timeout_s=0.5, cooldown_after_fails=2) as (
        srv,
        accepted,
    ):
        for _ in range(2):
            assert _ask(srv, stream=stream).headers["x-tiergate-tier"] == "closed"
        started = time.perf_counter()
        response = _ask(srv, stream=stream)
        elapsed = time.perf_counter() - started
        assert response.status_code == 200 and response.headers["x-tiergate-tier"] == "closed"
        assert elapsed < 0.5 and len(accepted) == 2
        record = _record(srv, response.headers["x-request-id"])
    assert record["cascade"]["reason"] == "local_unavailable"


def test_kept_streams_cut_after_their_hold_back_cool_the_external_local_server(
    tmp_path: Path, fake: FakeProvider
) -> None:
    """An external llama.cpp server cuts each cascade stream after the tokens held back for
    the judgement. A kept stream counted as a success once they came, which reset the
    failures in a row: one failure per request, and the server never cooled. As on a chain,
    it succeeds once it ended whole: two cut in a row cool it, and each says error. After the
    cooldown the next stream probes it: cut, it cools again at once; whole, it ends the
    cooling. The fake provider plays the server (its chat path), cutting after two words."""
    hold_two = "cascade: {threshold: 0.5, hold_back_tokens: 2}\n"
    cut = Behaviour(mode="reset_mid_stream", logprob=CONFIDENT)
    with _on_external(tmp_path, fake, fake.base_url, hold_two, cooldown_after_fails=2) as srv:
        clock = Clock()
        cooldowns = srv.gateway.cooldowns
        cooldowns._clock = clock
        fake.reset(cut)
        for _ in range(2):
            response, text, chunks = _stream(srv)
            assert response.headers["x-tiergate-cascade"] == "kept"
            assert text == "Hello from " and "error" in chunks[-1]  # cut after the hold-back
            record = _record(srv, response.headers["x-request-id"])
            assert (record["status"], record["http_status"], record["tier"]) == (
                "error",
                502,
                "local",
            )
        assert cooldowns.left("local") == 30
        assert cooldowns.status()["local"]["reason"] == "upstream_unreachable"
        text = httpx.get(srv.url + "/metrics").text
        families = {f.name: f.samples for f in text_string_to_metric_families(text)}
        requests = {
            (s.labels["model"], s.labels["status"], s.labels["error_type"]): s.value
            for s in families["tiergate_requests"]
            if s.name.endswith("_total")
        }
        assert requests == {("local", "error", "upstream_unreachable"): 2}
        (cooled,) = [s for s in families["tiergate_cooldowns"] if s.name.endswith("_total")]
        assert (cooled.labels["model"], cooled.value) == ("local", 1)
        clock.now += 31
        response, text, _ = _stream(srv)  # the probe, cut: the failure after a cooldown
        assert response.headers["x-tiergate-cascade"] == "kept"
        assert cooldowns.left("local") == 30 and len(fake.received) == 3
        clock.now += 31
        fake.reset(Behaviour(logprob=CONFIDENT))
        response, text, _ = _stream(srv)  # the probe, whole
        assert response.headers["x-tiergate-cascade"] == "kept" and text.endswith("word. ")
        assert _record(srv, response.headers["x-request-id"])["status"] == "ok"
        assert cooldowns.status() == {} and cooldowns.left("local") == 0
        assert "local" not in cooldowns._states  # the failures in a row ended too


@contextmanager
def _probe_due(
    tmp_path: Path, fake: FakeProvider, stream: bool
) -> Iterator[tuple[LiveServer, list[Any]]]:
    """:func:`_on_a_silent_server` after one cascade request cooled it and the cooldown lapsed
    on a fake clock: the next local call is the probe, whose bound (the call's timeout) never
    passes."""
    with _on_a_silent_server(tmp_path, fake, local_timeout_s=1.5, cooldown_after_fails=1) as (
        srv,
        accepted,
    ):
        clock = Clock()
        cooldowns = srv.gateway.cooldowns
        cooldowns._clock = clock
        assert _ask(srv, stream=stream).headers["x-tiergate-tier"] == "closed"
        assert cooldowns.left("local") > 0 and len(accepted) == 1
        clock.now += 31
        yield srv, accepted


@pytest.mark.parametrize("stream", [False, True])
def test_a_cascade_call_whose_client_left_lets_the_next_request_probe(
    tmp_path: Path, fake: FakeProvider, stream: bool
) -> None:
    """After its external llama.cpp server's cooldown lapsed, a cascade request's local call is
    the probe. Its client left before the server answered: the probe was held until the
    call's timeout, so the requests after it escalated at once (``local_unavailable``)
    without trying the server. It is released as a chain's is: the next request probes."""
    with _probe_due(tmp_path, fake, stream) as (srv, accepted):
        body = {"model": "auto-cascade", "messages": [{"role": "user", "content": "Hi?"}]}
        with pytest.raises(httpx.ReadTimeout):  # the client hangs up
            httpx.post(
                srv.url + "/v1/chat/completions", json={**body, "stream": stream}, timeout=0.5
            )
        store = srv.gateway.outcomes
        assert wait_for(lambda: store.count() == 2, 5)
        assert store.recent(1)[0]["status"] == "aborted"
        assert wait_for(lambda: len(accepted) == 2, 5)
        response = _ask(srv, stream=stream)
        record = _record(srv, response.headers["x-request-id"])
        tried = len(accepted)
    assert response.status_code == 200 and response.headers["x-tiergate-tier"] == "closed"
    assert record["cascade"]["reason"] != "local_unavailable", record["cascade"]
    assert tried == 3  # the server was called again: the request after the one that left probed


@pytest.mark.parametrize("stream", [False, True])
def test_a_cascade_request_the_local_model_cannot_take_leaves_the_probe_to_the_next(
    tmp_path: Path, fake: FakeProvider, stream: bool
) -> None:
    """After its external llama.cpp server's cooldown lapsed, a cascade request's local call is
    the probe. A request with a field only an Anthropic model serves (``mcp_servers``) never
    reaches the local model: a stream took the probe first and never let it go (the server
    stayed "probed by another request" until the call's timeout) and answered a 400. Such a
    request now goes straight to a Claude on Anthropic's API (a constraint, before any
    cascade), taking no probe, and the next request probes."""
    with _probe_due(tmp_path, fake, stream) as (srv, accepted):
        body = {
            "model": "auto-cascade",
            "max_tokens": 20,
            "messages": [{"role": "user", "content": "What can the tool do?"}],
            "mcp_servers": [{"type": "url", "url": "https://mcp.example.com/sse", "name": "x"}],
            "stream": stream,
        }
        served = httpx.post(srv.url + "/v1/messages", json=body, timeout=30)
        assert served.status_code == 200, served.text
        assert served.headers["x-tiergate-model"] == "claude"
        cooldowns = srv.gateway.cooldowns
        assert not cooldowns.probing("local"), cooldowns.status()
        record = _record(srv, served.headers["x-request-id"])
        assert (record["rule"], record["cascade"]) == ("constraint", None), record
        response = _ask(srv, stream=stream)
        tried = len(accepted)
    assert response.status_code == 200 and response.headers["x-tiergate-tier"] == "closed"
    assert tried == 2  # the request after it probed the server


def test_a_cascade_with_no_closed_model_to_escalate_to_says_it_was_skipped(
    tmp_path: Path, fake: FakeProvider, scripted: ScriptedLocal, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without provider keys the local answer is served as it is, and the headers say so
    rather than looking like a plain local answer; /v1/route gives the reason."""
    for key in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY"):
        monkeypatch.delenv(key)
    scripted.logprob = DOUBTFUL  # would escalate, had it somewhere to go
    with _cascading(tmp_path, fake, scripted) as server:
        response = _ask(server)
        assert response.status_code == 200
        assert response.headers["x-tiergate-tier"] == "local"
        assert response.headers["x-tiergate-cascade"] == "skipped"
        assert "x-tiergate-confidence" not in response.headers
        body = {"model": "auto-cascade", "messages": [{"role": "user", "content": "2+2?"}]}
        plan = httpx.post(server.url + "/v1/route", json=body).json()["decision"]
        assert plan["cascade"] is None
        assert plan["cascade_skipped"] == "no closed model to escalate to"
        assert _record(server, response.headers["x-request-id"])["cascade"] is None
        ready = httpx.get(server.url + "/readyz").json()["aliases"]
        assert ready["auto-cascade"] == {
            "cascade": True,
            "confidence_threshold": 0.5,
            "hold_back_tokens": 4,
            "escalates": False,
        }
        assert ready["auto"]["threshold"] == 0.5
        # A client sees the same in GET /v1/models, which lists each alias's thresholds.
        listed = {
            m["id"]: m["tiergate"] for m in httpx.get(server.url + "/v1/models").json()["data"]
        }
        assert listed["auto-cascade"] == {"kind": "alias", **ready["auto-cascade"]}
    assert fake.received == []


#: About 1,430 tokens by Tiergate's estimate (1,250 by the fake provider's): within the local
#: model's window (2048), over a closed model given a window of 1000.
LONG = "word " * 1000


def _ask_long(server: LiveServer, stream: bool) -> httpx.Response:
    body = {"model": "auto-cascade", "messages": [{"role": "user", "content": LONG}]}
    return httpx.post(
        server.url + "/v1/chat/completions", json={**body, "stream": stream}, timeout=30
    )


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_a_cascade_escalates_only_to_a_closed_model_the_request_fits(
    tmp_path: Path, fake: FakeProvider, scripted: ScriptedLocal, stream: bool
) -> None:
    """A prompt over gpt-4o's window (the first closed model) escalated to it all the same:
    its 400 ended the escalation, and claude, which could take it, was never asked."""
    scripted.logprob = DOUBTFUL
    with _cascading(tmp_path, fake, scripted, windows={"openai/gpt-4o": 1000}) as server:
        fake.reset(Behaviour(context_windows={"gpt-4o": 1000}))
        response = _ask_long(server, stream)
        assert response.status_code == 200, response.text
        assert response.headers["x-tiergate-cascade"] == "escalated"
        assert response.headers["x-tiergate-model"] == "claude"
        assert [r.path for r in fake.received] == ["/v1/messages"]
        body = {"model": "auto-cascade", "messages": [{"role": "user", "content": LONG}]}
        plan = httpx.post(server.url + "/v1/route", json=body).json()
        assert plan["decision"]["cascade"]["escalate_to"] == "claude"
        assert [m["model"] for m in plan["chain"]] == ["local", "claude"]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_a_cascade_no_closed_model_fits_serves_the_local_answer_as_it_is(
    tmp_path: Path, fake: FakeProvider, scripted: ScriptedLocal, stream: bool
) -> None:
    """With no closed model that can take the request, escalating could only fail: the whole
    local answer is served, told as a cascade that was skipped (as without a closed model),
    not judged and then lost to a stream's error."""
    scripted.logprob = DOUBTFUL
    windows = {"openai/gpt-4o": 1000, "anthropic/claude-3-5-sonnet-20241022": 1000}
    with _cascading(tmp_path, fake, scripted, windows=windows) as server:
        fake.reset(Behaviour(context_windows={"gpt-4o": 1000, "claude-3-5-sonnet-20241022": 1000}))
        response = _ask_long(server, stream)
        assert response.status_code == 200, response.text
        assert response.headers["x-tiergate-tier"] == "local"
        assert response.headers["x-tiergate-cascade"] == "skipped"
        assert "w11" in response.text  # the whole answer
        assert fake.received == []
        body = {"model": "auto-cascade", "messages": [{"role": "user", "content": LONG}]}
        skipped = httpx.post(server.url + "/v1/route", json=body).json()["decision"]
        assert skipped["cascade"] is None
        assert skipped["cascade_skipped"].startswith("no closed model can take the request")
        assert "context window 1000" in skipped["cascade_skipped"]
        record = _record(server, response.headers["x-request-id"])
        assert record["tier"] == "local" and record["cascade"] is None


def test_route_says_when_a_request_would_cascade(server: LiveServer) -> None:
    body = {"model": "auto-cascade", "messages": [{"role": "user", "content": "2+2?"}]}
    plan = httpx.post(server.url + "/v1/route", json=body).json()
    assert plan["decision"]["cascade"] == {
        "threshold": 0.5,
        "hold_back_tokens": 4,
        "escalate_to": "gpt-4o",
    }
    # The chain is the one serving walks: the local answer, then the escalation.
    assert [(m["model"], m["fallback"]) for m in plan["chain"]] == [
        ("local", None),
        ("gpt-4o", "cascade->closed"),
        ("claude", "cascade->closed"),
    ]
    body["model"] = "auto"
    assert httpx.post(server.url + "/v1/route", json=body).json()["decision"]["cascade"] is None


def test_dashboard_shows_the_escalation_rate_and_the_evaluated_curve(
    server: LiveServer, scripted: ScriptedLocal
) -> None:
    scripted.logprob = CONFIDENT
    kept = _ask(server).headers["x-request-id"]
    scripted.logprob = DOUBTFUL
    escalated = _ask(server).headers["x-request-id"]
    _record(server, kept), _record(server, escalated)
    assert wait_for(lambda: server.gateway.outcomes.flush(0.1))
    cascade = httpx.get(server.url + "/dashboard/data").json()["cascade"]
    assert (cascade["requests"], cascade["escalated"]) == (2, 1)
    assert cascade["escalation_rate"] == pytest.approx(0.5)
    assert cascade["curve"] == [{"threshold": 0.5, "closed_share": 0.4, "quality": 0.7}]
    page = httpx.get(server.url + "/dashboard").text
    assert "2 cascaded, 1 escalated (50.0%)" in page


def _held_local(server: LiveServer, scripted: ScriptedLocal) -> tuple[threading.Thread, list[Any]]:
    """A doubtful cascade request whose local answer is held: its reservations stand."""
    scripted.logprob, scripted.mode = DOUBTFUL, "hold"
    answers: list[Any] = []
    asking = threading.Thread(target=lambda: answers.append(_ask(server, max_tokens=100)))
    asking.start()
    assert wait_for(lambda: scripted.calls == 1)
    return asking, answers


def test_the_spend_reserved_up_front_covers_the_local_answer_and_the_closed_call(
    tmp_path: Path, fake: FakeProvider, scripted: ScriptedLocal
) -> None:
    # What it escalates to (gpt-4o) is held, not the dearest closed model (claude, its
    # fallback, priced here at ten times more): a fallback is topped up only if it is called.
    budget = "tenants:\n  default: {daily_budget_usd: 100, over_budget: reject}\n"
    dear = "price: {input_per_mtok: 30, output_per_mtok: 150}\n"
    with _cascading(tmp_path, fake, scripted, budget, claude=dear) as server:
        body = {"model": "auto-cascade", "messages": [{"role": "user", "content": "What is 2+2?"}]}
        prompt = httpx.post(server.url + "/v1/route", json=body).json()["signals"]["prompt_held"]
        costs, store = server.gateway.costs, server.gateway.outcomes
        closed = costs.closed_cost("openai/gpt-4o", prompt, 100)
        asking, answers = _held_local(server, scripted)
        try:
            held = store.spend_today("default")
        finally:
            scripted.release.set()
            asking.join(30)
        assert held == pytest.approx(closed + costs.local_cost(prompt, 100))
        record = _record(server, answers[0].headers["x-request-id"])
        assert record["cascade"]["decision"] == "escalated"
        # Settled to what both calls cost.
        assert store.spend_today("default") == pytest.approx(record["cost_usd"])


def test_a_cascade_reserves_its_local_answer_and_its_escalation_and_settles_to_both(
    tmp_path: Path, fake: FakeProvider, scripted: ScriptedLocal
) -> None:
    # A cascade reserves both its calls at admission, checked against the limit: its local
    # answer and the most a closed model it may escalate to can use (gpt-4o: 16,384 without
    # max_tokens), as its budget hold does. Its escalation adds nothing where the discarded
    # answer used less than estimated, and the end settles to what both calls used.
    with _cascading(tmp_path, fake, scripted, tpm_limit=1_000_000) as server:
        body = {"model": "auto-cascade", "messages": [{"role": "user", "content": "What is 2+2?"}]}
        prompt = httpx.post(server.url + "/v1/route", json=body).json()["signals"]["prompt_held"]
        window = lambda: server.gateway.limiter._tokens["default"].current  # noqa: E731
        fake.reset(Behaviour(mode="stall", stall_s=10))
        scripted.logprob, scripted.mode = DOUBTFUL, "hold"
        answers: list[Any] = []
        asking = threading.Thread(target=lambda: answers.append(_ask(server)))
        asking.start()
        try:
            assert wait_for(lambda: scripted.calls == 1)
            during_local = window()
            scripted.release.set()
            assert wait_for(lambda: len(fake.received) == 1)
            during_closed = window()
        finally:
            scripted.release.set()
            fake.unstall()
            asking.join(30)
        assert during_local == (prompt + 4096) + (prompt + 16384), during_local
        assert during_closed == during_local, during_closed
        record = _record(server, answers[0].headers["x-request-id"])
        assert record["cascade"]["decision"] == "escalated"
        assert window() == 5 + 12 + record["prompt_tokens"] + record["completion_tokens"]


def test_a_cascade_reserves_the_model_it_escalates_to_not_its_fallbacks(
    tmp_path: Path, fake: FakeProvider, scripted: ScriptedLocal
) -> None:
    # A cascade escalating to gpt-4o (16,384 without max_tokens) reserved, at admission, the
    # most any closed model may write, its fallback claude's 64,000: one cascade filled a
    # minute that several fit. The escalation's fallback tops up only if it is called.
    claude = "max_output_tokens: 64000\n"
    with _cascading(tmp_path, fake, scripted, claude=claude, tpm_limit=1_000_000) as server:
        body = {"model": "auto-cascade", "messages": [{"role": "user", "content": "What is 2+2?"}]}
        route = httpx.post(server.url + "/v1/route", json=body).json()
        assert route["decision"]["cascade"]["escalate_to"] == "gpt-4o"
        prompt = route["signals"]["prompt_held"]
        window = lambda: server.gateway.limiter._tokens["default"].current  # noqa: E731
        scripted.mode = "hold"
        asking = threading.Thread(target=lambda: _ask(server))
        asking.start()
        try:
            assert wait_for(lambda: scripted.calls == 1)
            during_local = window()
        finally:
            scripted.release.set()
            asking.join(30)
        assert during_local == (prompt + 4096) + (prompt + 16384), during_local


def test_when_every_closed_model_fails_the_discarded_local_answer_is_served(
    server: LiveServer, scripted: ScriptedLocal, fake: FakeProvider
) -> None:
    scripted.logprob = DOUBTFUL
    fake.reset(Behaviour(mode="status", status=500))
    response = _ask(server)
    assert response.status_code == 200
    assert response.headers["x-tiergate-cascade"] == "escalation-failed"
    assert response.headers["x-tiergate-tier"] == "local"
    assert response.headers["x-tiergate-fallback"] == "closed->local"
    assert response.json()["choices"][0]["message"]["content"].startswith("w0 w1")
    assert response.json()["choices"][0]["logprobs"] is None
    assert len(fake.received) == 2  # gpt-4o, then claude
    record = _record(server, response.headers["x-request-id"])
    cascade = record["cascade"]
    assert record["status"] == "ok" and record["tier"] == "local"
    assert cascade["decision"] == "escalation-failed" and cascade["reason"] == "low_confidence"
    assert "gpt-4o" in cascade["escalation_error"]
    # Charged once, as the answer it is.
    assert (record["prompt_tokens"], record["completion_tokens"]) == (5, 12)
    assert "local_cost_usd" not in cascade
    assert record["cost_usd"] == pytest.approx(17 * 1000.0 / 1e6)


def test_a_short_held_answer_is_released_when_the_escalation_fails(
    server: LiveServer, scripted: ScriptedLocal, fake: FakeProvider
) -> None:
    scripted.logprob, scripted.words = DOUBTFUL, 3  # the whole answer fits in the hold-back
    fake.reset(Behaviour(mode="status", status=500))
    response, text, _ = _stream(server)
    assert response.status_code == 200
    assert response.headers["x-tiergate-cascade"] == "escalation-failed"
    assert text == "w0 w1 w2 "
    record = _record(server, response.headers["x-request-id"])
    assert record["cascade"]["decision"] == "escalation-failed"
    assert record["completion_tokens"] == 3


def test_a_part_of_a_held_answer_is_never_served_as_the_answer(
    server: LiveServer, scripted: ScriptedLocal, fake: FakeProvider
) -> None:
    scripted.logprob = DOUBTFUL  # 12 words: only 4 are held when the cascade escalates
    fake.reset(Behaviour(mode="status", status=500))
    response, text, _ = _stream(server)
    assert response.status_code == 502 and "w0" not in text
    # Not "escalated", which says the closed model answered (it said so on this 502).
    assert response.headers["x-tiergate-cascade"] == "escalation-failed"
    record = _record(server, response.headers["x-request-id"])
    assert (record["status"], record["cascade"]["decision"]) == ("error", "escalation-failed")
    assert "gpt-4o" in record["cascade"]["escalation_error"]


def test_a_failed_escalation_s_error_is_stored_and_logged_redacted(
    tmp_path: Path,
    scripted: ScriptedLocal,
    fake: FakeProvider,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Personal data sent to a cascade (warned of, stored redacted) escalates to the closed
    # models. Their error text, a provider's own words, went whole into the record's cascade
    # and the log: a provider that repeats the prompt in its error put it there.
    caplog.set_level(logging.WARNING)
    scripted.logprob = DOUBTFUL
    pii_rule = "    route: local\n    local_only: true\n"
    policy = _cascade_yaml(fake, CASCADE_POLICY)
    assert pii_rule in policy
    policy = policy.replace(pii_rule, "    route: cascade\n    store_prompts: redacted\n")
    echo = {"error": {"message": "cannot answer jane.doe@example.com's question"}}
    with live(
        tmp_path,
        policy,
        local_backend_obj=scripted,
        cascade_model_path=_confidence_model(tmp_path, None),
    ) as server:
        fake.reset(Behaviour(mode="status", status=500, error_body=echo))
        response = _ask(server, "Write to jane.doe@example.com")
        assert response.headers["x-tiergate-rule"] == "pii-stays-local"
        assert response.headers["x-tiergate-cascade"] == "escalation-failed"
        record = _record(server, response.headers["x-request-id"])
    assert record["prompt"] == "Write to [EMAIL]"
    assert "jane.doe" not in json.dumps(record)
    assert "[EMAIL]" in record["cascade"]["escalation_error"]
    assert "jane.doe" not in "\n".join(r.getMessage() for r in caplog.records)


class _ScoresAs(KeywordScorer):
    """A scorer whose score is another router's (as router-v9's is router-v8's)."""

    score_of = "router-v8"


@pytest.mark.parametrize(
    ("fitted_on", "warned"),
    [("router-v0", True), ("router-v8", False), ("keyword-test-1", False)],
)
def test_a_confidence_model_fitted_on_another_scorer_s_score_is_named(
    tmp_path: Path,
    *,
    fake: FakeProvider,
    scripted: ScriptedLocal,
    caplog: pytest.LogCaptureFixture,
    fitted_on: str,
    warned: bool,
) -> None:
    # A confidence model reads the score it was fitted on: the scorer's own, or the one its
    # sidecar says it reproduces (score_of); any other is named in a warning.
    with (
        caplog.at_level(logging.WARNING, logger="tiergate.gateway"),
        _cascading(tmp_path, fake, scripted, fitted_on=fitted_on, scorer=_ScoresAs()) as server,
    ):
        assert server.gateway.scorer.version == "keyword-test-1"
    named = f"fitted on {fitted_on}'s score, the scorer is keyword-test-1" in caplog.text
    assert named is warned


def test_a_local_server_s_error_is_stored_redacted_in_the_cascade_record(
    tmp_path: Path, fake: FakeProvider
) -> None:
    # Personal data sent to a cascade whose external llama.cpp server fails, repeating the
    # prompt in its error: the request escalates, and the record's ``local_error`` kept the
    # server's words whole, where its log line redacts them.
    pii_rule = "    route: local\n    local_only: true\n"
    policy = _cascade_yaml(fake, CASCADE_POLICY)
    assert pii_rule in policy
    policy = policy.replace(pii_rule, "    route: cascade\n    store_prompts: redacted\n")
    echo = {"error": {"message": "cannot read jane.doe@example.com's question"}}
    with (
        FakeProvider() as local,
        live(
            tmp_path,
            policy,
            local_backend="openai_http",
            local_base_url=local.base_url,
            cascade_model_path=_confidence_model(tmp_path),
        ) as server,
    ):
        local.reset(Behaviour(mode="status", status=500, error_body=echo))
        response = _ask(server, "Write to jane.doe@example.com")
        record = _record(server, response.headers["x-request-id"])
    assert response.status_code == 200, response.text
    assert response.headers["x-tiergate-rule"] == "pii-stays-local"
    assert record["cascade"]["reason"] == "local_failed"
    assert "[EMAIL]" in record["cascade"]["local_error"]
    assert "jane.doe" not in json.dumps(record)
