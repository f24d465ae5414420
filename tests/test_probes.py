"""The probe set of ``tiergate profile``: seeded probes and their graders."""

from __future__ import annotations

from collections import Counter

import pytest

from router.probes import (
    extract_code,
    grade_choice,
    grade_code,
    grade_constraints,
    grade_first_of,
    grade_json_fields,
    grade_number,
    probe_set,
)
from router.scoring import CAPABILITIES


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_reference_answer_passes_and_a_non_answer_fails(seed: int) -> None:
    # 8 per capability covers every kind of task each generator rotates through.
    for probe in probe_set(8, seed=seed):
        assert probe.grade(probe.reference), (probe.id, probe.reference)
        assert not probe.grade("I don't know."), probe.id
        assert not probe.grade(""), probe.id


def test_probe_set_is_seeded_and_covers_every_capability() -> None:
    first = probe_set(5, seed=7)
    assert first == probe_set(5, seed=7)
    assert [p.prompt for p in first] != [p.prompt for p in probe_set(5, seed=8)]
    assert Counter(p.capability for p in first) == dict.fromkeys(CAPABILITIES, 5)
    assert len({p.id for p in first}) == len(first)
    # a larger set starts with the smaller one, so profiles of different sizes are comparable
    assert probe_set(9, seed=7)[:5] == first[:5]
    only = probe_set(2, capabilities=["math", "chat"])
    assert [p.id for p in only] == ["math-000", "math-001", "chat-000", "chat-001"]
    for probe in first:
        roles = [m["role"] for m in probe.messages()]
        assert roles == ["system", "user"]  # small models need the system message
    with pytest.raises(ValueError):
        probe_set(0)


@pytest.mark.parametrize(
    ("answer", "right"),
    [
        ("42", True),
        ("The answer is 42.", True),
        ("17 + 25 = 42\n\nThis holds because 17 and 25 add up.", True),
        ("So 17 + 25 = 40 + 2, and the answer is 42", True),
        ("1,042", False),
        ("43", False),
        ("To solve this we add 17 and 25", False),
        ("", False),
    ],
)
def test_number_grader(answer: str, right: bool) -> None:
    assert grade_number(answer, value=42) is right


OPTIONS = ["Berlin", "Paris", "Rome", "Madrid"]  # Paris is B


@pytest.mark.parametrize(
    ("answer", "right"),
    [
        ("B", True),
        ("(B)", True),
        ("B) Paris", True),
        ("The answer is B.", True),
        ("Paris", True),
        ("A) Paris is the capital of France.", False),  # letter and text disagree
        ("A", False),
        ("A) Berlin", False),
        ("Paris or Rome, I am not sure.", False),
        ("I think it is a city in Europe.", False),
    ],
)
def test_choice_grader(answer: str, right: bool) -> None:
    assert grade_choice(answer, letter="B", options=OPTIONS) is right


@pytest.mark.parametrize(
    ("answer", "right"),
    [
        ("Ana", True),
        ("Ana is the shortest.", True),
        ("ana", True),
        ("Jonas is the shortest.", False),
        ("Jonas is taller than Ana, so Ana.", False),  # the first name mentioned counts
        ("Anastasia", False),  # whole words only
    ],
)
def test_first_of_grader(answer: str, right: bool) -> None:
    assert grade_first_of(answer, expected=["Ana"], candidates=["Mei", "Jonas", "Ana"]) is right


def test_first_of_grader_ignores_the_question_echoed() -> None:
    def grade(answer: str) -> bool:
        return grade_first_of(
            answer, expected=["true"], candidates=["true", "false"], ignore=["true or false"]
        )

    assert grade("True.")
    assert not grade("To decide whether P and Q are true or false, we")
    assert not grade("Whether it is true or false: false.")


SCHEMA = {"name": "string", "age": "integer", "city": "string"}
VALUES: dict[str, str | float] = {"name": "Ana Rossi", "age": 45, "city": "Lisbon"}


