"""Request schemas (pydantic). Unknown fields are allowed and passed upstream
untouched, so new OpenAI parameters work without a gateway release; the
fields below are the ones the gateway itself relies on or must bound."""

from __future__ import annotations

from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError

from serve_app.errors import InvalidRequestError

M = TypeVar("M", bound=BaseModel)


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class ChatMessage(_Open):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class StreamOptions(_Open):
    include_usage: StrictBool = False


class ChatCompletionRequest(_Open):
    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    # Strict: "yes" would read as True here while the upstream, sent it as is, refuses it.
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    n: int | None = Field(None, ge=1, le=128)
    user: str | None = Field(None, max_length=256)


class EmbeddingsRequest(_Open):
    model: str = Field(min_length=1)
    input: str | list[str] | list[int] | list[list[int]]
    user: str | None = Field(None, max_length=256)


def validate(schema: type[M], payload: object) -> M:
    """Validate, turning the first pydantic error into a 400 naming the field."""
    try:
        return schema.model_validate(payload)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        where = f"'{param}'" if param else "the body"
        raise InvalidRequestError(
            f"Invalid value for {where}: {first['msg']}", param=param
        ) from None
