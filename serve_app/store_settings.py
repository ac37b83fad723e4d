"""``args.store``: kept apart from ``settings.py`` so that stages which open their own
store connection (the semantic cache deployment) can import it without a cycle."""

from __future__ import annotations

import os

from pydantic import BaseModel, ConfigDict, Field


class StoreSettings(BaseModel):
    """Where shared state lives. No url and no REDIS_URL: an embedded Valkey per cluster."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str | None = None
    data_dir: str = "~/.cache/llm-gateway/valkey"  # the embedded server's data (append-only file)
    socket_timeout_s: float = Field(0.5, gt=0)
    max_connections: int = Field(256, ge=1)

    def resolved_url(self) -> str | None:
        return os.environ.get("REDIS_URL") or self.url
