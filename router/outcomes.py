"""The outcome store: one record per request, success or failure, written off the request path.

:class:`OutcomeRecord` is what Tiergate learns and reports from. Stores implement
:class:`OutcomeStore`; :class:`SQLiteOutcomeStore` is the embedded default. ``submit`` never blocks
and never raises: records go to an in-memory queue that a writer thread drains in batches, and
``close`` drains it fully, so nothing is lost at shutdown. Write failures are counted, logged and
retried, never turned into request errors. No record can stop the writer: strings are made valid
UTF-8 as they are written (a lone surrogate becomes U+FFFD), a record that still cannot be written
is counted (``unwritable``) and logged, and a writer thread that dies anyway shows in
:meth:`~OutcomeStore.health` (so in ``/readyz``) and is started again.

A :class:`Label` is a quality signal about one earlier request (user feedback, a shadow judge's
verdict, an escalation); stores keep labels per request and source, next to the records, and
``purge`` deletes both once they are older than the policy's retention period.
:class:`~router.outcomes_redis.RedisOutcomeStore` implements the same interface for replicas
that share one Redis.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import sqlite3
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger("tiergate.outcomes")


@dataclass(slots=True)
class OutcomeRecord:
    """What happened to one request. ``signals`` never holds prompt text."""

    id: str
    ts: float
    tenant: str
    alias: str
    tier: str | None
    model: str | None
    rule: str | None
    score: float | None
    threshold: float | None
    policy_version: str | None
    model_version: str | None
    status: str  # ok | error | aborted
    http_status: int
    stream: bool
    latency_ms: float
    ttft_ms: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    counterfactual_cost_usd: float = 0.0
    error_type: str | None = None
    fallback: str | None = None
    capability: str | None = None
    stakes: str | None = None
    signals: dict[str, Any] = field(default_factory=dict)
    prompt: str | None = None
    front: str = "chat"  # the API the request came through: chat | messages | responses
    #: A cascaded request's local part: the judgement (decision, confidence, threshold, reason),
    #: the local model's tokens, time and cost, and how long a stream held back its first tokens.
    cascade: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


LABEL_SOURCES: tuple[str, ...] = ("feedback", "shadow", "escalation")


@dataclass(slots=True)
class Label:
    """A quality signal about one earlier request, from ``source`` (see :data:`LABEL_SOURCES`).

    ``value`` is the training label, in [0, 1]: how strongly the closed model's answer would have
    been materially better than the answer served (1 = closed clearly better, 0 = the local answer
    was at least as good; the routing classifier's positive class). ``quality`` is the quality of
    the answer actually served, when the source says it (feedback), else None. ``cost_usd`` is
    what producing the label cost (shadow calls to the closed model and the judge); it counts
    against the tenant's budget like any request.
    """

    request_id: str
    tenant: str
    source: str
    value: float | None
    ts: float
    quality: float | None = None
    cost_usd: float = 0.0
    comment: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


# ``front`` is not a column yet: the stores' schemas gain it separately.
FIELDS: tuple[str, ...] = tuple(f.name for f in fields(OutcomeRecord) if f.name != "front")
LABEL_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(Label))
_JSON_FIELDS = {"signals", "detail", "cascade"}
_BOOL_FIELDS = {"stream"}


class OutcomeStore(Protocol):
    """Where records go. ``submit`` is called on the request path and must never block or raise."""

    def submit(self, record: OutcomeRecord) -> None:
        """Queue one record for writing."""
        ...

    def start(self) -> None:
        """Start writing (threads, connections)."""
        ...

    def close(self, timeout_s: float = 30.0) -> None:
        """Write everything queued, then stop."""
        ...

    def recent(self, limit: int = 20, tenant: str | None = None) -> list[dict[str, Any]]:
        """The newest records, newest first."""
        ...

    def count(self, tenant: str | None = None) -> int:
        """How many records are stored."""
        ...

    def spend_today(self, tenant: str) -> float:
        """USD recorded for ``tenant`` since 00:00 UTC, including queued records and the
        holds of requests in flight."""
        ...

    def reserve_spend(self, tenant: str, request_id: str, usd: float, budget: float | None) -> bool:
        """Hold ``usd`` for a request about to be served, unless ``tenant``'s spend today (holds
        included) has reached ``budget``; one atomic step. The request's record (or
        :meth:`release_spend`) settles the hold. May do I/O: call it off the event loop."""
        ...

    def release_spend(self, request_id: str) -> None:
        """Drop a request's hold without a record (its record could not be built)."""
        ...

    def recent_scores(self, alias: str | None = None, limit: int = 2000) -> list[float]:
        """Routing scores of recent auto-routed requests, for online threshold calibration."""
        ...

    def get(self, record_id: str) -> dict[str, Any] | None:
        """One record by request id (including one still queued), or None."""
        ...

    def label(self, label: Label) -> None:
        """Queue one label (replaces an earlier label of the same request and source)."""
        ...

    def labels(self, since: float = 0.0, limit: int | None = None) -> list[dict[str, Any]]:
        """Stored labels newer than ``since``, oldest first."""
        ...

    def purge(self, before_ts: float) -> int:
        """Delete records and labels older than ``before_ts``; how many records went."""
        ...

    def set_retention_days(self, days: int | None) -> None:
        """The policy's ``retention_days`` (None: keep), for a store that expires keys itself."""
        ...

    def check_writer(self) -> str | None:
        """Start the writer again if it died; why it had to, or None when it was running."""
        ...

    def health(self) -> dict[str, Any]:
        """The writer's state and counters, for ``/readyz``."""
        ...


