"""Timing an OpenAI-style SSE stream, one line at a time, as it arrives: a chat
stream (content deltas, ending ``[DONE]``) or a Responses API one (typed events,
text in ``response.output_text.delta``, ending ``response.completed``).

Pure (no I/O) so it is tested directly; the locustfile feeds it lines with the
``perf_counter`` time each one arrived.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field


@dataclass(slots=True)
class StreamRead:
    ttft_ms: float | None = None  # to the first chunk with content
    itl_ms: float | None = None  # mean gap between content chunks
    chunks: int = 0
    cost: float | None = None  # the gateway's ``usage.cost`` in the final usage chunk
    error: str | None = None


@dataclass(slots=True)
class SseTimer:
    t0: float  # perf_counter at the request start
    stamps: list[float] = field(default_factory=list)
    done: bool = False
    cost: float | None = None

    def feed(self, line: str, now: float) -> None:
        line = line.strip()
        if not line.startswith("data:"):
            return  # comments, event names, keep-alives
        data = line[5:].strip()
        if data == "[DONE]":
            self.done = True
            return
        try:
            chunk = json.loads(data)
        except ValueError:
            return
        if not isinstance(chunk, dict):
            return
        kind = chunk.get("type")
        if kind is not None:  # a Responses API event
            if kind == "response.output_text.delta" and chunk.get("delta"):
                self.stamps.append(now)
            elif kind in ("response.completed", "response.incomplete"):
                self.done = True
                response = chunk.get("response")
                self._cost(response.get("usage") if isinstance(response, dict) else None)
            return
        if any((c.get("delta") or {}).get("content") for c in chunk.get("choices") or []):
            self.stamps.append(now)
        self._cost(chunk.get("usage"))

    def _cost(self, usage: object) -> None:
        """The gateway's ``usage.cost``, when the usage carries one."""
        if isinstance(usage, dict) and usage.get("cost") is not None:
            try:
                self.cost = float(usage["cost"])
            except (TypeError, ValueError):
                pass

    def result(self, error: str | None = None) -> StreamRead:
        if error is None and not self.done:
            error = "stream: no [DONE] or response.completed"
        out = StreamRead(chunks=len(self.stamps), cost=self.cost, error=error)
        if self.stamps:
            out.ttft_ms = (self.stamps[0] - self.t0) * 1000
            if len(self.stamps) > 1:
                span = self.stamps[-1] - self.stamps[0]
                out.itl_ms = span * 1000 / (len(self.stamps) - 1)
        return out
