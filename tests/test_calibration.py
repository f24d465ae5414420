"""Online calibration of target-closed-share aliases."""

from __future__ import annotations

import numpy as np

from router.calibration import MIN_SAMPLES, calibrate, calibrated_values
from router.policy import parse_policy

POLICY = parse_policy(
    """
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
)


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
