"""The persona rule on the capability label (router.persona), alone and as the proxy serves it."""

from __future__ import annotations

import numpy as np
import pytest

from router.artifact import default_model_path, load_scorer, router_capability
from router.persona import MIN_WORDS, RELABELLED, is_persona, persona_label
from router.scoring import CAPABILITIES

PERSONAS = (
    "Pretend you are a lighthouse keeper on a remote island and tell me about last night's storm.",
    "Act as a travel agent who only books trips to the Moon, and sell me a weekend there.",
    "Take on the role of a grumpy librarian and answer my questions about overdue books.",
    "You are Captain Ahab, and I am a new sailor asking you about the white whale.",
    "Hello! Please imagine yourself as a retired jazz drummer describing your very first gig.",
    "Now you are a museum guide; walk me through the dinosaur hall and its oldest skeleton.",
    "I want you to act as my grandmother telling me how she met my grandfather in 1962.",
    "Roleplay as Ada Lovelace and explain your notes on the Analytical Engine to a journalist.",
)
NOT_PERSONAS = (
    # The cue must cast the model as a role, at the start, and the prompt must go on.
    "Imagine you are writing a blog post comparing two phones; what should the outline cover?",
    "You are given an array of integers; return the largest sum of any contiguous subarray.",
    "You are the best!",
    "Write a story in which the hero says 'you are a fool' to the king of the northern hills.",
    "What would a medieval knight eat for breakfast on the morning before a long battle?",
    # The model cast as what it is: a system-style preamble, not a persona.
    "You are a helpful assistant. What is the boiling point of water at sea level in Celsius?",
    "You are an AI language model trained to answer questions about European history in detail.",
)


@pytest.mark.parametrize("text", PERSONAS)
def test_a_prompt_that_casts_the_model_as_a_role_is_a_persona_request(text: str) -> None:
    assert is_persona(text)


@pytest.mark.parametrize("text", NOT_PERSONAS)
def test_other_prompts_are_not_persona_requests(text: str) -> None:
    assert not is_persona(text)


def test_the_cue_must_be_followed_by_a_request() -> None:
    short = "You are Captain Ahab, sailor."
    assert len(short.split()) < MIN_WORDS and not is_persona(short)
    assert is_persona(short + " Tell me about the whale you hunt.")


def test_only_knowledge_and_writing_labels_become_roleplay() -> None:
    text = PERSONAS[0]
    for capability in CAPABILITIES:
        want = "roleplay" if capability in RELABELLED else capability
        assert persona_label(capability, text) == want
    assert {"knowledge_qa", "creative_writing"} == RELABELLED
    assert persona_label("knowledge_qa", NOT_PERSONAS[4]) == "knowledge_qa"


def test_the_served_label_applies_the_rule_over_the_shipped_model() -> None:
    """The proxy, ``tiergate classify`` and ``score`` read the label through the scorer: a
    persona request the shipped capability model reads as creative writing is role-play there,
    while the model's own label, and every prompt without a persona, is left as it was."""
    path = default_model_path()
    capability, scorer = router_capability(path), load_scorer(path)

    def model_label(text: str) -> str:
        read = getattr(capability, "read", None)
        p = read(text)[1] if read is not None else capability.probabilities(text)
        return str(CAPABILITIES[int(np.argmax(p))])

    persona = (
        "Act as a famous poet from the Romantic era and write a short verse about autumn rain."
    )
    assert model_label(persona) == "creative_writing"
    served = scorer.analyze(persona)
    assert served.capability == "roleplay"
    assert (
        served.capability_reason == "persona request (the capability model read creative_writing)"
    )
    # The score is the model's: the rule names the capability, it does not move the score.
    assert scorer.analyze(persona).score == scorer.score(persona)
    for text in NOT_PERSONAS:
        analysis = scorer.analyze(text)
        assert (analysis.capability, analysis.capability_reason) == (model_label(text), None)
