"""Token estimates for reservations, before the upstream reports its usage."""

from __future__ import annotations

from deployments.tokens import (
    TOKENS_PER_MESSAGE,
    TOKENS_PER_REPLY,
    estimate_prompt_tokens,
    estimate_response_input_tokens,
    estimate_text_tokens,
    reported_counts,
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
    # No total: the counts it has, added up (the limiter settles to what was used).
    assert reported_total({"prompt_tokens": 3, "completion_tokens": 10_000}) == 10_003
    assert reported_total({"input_tokens": 4, "output_tokens": 6}) == 10
    for none in ({}, {"foo": 1}, {"total_tokens": "5"}, {"prompt_tokens": -1}, []):
        assert reported_total(none) is None


def test_reported_counts_name_where_they_were_found() -> None:
    assert reported_counts({"prompt_tokens": 3, "completion_tokens": 4}) == (3, 4, "prompt")
    assert reported_counts({"input_tokens": 3.0, "output_tokens": None}) == (3, 0, "input")
    assert reported_counts({"total_tokens": 9, "completion_tokens": 20}) == (0, 9, "prompt")
    assert reported_counts({"total_tokens": 9}) == (9, 0, "prompt")  # a rerank's
    assert reported_counts({"prompt_tokens": 1.5}) is None


def test_files_and_audio_count_a_token_for_every_64_characters_of_their_json() -> None:
    data = "QUJD" * 25_000  # 100 kB of base64
    parts = [
        {"type": "file", "file": {"filename": "a.pdf", "file_data": data}},
        {"type": "input_audio", "input_audio": {"data": data, "format": "wav"}},
    ]
    for part in parts:
        counted = estimate_prompt_tokens([{"role": "user", "content": [part]}])
        assert len(data) / 64 <= counted <= len(data) / 60
    responses = [{"role": "user", "content": [{"type": "input_file", "file_data": data}]}]
    assert len(data) / 64 <= estimate_response_input_tokens(responses) <= len(data) / 60
    # Text parts count their text alone.
    text = [{"role": "user", "content": [{"type": "text", "text": "a" * 40}]}]
    assert estimate_prompt_tokens(text) == TOKENS_PER_REPLY + TOKENS_PER_MESSAGE + 10


def test_answer_text_ignores_what_is_not_where_text_is_written() -> None:
    from deployments.tokens import answer_text

    odd = [
        {"choices": 5},
        {"choices": True},
        {"choices": [{"message": {"tool_calls": 1}}]},
        {"choices": [{"message": {"tool_calls": [1, {"function": 2}]}}]},
        {"output": 1},
        {"output": [{"content": 7}]},
        {"output": [{"content": ["a", None]}]},
    ]
    for answer in odd:
        assert answer_text(answer) == ""


def test_definitions_and_images_count_toward_the_prompt() -> None:
    """Providers bill tool definitions, response schemas and images as prompt tokens:
    a hold that left them out let concurrent requests overshoot a budget (review: 40x)."""
    from deployments.tokens import (
        IMAGE_TOKENS,
        LOW_DETAIL_IMAGE_TOKENS,
        estimate_chat_tokens,
        estimate_response_tokens,
    )

    messages = [{"role": "user", "content": "weather?"}]
    plain = estimate_chat_tokens({"messages": messages})
    assert plain == estimate_prompt_tokens(messages)  # nothing else: as before
    tool = {"type": "function", "function": {"name": "f", "description": "d" * 4000}}
    for field, value in (
        ("tools", [tool]),
        ("functions", [tool["function"]]),
        ("response_format", {"type": "json_schema", "json_schema": {"d": "d" * 4000}}),
    ):
        assert estimate_chat_tokens({"messages": messages, field: value}) > plain + 1000, field
    picture = [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        {"type": "image_url", "image_url": {"url": "https://x/y.png", "detail": "low"}},
    ]
    with_images = estimate_prompt_tokens([{"role": "user", "content": picture}])
    text_only = estimate_prompt_tokens([{"role": "user", "content": picture[:1]}])
    assert with_images == text_only + IMAGE_TOKENS + LOW_DETAIL_IMAGE_TOKENS
    base = estimate_response_tokens({"input": "hi"})
    assert base == estimate_response_input_tokens("hi")
    schema = {"format": {"type": "json_schema", "schema": {"d": "d" * 4000}}}
    assert estimate_response_tokens({"input": "hi", "text": schema}) > base + 1000
    assert estimate_response_tokens({"input": "hi", "tools": [tool]}) > base + 1000
    image = [{"role": "user", "content": [{"type": "input_image", "image_url": "data:,"}]}]
    assert estimate_response_tokens({"input": image}) == base - 1 + IMAGE_TOKENS  # "hi": 1


def test_answer_text_is_what_an_answer_wrote() -> None:
    from deployments.tokens import answer_text

    chat = {
        "choices": [
            {
                "message": {
                    "content": "a",
                    "refusal": "b",
                    "tool_calls": [{"function": {"name": "f", "arguments": '{"c": 1}'}}],
                }
            },
            {"message": {"content": None}},
        ]
    }
    assert answer_text(chat) == 'ab{"c": 1}'
    assert answer_text({"choices": [{"text": "x"}, {"text": "y"}]}) == "xy"  # completions
    response = {
        "output": [
            {"type": "reasoning", "summary": []},
            {"type": "message", "content": [{"type": "output_text", "text": "hi"}]},
            {"type": "function_call", "name": "f", "arguments": "{}"},
        ]
    }
    assert answer_text(response) == "hi{}"
    assert answer_text(None) == answer_text({"choices": "junk"}) == ""
