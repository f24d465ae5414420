"""What the local model is good at: a per-capability profile that the routing score reads.

A profile says, per capability (:data:`router.scoring.CAPABILITIES`), how often the local model
answers right, with an interval and the number of probes behind it. It is *measured* by
``tiergate profile`` (auto-graded probes run through the configured local backend), *estimated*
from labelled rows (``tiergate profile --from-labels``: an operator's own evaluation logs, read
through the router's capability model), *declared* by hand, or taken from *published* benchmark
figures for models too large to run here; a *learned* one is relearnt by ``tiergate retrain``
from labelled outcomes (:mod:`router.retrain`).
The routing score is P(closed materially better | prompt, local profile), so the same prompt routes
differently when the operator swaps a 135M model for an 8B one.

File format (JSON, or YAML for hand-written ones)::

    format: tiergate-profile
    format_version: 1
    model: SmolLM2-135M-Instruct.Q4_1      # free text: what was profiled
    source: measured                       # measured | estimated | declared | published | learned
    created: "2026-12-04T17:00:00Z"        # optional
    notes: "..."                           # optional
    capabilities:
      math: {accuracy: 0.05, low: 0.01, high: 0.15, n: 40}
      chat: {accuracy: 0.80}               # low/high/n optional when declared

A capability that a profile omits is unknown; :meth:`LocalProfile.accuracy` then answers the
profile's ``default_accuracy`` (the mean of the capabilities it does give).

This module is pure: no web code, nothing at import.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from router.errors import ConfigError
from router.locations import shipped
from router.scoring import CAPABILITIES


#: Where shipped profiles live, and the bundled model's: its measured profile
#: (``tiergate profile``) when there is one, else its declared placeholder.
def profile_dir() -> Path:
    """Where the shipped profiles are: ``models/profiles`` of the checkout or the wheel."""
    return shipped("models", "profiles")


BUNDLED_PROFILES: tuple[str, ...] = (
    "smollm2-135m-instruct-q4_1.json",
    "SmolLM2-135M-Instruct.Q4_1.json",
    "SmolLM2-135M-Instruct.declared.yaml",
)

PROFILE_FORMAT = "tiergate-profile"
PROFILE_FORMAT_VERSION = 1
SOURCES: tuple[str, ...] = ("measured", "estimated", "declared", "published", "learned")


@dataclass(frozen=True, slots=True)
class CapabilityAccuracy:
    """How often the local model is right on one capability: a rate in [0, 1], its interval."""

    accuracy: float
    low: float | None = None
    high: float | None = None
    n: int | None = None

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready view; absent optional fields are left out."""
        out: dict[str, Any] = {"accuracy": round(self.accuracy, 4)}
        if self.low is not None:
            out["low"] = round(self.low, 4)
        if self.high is not None:
            out["high"] = round(self.high, 4)
        if self.n is not None:
            out["n"] = self.n
        return out


@dataclass(frozen=True, slots=True)
class LocalProfile:
    """A local model's per-capability accuracy, as measured, declared or published."""

    model: str
    source: str
    capabilities: Mapping[str, CapabilityAccuracy]
    created: str | None = None
    notes: str | None = None
    origin: str | None = field(default=None, compare=False)  # the file it was read from

    @property
    def default_accuracy(self) -> float:
        """The accuracy assumed for a capability the profile does not give."""
        if not self.capabilities:
            return 0.5
        return sum(c.accuracy for c in self.capabilities.values()) / len(self.capabilities)

    @property
    def label(self) -> str:
        """How decisions name the profile (``policy explain``, the outcome record): the model,
        and for a profile relearnt from outcomes, that it was learnt."""
        return f"{self.model} (source: learned)" if self.source == "learned" else self.model

    def fingerprint(self) -> str:
        """The sha256 of what routing reads of the profile (model, source, accuracies): a
        learnt profile records its prior's, so it is read only over that same prior."""
        data = self.as_dict()
        key = {k: data[k] for k in ("model", "source", "capabilities")}
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()

    @property
    def missing(self) -> tuple[str, ...]:
        """The capabilities the profile does not give (read as :attr:`default_accuracy`)."""
        return tuple(c for c in CAPABILITIES if c not in self.capabilities)

    def gaps_warning(self) -> str | None:
        """What to tell an operator routing with a measured, estimated or learnt profile that
        covers only some capabilities (``tiergate profile --capability``, say), where the rest
        read as the mean of the few it has; None when it covers all, or is declared or
        published (a hand-written file may leave capabilities out on purpose)."""
        if not self.missing or self.source in ("declared", "published"):
            return None
        where = f"{self.origin}: " if self.origin else ""
        return (
            f"{where}this {self.source} profile gives {len(self.capabilities)} of "
            f"{len(CAPABILITIES)} capabilities; routing reads the other {len(self.missing)} "
            f"({', '.join(self.missing)}) as their mean, {self.default_accuracy:.2f}: profile "
            "every capability before routing with it"
        )

    def accuracy(self, capability: str) -> float:
        """The local model's accuracy on ``capability`` (the profile's default when absent)."""
        entry = self.capabilities.get(capability)
        return entry.accuracy if entry is not None else self.default_accuracy

    def as_dict(self) -> dict[str, Any]:
        """The file form (see the module docstring)."""
        out: dict[str, Any] = {
            "format": PROFILE_FORMAT,
            "format_version": PROFILE_FORMAT_VERSION,
            "model": self.model,
            "source": self.source,
        }
        if self.created is not None:
            out["created"] = self.created
        if self.notes is not None:
            out["notes"] = self.notes
        out["capabilities"] = {
            name: self.capabilities[name].as_dict()
            for name in CAPABILITIES
            if name in self.capabilities
        }
        return out


