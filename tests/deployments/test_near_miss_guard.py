from __future__ import annotations

import pytest

from deployments.near_miss_guard import GuardSettings, NearMissGuard

guard = NearMissGuard()

# Hand-made near-misses: same template, different question.
REJECTED = [
    ("convert 100 F to C", "convert 100 C to F", "swapped_span"),
    ("flights from Paris to London", "flights from London to Paris", "swapped_span"),
    ("What is 15% of 80?", "What is 15% of 60?", "numbers"),
    ("Is Python 3.12 faster than 3.11?", "Is Python 3.12 faster than 3.10?", "numbers"),
    ("How do I enable 2FA on GitHub?", "How do I disable 2FA on GitHub?", "opposites"),
    ("Why am I gaining weight?", "Why am I not gaining weight?", "negation"),
    ("Can I travel with a visa?", "Can I travel without a visa?", "negation"),
    ("Why can't I sleep at night?", "Why can I sleep at night?", "negation"),
    (
        "How long to boil an egg for a soft yolk?",
        "How long to boil an egg for a hard yolk?",
        "opposites",
    ),
    (
        "Sort a dict by value in ascending order",
        "Sort a dict by value in descending order",
        "opposites",
    ),
    (
        "What is the weather like in Ohio in summer?",
        "What is the weather like in Texas in summer?",
        "substitution",
    ),
    (
        "What are the advantages of remote work?",
        "What are the disadvantages of remote work?",
        "opposites",
    ),
    (
        "What are the advantages and disadvantages of remote work?",
        "What are the advantages of remote work?",
        "one_sided",
    ),
    ("Should I buy or sell gold now?", "Should I sell gold now?", "one_sided"),
    ("Where did Einstein work?", "When did Einstein work?", "answer_type"),
    ("Are there two ways to sort a list?", "Are there three ways to sort a list?", "numbers"),
    ("I found a thousand dollars, what now?", "I found a hundred dollars, what now?", "numbers"),
    ("Top five films of 2020?", "Top 6 films of 2020?", "numbers"),
    ("What are the 5 best films?", "What are the best films?", "numbers"),  # digits: strict
    ("Why does a man snore at night?", "Why does a woman snore at night?", "opposites"),
    ("Why do cats purr?", "Who do cats purr for?", "answer_type"),
]

# Rewordings that must still be served.
ACCEPTED = [
    ("How do I convert Fahrenheit to Celsius?", "How can I convert Fahrenheit to Celsius?"),
    ("What's the best way to learn Python?", "What is the best way to learn Python?"),
    ("How do I learn cooking?", "How can I learn to cook?"),
    ("Why do we forget dreams so quickly?", "Why do we forget our dreams so quickly?"),
    ("What are good books about investing?", "What are some good books on investing?"),
    ("Why won't my car start?", "Why will my car not start?"),
    ("What is 2 + 2?", "What's 2 + 2?"),
    ("What are the pros and cons of Rust?", "What are the advantages and disadvantages of Rust?"),
    (
        "Where and how can I find a cheap hotel in Bhopal?",
        "Where can I find a cheap hotel in Bhopal?",
    ),
    ("When was the Eiffel Tower built?", "When did they build the Eiffel Tower?"),
    ("How do I design a sign for my shop?", "How can I design a sign for my shop?"),
    ("How do I split a list into two halves?", "How do I split a list into 2 halves?"),
    ("What are the five best films of 2020?", "What are the best films of 2020?"),
    ("Which one is better, Go or Rust?", "Which is better, Go or Rust?"),
]


@pytest.mark.parametrize(("query", "cached", "reason"), REJECTED)
def test_near_misses_are_rejected_with_their_reason(query: str, cached: str, reason: str) -> None:
    verdict = guard.verify(query, cached)
    assert (verdict.ok, verdict.reason) == (False, reason)
    assert not guard.verify(cached, query).ok  # symmetric


@pytest.mark.parametrize(("query", "cached"), ACCEPTED)
def test_rewordings_pass(query: str, cached: str) -> None:
    assert guard.verify(query, cached).ok
    assert guard.verify(cached, query).ok


def test_identical_text_always_passes() -> None:
    assert guard.verify("not 1 but 2", "not 1 but 2").ok


def test_each_rule_can_be_switched_off() -> None:
    query, cached = "convert 100 F to C", "convert 100 C to F"
    assert NearMissGuard(GuardSettings(swapped_span=False)).verify(query, cached).ok
    assert NearMissGuard(GuardSettings(enabled=False)).verify("2 apples", "3 apples").ok
    lenient = NearMissGuard(GuardSettings(numbers=False))
    assert lenient.verify("What is 15% of 80?", "What is 15% of 60?").ok


def test_question_word_rule_is_opt_in() -> None:
    pair = ("Where is Robert Frost buried?", "Who is Robert Frost buried with?")
    assert NearMissGuard(GuardSettings(question_word=True)).verify(*pair).reason in {
        "question_word",
        "substitution",
    }


def test_entity_rule_is_opt_in() -> None:
    pair = ("Is English honours from DU an easy course?", "Is English honours an easy course?")
    assert guard.verify(*pair).ok
    assert NearMissGuard(GuardSettings(entity=True)).verify(*pair).reason == "entity"
    assert NearMissGuard(GuardSettings(entity=True)).verify(*reversed(pair)).reason == "entity"


def test_one_sided_needs_the_poles_joined() -> None:
    # "design" reads as de- + "sign", but nothing here asks about two poles.
    assert guard.verify("How do I design a sign?", "How do I make a sign?").ok
    assert (
        NearMissGuard(GuardSettings(one_sided=False))
        .verify("Pros and cons of Go?", "Pros of Go?")
        .ok
    )
    assert guard.verify("Pros and cons of Go?", "Pros of Go?").reason == "one_sided"


def test_answer_type_leaves_what_how_which_alone() -> None:
    assert guard.verify("What is the way to learn Go?", "How do I learn Go?").ok
    assert guard.verify("Which book teaches Go best?", "What book teaches Go best?").ok
    assert not NearMissGuard().verify("Where is Robert Frost buried?", "Who is Robert Frost?").ok
    lenient = NearMissGuard(GuardSettings(answer_type=False))
    assert lenient.verify("Where did Einstein work?", "When did Einstein work?").ok
