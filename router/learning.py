"""Quality signals that close the loop: feedback, shadow judging, escalations, retention.

Every signal becomes a :class:`~router.outcomes.Label` on the request it is about, stored next to
its outcome record. The label's ``value`` is the routing classifier's target: how strongly the
closed model's answer would have been materially better than the answer served (1 = clearly
better, 0 = not better). See ``docs/learning-loop.md``.

* **Feedback** (``POST /v1/feedback``): a tenant labels one of its own requests with a score in
  [0, 1] or thumbs up/down, the quality of the answer it got. For a locally served answer the
  value is ``1 - quality``; for a closed answer the quality is kept but the value is unknown (how
  good the closed answer was says nothing about the local one).
* **Shadow judging**: for a sampled share of locally served requests (the policy's
  ``shadow.sample_rate``, never for ``local_only`` traffic), the default closed model answers the
  same request in the background and a judge model compares both answers, in both orders.
* **Escalation**: the same tenant re-sending the same conversation pinned to a closed model soon
  after a local answer is a negative label (value 1) for that local answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import random
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from router.backends import Completion
from router.errors import BadRequestError, NotFoundError, StoreUnavailableError, TiergateError
from router.outcomes import Label, OutcomeStore, reserve_in_thread
from router.policy import ModelSpec, why_unfit
from router.schemas import FeedbackRequest
from router.signals import redacted
from router.telemetry import Telemetry, outside_request

log = logging.getLogger("tiergate.learning")

JUDGE_SYSTEM = (
    "Please act as an impartial judge and evaluate the quality of the responses provided by two "
    "AI assistants to the user question displayed below. Choose the assistant that follows the "
    "user's instructions and answers the user's question better, considering helpfulness, "
    "relevance, accuracy, depth and level of detail. Do not let the order in which the responses "
    "were presented, their length, or the assistants' names influence your decision. Be as "
    "objective as possible. After a short explanation, output your final verdict strictly in "
    'this format: "[[A]]" if assistant A is better, "[[B]]" if assistant B is better, and '
    '"[[C]]" for a tie.'
)
JUDGE_TEMPLATE = (
    "[User Question]\n{question}\n\n"
    "[The Start of Assistant A's Answer]\n{answer_a}\n[The End of Assistant A's Answer]\n\n"
    "[The Start of Assistant B's Answer]\n{answer_b}\n[The End of Assistant B's Answer]"
)
_VERDICT = re.compile(r"\[\[([ABC])\]\]")


def parse_verdict(text: str) -> str | None:
    """The judge's last ``[[A]]``/``[[B]]``/``[[C]]``, or None when it gave none."""
    found = _VERDICT.findall(text or "")
    return found[-1] if found else None


#: The judge's completion cap per verdict, where its model writes that much.
JUDGE_TOKENS = 512


def judge_tokens(spec: ModelSpec) -> int:
    """The ``max_tokens`` the judge ``spec`` is sent: :data:`JUDGE_TOKENS`, or its policy
    ``max_output_tokens`` where that is less (its provider refuses more). A verdict cut short
    has no ``[[A]]``/``[[B]]``/``[[C]]`` and counts for nothing, never as a wrong one."""
    limit = spec.max_output_tokens
    return JUDGE_TOKENS if limit is None else min(JUDGE_TOKENS, limit)


def judge_messages(question: str, answer_a: str, answer_b: str) -> list[dict[str, str]]:
    """The pairwise judge prompt (MT-Bench's pairwise template, documented in the docs)."""
    user = JUDGE_TEMPLATE.format(question=question, answer_a=answer_a, answer_b=answer_b)
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]


def judge_request(spec: ModelSpec, question: str, answer_a: str, answer_b: str) -> dict[str, Any]:
    """The chat request the judge ``spec`` is sent for one ordering: greedy (temperature 0,
    the same verdict each time) where the judge takes it. OpenAI's reasoning models refuse any
    temperature but 1 (``ModelSpec.refused_sampling``) with a 400: sent 0, every judgement
    they made failed, the closed answer it judged paid for."""
    request: dict[str, Any] = {
        "messages": judge_messages(question, answer_a, answer_b),
        "max_tokens": judge_tokens(spec),
    }
    if "temperature" not in spec.refused_sampling:
        request["temperature"] = 0
    return request