def wilson_interval(successes: float, n: float, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval for a binomial rate (95% by default); (0, 1) when n is 0.
    ``n`` may be a weighted count of rows, so neither need be whole."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _rate(where: str, key: str, value: Any, *, required: bool) -> float | None:
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise ConfigError(f"{where}: '{key}' must be a number in [0, 1], got {value!r}")
    return float(value)


def _entry(where: str, name: Any, raw: Any) -> CapabilityAccuracy:
    if name not in CAPABILITIES:
        raise ConfigError(f"{where}: unknown capability (known: {', '.join(CAPABILITIES)})")
    entry = {"accuracy": raw} if isinstance(raw, int | float) and not isinstance(raw, bool) else raw
    if not isinstance(entry, Mapping):
        raise ConfigError(f"{where}: must be a number or a mapping with 'accuracy'")
    bad = sorted(set(entry) - {"accuracy", "low", "high", "n"})
    if bad:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(map(repr, bad))}")
    accuracy = _rate(where, "accuracy", entry.get("accuracy"), required=True)
    assert accuracy is not None
    low = _rate(where, "low", entry.get("low"), required=False)
    high = _rate(where, "high", entry.get("high"), required=False)
    if (low is not None and low > accuracy) or (high is not None and high < accuracy):
        raise ConfigError(f"{where}: the interval must contain the accuracy")
    n = entry.get("n")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
        raise ConfigError(f"{where}: 'n' must be a whole number of probes")
    return CapabilityAccuracy(accuracy, low, high, n)


def profile_from_dict(data: Any, *, origin: str = "<profile>") -> LocalProfile:
    """Validate and build a profile from its file form; errors name the file and the key."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{origin}: a profile must be a mapping")
    if data.get("format") != PROFILE_FORMAT:
        raise ConfigError(f"{origin}: 'format' must be '{PROFILE_FORMAT}'")
    if data.get("format_version") != PROFILE_FORMAT_VERSION:
        raise ConfigError(
            f"{origin}: 'format_version' {data.get('format_version')!r} is not supported "
            f"(this Tiergate reads {PROFILE_FORMAT_VERSION})"
        )
    known = {"format", "format_version", "model", "source", "created", "notes", "capabilities"}
    extra = sorted(set(data) - known)
    if extra:
        raise ConfigError(f"{origin}: unknown key(s) {', '.join(map(repr, extra))}")
    model, source = data.get("model"), data.get("source", "declared")
    if not isinstance(model, str) or not model:
        raise ConfigError(f"{origin}: 'model' must name the profiled model")
    if source not in SOURCES:
        raise ConfigError(f"{origin}: 'source' must be one of {', '.join(SOURCES)}")
    caps = data.get("capabilities")
    if not isinstance(caps, Mapping) or not caps:
        raise ConfigError(f"{origin}: 'capabilities' must map capability names to accuracies")
    entries = {
        str(name): _entry(f"{origin}: capabilities.{name}", name, entry)
        for name, entry in caps.items()
    }
    for key in ("created", "notes"):
        if data.get(key) is not None and not isinstance(data.get(key), str):
            raise ConfigError(f"{origin}: '{key}' must be text")
    return LocalProfile(
        model=model,
        source=str(source),
        capabilities=entries,
        created=data.get("created"),
        notes=data.get("notes"),
        origin=origin,
    )


def load_profile(path: str | Path) -> LocalProfile:
    """Read a profile file (JSON, or YAML for ``.yaml``/``.yml``)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: cannot read the local model profile ({exc})") from exc
    try:
        data = yaml.safe_load(text) if p.suffix.lower() in {".yaml", ".yml"} else json.loads(text)
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{p}: not a valid profile file ({exc})") from exc
    return profile_from_dict(data, origin=str(p))


def write_profile(profile: LocalProfile, path: str | Path, *, comment: str | None = None) -> None:
    """Write ``profile`` atomically (a reader never sees half a file): YAML for ``.yaml``/``.yml``,
    headed by ``comment`` as ``#`` lines (provenance a reader keeps with the file), else JSON."""
    p = Path(path)
    if p.suffix.lower() in {".yaml", ".yml"}:
        head = "".join(f"# {line}".rstrip() + "\n" for line in (comment or "").splitlines())
        body = yaml.safe_dump(
            profile.as_dict(), sort_keys=False, allow_unicode=True, default_flow_style=None
        )
        text = head + body
    else:
        text = json.dumps(profile.as_dict(), indent=2) + "\n"
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(p)


def default_profile_path() -> Path:
    """The bundled model's profile file: the first of :data:`BUNDLED_PROFILES` that exists in
    ``profiles/`` beside ``$TIERGATE_CLASSIFIER_PATH`` (an installed package, as in the image,
    has no models/ of its own) or else in :func:`profile_dir`."""
    dirs = [profile_dir()]
    if classifier := os.environ.get("TIERGATE_CLASSIFIER_PATH"):
        dirs.insert(0, Path(classifier).parent / "profiles")
    for directory in dirs:
        for name in BUNDLED_PROFILES:
            if (directory / name).is_file():
                return directory / name
    raise ConfigError(f"no bundled local model profile in {' or '.join(map(str, dirs))}")


def default_profile(path: str | Path | None = None) -> LocalProfile:
    """The local profile a deployment reads: ``path`` (``TIERGATE_LOCAL_PROFILE``) when set,
    else the bundled model's (:func:`default_profile_path`)."""
    return load_profile(path if path is not None else default_profile_path())
