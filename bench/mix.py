"""Request mixes: what each simulated request asks for.

A mix draws, per request, an API key (tenant), a model, streaming or not, and a
prompt that is an exact repeat of a "hot" prompt (exercises the exact cache and
in-flight coalescing), a paraphrase of one (exercises the semantic cache) or a
unique prompt (a guaranteed miss). Prompt lengths follow a log-normal
distribution in words. Everything comes from an injected ``random.Random`` so a
seeded mix is reproducible.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

PromptKind = Literal["repeat", "paraphrase", "unique"]

_TOPICS = (
    "the water cycle",
    "photosynthesis",
    "compound interest",
    "TCP congestion control",
    "the French revolution",
    "black holes",
    "vaccines",
    "binary search",
    "inflation",
    "plate tectonics",
    "the immune system",
    "public key cryptography",
    "supply and demand",
    "neural networks",
    "the Roman empire",
    "climate change",
    "garbage collection",
    "the stock market",
    "DNA replication",
    "electric motors",
)
# Index 0 is the canonical wording; the others ask the same thing differently.
_PHRASINGS = (
    "Explain {topic} in simple terms.",
    "Can you describe {topic} so a beginner understands it?",
    "Give me an easy explanation of {topic}.",
    "What is {topic}? Keep it simple.",
    "Help me understand {topic} in plain language.",
)
_FILLER = (
    "context matters here because the reader is new to the subject and wants concrete "
    "examples from daily life rather than formal definitions or heavy notation while "
    "still getting the core mechanism right and knowing where the usual confusion comes from"
).split()


class MixConfig(BaseModel):
    repeat_rate: float = Field(0.3, ge=0, le=1)
    paraphrase_rate: float = Field(0.1, ge=0, le=1)
    hot_prompts: int = Field(10, ge=1, le=len(_TOPICS) * len(_PHRASINGS))
    stream_rate: float = Field(0.2, ge=0, le=1)
    keys: list[str] = Field(default_factory=lambda: ["sk-local"], min_length=1)
    models: list[str] = Field(default_factory=lambda: ["mock-gpt"], min_length=1)
    end_users: int = Field(0, ge=0)  # >0: set the body's `user` to one of N names
    prompt_words_median: float = Field(40, gt=0)
    prompt_words_sigma: float = Field(0.6, ge=0)
    prompt_words_max: int = Field(1500, ge=1)
    max_tokens: int = Field(64, ge=1)
    # The gateway caches only deterministic answers (temperature 0 or opted in); None: omit.
    temperature: float | None = Field(0.0, ge=0, le=2)
    per_user_rps: float = Field(0, ge=0)  # 0: no pacing (closed loop, back to back)
    # Which API the requests use: chat completions, or the Responses API (its requests
    # with ``store: false``, so a load test fills no upstream's store and may be cached).
    api: Literal["chat", "responses"] = "chat"

    @model_validator(mode="after")
    def _rates_fit(self) -> MixConfig:
        if self.repeat_rate + self.paraphrase_rate > 1:
            raise ValueError("repeat_rate + paraphrase_rate must be <= 1")
        return self


@dataclass(frozen=True, slots=True)
class RequestSpec:
    key: str
    model: str
    stream: bool
    kind: PromptKind
    prompt_id: int  # the hot prompt a repeat/paraphrase derives from; -1 for unique
    body: dict[str, Any]


def _pad(text: str, words: int, rng: random.Random) -> str:
    missing = words - len(text.split())
    if missing <= 0:
        return text
    extra = " ".join(rng.choice(_FILLER) for _ in range(missing))
    return f"{extra}. {text}"


class RequestMix:
    def __init__(self, config: MixConfig, rng: random.Random) -> None:
        self.config = config
        self._rng = rng
        self._hot = [self._hot_prompt(i) for i in range(config.hot_prompts)]

    def sample_words(self) -> int:
        c = self.config
        words = self._rng.lognormvariate(math.log(c.prompt_words_median), c.prompt_words_sigma)
        return max(1, min(c.prompt_words_max, round(words)))

    def _hot_prompt(self, index: int) -> str:
        # Hot prompts are fixed texts (own seeded padding) so every repeat is byte-identical.
        topic = _TOPICS[index % len(_TOPICS)]
        own = random.Random(index)
        words = max(8, round(self.config.prompt_words_median * own.uniform(0.5, 1.5)))
        return _pad(_PHRASINGS[0].format(topic=topic), words, own)

    def _paraphrase(self, index: int) -> str:
        topic = _TOPICS[index % len(_TOPICS)]
        phrasing = self._rng.choice(_PHRASINGS[1:])
        return phrasing.format(topic=topic)

    def _unique(self) -> str:
        topic = self._rng.choice(_TOPICS)
        nonce = self._rng.getrandbits(48)
        return _pad(
            f"Question {nonce:x}: how does {topic} relate to my project?",
            self.sample_words(),
            self._rng,
        )

    def next(self) -> RequestSpec:
        c, rng = self.config, self._rng
        roll = rng.random()
        prompt_id = rng.randrange(c.hot_prompts)
        kind: PromptKind
        if roll < c.repeat_rate:
            kind, text = "repeat", self._hot[prompt_id]
        elif roll < c.repeat_rate + c.paraphrase_rate:
            kind, text = "paraphrase", self._paraphrase(prompt_id)
        else:
            kind, text, prompt_id = "unique", self._unique(), -1
        stream = rng.random() < c.stream_rate
        model = rng.choice(c.models)
        body: dict[str, Any]
        if c.api == "responses":
            body = {"model": model, "input": text, "max_output_tokens": c.max_tokens}
            body["store"] = False
        else:
            body = {
                "model": model,
                "messages": [{"role": "user", "content": text}],
                "max_tokens": c.max_tokens,
            }
        if c.temperature is not None:
            body["temperature"] = c.temperature
        if stream:
            body["stream"] = True
            if c.api == "chat":
                body["stream_options"] = {"include_usage": True}
        if c.end_users:
            body["user"] = f"user-{rng.randrange(c.end_users)}"
        return RequestSpec(rng.choice(c.keys), model, stream, kind, prompt_id, body)
