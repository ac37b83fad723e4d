"""Typed settings: ``config.yaml``'s ``args:`` validate against ``GatewayArgs``.

Secrets never live in the file: an upstream names the env var holding its API
key, and a gateway key is either named by env var or stored as its sha256.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Collection, Mapping, Sequence
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    HttpUrl,
    StringConstraints,
    field_validator,
    model_validator,
)

from deployments.budget import BudgetSettings
from deployments.cache_policy import CachePolicySettings
from deployments.cost_tracker import CostArgs
from deployments.dedup_redis import DedupSettings
from deployments.exact_cache import ExactCacheSettings
from deployments.limiter_settings import LimiterSettings
from deployments.resilience_settings import ResilienceSettings, Target
from deployments.semantic_cache import SemanticCacheSettings
from serve_app.prompt_decorator import PromptDecoratorSettings
from serve_app.prompt_guard import PromptGuardSettings
from serve_app.prompt_templates import PromptTemplateSettings
from serve_app.store_settings import StoreSettings

# A tenant's name goes into the names of what it owns, joined by '/' and ':' and held
# in braces (cache namespaces 't/<tenant>/<namespace>', per-user quotas
# '<tenant>/<user>', budget keys): a name with one of those would let a tenant named
# 'acme/ml' share what tenant 'acme' keeps under its namespace 'ml'.
TENANT_NAME = r"^[A-Za-z0-9._-]{1,64}$"
TenantName = Annotated[str, StringConstraints(pattern=TENANT_NAME)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class UpstreamSettings(_Strict):
    """An OpenAI-compatible upstream: OpenAI, vLLM, Ollama, the built-in mock."""

    base_url: HttpUrl  # up to and including the API version, e.g. https://api.openai.com/v1
    api_key_env: str | None = None  # the NAME of the env var holding the upstream's key
    transport: Literal["http1", "aiohttp", "httpx-http2"] = "http1"
    connect_timeout_s: float = Field(5.0, gt=0)
    read_timeout_s: float = Field(120.0, gt=0)  # whole non-streamed answer / gap between chunks
    max_connections: int = Field(256, ge=1)
    # Idle keep-alive connections are retired after this, before the upstream drops them
    # (uvicorn, and so vLLM, drops them after 5 s): a request never meets a closing socket.
    keepalive_timeout_s: float = Field(4.0, gt=0)
    headers: dict[str, str] = Field(default_factory=dict)

    def api_key(self) -> str | None:
        return os.environ.get(self.api_key_env) if self.api_key_env else None


class ModelSettings(_Strict):
    """A public model name and where it is served. A name ending in ``*`` serves
    every name with that prefix (``serve_app/model_routes.py``)."""

    name: str = Field(min_length=1)
    upstream: str
    # The name the upstream knows it by; default: ``name`` (a wildcard's: what ``*`` matched).
    upstream_model: str | None = None
    # chat: text generation (chat, completions, responses); embeddings; rerank; moderation.
    kind: Literal["chat", "embeddings", "rerank", "moderation"] = "chat"
    owned_by: str = "llm-gateway"

    @model_validator(mode="after")
    def _wildcard_at_the_end(self) -> ModelSettings:
        if "*" in self.name[:-1]:
            raise ValueError(f"model {self.name!r}: '*' may only end a name (as in 'openai/*')")
        if self.name.endswith("*") and (self.upstream_model or "").count("*") > 1:
            raise ValueError(f"model {self.name!r}: upstream_model may hold one '*' at most")
        return self

    @property
    def target_model(self) -> str:
        return self.upstream_model or self.name


def wildcard_match(entry: str, name: str) -> str | None:
    """What the ``*`` of wildcard model ``entry`` matches in ``name`` (None: no match,
    or only blanks: a bare prefix is no model)."""
    if not entry.endswith("*"):
        return None
    prefix = entry[:-1]
    suffix = name[len(prefix) :]
    return suffix if name.startswith(prefix) and suffix.strip() else None


def model_is_known(name: str, entries: Collection[str]) -> bool:
    """Whether a model entry, or a wildcard one, serves ``name``."""
    return name in entries or any(wildcard_match(entry, name) is not None for entry in entries)


class ApiKeySettings(_Strict):
    """A gateway key: its secret is named by env var or stored as a sha256 hex digest."""

    name: str = Field(min_length=1)  # non-secret id used in logs, quotas, the ledger
    key_env: str | None = None
    key_sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    tenant: TenantName = "default"
    user: str | None = None
    admin: bool = False
    # The public models this key may call and list; none: every model. Others answer
    # 404 model_not_found, as OpenAI answers a model an account has no access to.
    models: list[str] | None = None

    @model_validator(mode="after")
    def _one_source(self) -> ApiKeySettings:
        if (self.key_env is None) == (self.key_sha256 is None):
            raise ValueError(f"api key {self.name!r}: set exactly one of key_env or key_sha256")
        return self

    def digest(self) -> str | None:
        if self.key_sha256:
            return self.key_sha256
        secret = os.environ.get(self.key_env or "")
        return hash_key(secret) if secret else None


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class CacheArgs(_Strict):
    """``args.cache``: the policy both tiers share, and the exact tier's store."""

    policy: CachePolicySettings = CachePolicySettings()
    exact: ExactCacheSettings = ExactCacheSettings()