def _day(ts: float) -> int:
    return int(ts // 86400)


def valid_text(text: str) -> str:
    """``text`` with every lone surrogate replaced by U+FFFD, so it encodes as UTF-8.

    JSON lets a client send ``"\\ud800"``; Python decodes it to a string that no UTF-8 writer
    (SQLite, Redis, a log file) accepts.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "".join("\ufffd" if "\ud800" <= ch <= "\udfff" else ch for ch in text)
    return text


def valid_json(value: Any) -> str:
    """``value`` as compact JSON text that encodes as UTF-8 (see :func:`valid_text`)."""
    return valid_text(json.dumps(value, separators=(",", ":"), default=str, ensure_ascii=False))


def log_unwritable(item: OutcomeRecord | Label, exc: Exception) -> None:
    """Log an outcome that a store could not write and skipped."""
    name = item.id if isinstance(item, OutcomeRecord) else item.request_id
    log.error(
        "outcome %s %s cannot be written, skipped: %s",
        type(item).__name__,
        valid_text(name),
        valid_text(f"{type(exc).__name__}: {exc}"),
    )


class WriterWatch:
    """Keeps one store's writer thread alive: runs it, notes how it died, starts it again.

    The writer catches and counts every failure it knows of; this is the net under that, for the
    failure nobody foresaw, so that it shows in ``/readyz`` instead of silently ending recording.
    """

    def __init__(self, name: str, target: Callable[[], None], on_death: Callable[[], None]) -> None:
        self._name = name
        self._target = target
        self._on_death = on_death
        self._lock = threading.Lock()
        self.thread: threading.Thread | None = None
        self.restarts = 0
        self.last_error: str | None = None

    def start(self) -> None:
        """Start the writer thread."""
        self.thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self._target()
        except BaseException as exc:  # the thread ends here; check() starts another
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.critical("%s died: %s", self._name, self.last_error, exc_info=True)
            self._on_death()

    @property
    def alive(self) -> bool:
        """Whether the writer thread is running (False before start and after stop)."""
        return self.thread is not None and self.thread.is_alive()

    def check(self) -> str | None:
        """Start the writer again if it died; why it had to, or None."""
        thread = self.thread
        if thread is None or thread.is_alive():
            return None
        with self._lock:
            if self.thread is not thread:  # another caller restarted it meanwhile
                return None
            self.restarts += 1
            reason = f"{self._name} died ({self.last_error}); restarted"
            log.error("%s", reason)
            self.start()
        return reason

    def stop(self, timeout_s: float) -> None:
        """Wait for the writer to finish (the caller has told it to stop)."""
        if self.thread is not None:
            self.thread.join(timeout_s)
            self.thread = None


class SpendLedger:
    """Per-tenant spend for the current UTC day, kept in memory so budgets cost no I/O, and the
    holds of requests in flight (see :meth:`OutcomeStore.reserve_spend`)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._day = _day(time.time())
        self._spend: dict[str, float] = defaultdict(float)
        self._holds: dict[str, tuple[str, float]] = {}
        self._held: dict[str, float] = defaultdict(float)

    def add(self, tenant: str, usd: float, ts: float, request_id: str | None = None) -> None:
        """Count ``usd`` for ``tenant`` if ``ts`` is today, settling ``request_id``'s hold."""
        with self._lock:
            self._release(request_id)
            today = _day(time.time())
            if today != self._day:
                self._day, self._spend = today, defaultdict(float)
            if _day(ts) == today and usd:
                self._spend[tenant] += usd

    def reserve(self, tenant: str, request_id: str, usd: float, budget: float | None) -> bool:
        """Hold ``usd`` for ``request_id`` unless ``tenant`` has reached ``budget``."""
        with self._lock:
            if budget is not None and self._get(tenant) >= budget:
                return False
            self._release(request_id)
            self._holds[request_id] = (tenant, usd)
            self._held[tenant] += usd
            return True

    def release(self, request_id: str | None) -> None:
        """Drop ``request_id``'s hold, if it has one."""
        with self._lock:
            self._release(request_id)

    def _release(self, request_id: str | None) -> None:
        hold = self._holds.pop(request_id, None) if request_id is not None else None
        if hold is not None:
            tenant, usd = hold
            self._held[tenant] -= usd
            if not self._held[tenant] > 1e-12:
                del self._held[tenant]

    def get(self, tenant: str) -> float:
        """USD spent today by ``tenant``, holds included."""
        with self._lock:
            return self._get(tenant)

    def _get(self, tenant: str) -> float:
        spent = self._spend.get(tenant, 0.0) if _day(time.time()) == self._day else 0.0
        return spent + self._held.get(tenant, 0.0)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS outcomes (
    id TEXT PRIMARY KEY, ts REAL NOT NULL, tenant TEXT NOT NULL, alias TEXT NOT NULL,
    tier TEXT, model TEXT, rule TEXT, score REAL, threshold REAL, policy_version TEXT,
    model_version TEXT, status TEXT NOT NULL, http_status INTEGER NOT NULL, stream INTEGER NOT NULL,
    latency_ms REAL NOT NULL, ttft_ms REAL, prompt_tokens INTEGER, completion_tokens INTEGER,
    cost_usd REAL, counterfactual_cost_usd REAL, error_type TEXT, fallback TEXT,
    capability TEXT, stakes TEXT, signals TEXT, prompt TEXT, cascade TEXT
);
CREATE INDEX IF NOT EXISTS outcomes_ts ON outcomes (ts);
CREATE INDEX IF NOT EXISTS outcomes_tenant_ts ON outcomes (tenant, ts);
CREATE TABLE IF NOT EXISTS labels (
    request_id TEXT NOT NULL, tenant TEXT NOT NULL, source TEXT NOT NULL, value REAL,
    ts REAL NOT NULL, quality REAL, cost_usd REAL, comment TEXT, detail TEXT,
    PRIMARY KEY (request_id, source)
);
CREATE INDEX IF NOT EXISTS labels_ts ON labels (ts);
"""


def row_to_dict(row: sqlite3.Row) -> dict[str, Any]:
    """Decode one stored row back into a record dict."""
    out = dict(row)
    for key in _JSON_FIELDS:
        if out.get(key):
            out[key] = json.loads(out[key])
    for key in _BOOL_FIELDS:
        if key in out:
            out[key] = bool(out[key])
    return out


class SQLiteOutcomeStore:
    """Records in one SQLite file (WAL mode), written by a background thread in batches."""

    def __init__(
        self, path: Path, *, queue_size: int = 100_000, batch: int = 500, linger_s: float = 0.05
    ) -> None:
        self.path = path
        self._queue: queue.Queue[OutcomeRecord | Label | None] = queue.Queue(maxsize=queue_size)
        self._inflight: dict[str, OutcomeRecord] = {}
        self._batch = batch
        self._linger_s = linger_s
        self._writer = WriterWatch("outcome-writer", self._run, self._lost_batch)
        self._batch_now: list[OutcomeRecord | Label] = []
        self._read_lock = threading.Lock()
        self._reader: sqlite3.Connection | None = None
        self.ledger = SpendLedger()
        self.written = 0
        self.write_errors = 0
        self.dropped = 0
        self.unwritable = 0  # records and labels that could not be written at all (logged)
        self._pending = 0
        self._settled = threading.Condition()

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=30, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    def start(self) -> None:
        """Create the schema, load today's spend and start the writer thread."""
        conn = self._connect()
        conn.executescript(_SCHEMA)
        columns = {row[1] for row in conn.execute("PRAGMA table_info(outcomes)")}
        for name in (n for n in FIELDS if n not in columns):  # a store written by an older Tiergate
            conn.execute(f"ALTER TABLE outcomes ADD COLUMN {name} TEXT")
        start_of_day = _day(time.time()) * 86400
        for tenant, spent in conn.execute(
            "SELECT tenant, SUM(cost_usd) FROM (SELECT tenant, cost_usd FROM outcomes WHERE ts >= ?"
            " UNION ALL SELECT tenant, cost_usd FROM labels WHERE ts >= ?) GROUP BY tenant",
            (start_of_day, start_of_day),
        ):
            self.ledger.add(tenant, float(spent or 0.0), time.time())
        conn.close()
        self._reader = self._connect()
        self._writer.start()

    def submit(self, record: OutcomeRecord) -> None:
        """Queue a record; a full queue drops it (counted and logged) rather than wait."""
        self._writer.check()
        with self._settled:
            self._inflight[record.id] = record
        self._enqueue(record)

    def label(self, label: Label) -> None:
        """Queue a label (written by the same thread, in order after its record)."""
        self._enqueue(label)

    def _enqueue(self, item: OutcomeRecord | Label) -> None:
        request_id = item.id if isinstance(item, OutcomeRecord) else None
        self.ledger.add(item.tenant, item.cost_usd, item.ts, request_id)
        with self._settled:
            self._pending += 1
        try:
            self._queue.put_nowait(item)
        except queue.Full:  # waiting here would stall the event loop, so every request
            self._settle([item], 0, 1)
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.error("outcome queue full; %d outcomes dropped so far", self.dropped)

    def _settle(self, batch: list[OutcomeRecord | Label], written: int, dropped: int) -> None:
        with self._settled:
            for item in batch:
                if isinstance(item, OutcomeRecord):
                    self._inflight.pop(item.id, None)
            self.written += written
            self.dropped += dropped
            self._pending -= written + dropped
            self._settled.notify_all()

    def _run(self) -> None:
        conn = self._connect()
        stop = False
        while not stop:
            item = self._queue.get()
            batch: list[OutcomeRecord | Label] = []
            if item is None:
                stop = True
            else:
                batch.append(item)
            while len(batch) < self._batch:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                batch.append(more)
            if batch:
                self._batch_now = batch
                self._write(conn, batch)
                self._batch_now = []
                if not stop and self._linger_s > 0:
                    # Let records gather: a writer blocked in get() is woken by every submit,
                    # and each wake-up takes the GIL from the event loop (bench/README.md).
                    time.sleep(self._linger_s)
        conn.close()

    def _lost_batch(self) -> None:
        """The writer died holding a batch: count it as dropped so ``flush`` does not wait."""
        batch, self._batch_now = self._batch_now, []
        self._settle(batch, 0, len(batch))

    def _write(self, conn: sqlite3.Connection, batch: list[OutcomeRecord | Label]) -> None:
        for attempt in range(5):
            try:
                self._insert(conn, batch)
                self._settle(batch, len(batch), 0)
                return
            except sqlite3.Error as exc:  # counted and retried; never surfaced to a request
                self.write_errors += 1
                log.warning("outcome write failed (attempt %d): %s", attempt + 1, exc)
                time.sleep(0.2 * (attempt + 1))
            except Exception:  # some item cannot be written: write the others one by one
                self._write_each(conn, batch)
                return
        self._settle(batch, 0, len(batch))
        log.error("gave up writing %d outcome records and labels", len(batch))

    def _insert(self, conn: sqlite3.Connection, batch: list[OutcomeRecord | Label]) -> None:
        rows = [_encode(r, FIELDS) for r in batch if isinstance(r, OutcomeRecord)]
        labels = [_encode(r, LABEL_FIELDS) for r in batch if isinstance(r, Label)]
        with conn:
            _insert_many(conn, "outcomes", FIELDS, rows)
            _insert_many(conn, "labels", LABEL_FIELDS, labels)

    def _write_each(self, conn: sqlite3.Connection, batch: list[OutcomeRecord | Label]) -> None:
        for item in batch:
            try:
                self._insert(conn, [item])
            except Exception as exc:  # counted and logged; the writer goes on with the rest
                self.unwritable += 1
                log_unwritable(item, exc)
                self._settle([item], 0, 1)
            else:
                self._settle([item], 1, 0)

    def check_writer(self) -> str | None:
        """Start the writer again if it died; why it had to, or None."""
        return self._writer.check()

    def health(self) -> dict[str, Any]:
        """Whether the writer runs, and what it has written, dropped or could not write."""
        return {
            "store": "sqlite",
            "writer_alive": self._writer.alive,
            "restarts": self._writer.restarts,
            "last_error": self._writer.last_error,
            "written": self.written,
            "write_errors": self.write_errors,
            "unwritable": self.unwritable,
            "dropped": self.dropped,
            "queued": self._queue.qsize(),
        }

    def close(self, timeout_s: float = 30.0) -> None:
        """Drain the queue and stop the writer."""
        if self._writer.thread is not None:
            self._writer.check()
            self._queue.put(None)
            self._writer.stop(timeout_s)
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until every record submitted so far is written (or dropped); True if it was."""
        with self._settled:
            return self._settled.wait_for(lambda: self._pending == 0, timeout=timeout_s)

    def _query(self, sql: str, params: Iterable[Any] = ()) -> list[sqlite3.Row]:
        if self._reader is None:
            self._reader = self._connect()
        with self._read_lock:
            return list(self._reader.execute(sql, tuple(params)))

    def recent(self, limit: int = 20, tenant: str | None = None) -> list[dict[str, Any]]:
        """The newest records, newest first."""
        if tenant is None:
            rows = self._query("SELECT * FROM outcomes ORDER BY ts DESC LIMIT ?", (limit,))
        else:
            rows = self._query(
                "SELECT * FROM outcomes WHERE tenant = ? ORDER BY ts DESC LIMIT ?", (tenant, limit)
            )
        return [row_to_dict(r) for r in rows]

    def get(self, record_id: str) -> dict[str, Any] | None:
        """One record by request id, including one still waiting for the writer."""
        with self._settled:
            queued = self._inflight.get(record_id)
        if queued is not None:
            return queued.as_dict()
        rows = self._query("SELECT * FROM outcomes WHERE id = ?", (record_id,))
        return row_to_dict(rows[0]) if rows else None

    def labels(self, since: float = 0.0, limit: int | None = None) -> list[dict[str, Any]]:
        """Stored labels newer than ``since``, oldest first."""
        rows = self._query(
            "SELECT * FROM labels WHERE ts > ? ORDER BY ts LIMIT ?",
            (since, -1 if limit is None else limit),
        )
        return [row_to_dict(r) for r in rows]

    def set_retention_days(self, days: int | None) -> None:
        """Nothing to do: SQLite rows have no TTL, the purge loop deletes them."""

    def purge(self, before_ts: float) -> int:
        """Delete records and labels older than ``before_ts`` (the retention period)."""
        if self._reader is None:
            self._reader = self._connect()
        with self._read_lock, self._reader as conn:
            gone = conn.execute("DELETE FROM outcomes WHERE ts < ?", (before_ts,)).rowcount
            conn.execute("DELETE FROM labels WHERE ts < ?", (before_ts,))
        return int(gone)

    def count(self, tenant: str | None = None) -> int:
        """How many records are stored."""
        if tenant is None:
            rows = self._query("SELECT COUNT(*) FROM outcomes")
        else:
            rows = self._query("SELECT COUNT(*) FROM outcomes WHERE tenant = ?", (tenant,))
        return int(rows[0][0])

    def spend_today(self, tenant: str) -> float:
        """USD recorded for ``tenant`` today, holds included (from the in-memory ledger)."""
        return self.ledger.get(tenant)

    def reserve_spend(self, tenant: str, request_id: str, usd: float, budget: float | None) -> bool:
        """Hold ``usd`` unless ``tenant`` has reached ``budget`` (in memory, under one lock)."""
        return self.ledger.reserve(tenant, request_id, usd, budget)

    def release_spend(self, request_id: str) -> None:
        """Drop a request's hold."""
        self.ledger.release(request_id)

    def recent_scores(self, alias: str | None = None, limit: int = 2000) -> list[float]:
        """Scores of recent requests that were scored, newest first."""
        if alias is None:
            rows = self._query(
                "SELECT score FROM outcomes WHERE score IS NOT NULL ORDER BY ts DESC LIMIT ?",
                (limit,),
            )
        else:
            rows = self._query(
                "SELECT score FROM outcomes WHERE score IS NOT NULL AND alias = ? "
                "ORDER BY ts DESC LIMIT ?",
                (alias, limit),
            )
        return [float(r[0]) for r in rows]

    def quality_by_tier(self, since_ts: float) -> dict[str, dict[str, dict[str, float]]]:
        """Mean quality of served answers per tier and label source, since ``since_ts``.

        Feedback carries the served answer's quality; a shadow verdict says how likely the
        closed answer was materially better, so the served answer's quality is ``1 - value``.
        """
        rows = self._query(
            "SELECT o.tier, l.source, COUNT(*), AVG(COALESCE(l.quality, 1.0 - l.value)) "
            "FROM labels l JOIN outcomes o ON o.id = l.request_id "
            "WHERE l.ts >= ? AND l.source IN ('feedback', 'shadow') "
            "AND COALESCE(l.quality, l.value) IS NOT NULL AND o.tier IS NOT NULL "
            "GROUP BY o.tier, l.source",
            (since_ts,),
        )
        out: dict[str, dict[str, dict[str, float]]] = {}
        for tier, source, n, mean in rows:
            out.setdefault(str(tier), {})[str(source)] = {"n": int(n), "mean": float(mean)}
        return out

    def summary(
        self,
        since_ts: float,
        bucket_s: float,
        *,
        until_ts: float | None = None,
        problems: int = 20,
    ) -> dict[str, Any]:
        """Aggregates for the dashboard: per-bucket counts by tier, spend, failures, versions.

        ``buckets`` are ``bucket_s`` wide from ``since_ts`` to ``until_ts`` (default: now), empty
        ones included so a chart's x axis is time. Requests count under their tier, except
        those refused before routing (no tier: ``none``) and those routed to a tier that failed
        to answer (status ``error``: ``failed``), see :func:`summary_tier`.
        """
        bucket_s = max(1.0, float(bucket_s))
        grouped = self._query(
            "SELECT CAST((ts - ?) / ? AS INTEGER) AS b, "
            "CASE WHEN tier IS NULL THEN 'none' WHEN status = 'error' THEN 'failed' "
            "ELSE tier END AS t, "
            "COUNT(*), SUM(cost_usd), SUM(counterfactual_cost_usd), "
            "SUM(status != 'ok'), SUM(fallback IS NOT NULL) "
            "FROM outcomes WHERE ts >= ? GROUP BY b, t ORDER BY b",
            (since_ts, bucket_s, since_ts),
        )
        recent = self._query(
            f"SELECT {', '.join(PROBLEM_FIELDS)} FROM outcomes "
            "WHERE ts >= ? AND (status != 'ok' OR fallback IS NOT NULL) ORDER BY ts DESC LIMIT ?",
            (since_ts, problems),
        )
        versions = self._query(
            "SELECT policy_version, model_version, COUNT(*), MAX(ts) FROM outcomes "
            "WHERE ts >= ? GROUP BY policy_version, model_version ORDER BY MAX(ts) DESC LIMIT 10",
            (since_ts,),
        )
        return assemble_summary(
            [tuple(r) for r in grouped],
            [dict(r) for r in recent],
            [tuple(r) for r in versions],
            since_ts=since_ts,
            bucket_s=bucket_s,
            until_ts=until_ts,
        )


PROBLEM_FIELDS = (
    "id", "ts", "tenant", "alias", "tier", "model", "rule", "status", "http_status",
    "error_type", "fallback",
)  # fmt: skip


def assemble_summary(
    grouped: list[tuple[Any, ...]],
    problems: list[dict[str, Any]],
    versions: list[tuple[Any, ...]],
    *,
    since_ts: float,
    bucket_s: float,
    until_ts: float | None = None,
) -> dict[str, Any]:
    """The dashboard summary from per-(bucket, tier) aggregates, whichever store computed them.

    ``grouped`` rows are ``(bucket, tier, n, cost, counterfactual, errors, fallbacks)``;
    ``versions`` rows are ``(policy_version, model_version, n, last_ts)``, newest first.
    """
    until = time.time() if until_ts is None else until_ts
    n_buckets = max(1, math.ceil((until - since_ts) / bucket_s))
    starts = [since_ts + i * bucket_s for i in range(n_buckets)]
    tiers: list[dict[str, int]] = [{} for _ in starts]
    costs = [0.0] * n_buckets
    counterfactuals = [0.0] * n_buckets
    by_tier: dict[str, int] = defaultdict(int)
    requests = errors = fallbacks = 0
    for b, tier, n, cost, cf, n_errors, n_fallbacks in grouped:
        i = min(int(b), n_buckets - 1)  # a record written since ``until`` joins the last
        tiers[i][tier] = tiers[i].get(tier, 0) + int(n)
        costs[i] += float(cost or 0.0)
        counterfactuals[i] += float(cf or 0.0)
        by_tier[tier] += int(n)
        requests += int(n)
        errors += int(n_errors or 0)
        fallbacks += int(n_fallbacks or 0)
    buckets = [
        {"start": s, "tiers": t, "cost_usd": c, "counterfactual_usd": f}
        for s, t, c, f in zip(starts, tiers, costs, counterfactuals, strict=True)
    ]
    total_cost, total_cf = sum(costs), sum(counterfactuals)
    served = by_tier.get("local", 0) + by_tier.get("closed", 0)
    return {
        "since": since_ts,
        "bucket_s": bucket_s,
        "buckets": buckets,
        "totals": {
            "requests": requests,
            "errors": errors,
            "fallbacks": fallbacks,
            "by_tier": dict(by_tier),
            "cost_usd": total_cost,
            "counterfactual_usd": total_cf,
            "saved_usd": total_cf - total_cost,
            "local_share": by_tier.get("local", 0) / served if served else 0.0,
        },
        "problems": problems,
        "versions": [
            {"policy_version": p, "model_version": m, "requests": int(n), "last_ts": float(t)}
            for p, m, n, t in versions
        ],
    }


def summary_tier(record: dict[str, Any]) -> str:
    """Where the dashboard counts a record: its tier, ``failed`` when the tier did not answer,
    ``none`` when it was refused before routing (as the SQL of ``summary()``)."""
    tier = record.get("tier")
    if tier is None:
        return "none"
    return "failed" if record.get("status") == "error" else str(tier)


def summarize_records(
    records: list[dict[str, Any]],
    *,
    since_ts: float,
    bucket_s: float,
    until_ts: float | None = None,
    problems: int = 20,
) -> dict[str, Any]:
    """:func:`assemble_summary` over record dicts, for stores without a query language."""
    bucket_s = max(1.0, float(bucket_s))
    groups: dict[tuple[int, str], list[float]] = defaultdict(lambda: [0, 0.0, 0.0, 0, 0])
    versions: dict[tuple[Any, Any], list[float]] = defaultdict(lambda: [0, 0.0])
    for r in records:
        if r["ts"] < since_ts:
            continue
        g = groups[(int((r["ts"] - since_ts) // bucket_s), summary_tier(r))]
        g[0] += 1
        g[1] += float(r.get("cost_usd") or 0.0)
        g[2] += float(r.get("counterfactual_cost_usd") or 0.0)
        g[3] += r.get("status") != "ok"
        g[4] += r.get("fallback") is not None
        v = versions[(r.get("policy_version"), r.get("model_version"))]
        v[0] += 1
        v[1] = max(v[1], float(r["ts"]))
    bad = sorted(
        (r for r in records
         if r["ts"] >= since_ts and (r.get("status") != "ok" or r.get("fallback") is not None)),
        key=lambda r: r["ts"],
        reverse=True,
    )[:problems]  # fmt: skip
    ordered = sorted(versions.items(), key=lambda kv: kv[1][1], reverse=True)[:10]
    return assemble_summary(
        [(b, tier, *vals) for (b, tier), vals in sorted(groups.items())],
        [{k: r.get(k) for k in PROBLEM_FIELDS} for r in bad],
        [(p, m, n, t) for (p, m), (n, t) in ordered],
        since_ts=since_ts,
        bucket_s=bucket_s,
        until_ts=until_ts,
    )


def quality_from_labels(
    labels: list[dict[str, Any]], tier_of: dict[str, str | None]
) -> dict[str, dict[str, dict[str, float]]]:
    """Mean served-answer quality per tier and source (see ``quality_by_tier``), in Python."""
    sums: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0, 0.0])
    for label in labels:
        source, tier = label.get("source"), tier_of.get(label.get("request_id", ""))
        quality = label.get("quality")
        if quality is None and label.get("value") is not None:
            quality = 1.0 - float(label["value"])
        if source in ("feedback", "shadow") and tier and quality is not None:
            entry = sums[(tier, source)]
            entry[0] += 1
            entry[1] += float(quality)
    out: dict[str, dict[str, dict[str, float]]] = {}
    for (tier, source), (n, total) in sums.items():
        out.setdefault(tier, {})[source] = {"n": int(n), "mean": total / n}
    return out


def _insert_sql(table: str, names: tuple[str, ...], rows: int = 1) -> str:
    values = f"({', '.join('?' for _ in names)})"
    return (
        f"INSERT OR REPLACE INTO {table} ({', '.join(names)}) VALUES {', '.join([values] * rows)}"
    )


def _insert_many(
    conn: sqlite3.Connection, table: str, names: tuple[str, ...], rows: list[tuple[Any, ...]]
) -> None:
    """Insert ``rows`` with one multi-row statement per chunk rather than one per row.

    The sqlite3 module lets go of the GIL around every statement step and must take it back
    after; ``executemany`` steps once per row, and while the event loop is busy each take-back
    waits out the interpreter's switch interval (5 ms). The writer thread then managed ~125
    rows/s under load, fell behind, and its queue grew by every request it had not written yet
    (the RSS growth of about 0.7 KB per request bench/load.py measured). One step per chunk
    keeps it ahead.
    """
    # Chunk sizes are powers of two, so a few distinct statements serve every batch size: the
    # sqlite3 module caches each prepared statement by its text, and one prepared for hundreds of
    # rows holds thousands of parameter slots.
    limit = max(1, conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) // len(names))
    start = 0
    while start < len(rows):
        size = 1 << (min(limit, len(rows) - start).bit_length() - 1)
        chunk = rows[start : start + size]
        conn.execute(_insert_sql(table, names, size), [v for row in chunk for v in row])
        start += size


def _encode(record: OutcomeRecord | Label, names: tuple[str, ...]) -> tuple[Any, ...]:
    values = []
    for name in names:
        value = getattr(record, name)
        if name in _JSON_FIELDS:
            value = valid_json(value)
        elif name in _BOOL_FIELDS:
            value = int(bool(value))
        elif isinstance(value, str):
            value = valid_text(value)
        values.append(value)
    return tuple(values)
