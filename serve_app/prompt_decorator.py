"""Messages the gateway adds to every chat request (and to a Responses API request's
``input``), as Kong's AI Prompt Decorator does: a company's system prompt put
first, a reminder put last, for everyone or per tenant (a tenant's own replace the
default; ``null``: none for that tenant).

They are added after the prompt guard (which checks what the client wrote, not
what the operator adds) and before anything else, so the cache key, the token
estimate, quotas, budgets and the upstream all see the request as decorated.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from serve_app.per_tenant import PerTenant


class DecoratorMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    role: Literal["system", "developer", "user", "assistant"]
    content: str = Field(min_length=1)


class Decoration(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    prepend: tuple[DecoratorMessage, ...] = ()
    append: tuple[DecoratorMessage, ...] = ()


PromptDecoratorSettings = PerTenant[Decoration]


class PromptDecorator:
    def __init__(self, settings: PromptDecoratorSettings) -> None:
        self.settings = settings
        self.enabled = settings.enabled

    def decorate(
        self, body: dict[str, Any], tenant: str, field: str = "messages"
    ) -> list[dict[str, Any]]:
        """Add the tenant's messages to a chat ``body`` (or a response's ``input``: a
        string there is the user's message) in place; the messages added."""
        decoration = self.settings.for_tenant(tenant)
        if decoration is None:
            return []
        # Dumped for each request: each body gets messages of its own.
        first = [m.model_dump() for m in decoration.prepend]
        last = [m.model_dump() for m in decoration.append]
        if first or last:
            given = body.get(field)
            if isinstance(given, str):
                given = [{"role": "user", "content": given}]
            body[field] = [*first, *(given or ()), *last]
        return [*first, *last]
