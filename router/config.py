"""Deployment settings: environment variables with the ``TIERGATE_`` prefix, plus an optional file.

Precedence, highest first: explicit overrides (CLI flags), ``TIERGATE_*`` environment variables,
the YAML config file (``--config`` or ``TIERGATE_CONFIG``), then the defaults below. Routing
behaviour (models, rules, aliases, tenants) lives in the policy file, not here.
"""

from __future__ import annotations

import difflib
import os
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from router.errors import ConfigError
from router.locations import default_policy_path, shipped, user_data_dir

BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: The longest line of a provider's stream Tiergate reads, by default: one SSE event's
#: ``data:``. A Responses stream ends with ``response.completed``, which holds the whole answer
#: and echoes the request's instructions and tools (up to the 8 MiB request limit) in one
#: line; image generation streams base64 images one to an event. 64 MiB leaves room for all
#: of these, and bounds what one stream can make Tiergate hold.
MAX_EVENT_BYTES = 64 * 1024 * 1024
#: How ``tiergate serve --help`` shows a default inside the data directory.
HOME = Path("$TIERGATE_HOME")
#: Settings whose default is a file in the data directory, filled in from ``home``.
HOME_FILES: dict[str, Path] = {
    "sqlite_path": Path("tiergate.db"),
    "outcome_journal_path": Path("outcomes-journal.jsonl"),
    "local_model_path": Path("models") / BUNDLED_GGUF,
    "model_store": Path("model-store"),
}


def checkout_gguf() -> Path | None:
    """The bundled GGUF in the shipped ``models/`` folder (a source checkout after ``make
    model``; a wheel carries no GGUF), or None when it is not there."""
    path = shipped("models", BUNDLED_GGUF)
    return path if path.is_file() else None


