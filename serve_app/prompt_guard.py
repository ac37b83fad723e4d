"""Allow and deny patterns on what a request asks, checked at the ingress before
anything else is spent on it (no quota, no cache, no upstream call), as Kong's
AI Prompt Guard does.

A checked text matching a ``deny`` pattern is refused; with ``allow`` patterns,
a checked text must match one of them. Which texts are checked: the last user
message (``last_user``, the default: earlier turns were checked when they were
sent), every user message (``user``), or every message of any role (``all``);
for ``/v1/completions`` every prompt string (token ids are not text); for
``/v1/responses`` its input's messages the same way (an input string is a user
message; ``all`` adds the ``instructions``); for ``/v1/rerank`` its query (the
documents are data, as embeddings' input; moderations are what checks content). The
refusal is a 400 ``prompt_blocked`` that does not say which pattern matched.

Rules are global (``default``) or a tenant's own, which replace the default
(``null``: no rules for that tenant). Patterns are Python regular expressions,
searched anywhere in the text; write ``(?i)`` for case-insensitive ones.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, field_validator

from serve_app.errors import InvalidRequestError
from serve_app.metrics import MetricSink
from serve_app.per_tenant import PerTenant


class GuardRules(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    allow: tuple[re.Pattern[str], ...] = ()
    deny: tuple[re.Pattern[str], ...] = ()
    check: Literal["last_user", "user", "all"] = "last_user"

    @field_validator("allow", "deny", mode="before")
    @classmethod
    def _compile(cls, patterns: Any) -> tuple[re.Pattern[str], ...]:
        if not isinstance(patterns, list | tuple):
            raise ValueError("expected a list of regular expressions")
        compiled = []
        for pattern in patterns:
            if isinstance(pattern, re.Pattern):
                compiled.append(pattern)
                continue
            try:
                compiled.append(re.compile(str(pattern)))
            except re.error as exc:
                raise ValueError(f"{pattern!r} is not a regular expression: {exc}") from None
        return tuple(compiled)


PromptGuardSettings = PerTenant[GuardRules]


class PromptBlockedError(InvalidRequestError):
    code = "prompt_blocked"


def _text(content: Any) -> Iterator[str]:
    if isinstance(content, str):
        yield content
    elif isinstance(content, list):  # content parts: their text
        for part in content:
            if isinstance(part, Mapping) and isinstance(part.get("text"), str):
                yield part["text"]


def _chat_texts(messages: list[Any], check: str) -> Iterator[str]:
    if check == "last_user":
        for message in reversed(messages):
            if isinstance(message, Mapping) and message.get("role") == "user":
                yield from _text(message.get("content"))
                return
        return
    for message in messages:
        if isinstance(message, Mapping) and (check == "all" or message.get("role") == "user"):
            yield from _text(message.get("content"))


def _response_texts(body: Mapping[str, Any], check: str) -> Iterator[str]:
    """A response's input: a string is the user's message; a list holds messages
    (``role`` and ``content``) and items of other kinds (tool outputs), which are not
    checked. ``all`` checks the ``instructions`` too."""
    value = body.get("input")
    if check == "all" and isinstance(body.get("instructions"), str):
        yield body["instructions"]
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        yield from _chat_texts([i for i in value if "role" in i], check)


def checked_texts(route: str, body: Mapping[str, Any], check: str) -> Iterator[str]:
    """The texts of a (validated) request that ``check`` looks at."""
    if route == "chat":
        yield from _chat_texts(body["messages"], check)
    elif route == "responses":
        yield from _response_texts(body, check)
    elif route == "rerank":  # the question; the documents are data, as embeddings' input
        yield body["query"]
    elif route == "completions":
        prompt = body["prompt"]
        prompts = [prompt] if isinstance(prompt, str) else prompt
        yield from (p for p in prompts if isinstance(p, str))


_PARAMS = {"chat": "messages", "responses": "input", "rerank": "query"}


class PromptGuard:
    def __init__(self, settings: PromptGuardSettings, metrics: MetricSink) -> None:
        self.settings = settings
        self.enabled = settings.enabled
        self._metrics = metrics

    def check(self, route: str, body: Mapping[str, Any], tenant: str) -> None:
        """Raise ``PromptBlockedError`` when the tenant's rules refuse the request."""
        rules = self.settings.for_tenant(tenant)
        if rules is None or route == "embeddings":
            return
        for text in checked_texts(route, body, rules.check):
            if any(p.search(text) for p in rules.deny):
                self._refuse("deny", route)
            if rules.allow and not any(p.search(text) for p in rules.allow):
                self._refuse("allow", route)

    def _refuse(self, rule: str, route: str) -> None:
        self._metrics.inc("gateway_prompt_guard_blocked_total", 1, {"rule": rule})
        raise PromptBlockedError(
            "The request was refused by the gateway's prompt guard.",
            param=_PARAMS.get(route, "prompt"),
        )