@pytest.mark.parametrize(
    ("answer", "right"),
    [
        ('{"name": "Ana Rossi", "age": 45, "city": "Lisbon"}', True),
        ('```json\n{"name": "ana rossi", "age": 45.0, "city": "Lisbon"}\n```', True),
        ('Here it is: {"name": "Ana Rossi", "age": 45, "city": "Lisbon", "job": "chef"}', True),
        ('{"name": "Ana Rossi", "age": "45", "city": "Lisbon"}', False),  # wrong type
        ('{"name": "Ana Rossi", "age": 45}', False),  # missing key
        ('{"name": "Ana Rossi", "age": 45, "city": "Cairo"}', False),  # wrong value
        ('{"name": "Ana Rossi", "age": 45, "city": "Lisbon",}', False),  # not JSON
        ('["Ana Rossi", 45, "Lisbon"]', False),
    ],
)
def test_json_grader_checks_schema_and_values(answer: str, right: bool) -> None:
    assert grade_json_fields(answer, schema=SCHEMA, values=VALUES) is right


TESTS = "assert add_2([1, 2]) == [3, 4]\nassert add_2([]) == []\n"


@pytest.mark.parametrize(
    ("answer", "right"),
    [
        ("```python\ndef add_2(xs):\n    return [x + 2 for x in xs]\n```\nThis adds two.", True),
        ("def add_2(xs):\n    return [x + 2 for x in xs]", True),
        (
            "```python\ndef add_2(numbers: list[int]) -> list[int]:\n"
            "    return [n + 2 for n in numbers]\n```",
            True,
        ),
        ("```python\ndef add_2(xs):\n    return [x + 2 for x in xs]\n", True),  # cut off
        ("```python\ndef add_2(xs):\n    return xs\n```", False),
        ("```python\ndef add_two(xs):\n    return [x + 2 for x in xs]\n```", False),
        ("```python\ndef add_2(xs):\n    return [x + 2 for x in xs\n```", False),  # syntax
        ("Use a list comprehension.", False),
    ],
)
def test_code_grader_runs_the_tests(answer: str, right: bool) -> None:
    assert grade_code(answer, function="add_2(xs)", tests=TESTS) is right


@pytest.mark.parametrize(
    "body",
    [
        "    while True:\n        pass\n",  # loops forever
        "    hoard = [0] * (1 << 30)\n    return [x + 2 for x in xs]\n",  # 8 GiB
    ],
)
def test_code_grader_fails_answers_the_sandbox_stops(body: str) -> None:
    answer = f"```python\ndef add_2(xs):\n{body}```"
    assert not grade_code(answer, function="add_2(xs)", tests=TESTS, timeout_s=1.0)


def test_code_is_taken_from_the_block_that_defines_the_function() -> None:
    answer = "```bash\npip install x\n```\n```python\ndef f(x):\n    return x\n```"
    assert extract_code(answer, "f(x)") == "def f(x):\n    return x\n"


@pytest.mark.parametrize(
    ("rules", "answer", "right"),
    [
        ([["mentions", "Elmbrook"], ["mentions", "45000"]], "Elmbrook got 45,000 books.", True),
        ([["mentions", "Elmbrook"]], "Elmbrookers cheered.", False),
        ([["max_words", 5]], "one two three four five", True),
        ([["max_words", 5]], "one two three four five six", False),
        ([["min_words", 3]], "too short", False),
        ([["lines", 3]], "a\n\nb\nc\n", True),
        ([["lines", 3]], "a\nb", False),
        ([["starts_with", "Once"]], "**Once** upon a time", True),
        ([["starts_with", "Once"]], "It was once", False),
        ([["exactly", "purple"]], "Purple.", True),
        ([["exactly", "purple"]], "Purple it is.", False),
        ([["any_of", ["hello", "hi"]]], "Hi there, Sam!", True),
        ([["any_of", ["hello", "hi"]]], "This is Sam.", False),
        ([["none_of", ["as an ai"]]], "As an AI, I cannot sail.", False),
        ([["none_of", ["as an ai"]]], "Aye, I sail.", True),
    ],
)
def test_constraint_grader(rules: list[list[object]], answer: str, right: bool) -> None:
    assert grade_constraints(answer, rules=rules) is right
