"""Persona requests: a documented rule that names role-play where the capability model reads
only the content.

A prompt that opens by casting the model as someone ("You are Marie Curie...", "Act as a
medieval town crier...", "Take on the role of a mountain guide...") asks for role-play: that is
how the labelled capability data defines the class (docs/model-card.md, *Persona requests*) and
how chat benchmarks file such prompts. The capability model reads what the persona talks about
and names it knowledge QA or creative writing ("Imagine you are a historian. Describe the
Rosetta Stone" reads as a knowledge question). :func:`persona_label` keeps the model's label
for concrete tasks (coding, maths, reasoning, extraction, summarization: a persona preamble
only frames them, "You are a senior engineer. Review this code") and for small talk, and
names role-play where the model said knowledge QA or creative writing.

The cue (:data:`PERSONA`) must open the prompt (after a greeting or "please"), cast the model
as a role (a/an/the/my + word, or a capitalised name), and the prompt must go on
(:data:`MIN_WORDS`); the model cast as an assistant, an AI or a chatbot is not a persona
(:data:`NOT_A_PERSONA`). Pure: nothing happens at import beyond compiling the regexes.
"""

from __future__ import annotations

import re

#: Who the model is cast as: an article or "my" and a word, or a capitalised name (case kept).
_ROLE = r"(?:(?:an?|the|my)\s+[\w-]+|(?-i:[A-Z][\w.'-]+))"
#: The opening cue: imagine/pretend/suppose you are..., you are..., act/roleplay/speak as...,
#: take on the role/persona/character of..., I want you to act..., pretend to be...
PERSONA = re.compile(
    r"^\W*(?:(?:now|please|ok|okay|hi|hello|hey)\b[\s,!.:]*){0,2}(?:"
    r"(?:imagine|pretend|suppose|picture)\s+(?:that\s+)?"
    r"(?:you\s+are|you're|yourself\s+(?:to\s+be|as))\s+" + _ROLE + r"|"
    r"(?:you\s+are|you're)\s+(?:now\s+)?" + _ROLE + r"|"
    r"i\s+want\s+you\s+to\s+(?:act|pretend|roleplay|role-play)\b|"
    r"(?:act|roleplay|role-play|role\s+play|pose|speak|talk|behave|respond\s+to\s+me)\s+"
    r"(?:as|like)\s+" + _ROLE + r"|"
    r"(?:take|assume|play|adopt|embrace|embody|step\s+into)\s+(?:on\s+)?(?:the\s+)?"
    r"(?:role|persona|character|part)\s+of\b|"
    r"pretend\s+to\s+be\b"
    r")",
    re.IGNORECASE,
)
#: The model cast as what it is (an assistant, an AI, a chatbot): a system-style preamble.
NOT_A_PERSONA = re.compile(r"\b(?:assistants?|ai|chatbot|bot|language\s+model|llm|gpt)\b", re.I)
#: A persona request goes on past the cast: "You are the best!" is not one.
MIN_WORDS = 8
#: Only the opening is read.
WINDOW = 300
#: The capabilities a persona turns into role-play: talk whose substance the persona is.
RELABELLED = frozenset({"knowledge_qa", "creative_writing"})


def is_persona(text: str) -> bool:
    """Whether ``text`` opens by casting the model as a role (module docstring)."""
    head = text[:WINDOW]
    m = PERSONA.match(head)
    if m is None or len(head.split()) < MIN_WORDS:
        return False
    cast = m.group(0) + " " + " ".join(head[m.end() :].split()[:4])
    return NOT_A_PERSONA.search(cast) is None


def persona_label(capability: str, text: str) -> str:
    """``capability``, or ``roleplay`` when it is one of :data:`RELABELLED` and ``text`` is a
    persona request."""
    if capability in RELABELLED and is_persona(text):
        return "roleplay"
    return capability


def served_label(capability: str, text: str) -> tuple[str, str | None]:
    """The label the scorers serve for the model's ``capability`` of ``text``, and why it is not
    the model's (None when it is): the ``capability_reason`` of records and explanations."""
    label = persona_label(capability, text)
    if label == capability:
        return label, None
    return label, f"persona request (the capability model read {capability})"
