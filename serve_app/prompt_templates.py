"""Prompts kept at the gateway and filled in per request, as Kong's AI Prompt
Template does: a client sends ``"messages": "{template://summarise}"`` (or, on
``/v1/completions``, ``"prompt": "{template://summarise}"``; on ``/v1/responses``,
``"input"`` takes a chat template's messages) with ``"properties":
{"text": "..."}``, and the gateway puts the template's messages or prompt there,
each ``{{name}}`` replaced by that property (or the template's default).

Values are put into the parsed body, never spliced into JSON text, so a property
cannot break out of the string it fills. Templates are global (``default``) or a
tenant's own (``serve_app/per_tenant.py``); with ``allow_untemplated: false`` a
tenant's chat, completion and response requests must name a template. Expansion runs first,
so the prompt guard, the decorator, the cache key, quotas and the upstream all see
the filled-in request.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from serve_app.errors import InvalidRequestError
from serve_app.per_tenant import PerTenant
from serve_app.prompt_decorator import DecoratorMessage  # an operator's message, as there

_REFERENCE = re.compile(r"\{template://([A-Za-z0-9_.\-]{1,64})\}")
_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z0-9_.\-]{1,64})\s*\}\}")
# The body field a template fills, by route: chat messages also fill a response's input.
FIELDS = {"chat": "messages", "completions": "prompt", "responses": "input"}


class PromptTemplate(BaseModel):
    """Chat ``messages`` or a completion ``prompt``, with ``{{name}}`` placeholders."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    messages: tuple[DecoratorMessage, ...] | None = Field(None, min_length=1)
    prompt: str | None = Field(None, min_length=1)
    defaults: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_kind(self) -> PromptTemplate:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("a template has either messages (chat) or a prompt (completions)")
        return self

    @property
    def field(self) -> str:
        return "messages" if self.messages is not None else "prompt"

    def placeholders(self) -> set[str]:
        texts = [m.content for m in self.messages] if self.messages else [self.prompt or ""]
        return {name for text in texts for name in _PLACEHOLDER.findall(text)}

    def render(self, values: Mapping[str, str]) -> Any:
        def fill(text: str) -> str:
            return _PLACEHOLDER.sub(lambda m: values[m[1]], text)

        if self.messages is not None:
            return [{"role": m.role, "content": fill(m.content)} for m in self.messages]
        return fill(self.prompt or "")


class TemplateLibrary(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    templates: dict[str, PromptTemplate] = Field(default_factory=dict)
    allow_untemplated: bool = True  # Kong's allow_untemplated_requests

    @model_validator(mode="after")
    def _names(self) -> TemplateLibrary:
        bad = [n for n in self.templates if not _REFERENCE.fullmatch(f"{{template://{n}}}")]
        if bad:
            raise ValueError(f"template names are 1 to 64 of A-Z a-z 0-9 _ . - (not {bad})")
        return self


PromptTemplateSettings = PerTenant[TemplateLibrary]


def _reference(value: Any) -> str | None:
    match = _REFERENCE.fullmatch(value.strip()) if isinstance(value, str) else None
    return match[1] if match else None


def _properties(value: Any) -> dict[str, str]:
    """The request's ``properties``: names to strings (numbers and booleans as written)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidRequestError("'properties' must be an object.", param="properties")
    out = {}
    for name, item in value.items():
        if isinstance(item, bool):
            item = "true" if item else "false"
        elif isinstance(item, int | float):
            item = str(item)
        if not isinstance(item, str):
            raise InvalidRequestError(
                f"Property '{name}' must be a string, a number or a boolean.",
                param=f"properties.{name}",
            )
        out[name] = item
    return out


class PromptTemplates:
    def __init__(self, settings: PromptTemplateSettings) -> None:
        self.settings = settings
        self.enabled = settings.enabled

    def expand(self, route: str, body: dict[str, Any], tenant: str) -> bool:
        """Fill in the template a request names, in place; whether it named one."""
        field = FIELDS.get(route)
        library = self.settings.for_tenant(tenant)
        if field is None or library is None:
            return False
        name = _reference(body.get(field))
        properties = body.pop("properties", None)  # the gateway's, never the upstream's
        if name is None:
            if not library.allow_untemplated:
                raise InvalidRequestError(
                    f"Requests here must use a prompt template: send '{field}' as"
                    " '{template://<name>}' with its 'properties'.",
                    param=field,
                    code="template_required",
                )
            return False
        template = library.templates.get(name)
        if template is None or template.field != ("prompt" if field == "prompt" else "messages"):
            raise InvalidRequestError(
                f"There is no {'completions' if field == 'prompt' else 'chat'} prompt"
                f" template '{name}'.",
                param=field,
                code="template_not_found",
            )
        values = {**template.defaults, **_properties(properties)}
        missing = sorted(template.placeholders() - values.keys())
        if missing:
            raise InvalidRequestError(
                f"The template '{name}' needs the properties {missing}.",
                param=f"properties.{missing[0]}",
                code="template_property_missing",
            )
        body[field] = template.render(values)
        return True


__all__ = ["PromptTemplateSettings", "PromptTemplates", "TemplateLibrary"]
