"""The cascade's pure parts: answer statistics, the confidence model and its artifact, the
judgement and the streaming hold-back."""

from __future__ import annotations

import math
from typing import Any

import pytest

from router.cascade import (
    HoldBack,
    answer_stats,
    judge,
    load_cascade,
)
from router.errors import UpstreamBadResponseError


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


@pytest.mark.parametrize(
    "logprobs",
    [
        "w",
        {"content": 5},
        {"content": ["w"]},
        {"content": [{"token": "w"}]},
        {"content": [{"token": "w", "logprob": None}]},
        {"content": [{"token": "w", "logprob": True}]},
        {"content": [{"token": "w", "logprob": float("-inf")}]},
        {"content": [{"token": "w", "logprob": -0.1, "top_logprobs": [{"token": "v"}]}]},
        {"content": [{"token": "w", "logprob": -0.1, "top_logprobs": {"v": -1.0}}]},
    ],
)
def test_hold_back_refuses_log_probabilities_it_cannot_read(logprobs: Any) -> None:
    # What an external server may send: a failure of the local model (which the gateway
    # escalates), where reading it raised whatever Python error it met first.
    choice = {"index": 0, "delta": {"content": "w"}, "logprobs": logprobs}
    with pytest.raises(UpstreamBadResponseError):
        HoldBack(tokens=3).add({"choices": [choice]})
    none = {"index": 0, "delta": {"content": "w"}, "logprobs": {"content": None}}
    assert not HoldBack(tokens=3).add({"choices": [none]})


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
    scorer = load_scorer(default_model_path())
    assert model.scorer == meta["scorer"]
    # router-v9's score is router-v8's (its sidecar's score_of), on which cascade-v1 was fitted.
    assert model.scorer in (scorer.version, getattr(scorer, "score_of", None))
