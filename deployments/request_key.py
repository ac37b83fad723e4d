"""The canonical request key: one digest over everything that determines an answer.

Two requests get the same key exactly when a provider would treat them as the
same question: same cache namespace, model, messages, tools and output-changing
sampling parameters. Transport details (``stream``, ``stream_options``,
``user``, the gateway's own ``cache`` controls, timeouts) are left out, so a
streamed and a non-streamed request share one entry.

Unknown body fields are *kept* in the key: a field we do not know might change
the answer, and a needless miss is cheap while a wrong hit is not.

Canonical form, so every replica and every run agrees:
- objects are serialised with sorted keys, no whitespace;
- strings are Unicode NFC (a composed and a decomposed "é" are one string);
- integral floats become ints (``1.0`` and ``1`` are one number); other floats
  use Python's shortest round-trip repr, which is platform independent;
- ``null`` fields and parameters at a neutral value (``n=1``, ``top_p=1``,
  penalties 0, empty ``stop``/``logit_bias``/``tools``) are dropped, because the
  provider treats them as absent. ``temperature`` is never folded: its default
  differs between providers.
- a message whose content is a list holding one text part is the same as one
  whose content is that string (OpenAI documents them as equivalent).

A request to another route than chat (``completions``, ``embeddings``) has
the route in its digest: one body sent to two routes asks two questions.

The *semantic scope* is the same digest computed with the final user message's
text blanked out: the semantic tier only compares entries within one scope and
measures similarity on that text alone.
"""

from __future__ import annotations

import hashlib
import math
import unicodedata
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

KEY_VERSION = "v1"

# Fields that change how the answer travels, not what it says.
TRANSPORT_FIELDS = frozenset(
    {
        "stream",
        "stream_options",
        "user",
        "cache",
        "timeout",
        "request_timeout",
        "metadata",
        "store",
        "extra_headers",
        "extra_query",
        "api_key",
        "api_base",
    }
)

# A response (the Responses API) repeats its request's user and metadata, and says
# whether it was stored: for that route they are part of the answer.
RESPONSE_TRANSPORT_FIELDS = TRANSPORT_FIELDS - {"user", "metadata", "store"}

# A parameter equal to its neutral value is the same request as one without it.
NEUTRAL_VALUES: dict[str, tuple[Any, ...]] = {
    "n": (1,),
    "top_p": (1,),
    "presence_penalty": (0,),
    "frequency_penalty": (0,),
    "stop": ((), ""),
    "logit_bias": ({},),
    "tools": ((),),
    "functions": ((),),
}

_SCOPE_PLACEHOLDER = "\x00final-user-text\x00"
_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1


@dataclass(frozen=True, slots=True)
class RequestKey:
    namespace: str
    digest: str  # hex sha256 of the canonical request; the exact-cache and dedup key
    scope: str  # hex sha256 of the request with the final user text blanked
    final_user_text: str | None  # None when the last message is not plain user text

    @property
    def semantic_eligible(self) -> bool:
        return self.final_user_text is not None


