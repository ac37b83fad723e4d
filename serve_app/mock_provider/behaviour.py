"""The mock provider's state: deterministic answers, latency, faults, stats.

Kept apart from HTTP so the rules are testable directly. Answers and usage
are a pure function of the request body, so the same request always gets the
same answer (what cache and dedup tests rely on).
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from deployments.tokens import (
    estimate_input_tokens,
    estimate_prompt_tokens,
    estimate_response_input_tokens,
)

_WORDS = (
    "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike "
    "november oscar papa quebec romeo sierra tango uniform victor whiskey xray yankee zulu"
).split()


class Faults(BaseModel):
    """What goes wrong, per model ("*" applies to every model without its own)."""

    model_config = ConfigDict(extra="forbid", frozen=True)  # frozen: ``_NO_FAULTS`` is shared

    error_rate: float = Field(0.0, ge=0.0, le=1.0)
    error_status: int = Field(500, ge=400, le=599)
    retry_after_s: float | None = Field(None, ge=0)  # sent with 429/503 errors
    hang_s: float = Field(0.0, ge=0)  # sleep this long before answering (a hang or a slow call)
    malformed_rate: float = Field(0.0, ge=0.0, le=1.0)  # 200 with a body that is not JSON
    cut_stream_after: int | None = Field(None, ge=0)  # drop a stream after N chunks
    # A context window this small: a chat whose prompt and max_tokens do not fit gets
    # OpenAI's 400 ``context_length_exceeded``, as a real model would answer it.
    context_tokens: int | None = Field(None, ge=1)


_NO_FAULTS = Faults()


class Latency(BaseModel):
    model_config = ConfigDict(extra="forbid")

    fixed_ms: float = Field(0.0, ge=0)
    jitter_ms: float = Field(0.0, ge=0)
    per_token_ms: float = Field(0.0, ge=0)  # between stream chunks


class MockConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    latency: Latency = Latency()
    faults: dict[str, Faults] = Field(default_factory=dict)
    models: list[str] = Field(
        default_factory=lambda: ["mock-gpt", "mock-embed", "mock-rerank", "mock-moderation"]
    )
    seed: int = 0


Decision = Literal["ok", "error", "malformed"]


@dataclass
class MockStats:
    calls: int = 0
    by_body: Counter[str] = field(default_factory=Counter)
    by_model: Counter[str] = field(default_factory=Counter)
    by_path: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "by_body_hash": dict(self.by_body),
            "by_model": dict(self.by_model),
            "by_path": dict(self.by_path),
        }


def body_hash(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()[:16]


def max_tokens(body: dict[str, Any]) -> int:
    """The answer's bound in tokens a request sets (0: none), whichever route's name it uses."""
    for name in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return 0


# The most stored responses the mock keeps (the oldest go first), as an upstream's retention.
STORED_RESPONSES = 10_000


class MockBehaviour:
    def __init__(self, config: MockConfig | None = None) -> None:
        self.config = config or MockConfig()
        self.stats = MockStats()
        # Responses created with ``store`` (the default), by id: what ``previous_response_id``
        # and ``GET /v1/responses/{id}`` read. Each with the input items it was given.
        self.responses: OrderedDict[str, tuple[dict[str, Any], list[Any]]] = OrderedDict()
        self._random = random.Random(self.config.seed)
        self.last_body = b""  # the last call's body as received (tests read what was sent)

    def reset(self) -> None:
        self.stats = MockStats()
        self.responses.clear()
        self.config = MockConfig(models=self.config.models, seed=self.config.seed)
        self._random = random.Random(self.config.seed)

    def record(self, path: str, model: str, raw: bytes) -> str:
        """Count a call; returns its body's hash."""
        digest = body_hash(raw)
        self.last_body = raw
        self.stats.calls += 1
        self.stats.by_body[digest] += 1
        self.stats.by_model[model] += 1
        self.stats.by_path[path] += 1
        return digest

    def faults_for(self, model: str) -> Faults:
        faults = self.config.faults
        if not faults:  # the usual case: a call costs no lookups
            return _NO_FAULTS
        return faults.get(model) or faults.get("*") or _NO_FAULTS

    def decide(self, model: str) -> Decision:
        faults = self.faults_for(model)
        if not faults.error_rate and not faults.malformed_rate:
            return "ok"
        roll = self._random.random()
        if roll < faults.error_rate:
            return "error"
        if roll < faults.error_rate + faults.malformed_rate:
            return "malformed"
        return "ok"

    def delay_s(self, model: str) -> float:
        latency = self.config.latency
        jitter = self._random.uniform(0, latency.jitter_ms) if latency.jitter_ms else 0.0
        return (latency.fixed_ms + jitter) / 1000 + self.faults_for(model).hang_s

    def answer_words(self, body: dict[str, Any]) -> list[str]:
        """A deterministic answer: seeded by the request's messages (a chat), prompt
        (a text completion) or input (a response), bounded by max_tokens."""
        seed = body["messages"] if "messages" in body else body.get("prompt", body.get("input"))
        digest = hashlib.sha256(repr(seed).encode()).digest()
        limit = max_tokens(body) or 16
        count = max(1, min(int(limit), 8 + digest[0] % 9))
        return [_WORDS[b % len(_WORDS)] for b in digest[:count]]  # count <= 16 < 32 bytes

    @staticmethod
    def prompt_tokens(body: dict[str, Any]) -> int:
        """A chat's messages, a text completion's prompt or a response's input, in tokens."""
        if "input" in body and "messages" not in body:
            return estimate_response_input_tokens(body["input"], body.get("instructions"))
        if "messages" in body or not isinstance(body.get("prompt"), str | list):
            return estimate_prompt_tokens(body.get("messages") or [])
        return estimate_input_tokens(body["prompt"])

    @classmethod
    def usage(cls, body: dict[str, Any], completion_tokens: int) -> dict[str, int]:
        prompt = cls.prompt_tokens(body)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt + completion_tokens,
        }

    @staticmethod
    def moderation_score(category: str, text: str) -> float:
        """High when the text says the category's word (or its stem), low otherwise."""
        said = category[:4] in text.lower()
        noise = hashlib.sha256(f"{category}\x00{text}".encode()).digest()[0] / 2550
        return round((0.9 if said else 0.0) + noise, 6)

    @staticmethod
    def relevance(query: str, document: str) -> float:
        """A deterministic score in [0, 1]: words the two share, and a hash to break ties."""
        shared = len(set(query.lower().split()) & set(document.lower().split()))
        noise = hashlib.sha256(f"{query}\x00{document}".encode()).digest()[0] / 2550
        return round(min(1.0, shared / 4 + noise), 6)

    @staticmethod
    def embedding(text: str, dims: int = 16) -> list[float]:
        digest = hashlib.sha256(text.encode()).digest()
        return [round((digest[i % len(digest)] - 127.5) / 127.5, 6) for i in range(dims)]
