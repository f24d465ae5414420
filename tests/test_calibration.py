"""Online calibration of target-closed-share aliases."""

from __future__ import annotations

import numpy as np

from router.calibration import MIN_SAMPLES, calibrate, calibrated_values
from router.policy import parse_policy

YAML = """
version: 1
models:
  local: {tier: local}
  big: {tier: closed, litellm_model: openai/gpt-4o}
threshold: 0.4
aliases:
  auto: {threshold: 0.5}
  auto-cheap: {target_closed_share: 0.2}
  auto-none: {target_closed_share: 0.0}
"""
POLICY = parse_policy(YAML)


def test_fixed_threshold_aliases_keep_their_value() -> None:
    result = calibrate(POLICY, [0.1] * 100)
    assert result["auto"].threshold == 0.5 and result["auto"].source == "policy"


def test_target_share_waits_for_enough_samples() -> None:
    result = calibrate(POLICY, [0.9] * (MIN_SAMPLES - 1))
    assert result["auto-cheap"].source == "calibrating"
    assert result["auto-cheap"].threshold == 0.4
    assert "auto-cheap" not in calibrated_values(result)


def test_target_share_sends_that_share_closed() -> None:
    scores = np.random.default_rng(0).random(5000)
    result = calibrate(POLICY, list(scores))
    threshold = result["auto-cheap"].threshold
    assert result["auto-cheap"].source == "calibrated"
    assert abs(float(np.mean(scores >= threshold)) - 0.2) < 0.005
    # A zero share never routes closed.
    assert not np.any(scores >= result["auto-none"].threshold)
    assert calibrated_values(result) == {
        "auto-cheap": threshold,
        "auto-none": result["auto-none"].threshold,
    }


def test_a_tenants_target_share_alias_is_calibrated_with_its_own_share() -> None:
    p = parse_policy(
        YAML
        + """
tenants:
  globex:
    aliases:
      auto-cheap: {threshold: 0.95}
      auto-frugal: {target_closed_share: 0.01}
"""
    )
    scores = list(np.random.default_rng(0).random(5000))
    result = calibrate(p, scores)
    frugal = result["globex/auto-frugal"]
    assert frugal.source == "calibrated" and frugal.target_closed_share == 0.01
    assert abs(float(np.mean(np.array(scores) >= frugal.threshold)) - 0.01) < 0.002
    # globex's fixed auto-cheap is not calibrated; the global one is
    assert "globex/auto-cheap" not in result and result["auto-cheap"].source == "calibrated"
    assert calibrate(p, scores[:10])["globex/auto-frugal"].source == "calibrating"
