"""Token estimates for reservations, before the upstream reports its usage."""

from __future__ import annotations

from deployments.tokens import (
    TOKENS_PER_MESSAGE,
    TOKENS_PER_REPLY,
    estimate_prompt_tokens,
    estimate_response_input_tokens,
    estimate_text_tokens,
    reported_total,
)


def test_a_response_input_string_counts_as_one_user_message() -> None:
    text = "What is the capital of France? " * 3
    as_chat = estimate_prompt_tokens([{"role": "user", "content": text}])
    assert estimate_response_input_tokens(text) == as_chat
    with_instructions = estimate_response_input_tokens(text, "Answer in French.")
    assert with_instructions == as_chat + estimate_text_tokens("Answer in French.")


def test_response_input_items_count_their_text_and_other_items_their_json() -> None:
    items = [
        {"role": "user", "content": [{"type": "input_text", "text": "a" * 40}]},
        {"type": "function_call_output", "call_id": "c1", "output": "x" * 80},
    ]
    tool_output = estimate_text_tokens(str(items[1]))
    expected = TOKENS_PER_REPLY + 2 * TOKENS_PER_MESSAGE + 10 + tool_output
    assert estimate_response_input_tokens(items) == expected
    assert estimate_response_input_tokens(None) == TOKENS_PER_REPLY


def test_reported_total_is_an_integer_or_none() -> None:
    assert reported_total({"total_tokens": 12}) == 12
    assert reported_total({"total_tokens": True}) is None
    assert reported_total(None) is None
