"""Cooling down closed models that keep failing (router.cooldown), alone and in the gateway."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Collection, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from router.api import readiness
from router.cooldown import MAX_COOLDOWN_S, Cooldowns
from router.errors import (
    BackendError,
    UpstreamAuthError,
    UpstreamBadRequestError,
    UpstreamOverloadedError,
    UpstreamRateLimitedError,
    UpstreamTimeoutError,
)
from router.outcomes_redis import RedisOutcomeStore
from router.services import services
from tests.conftest import LiveServer, free_port, live, policy_yaml, silent_server, wait_for
from tests.fake_provider import Behaviour, FakeProvider
from tests.redis_server import RedisServer, redis_binary


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_failures_in_a_row_cool_a_model_and_an_answer_ends_it() -> None:
    clock = Clock()
    cool = Cooldowns(after_fails=3, cooldown_s=30, clock=clock)
    assert cool.failed("gpt", UpstreamTimeoutError("slow")) is None
    assert cool.failed("gpt", BackendError("500")) is None
    assert cool.failed("gpt", BackendError("unreachable", code="upstream_unreachable")) == 30
    assert cool.left("gpt") == 30 and cool.left("claude") == 0
    assert cool.status() == {
        "gpt": {
            "seconds_left": 30.0,
            "reason": "upstream_unreachable",
            "failures": 3,
            "started_here": True,
            "probing": False,
        }
    }
    assert cool.failed("gpt", BackendError("500")) is None  # while cooling: no new cooldown
    clock.now += 31
    assert cool.left("gpt") == 0 and cool.status() == {}
    # The probe after the cooldown fails: another cooldown at once.
    assert cool.failed("gpt", BackendError("500")) == 30
    cool.succeeded("gpt")
    assert cool.left("gpt") == 0
    assert cool.failed("gpt", BackendError("500")) is None  # the count starts again


def test_a_429_cools_for_its_retry_after_within_bounds() -> None:
    clock = Clock()
    cool = Cooldowns(after_fails=3, cooldown_s=30, clock=clock)
    assert cool.failed("a", UpstreamRateLimitedError("429", retry_after=20)) == 20
    assert cool.failed("b", UpstreamRateLimitedError("429", retry_after=86400)) == MAX_COOLDOWN_S
    assert cool.failed("c", UpstreamRateLimitedError("429")) == 30


def test_an_overloaded_provider_cools_at_once_for_the_retry_after_it_sent() -> None:
    """An overload (503, 529) with a Retry-After asks to be spared, as a 429 does; without
    one it is a failure in a row like any 5xx."""
    clock = Clock()
    cool = Cooldowns(after_fails=3, cooldown_s=30, clock=clock)
    assert cool.failed("a", UpstreamOverloadedError("529", retry_after=12)) == 12
    assert cool.failed("b", UpstreamOverloadedError("503", retry_after=9999)) == MAX_COOLDOWN_S
    assert cool.failed("c", UpstreamOverloadedError("503")) is None
    assert cool.failed("c", UpstreamOverloadedError("503")) is None
    assert cool.failed("c", UpstreamOverloadedError("503")) == 30
    assert cool.status()["a"]["reason"] == "upstream_overloaded"


@pytest.mark.parametrize(
    "error",
    [
        UpstreamBadRequestError("400: the request's fault"),
        UpstreamAuthError("401: Tiergate's key"),
        BackendError("too long", code="context_length_exceeded"),
    ],
)
def test_failures_a_later_call_would_meet_again_do_not_cool(error: BackendError) -> None:
    if error.code == "context_length_exceeded":
        error.retryable = False
    cool = Cooldowns(after_fails=1, cooldown_s=30, clock=Clock())
    assert cool.failed("gpt", error) is None and cool.left("gpt") == 0


def test_cooldown_s_zero_turns_it_off() -> None:
    cool = Cooldowns(after_fails=1, cooldown_s=0, clock=Clock())
    assert cool.failed("gpt", UpstreamRateLimitedError("429", retry_after=5)) is None


def test_one_call_at_a_time_probes_a_model_whose_cooldown_lapsed() -> None:
    """Once gpt's cooldown lapses, the first call to it is the probe: while it is out, the
    others pass gpt over as if it still cooled (for the probe's bound at most: the call's own
    timeout), and a call made anyway (pinned) is no second probe. A probe that ends saying
    nothing of gpt lets the next call probe; one past its bound too, and its late end then
    leaves the new probe alone. A probe's failure cools at once, even after a 429's cooldown
    that counted one failure of three; its success ends the cooling."""
    clock = Clock()
    cool = Cooldowns(after_fails=3, cooldown_s=30, clock=clock)
    assert cool.calling("gpt", 10) == 0  # never cooled: no probe
    assert cool.failed("gpt", UpstreamRateLimitedError("429", retry_after=20)) == 20
    assert cool.calling("gpt", 10) == 0  # cooling: a pinned call, no probe
    clock.now += 21
    assert cool.left("gpt") == 0 and not cool.probing("gpt")
    probe = cool.calling("gpt", 10)
    assert probe and cool.probing("gpt") and cool.left("gpt") == 10
    assert cool.status()["gpt"] == {
        "seconds_left": 10.0,
        "reason": "upstream_rate_limited",
        "failures": 1,
        "started_here": True,
        "probing": True,
    }
    assert cool.calling("gpt", 10) == 0  # the others' calls: none is a probe
    cool.released("gpt", probe)  # the probe's request was at fault, or its client left
    assert cool.left("gpt") == 0 and cool.status() == {}
    late = cool.calling("gpt", 10)
    clock.now += 10  # the probe never ended: past its bound, the next call probes
    assert cool.left("gpt") == 0
    probe = cool.calling("gpt", 10)
    assert probe and probe != late
    cool.released("gpt", late)
    assert cool.left("gpt") == 10
    assert cool.failed("gpt", UpstreamTimeoutError("slow")) == 30  # 2 of 3 failures: cools
    assert cool.left("gpt") == 30 and not cool.probing("gpt")
    clock.now += 31
    assert cool.calling("gpt", 10)
    cool.succeeded("gpt")
    assert cool.left("gpt") == 0 and cool.calling("gpt", 10) == 0 and cool.status() == {}


def test_a_failing_provider_is_passed_over_while_it_cools(
    tmp_path: Path, fake: FakeProvider
) -> None:
    """gpt-4o answers 500, claude works. After two failed calls in a row gpt-4o cools: the next
    request goes straight to claude instead of waiting on gpt-4o first. A request pinned to
    gpt-4o still calls it (a cooldown alone never fails a request); once the cooldown is over,
    the next request tries gpt-4o again."""
    fake.reset(Behaviour(mode="status", status=500, failing_path="/chat/completions"))
    policy = policy_yaml(fake, on_failure="closed")
    body = {"model": "auto", "messages": [{"role": "user", "content": "HARD"}]}
    with live(tmp_path, policy, cooldown_after_fails=2, cooldown_s=30) as srv:
        clock = Clock()
        srv.gateway.cooldowns._clock = clock
        for _ in range(2):
            answer = srv.http.post("/v1/chat/completions", json=body)
            assert answer.status_code == 200 and answer.headers["x-tiergate-model"] == "claude"
        assert [r.path for r in fake.received] == ["/v1/chat/completions", "/v1/messages"] * 2
        ready = readiness(services(srv.app))["closed"]
        _passes_gpt_over(srv, fake, body)
        pinned = srv.http.post("/v1/chat/completions", json={**body, "model": "gpt-4o"})
        assert pinned.status_code == 502
        assert [r.path for r in fake.received] == ["/v1/messages", "/v1/chat/completions"]
        fake.reset()  # gpt-4o heals
        clock.now += 31
        answer = srv.http.post("/v1/chat/completions", json=body)
        assert answer.headers["x-tiergate-model"] == "gpt-4o"
        assert srv.gateway.cooldowns.status() == {}
        metrics = srv.http.get("/metrics").text
    assert ready["gpt-4o"]["cooldown"] == {
        "seconds_left": 30.0,
        "reason": "upstream_error",
        "failures": 2,
        "started_here": True,
        "probing": False,
    }
    assert ready["claude"]["cooldown"] is None
    cooled = [line for line in metrics.splitlines() if line.startswith("tiergate_cooldowns_total")]
    assert len(cooled) == 1 and cooled[0].endswith(" 1.0")
    assert 'error_type="upstream_error"' in cooled[0] and 'model="gpt-4o"' in cooled[0]


def _calls(fake: FakeProvider, path: str = "/chat/completions") -> int:
    """The calls the fake provider received to paths ending in ``path`` (gpt-4o's)."""
    return sum(r.path.endswith(path) for r in fake.received)


def test_while_one_request_probes_a_hanging_model_the_others_go_to_its_fallback(
    tmp_path: Path, fake: FakeProvider
) -> None:
    """gpt-4o hangs, claude answers. When gpt-4o's cooldown lapsed, every request that came
    next called it and waited its timeout before claude answered: with many in flight on a
    provider that still hung, each of them, once per lapse. Now six requests at once call it
    once: one probes it, the others go straight to claude while it is out, and so does one
    sent after them; /readyz says gpt-4o is being probed. A request pinned to gpt-4o still
    calls it. The probe times out: gpt-4o cools again at once. After the next lapse gpt-4o
    has healed: the probe answers, which ends the cooling."""
    fake.reset(Behaviour(mode="stall", stall_s=60, failing_path="/chat/completions"))
    body = {"model": "auto", "messages": [{"role": "user", "content": "HARD"}]}
    policy = policy_yaml(fake, on_failure="closed")
    timeout = 4.0  # the calls to the hanging gpt-4o, and so the probe's bound
    with (
        live(
            tmp_path, policy, cooldown_after_fails=1, cooldown_s=30, closed_timeout_s=timeout
        ) as srv,
        ThreadPoolExecutor(7) as pool,
    ):
        clock = Clock()
        srv.gateway.cooldowns._clock = clock
        first = srv.http.post("/v1/chat/completions", json=body)
        assert first.headers["x-tiergate-model"] == "claude"
        assert srv.gateway.cooldowns.left("gpt-4o") == 30
        clock.now += 31
        fake.received.clear()
        burst = [pool.submit(srv.http.post, "/v1/chat/completions", json=body) for _ in range(6)]
        assert wait_for(lambda: sum(f.done() for f in burst) >= 5, timeout_s=10)
        ready = readiness(services(srv.app))["closed"]["gpt-4o"]["cooldown"]
        assert _calls(fake) == 1
        answer = srv.http.post("/v1/chat/completions", json=body)
        assert answer.status_code == 200 and answer.headers["x-tiergate-model"] == "claude"
        assert _calls(fake) == 1
        pinned = pool.submit(
            srv.http.post, "/v1/chat/completions", json={**body, "model": "gpt-4o"}
        )
        assert wait_for(lambda: _calls(fake) == 2, timeout_s=5)
        answers = [f.result(timeout=30) for f in burst]
        assert [(a.status_code, a.headers["x-tiergate-model"]) for a in answers] == [
            (200, "claude")
        ] * 6
        assert pinned.result(timeout=30).status_code == 504
        assert srv.gateway.cooldowns.left("gpt-4o") == 30  # the probe failed: cooling again
        assert not srv.gateway.cooldowns.probing("gpt-4o")
        fake.reset()  # gpt-4o heals
        clock.now += 31
        for _ in range(2):
            answer = srv.http.post("/v1/chat/completions", json=body)
            assert answer.headers["x-tiergate-model"] == "gpt-4o"
        assert srv.gateway.cooldowns.status() == {}
    assert ready == {
        "seconds_left": timeout,
        "reason": "upstream_timeout",
        "failures": 1,
        "started_here": True,
        "probing": True,
    }


def test_late_timeouts_of_calls_sent_before_a_cooldown_leave_the_healed_model_alone(
    tmp_path: Path, fake: FakeProvider
) -> None:
    """gpt-4o hangs; four requests call it, two of them a moment after the others. The first
    two time out and cool it (two failures in a row); the cooldown lapses, gpt-4o heals and
    the probe answers, which ends the cooling. Then the other two time out: sent before the
    cooldown began, they counted as two new failures in a row and cooled the healed gpt-4o
    again, sending every request to claude for 30 s. They say nothing the cooldown did not:
    gpt-4o keeps answering."""
    body = {"model": "auto", "messages": [{"role": "user", "content": "HARD"}]}
    timeout = 6.0  # the late pair times out 2 s after the first: the probe answers between

    def ask() -> str:
        answer = srv.http.post("/v1/chat/completions", json=body)
        assert answer.status_code == 200, answer.text
        return str(answer.headers["x-tiergate-model"])

    with (
        live(
            tmp_path,
            policy_yaml(fake, on_failure="closed"),
            cooldown_after_fails=2,
            cooldown_s=30,
            closed_timeout_s=timeout,
        ) as srv,
        ThreadPoolExecutor(4) as pool,
    ):
        for model in ("gpt-4o", "claude"):  # litellm's first call to each imports a lot
            assert srv.http.post("/v1/chat/completions", json={**body, "model": model}).is_success
        fake.reset(Behaviour(mode="stall", stall_s=60, failing_path="/chat/completions"))
        clock = Clock()
        cooldowns = srv.gateway.cooldowns
        cooldowns._clock = clock
        first = [pool.submit(ask) for _ in range(2)]
        assert wait_for(lambda: _calls(fake) == 2, timeout_s=5)
        time.sleep(2.0)
        late = [pool.submit(ask) for _ in range(2)]
        assert wait_for(lambda: _calls(fake) == 4, timeout_s=3)  # all four before the cooldown
        assert wait_for(lambda: cooldowns.left("gpt-4o") == 30, timeout_s=10)
        clock.now += 31
        fake.behaviour = Behaviour()  # gpt-4o heals; the two calls it holds still hang
        assert ask() == "gpt-4o" and cooldowns.status() == {}
        assert not any(f.done() for f in late)
        assert [f.result(timeout=30) for f in (*first, *late)] == ["claude"] * 4
        assert cooldowns.status() == {}
        assert ask() == "gpt-4o"
        fake.unstall()


def test_a_probe_that_answers_frees_the_model_and_succeeds_only_at_its_end() -> None:
    """A probe with its first token (a stream's) frees gpt: the other calls go to it, none a
    probe, even past the probe's bound. Its success waits for its end: a failure meanwhile
    cools at once (after a 429 that counted one failure of three), and the next lapse has a
    probe again; a success ends the cooling, and the failures count from none."""
    clock = Clock()
    cool = Cooldowns(after_fails=3, cooldown_s=30, clock=clock)
    assert cool.failed("gpt", UpstreamRateLimitedError("429", retry_after=20)) == 20
    clock.now += 21
    probe = cool.calling("gpt", 10)
    cool.answering("gpt", 0.0)  # a call that holds no probe frees nothing
    assert probe and cool.probing("gpt")
    cool.answering("gpt", probe)
    assert not cool.probing("gpt") and cool.left("gpt") == 0 and cool.status() == {}
    assert cool.calling("gpt", 10) == 0
    clock.now += 11
    assert cool.calling("gpt", 10) == 0 and cool.left("gpt") == 0
    cool.released("gpt", probe)  # a no-op once it answered
    assert cool.failed("gpt", UpstreamTimeoutError("cut")) == 30
    assert cool.left("gpt") == 30 and cool.calling("gpt", 10) == 0
    clock.now += 31
    probe = cool.calling("gpt", 10)
    assert probe and cool.calling("gpt", 10) == 0
    cool.answering("gpt", probe)
    cool.succeeded("gpt")
    assert cool.status() == {} and cool.calling("gpt", 10) == 0
    assert cool.failed("gpt", UpstreamTimeoutError("slow")) is None


def test_failures_of_calls_sent_before_a_change_say_nothing_new() -> None:
    """Ten calls to a hanging gpt time out one a second. The third cooled it; the other seven,
    sent before the cooldown began, each pushed its end a second further. Once it lapsed, a
    late one failed the probe's model at once (a restart, and the probe's answer lost), and
    after the probe answered, three of them cooled the healed gpt again. A failure counts
    only if its call began after gpt's last change (a cooldown that began; the call whose
    answer ended it, from its start); the probe's own failure, and any later call's, still
    count; the provider's own 429, when it comes, still cools."""
    clock = Clock()
    cool = Cooldowns(after_fails=3, cooldown_s=30, clock=clock)
    sent = cool.changes  # the ten calls began together
    started = []
    for _ in range(10):
        clock.now += 1
        started.append(cool.failed("gpt", UpstreamTimeoutError("slow"), since=sent))
    assert started == [None, None, 30, *[None] * 7]
    assert cool.left("gpt") == 23  # 30 s from the third failure, not from the tenth
    assert cool.status()["gpt"]["failures"] == 3
    clock.now += 23
    probe = cool.calling("gpt", 10)
    began = cool.changes
    assert probe and cool.failed("gpt", UpstreamTimeoutError("late"), since=sent) is None
    assert cool.probing("gpt") and cool.left("gpt") == 10
    cool.answering("gpt", probe)  # a stream probe's first token
    assert cool.failed("gpt", UpstreamTimeoutError("late"), since=sent) is None
    assert cool.left("gpt") == 0 and cool.calling("gpt", 10) == 0
    cool.succeeded("gpt", since=began)
    for _ in range(3):
        assert cool.failed("gpt", UpstreamTimeoutError("late"), since=sent) is None
    assert cool.left("gpt") == 0 and cool.status() == {}
    assert cool.failed("gpt", UpstreamRateLimitedError("429", retry_after=20), since=sent) == 20
    # The probe's own failure, after its first token: it began at the change, so it counts.
    clock.now += 21
    probe = cool.calling("gpt", 10)
    began = cool.changes
    cool.answering("gpt", probe)
    assert cool.failed("gpt", BackendError("cut"), since=began) == 30
    # A call sent after the last change counts as ever: three in a row cool a healed model.
    cool.succeeded("gpt")
    now = cool.changes
    assert [cool.failed("gpt", BackendError("500"), since=now) for _ in range(3)] == [
        None,
        None,
        30,
    ]


def test_a_failure_sent_before_another_replica_s_cooldown_is_not_shared() -> None:
    """Another replica cools gpt; calls this replica sent before it saw that cooldown time out
    one after another. Each started a cooldown here, published (a new mark) to every replica,
    so stale failures on one replica kept gpt cooled on all of them. They count no more; a
    call sent once the cooldown was seen (pinned) still extends it and shares it."""
    board = Board()
    clock = Clock()
    cool = Cooldowns(after_fails=3, cooldown_s=30, clock=clock, shared=board)
    sent = cool.changes
    board.seen["gpt"] = ("upstream_timeout|other", 20.0)
    assert cool.left("gpt") == 20.0
    for _ in range(3):
        assert cool.failed("gpt", UpstreamTimeoutError("slow"), since=sent) is None
    assert board.published == [] and cool.status()["gpt"]["started_here"] is False
    pinned = cool.changes
    assert cool.left("gpt") == 20.0 and cool.changes == pinned  # the same cooldown: no change
    assert cool.failed("gpt", UpstreamTimeoutError("slow"), since=pinned) is None
    [(name, seconds, _)] = board.published
    assert (name, seconds) == ("gpt", 30)


@contextlib.contextmanager
def _probe_due(
    tmp_path: Path, fake: FakeProvider, **settings: float
) -> Iterator[tuple[LiveServer, Clock]]:
    """A Tiergate whose gpt-4o cooled after a 429 (``cooldown_after_fails`` 3: only the 429,
    or a failure after the cooldown, cools at once) and whose cooldown lapsed on a fake clock:
    the next call to gpt-4o is the probe."""
    fake.reset(Behaviour(mode="rate_limit", retry_after=20))
    with live(tmp_path, policy_yaml(fake, on_failure="closed"), **settings) as srv:
        clock = Clock()
        srv.gateway.cooldowns._clock = clock
        assert srv.http.post("/v1/chat/completions", json=_HARD).status_code == 429
        assert srv.gateway.cooldowns.left("gpt-4o") == 20
        clock.now += 21
        yield srv, clock


_HARD = {"model": "gpt-4o", "messages": [{"role": "user", "content": "HARD"}]}


def _streamed(server: LiveServer, body: dict[str, object]) -> tuple[int, str, str]:
    with server.http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        return r.status_code, r.headers["x-tiergate-model"], r.read().decode()


def test_a_stream_that_began_before_a_429_does_not_lift_its_cooldown(
    tmp_path: Path, fake: FakeProvider
) -> None:
    """A long stream from gpt-4o is under way when another request gets gpt-4o's 429 with
    ``Retry-After: 20``. The stream then ends whole: a success, which ended the cooldown, so
    the next requests went to the provider that had asked to be spared for 20 s. Its call
    began before the 429, and says nothing of it, as its failure would not have counted."""
    words = " ".join(f"w{i}" for i in range(30))
    with (
        live(tmp_path, policy_yaml(fake, on_failure="closed"), cooldown_after_fails=3) as srv,
        ThreadPoolExecutor(1) as pool,
    ):
        for model in ("gpt-4o", "claude"):  # litellm's first call to each imports a lot
            assert srv.http.post("/v1/chat/completions", json={**_HARD, "model": model}).is_success
        cooldowns = srv.gateway.cooldowns
        cooldowns._clock = Clock()  # 20 s left, whatever the machine's pace
        fake.reset(Behaviour(text=words, chunk_delay_s=0.1))
        stream = pool.submit(_streamed, srv, _HARD)
        assert wait_for(lambda: fake.sent_chunks > 3, timeout_s=10)
        fake.behaviour = Behaviour(mode="rate_limit", retry_after=20, chunk_delay_s=0.1)
        assert srv.http.post("/v1/chat/completions", json=_HARD).status_code == 429
        assert cooldowns.left("gpt-4o") == 20
        fake.behaviour = Behaviour(text=words, chunk_delay_s=0.1)
        status, model, text = stream.result(timeout=30)
        assert (status, model) == (200, "gpt-4o") and text.rstrip().endswith("data: [DONE]")
        assert cooldowns.left("gpt-4o") == 20
        _passes_gpt_over(srv, fake, {**_HARD, "model": "auto"})


def test_a_stream_probe_frees_the_model_at_its_first_token(
    tmp_path: Path, fake: FakeProvider
) -> None:
    """After gpt-4o's cooldown lapsed, a long stream is its probe. It held the probe until it
    ended whole, so every other request went to claude for the whole answer (minutes, for a
    long one) though gpt-4o answered again. Once it has sent its first token, the next request
    goes to gpt-4o; the cooling ends when the stream ended whole."""
    words = " ".join(f"w{i}" for i in range(40))
    body = {**_HARD, "model": "auto"}
    with (
        _probe_due(tmp_path, fake, cooldown_after_fails=3) as (srv, _),
        ThreadPoolExecutor(1) as pool,
    ):
        fake.reset(Behaviour(text=words, chunk_delay_s=0.1))  # gpt-4o heals, streams slowly
        probe = pool.submit(_streamed, srv, body)
        assert wait_for(lambda: fake.sent_chunks > 3, timeout_s=10)
        answer = srv.http.post("/v1/chat/completions", json=body)
        during = fake.sent_chunks
        assert answer.headers["x-tiergate-model"] == "gpt-4o"
        assert not probe.done() and srv.gateway.cooldowns.status() == {}
        status, model, text = probe.result(timeout=30)
    assert during < 40  # the answer came while the probe streamed
    assert (status, model) == (200, "gpt-4o") and text.rstrip().endswith("data: [DONE]")


def test_a_stream_probe_cut_after_its_first_words_cools_the_model_again(
    tmp_path: Path, fake: FakeProvider
) -> None:
    """The probe frees gpt-4o at its first token, but a stream cut after its first words is
    no success: it is the failure after a cooldown, which cools at once (one failure of
    three after the 429's)."""
    with _probe_due(tmp_path, fake, cooldown_after_fails=3) as (srv, _):
        fake.reset(Behaviour(mode="reset_mid_stream", chunk_delay_s=0.1))
        status, model, text = _streamed(srv, _HARD)
        assert (status, model) == (200, "gpt-4o") and "error" in text
        assert srv.gateway.cooldowns.left("gpt-4o") == 30
        assert srv.gateway.cooldowns.status()["gpt-4o"]["reason"] == "upstream_unreachable"
        _passes_gpt_over(srv, fake, {**_HARD, "model": "auto"})


def test_a_stream_probe_without_a_first_token_holds_the_model_until_its_bound(
    tmp_path: Path, fake: FakeProvider
) -> None:
    """A stream probe to a gpt-4o that hangs before its first token holds the probe: the other
    requests go to claude until its bound (the call's timeout) has passed; it then times out,
    falls back to claude, and gpt-4o cools again at once."""
    with (
        _probe_due(tmp_path, fake, cooldown_after_fails=3, closed_timeout_s=2.0) as (srv, clock),
        ThreadPoolExecutor(1) as pool,
    ):
        fake.reset(Behaviour(mode="stall", stall_s=60, failing_path="/chat/completions"))
        probe = pool.submit(_streamed, srv, {**_HARD, "model": "auto"})
        cooldowns = srv.gateway.cooldowns
        assert wait_for(lambda: cooldowns.probing("gpt-4o"), timeout_s=10)
        _passes_gpt_over(srv, fake, {**_HARD, "model": "auto"})
        assert cooldowns.left("gpt-4o") == 2.0
        clock.now += 2.0  # the bound
        assert cooldowns.left("gpt-4o") == 0 and not cooldowns.probing("gpt-4o")
        status, model, _ = probe.result(timeout=30)
        fake.unstall()
    assert (status, model) == (200, "claude")
    assert cooldowns.left("gpt-4o") == 30


def _passes_gpt_over(server: LiveServer, fake: FakeProvider, body: dict[str, object]) -> None:
    """``body`` (routed to gpt-4o) goes straight to claude: gpt-4o, cooling, is not called."""
    fake.received.clear()
    answer = server.http.post("/v1/chat/completions", json=body)
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-tiergate-model"] == "claude"
    assert answer.headers["x-tiergate-fallback"] == "closed->closed"
    assert [r.path for r in fake.received] == ["/v1/messages"]


def test_a_cooling_model_is_called_when_the_rest_of_its_chain_refuses_the_request(
    tmp_path: Path, fake: FakeProvider
) -> None:
    """gpt-4o cools after failing; then it heals, and a request with ``n: 2`` comes, which only
    gpt-4o can take (litellm refuses ``n`` for claude before any call). gpt-4o was passed over
    for claude, whose refusal was the answer: a 400 "claude does not take 'n'" to a client that
    sent ``model: auto``, which the OpenAI SDKs do not retry, for as long as gpt-4o cooled.
    Nothing in the chain could serve it instead, so gpt-4o is called after all and answers."""
    fake.reset(Behaviour(mode="status", status=500, failing_path="/chat/completions"))
    hard = {"model": "auto", "messages": [{"role": "user", "content": "HARD"}]}
    with live(tmp_path, policy_yaml(fake, on_failure="closed"), cooldown_after_fails=2) as srv:
        for _ in range(2):
            assert srv.http.post("/v1/chat/completions", json=hard).status_code == 200
        assert srv.gateway.cooldowns.left("gpt-4o") > 0
        fake.reset()
        for stream in (False, True):
            answer = srv.http.post("/v1/chat/completions", json={**hard, "n": 2, "stream": stream})
            assert answer.status_code == 200, answer.text
            assert answer.headers["x-tiergate-model"] == "gpt-4o"
            assert "x-tiergate-fallback" not in answer.headers
        assert [(r.path, r.body["n"]) for r in fake.received] == [("/v1/chat/completions", 2)] * 2
        assert srv.gateway.cooldowns.left("gpt-4o") == 0  # its answer ended the cooldown
        # While a model after it can take the request, the cooling model is still passed over.
        fake.reset(Behaviour(mode="status", status=500, failing_path="/chat/completions"))
        for _ in range(2):
            srv.http.post("/v1/chat/completions", json=hard)
        fake.received.clear()
        answer = srv.http.post("/v1/chat/completions", json=hard)
        assert answer.headers["x-tiergate-model"] == "claude"
        assert [r.path for r in fake.received] == ["/v1/messages"]


#: Requests litellm cannot send to an Anthropic model, which it refused before sending anything,
#: reporting each as ``APIConnectionError``, and the 400 each now gets (code, words): a content
#: part of a type litellm takes for no provider (its message check raised a bare ``Exception``,
#: "Invalid user message at index 0"; now refused before litellm is called), and an OpenAI
#: ``custom`` tool (free-form input, which Anthropic has no form of: a ``KeyError`` on its
#: ``function`` translating it).
UNTRANSLATABLE = {
    "unknown-part": (
        {"messages": [{"role": "user", "content": [{"type": "video", "url": "x"}]}]},
        "unsupported_parameter",
        "claude cannot take a user content part of type 'video'",
    ),
    "custom-tool": (
        {
            "messages": [{"role": "user", "content": "HARD"}],
            "tools": [{"type": "custom", "custom": {"name": "run_sql"}}],
        },
        "invalid_request",
        "claude cannot take the request: litellm cannot translate it",
    ),
}


@pytest.mark.parametrize("shape", sorted(UNTRANSLATABLE))
def test_a_request_litellm_cannot_translate_does_not_cool_its_model(
    tmp_path: Path, fake: FakeProvider, shape: str
) -> None:
    """A request litellm cannot translate for claude fails before anything is sent, and litellm
    calls that a connection error. The unknown part was a 502 ``upstream_unreachable`` that
    counted as claude failing, so three such requests from one tenant (one OpenAI SDK call,
    with its two retries of the 502) cooled claude for every tenant; the custom tool, which
    litellm fails on the same way, a 502 that SDKs retry to the same end. Both are the
    request's fault: the chain still tries gpt-4o, claude does not cool, and pinned to claude
    the client gets a 400 that says why, with nothing sent to the provider. A connection
    refused is still a 502 ``upstream_unreachable`` that cools the model."""
    fake.reset()
    policy = policy_yaml(fake, on_failure="closed").replace(
        "closed_models: [gpt-4o, claude]", "closed_models: [claude, gpt-4o]"
    )
    hard = {"model": "auto", "messages": [{"role": "user", "content": "HARD"}]}
    shaped, code, words = UNTRANSLATABLE[shape]
    tripping = {**hard, **shaped}
    with live(tmp_path, policy, cooldown_after_fails=3, cooldown_s=30) as srv:
        for _ in range(3):
            answer = srv.http.post("/v1/chat/completions", json=tripping)
            assert answer.status_code == 200 and answer.headers["x-tiergate-model"] == "gpt-4o"
        assert [r.path for r in fake.received] == ["/v1/chat/completions"] * 3
        assert srv.gateway.cooldowns.status() == {}
        fake.received.clear()
        victim = srv.http.post("/v1/chat/completions", json=hard)
        assert victim.status_code == 200 and victim.headers["x-tiergate-model"] == "claude"
        assert [r.path for r in fake.received] == ["/v1/messages"]
        fake.received.clear()
        for stream in (False, True):
            pinned = srv.http.post(
                "/v1/chat/completions", json={**tripping, "model": "claude", "stream": stream}
            )
            assert pinned.status_code == 400, pinned.text
            error = pinned.json()["error"]
            assert (error["type"], error["code"]) == ("invalid_request_error", code)
            assert words in error["message"]
        assert fake.received == [] and srv.gateway.cooldowns.status() == {}
    dead = policy.replace(
        f"api_base: {fake.base_url.removesuffix('/v1')}\n",
        f"api_base: http://127.0.0.1:{free_port()}\n",
    )
    with live(tmp_path, dead, cooldown_after_fails=1, cooldown_s=30) as srv:
        refused = srv.http.post("/v1/chat/completions", json={**hard, "model": "claude"})
        assert refused.status_code == 502, refused.text
        assert refused.json()["error"]["code"] == "upstream_unreachable"
        assert srv.gateway.cooldowns.left("claude") > 0


#: OpenAI's answer to one request larger than the organization's tokens-per-minute limit: a 429
#: that every retry of the same request meets again.
TOO_LARGE = {
    "error": {
        "message": "Request too large for gpt-4o in organization org-x on tokens per min (TPM): "
        "Limit 8000, Requested 8978. The input or output tokens must be reduced in order to "
        "run successfully.",
        "type": "tokens",
        "param": None,
        "code": "rate_limit_exceeded",
    }
}


def test_a_request_over_the_providers_token_limit_does_not_cool_its_model(
    tmp_path: Path, fake: FakeProvider
) -> None:
    """OpenAI answers a single request over the organization's tokens-per-minute limit
    (``max_tokens: 8192``) with a 429 "Request too large". As a 429 it cooled gpt-4o at once,
    so one tenant's one request sent every tenant's requests to claude for 30 s. It still
    falls back, but does not cool; alone it is a 429 a retry cannot fix."""
    fake.reset(
        Behaviour(mode="status", status=429, failing_path="/chat/completions", error_body=TOO_LARGE)
    )
    hard = {"model": "auto", "messages": [{"role": "user", "content": "HARD"}]}
    with live(tmp_path, policy_yaml(fake, on_failure="closed")) as srv:
        answer = srv.http.post("/v1/chat/completions", json={**hard, "max_tokens": 8192})
        assert answer.status_code == 200 and answer.headers["x-tiergate-model"] == "claude"
        assert srv.gateway.cooldowns.status() == {}
        pinned = srv.http.post(
            "/v1/chat/completions", json={**hard, "model": "gpt-4o", "max_tokens": 8192}
        )
        assert pinned.status_code == 429, pinned.text
        assert pinned.headers["x-should-retry"] == "false"
        assert "Request too large" in pinned.json()["error"]["message"]
        fake.reset()
        victim = srv.http.post("/v1/chat/completions", json=hard)
        assert victim.status_code == 200 and victim.headers["x-tiergate-model"] == "gpt-4o"


@pytest.mark.parametrize("server", ["hung", "dead"])
def test_an_external_local_server_that_keeps_failing_cools_down(
    tmp_path: Path, fake: FakeProvider, server: str
) -> None:
    """An external llama.cpp server that hangs (accepts, never answers) or is gone (nothing
    listens) cost every request routed to it its wait (a hung one: TIERGATE_LOCAL_TIMEOUT_S,
    300 s by default) before the closed fallback answered: only closed models cooled. After
    two failures in a row it cools as they do: the next request goes to gpt-4o at once
    without calling it, /readyz and the metrics say so; a local-only request still calls it,
    and so does the first request after the cooldown (the probe)."""
    fake.reset()
    easy = {"model": "auto", "messages": [{"role": "user", "content": "hi"}]}
    with contextlib.ExitStack() as stack:
        if server == "hung":
            root, accepted = stack.enter_context(silent_server())
            url = f"{root}/v1"
        else:
            url, accepted = f"http://127.0.0.1:{free_port()}/v1", []
        srv = stack.enter_context(
            live(
                tmp_path,
                policy_yaml(fake, on_failure="closed"),
                local_backend="openai_http",
                local_base_url=url,
                local_timeout_s=0.5,
                cooldown_after_fails=2,
                cooldown_s=30,
            )
        )
        clock = Clock()
        srv.gateway.cooldowns._clock = clock
        for _ in range(2):
            answer = srv.http.post("/v1/chat/completions", json=easy)
            assert answer.status_code == 200 and answer.headers["x-tiergate-tier"] == "closed"
        ready = readiness(services(srv.app))["local"]
        started = time.perf_counter()
        cooled = srv.http.post("/v1/chat/completions", json=easy)
        elapsed = time.perf_counter() - started
        assert cooled.status_code == 200, cooled.text
        assert cooled.headers["x-tiergate-model"] == "gpt-4o"
        assert elapsed < 0.5  # not the local timeout: the server was not called
        assert srv.gateway.cooldowns.left("local") == 30
        called = len(accepted)
        if server == "hung":  # nothing after the local model: it is called, and times out
            private = {"model": "auto", "messages": [{"role": "user", "content": "PII"}]}
            assert srv.http.post("/v1/chat/completions", json=private).status_code == 504
            assert len(accepted) == called + 1
        clock.now += 31
        probe = srv.http.post("/v1/chat/completions", json=easy)
        assert probe.status_code == 200 and srv.gateway.cooldowns.left("local") == 30
        metrics = srv.http.get("/metrics").text
    reason = "upstream_timeout" if server == "hung" else "upstream_unreachable"
    assert ready["cooldown"] == {
        "seconds_left": 30.0,
        "reason": reason,
        "failures": 2,
        "started_here": True,
        "probing": False,
    }
    assert called == (2 if server == "hung" else 0)
    failed = [m for m in metrics.splitlines() if m.startswith("tiergate_upstream_failures_total")]
    assert [m.rsplit(" ", 1)[1] for m in failed if 'model="local"' in m] == [
        "4.0" if server == "hung" else "3.0"
    ]
    cooldowns = [m for m in metrics.splitlines() if m.startswith("tiergate_cooldowns_total")]
    assert len(cooldowns) == 1 and 'model="local"' in cooldowns[0]
    assert cooldowns[0].endswith(" 2.0")


class Board:
    """The other replicas' cooldowns as a store would show them (SharedCooldowns)."""

    def __init__(self) -> None:
        self.seen: dict[str, tuple[str, float]] = {}
        self.published: list[tuple[str, float, str]] = []

    def publish_cooldown(self, name: str, seconds: float, mark: str) -> None:
        self.published.append((name, seconds, mark))

    def share_cooldowns(self, names: Callable[[], Collection[str]]) -> None:
        pass

    def shared_cooldowns(self) -> dict[str, tuple[str, float]]:
        return self.seen

    def shared_cooldown(self, name: str) -> tuple[str, float] | None:
        return self.seen.get(name)


def test_a_shared_cooldown_cools_here_until_a_success_here_ends_it() -> None:
    """A cooldown another replica started cools the model here, and says so; this replica's
    own are published. A success here ends the shared one here only (the store keeps it for
    the others until it lapses); a later one, with a new mark, cools it again. The first
    failure here after a shared cooldown is a probe's."""
    board = Board()
    clock = Clock()
    cool = Cooldowns(after_fails=3, cooldown_s=30, clock=clock, shared=board)
    board.seen["gpt"] = ("upstream_rate_limited|other", 20.0)
    assert cool.left("gpt") == 20.0
    assert cool.status()["gpt"] == {
        "seconds_left": 20.0,
        "reason": "upstream_rate_limited",
        "failures": 0,
        "started_here": False,
        "probing": False,
    }
    cool.succeeded("gpt")
    assert cool.left("gpt") == 0 and cool.status() == {}
    board.seen["gpt"] = ("upstream_timeout|later", 30.0)
    assert cool.left("gpt") == 30.0
    assert cool.failed("claude", UpstreamRateLimitedError("429", retry_after=12)) == 12
    [(name, seconds, mark)] = board.published
    assert (name, seconds, mark.partition("|")[0]) == ("claude", 12, "upstream_rate_limited")
    board.seen["claude"] = (mark, 11.5)  # read back by the next refresh
    assert cool.status()["claude"]["started_here"] is True
    cool.succeeded("claude")
    assert cool.left("claude") == 0
    # A failure while another replica's cooldown lasts extends it, and starts none here; the
    # first failure after it is a probe's, which cools at once as after a cooldown of its own.
    board.seen["o1"] = ("upstream_timeout|other", 5.0)
    assert cool.left("o1") == 5.0
    assert cool.failed("o1", BackendError("500")) is None
    del board.seen["o1"]
    clock.now += 31
    assert cool.left("o1") == 0
    assert cool.failed("o1", BackendError("500")) == 30


def _replica(
    work: Path, fake: FakeProvider, redis_server: RedisServer, **settings: float
) -> Iterator[LiveServer]:
    """A replica whose outcomes (and so its cooldowns) live in ``redis_server``."""
    work.mkdir()
    return live(
        work,
        policy_yaml(fake, on_failure="closed"),
        outcomes=RedisOutcomeStore(redis_server.url, journal=work / "journal.jsonl"),
        **settings,
    )


def _rate_limit_gpt(fake: FakeProvider, retry_after: int) -> None:
    """gpt-4o answers 429 with ``retry_after``; claude answers."""
    fake.reset(
        Behaviour(
            mode="status",
            status=429,
            failing_path="/chat/completions",
            error_headers={"retry-after": str(retry_after)},
        )
    )


def _cooldowns_started(server: LiveServer) -> list[str]:
    metrics = server.http.get("/metrics").text
    return [m for m in metrics.splitlines() if m.startswith("tiergate_cooldowns_total")]


@pytest.mark.skipif(redis_binary() is None, reason="no redis-server binary")
def test_a_429_one_replica_sees_cools_the_model_on_every_replica(
    tmp_path: Path, fake: FakeProvider
) -> None:
    """gpt-4o answers replica A's call with a 429, Retry-After 20. Each replica cooled on its
    own, so replica B called gpt-4o too (N replicas, N times the calls it asked to be spared).
    Now A shares the cooldown through Redis: within B's refresh (a second) B passes gpt-4o
    over without calling it, and its /readyz shows the cooldown as another replica's; only
    A counts it in tiergate_cooldowns_total. A success on B (a pinned request, once gpt-4o
    heals) ends the cooling on B; A keeps it until it lapses."""
    _rate_limit_gpt(fake, retry_after=20)
    hard = {"model": "auto", "messages": [{"role": "user", "content": "HARD"}]}
    with (
        RedisServer(tmp_path / "redis") as redis_server,
        _replica(tmp_path / "a", fake, redis_server) as a,
        _replica(tmp_path / "b", fake, redis_server) as b,
    ):
        answer = a.http.post("/v1/chat/completions", json=hard)
        assert answer.status_code == 200 and answer.headers["x-tiergate-model"] == "claude"
        assert [r.path for r in fake.received] == ["/v1/chat/completions", "/v1/messages"]
        assert wait_for(lambda: b.gateway.cooldowns.left("gpt-4o") > 0, timeout_s=3)
        _passes_gpt_over(b, fake, hard)
        seen = readiness(services(b.app))["closed"]["gpt-4o"]["cooldown"]
        started = readiness(services(a.app))["closed"]["gpt-4o"]["cooldown"]
        counted = {name: _cooldowns_started(srv) for name, srv in (("a", a), ("b", b))}
        client = redis_server.client()
        assert client.keys("tiergate:cooldown:*") == [b"tiergate:cooldown:gpt-4o"]
        assert 0 < client.pttl("tiergate:cooldown:gpt-4o") <= 20_000
        fake.reset()
        pinned = b.http.post("/v1/chat/completions", json={**hard, "model": "gpt-4o"})
        assert pinned.status_code == 200, pinned.text
        assert b.gateway.cooldowns.left("gpt-4o") == 0
        assert a.gateway.cooldowns.left("gpt-4o") > 0
    assert seen is not None and started is not None
    assert 0 < seen.pop("seconds_left") <= 20 and 0 < started.pop("seconds_left") <= 20
    assert seen == {
        "reason": "upstream_rate_limited",
        "failures": 0,
        "started_here": False,
        "probing": False,
    }
    assert started == {
        "reason": "upstream_rate_limited",
        "failures": 1,
        "started_here": True,
        "probing": False,
    }
    assert len(counted["a"]) == 1 and counted["a"][0].endswith(" 1.0")
    assert counted["b"] == []


@pytest.mark.skipif(redis_binary() is None, reason="no redis-server binary")
def test_after_a_shared_cooldown_each_replica_sends_one_probe(
    tmp_path: Path, fake: FakeProvider
) -> None:
    """gpt-4o answers replica A's call with a 429, Retry-After 3: A cools it, B too through
    Redis. Then gpt-4o hangs. When the cooldown lapsed, every request of every replica called
    it and waited its timeout. Now each replica lets one request probe it (the probe is not
    coordinated through Redis: see router.cooldown) and sends its other requests to claude
    while that probe is out: two calls for two replicas. Each probe times out and cools
    gpt-4o again at once on its replica (on A, after a 429 that counted one failure of the
    three that cool). While they are out, /readyz says why on both: B's said reason '' (the
    lapsed shared cooldown's reason was not kept)."""
    fake.reset()
    hard = {"model": "auto", "messages": [{"role": "user", "content": "HARD"}]}
    with (
        RedisServer(tmp_path / "redis") as redis_server,
        _replica(tmp_path / "a", fake, redis_server, closed_timeout_s=3) as a,
        _replica(tmp_path / "b", fake, redis_server, closed_timeout_s=3) as b,
        ThreadPoolExecutor(2) as pool,
    ):
        for model in ("gpt-4o", "claude"):  # litellm's first call to each imports a lot
            assert a.http.post("/v1/chat/completions", json={**hard, "model": model}).is_success
        _rate_limit_gpt(fake, retry_after=3)
        assert a.http.post("/v1/chat/completions", json=hard).headers["x-tiergate-model"] == (
            "claude"
        )
        assert wait_for(lambda: b.gateway.cooldowns.left("gpt-4o") > 0, timeout_s=3)
        fake.reset(Behaviour(mode="stall", stall_s=60, failing_path="/chat/completions"))
        replicas = (a, b)
        lapsed = lambda: not any(srv.gateway.cooldowns.left("gpt-4o") for srv in replicas)  # noqa: E731
        assert wait_for(lapsed, timeout_s=6)
        probes = [pool.submit(srv.http.post, "/v1/chat/completions", json=hard) for srv in replicas]
        assert wait_for(lambda: _calls(fake) == 2, timeout_s=5)
        probing = [readiness(services(srv.app))["closed"]["gpt-4o"]["cooldown"] for srv in replicas]
        for srv in replicas:
            for _ in range(2):
                answer = srv.http.post("/v1/chat/completions", json=hard)
                assert answer.status_code == 200 and answer.headers["x-tiergate-model"] == "claude"
        assert _calls(fake) == 2
        assert [p.result(timeout=30).headers["x-tiergate-model"] for p in probes] == ["claude"] * 2
        assert all(29 < srv.gateway.cooldowns.left("gpt-4o") <= 30 for srv in replicas)
    for seen, here in zip(probing, (True, False), strict=True):
        assert seen is not None and 0 < seen.pop("seconds_left") <= 3
        assert seen == {
            "reason": "upstream_rate_limited",
            "failures": 1 if here else 0,
            "started_here": here,
            "probing": True,
        }


@pytest.mark.skipif(redis_binary() is None, reason="no redis-server binary")
def test_a_cooldown_started_in_a_redis_outage_is_shared_once_redis_is_back(
    tmp_path: Path, fake: FakeProvider
) -> None:
    """With Redis down, gpt-4o's 429 on replica A still falls back and cools gpt-4o on A
    (sharing it waits, the request does not); once Redis is back, A's writer sets it there
    and replica B passes gpt-4o over too, for what is left of it."""
    fake.reset()
    hard = {"model": "auto", "messages": [{"role": "user", "content": "HARD"}]}
    with (
        RedisServer(tmp_path / "redis") as redis_server,
        _replica(tmp_path / "a", fake, redis_server) as a,
        _replica(tmp_path / "b", fake, redis_server) as b,
    ):
        for model in ("gpt-4o", "claude"):  # litellm's first call to each imports a lot
            assert a.http.post("/v1/chat/completions", json={**hard, "model": model}).is_success
        _rate_limit_gpt(fake, retry_after=30)
        redis_server.stop()
        started = time.perf_counter()
        answer = a.http.post("/v1/chat/completions", json=hard)
        elapsed = time.perf_counter() - started
        assert answer.status_code == 200, answer.text
        assert answer.headers["x-tiergate-model"] == "claude"
        assert elapsed < 2.0  # no wait on the unreachable Redis
        assert a.gateway.cooldowns.left("gpt-4o") > 0
        assert b.gateway.cooldowns.left("gpt-4o") == 0
        redis_server.start()
        assert wait_for(lambda: b.gateway.cooldowns.left("gpt-4o") > 0, timeout_s=10)
        assert b.gateway.cooldowns.left("gpt-4o") <= 30


def test_streams_cut_after_their_first_words_cool_the_model_in_a_row(
    tmp_path: Path, fake: FakeProvider
) -> None:
    """gpt-4o cuts every stream after its first words. Each stream's opening counted as a
    success and reset the failures in a row, so with ``cooldown_after_fails`` 2 the model was
    never cooled: every request was sent to it again. A stream counts as a success once it
    ended whole; two cut in a row cool the model, as two failed calls before the first token
    do."""
    fake.reset(Behaviour(mode="reset_mid_stream"))
    body = {"model": "gpt-4o", "stream": True, "messages": [{"role": "user", "content": "Hi"}]}
    with live(tmp_path, policy_yaml(fake), cooldown_after_fails=2) as srv:
        for _ in range(2):
            with srv.http.stream("POST", "/v1/chat/completions", json=body) as response:
                response.read()
            assert response.status_code == 200 and response.headers["x-tiergate-model"] == "gpt-4o"
        assert 29 < srv.gateway.cooldowns.left("gpt-4o") <= 30
        fake.reset()  # pinned, the cooling model is called: a probe that streams whole
        with srv.http.stream("POST", "/v1/chat/completions", json=body) as response:
            response.read()
        assert response.status_code == 200
        assert srv.gateway.cooldowns.left("gpt-4o") == 0  # a whole stream ends the cooling
