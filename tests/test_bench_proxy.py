"""The proxy benchmark's two chat requests: ``bench/chat.json``'s prompt is one the shipped
gates decide from the static table, ``bench/chat_encoded.json``'s one they read through the
encoder, so ``python -m bench --body`` measures both paths (bench/README.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.proxy import VARIED_PROMPTS, chat_body, varied_bodies
from router.artifact import default_model_path, router_capability
from router.capability import GatedCapability, SplitCapability

REPO = Path(__file__).resolve().parent.parent


def _prompt(path: Path) -> str:
    return str(json.loads(path.read_text())["messages"][-1]["content"])


def test_the_two_bench_prompts_take_the_gate_s_two_paths() -> None:
    # The shipped router reads a split of two gates: the table decides a prompt only where both
    # gates' static heads are sure of it.
    split = router_capability(default_model_path())
    assert isinstance(split, SplitCapability)
    gates = (split.score, split.label)
    assert all(isinstance(g, GatedCapability) for g in gates)
    assert not split.reads_second(_prompt(REPO / "bench" / "chat.json"))
    assert split.reads_second(_prompt(REPO / "bench" / "chat_encoded.json"))
    for gate in gates:
        assert isinstance(gate, GatedCapability)
        sure = gate.first.probabilities(_prompt(REPO / "bench" / "chat.json")).max()
        unsure = gate.first.probabilities(_prompt(REPO / "bench" / "chat_encoded.json")).max()
        assert sure >= gate.threshold > unsure


def test_the_chat_body_is_bench_body_when_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BENCH_BODY", raising=False)
    assert chat_body() == REPO / "bench" / "chat.json"
    monkeypatch.setenv("BENCH_BODY", str(REPO / "bench" / "chat_encoded.json"))
    assert chat_body() == REPO / "bench" / "chat_encoded.json"


def test_the_varied_bodies_are_the_chat_body_with_each_prompt(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("BENCH_BODY", raising=False)
    template = json.loads((REPO / "bench" / "chat.json").read_text())
    prompts = [json.loads(line)["prompt"] for line in VARIED_PROMPTS.read_text().splitlines()]
    bodies = [json.loads(b) for b in varied_bodies()]
    assert len(bodies) == len(prompts) == len(set(prompts)) >= 100
    for body, prompt in zip(bodies, prompts, strict=True):
        assert body["messages"][-1] == {"role": "user", "content": prompt}
        assert {**body, "messages": body["messages"][:-1]} == {
            **template,
            "messages": template["messages"][:-1],
        }