def canonical(value: Any) -> Any:
    """The JSON value in canonical form (see the module docstring)."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, str):
        return unicodedata.normalize("NFC", value)
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            return repr(value)  # JSON has no NaN/inf; keep them distinct anyway
        # Folded only where JSON writers keep an integer (orjson: 64 bits): 1e20 stays a float.
        return int(value) if value.is_integer() and _INT_MIN <= value <= _INT_MAX else value
    if isinstance(value, Mapping):
        return {
            canonical(k): canonical(v)
            for k, v in value.items()
            if v is not None and isinstance(k, str)
        }
    if isinstance(value, list | tuple):
        return [canonical(item) for item in value]
    raise TypeError(f"not a JSON value: {type(value).__name__}")


def canonical_json(value: Any) -> bytes:
    return orjson.dumps(canonical(value), option=orjson.OPT_SORT_KEYS)


def _is_neutral(name: str, value: Any) -> bool:
    neutral = NEUTRAL_VALUES.get(name)
    if neutral is None:
        return False
    if isinstance(value, list):
        value = tuple(value)
    return any(value == candidate and type(value) is not bool for candidate in neutral)


def _canonical_message(message: Any) -> Any:
    msg = canonical(message)
    if not isinstance(msg, dict):
        return msg
    content = msg.get("content")
    if (
        isinstance(content, list)
        and len(content) == 1
        and isinstance(content[0], dict)
        and content[0].get("type") == "text"
        and set(content[0]) == {"type", "text"}
    ):
        msg["content"] = content[0]["text"]
    return msg


def _answer_fields(body: Mapping[str, Any], model: str | None, route: str) -> dict[str, Any]:
    transport = RESPONSE_TRANSPORT_FIELDS if route == "responses" else TRANSPORT_FIELDS
    fields: dict[str, Any] = {}
    for name, value in body.items():
        if name in transport or value is None or name == "messages":
            continue
        value = canonical(value)
        if not _is_neutral(name, value):
            fields[name] = value
    messages = body.get("messages") or []
    # Chat's are a list (validated); on another route the field is the client's own, as sent.
    fields["messages"] = (
        [_canonical_message(m) for m in messages]
        if isinstance(messages, list)
        else canonical(messages)
    )
    if model is not None:  # the resolved model wins over the body's alias
        fields["model"] = canonical(model)
    return fields


def _digest(namespace: str, fields: Mapping[str, Any], route: str) -> str:
    envelope: dict[str, Any] = {"v": KEY_VERSION, "ns": namespace, "req": fields}
    if route != "chat":  # one body sent to two routes asks two questions; chat keys predate this
        envelope["route"] = route
    return hashlib.sha256(canonical_json(envelope)).hexdigest()


def _final_user_text(messages: list[Any]) -> str | None:
    if not messages or not isinstance(messages[-1], dict):
        return None
    last = messages[-1]
    if last.get("role") != "user" or not isinstance(last.get("content"), str):
        return None
    return str(last["content"])


def request_key(
    body: Mapping[str, Any], *, namespace: str, model: str | None = None, route: str = "chat"
) -> RequestKey:
    """The key of a request ``body`` to the gateway's ``route`` (``chat``,
    ``completions``, ``embeddings``) in cache namespace ``namespace``.

    ``model`` is the model the gateway resolved the request to, when it differs
    from the body's (an alias); two aliases of one model then share entries.
    """
    namespace = canonical(namespace)
    fields = _answer_fields(body, model, route)
    digest = _digest(namespace, fields, route)
    text = _final_user_text(fields["messages"]) if route == "chat" else None
    if text is None:
        return RequestKey(namespace, digest, digest, None)
    scoped = dict(fields)
    scoped["messages"] = [*fields["messages"][:-1], {**fields["messages"][-1]}]
    scoped["messages"][-1]["content"] = _SCOPE_PLACEHOLDER
    return RequestKey(namespace, digest, _digest(namespace, scoped, route), text)


class RequestKeys:
    """``request_key`` remembered by the request's raw bytes: a hot request (the one
    a cache hit answers) repeats byte for byte, and bytes hash far faster than the
    canonical form is built. Same bytes, namespace and model give the same key, so
    the memo can only save time, never change a key."""

    def __init__(self, entries: int = 2048, max_body_bytes: int = 8192) -> None:
        self._entries = entries
        self._max_body_bytes = max_body_bytes
        self._memo: OrderedDict[tuple[str, str | None, str, bytes], RequestKey] = OrderedDict()

    def key(
        self,
        body: Mapping[str, Any],
        raw: bytes,
        *,
        namespace: str,
        model: str | None = None,
        route: str = "chat",
    ) -> RequestKey:
        if not raw or len(raw) > self._max_body_bytes:
            return request_key(body, namespace=namespace, model=model, route=route)
        memo_key = (namespace, model, route, raw)
        found = self._memo.get(memo_key)
        if found is not None:
            self._memo.move_to_end(memo_key)
            return found
        found = request_key(body, namespace=namespace, model=model, route=route)
        self._memo[memo_key] = found
        if len(self._memo) > self._entries:
            self._memo.popitem(last=False)
        return found
