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

import orjson

CHARS_PER_TOKEN = 4.0
TOKENS_PER_MESSAGE = 3
TOKENS_PER_REPLY = 3
# An image part whose size is not known before the call: OpenAI's count for a 1024 x 1024
# image at high (or auto) detail, and at low detail.
IMAGE_TOKENS, LOW_DETAIL_IMAGE_TOKENS = 765, 85
# What a chat request sends besides its messages that providers bill as prompt tokens:
# tool and function definitions, a response format's JSON schema.
CHAT_DEFINITIONS = ("tools", "functions", "response_format")
# ... and a Responses API request (``text.format`` holds its schema).
RESPONSE_DEFINITIONS = ("tools", "text")
# Content parts counted by their text. Any other part but an image (a file's data, audio)
# counts a token for every 64 characters of its JSON, base64 and all: a 500 kB PDF some
# 10k tokens (a provider bills a few hundred to a few thousand a page), a minute of
# 16 kHz audio ~40k (billed ~600): generous, never the ~6 its text alone would give.
TEXT_PARTS = frozenset({"text", "input_text", "output_text", "refusal"})
ATTACHMENT_CHARS_PER_TOKEN = 64


def estimate_text_tokens(text: str) -> int:
    if not text:
        return 0
    return max(1, math.ceil(len(text) / CHARS_PER_TOKEN))


def _content_tokens(content: Any) -> int:
    if isinstance(content, str):
        return estimate_text_tokens(content)
    if not isinstance(content, list):
        return 0
    texts, images, attachments = [], 0, 0  # multi-part content: text, images, the rest
    for part in content:
        if not isinstance(part, Mapping):
            continue
        kind = part.get("type")
        if kind in ("image_url", "input_image"):
            images += LOW_DETAIL_IMAGE_TOKENS if _detail(part) == "low" else IMAGE_TOKENS
        elif kind in TEXT_PARTS or (kind is None and "text" in part):
            texts.append(str(part.get("text", "")))
        else:  # a file, audio, anything else: its size is all that is known of it
            attachments += len(orjson.dumps(part)) // ATTACHMENT_CHARS_PER_TOKEN
    return images + attachments + estimate_text_tokens(" ".join(texts))


def _detail(part: Mapping[str, Any]) -> Any:
    """An image part's detail: chat's ``image_url.detail``, the Responses API's ``detail``."""
    image = part.get("image_url")
    return image.get("detail") if isinstance(image, Mapping) else part.get("detail")


def estimate_definition_tokens(body: Mapping[str, Any], fields: Iterable[str]) -> int:
    """The request's ``fields`` (tool definitions, schemas) as the JSON they are sent as."""
    return sum(estimate_text_tokens(orjson.dumps(body[f]).decode()) for f in fields if body.get(f))


def estimate_chat_tokens(body: Mapping[str, Any]) -> int:
    """A chat request's prompt: its messages and what it defines besides them."""
    return estimate_prompt_tokens(body["messages"]) + estimate_definition_tokens(
        body, CHAT_DEFINITIONS
    )


def estimate_prompt_tokens(messages: Iterable[Mapping[str, Any]]) -> int:
    total = TOKENS_PER_REPLY
    for message in messages:
        total += TOKENS_PER_MESSAGE
        total += _content_tokens(message.get("content"))
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
    brings along is added once its owner is found (``serve_app/responses.py``)."""
    total = TOKENS_PER_REPLY + estimate_text_tokens(instructions or "")
    if isinstance(value, str):
        return total + TOKENS_PER_MESSAGE + estimate_text_tokens(value)
    for item in value if isinstance(value, list) else ():
        total += TOKENS_PER_MESSAGE
        if not isinstance(item, Mapping):
            total += estimate_text_tokens(str(item))
        elif "content" in item:
            total += _content_tokens(item["content"])
        else:  # a tool call, its output, a reasoning item: count its JSON
            total += estimate_text_tokens(str(item))
    return total


def estimate_rerank_tokens(query: str, documents: list[Any]) -> int:
    """A rerank scores the query against each document: each pair is read whole."""
    query_tokens = estimate_text_tokens(query)
    texts = (d if isinstance(d, str) else str(d.get("text", "")) for d in documents)
    return sum(query_tokens + estimate_text_tokens(text) for text in texts)


def _count(value: Any) -> int | None:
    """A token count as a provider reports it: a whole number, not negative."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def reported_counts(usage: Any) -> tuple[int, int, str] | None:
    """The prompt and completion tokens an upstream's usage reports, and the names it
    reports them under (``prompt`` for chat's and text completions', ``input`` for the
    Responses API's); a rerank's ``total_tokens`` alone is all prompt. None: the usage
    reports no count (absent, empty, or not numbers), and the call is estimated."""
    if not isinstance(usage, Mapping):
        return None
    for prompt, completion in (("prompt", "completion"), ("input", "output")):
        if (prompt_tokens := _count(usage.get(f"{prompt}_tokens"))) is not None:
            return prompt_tokens, _count(usage.get(f"{completion}_tokens")) or 0, prompt
    if (total := _count(usage.get("total_tokens"))) is None:
        return None
    completion_tokens = min(total, _count(usage.get("completion_tokens")) or 0)
    return total - completion_tokens, completion_tokens, "prompt"


def reported_total(usage: Any) -> int | None:
    """The tokens an upstream's usage reports in all: its ``total_tokens``, else its
    prompt and completion counts added up (None: it reports none)."""
    if isinstance(usage, Mapping) and (total := _count(usage.get("total_tokens"))) is not None:
        return total
    counts = reported_counts(usage)
    return None if counts is None else counts[0] + counts[1]


def reported_detail(usage: Mapping[str, Any], field: str, detail: str) -> int:
    """A count inside a usage's ``<field>_details`` (cached or reasoning tokens); 0 if none."""
    details = usage.get(f"{field}_details")
    return (_count(details.get(detail)) or 0) if isinstance(details, Mapping) else 0


def estimate_response_tokens(body: Mapping[str, Any]) -> int:
    """A Responses API request's prompt: its input, instructions and definitions."""
    return estimate_response_input_tokens(
        body.get("input"), body.get("instructions")
    ) + estimate_definition_tokens(body, RESPONSE_DEFINITIONS)


def answer_text(answer: Any) -> str:
    """What an answer wrote (chat messages, refusals and tool-call arguments, completion
    texts, a response's output text and function-call arguments): the base of its
    completion-token estimate when the provider reports no usage."""
    if not isinstance(answer, Mapping):
        return ""
    parts: list[str] = []
    for choice in _mappings(answer.get("choices")):
        if isinstance(choice.get("text"), str):  # /v1/completions
            parts.append(choice["text"])
        message = choice.get("message")
        if isinstance(message, Mapping):
            parts += _written(message)
    for item in _mappings(answer.get("output")):  # /v1/responses
        parts += _written(item)
        parts += [str(c.get("text", "")) for c in _mappings(item.get("content"))]
    return "".join(parts)


def _mappings(value: Any) -> list[Mapping[str, Any]]:
    """The objects of a list an upstream sent (anything else in it, or instead of it,
    says nothing that was written)."""
    return [v for v in value if isinstance(v, Mapping)] if isinstance(value, list) else []


def _written(message: Mapping[str, Any]) -> list[str]:
    parts = [v for k in ("content", "refusal", "arguments") if isinstance(v := message.get(k), str)]
    for call in _mappings(message.get("tool_calls")):
        function = call.get("function")
        if isinstance(function, Mapping) and isinstance(function.get("arguments"), str):
            parts.append(function["arguments"])
    return parts