def judge_unfit(spec: ModelSpec, messages: Sequence[Mapping[str, Any]]) -> str | None:
    """Why the judge ``spec`` cannot read ``messages`` and write its verdict (``max_tokens``
    :func:`judge_tokens`) within its context window (by Tiergate's estimate), or None: the
    provider would refuse the call with a 400."""
    from router.signals import estimate_tokens

    window = spec.context_window
    prompt = estimate_tokens(list(messages))
    verdict = judge_tokens(spec)
    if window is None or prompt + verdict <= window:
        return None
    return (
        f"{spec.name} cannot judge {prompt} tokens of prompt + max_tokens {verdict} "
        f"(context window {window})"
    )


def closed_better(verdicts: list[tuple[str, str | None]]) -> float | None:
    """Average over orderings: 1 when the closed answer wins, 0 when local wins, 0.5 a tie.

    ``verdicts`` holds ``(position of the closed answer, verdict)`` pairs; orderings without a
    valid verdict are ignored, and None means no ordering gave one.
    """
    values = []
    for closed_pos, verdict in verdicts:
        if verdict is None:
            continue
        values.append(0.5 if verdict == "C" else 1.0 if verdict == closed_pos else 0.0)
    return sum(values) / len(values) if values else None


def conversation_fingerprint(tenant: str, body: Mapping[str, Any]) -> str:
    """A hash of the tenant and the messages (what "the same conversation" means)."""
    messages = [
        {"role": m.get("role"), "content": m.get("content")}
        for m in body.get("messages") or []
        if isinstance(m, dict)
    ]
    raw = json.dumps([tenant, messages], sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(raw.encode()).hexdigest()


def answer_text(body: Mapping[str, Any]) -> str:
    """The assistant text of an OpenAI chat completion body ('' when there is none)."""
    choices = body.get("choices") or []
    if not choices:
        return ""
    message = choices[0].get("message") or {}
    content = message.get("content")
    return content if isinstance(content, str) else ""


def feedback_label(req: FeedbackRequest, record: Mapping[str, Any]) -> Label:
    """The label for one feedback request about ``record`` (already checked to be the tenant's),
    its comment with personal data redacted."""
    if req.score is None and req.thumbs is None:
        raise BadRequestError("feedback needs a score in [0, 1] or thumbs up/down", param="score")
    if req.score is not None and req.thumbs is not None:
        raise BadRequestError("feedback takes a score or thumbs, not both", param="thumbs")
    if record.get("status") == "error":  # refused or failed: no answer was served to rate
        raise BadRequestError(
            f"request '{req.request_id}' was answered with an error "
            f"({record.get('http_status')}): it served no answer to rate",
            param="request_id",
        )
    quality = req.score if req.score is not None else (1.0 if req.thumbs == "up" else 0.0)
    value = 1.0 - quality if record.get("tier") == "local" else None
    return Label(
        request_id=req.request_id,
        tenant=str(record["tenant"]),
        source="feedback",
        value=value,
        ts=time.time(),
        quality=quality,
        # Free text about a prompt, which may repeat what it said: kept as a redacted prompt is.
        comment=None if req.comment is None else redacted(req.comment),
        detail={"served_tier": record.get("tier"), "served_model": record.get("model")},
    )


class LearningLoop:
    """Per-process state of the quality signals: shadow tasks and the escalation map.

    ``gateway`` is the running :class:`~router.gateway.Gateway` (for the policy, the closed
    backend, the cost book and the outcome store); ``telemetry``, when given, counts the shadow
    judgements and their cost.
    """

    def __init__(
        self,
        gateway: Any,
        *,
        judge_model: str | None = None,
        concurrency: int = 4,
        escalation_window_s: float = 600.0,
        max_pending: int | None = None,
        max_fingerprints: int = 50_000,
        rng: Callable[[], float] = random.random,
        telemetry: Telemetry | None = None,
    ) -> None:
        self.gateway = gateway
        self._telemetry = telemetry
        self.judge_model = judge_model
        self.escalation_window_s = escalation_window_s
        self._sem = asyncio.Semaphore(concurrency)
        self._max_pending = max_pending if max_pending is not None else 8 * concurrency
        self._tasks: set[asyncio.Task[None]] = set()
        self._local_answers: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._max_fingerprints = max_fingerprints
        self._rng = rng
        self.shadow_started = 0
        self.shadow_labelled = 0
        self.shadow_skipped = 0
        self.shadow_failed = 0
        self.escalations = 0
        if telemetry is not None:
            telemetry.watch_learning(self)

    @property
    def pending(self) -> int:
        """Shadow judgements started and not yet finished."""
        return len(self._tasks)

    @property
    def store(self) -> OutcomeStore:
        """The outcome store labels go to."""
        store: OutcomeStore = self.gateway.outcomes
        return store

    # -- feedback --------------------------------------------------------------------------

    async def feedback(
        self, req: FeedbackRequest, check_access: Callable[[Mapping[str, Any] | None], None]
    ) -> Label:
        """Store feedback on a request; ``check_access`` raises (404) unless the caller may label
        that record (:func:`router.auth.check_record_access`: its own tenant's, or any for an
        ``admin`` key)."""
        record = await asyncio.to_thread(self.store.get, req.request_id)
        check_access(record)
        if record is None:  # check_access refuses a missing record; kept for the type checker
            raise NotFoundError(f"no request '{req.request_id}'", code="request_not_found")
        label = feedback_label(req, record)
        self.store.label(label)
        return label

    # -- escalation ------------------------------------------------------------------------

    def observe(self, ctx: Any, body: Mapping[str, Any]) -> None:
        """Before serving: a request pinned to a closed model that repeats a recent local
        conversation of the same tenant labels that local answer as worse (value 1)."""
        policy = self.gateway.policy
        spec = policy.models.get(str(body.get("model")))
        if spec is None or spec.tier != "closed" or self.escalation_window_s <= 0:
            return
        fp = conversation_fingerprint(ctx.tenant, body)
        earlier = self._local_answers.pop(fp, None)
        if earlier is None or time.time() - earlier[1] > self.escalation_window_s:
            return
        self.escalations += 1
        self.store.label(
            Label(
                request_id=earlier[0],
                tenant=ctx.tenant,
                source="escalation",
                value=1.0,
                ts=time.time(),
                detail={"escalated_to": spec.name, "by_request": ctx.request_id},
            )
        )

    def _remember_local(self, ctx: Any, body: Mapping[str, Any]) -> None:
        if self.escalation_window_s <= 0:
            return
        fp = conversation_fingerprint(ctx.tenant, body)
        self._local_answers[fp] = (ctx.request_id, time.time())
        self._local_answers.move_to_end(fp)
        cutoff = time.time() - self.escalation_window_s
        while self._local_answers and (
            len(self._local_answers) > self._max_fingerprints
            or next(iter(self._local_answers.values()))[1] < cutoff
        ):
            self._local_answers.popitem(last=False)

    # -- after a response ------------------------------------------------------------------

    def after_response(self, ctx: Any, body: Mapping[str, Any], answer: str | None) -> None:
        """After a successful answer: remember local answers for escalation and maybe start a
        shadow judgement. Never raises and never waits."""
        try:
            served = ctx.served
            decision = ctx.decision
            if served is None or decision is None or served.model.tier != "local":
                return
            self._remember_local(ctx, body)
            if answer is None or decision.local_only or decision.shadow_rate <= 0:
                return
            if self._rng() >= decision.shadow_rate:
                return
            if len(self._tasks) >= self._max_pending:
                self.shadow_skipped += 1
                return
            asked = self._asked(ctx, body, answer)
            if asked is None:
                self.shadow_skipped += 1
                return
            hold = None
            if decision.budget_usd is not None:
                hold = (self._shadow_cost(ctx, body, answer), decision.budget_usd)
            task = asyncio.get_running_loop().create_task(
                self._shadow(ctx.request_id, ctx.tenant, asked, answer, hold),
                context=outside_request(),
            )
            self.shadow_started += 1
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        except Exception:  # a learning hiccup must never fail a served request; it is logged
            log.exception("after_response failed for %s", getattr(ctx, "request_id", "?"))

    def _asked(self, ctx: Any, body: Mapping[str, Any], local: str) -> dict[str, Any] | None:
        """The request the default closed model is sent, as the gateway would send it there
        (``Gateway.sent``: without the fields a front made that it cannot take, such as an
        Anthropic request's ``top_k`` for an OpenAI model, with the output limit it is sent cut
        to what its window leaves), or None where the shadow could only fail, before anything
        is spent: the model cannot take the request (the policy's hard constraints), or the
        judge cannot read the question with the local answer."""
        from router.signals import scoring_text

        spec = self._closed_spec(None)
        why = why_unfit(spec, ctx.signals)
        if why is not None:
            why = f"{spec.name} cannot take {why}"
        else:
            question = scoring_text(list(body.get("messages") or []))
            judged = judge_messages(question, local, "")
            why = judge_unfit(self._closed_spec(self.judge_model), judged)
        if why is None:
            try:
                return self.gateway.sent(ctx, spec, dict(body))  # type: ignore[no-any-return]
            except BadRequestError as exc:  # fields only another provider's model serves
                why = exc.message
        log.info("no shadow judgement of %s: %s", ctx.request_id, why)
        return None

    async def _shadow(
        self,
        request_id: str,
        tenant: str,
        body: dict[str, Any],
        local: str,
        hold: tuple[float, float] | None = None,
    ) -> None:
        # ``hold``: (the judgement's estimated cost, the tenant's budget). The estimate is held
        # against the budget like a request's, so shadow calls cannot spend past it, and the
        # label's cost replaces the hold. Stopped while the hold is made (at shutdown), it
        # waits for the hold and releases it (reserve_in_thread).
        hold_id = f"{request_id}:shadow"
        label: Label | None = None
        async with self._sem:
            if hold is not None:
                usd, budget = hold
                try:
                    held = await reserve_in_thread(self.store, tenant, hold_id, usd, budget)
                except asyncio.CancelledError:
                    await asyncio.to_thread(self.store.release_spend, hold_id)
                    raise
                if not held:
                    self.shadow_skipped += 1  # the budget is spent: no judgement today
                    return
            try:
                label = await self.judge(request_id, tenant, body, local)
            except TiergateError as exc:
                self.shadow_failed += 1
                log.warning("shadow judgement of %s failed: %s", request_id, redacted(exc.message))
            except Exception:  # counted and logged; the user's answer is long gone
                self.shadow_failed += 1
                log.exception("shadow judgement of %s failed", request_id)
            finally:
                if label is not None:  # queued first, so its cost counts before the hold goes
                    self.store.label(label)
                    self.shadow_labelled += "error" not in label.detail
                    if self._telemetry is not None:
                        self._telemetry.on_label(label)
                if hold is not None:
                    await asyncio.to_thread(self.store.release_spend, hold_id)

    def _shadow_cost(self, ctx: Any, body: Mapping[str, Any], local: str) -> float:
        """What a shadow judgement may cost: the default closed model answering the request
        (the tokens the gateway reserved one call for) and the judge reading both answers
        twice, each call priced at the most its prompt can be (a token a UTF-8 byte, as
        the gateway holds a request) and its completion cap."""
        from router.signals import estimate_tokens, scoring_text

        spec = self._closed_spec(None)
        prompt, completion = self.gateway.call_tokens(ctx, self.gateway.reserve_tokens, spec)
        costs = self.gateway.costs
        closed = costs.closed_cost(spec, prompt, completion)
        # The judge reads the question and both answers (the closed one at most its cap).
        question = scoring_text(list(body.get("messages") or []))
        judged: list[Mapping[str, Any]] = [*judge_messages(question, local, "")]
        judge_prompt = estimate_tokens(judged, bound=True) + completion
        judge_spec = self._closed_spec(self.judge_model)
        judge = costs.closed_cost(judge_spec, judge_prompt, judge_tokens(judge_spec))
        return float(closed + 2 * judge)

    def _closed_spec(self, name: str | None) -> ModelSpec:
        policy = self.gateway.policy
        if name is None:
            if not policy.closed_models:
                raise TiergateError("no closed model configured for shadow judging")
            name = policy.closed_models[0]
        return policy.models[name]  # type: ignore[no-any-return]

    async def _ask(self, spec: ModelSpec, body: dict[str, Any]) -> tuple[Completion, float]:
        request = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
        request["model"] = spec.name
        result: Completion = await self.gateway.closed.complete(spec, request)
        return result, float(self.gateway.costs.call_cost(spec, result.usage))

    async def judge(
        self, request_id: str, tenant: str, body: dict[str, Any], local_answer: str
    ) -> Label | None:
        """Ask the default closed model the same request, then the judge both ways round."""
        from router.signals import scoring_text

        closed_spec = self._closed_spec(None)
        judge_spec = self._closed_spec(self.judge_model)
        closed, cost = await self._ask(closed_spec, body)
        closed_answer = answer_text(closed.body)
        question = scoring_text(list(body.get("messages") or []))
        verdicts: list[tuple[str, str | None]] = []
        detail: dict[str, Any] = {"closed_model": closed_spec.name, "judge_model": judge_spec.name}
        value = None
        try:
            # The judge reads the closed answer too: one it cannot read with the rest is not
            # sent to it (each ordering is as long).
            why = judge_unfit(judge_spec, judge_messages(question, closed_answer, local_answer))
            if why is not None:
                raise BadRequestError(why, code="context_length_exceeded")
            for closed_pos in ("A", "B"):
                a, b = (
                    (closed_answer, local_answer)
                    if closed_pos == "A"
                    else (local_answer, closed_answer)
                )
                judged, judge_cost = await self._ask(
                    judge_spec, judge_request(judge_spec, question, a, b)
                )
                cost += judge_cost
                verdicts.append((closed_pos, parse_verdict(answer_text(judged.body))))
        except TiergateError as exc:
            # The closed answer was paid for: the label keeps its cost (it counts against the
            # budget) and no value.
            self.shadow_failed += 1
            log.warning("shadow judgement of %s failed: %s", request_id, redacted(exc.message))
            detail["error"] = exc.code
        else:
            value = closed_better(verdicts)
            if value is None:
                log.warning("judge gave no verdict for %s", request_id)
        detail["verdicts"] = [{"closed_position": p, "verdict": v} for p, v in verdicts]
        return Label(
            request_id=request_id,
            tenant=tenant,
            source="shadow",
            value=value,
            ts=time.time(),
            cost_usd=cost,
            detail=detail,
        )

    async def drain(self, timeout_s: float = 10.0) -> None:
        """Wait for running shadow judgements (at shutdown), cancelling what is left."""
        if not self._tasks:
            return
        _, pending = await asyncio.wait(set(self._tasks), timeout=timeout_s)
        for task in pending:
            task.cancel()
        for task in pending:
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def purge_loop(
    store: OutcomeStore, retention_days: Callable[[], int | None], every_s: float
) -> None:
    """Delete records and labels past the policy's retention period, every ``every_s``; each
    round also tells the store the period (a Redis store's TTLs), so a policy reload reaches it.
    """
    if every_s <= 0:
        return
    while True:
        days = retention_days()
        store.set_retention_days(days)
        if days is not None:
            try:
                gone = await asyncio.to_thread(store.purge, time.time() - days * 86400.0)
                if gone:
                    log.info("purged %d outcome records older than %d days", gone, days)
            except StoreUnavailableError as exc:  # an outage the store reports itself
                log.warning("outcome purge skipped: %s", exc.message)
            except Exception:  # the purge must survive a store hiccup; the error is logged
                log.exception("outcome purge failed")
        await asyncio.sleep(every_s)
