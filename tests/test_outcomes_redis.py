"""The Redis outcome store against a real redis-server: round trips, outage, exact counts."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from router.app import start_outcome_store
from router.auth import hash_key
from router.cli import main
from router.dashboard import store_summary
from router.errors import ConfigError
from router.learning import purge_loop
from router.outcomes import Label, OutcomeRecord, SQLiteOutcomeStore, TieredLabel, lock_beside
from router.outcomes_redis import HOLD_RETRY_S, RedisOutcomeStore
from tests.conftest import LiveServer, free_port, live, policy_yaml, wait_for
from tests.fake_provider import FakeProvider
from tests.records import (
    answer_across_an_erasure,
    label_across_an_erasure,
    outcome,
    three_people,
    write_late,
)
from tests.redis_server import RedisServer


def store(server: RedisServer, tmp_path: Path, **kw: Any) -> RedisOutcomeStore:
    s = RedisOutcomeStore(server.url, journal=tmp_path / "journal.jsonl", **kw)
    s.start()
    return s


def test_round_trip_and_shared_spend(redis_server: RedisServer, tmp_path: Path) -> None:
    a = store(redis_server, tmp_path / "a")
    b = store(redis_server, tmp_path / "b")  # a second replica on the same Redis
    try:
        rec = outcome(tenant="acme", cost_usd=0.25)
        a.submit(rec)
        a.submit(rec)  # a retried submit of the same request id is stored once
        a.submit(outcome(tenant="other", cost_usd=1.0))
        assert a.flush(10)
        got = b.get(rec.id)
        assert got is not None and got["prompt"] == "hello" and got["signals"] == {"turns": 1}
        assert b.count() == 2 and b.count("acme") == 1
        assert [r["id"] for r in b.recent(5, tenant="acme")] == [rec.id]
        assert b.recent_scores() == [0.25, 0.25]
        # replica b refreshes its view of shared spend every second
        assert wait_for(lambda: abs(b.spend_today("acme") - 0.25) < 1e-9, timeout_s=10)
        a.label(Label(rec.id, "acme", "feedback", 1.0, time.time(), quality=0.0))
        a.label(Label(rec.id, "acme", "shadow", 0.5, time.time(), cost_usd=0.5))
        assert a.flush(10)
        labels = b.labels()
        assert {(x["source"], x["value"]) for x in labels} == {("feedback", 1.0), ("shadow", 0.5)}
        # the shadow call's cost counts
        assert wait_for(lambda: abs(b.spend_today("acme") - 0.75) < 1e-9, timeout_s=10)
        assert a.duplicates == 1
    finally:
        a.close()
        b.close()


def test_a_replayed_label_does_not_replace_a_later_one(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """Thumbs down through replica A during an outage waits in A's journal; A stops, Redis
    returns, the user's later thumbs up goes through replica B. When A starts again and
    replays its journal, the label stays B's: the newer label of a source wins, not the
    last one written."""
    a = store(redis_server, tmp_path / "a")
    rec = outcome(tenant="acme")
    a.submit(rec)
    assert a.flush(10)
    redis_server.stop()
    a.label(Label(rec.id, "acme", "feedback", None, time.time() - 60, quality=0.0))
    a.close(timeout_s=0.5)
    redis_server.start()
    b = store(redis_server, tmp_path / "b")
    try:
        b.label(Label(rec.id, "acme", "feedback", None, time.time(), quality=1.0))
        assert b.flush(10)
        again = store(redis_server, tmp_path / "a")  # replays the thumbs down
        assert again.flush(10)
        again.close()
        assert [x["quality"] for x in b.labels()] == [1.0]
    finally:
        b.close()


def test_a_stored_label_without_a_time_is_replaced(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    # The older-label check reads the stored label's ts: one without it must not fail the
    # script (and lose the new label), it is simply replaced.
    s = store(redis_server, tmp_path)
    try:
        rec = outcome(tenant="acme")
        s.submit(rec)
        assert s.flush(10)
        s._client.hset(s.key("label", rec.id), "feedback", '{"quality": 0.0}')
        s.label(Label(rec.id, "acme", "feedback", None, time.time(), quality=1.0))
        assert s.flush(10)
        assert [x["quality"] for x in s.labels()] == [1.0]
    finally:
        s.close()


def test_purge_removes_old_records_and_labels(redis_server: RedisServer, tmp_path: Path) -> None:
    s = store(redis_server, tmp_path)
    try:
        old = outcome(tenant="acme", cost_usd=0.001, ts=time.time() - 40 * 86400)
        new = outcome(tenant="acme", cost_usd=0.001)
        s.retention_s = 60 * 86400
        s.submit(old)
        s.submit(new)
        s.label(Label(old.id, "acme", "feedback", 1.0, old.ts))
        assert s.flush(10)
        assert s.purge(time.time() - 30 * 86400) == 1
        assert s.get(old.id) is None and s.get(new.id) is not None
        assert s.count() == 1 and s.count("acme") == 1 and s.labels() == []
        # The judging spend an erasure keeps goes with the retention period too.
        s.label(Label(new.id, "acme", "shadow", 1.0, time.time(), cost_usd=0.5))
        assert s.flush(10)
        s.erase([new.id])
        assert abs(s.erased_judging_usd(0.0) - 0.5) < 1e-9
        s.purge(time.time() + 60)
        assert s.erased_judging_usd(0.0) == 0.0
    finally:
        s.close()


def test_purge_leaves_no_stream_entry_written_before_it_readable(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """The purge trimmed the stream approximately: whole blocks of entries only (100 each),
    at most 10,000 entries a run, so the entries of records past the retention that shared a
    block with newer ones stayed readable by every consumer. It trims exactly."""
    s = store(redis_server, tmp_path)
    try:
        old = outcome(tenant="acme", prompt="Alice Smith asks about her lease")
        s.submit(old)
        assert s.flush(10)
        time.sleep(0.01)  # stream ids are milliseconds: none of them in the cut's
        cut = time.time()
        time.sleep(0.01)
        new = outcome(tenant="acme")
        s.submit(new)
        assert s.flush(10)
        assert s.purge(cut) == 1
        entries = redis_server.client().xrange("tiergate:outcomes")
        assert [f[b"id"].decode() for _, f in entries] == [new.id]
    finally:
        s.close()


def _label_given_late(s: SQLiteOutcomeStore | RedisOutcomeStore) -> str:
    """A 29-day-old request whose user left feedback today; its id."""
    old = outcome(tenant="acme", ts=time.time() - 29 * 86400)
    s.submit(old)
    s.label(Label(old.id, "acme", "feedback", 1.0, time.time(), comment="call me on +44 ..."))
    assert s.flush(10)
    return old.id


def test_purge_takes_a_records_later_labels_with_it(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    # retention_days: 30. A day later the record is past it; its feedback, a day old, used to
    # stay for another 29 days, comment and all, though nothing reads a label without its record.
    sqlite = SQLiteOutcomeStore(tmp_path / "o.db")
    sqlite.start()
    redis_store = store(redis_server, tmp_path)
    try:
        for s in (sqlite, redis_store):
            request_id = _label_given_late(s)
            assert s.purge(time.time() + 86400 - 30 * 86400) == 1
            assert s.get(request_id) is None
            assert s.labels_of(request_id) == [] and s.labels() == []
        assert redis_server.client().keys("tiergate:label:*") == []
    finally:
        sqlite.close()
        redis_store.close()


def test_outage_and_recovery_loses_nothing_and_duplicates_nothing(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    # A small memory buffer so the outage also exercises the on-disk journal.
    s = store(redis_server, tmp_path, buffer_size=50, batch=20)
    ids: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            rec = outcome(tenant="acme")
            s.submit(rec)
            with lock:
                ids.append(rec.id)
            time.sleep(0.002)

    workers = [threading.Thread(target=traffic) for _ in range(3)]
    for w in workers:
        w.start()
    time.sleep(0.5)
    redis_server.stop()  # Redis goes away mid-traffic
    # the memory bound is hit and records go to the journal
    assert wait_for(lambda: not s.connected and s.spilled > 0, timeout_s=15)
    redis_server.start()  # same port, same data directory
    time.sleep(0.5)
    stop.set()
    for w in workers:
        w.join()
    assert s.flush(30), "the buffer and the journal did not drain after Redis came back"
    s.close()
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        stored = client.zrange("tiergate:outcomes:ts", 0, -1)
        stream_ids = [f["id"] for _, f in client.xrange("tiergate:outcomes")]
    finally:
        client.close()
    assert len(ids) > 200
    assert sorted(stored) == sorted(ids)  # every record, exactly once
    assert sorted(stream_ids) == sorted(ids)  # and one stream entry each: no duplicates
    assert not (tmp_path / "journal.jsonl").exists()


def test_shutdown_while_redis_is_down_keeps_records_in_the_journal(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    s = store(redis_server, tmp_path)
    redis_server.stop()
    recs = [outcome(tenant="acme") for _ in range(30)]
    for rec in recs:
        s.submit(rec)
    s.close(timeout_s=1.0)  # Redis is still down: everything goes to the journal
    assert (tmp_path / "journal.jsonl").exists()
    redis_server.start()
    again = store(redis_server, tmp_path)  # the next start replays the journal
    try:
        assert again.flush(20)
        assert again.count() == 30
        assert all(again.get(r.id) is not None for r in recs)
    finally:
        again.close()


def test_shutdown_while_redis_is_down_journals_at_once(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """A stop while Redis is down does not spend its whole drain time retrying Redis: the
    journal takes the records at once, so a SIGKILL at the end of a container's grace period
    (Kubernetes: 30 s, ``docker stop``: 10 s) cannot come before they are on disk."""
    s = store(redis_server, tmp_path)
    redis_server.stop()
    for _ in range(5):
        s.submit(outcome(tenant="acme"))
    assert wait_for(lambda: not s.connected, 10)
    started = time.monotonic()
    s.close()  # the default drain time, as the app's lifespan calls it
    assert time.monotonic() - started < 5
    assert s.dropped == 0
    assert len((tmp_path / "journal.jsonl").read_text().splitlines()) == 5


def test_a_journal_line_cut_short_is_set_aside_and_the_rest_replayed(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """A process killed while appending to its journal (SIGKILL at the end of a grace period,
    a power loss) leaves its last line cut short. The next start replays the whole lines and
    moves the cut one to NAME.unreadable, rather than failing to start on a JSONDecodeError,
    which left an operator only deleting the journal, and its records, to get the proxy up."""
    whole = [outcome(tenant="acme", cost_usd=0.5) for _ in range(2)]
    cut = json.dumps({"kind": "record", "data": outcome(tenant="acme").as_dict()})[:60]
    lines = [json.dumps({"kind": "record", "data": rec.as_dict()}) + "\n" for rec in whole]
    (tmp_path / "journal.jsonl").write_text("".join(lines) + cut, encoding="utf-8")
    s = store(redis_server, tmp_path)
    try:
        assert s.flush(20)
        assert s.count() == 2 and all(s.get(rec.id) is not None for rec in whole)
        assert wait_for(lambda: abs(s.spend_today("acme") - 1.0) < 1e-9, timeout_s=10)
    finally:
        s.close()
    assert (tmp_path / "journal.jsonl.unreadable").read_text(encoding="utf-8") == cut + "\n"
    assert not (tmp_path / "journal.jsonl").exists()


def test_a_line_cut_short_while_running_does_not_stop_the_replay(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """An append that failed half way (a full disk in an outage) leaves a line cut short in
    the journal of a running store; when Redis returns, the replay writes the whole lines and
    sets the cut one aside, instead of failing on it."""
    s = store(redis_server, tmp_path)
    try:
        redis_server.stop()
        recs = [outcome(tenant="acme") for _ in range(4)]
        s.submit(recs[0])
        assert wait_for(lambda: not s.connected, 10)
        for rec in recs[1:]:
            s.submit(rec)  # the store is known to be down: each goes to the journal at once
        assert s.spilled == 3
        journal = tmp_path / "journal.jsonl"
        with journal.open("a", encoding="utf-8") as fh:
            fh.write('{"kind": "record", "data": {"id": "req_cut')
        redis_server.start()
        assert s.flush(20)
        assert s.count() == 4 and all(s.get(rec.id) is not None for rec in recs)
    finally:
        s.close()
    cut = '{"kind": "record", "data": {"id": "req_cut\n'
    assert (tmp_path / "journal.jsonl.unreadable").read_text(encoding="utf-8") == cut


def test_a_second_process_on_the_same_journal_is_refused(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """Two replicas given one journal (one TIERGATE_HOME on a host, a shared volume) each
    replayed the other's records after an outage, and one then waited for ever on a backlog
    the other had written: its writer spun at 100% CPU and its spend view counted them twice.
    The second refuses to start, naming the setting; once the first has stopped it starts."""
    first = store(redis_server, tmp_path)
    try:
        with pytest.raises(ConfigError, match="TIERGATE_OUTCOME_JOURNAL_PATH"):
            store(redis_server, tmp_path)
    finally:
        first.close()
    redis_server.stop()
    after = store(redis_server, tmp_path)
    after.submit(outcome(tenant="acme"))
    after.close(timeout_s=0.5)
    assert len((tmp_path / "journal.jsonl").read_text().splitlines()) == 1


def _redis_saying(monkeypatch: pytest.MonkeyPatch, version: str) -> Any:
    """Have every client talk to a Redis ``version`` before 6.2 (none is at hand: the real one
    plays it): ``HELLO`` without arguments is refused, as such a Redis refuses it, and ``INFO
    server`` says ``version``. A function that upgrades it (puts the real methods back)."""
    real_info, real_command = redis.Redis.info, redis.Redis.execute_command

    def info(self: redis.Redis, section: str | None = None, *args: Any, **kw: Any) -> Any:
        found = real_info(self, section, *args, **kw)
        return {**found, "redis_version": version} if section == "server" else found

    def execute_command(self: redis.Redis, *args: Any, **kw: Any) -> Any:
        if args == ("HELLO",):
            raise redis.ResponseError("wrong number of arguments for 'hello' command")
        return real_command(self, *args, **kw)

    monkeypatch.setattr(redis.Redis, "info", info)
    monkeypatch.setattr(redis.Redis, "execute_command", execute_command)

    def upgrade() -> None:
        monkeypatch.setattr(redis.Redis, "info", real_info)
        monkeypatch.setattr(redis.Redis, "execute_command", real_command)

    return upgrade


def test_a_redis_older_than_6_2_is_refused_at_start_and_by_an_erasure(
    redis_server: RedisServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Redis 6.0 has no XTRIM MINID nor XGROUP CREATECONSUMER: its retention purge failed on
    every run, and every erasure copied the whole stream to fail at the end and exit 1. A
    replica refuses to start on it, saying why; an erasure deletes what it erases and says the
    stream cannot be rebuilt there, without copying it. (No Redis below 6.2 is at hand: its
    INFO server is played, saying 6.0.16, by the real Redis.)"""
    s = store(redis_server, tmp_path)
    alice, _, _ = three_people(s)
    s.close()
    upgrade = _redis_saying(monkeypatch, "6.0.16")
    with pytest.raises(ConfigError, match=r"Redis 6\.0\.16 is older than 6\.2, which Tiergate"):
        store(redis_server, tmp_path)
    monkeypatch.setenv("TIERGATE_REDIS_URL", redis_server.url)
    monkeypatch.setenv("TIERGATE_OUTCOME_JOURNAL_PATH", str(tmp_path / "cli-journal.jsonl"))
    copies: list[str] = []
    monkeypatch.setattr(RedisOutcomeStore, "_copy_stream", lambda _, d: copies.append(d) or True)
    assert main(["outcomes", "delete", "--request-id", alice.id]) == 1
    said = capsys.readouterr()
    assert "deleted 1 records" in said.out and copies == []
    assert "older than 6.2" in said.err and "outcomes delete --compact" in said.err
    upgrade()
    store(redis_server, tmp_path).close()  # the refused one let the journal go