class TenantSettings(_Strict):
    # The public models the tenant's keys may call and list (each key's own list narrows
    # it further); none: every model. As LiteLLM's team models.
    models: list[str] | None = None


class ResponsesSettings(_Strict):
    # How long the gateway remembers which tenant made each stored response and which
    # upstream holds it: at least the upstreams' own retention (OpenAI's: 30 days).
    retention_s: int = Field(31 * 86_400, ge=60)


class GatewayArgs(_Strict):
    upstreams: dict[str, UpstreamSettings]
    models: list[ModelSettings] = Field(min_length=1)
    api_keys: list[ApiKeySettings] = Field(min_length=1)
    tenants: dict[TenantName, TenantSettings] = Field(default_factory=dict)
    store: StoreSettings = StoreSettings()
    max_body_bytes: int = Field(1024 * 1024, ge=1024)
    request_timeout_s: float = Field(300.0, gt=0)  # a request's whole deadline, retries included
    limits: LimiterSettings = LimiterSettings()
    cache: CacheArgs = CacheArgs()
    semantic_cache: SemanticCacheSettings = SemanticCacheSettings()
    dedup: DedupSettings = DedupSettings()
    resilience: ResilienceSettings = ResilienceSettings()
    cost: CostArgs = CostArgs()
    budgets: BudgetSettings = BudgetSettings()
    prompt_guard: PromptGuardSettings = PromptGuardSettings()
    prompt_decorator: PromptDecoratorSettings = PromptDecoratorSettings()
    prompt_templates: PromptTemplateSettings = PromptTemplateSettings()
    responses: ResponsesSettings = ResponsesSettings()

    @field_validator("models")
    @classmethod
    def _unique_models(cls, models: list[ModelSettings]) -> list[ModelSettings]:
        names = [m.name for m in models]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"model names must be unique: {duplicates}")
        return models

    @model_validator(mode="after")
    def _models_name_upstreams(self) -> GatewayArgs:
        for model in self.models:
            self._known_upstream(f"model {model.name!r}", model.upstream)
        models = {m.name for m in self.models}
        holders = [(f"api key {k.name!r}", k.models) for k in self.api_keys]
        holders += [(f"tenant {name!r}", t.models) for name, t in self.tenants.items()]
        for holder, allowed in holders:
            unknown = sorted(m for m in allowed or () if not model_is_known(m, models))
            if unknown:
                raise ValueError(
                    f"{holder} allows models {unknown}, which are not among models {sorted(models)}"
                )
        routes: dict[str, Mapping[str, Sequence[Target]]] = {
            "fallbacks": self.resilience.fallbacks,
            "balance": {m: g.targets for m, g in self.resilience.balance.items()},
            "context_fallbacks": self.resilience.context_fallbacks,
        }
        for section, chains in routes.items():
            for name, targets in chains.items():
                where = f"resilience.{section}.{name}"
                if name not in models:
                    raise ValueError(f"{where}: no model {name!r} among models {sorted(models)}")
                if name.endswith("*"):
                    raise ValueError(f"{where}: a wildcard model has no {section} of its own")
                for target in targets:
                    self._known_upstream(where, target.upstream)
        return self

    @model_validator(mode="after")
    def _slots_outlast_requests(self) -> GatewayArgs:
        lease_s = self.limits.max_parallel.lease_s
        if lease_s is not None and lease_s < self.request_timeout_s:
            raise ValueError(
                f"limits.max_parallel.lease_s ({lease_s:g}) is shorter than request_timeout_s"
                f" ({self.request_timeout_s:g}): a slot would lapse while its request runs"
            )
        hold_s = self.budgets.hold_ttl_s
        if hold_s < self.request_timeout_s:
            raise ValueError(
                f"budgets.hold_ttl_s ({hold_s:g}) is shorter than request_timeout_s"
                f" ({self.request_timeout_s:g}): a budget hold would lapse while its request runs"
            )
        return self

    def tenant_models(self) -> dict[str, frozenset[str] | None]:
        """Each tenant's model allowlist, where it has one."""
        return {
            name: frozenset(t.models) for name, t in self.tenants.items() if t.models is not None
        }

    def served_models(self) -> dict[str, tuple[str, ...]]:
        """Each public model's upstream model names that may answer it: its primary,
        the targets of its balance group, fallback chain and context fallbacks."""
        found: dict[str, tuple[str, ...]] = {}
        resilience = self.resilience
        for m in (m for m in self.models if not m.name.endswith("*")):
            chains = (resilience.fallbacks, resilience.context_fallbacks)
            names = [m.target_model, *(t.model for c in chains for t in c.get(m.name, ()))]
            if (group := resilience.balance.get(m.name)) is not None:
                names += [t.model for t in group.targets]
            found[m.name] = tuple(dict.fromkeys(names))
        return found

    def _known_upstream(self, where: str, upstream: str) -> None:
        if upstream not in self.upstreams:
            raise ValueError(
                f"{where} names upstream {upstream!r}, "
                f"which is not among upstreams {sorted(self.upstreams)}"
            )
