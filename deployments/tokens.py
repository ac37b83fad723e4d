"""Prompt-token estimates for reservations (limits and budgets) before a call.

tiktoken downloads its encodings at run time, which fails offline, and the
true count depends on each provider's tokenizer anyway. The estimate is
OpenAI's published rule of thumb, ~4 characters of English per token, plus
the chat format's fixed overhead (3 tokens per message, 3 to prime the
reply). Reservations are settled to the provider's reported usage after the
call, so the estimate only has to be close, not exact.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

CHARS_PER_TOKEN = 4.0
TOKENS_PER_MESSAGE = 3
TOKENS_PER_REPLY = 3


def estimate_text_tokens(text: str) -> int:
    if not text:
        return 0
    return max(1, math.ceil(len(text) / CHARS_PER_TOKEN))


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # multi-part content: count the text parts
        return " ".join(str(part.get("text", "")) for part in content if isinstance(part, Mapping))
    return ""


def estimate_prompt_tokens(messages: Iterable[Mapping[str, Any]]) -> int:
    total = TOKENS_PER_REPLY
    for message in messages:
        total += TOKENS_PER_MESSAGE
        total += estimate_text_tokens(_content_text(message.get("content")))
        if message.get("name"):
            total += 1
        if message.get("tool_calls"):
            total += estimate_text_tokens(str(message["tool_calls"]))
    return total


def estimate_input_tokens(value: str | list[str] | list[int] | list[list[int]]) -> int:
    """Embeddings input: strings, or already-tokenised ids."""
    if isinstance(value, str):
        return estimate_text_tokens(value)
    total = 0
    for item in value:
        if isinstance(item, str):
            total += estimate_text_tokens(item)
        elif isinstance(item, list):
            total += len(item)
        else:
            total += 1
    return total


def estimate_response_input_tokens(value: Any, instructions: Any = None) -> int:
    """A Responses API ``input`` (a string, or a list of items: messages, tool calls and
    their outputs) and its ``instructions``, in tokens. What a ``previous_response_id``
    brings along is unknown here: the call settles to the reported usage."""
    total = TOKENS_PER_REPLY + estimate_text_tokens(instructions or "")
    if isinstance(value, str):
        return total + TOKENS_PER_MESSAGE + estimate_text_tokens(value)
    for item in value if isinstance(value, list) else ():
        total += TOKENS_PER_MESSAGE
        if not isinstance(item, Mapping):
            total += estimate_text_tokens(str(item))
        elif "content" in item:
            total += estimate_text_tokens(_content_text(item["content"]))
        else:  # a tool call, its output, a reasoning item: count its JSON
            total += estimate_text_tokens(str(item))
    return total


def estimate_rerank_tokens(query: str, documents: list[Any]) -> int:
    """A rerank scores the query against each document: each pair is read whole."""
    query_tokens = estimate_text_tokens(query)
    texts = (d if isinstance(d, str) else str(d.get("text", "")) for d in documents)
    return sum(query_tokens + estimate_text_tokens(text) for text in texts)


def reported_total(usage: Any) -> int | None:
    """The ``total_tokens`` an upstream's usage reports (None: it reports none)."""
    total = usage.get("total_tokens") if isinstance(usage, Mapping) else None
    return total if isinstance(total, int) and not isinstance(total, bool) else None