def test_a_redis_too_old_found_once_it_answers_leaves_the_replica_unready(
    redis_server: RedisServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    fake: FakeProvider,
) -> None:
    """A replica started while Redis was unreachable skipped the check that refuses a Redis
    older than 6.2 at start, and served on it: its retention purge failed on every run, and
    only an erasure said why. It checks once Redis answers: it logs why and /readyz answers 503
    (as a refusal at start leaves no replica ready), until Redis answers as 6.2 or later."""
    redis_server.stop()
    outcomes = RedisOutcomeStore(redis_server.url, journal=tmp_path / "journal.jsonl")
    with live(tmp_path, policy_yaml(fake), outcomes=outcomes) as server:
        assert server.http.get("/readyz").status_code == 200  # an outage: not a refusal
        upgrade = _redis_saying(monkeypatch, "6.0.16")
        caplog.set_level("ERROR", logger="tiergate.outcomes")
        redis_server.start()
        assert wait_for(lambda: server.http.get("/readyz").status_code == 503)
        said = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert len(said) == 1 and "Redis 6.0.16 is older than 6.2, which Tiergate" in said[0]
        assert "older than 6.2" in outcomes.health()["refusal"]
        upgrade()
        assert wait_for(lambda: server.http.get("/readyz").status_code == 200)
        assert outcomes.health()["refusal"] is None


@pytest.mark.parametrize("query", ["", "?protocol=2"])
def test_a_redis_user_without_info_starts_and_its_redis_is_checked(
    redis_server: RedisServer, tmp_path: Path, query: str
) -> None:
    """``INFO`` is one of Redis's ``@dangerous`` commands, which a common ACL
    (``+@all -@dangerous``) withholds: the version check at start raised
    ``NoPermissionError`` and the replica could not start. Redis says its version to ``HELLO``,
    which it answers any user whatever its ACL (as a map over RESP3, redis-py's default, and as
    a list over RESP2)."""
    url = _user_without(redis_server, "@dangerous") + query
    s = RedisOutcomeStore(url, journal=tmp_path / "journal.jsonl")
    s.start()
    try:
        s.submit(outcome(tenant="acme", cost_usd=0.25))
        assert s.flush(10)
        assert (s.health()["refusal"], s.spend_today("acme"), s.write_errors) == (None, 0.25, 0)
    finally:
        s.close()


def test_a_redis_that_will_not_say_its_version_is_refused_at_start_and_once_it_answers(
    tmp_path: Path, fake: FakeProvider
) -> None:
    """Where Redis answers neither ``HELLO`` (renamed away here, or a Redis before 6.2) nor,
    to Tiergate's user, ``INFO``, a replica cannot tell whether the retention purge and
    erasures will run. At start it raised the client's ``NoPermissionError``; one started while
    Redis was unreachable logged it and served on. Both now refuse alike, naming the missing
    permission: at start with a ConfigError, later by reporting itself not ready."""
    with RedisServer(tmp_path / "redis", "--rename-command", "HELLO", "") as server:
        url = _user_without(server, "info")
        with pytest.raises(ConfigError, match=r"may not run INFO.*\+info") as refused:
            RedisOutcomeStore(url, journal=tmp_path / "start.jsonl").start()
        server.stop()
        outcomes = RedisOutcomeStore(url, journal=tmp_path / "journal.jsonl")
        with live(tmp_path, policy_yaml(fake), outcomes=outcomes) as app:
            assert app.http.get("/readyz").status_code == 200  # an outage: not a refusal
            server.start()
            _user_without(server, "info")  # the restart forgot the user
            assert wait_for(lambda: app.http.get("/readyz").status_code == 503)
            assert outcomes.health()["refusal"] == str(refused.value)


@pytest.mark.parametrize("password", ["wrong-pw", None])
def test_a_wrong_redis_password_is_a_configuration_error_not_an_outage(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, password: str | None
) -> None:
    """A wrong password (``WRONGPASS``) or none (``NOAUTH``) put the replica in its outage
    mode: it started, reported itself ready, journalled every record and held budgets on its
    own view, as if Redis were down. It is refused at start, naming the setting to fix and not
    the password."""
    caplog.set_level("WARNING", logger="tiergate.outcomes")
    with RedisServer(tmp_path / "redis", password="right-pw") as server:
        outcomes = RedisOutcomeStore(server.url_with(password), journal=tmp_path / "j.jsonl")
        with pytest.raises(ConfigError, match="TIERGATE_REDIS_PASSWORD") as refused:
            outcomes.start()
        outcomes.close()
    assert "Redis refused Tiergate's credentials" in str(refused.value)
    said = [str(refused.value), *(r.getMessage() for r in caplog.records)]
    assert not [line for line in said if "right-pw" in line or "wrong-pw" in line]
    free, claim = lock_beside(tmp_path / "j.jsonl")
    assert free  # the journal is free for the next start
    if claim is not None:
        claim.close()


def test_a_read_only_replica_is_refused_at_start_freeing_the_journal_and_client(
    tmp_path: Path,
) -> None:
    """A URL pointing at a read-only replica (as after a failover) failed the start with the
    client's ``ReadOnlyError`` and a traceback; it is a ConfigError naming the setting. A
    failed start kept the journal's lock (the app's lifespan does not close a store whose
    start failed, so the next start was refused as if another Tiergate held the journal),
    and kept the client's connection to Redis open: both are let go."""
    with RedisServer(tmp_path / "redis", "--replicaof", "127.0.0.1", str(free_port())) as server:
        outcomes = RedisOutcomeStore(server.url, journal=tmp_path / "j.jsonl")
        with pytest.raises(ConfigError, match="TIERGATE_REDIS_URL points at a read-only"):
            outcomes.start()
        admin = server.client()
        assert wait_for(lambda: len(admin.client_list()) == 1)  # only the assertion's own
    free, claim = lock_beside(tmp_path / "j.jsonl")
    assert free  # the journal is free for the next start
    if claim is not None:
        claim.close()


@pytest.mark.parametrize("denied", ["evalsha", "zcard"])
def test_a_redis_user_its_acl_denies_a_command_is_refused_at_start(
    tmp_path: Path, denied: str
) -> None:
    """An ACL user without ``EVALSHA`` (every write is a script) failed the start with the
    client's ``NoPermissionError`` and a traceback; it is a ConfigError that names the ACL
    and where the commands Tiergate needs are listed. So is one without a command the start's
    scripts run (``ZCARD``, the heartbeat's), which Redis 6.2 answers with a script error."""
    with RedisServer(tmp_path / "redis") as server:
        url = _user_without(server, denied)
        outcomes = RedisOutcomeStore(url, journal=tmp_path / "j.jsonl")
        with pytest.raises(ConfigError, match=r"ACL refuses Tiergate's user.*docs/kubernetes.md"):
            outcomes.start()
        outcomes.close()


def _unready_saying(app: LiveServer, outcomes: RedisOutcomeStore, says: str) -> None:
    """Wait for the replica to answer /readyz 503, its refusal naming ``says``."""
    assert wait_for(lambda: app.http.get("/readyz").status_code == 503)
    refusal = outcomes.health()["refusal"]
    assert refusal is not None and says in refusal


def _ready_again_with_its_record(app: LiveServer, outcomes: RedisOutcomeStore) -> None:
    """Wait for the replica to be ready again, its refusal gone and the one record it held
    in the journal written."""
    assert wait_for(lambda: app.http.get("/readyz").status_code == 200)
    assert outcomes.flush(10) and outcomes.health()["refusal"] is None
    assert outcomes.count("acme") == 1


def test_a_password_redis_stops_taking_leaves_the_replica_unready_until_it_does_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, fake: FakeProvider
) -> None:
    """Redis's password changed under a running replica (a rotation half done): it went on in
    its outage mode, ready, journalling its records, and nothing said the password was wrong.
    It logs that once and answers /readyz 503 with the reason until Redis takes its password
    again; its records wait in the journal meanwhile and are written then."""
    caplog.set_level("ERROR", logger="tiergate.outcomes")
    with RedisServer(tmp_path / "redis", password="right-pw") as server:
        outcomes = RedisOutcomeStore(server.url, journal=tmp_path / "journal.jsonl")
        with live(tmp_path, policy_yaml(fake), outcomes=outcomes) as app:
            admin = server.client()
            assert app.http.get("/readyz").status_code == 200
            admin.config_set("requirepass", "rotated-pw")
            admin.client_kill_filter(_type="normal", skipme=True)  # its connections must log in
            _unready_saying(app, outcomes, "TIERGATE_REDIS_PASSWORD")
            said = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
            assert len(said) == 1 and "Redis refused Tiergate's credentials" in said[0]
            assert not [line for line in said if "-pw" in line]
            outcomes.submit(outcome(tenant="acme", cost_usd=0.25))
            assert wait_for(lambda: outcomes.health()["journal_lines"] == 1)
            admin.config_set("requirepass", "right-pw")
            _ready_again_with_its_record(app, outcomes)


def test_redis_turned_read_only_leaves_the_replica_unready_keeping_its_records(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, fake: FakeProvider
) -> None:
    """The primary Redis turned replica under a running replica (a failover, the URL not
    following it): each record's script was refused ``READONLY``, a ``ResponseError`` taken
    as the record's own fault, so records were dropped as unwritable and the replica stayed
    ready. It logs once that the URL points at a read-only replica, answers /readyz 503, keeps
    its records in the journal, and writes them once Redis takes writes again."""
    caplog.set_level("ERROR", logger="tiergate.outcomes")
    with RedisServer(tmp_path / "redis") as server:
        outcomes = RedisOutcomeStore(server.url, journal=tmp_path / "journal.jsonl")
        with live(tmp_path, policy_yaml(fake), outcomes=outcomes) as app:
            admin = server.client()
            assert app.http.get("/readyz").status_code == 200
            admin.replicaof("127.0.0.1", str(free_port()))
            _unready_saying(app, outcomes, "points at a read-only replica")
            outcomes.submit(outcome(tenant="acme", cost_usd=0.25))
            assert wait_for(lambda: outcomes.health()["journal_lines"] == 1)
            assert outcomes.health()["dropped"] == 0
            said = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
            assert len(said) == 1 and "read-only replica" in said[0], said
            admin.replicaof("NO", "ONE")
            _ready_again_with_its_record(app, outcomes)