class Settings(BaseSettings):
    """Everything a deployment sets. Documented field by field in ``tiergate serve --help``."""

    model_config = SettingsConfigDict(env_prefix="TIERGATE_", extra="forbid")

    home: Path = Field(
        default_factory=user_data_dir,
        description="Data directory for everything Tiergate writes (outcomes, journal, model "
        "store, fetched GGUF); default: the platform's user data directory "
        "($XDG_DATA_HOME/tiergate or ~/.local/share/tiergate on Linux).",
    )
    host: str = Field("127.0.0.1", description="Bind address; any but loopback needs API keys.")
    port: int = Field(8000, ge=1, le=65535, description="Port to listen on.")
    policy: Path = Field(
        default_factory=default_policy_path,
        description="Routing policy YAML file; default: the shipped policies/default.yaml.",
    )
    policy_reload_s: float = Field(
        2.0, ge=0, description="How often the policy file is checked for changes; 0 disables."
    )

    calibrate_every_s: float = Field(
        15.0, ge=0, description="How often target-share aliases are recalibrated; 0 disables."
    )

    local_backend: Literal["llama_cpp", "openai_http", "none"] = Field(
        "llama_cpp",
        description="llama_cpp: a GGUF in process; openai_http: an external llama.cpp server; "
        "none: no local tier.",
    )
    local_model_path: Path = Field(
        HOME / HOME_FILES["local_model_path"],
        description="GGUF file of the in-process local model (tiergate fetch-model puts the "
        "bundled one there); in a source checkout whose models/ holds the bundled GGUF "
        "(make model), that file.",
    )
    local_base_url: str | None = Field(
        None, description="Base URL of an external OpenAI-compatible llama.cpp server (…/v1)."
    )
    local_api_key: str | None = Field(
        None, description="Bearer key for the external llama.cpp server (openai_http)."
    )
    n_ctx: int = Field(4096, ge=256, description="Local context window in tokens.")
    n_threads: int | None = Field(
        None,
        ge=1,
        description="CPU threads for llama.cpp, to generate and to read a prompt; unset: its "
        "defaults (half the cores to generate, all of them to read).",
    )
    n_batch: int = Field(512, ge=1, description="llama.cpp prompt batch size in tokens.")
    n_gpu_layers: int = Field(0, ge=-1, description="Layers offloaded to the GPU; -1 = all.")
    local_queue_size: int = Field(
        8, ge=0, description="Requests that may wait for the local model before it is 'full'."
    )
    local_slots: int = Field(
        4,
        ge=1,
        description="Requests sent to an external local server at once (openai_http): its "
        "decoding slots (llama-server --parallel; llama_cpp.server has one) times its "
        "replicas, over the routers.",
    )
    local_timeout_s: float = Field(
        300.0,
        gt=0,
        description="Longest local generation in process, seconds; for an external server "
        "(openai_http) the longest wait to connect and for each read, so a stream may run "
        "longer (a model's timeout_s wins).",
    )
    local_max_tokens: int = Field(
        512,
        ge=1,
        description="max_tokens for a local generation whose request sets neither max_tokens "
        "nor max_completion_tokens (one long answer holds the only local slot).",
    )
    closed_timeout_s: float = Field(
        120.0, gt=0, description="Closed-provider timeout, seconds (a model's timeout_s wins)."
    )
    cooldown_s: float = Field(
        30.0,
        ge=0,
        description="How long a closed model, or an external local server (openai_http), that "
        "keeps failing (cooldown_after_fails calls in a row: timeouts, refused connections, 5xx) "
        "is passed over for the next model of each request's chain; a 429, or an overload (503, "
        "529) that sends a Retry-After, cools it for that Retry-After (at most 120 s). A cooling "
        "model is still called when nothing after it can be, or everything after it refused the "
        "request. Once it lapses, one request at a time probes the model (within its timeout) "
        "while the others still pass it over; its failure cools it again at once. Replicas "
        "sharing TIERGATE_REDIS_URL share their cooldowns. 0 turns cooling off.",
    )
    cooldown_after_fails: int = Field(
        3, ge=1, description="Failed calls in a row that cool a model (see cooldown_s)."
    )
    shutdown_timeout_s: int = Field(
        15,
        ge=1,
        description="At SIGTERM, how long requests in flight may run on before they are stopped "
        "(each answered 503 server_shutting_down, or its stream ended with that error, and "
        "recorded so); keep it under the grace period of whatever sends the SIGTERM, less "
        "any preStop delay and up to 23 s to drain after it (the Helm chart: 45 s grace, 5 s "
        "preStop; Kubernetes' default grace, 30 s, leaves no room for the default 15).",
    )
    stream_keepalive_s: float = Field(
        0.0,
        ge=0,
        description="A stream that has sent nothing for this long sends an SSE comment "
        "(': keep-alive'), so that a proxy does not close it as idle; one still waiting for "
        "its first token then starts at once (200 with x-request-id alone, and a failure as "
        "the stream's error event). Set it under the proxy's idle timeout (nginx: 60 s); "
        "0 = off.",
    )
    default_system_prompt: str = Field(
        "You are a helpful assistant.",
        description="Added for the local model when the client sent no system message.",
    )

    sqlite_path: Path = Field(HOME / HOME_FILES["sqlite_path"], description="SQLite outcome store.")
    redis_url: str | None = Field(None, description="When set, outcomes and limits use Redis.")
    redis_password: str | None = Field(
        None,
        description="Password of the Redis at redis_url, kept out of the URL (e.g. from a "
        "Kubernetes Secret); any characters, where one written into the URL must have '/', "
        "'#' and '%' percent-encoded.",
    )
    outcome_queue_size: int = Field(
        100_000, ge=1, description="Outcome records buffered in memory before the store."
    )
    outcome_journal_path: Path = Field(
        HOME / HOME_FILES["outcome_journal_path"],
        description="Where Redis-bound outcomes wait on disk while Redis is unreachable; one "
        "per process.",
    )
    purge_every_s: float = Field(
        3600.0, ge=0, description="How often records past the policy's retention_days are purged."
    )
    shadow_concurrency: int = Field(
        4, ge=1, description="Shadow judgements (closed answer + judge) running at once."
    )
    judge_model: str | None = Field(
        None, description="Policy model that judges shadow pairs; default: the default closed."
    )
    escalation_window_s: float = Field(
        600.0, ge=0, description="A re-send pinned to a closed model within this is an escalation."
    )
    model_watch_s: float = Field(
        5.0, ge=0, description="How often the model store's current pointer is checked; 0 = off."
    )

    classifier_path: Path | None = Field(
        None, description="Classifier artifact directory; unset: the shipped classifier."
    )
    cascade_model_path: Path | None = Field(
        None,
        description="Cascade confidence model directory (route: cascade); unset: the shipped "
        "models/cascade-v1, fitted on the bundled SmolLM2's answers.",
    )
    local_profile: Path | None = Field(
        None,
        description="Profile of the local model (tiergate profile, or declared: "
        "models/profiles/*.yaml); the routing score and the policy's local_accuracy signal read "
        "it. Unset: the bundled SmolLM2's.",
    )
    model_store: Path | None = Field(
        HOME / HOME_FILES["model_store"],
        description="Versioned classifier store (tiergate models, retrain); its current version "
        "wins over classifier_path (an empty store changes nothing).",
    )

    api_keys_file: Path | None = Field(
        None, description="YAML of client keys (sha256 hashes); see SECURITY.md."
    )
    admin_keys: str | None = Field(None, description="Comma-separated sha256 hashes of admin keys.")
    allow_anonymous: bool = Field(
        False, description="Serve without keys on a non-loopback host (no keys configured)."
    )
    rpm_limit: int | None = Field(None, ge=1, description="Requests per minute per tenant.")
    tpm_limit: int | None = Field(None, ge=1, description="Tokens per minute per tenant.")
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="Request body limit (413).")
    max_messages: int = Field(1000, ge=1, description="Most messages in one chat request (400).")
    max_event_bytes: int = Field(
        MAX_EVENT_BYTES,
        ge=64 * 1024,
        description="Longest event (one SSE line, or the data lines of one event together) "
        "read from a provider's stream, and longest answer body: a longer one fails the call "
        "(502 upstream_bad_response) instead of being held whole.",
    )
    max_tokens_cap: int = Field(
        32768, ge=1, description="Largest max_tokens a request may ask for (400 above)."
    )
    reserve_tokens: int = Field(
        4096,
        ge=1,
        description="Completion tokens reserved against token limits and budgets for a request "
        "that sets no max_tokens (more for a call to a closed model that can write more).",
    )

    local_price_per_mtok: float = Field(
        0.0, ge=0, description="Cost charged for local tokens, USD per 1M tokens."
    )
    local_price_per_gpu_hour: float = Field(
        0.0, ge=0, description="Cost of local generation time, USD per GPU-hour (per request)."
    )
    otel_enabled: bool | None = Field(
        None,
        description="OpenTelemetry traces/OTLP metrics: unset follows the OTEL_* env vars "
        "(OTEL_TRACES_EXPORTER set: on unless it is none; else on when "
        "OTEL_EXPORTER_OTLP_ENDPOINT or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is set; "
        "OTEL_SDK_DISABLED=true wins).",
    )
    metrics_enabled: bool = Field(True, description="Record request metrics for GET /metrics.")
    eval_report: Path | None = Field(
        None,
        description="JSON evaluation report shown on /dashboard (tiergate eval --json); unset: "
        "the eval.json beside the classifier (the shipped model has one).",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="JSON logs on stderr; warning drops the per-request lines."
    )

    @field_validator("classifier_path", "cascade_model_path", "local_profile", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        # TIERGATE_LOCAL_PROFILE= (an empty value, as templating leaves it) means "the default",
        # not the current folder.
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        # Read here, not at the first connection, where a bad URL was a traceback at start-up.
        # The URL is never repeated: it may hold a password. Empty means unset.
        if value is None or not value.strip():
            return None
        parts = urllib.parse.urlsplit(value.strip())
        if parts.scheme not in ("redis", "rediss", "unix"):
            raise ValueError("must start with redis://, rediss:// or unix://")
        try:
            parts.port  # noqa: B018 (raises on a port that is not a number)
        except ValueError:
            raise ValueError("its port is not a number") from None
        if "#" in value:
            # A raw '#' in a password ends the URL there, and what is left may still parse
            # (redis://:123#x@cache reads as port 123 of no host).
            raise ValueError("it holds a '#': write one in a password as %23")
        db = parts.path.strip("/")
        if parts.scheme != "unix" and db and not db.isdigit():
            raise ValueError("its path must be a database number, such as /0")
        return value.strip()

    @model_validator(mode="after")
    def _password_into_redis_url(self) -> Settings:
        # Every Redis client reads redis_url, so the password joins it here, percent-encoded:
        # a password from a Secret (base64 from `openssl rand`) often holds a '/', which spliced
        # in raw ends the host, and the URL no longer parses.
        if not self.redis_password:
            return self
        if self.redis_url is None:
            raise ValueError("redis_password is set but redis_url is not")
        parts = urllib.parse.urlsplit(self.redis_url)
        userinfo, at, host = parts.netloc.rpartition("@")
        if at and ":" in userinfo:
            raise ValueError("redis_url carries a password and redis_password is set: keep one")
        password = urllib.parse.quote(self.redis_password, safe="")
        self.redis_url = urllib.parse.urlunsplit(
            parts._replace(netloc=f"{userinfo}:{password}@{host}")
        )
        return self

    @model_validator(mode="before")
    @classmethod
    def _files_in_home(cls, data: Any) -> Any:
        # The files a deployment does not name go into the data directory (TIERGATE_HOME);
        # the bundled GGUF is read from a checkout's models/ when `make model` put it there,
        # as the encoder's weights are (router.encoder.encoder_path).
        if isinstance(data, dict):
            home = data.get("home") or user_data_dir()
            data = {**data, "home": home}
            if "local_model_path" not in data and (bundled := checkout_gguf()) is not None:
                data["local_model_path"] = bundled
            for key, name in HOME_FILES.items():
                if key not in data:
                    data[key] = Path(home) / name
        return data

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Overrides, then env, then the config file (see module docstring)."""
        return (init_settings, env_settings, _FileSource(settings_cls))


class _FileSource(PydanticBaseSettingsSource):
    """Reads the YAML file named by ``TIERGATE_CONFIG`` (set by ``--config`` too)."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        raise NotImplementedError  # __call__ below returns the whole mapping at once

    def __call__(self) -> dict[str, Any]:
        path = os.environ.get("TIERGATE_CONFIG")
        if not path:
            return {}
        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping of settings")
        return {str(k).lower(): v for k, v in data.items()}


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Build :class:`Settings`, turning validation failures into a readable :class:`ConfigError`.

    A ``config_file`` is put in ``TIERGATE_CONFIG`` for the rest of the process, so that a
    command's later ``load_settings()`` calls read the same file (as ``--config`` promises)."""
    if config_file is not None:
        os.environ["TIERGATE_CONFIG"] = str(config_file)
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        problems = "; ".join(
            # A check across settings (a model validator) has no location.
            f"{'.'.join(str(p) for p in err['loc'])}: {_problem(err)}".removeprefix(": ")
            for err in exc.errors()
        )
        raise ConfigError(f"invalid settings: {problems}") from exc


def _problem(err: Mapping[str, Any]) -> str:
    # pydantic's wording, except for a key no setting has: say so, and suggest the nearest.
    if err["type"] != "extra_forbidden":
        return str(err["msg"])
    name = str(err["loc"][-1]) if err["loc"] else ""
    bare = name.removeprefix("tiergate_")  # TIERGATE_N_CTX copied from the environment
    if bare != name and bare in Settings.model_fields:
        return f"no such setting: a file key has no TIERGATE_ prefix; did you mean '{bare}'?"
    near = difflib.get_close_matches(name, list(Settings.model_fields), n=1, cutoff=0.7)
    hint = f"; did you mean '{near[0]}'?" if near else ""
    return f"no such setting (`tiergate serve --help` lists them){hint}"
