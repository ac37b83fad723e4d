"""The raw data a run leaves behind, shared by the load generator and the analysis.

The locust subprocess appends one JSON line per request to ``requests.jsonl`` and
one per second to ``users.jsonl``; times are Unix epoch seconds so they line up
with the Prometheus samples the parent process scrapes.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

REQUESTS_FILE = "requests.jsonl"
USERS_FILE = "users.jsonl"
CONFIG_FILE = "run_config.json"


@dataclass(slots=True)
class RequestRecord:
    t: float  # request start, epoch seconds (relative to the run start after ``load``)
    latency_ms: float  # until the last byte (streams: until [DONE])
    status: int  # HTTP status; 0 when no response arrived
    ok: bool
    stream: bool
    kind: str  # repeat | paraphrase | unique | probe
    tenant: str  # the index of the API key used ("key-0"), never the key itself
    model: str
    ttft_ms: float | None = None  # streams: time to the first content chunk
    itl_ms: float | None = None  # streams: mean gap between content chunks
    chunks: int = 0
    cache: str | None = None  # x-cache
    dedup: str | None = None  # x-dedup
    cost: float | None = None  # x-request-cost
    upstream: str | None = None  # x-upstream
    error: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RequestRecord:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True, slots=True)
class UserSample:
    t: float
    users: int


@dataclass(slots=True)
class RawRun:
    start: float  # epoch seconds of the load start; every ``t`` below is relative to it
    requests: list[RequestRecord]
    users: list[UserSample]


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by a killed load generator
    return out


def load(run_dir: Path) -> RawRun:
    """Reads a run directory and rebases every time on the earliest event."""
    requests = [RequestRecord.from_dict(d) for d in _read_jsonl(run_dir / REQUESTS_FILE)]
    users = [UserSample(float(d["t"]), int(d["users"])) for d in _read_jsonl(run_dir / USERS_FILE)]
    stamps = [r.t for r in requests] + [u.t for u in users]
    start = min(stamps) if stamps else 0.0
    for record in requests:
        record.t -= start
    rebased = [UserSample(u.t - start, u.users) for u in users]
    requests.sort(key=lambda r: r.t)
    return RawRun(start, requests, rebased)