def test_a_command_an_acl_withholds_from_a_script_leaves_the_replica_unready(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, fake: FakeProvider
) -> None:
    """Every write is a Lua script; Redis 6.2 answers a command the user's ACL withholds
    inside one with a plain script error, not NOPERM. Each record was then tried alone,
    counted unwritable and dropped, and the replica stayed ready. It is the refusal NOPERM
    is: the replica logs it once, answers /readyz 503 naming the ACL, keeps its records, and
    writes them once Redis runs the command again."""
    caplog.set_level("ERROR", logger="tiergate.outcomes")
    with RedisServer(tmp_path / "redis") as server:
        outcomes = RedisOutcomeStore(_user_without(server, "set"), journal=tmp_path / "j.jsonl")
        with live(tmp_path, policy_yaml(fake), outcomes=outcomes) as app:
            assert app.http.get("/readyz").status_code == 200
            outcomes.submit(outcome(tenant="acme", cost_usd=0.25))
            _unready_saying(app, outcomes, "ACL refuses Tiergate's user")
            assert outcomes.unwritable == 0
            said = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
            assert len(said) == 1 and "docs/kubernetes.md" in said[0]
            server.client().acl_setuser("tiergate", commands=["+set"])
            _ready_again_with_its_record(app, outcomes)


def _documented_acl() -> list[str]:
    """The ACL rules docs/kubernetes.md gives Tiergate's Redis user (``ACL SETUSER tiergate``)."""
    doc = Path(__file__).parents[1] / "docs" / "kubernetes.md"
    [line] = [x for x in doc.read_text().splitlines() if x.startswith("ACL SETUSER tiergate ")]
    return line.split()[3:]


