"""Request schemas (pydantic). Unknown fields are allowed and passed upstream
untouched, so new OpenAI parameters work without a gateway release; the
fields below are the ones the gateway itself relies on or must bound."""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, PlainValidator, StrictBool, ValidationError

from serve_app.errors import InvalidRequestError

M = TypeVar("M", bound=BaseModel)


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class ChatMessage(_Open):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


def _is_token(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _text_or_tokens(value: Any) -> Any:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value:
        if all(isinstance(v, str) for v in value) or all(_is_token(v) for v in value):
            return value
        if all(isinstance(v, list) and v and all(_is_token(t) for t in v) for v in value):
            return value
    raise ValueError(
        "expected a string, or a non-empty array of strings, of token ids or of arrays of token ids"
    )


# An embeddings input or a completion prompt. One check instead of pydantic's union,
# whose error names a member of the union ('input.str') rather than the field.
TextOrTokens = Annotated[
    str | list[str] | list[int] | list[list[int]], PlainValidator(_text_or_tokens)
]


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


class CompletionRequest(_Open):
    """A legacy text completion (``/v1/completions``): what vLLM, Ollama and
    OpenAI's instruct models serve."""

    model: str = Field(min_length=1)
    prompt: TextOrTokens
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=0)  # 0 with echo scores a prompt
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    n: int | None = Field(None, ge=1, le=128)
    best_of: int | None = Field(None, ge=1, le=128)
    user: str | None = Field(None, max_length=256)

    @property
    def prompts(self) -> int:
        """How many prompts the request holds: each gets its own completions."""
        if isinstance(self.prompt, str) or isinstance(self.prompt[0], int):
            return 1
        return len(self.prompt)


class EmbeddingsRequest(_Open):
    model: str = Field(min_length=1)
    input: TextOrTokens
    user: str | None = Field(None, max_length=256)


def _document(value: Any) -> Any:
    if isinstance(value, str) or (isinstance(value, dict) and isinstance(value.get("text"), str)):
        return value
    raise ValueError("expected a string or an object with a 'text' string")


def _moderation_part(value: Any) -> bool:
    if isinstance(value, str):
        return True
    if not isinstance(value, dict):
        return False
    if value.get("type") == "text":
        return isinstance(value.get("text"), str)
    return value.get("type") == "image_url" and isinstance(value.get("image_url"), dict)


def _moderation_input(value: Any) -> Any:
    if isinstance(value, str) or (
        isinstance(value, list) and value and all(_moderation_part(v) for v in value)
    ):
        return value
    raise ValueError(
        "expected a string, or a non-empty array of strings or of text and image_url parts"
    )


class ModerationRequest(_Open):
    """A moderation (``/v1/moderations``): text, or text and image parts."""

    model: str = Field(min_length=1)
    input: Annotated[str | list[Any], PlainValidator(_moderation_input)]


class RerankRequest(_Open):
    """A rerank (``/v1/rerank``, as vLLM, Jina and Cohere serve it)."""

    model: str = Field(min_length=1)
    query: str = Field(min_length=1)
    documents: list[Annotated[str | dict[str, Any], PlainValidator(_document)]] = Field(
        min_length=1, max_length=10_000
    )
    top_n: int | None = Field(None, ge=1)
    return_documents: StrictBool | None = None
    user: str | None = Field(None, max_length=256)


def _response_input(value: Any) -> Any:
    if isinstance(value, str) or (
        isinstance(value, list) and all(isinstance(v, dict) for v in value)
    ):
        return value
    raise ValueError("expected a string or an array of input items (objects)")


class ResponsesRequest(_Open):
    """A Responses API request (``/v1/responses``). ``input`` may be left out when
    ``previous_response_id`` or a stored ``prompt`` says what to answer."""

    model: str = Field(min_length=1)
    input: Annotated[str | list[dict[str, Any]], PlainValidator(_response_input)] | None = None
    instructions: str | None = None
    previous_response_id: str | None = Field(None, pattern=r"^[A-Za-z0-9_\-]{1,128}$")
    stream: StrictBool = False
    store: StrictBool | None = None
    background: StrictBool | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    user: str | None = Field(None, max_length=256)


def validate(schema: type[M], payload: object) -> M:
    """Validate, turning the first pydantic error into a 400 naming the field."""
    try:
        return schema.model_validate(payload)
    except ValidationError as exc:
        raise _refusal(exc) from None


def validate_json(schema: type[M], raw: bytes, what: str) -> M:
    """Parse and validate a JSON body (an admin change: ``what`` it is); a 400
    naming the first field at fault, or saying the JSON is malformed."""
    try:
        return schema.model_validate_json(raw)
    except ValidationError as exc:
        raise _refusal(exc, what) from None


def _refusal(exc: ValidationError, what: str | None = None) -> InvalidRequestError:
    first = exc.errors(include_url=False)[0]
    param = ".".join(str(part) for part in first["loc"]) or None
    message = first["msg"].removeprefix("Value error, ")
    if what is not None:
        return InvalidRequestError(f"Invalid {what}: {message}", param=param)
    where = f"'{param}'" if param else "the body"
    return InvalidRequestError(f"Invalid value for {where}: {message}", param=param)
