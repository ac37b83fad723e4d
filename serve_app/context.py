"""What the ingress knows about a request once it has been authenticated and
validated: the value every stage receives (stages never see Starlette)."""

from __future__ import annotations

import itertools
import os
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from deployments.budget import BudgetLimit
    from deployments.limiter_settings import Quota

# Request ids: a random per-process prefix and a counter. As unique as uuid4 across
# replicas and restarts, without a urandom syscall per request (~2-6 us here).
_ID_PREFIX = uuid.uuid4().hex[:16]
_ID_COUNTER = itertools.count()


def new_request_id() -> str:
    return f"{_ID_PREFIX}{next(_ID_COUNTER):016x}"


def _new_id_prefix() -> None:  # a forked child must not repeat its parent's ids
    global _ID_PREFIX
    _ID_PREFIX = uuid.uuid4().hex[:16]


os.register_at_fork(after_in_child=_new_id_prefix)


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: resolved from the API key."""

    key_id: str  # a stable, non-secret id of the API key (config name), never the key itself
    tenant: str
    user: str | None = None  # the key's own user, if the key belongs to one person
    admin: bool = False
    models: frozenset[str] | None = None  # the public models it may use; None: all
    tenant_models: frozenset[str] | None = None  # ... and its tenant may; None: all
    # A key made at run time with limits or a budget of its own (``POST /admin/keys``):
    # they replace the configured per-key ones for it. None: the configured ones apply.
    quotas: tuple[Quota, ...] | None = None
    budget: BudgetLimit | None = None
    max_parallel: int | None = None  # ... and its own cap on requests in flight at once

    def may_use(self, model: str, entry: str | None = None) -> bool:
        """Whether both the key and its tenant allow ``model``, by its name or by the
        wildcard ``entry`` that serves it."""
        return _allows(self.models, model, entry) and _allows(self.tenant_models, model, entry)


def _allows(allowed: frozenset[str] | None, model: str, entry: str | None) -> bool:
    return allowed is None or model in allowed or (entry is not None and entry in allowed)


@dataclass(slots=True)
class RequestContext:
    # The request's id as the client and the logs see it: the client's x-request-id when
    # it sent one, which the gateway echoes and passes upstream, so nothing unique.
    request_id: str
    principal: Principal
    route: str  # "chat" | "completions" | "embeddings" | "responses"
    model: str  # the public model name the client asked for
    body: dict[str, Any]  # the validated request body as a plain dict (upstream-bound)
    stream: bool = False
    end_user: str | None = None  # the body's `user` field
    prompt_tokens_estimate: int = 0
    max_tokens: int | None = None
    # Completions the request asks for (n, best_of, one per prompt): each may run to max_tokens.
    choices: int = 1
    target_model: str | None = None  # the upstream's name for the model (a wildcard's match)
    headers: dict[str, str] = field(default_factory=dict)  # lower-cased request headers
    raw_body: bytes = b""  # the body as received (the request-key memo's key)
    response_headers: dict[str, str] = field(default_factory=dict)  # stages add theirs here
    tags: tuple[str, ...] = ()  # x-gateway-tags: what the ledger sums spend by, besides keys
    # What the gateway accounts the request under (its budget hold, its slot among the
    # requests in flight, its ledger record): made here for every request, since a
    # request_id a client chose may be sent again, by mistake or to share one hold.
    call_id: str = field(default_factory=new_request_id)

    @property
    def user(self) -> str | None:
        """The end user a quota or budget applies to: the body's user, else the key's."""
        return self.end_user or self.principal.user