def test_the_documented_acl_runs_a_replica_and_an_erasure(
    redis_server: RedisServer,
    tmp_path: Path,
    fake: FakeProvider,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A Redis user made from the ACL docs/kubernetes.md gives, on a database other than 0: a
    replica checks the version, looks up a client key, counts its rate limits, holds and
    renews budget, writes records and labels, shares a cooldown and reads them back; the
    erasure of a tenant (an exporter's consumer group on the stream, a rate-limit window an
    older release named) and the purge run whole. Redis refuses none of their commands."""
    admin = redis_server.client()
    rules = [">secret" if rule == ">PASSWORD" else rule for rule in _documented_acl()]
    admin.execute_command("ACL", "SETUSER", "tiergate", *rules)
    admin.acl_log_reset()
    url = f"redis://tiergate:secret@127.0.0.1:{redis_server.port}/1"
    db = redis.Redis.from_url(redis_server.url.removesuffix("/0") + "/1", decode_responses=True)
    key = {"tenant": "acme", "permissions": []}
    db.hset("tiergate:keys", hash_key("tg-acme"), json.dumps(key))
    outcomes = RedisOutcomeStore(url, journal=tmp_path / "journal.jsonl")
    policy = policy_yaml(fake, extra="tenants:\n  acme: {daily_budget_usd: 5.0}\n")
    acme = {"Authorization": "Bearer tg-acme"}
    limits = {"rpm_limit": 100, "tpm_limit": 100_000}
    with live(tmp_path, policy, outcomes=outcomes, redis_url=url, **limits) as app:
        ids = []
        for prompt in ("hello", "HARD question"):  # the local tier, then a closed model
            body = {"model": "auto", "messages": [{"role": "user", "content": prompt}]}
            answer = app.http.post("/v1/chat/completions", json=body, headers=acme)
            assert answer.status_code == 200, answer.text
            ids.append(answer.headers["x-request-id"])
        feedback = {"request_id": ids[0], "thumbs": "up"}
        assert app.http.post("/v1/feedback", json=feedback, headers=acme).status_code == 200
        assert outcomes.reserve_spend("acme", "req_in_flight", 0.01, 5.0)
        outcomes._holds_renewed -= outcomes.hold_ttl_s  # the next refresh renews it
        assert wait_for(lambda: db.zscore("tiergate:holds:acme", "req_in_flight") is not None)
        outcomes.publish_cooldown("gpt-4o", 30.0, "rate_limited|x")
        assert wait_for(lambda: outcomes.shared_cooldown("gpt-4o") is not None)
        outcomes.release_spend("req_in_flight")
        outcomes.submit(outcome(tenant="globex"))  # the stream keeps an entry: it is copied
        assert outcomes.flush(10)
        assert wait_for(lambda: outcomes.spend_today("acme") > 0)
        assert outcomes.count("acme") == 2 and len(outcomes.recent(5)) == 3
        assert len(outcomes.window(0.0)) == 3
        assert [x["request_id"] for x in outcomes.labels()] == [ids[0]]
        assert outcomes.recent_scores() and outcomes.tiered_labels(0.0)
        assert db.keys("tiergate:rl:*")  # the limits counted in Redis
        assert outcomes.health()["refusal"] is None and outcomes.write_errors == 0
    db.xgroup_create("tiergate:outcomes", "exporter", id="0")
    db.xreadgroup("exporter", "reader", {"tiergate:outcomes": ">"})
    db.set("tiergate:rl:acme:req:60", 1)  # as a release before hashing named it
    monkeypatch.setenv("TIERGATE_REDIS_URL", url)
    monkeypatch.setenv("TIERGATE_OUTCOME_JOURNAL_PATH", str(tmp_path / "cli-journal.jsonl"))
    assert main(["outcomes", "delete", "--tenant", "acme"]) == 0
    assert main(["outcomes", "delete", "--compact"]) == 0
    said = capsys.readouterr()
    assert "deleted 2 records and 1 labels" in said.out and said.err == "", said.err
    cli = RedisOutcomeStore(url, journal=tmp_path / "cli-journal.jsonl")
    cli.connect()
    try:
        assert cli.erased_spend_buckets(0.0) and not db.exists("tiergate:rl:acme:req:60")
        cli.purge(time.time())
    finally:
        cli.close()
    # redis-py names itself on each new connection (CLIENT SETINFO, Redis 7.2) and goes on
    # where that is refused: Redis 6.2 logs the refusal, 7.0 does not know the command.
    assert [e for e in admin.acl_log() if e["object"] != "client"] == []


def test_budget_holds_during_an_outage_log_once_and_still_hold(
    redis_server: RedisServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With Redis down, a burst of budget holds is checked on this replica's view without
    asking Redis for each (one warning, not one per request), and the budget still holds."""
    s = store(redis_server, tmp_path)
    try:
        assert wait_for(lambda: s.spend_known, timeout_s=10)  # it read the spend ($0) once
        redis_server.stop()
        caplog.set_level("WARNING", logger="tiergate.outcomes")
        held = [s.reserve_spend("acme", f"req_{i}", 0.01, 0.05) for i in range(20)]
        assert held == [True] * 5 + [False] * 15
        warnings = [r for r in caplog.records if "budget hold" in r.getMessage()]
        assert len(warnings) == 1
    finally:
        s.close(timeout_s=0.5)


def test_in_an_outage_each_replica_spends_only_its_share_of_the_budget(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """Two replicas that both saw $0.25 of a $1.25 budget spent: once Redis is down, each may
    hold its half of the $1.00 left, so together they spend $1.00, not $1.00 each."""
    a = store(redis_server, tmp_path / "a")
    b = store(redis_server, tmp_path / "b")
    try:
        a.submit(outcome(tenant="acme", cost_usd=0.25))
        assert a.flush(10)
        assert wait_for(
            lambda: (
                a.replicas == b.replicas == 2
                and a.ledger.shared("acme") == b.ledger.shared("acme") == 0.25
            ),
            timeout_s=10,
        )
        redis_server.stop()
        held = [
            sum(s.reserve_spend("acme", f"{name}_{i}", 0.125, 1.25) for i in range(12)) * 0.125
            for name, s in (("a", a), ("b", b))
        ]
        assert held == [0.5, 0.5]
        # The refusal says why with $0.75 on record: the share is used, not the budget.
        assert a.spend_today("acme") == 0.75
        assert a.hold_refusal("acme", 1.25) == (
            "; the outcome store is unreachable, and this replica may spend up to $0.75 of it,"
            " its share of what was left"
        )
        assert a.hold_retry_s("acme", 1.25) is None  # its own holds free as their requests end
    finally:
        a.close(timeout_s=0.5)
        b.close(timeout_s=0.5)


def test_a_refusal_owed_to_the_outage_share_is_not_sent_as_held(
    redis_server: RedisServer, tmp_path: Path, fake: FakeProvider
) -> None:
    """Two replicas saw $0.25 of a $1.25 budget spent; Redis stops and one spends $0.50 more,
    its share of the $1.00 left. Its next request was refused as one owed to holds of
    requests in flight (``x-should-retry: true``, ``Retry-After: 5``), though none was in
    flight and none would free: only the store's return can. The refusal says the share is
    used, with ``x-should-retry: false`` and the replica's wait before it asks Redis again
    as its ``Retry-After``; once Redis answers, the same request passes."""
    fake.reset()
    policy = policy_yaml(
        fake, extra="tenants:\n  default: {daily_budget_usd: 1.25, over_budget: reject}\n"
    )
    hard = {"model": "auto", "messages": [{"role": "user", "content": "HARD hi"}]}
    a = RedisOutcomeStore(redis_server.url, journal=tmp_path / "a" / "journal.jsonl")
    b = store(redis_server, tmp_path / "b")
    try:
        with live(tmp_path, policy, outcomes=a) as app:
            a.submit(outcome(tenant="default", cost_usd=0.25))
            assert a.flush(10)
            assert wait_for(
                lambda: a.replicas == b.replicas == 2 and b.ledger.shared("default") == 0.25,
                timeout_s=10,
            )
            redis_server.stop()
            a.submit(outcome(tenant="default", cost_usd=0.5))
            assert wait_for(lambda: a.spend_today("default") == 0.75, timeout_s=10)
            refused = app.http.post("/v1/chat/completions", json=hard)
            assert refused.status_code == 429, refused.text
            assert refused.json()["error"] == {
                "message": "tenant 'default' spent $0.75 of its $1.25 daily budget; the outcome"
                " store is unreachable, and this replica may spend up to $0.75 of it, its share"
                " of what was left",
                "type": "rate_limit_error",
                "param": None,
                "code": "budget_exceeded",
            }
            assert (refused.headers["x-should-retry"], refused.headers["retry-after"]) == (
                "false",
                "1",
            )
            redis_server.start()
            assert wait_for(
                lambda: app.http.post("/v1/chat/completions", json=hard).status_code == 200,
                timeout_s=10,
            )
    finally:
        b.close(timeout_s=0.5)


def test_a_replica_has_read_the_shared_spend_when_it_has_started(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """``start`` read the spend only through the writer's first refresh, about a second after
    it returned: a replica added while a tenant was past its budget decided that tenant's
    first requests against $0. It reads the spend and counts the replicas before it returns."""
    a = store(redis_server, tmp_path / "a")
    try:
        a.submit(outcome(tenant="acme", cost_usd=1.0))
        assert a.flush(10)
        b = store(redis_server, tmp_path / "b")
        try:
            assert (b.spend_known, b.spend_today("acme"), b.replicas) == (True, 1.0, 2)
        finally:
            b.close()
    finally:
        a.close()


def test_a_spend_read_before_midnight_is_not_taken_as_the_next_day_s(
    redis_server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The spend a replica reads (at start, at each refresh, after each batch) is the day's
    hash; read just before midnight and loaded just after, the day before's spend counted
    against the new day's budgets until the next read."""
    a = store(redis_server, tmp_path / "a")
    a.submit(outcome(tenant="acme", cost_usd=5.0))
    assert a.flush(10)
    a.close()
    midnight = (time.time() // 86400 + 1) * 86400
    b = RedisOutcomeStore(redis_server.url, journal=tmp_path / "b" / "journal.jsonl")
    clock = iter([midnight - 0.001])  # the read, just before midnight; all after it, after
    monkeypatch.setattr(time, "time", lambda: next(clock, midnight + 0.001))
    try:
        b.start()
        assert (b.spend_known, b.spend_today("acme")) == (True, 0.0)
    finally:
        monkeypatch.undo()
        b.close()


def test_a_replica_started_in_an_outage_holds_no_budget_it_cannot_see(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """A replica that has never read the shared spend knows neither what a tenant spent nor
    how many replicas share what is left. It checked the whole budget against $0: with a
    tenant at $2.64 of its $2.00, a replica started during the outage let it spend $2.20
    more. It holds nothing for a budgeted tenant until Redis answers, then shares again."""
    a = store(redis_server, tmp_path / "a")
    try:
        a.submit(outcome(tenant="acme", cost_usd=1.0))
        assert a.flush(10)
    finally:
        a.close()
    redis_server.stop()
    c = store(redis_server, tmp_path / "c")
    try:
        assert not c.reserve_spend("acme", "r1", 0.25, 2.0)
        assert "has not read the shared spend since it started" in c.hold_refusal("acme", 2.0)
        assert c.hold_retry_s("acme", 2.0) == HOLD_RETRY_S  # only Redis's return frees it
        assert c.reserve_spend("acme", "r2", 0.25, None)  # no budget, nothing to overspend
        c.release_spend("r2")
        redis_server.start()
        assert wait_for(lambda: c.ledger.shared("acme") == 1.0, timeout_s=10)
        assert wait_for(lambda: c.reserve_spend("acme", "r3", 0.25, 2.0), timeout_s=10)
        assert redis_server.client().hget("tiergate:hold:acme", "r3") == b"0.25"
    finally:
        c.close(timeout_s=0.5)


def test_a_dead_replica_s_budget_hold_lapses_within_five_minutes(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """A hold whose replica died (no record, no renewal) blocked its tenant's budget for 15
    minutes; its replica renews it every third of that, each renewal a round trip in the spend
    refresh, so 5 minutes leave it 200 s to miss renewals (an outage, a stalled writer)."""
    s = store(redis_server, tmp_path)
    try:
        assert s.reserve_spend("acme", "req_1", 1.0, 2.0)
        client = redis_server.client()
        seconds, micros = client.time()
        left = float(client.zscore("tiergate:holds:acme", "req_1") or 0) - seconds - micros / 1e6
        assert 295 < left <= 300
        assert 0 < client.ttl("tiergate:hold:acme") <= 300
    finally:
        s.close()


def test_a_request_longer_than_the_hold_ttl_keeps_its_budget_hold(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """A budget hold lapsed ``HOLD_TTL_S`` after it was taken, however long its request ran:
    during a stream longer than that (15 minutes) another replica saw the budget free again
    and spent it. Each replica renews the holds of its requests in flight; the hold goes when
    the record comes, and the hold of a replica that stopped (died) still lapses."""
    a = store(redis_server, tmp_path / "a", hold_ttl_s=3)
    b = store(redis_server, tmp_path / "b", hold_ttl_s=3)
    try:
        assert a.reserve_spend("acme", "req_long", 1.0, 1.0)
        time.sleep(4.5)  # past the hold's TTL, its request still running on a
        assert not b.reserve_spend("acme", "req_b1", 0.5, 1.0)
        assert redis_server.client().hget("tiergate:hold:acme", "req_long") == b"1.0"
        a.submit(outcome("req_long", tenant="acme", cost_usd=0.25))
        assert a.flush(10)
        assert b.reserve_spend("acme", "req_b2", 0.75, 1.0)  # the record settled the hold
        assert not a.reserve_spend("acme", "req_a1", 0.5, 1.0)
        b.close()  # b stops with req_b2 in flight, as a replica that dies
        time.sleep(4.5)
        assert a.reserve_spend("acme", "req_a2", 0.5, 1.0)  # b's hold lapsed
    finally:
        a.close(timeout_s=0.5)
        b.close(timeout_s=0.5)


@contextlib.contextmanager
def _clock_off_by(monkeypatch: pytest.MonkeyPatch, seconds: float) -> Any:
    """This host's wall clock ``seconds`` ahead (behind, if negative) while inside: a replica
    whose clock is off, as one without NTP drifts."""
    real = time.time
    with monkeypatch.context() as clock:
        clock.setattr(time, "time", lambda: real() + seconds)
        yield


@pytest.mark.parametrize("skew", [600.0, -600.0])
def test_a_replica_whose_clock_is_off_neither_frees_nor_loses_budget_holds(
    redis_server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, skew: float
) -> None:
    """A hold's expiry was this replica's clock plus the TTL, and each reserve dropped the
    holds whose expiry had passed by its own clock: with holds lasting 5 minutes, a replica 10
    minutes fast freed the others' holds at once, and the holds of one 10 minutes slow (taken
    or renewed) had lapsed for every other replica when they were made. Expiries are Redis's
    clock now, so both holds count on both replicas, whatever their clocks say."""
    honest = RedisOutcomeStore(redis_server.url, journal=tmp_path / "a.jsonl", hold_ttl_s=300)
    off = RedisOutcomeStore(redis_server.url, journal=tmp_path / "b.jsonl", hold_ttl_s=300)
    honest.connect()
    off.connect()
    try:
        assert honest.reserve_spend("acme", "req_honest", 0.5, 1.0)
        with _clock_off_by(monkeypatch, skew):
            assert off.reserve_spend("acme", "req_off", 0.5, 1.0)
            off._holds_renewed -= 300  # its refresh renews its holds now
            off._refresh()
            assert not off.reserve_spend("acme", "req_off_2", 0.25, 1.0)
        assert not honest.reserve_spend("acme", "req_honest_2", 0.25, 1.0)
        holds = redis_server.client().hgetall("tiergate:hold:acme")
        assert holds == {b"req_honest": b"0.5", b"req_off": b"0.5"}
    finally:
        honest.close()
        off.close()


@pytest.mark.parametrize("skew", [60.0, -60.0])
def test_a_replica_whose_clock_is_off_counts_and_is_counted_among_the_replicas(
    redis_server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, skew: float
) -> None:
    """Heartbeats were each replica's clock, and each refresh dropped those older than 15 s by
    its own: a replica a minute fast counted itself alone, and one a minute slow was dropped by
    the others, so in an outage each spent a larger share of the budgets and rate limits than
    its own. Heartbeats are Redis's clock now."""
    honest = RedisOutcomeStore(redis_server.url, journal=tmp_path / "a.jsonl")
    off = RedisOutcomeStore(redis_server.url, journal=tmp_path / "b.jsonl")
    honest.connect()
    off.connect()
    try:
        honest._refresh()
        with _clock_off_by(monkeypatch, skew):
            off._refresh()
        honest._refresh()
        assert (honest.replicas, off.replicas) == (2, 2)
    finally:
        honest.close()
        off.close()


def test_scripts_that_read_redis_s_clock_run_where_it_replicates_scripts_verbatim(
    tmp_path: Path,
) -> None:
    """Redis 6.2 set to replicate scripts whole (``lua-replicate-commands no``) refuses a
    write after ``TIME`` in a script unless the script asks for effects replication: budget
    holds (which read Redis's clock) would fall back to each replica's view, and an erasure
    could not rebuild a stream with a consumer group (whose copy reads it too). Redis 7
    always replicates effects and takes the same scripts."""
    with RedisServer(tmp_path / "redis", "--lua-replicate-commands", "no") as server:
        s = store(server, tmp_path)
        try:
            assert s.reserve_spend("acme", "req_a", 1.0, 1.0)
            assert not s.reserve_spend("acme", "req_b", 0.25, 1.0)
            assert s.connected and s.replicas == 1
            alice, _, _ = three_people(s)
            server.client().xgroup_create("tiergate:outcomes", "exporter", id="0")
            server.client().xreadgroup("exporter", "e1", {"tiergate:outcomes": ">"})
            assert s.erase([alice.id]).stream is None
        finally:
            s.close()


def test_a_closed_replica_stops_counting_towards_the_shares(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    a = store(redis_server, tmp_path / "a")
    b = store(redis_server, tmp_path / "b")
    try:
        assert wait_for(lambda: a.replicas == b.replicas == 2, timeout_s=10)
        a.close()
        assert wait_for(lambda: b.replicas == 1, timeout_s=10)
        redis_server.stop()  # alone now: the whole budget, as a single replica
        assert sum(b.reserve_spend("acme", f"r{i}", 0.25, 1.0) for i in range(8)) == 4
    finally:
        b.close(timeout_s=0.5)


def test_an_outage_and_its_end_are_one_line_each(
    redis_server: RedisServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Requests through a Redis outage (each holding budget, recording, releasing) log one
    line when Redis goes away and one when it is back, saying what was written and replayed
    from the journal; not a line per request."""
    s = store(redis_server, tmp_path, buffer_size=20, batch=10)
    caplog.set_level("INFO", logger="tiergate.outcomes")
    try:
        redis_server.stop()
        for i in range(60):  # about two seconds: past the holds' one-second retry
            s.reserve_spend("acme", f"req_{i}", 0.001, 10.0)
            s.submit(outcome(tenant="acme"))
            s.release_spend(f"req_{i}")
            time.sleep(0.03)
        assert s.spilled == 60  # each went to the journal: Redis was known to be down
        redis_server.start()
        assert s.flush(20)
        assert wait_for(lambda: len(caplog.records) >= 2, 10)
    finally:
        s.close(timeout_s=1.0)
    lines = [r.getMessage() for r in caplog.records if r.name == "tiergate.outcomes"]
    assert len(lines) == 2, lines
    assert lines[0].startswith("outcome store unavailable, buffering outcomes")
    assert lines[1].startswith("outcome store available again after ")
    assert "60 outcome items written since it went down, 60 of them replayed" in lines[1]


def test_in_an_outage_records_go_to_the_journal_as_they_come(
    redis_server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once the store knows Redis is down, a record is on disk when ``submit`` returns, not
    held in memory until the buffer is full: a crash (SIGKILL, OOM) of the process then loses
    at most what was submitted before the outage was noticed. The writer does not read the
    journal back while Redis is still down (a long outage's journal, parsed at each retry)."""
    from router import outcomes_redis

    reads: list[Path] = []
    read_journal = outcomes_redis._read_journal
    monkeypatch.setattr(
        outcomes_redis, "_read_journal", lambda path: reads.append(path) or read_journal(path)
    )
    s = store(redis_server, tmp_path)  # a buffer of 100,000
    try:
        redis_server.stop()
        s.reserve_spend("acme", "req_0", 0.01, None)  # a budget hold finds Redis gone
        assert not s.connected
        for _ in range(10):
            s.submit(outcome(tenant="acme"))
        assert len((tmp_path / "journal.jsonl").read_text().splitlines()) == 10
        time.sleep(1.5)  # the writer retries meanwhile
        assert reads == []
        redis_server.start()
        assert s.flush(20)
        assert s.count() == 10
    finally:
        s.close(timeout_s=1.0)


def test_sqlite_store_labels_and_purge(tmp_path: Path) -> None:
    s = SQLiteOutcomeStore(tmp_path / "o.db")
    s.start()
    try:
        old = outcome(tenant="acme", cost_usd=0.001, ts=time.time() - 40 * 86400)
        new = outcome(tenant="acme", cost_usd=0.001)
        s.submit(old)
        s.submit(new)
        assert s.get(new.id) is not None  # visible even before the writer has written it
        s.label(Label(new.id, "acme", "shadow", 1.0, time.time(), cost_usd=0.5))
        s.label(Label(old.id, "acme", "feedback", 0.0, old.ts))
        assert s.flush(10)
        assert [x["source"] for x in s.labels()] == ["feedback", "shadow"]
        assert abs(s.spend_today("acme") - (0.001 + 0.5)) < 1e-9
        assert s.purge(time.time() - 30 * 86400) == 1
        assert s.count() == 1 and [x["source"] for x in s.labels()] == ["shadow"]
        # The judging spend an erasure keeps goes with the retention period too.
        s.erase([new.id])
        assert abs(s.erased_judging_usd(0.0) - 0.5) < 1e-9
        s.purge(time.time() + 60)
        assert s.erased_judging_usd(0.0) == 0.0
    finally:
        s.close()


def test_cli_outcomes_reads_redis_when_configured(
    redis_server: RedisServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    s = store(redis_server, tmp_path)
    rec = outcome(tenant="acme")
    s.submit(rec)
    assert s.flush(10)
    s.close()
    monkeypatch.setenv("TIERGATE_REDIS_URL", redis_server.url)
    monkeypatch.setenv("TIERGATE_SQLITE_PATH", str(tmp_path / "absent.db"))
    assert main(["outcomes", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["id"] for r in rows] == [rec.id]


def test_both_stores_give_the_dashboard_the_same_window(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """Records, fronts and labelled tiers read back the same from either store, so the one
    dashboard aggregate gives the same page."""
    now = time.time()
    records = []
    for i in range(12):
        rec = outcome(tenant="acme", cost_usd=0.01 * i, ts=now - 600 + i * 40)
        rec.tier = "closed" if i % 3 == 0 else "local"
        rec.counterfactual_cost_usd = 0.02 * i
        rec.status = "error" if i == 5 else "ok"
        rec.fallback = "closed->local" if i == 7 else None
        rec.policy_version = "p2" if i > 8 else "p1"
        rec.front = ("chat", "messages", "responses")[i % 3]
        records.append(rec)
    labels = [
        Label(records[1].id, "acme", "feedback", None, now, quality=0.8),
        Label(records[2].id, "acme", "shadow", 0.25, now, cost_usd=0.0125),
        Label(records[3].id, "acme", "feedback", None, now, quality=0.4),
        Label("req_gone", "acme", "feedback", None, now, quality=0.1),  # its record is not stored
    ]
    sqlite = SQLiteOutcomeStore(tmp_path / "o.db")
    sqlite.start()
    rstore = store(redis_server, tmp_path)
    try:
        summaries, tiered = [], []
        for s in (sqlite, rstore):
            for rec in records:
                s.submit(rec)
            for label in labels:
                s.label(label)
            assert s.flush(10)
            window = s.window(now - 900)
            assert [(r.id, r.front) for r in window] == [(r.id, r.front) for r in records]
            summaries.append(store_summary(s, now - 900, 60, now + 1))
            tiered.append(sorted(s.tiered_labels(now), key=lambda t: (str(t.tier), t.source)))
            assert s.tiered_labels(now + 1) == []
            # One tenant's view (the dashboard's ?tenant=): every label here is acme's.
            assert sorted(s.tiered_labels(now, "acme")) == sorted(s.tiered_labels(now))
            assert s.tiered_labels(now, "globex") == []
            assert store_summary(s, now - 900, 60, now + 1, "globex")["totals"]["requests"] == 0
        a, b = summaries
        assert a["totals"] == b["totals"] and a["by_front"] == b["by_front"]
        assert a["totals"]["requests"] == 12 and a["totals"]["errors"] == 1
        assert a["buckets"] == b["buckets"]
        assert a["problems"] == b["problems"] and a["versions"] == b["versions"]
        assert (
            tiered[0]
            == tiered[1]
            == [
                TieredLabel("closed", "feedback", None, 0.4),
                TieredLabel("local", "feedback", None, 0.8),
                TieredLabel("local", "shadow", 0.25, None, 0.0125),
            ]
        )
    finally:
        sqlite.close()
        rstore.close()


def test_a_records_front_is_stored(redis_server: RedisServer, tmp_path: Path) -> None:
    s = store(redis_server, tmp_path)
    try:
        served = outcome(tenant="acme", front="messages")
        s.submit(served)
        assert s.flush(10)
        got = s.get(served.id)
        assert got is not None and got["front"] == "messages"
        assert [r.front for r in s.window(0.0)] == ["messages"]
    finally:
        s.close()


async def one_purge_round(store: RedisOutcomeStore, days: int | None) -> None:
    """Run the purge loop for its first round only (it then sleeps for an hour)."""
    task = asyncio.create_task(purge_loop(store, lambda: days, 3600))
    await asyncio.sleep(0.5)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def test_background_reads_in_an_outage_log_one_line_not_a_traceback(
    redis_server: RedisServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The purge and the threshold calibration run while Redis is down: each round logs one
    warning that says why (the writer already reported the outage), not an ERROR traceback
    (3.7 KB every 15 s on a served instance)."""
    from types import SimpleNamespace

    from router.app import _calibrate

    s = store(redis_server, tmp_path)
    redis_server.stop()
    gateway = SimpleNamespace(outcomes=s, recalibrate=lambda scores: None)

    async def both() -> None:
        calibrating = asyncio.create_task(_calibrate(gateway, 3600))  # type: ignore[arg-type]
        await one_purge_round(s, 30)
        calibrating.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await calibrating

    try:
        caplog.set_level("WARNING")
        asyncio.run(both())
        skipped = {r.getMessage().split(":")[0]: r for r in caplog.records if "skipped" in r.msg}
        assert set(skipped) == {"outcome purge skipped", "threshold calibration skipped"}
        assert all(r.levelname == "WARNING" and r.exc_info is None for r in skipped.values())
        assert not [r for r in caplog.records if r.levelname == "ERROR"]
    finally:
        s.close(timeout_s=0.5)


def test_record_ttl_follows_the_policys_retention(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """Keys expire after the policy's retention_days, or never when it is null (the purge
    then decides); the purge loop hands the store the policy's value."""
    s = store(redis_server, tmp_path)
    raw = redis.Redis.from_url(redis_server.url)
    try:
        asyncio.run(one_purge_round(s, None))  # retention_days: null
        kept = outcome(tenant="acme")
        s.submit(kept)
        s.label(Label(kept.id, "acme", "feedback", 1.0, time.time()))
        assert s.flush(10)
        assert raw.ttl(s.key("outcome", kept.id)) == -1  # no expiry
        assert raw.ttl(s.key("label", kept.id)) == -1
        asyncio.run(one_purge_round(s, 90))  # retention_days: 90
        later = outcome(tenant="acme")
        s.submit(later)
        s.label(Label(later.id, "acme", "feedback", 1.0, time.time()))
        assert s.flush(10)
        for key in (s.key("outcome", later.id), s.key("label", later.id)):
            assert 89 * 86400 < raw.ttl(key) <= 90 * 86400
    finally:
        raw.close()
        s.close()


def test_an_unwritable_journal_never_raises_into_the_request_path(tmp_path: Path) -> None:
    """Redis down and the journal's directory unusable (its parent is a file): submit still
    never raises; outcomes wait in memory up to 4x the buffer, then are dropped, counted."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    s = RedisOutcomeStore("redis://127.0.0.1:1/0", journal=blocker / "journal.jsonl", buffer_size=2)
    s.start()
    try:
        for _ in range(10):
            s.submit(outcome(tenant="acme"))
        assert s.journal_errors >= 1 and s.spilled == 0
        assert s.dropped == 2  # 8 held (4 x 2), the last 2 lost and counted
    finally:
        s.close(timeout_s=0.5)
    assert s.dropped == 10  # Redis never came back and nothing could be journaled


def test_a_journal_replayed_at_start_gets_the_policys_retention(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    journal = tmp_path / "journal.jsonl"
    down = RedisOutcomeStore("redis://127.0.0.1:1/0", journal=journal, buffer_size=1)
    down.start()
    kept = outcome(tenant="acme")
    down.submit(kept)
    down.close(timeout_s=0.5)  # Redis never answered: the record waits in the journal
    assert journal.exists() and down.dropped == 0
    up = RedisOutcomeStore(redis_server.url, journal=journal)
    start_outcome_store(up, None)  # retention_days: null, known before the replay
    raw = redis.Redis.from_url(redis_server.url)
    try:
        assert up.flush(10)
        assert up.get(kept.id) is not None
        assert raw.ttl(up.key("outcome", kept.id)) == -1
    finally:
        raw.close()
        up.close()


def test_a_lone_surrogate_cannot_stall_the_redis_writer(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    # A record Redis could not encode was retried forever as if Redis were down, and every
    # record behind it waited.
    s = store(redis_server, tmp_path)
    try:
        bad = outcome(tenant="acme\ud800")
        bad.prompt = "Hi \ud800"
        bad.signals = {"note": "x\udfffy"}
        after = outcome(tenant="acme")
        s.submit(bad)
        s.submit(after)
        assert s.flush(10)
        assert s.health()["writer_alive"] is True
        stored = json.loads(redis_server.client().get(s.key("outcome", bad.id)))
        assert stored["prompt"] == "Hi \ufffd" and stored["tenant"] == "acme\ufffd"
        assert stored["signals"] == {"note": "x\ufffdy"}
        assert s.count() == 2 and s.count("acme\ufffd") == 1
    finally:
        s.close()


def test_a_record_redis_cannot_take_is_counted_and_the_rest_are_written(
    redis_server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = store(redis_server, tmp_path)
    real = s._queue_record
    poison = outcome(tenant="acme")

    def queue_record(pipe: Any, rec: OutcomeRecord) -> None:
        if rec.id == poison.id:
            raise ValueError("cannot encode this one")
        real(pipe, rec)

    monkeypatch.setattr(s, "_queue_record", queue_record)
    try:
        good = [outcome(tenant="acme"), outcome(tenant="acme")]
        s.submit(good[0])
        s.submit(poison)
        s.submit(good[1])
        assert s.flush(10)
        assert s.health()["unwritable"] == 1 and s.health()["writer_alive"] is True
        assert s.count() == 2 and s.get(poison.id) is None
    finally:
        s.close()


def test_a_dead_redis_writer_shows_in_health_and_is_restarted(
    redis_server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = store(redis_server, tmp_path)
    real = s._write
    failures = [SystemExit("injected: the writer thread dies")]

    def write(batch: list[Any]) -> dict[str, float]:
        if failures:
            raise failures.pop()
        return real(batch)

    monkeypatch.setattr(s, "_write", write)
    try:
        first = outcome(tenant="acme")
        s.submit(first)
        assert wait_for(lambda: not s.health()["writer_alive"])
        assert "SystemExit" in str(s.health()["last_error"])
        assert s.check_writer() is not None
        assert s.health()["restarts"] == 1
        second = outcome(tenant="acme")
        s.submit(second)
        assert s.flush(10)
        assert s.count() == 2  # the batch the dead writer held was kept and written
    finally:
        s.close()


def test_both_stores_give_the_dashboard_the_window_s_cascades(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """The cascade panel's escalation rate and median hold-back come from the window's rows,
    read the same from either store; records outside the window do not count."""
    now = time.time()
    parts = [
        {"decision": "kept", "confidence": 0.9, "hold_back_ms": 30.0},
        {"decision": "escalated", "confidence": 0.1, "hold_back_ms": 10.0},
        {"decision": "escalation-failed", "confidence": 0.2, "hold_back_ms": None},
        {"decision": "kept", "confidence": 0.8, "hold_back_ms": 20.0},
        None,
    ]
    records = [outcome(ts=now - 100 + i, cascade=part) for i, part in enumerate(parts)]
    records.append(outcome(ts=now - 2000, cascade={"decision": "escalated"}))  # before it
    sqlite = SQLiteOutcomeStore(tmp_path / "o.db")
    sqlite.start()
    rstore = store(redis_server, tmp_path)
    try:
        for s in (sqlite, rstore):
            for rec in records:
                s.submit(rec)
            assert s.flush(10)
            rows = s.window(now - 900)
            assert [r.cascade_decision for r in rows] == [p and p["decision"] for p in parts]
            assert [r.hold_back_ms for r in rows] == [p and p["hold_back_ms"] for p in parts]
            cascade = store_summary(s, now - 900, 60, now + 1)["cascade"]
            assert cascade == {
                "requests": 4,
                "escalated": 2,
                "escalation_rate": 0.5,
                "hold_back_ms_p50": 20.0,
            }
    finally:
        sqlite.close()
        rstore.close()


def _everything_in(client: redis.Redis) -> str:
    """Every key and value in Redis, and the outcomes stream's entries, as one text."""
    parts: list[str] = []
    for key in client.scan_iter():
        kind = client.type(key)
        value: object = {
            b"string": client.get,
            b"hash": client.hgetall,
            b"zset": lambda k: client.zrange(k, 0, -1),
            b"set": client.smembers,
            b"list": lambda k: client.lrange(k, 0, -1),
            b"stream": client.xrange,
        }[kind](key)
        parts.append(f"{key!r} {value!r}")
    return "\n".join(parts)


def test_erasing_requests_or_a_tenant_removes_them_from_every_structure(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    s = store(redis_server, tmp_path)
    client = redis_server.client()
    try:
        alice, carol, _ = three_people(s)
        assert [lb["comment"] for lb in s.labels_of(alice.id)] == [f"{alice.prompt} (comment)"]
        # What `tiergate outcomes delete` opens, beside the running replica s: it holds the
        # journal, which is empty, so there is nothing for it to write back.
        cli = RedisOutcomeStore(redis_server.url, journal=s.journal)
        cli.connect()

        assert cli.erase([alice.id])[:5] == (1, 1, 0, 0, 0)
        held = _everything_in(client)
        assert "Alice Smith" not in held and alice.id not in held and "Carol Jones" in held
        assert s.get(alice.id) is None and s.labels_of(alice.id) == []
        assert s.count() == 2 and s.count("acme") == 1 and len(s.labels()) == 2

        assert cli.erase(tenant="acme")[:5] == (1, 1, 0, 0, 0)
        held = _everything_in(client)
        assert "Carol Jones" not in held and carol.id not in held and "acme" not in held
        assert (
            "Bob Brown" in held
            and s.count() == 1
            and [lb["tenant"] for lb in s.labels()] == ["globex"]
        )
        cli.close()
    finally:
        s.close()


def test_a_request_made_during_its_tenant_s_erasure_is_found_by_the_next_one(
    redis_server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request the tenant makes once its erasure has begun is its own again, and recorded.
    The erasure then deleted the tenant's whole time index, this request's place included:
    its record stayed, but `tiergate outcomes --tenant` no longer listed it and the next
    `outcomes delete --tenant` did not find it, so it outlived the tenant's next erasure."""
    client = redis_server.client()
    s = store(redis_server, tmp_path)
    cli = RedisOutcomeStore(redis_server.url, journal=s.journal)
    cli.connect()
    try:
        three_people(s)
        erin = outcome(tenant="acme", ts=time.time() + 1, prompt="Erin Black asks for a loan")
        costs = cli._costs

        def meanwhile(ids: list[str]) -> Any:
            s.submit(erin)  # begun after the tombstone: acme's own again
            assert s.flush(10)
            return costs(ids)

        monkeypatch.setattr(cli, "_costs", meanwhile)
        assert cli.erase(tenant="acme")[:2] == (2, 2)
        monkeypatch.undo()
        assert client.exists(f"tiergate:outcome:{erin.id}") == 1
        assert [r["id"] for r in cli.recent(tenant="acme")] == [erin.id]
        assert b"acme" in client.smembers("tiergate:tenants")
        assert cli.erase(tenant="acme")[:2] == (1, 0)
        assert client.exists(f"tiergate:outcome:{erin.id}") == 0
        assert b"Erin Black" not in _dumped(client)
    finally:
        cli.close()
        s.close()


def test_erasing_a_tenant_leaves_its_name_nowhere_and_its_spend_in_the_budget(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """After `tiergate outcomes delete --tenant acme`, `tiergate:spend:<day>` still had a field
    acme (today's and yesterday's) and `tiergate:hold:acme` / `tiergate:holds:acme` held a
    request in flight: Redis named the erased tenant for up to two days. Its spend now counts
    under its hash, and the budget still refuses what it would have refused."""
    s = store(redis_server, tmp_path / "a")
    client = redis_server.client()
    try:
        s.submit(outcome(tenant="acme", cost_usd=0.5))
        s.submit(outcome(tenant="acme", cost_usd=0.25, ts=time.time() - 86400))  # yesterday
        s.submit(outcome(tenant="globex", cost_usd=1.0))
        assert s.flush(10)
        assert s.reserve_spend("acme", "req_in_flight", 0.125, 10.0)
        in_flight = outcome("req_in_flight", tenant="acme", ts=time.time() - 1, cost_usd=0.125)
        assert "acme" in _everything_in(client)
        cli = RedisOutcomeStore(redis_server.url, journal=tmp_path / "cli" / "journal.jsonl")
        cli.connect()
        assert cli.erase(tenant="acme")[:2] == (2, 0)
        cli.close()
        held = _everything_in(client)
        assert "acme" not in held and "globex" in held
        s.submit(in_flight)  # it settles after the erasure: refused, and paid for
        assert s.flush(10)
        held = _everything_in(client)
        assert "acme" not in held and "req_in_flight" not in held
        b = store(redis_server, tmp_path / "b")  # a replica that knows only what Redis holds
        try:
            assert b.spend_today("acme") == pytest.approx(0.625)
            assert b.spend_today("globex") == pytest.approx(1.0)
            assert not b.reserve_spend("acme", "req_over", 0.01, 0.6)  # still over its budget
            assert b.reserve_spend("acme", "req_under", 0.01, 0.7)  # its own again, by name
            assert "acme" in _everything_in(client)
        finally:
            b.close()
    finally:
        s.close()


def test_nothing_written_after_an_erasure_brings_it_back(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """A label (a shadow judgement, an escalation) or the record of a request in flight that a
    replica wrote after `tiergate outcomes delete` put the erased request back in Redis."""
    s = store(redis_server, tmp_path)
    client = redis_server.client()
    try:
        cli = RedisOutcomeStore(redis_server.url, journal=s.journal)
        cli.connect()
        write_late(s, cli.erase)
        cli.close()
        held = _everything_in(client)
        assert "Dana White" not in held and "Erin Black" not in held and "Bob Brown" in held
        tombstones = list(client.scan_iter("tiergate:erased:*"))
        assert len(tombstones) == 2  # the tenant's and the request's, hashed
        spend = {k: client.hgetall(k) for k in client.scan_iter("tiergate:erased-spend:*")}
        assert spend and "acme" not in str(spend) and "req_" not in str(spend)  # hashed too
        assert all(0 < client.ttl(k) <= 30 * 86400 for k in tombstones)  # ERASURE_KEPT_S
    finally:
        s.close()


def test_a_request_answered_across_an_erasure_is_erased_too(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """A stream of the tenant's that began before `tiergate outcomes delete --tenant` and
    ended after it was written to Redis under the tenant's name (its record, the ts index,
    the spend field), as the record is made when a request ends."""
    s = store(redis_server, tmp_path)
    client = redis_server.client()
    try:
        cli = RedisOutcomeStore(redis_server.url, journal=s.journal)
        cli.connect()
        answer_across_an_erasure(s, cli.erase, lambda: _everything_in(client))
        cli.close()
    finally:
        s.close()


def test_a_label_on_a_request_begun_before_an_erasure_is_refused(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """During a rolling upgrade a replica running the record script before this one records a
    request of acme's answered across acme's erasure (it compares when the request ended); a
    label that came for it later was written too, as the label script dated the request by
    its record's ts."""
    s = store(redis_server, tmp_path)
    client = redis_server.client()
    try:
        label_across_an_erasure(s, lambda name, ts: client.set(f"tiergate:erased:{name}", repr(ts)))
    finally:
        s.close()


def test_a_journal_replayed_after_an_erasure_does_not_bring_it_back(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """Replica A journals a tenant's record and labels during an outage and stops; the
    erasure runs where A's journal cannot be seen (another pod); A's next start replayed the
    journal and the tenant's prompt was back in Redis."""
    a = store(redis_server, tmp_path / "a")
    alice = outcome(tenant="acme", prompt="Alice Smith asks about her lease")
    a.submit(alice)
    assert a.flush(10)
    redis_server.stop()
    a.label(Label(alice.id, "acme", "feedback", 1.0, time.time(), comment="call me, Alice"))
    a.submit(outcome(tenant="acme", prompt="Dana White asks for a loan"))
    a.submit(outcome(tenant="globex", prompt="Bob Brown asks about his car"))
    a.close(timeout_s=0.5)
    redis_server.start()
    cli = RedisOutcomeStore(redis_server.url, journal=tmp_path / "cli" / "journal.jsonl")
    cli.connect()
    assert cli.erase(tenant="acme")[:3] == (1, 0, 0)
    cli.close()
    again = store(redis_server, tmp_path / "a")  # replays its journal
    try:
        assert again.flush(10)
        held = _everything_in(redis_server.client())
        assert "Alice" not in held and "Dana White" not in held and "Bob Brown" in held
        assert again.health()["refused_erased"] == 2
    finally:
        again.close()


def test_erasing_a_tenant_drops_its_items_from_a_journal_left_behind(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    # A replica stopped during an outage leaves its records in the journal; the next start
    # replays them. An erasure in between must not be undone by that replay.
    s = store(redis_server, tmp_path)
    redis_server.stop()
    s.submit(outcome(tenant="acme", prompt="Alice Smith asks about her lease"))
    s.submit(outcome(tenant="globex", prompt="Bob Brown asks about his car"))
    s.close(timeout_s=0.5)
    journal = tmp_path / "journal.jsonl"
    assert "Alice Smith" in journal.read_text()
    redis_server.start()
    reader = RedisOutcomeStore(redis_server.url, journal=journal)
    reader.connect()  # as the CLI does: no writer, no replay
    try:
        _, running = lock_beside(journal)  # as a Tiergate started on it would
        assert reader.erase(tenant="acme")[:5] == (0, 0, None, 0, 0)  # it would write them back
        # it holds nothing of initech's
        assert reader.erase(tenant="initech")[:5] == (0, 0, 0, 0, 0)
        assert running is not None
        running.close()
        assert reader.erase(tenant="acme")[:5] == (0, 0, 1, 0, 0)
    finally:
        reader.close()
    assert "Alice Smith" not in journal.read_text()
    again = store(redis_server, tmp_path)  # replays what is left
    try:
        assert again.flush(10)
        assert [r["tenant"] for r in again.recent()] == ["globex"]
    finally:
        again.close()


def test_erasing_from_a_journal_left_with_a_line_cut_short(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """A journal a killed process left, its last line cut short, with no Tiergate running:
    the erasure said "a running Tiergate holds the outage journal" and kept the tenant's
    items for the next start to write back. It now sets the cut line aside and erases."""
    alice = outcome(tenant="acme", prompt="Alice Smith asks about her lease")
    bob = outcome(tenant="globex", prompt="Bob Brown asks about his car")
    lines = [json.dumps({"kind": "record", "data": r.as_dict()}) + "\n" for r in (alice, bob)]
    cut = json.dumps({"kind": "record", "data": outcome(tenant="acme").as_dict()})[:60]
    journal = tmp_path / "journal.jsonl"
    journal.write_text("".join(lines) + cut, encoding="utf-8")
    reader = RedisOutcomeStore(redis_server.url, journal=journal)
    reader.connect()  # as the CLI does: no writer, no replay
    try:  # the cut line holds only part of a request id: it stays, and is counted
        assert reader.erase(tenant="acme")[:5] == (0, 0, 1, 0, 1)
    finally:
        reader.close()
    assert "Alice Smith" not in journal.read_text() and "Bob Brown" in journal.read_text()
    assert (tmp_path / "journal.jsonl.unreadable").read_text(encoding="utf-8") == cut + "\n"


def test_cli_exports_and_erases_on_redis(
    redis_server: RedisServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    s = store(redis_server, tmp_path)
    alice = outcome(tenant="acme", prompt="Alice Smith asks about her lease")
    bob = outcome(tenant="globex")
    s.submit(alice)
    s.submit(bob)
    s.label(Label(alice.id, "acme", "feedback", 1.0, time.time(), comment="call me, Alice"))
    assert s.flush(10)
    s.close()
    monkeypatch.setenv("TIERGATE_REDIS_URL", redis_server.url)
    monkeypatch.setenv("TIERGATE_OUTCOME_JOURNAL_PATH", str(tmp_path / "cli-journal.jsonl"))
    assert main(["outcomes", "--json", "--labels", "--request-id", alice.id]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["id"], r["prompt"]) for r in rows] == [(alice.id, alice.prompt)]
    assert [lb["comment"] for lb in rows[0]["labels"]] == ["call me, Alice"]
    assert main(["outcomes", "delete", "--request-id", alice.id]) == 0
    assert "deleted 1 records and 1 labels" in capsys.readouterr().out
    assert main(["outcomes", "--json", "--request-id", alice.id]) == 0
    assert capsys.readouterr().out == ""
    assert main(["outcomes", "delete", "--tenant", "globex"]) == 0
    assert "deleted 1 records and 0 labels of tenant globex" in capsys.readouterr().out
    assert main(["outcomes", "delete"]) == 2  # no filter: nothing is deleted
    assert "name --request-id, --tenant or --compact" in capsys.readouterr().err


def test_erasing_deletes_the_journal_lines_set_aside_that_name_them(
    redis_server: RedisServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Journal lines that could not be read are moved to NAME.unreadable, which `tiergate
    outcomes delete` did not read: an erased tenant's prompts stayed in it. The lines that name
    an erased request or tenant now go, and the command says what it deleted and what is left."""

    def line(item: OutcomeRecord | Label) -> str:  # as a replica journals it
        kind = "record" if isinstance(item, OutcomeRecord) else "label"
        data = item.as_dict()
        return json.dumps({"kind": kind, "data": data}, separators=(",", ":"), ensure_ascii=False)

    alice = outcome(tenant="acme", prompt="Alice Smith asks about her lease")
    dana = outcome(tenant="acme", prompt="Dana White asks for a loan")
    bob = outcome(tenant="globex", prompt="Bob Brown asks about his car")
    erin = Label("req_erin", "initech", "feedback", 1.0, time.time(), comment="Erin Black")
    aside = tmp_path / "journal.jsonl.unreadable"
    aside.write_text(
        line(alice)[:-10] + "\n"  # cut short at its end
        + line(bob)[:-10] + "\n"
        + line(bob)[:40] + line(dana) + "\n"  # a cut line, then the next process's append
        + line(erin)[:60] + "\n",  # cut short before its tenant
        encoding="utf-8",
    )  # fmt: skip
    monkeypatch.setenv("TIERGATE_REDIS_URL", redis_server.url)
    monkeypatch.setenv("TIERGATE_OUTCOME_JOURNAL_PATH", str(tmp_path / "journal.jsonl"))

    assert main(["outcomes", "delete", "--tenant", "acme"]) == 0
    out = capsys.readouterr().out
    assert f"and 2 unreadable journal lines that name them from {aside}" in out
    assert f"{aside} keeps 2 unreadable journal lines that do not name them" in out
    held = aside.read_text(encoding="utf-8")
    assert "Alice Smith" not in held and "Dana White" not in held and "Bob Brown" in held

    assert main(["outcomes", "delete", "--request-id", "req_erin"]) == 0
    assert "and 1 unreadable journal lines" in capsys.readouterr().out
    assert main(["outcomes", "delete", "--tenant", "globex"]) == 0
    out = capsys.readouterr().out
    assert "and 1 unreadable journal lines" in out and "keeps" not in out
    assert not aside.exists()


def _aof(server: RedisServer) -> bytes:
    """What ``server``'s append-only file holds (one file before Redis 7, a directory since).
    A test sets ``rdbcompression no`` first, so that text a rewrite keeps reads as text."""
    return b"".join(
        p.read_bytes() for p in server.workdir.rglob("*") if p.is_file() and "aof" in p.name
    )


def _no_rewrite_pending(client: redis.Redis) -> bool:
    info = client.info("persistence")
    return not info["aof_rewrite_in_progress"] and not info["aof_rewrite_scheduled"]


def _alice_with_a_comment(s: RedisOutcomeStore) -> OutcomeRecord:
    """Alice's record, labelled with a comment that names her; stored."""
    alice = outcome(tenant="acme", prompt="Alice Smith asks about her lease")
    s.submit(alice)
    s.label(Label(alice.id, "acme", "feedback", 1.0, time.time(), comment="call me, Alice"))
    assert s.flush(10)
    return alice


def _holds(aof: bytes, alice: OutcomeRecord) -> list[bool]:
    """Whether the append-only file holds Alice's label comment, her record's key (what wrote
    it), and her prompt (also in the stream, until the erasure rebuilt it)."""
    key = f"tiergate:outcome:{alice.id}".encode()
    return [b"call me, Alice" in aof, key in aof, str(alice.prompt).encode() in aof]


def test_erasing_rewrites_the_append_only_file(redis_server: RedisServer, tmp_path: Path) -> None:
    """A Redis that keeps an append-only file (the Helm chart's does) held every command that
    wrote an erased record and its labels, comments included, until something rewrote the
    file: the erasure deleted the keys and left their text on disk. Redis rewrites it now."""
    client = redis_server.client()
    client.config_set("rdbcompression", "no")  # what a rewrite keeps reads as text
    s = store(redis_server, tmp_path)
    alice = _alice_with_a_comment(s)
    s.submit(outcome(tenant="globex", prompt="Bob Brown asks about his car"))
    assert s.flush(10)
    assert _holds(_aof(redis_server), alice) == [True, True, True]
    cli = RedisOutcomeStore(redis_server.url, journal=s.journal)
    cli.connect()
    try:
        erased = cli.erase([alice.id])
    finally:
        cli.close()
        s.close()
    assert wait_for(lambda: _no_rewrite_pending(client), 20)
    held = _aof(redis_server)
    assert _holds(held, alice) == [False, False, False] and b"Bob Brown" in held
    assert erased[:2] == (1, 1) and erased.aof == "rewriting"
    client.config_set("appendonly", "no")  # no file to rewrite: nothing is asked or said
    cli = RedisOutcomeStore(redis_server.url, journal=tmp_path / "cli.jsonl")
    cli.connect()
    try:
        assert cli.erase(tenant="globex").aof is None
    finally:
        cli.close()


def test_an_erasure_during_a_rewrite_has_the_file_rewritten_after_it(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """A rewrite that began before the erasure copies the data as it was, the erased record
    included, and Redis refuses another while it runs: the erasure waits for it to end and
    asks again, so the file ends without the record."""
    s = store(redis_server, tmp_path)
    alice = _alice_with_a_comment(s)
    s.close()
    client = redis_server.client()
    client.config_set("rdbcompression", "no")  # what a rewrite keeps reads as text
    client.config_set("rdb-key-save-delay", 200_000)  # each key takes 0.2 s to copy
    client.bgrewriteaof()
    client.config_set("rdb-key-save-delay", 0)  # the rewrite running keeps its pace
    assert client.info("persistence")["aof_rewrite_in_progress"]
    cli = RedisOutcomeStore(redis_server.url, journal=tmp_path / "cli.jsonl")
    cli.connect()
    try:
        assert cli.erase([alice.id]).aof == "rewriting"
    finally:
        cli.close()
    assert wait_for(lambda: _no_rewrite_pending(client), 20)
    assert _holds(_aof(redis_server), alice) == [False, False, False]


def _user_without(server: RedisServer, command: str) -> str:
    """The URL of a Redis user that may run every command but ``command`` (an ACL; a category
    when it begins with ``@``)."""
    server.client().acl_setuser(
        "tiergate",
        enabled=True,
        passwords=["+secret"],
        categories=["+@all", *([f"-{command}"] if command.startswith("@") else [])],
        commands=[] if command.startswith("@") else [f"-{command}"],
        keys=["*"],
    )
    return f"redis://tiergate:secret@127.0.0.1:{server.port}/0"


@pytest.mark.parametrize("denied", ["config", "bgrewriteaof"])
def test_an_erasure_stands_where_redis_refuses_the_rewrite(
    redis_server: RedisServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    denied: str,
) -> None:
    """Where Tiergate's Redis user may not run ``CONFIG`` or ``BGREWRITEAOF`` (an ACL, a
    managed Redis), the erasure stands and the command says the file may still hold what it
    erased, and what to do."""
    client = redis_server.client()
    url = _user_without(redis_server, denied)
    s = RedisOutcomeStore(url, journal=tmp_path / "journal.jsonl")
    s.start()
    alice = outcome(tenant="acme", prompt="Alice Smith asks about her lease")
    s.submit(alice)
    assert s.flush(10)
    s.close()
    assert client.exists(f"tiergate:outcome:{alice.id}") == 1
    monkeypatch.setenv("TIERGATE_REDIS_URL", url)
    monkeypatch.setenv("TIERGATE_OUTCOME_JOURNAL_PATH", str(tmp_path / "cli-journal.jsonl"))
    assert main(["outcomes", "delete", "--request-id", alice.id]) == 0
    said = capsys.readouterr()
    assert "deleted 1 records and 0 labels" in said.out
    assert "append-only file may still hold them" in said.err
    assert ("CONFIG GET" if denied == "config" else "BGREWRITEAOF:") in said.err
    assert client.exists(f"tiergate:outcome:{alice.id}") == 0


def _stream(client: redis.Redis) -> list[tuple[bytes, dict[bytes, bytes]]]:
    return [(entry, fields) for entry, fields in client.xrange("tiergate:outcomes")]


def _dumped(client: redis.Redis) -> bytes:
    """The stream as Redis serialises it (an RDB snapshot, a rewritten append-only file, a new
    replica's copy): its blocks of entries, deleted ones included. Uncompressed, to read."""
    client.config_set("rdbcompression", "no")
    return client.dump("tiergate:outcomes") or b""


def _last_ids(client: redis.Redis) -> list[Any]:
    """The stream's last id and, since Redis 7, how many entries it was ever added."""
    info = client.xinfo_stream("tiergate:outcomes")
    return [info["last-generated-id"], info.get("entries-added")]


def test_an_erasure_leaves_no_byte_of_its_entries_in_the_stream(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """XDEL only marked an erased record's stream entry deleted: its JSON, prompt included,
    stayed in Redis's block of entries, and so in memory, in the rewritten append-only file
    and in what a new replica is sent. The stream is rebuilt without it; the other entries
    keep their IDs, and consumers (XREAD from a last-seen id, a consumer group) go on."""
    client = redis_server.client()
    s = store(redis_server, tmp_path)
    try:
        alice, carol, bob = three_people(s)
        before = _stream(client)
        seen = before[0][0]  # an XREAD consumer has read Alice's entry
        client.xgroup_create("tiergate:outcomes", "exporter", id="0")
        client.xreadgroup("exporter", "e1", {"tiergate:outcomes": ">"}, count=2)  # Alice, Carol
        client.xgroup_createconsumer("tiergate:outcomes", "exporter", "e2")
        last_id = _last_ids(client)
        assert b"Alice Smith" in _dumped(client)
        cli = RedisOutcomeStore(redis_server.url, journal=s.journal)
        cli.connect()
        try:
            erased = cli.erase([alice.id])
            assert erased[:2] == (1, 1)
            assert b"Alice Smith" not in _dumped(client) and erased.stream is None
            assert _stream(client) == before[1:]  # Carol's and Bob's, with their IDs
            group = client.xinfo_groups("tiergate:outcomes")[0]
            assert group["last-delivered-id"] == before[1][0] and group["consumers"] == 2
            pending = client.xpending_range("tiergate:outcomes", "exporter", "-", "+", 10)
            assert [(p["message_id"], p["consumer"]) for p in pending] == [(before[1][0], b"e1")]
            assert _last_ids(client) == last_id

            assert cli.erase([bob.id])[:2] == (1, 1)  # the last entry: new ids still follow it
            assert _last_ids(client) == last_id
            dana = outcome(tenant="acme", prompt="Dana White asks for a loan")
            s.submit(dana)
            assert s.flush(10)
            read = client.xread({"tiergate:outcomes": seen})[0][1]
            assert [f[b"id"].decode() for _, f in read] == [carol.id, dana.id]
            got = client.xreadgroup("exporter", "e1", {"tiergate:outcomes": ">"})[0][1]
            assert [f[b"id"].decode() for _, f in got] == [dana.id]
            assert cli.erase(tenant="acme")[:2] == (2, 1)  # every entry: an empty stream
            assert client.xlen("tiergate:outcomes") == 0 and b"Carol" not in _dumped(client)
        finally:
            cli.close()
    finally:
        s.close()
    assert wait_for(lambda: _no_rewrite_pending(client), 20)
    held = _aof(redis_server)  # _dumped turned compression off before the rewrite
    assert b"Alice Smith" not in held and b"Bob Brown" not in held


def _with_fillers(s: RedisOutcomeStore, n: int) -> tuple[OutcomeRecord, ...]:
    """:func:`three_people`, then ``n`` more records of globex's."""
    people = three_people(s)
    for i in range(n):
        s.submit(outcome(tenant="globex", prompt=f"filler {i}"))
    assert s.flush(10)
    return people


def test_a_stream_rebuild_keeps_what_replicas_add_and_drops_what_others_erase(
    redis_server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While an erasure copies the stream a batch at a time, replicas add entries and another
    erasure deletes one: the stream it puts in place holds the added ones, with their IDs,
    and not the one erased meanwhile (its copy is made again)."""
    monkeypatch.setattr("router.outcomes_redis.REBUILD_BATCH", 3)
    monkeypatch.setattr("router.outcomes_redis.REBUILD_LAST", 2)
    client = redis_server.client()
    s = store(redis_server, tmp_path)
    try:
        alice, carol, bob = _with_fillers(s, 3)
        cli = RedisOutcomeStore(redis_server.url, journal=s.journal)
        other = RedisOutcomeStore(redis_server.url, journal=tmp_path / "other.jsonl")
        cli.connect()
        other.connect()
        script, calls = cli._rebuild_script, []
        added = [outcome(tenant="globex", prompt=f"added {n}") for n in range(3)]

        def meanwhile(**kw: Any) -> Any:
            calls.append(kw["args"][0])
            if len(calls) == 1:  # more than the script may copy: it has them copied first
                for record in added:
                    s.submit(record)
                assert s.flush(10)
            if len(calls) == 2:
                assert other.erase([bob.id])[:2] == (1, 1)
            return script(**kw)

        monkeypatch.setattr(cli, "_rebuild_script", meanwhile)
        try:
            assert cli.erase([alice.id]).stream is None
        finally:
            cli.close()
            other.close()
        ids = [f[b"id"].decode() for _, f in _stream(client)]
        assert alice.id not in ids and bob.id not in ids
        assert ids[0] == carol.id and ids[-3:] == [r.id for r in added] and len(ids) == 7
        dumped = _dumped(client)
        assert b"Alice Smith" not in dumped and b"Bob Brown" not in dumped
        # the second try saw the other erasure's XDEL and stopped; that erasure's own rebuild
        # left no erased bytes, so there was none to make again; no copy is left behind
        assert len(calls) == 2 and not list(client.scan_iter("tiergate:outcomes:rebuild:*"))
    finally:
        s.close()


@pytest.mark.parametrize("again", [["--request-id", "ALICE"], ["--tenant", "initech"]])
def test_a_stream_redis_will_not_rebuild_is_said_and_rebuilt_by_the_next_erasure(
    redis_server: RedisServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    again: list[str],
) -> None:
    """Where Redis refuses the rebuild (an ACL without RENAME), the erasure stands, the
    command says the stream may still hold the erased bytes and exits 1. Run again, or any
    erasure after it, rebuilds the stream though it finds nothing left to delete."""
    client = redis_server.client()
    url = _user_without(redis_server, "rename")
    s = RedisOutcomeStore(url, journal=tmp_path / "journal.jsonl")
    s.start()
    alice, _, _ = three_people(s)
    s.close()
    monkeypatch.setenv("TIERGATE_REDIS_URL", url)
    monkeypatch.setenv("TIERGATE_OUTCOME_JOURNAL_PATH", str(tmp_path / "cli-journal.jsonl"))
    assert main(["outcomes", "delete", "--request-id", alice.id]) == 1
    said = capsys.readouterr()
    assert "deleted 1 records and 1 labels" in said.out
    assert "outcomes stream may still hold their bytes" in said.err and "can't run" in said.err
    assert b"Alice Smith" in _dumped(client) and client.xlen("tiergate:outcomes") == 2
    client.acl_setuser("tiergate", enabled=True, commands=["+rename"])
    assert main(["outcomes", "delete", *[alice.id if a == "ALICE" else a for a in again]]) == 0
    assert "deleted 0 records" in capsys.readouterr().out
    assert b"Alice Smith" not in _dumped(client) and client.xlen("tiergate:outcomes") == 2


# What `tiergate outcomes delete --request-id ID` runs, killed (SIGKILL: no `finally`) when its
# rebuild has copied the stream and calls the script that would swap it in.
_KILLED_REBUILD = """
import os, sys
from pathlib import Path
import router.outcomes_redis as m
m.REBUILD_BATCH, m.REBUILD_LAST = 2, 1  # a copy before the last script, as for 100+ entries
s = m.RedisOutcomeStore(sys.argv[1], journal=Path(sys.argv[2]))
s.connect()
s._rebuild_script = lambda **kw: os._exit(9)
s.erase([sys.argv[3]])
"""


def test_a_copy_a_killed_rebuild_left_is_deleted_by_the_next_erasure(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """An erasure killed between copying the stream and swapping the copy in left the copy,
    for 5 minutes, with every entry live then: not the ones it erased, but those of a tenant
    erased next, whose name and prompts it kept after that erasure. The next erasure deletes
    every such copy."""
    client = redis_server.client()
    s = store(redis_server, tmp_path)
    try:
        alice, carol, _ = three_people(s)
        root = Path(__file__).resolve().parent.parent
        killed = subprocess.run(
            [sys.executable, "-c", _KILLED_REBUILD, redis_server.url, str(s.journal), alice.id],
            env={**os.environ, "PYTHONPATH": str(root)},
            timeout=120,
            check=False,
        )
        assert killed.returncode == 9
        copies = list(client.scan_iter("tiergate:outcomes:rebuild:*"))
        assert len(copies) == 1
        left = client.xrange(copies[0])
        assert [f[b"id"] for _, f in left][:1] == [carol.id.encode()]  # not Alice's: erased
        cli = RedisOutcomeStore(redis_server.url, journal=s.journal)
        cli.connect()
        try:
            assert cli.erase(tenant="acme")[:2] == (1, 1)  # Carol's; Alice's went first
        finally:
            cli.close()
        held = _everything_in(client)
        assert "Carol Jones" not in held and "acme" not in held and "Bob Brown" in held
        assert not list(client.scan_iter("tiergate:outcomes:rebuild:*"))
    finally:
        s.close()


def test_a_tenant_s_erasure_killed_midway_is_completed_by_running_it_again(
    redis_server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed after it had deleted the tenant's records and index but before their stream
    entries, an erasure run again found no request of the tenant's left to look for: the
    stream kept their entries, names and prompts. It finds them by the tenant in the record,
    and leaves a record the tenant made after the erasure."""
    client = redis_server.client()
    s = store(redis_server, tmp_path)
    try:
        _, carol, bob = three_people(s)
        cli = RedisOutcomeStore(redis_server.url, journal=s.journal)
        cli.connect()

        def killed(*args: Any) -> None:
            raise SystemExit(9)

        with monkeypatch.context() as patched:
            patched.setattr(cli, "_drop_from_stream", killed)
            with pytest.raises(SystemExit):
                cli.erase(tenant="acme")
        assert b"Carol Jones" in _dumped(client)
        try:
            assert cli.erase(tenant="acme").stream is None
            dumped = _dumped(client)
            assert b"Carol Jones" not in dumped and b"Alice Smith" not in dumped
            assert [f[b"id"].decode() for _, f in _stream(client)] == [bob.id]
            assert carol.id not in _everything_in(client)
            # A request acme began after an erasure is its own: the stream pass of that
            # erasure, were it still running, leaves its entry.
            erased_at = time.time()
            erin = outcome(tenant="acme", ts=erased_at + 0.5, latency_ms=250.0, prompt="Erin")
            s.submit(erin)
            assert s.flush(10)
            cli._drop_from_stream(set(), "acme", erased_at)
            assert [f[b"id"].decode() for _, f in _stream(client)] == [bob.id, erin.id]
        finally:
            cli.close()
    finally:
        s.close()


def test_entries_an_earlier_release_deleted_go_with_the_next_erasure_or_compact(
    redis_server: RedisServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An erasure of a release before the rebuild deleted stream entries with XDEL alone, and
    counted nothing: their bytes stayed, and no later erasure rebuilt the stream unless it
    deleted entries itself. Redis 7 says a stream had entries deleted (max-deleted-entry-id),
    and the next erasure rebuilds it; Redis 6.2 cannot say, and `delete --compact` rebuilds
    it on either."""
    client = redis_server.client()
    s = store(redis_server, tmp_path)
    _, carol, bob = three_people(s)
    s.close()
    client.xdel("tiergate:outcomes", _stream(client)[0][0])  # Alice's, as that release did
    assert b"Alice Smith" in _dumped(client)
    tells = "max-deleted-entry-id" in client.xinfo_stream("tiergate:outcomes")
    monkeypatch.setenv("TIERGATE_REDIS_URL", redis_server.url)
    monkeypatch.setenv("TIERGATE_OUTCOME_JOURNAL_PATH", str(tmp_path / "cli-journal.jsonl"))
    assert main(["outcomes", "delete", "--request-id", "req_nobody"]) == 0
    assert (b"Alice Smith" in _dumped(client)) is not tells
    assert main(["outcomes", "delete", "--compact"]) == 0
    assert "rebuilt the outcomes stream" in capsys.readouterr().out
    assert b"Alice Smith" not in _dumped(client)
    assert [f[b"id"].decode() for _, f in _stream(client)] == [carol.id, bob.id]
    cli = RedisOutcomeStore(redis_server.url, journal=tmp_path / "cli-journal.jsonl")
    cli.connect()
    copies: list[str] = []
    monkeypatch.setattr(cli, "_copy_stream", lambda deleted: copies.append(deleted) or True)
    try:
        cli.erase(["req_nobody"])  # nothing deleted since the rebuild: none again
    finally:
        cli.close()
    assert copies == [] and b"Alice Smith" not in _dumped(client)


def _pending(client: redis.Redis) -> list[tuple[bytes, bytes, int]]:
    """The exporter group's pending entries: id, consumer, times delivered."""
    found = client.xpending_range("tiergate:outcomes", "exporter", "-", "+", 1000)
    return [(p["message_id"], p["consumer"], p["times_delivered"]) for p in found]


def _last_script(client: redis.Redis) -> list[bytes]:
    """The commands the rebuild's last script ran (SLOWLOG logs a script's commands too,
    before the script itself), from the log of every command."""
    log = [e["command"] for e in client.slowlog_get(100_000)]  # newest first
    last = next(i for i, c in enumerate(log) if c.startswith(b"EVALSHA") and b":erasures" in c)
    first = next(i for i, c in enumerate(log[last:]) if c.startswith(b"HGET") and b"deleted" in c)
    return log[last + 1 : last + first + 1]


def test_a_rebuild_copies_a_long_pending_list_before_its_last_script(
    redis_server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The last script of a rebuild, which blocks Redis, copied every pending entry of every
    consumer group: 100,000 took 584 ms (Redis 6.2). They are copied before it, a batch per
    script, and it copies only those of consumers that acted since, and those of entries
    added since, at most REBUILD_PENDING_LAST (else they are copied again first). Consumers
    that ack, claim and read meanwhile find their pending entries as they left them, with
    their consumer and delivery count, and the idle time of those untouched goes on."""
    monkeypatch.setattr("router.outcomes_redis.REBUILD_PENDING_LAST", 5)
    client = redis_server.client()
    s = store(redis_server, tmp_path)
    try:
        alice, _, _ = _with_fillers(s, 12)
        stream = "tiergate:outcomes"
        client.xgroup_create(stream, "exporter", id="0")
        client.xreadgroup("exporter", "e1", {stream: ">"}, count=12)  # Alice's and 11 more
        client.xreadgroup("exporter", "e2", {stream: ">"}, count=1)
        client.xreadgroup("exporter", "e1", {stream: "0"}, count=3)  # delivered twice
        idle = {
            p["message_id"]: p["time_since_delivered"]
            for p in client.xpending_range(stream, "exporter", "-", "+", 1000)
        }
        time.sleep(0.05)  # the consumers' marks hold only once they are idle 5 ms
        cli = RedisOutcomeStore(redis_server.url, journal=s.journal)
        cli.connect()
        script, seen = cli._rebuild_script, []
        untouched: set[bytes] = set()

        def meanwhile(**kw: Any) -> Any:
            pending = [p[0] for p in _pending(client)]
            if not seen:  # consumers act between the copy of the pending entries and the swap
                client.xack(stream, "exporter", pending[3])
                client.xclaim(stream, "exporter", "e2", 0, [pending[4]])
                s.submit(outcome(tenant="globex", prompt="added"))
                assert s.flush(10)
                client.xreadgroup("exporter", "e2", {stream: ">"})
                untouched.update(pending[5:])
            elif len(seen) == 1:  # e1's 10 were too many for the script: copied again first
                client.xack(stream, "exporter", pending[-1])  # e2's last: the script copies it
            seen.append(_pending(client))
            return script(**kw)

        monkeypatch.setattr(cli, "_rebuild_script", meanwhile)
        client.config_set("slowlog-log-slower-than", 0)
        client.config_set("slowlog-max-len", 100_000)
        client.slowlog_reset()
        try:
            assert cli.erase([alice.id]).stream is None
        finally:
            cli.close()
            client.config_set("slowlog-log-slower-than", 10_000)
        assert 0 < sum(c.startswith(b"XCLAIM") for c in _last_script(client)) <= 5
        assert len(seen) == 2
        erased = _stream(client)
        assert alice.id.encode() not in [f[b"id"] for _, f in erased]
        after = _pending(client)
        assert after == [p for p in seen[-1] if p[0] >= erased[0][0]]
        assert sum(p[2] == 2 for p in after) == 3  # two read again (Alice's is erased), one claimed
        kept = {
            p["message_id"]: p["time_since_delivered"]
            for p in client.xpending_range(stream, "exporter", "-", "+", 1000)
        }
        assert untouched and all(kept[i] >= idle[i] + 40 for i in untouched)
    finally:
        s.close()


def test_entries_a_consumer_deletes_during_a_rebuild_stay_deleted(
    redis_server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A consumer that deletes what it has handled (XACK, then XDEL) while an erasure copies
    the stream: the copy held those entries, and the stream put in place gave them back to
    every reader. They stay deleted, wherever they are in the stream; the other entries keep
    their IDs, and the consumer's acknowledgement holds."""
    monkeypatch.setattr("router.outcomes_redis.REBUILD_LAST", 2)  # as for 100 of thousands
    client, stream = redis_server.client(), "tiergate:outcomes"
    s = store(redis_server, tmp_path)
    try:
        alice = _with_fillers(s, 8)[0]
        ids = [entry for entry, _ in _stream(client)]
        client.xgroup_create(stream, "exporter", id="0")
        client.xreadgroup("exporter", "e1", {stream: ">"}, count=6)  # Alice's to filler 2
        cli = RedisOutcomeStore(redis_server.url, journal=s.journal)
        cli.connect()
        script, calls = cli._rebuild_script, []

        def meanwhile(**kw: Any) -> Any:
            if not calls:  # every entry is in the copy: the consumer deletes three
                client.xack(stream, "exporter", ids[3])  # filler 0, handled, and two unread:
                client.xdel(stream, ids[3], ids[8], ids[9])  # fillers 5 and 6 (of the last 2)
            calls.append(script(**kw))
            return calls[-1]

        monkeypatch.setattr(cli, "_rebuild_script", meanwhile)
        try:
            assert cli.erase([alice.id]).stream is None
        finally:
            cli.close()
        left = [entry for entry, _ in _stream(client)]
        assert ids[3] not in left  # filler 0
        assert ids[8] not in left  # filler 5
        assert left == [i for i in ids if i not in (ids[0], ids[3], ids[8], ids[9])]
        assert [p[0] for p in _pending(client)] == [ids[1], ids[2], ids[4], ids[5]]
        # the last script deleted filler 6 from the copy, and had the older two deleted first
        assert [c[0] for c in calls] == [-3, 1] and calls[0][3] == 2
        assert not list(client.scan_iter("tiergate:outcomes:rebuild:*"))
    finally:
        s.close()


def test_a_rebuild_ends_while_a_consumer_holding_many_entries_reads_on(
    redis_server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A consumer that holds more pending entries than the last script may copy, and reads all
    the while (as a work queue does: read, acknowledge, delete; each XREADGROUP has Redis see
    it again, found or not), had every try copy it again, and the erasure gave up after five,
    on every run while it read. The rebuild ends: the entries it held are all still pending,
    with their delivery counts, and none it acknowledged or deleted meanwhile is back."""
    monkeypatch.setattr("router.outcomes_redis.REBUILD_PENDING_LAST", 5)
    client, stream = redis_server.client(), "tiergate:outcomes"
    s = store(redis_server, tmp_path)
    done, reads, handled = threading.Event(), [0], []

    def work() -> None:
        queue = redis.Redis.from_url(redis_server.url)
        while not done.is_set():
            s.submit(outcome(tenant="globex", prompt="a new one"))
            for _, entries in queue.xreadgroup("exporter", "e1", {stream: ">"}, block=1) or []:
                for entry, _ in entries:
                    queue.xack(stream, "exporter", entry)
                    queue.xdel(stream, entry)
                    handled.append(entry)
            reads[0] += 1
        queue.close()

    try:
        alice = _with_fillers(s, 20)[0]
        client.xgroup_create(stream, "exporter", id="0")
        held = client.xreadgroup("exporter", "e1", {stream: ">"}, count=12)[0][1]  # Alice's on
        worker = threading.Thread(target=work)
        worker.start()
        cli = RedisOutcomeStore(redis_server.url, journal=s.journal)
        cli.connect()
        script = cli._rebuild_script

        def meanwhile(**kw: Any) -> Any:  # it reads on after its pending entries were copied
            before = reads[0]
            assert wait_for(lambda: reads[0] >= before + 2)
            return script(**kw)

        monkeypatch.setattr(cli, "_rebuild_script", meanwhile)
        try:
            assert wait_for(lambda: len(handled) >= 3)
            erased = cli.erase([alice.id])
        finally:
            done.set()
            worker.join()
            cli.close()
        assert erased.stream is None
        assert _pending(client) == [(entry, b"e1", 1) for entry, _ in held[1:]]
        left = {entry for entry, _ in _stream(client)}
        assert not left & set(handled) and {entry for entry, _ in held[1:]} <= left
    finally:
        s.close()
