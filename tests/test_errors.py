"""The one error hierarchy: what a client receives (OpenAI's envelope, or Anthropic's on its
front), retry hints in headers, and credentials scrubbed from any upstream text repeated."""

from __future__ import annotations

from router.errors import (
    BackendError,
    ConfigError,
    LocalOverloadedError,
    MissingExtraError,
    OverWindowError,
    TiergateError,
    UpstreamTimeoutError,
    error_body,
    scrub,
)


def test_scrub_removes_known_secrets_and_credential_shaped_text() -> None:
    text = "bad key sk-abcdefghijklmnop; Authorization: Bearer tok123; mine=hunter22"
    clean = scrub(text, ["hunter22", None])
    assert "sk-abcdefghijklmnop" not in clean and "tok123" not in clean
    assert "hunter22" not in clean and clean.count("[redacted]") == 3
    assert scrub("nothing secret here") == "nothing secret here"


def test_a_client_sees_the_openai_envelope_except_on_anthropics_front() -> None:
    error = UpstreamTimeoutError("gpt-4o timed out")
    assert error_body(error, "/v1/chat/completions") == {
        "error": {
            "message": "gpt-4o timed out",
            "type": "api_error",
            "param": None,
            "code": "upstream_timeout",
        }
    }
    limited = LocalOverloadedError("queue full")
    assert error_body(limited, "/v1/messages") == {
        "type": "error",
        "error": {"type": "rate_limit_error", "message": "queue full"},
    }
    assert error_body(error, "/v1/messages/count_tokens")["error"]["type"] == "api_error"


def test_a_configuration_error_tells_the_sdk_not_to_retry() -> None:
    assert ConfigError("bad policy").headers == {"x-should-retry": "false"}
    assert TiergateError("boom").headers == {}
    assert "pip install 'tiergate[redis]'" in str(MissingExtraError("the Redis store", "redis"))


def test_retry_after_is_a_whole_number_of_seconds_at_least_one() -> None:
    assert LocalOverloadedError("full", retry_after=0.2).headers == {"retry-after": "1"}
    assert BackendError("429", retry_after=7.6).headers == {"retry-after": "8"}
    assert "retry-after" not in BackendError("500").headers


def test_a_restated_backend_error_keeps_what_the_fallback_reads() -> None:
    error = UpstreamTimeoutError("m timed out", upstream_status=504, retry_after=3)
    again = error.restated("claude timed out")
    assert type(again) is UpstreamTimeoutError and again.message == "claude timed out"
    assert (again.status_code, again.upstream_status, again.headers) == (
        504,
        504,
        {"retry-after": "3"},
    )


def test_a_prompt_that_fills_the_window_is_not_said_to_fit() -> None:
    """llama.cpp refuses a prompt as long as its window whatever ``max_tokens`` (it needs a
    token of room). The local refusal said such a prompt "fits ... but leaves 0 tokens" and
    named ``max_tokens``, which no value the client may send can fix: the prompt is what to
    cut. One token shorter, it fits, and ``max_tokens`` is the field."""
    full = OverWindowError("the local model", 2048, 1, 2048)
    assert full.param == "messages"
    assert full.message.startswith("the prompt fills the local model's context window:"), full
    fits = OverWindowError("the local model", 2047, 2, 2048)
    assert fits.param == "max_tokens"
    assert fits.message.startswith("the prompt fits the local model's context window"), fits
