"""Online calibration of aliases that ask for a target closed share.

An alias such as ``auto-cheap: {target_closed_share: 0.2}`` wants about 20% of its traffic on the
closed tier. The score that achieves that is the 80th percentile of the scores of recent live
traffic (RouteLLM's ``calibrate_threshold`` idea, done on this deployment's own requests rather
than on a public dataset). Until enough scores are recorded, the policy's default threshold is
used and the alias reports itself as still calibrating. Pure: the caller supplies the scores.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from router.policy import Policy

MIN_SAMPLES = 50


@dataclass(frozen=True, slots=True)
class AliasThreshold:
    """The threshold an alias routes with now, and where it comes from."""

    alias: str
    threshold: float
    source: str  # "policy", "calibrated" or "calibrating"
    target_closed_share: float | None = None
    samples: int = 0

    def as_dict(self) -> dict[str, object]:
        """JSON-ready view for /v1/models and /readyz."""
        return {
            "threshold": round(self.threshold, 6),
            "source": self.source,
            "target_closed_share": self.target_closed_share,
            "samples": self.samples,
        }


def calibrate(
    policy: Policy, scores: Sequence[float], *, min_samples: int = MIN_SAMPLES
) -> dict[str, AliasThreshold]:
    """Thresholds for every global alias, and for each tenant's own alias with a target share
    (under ``tenant/alias``, :meth:`~router.policy.Policy.calibration_key`); calibrated ones
    from ``scores`` (recent live traffic, every tenant's)."""
    out: dict[str, AliasThreshold] = {}
    values = [float(v) for v in scores]
    for name, alias in policy.aliases.items():
        if alias.cascade:  # a cascade alias has no score threshold: its answers' confidence decides
            continue
        share = alias.target_closed_share
        if share is None:
            threshold = alias.threshold if alias.threshold is not None else policy.threshold
            out[name] = AliasThreshold(name, threshold, "policy")
        else:
            out[name] = _for_share(name, share, values, policy.threshold, min_samples)
    for tenant, settings in policy.tenants.items():
        for name, alias in settings.aliases.items():
            key = policy.calibration_key(name, tenant)
            if key is not None and alias.target_closed_share is not None:
                share = alias.target_closed_share
                out[key] = _for_share(key, share, values, policy.threshold, min_samples)
    return out


def _for_share(
    key: str, share: float, values: list[float], default: float, min_samples: int
) -> AliasThreshold:
    if len(values) < min_samples:
        return AliasThreshold(key, default, "calibrating", share, len(values))
    # score >= threshold goes closed, so the (1 - share) quantile leaves `share` above it.
    threshold = quantile(values, 1.0 - share) if share > 0 else float("inf")
    threshold = min(max(threshold, 0.0), 1.0 + 1e-9)
    return AliasThreshold(key, threshold, "calibrated", share, len(values))


def quantile(values: Sequence[float], q: float) -> float:
    """``numpy.quantile(values, q)`` (its default, linear method) without importing numpy.

    This is numpy's only use on the serving path, so the server need not load numpy
    (memory and start-up: bench/README.md).
    """
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    t = pos - lo
    a, b = ordered[lo], ordered[hi]
    # numpy's lerp: from the nearer end, so that t = 1 gives b exactly.
    return b - (b - a) * (1 - t) if t >= 0.5 else a + (b - a) * t


def calibrated_values(thresholds: dict[str, AliasThreshold]) -> dict[str, float]:
    """Only the calibrated thresholds, in the form ``evaluate(thresholds=...)`` takes."""
    return {name: t.threshold for name, t in thresholds.items() if t.source == "calibrated"}
