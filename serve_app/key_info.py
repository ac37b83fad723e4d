"""``GET /v1/key``: what the calling key may do and what it has spent, for the
key's own holder (any valid key, and only about itself), as OpenRouter's
``GET /api/v1/key`` and LiteLLM's ``/key/info`` answer it. An application can
check its budget before a batch job instead of learning it from a 429.

Limits and budgets are the ones in force (changes made at run time included);
spend comes from the ledger (today and this month, UTC), which is written in
batches a moment after each answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import TYPE_CHECKING, Any

from deployments.cost import format_usd
from deployments.ledger import SummaryRow
from deployments.limiter_settings import Quota, format_window
from serve_app.auth import unknown_key
from serve_app.context import Principal

if TYPE_CHECKING:
    from starlette.requests import Request

    from serve_app.ingress import Gateway


@dataclass(frozen=True, slots=True)
class Holder:
    principal: Principal
    source: str  # "config" or "runtime"
    expires_ms: int | None = None


async def holder(gateway: Gateway, request: Request) -> Holder:
    """The key the request carries, whichever way it was made (401 if none)."""
    found = gateway.keys.resolve(request.headers.get("authorization"))
    if isinstance(found, Principal):
        return Holder(found, "config")
    key = await gateway.runtime_keys.live(found)
    if key is None:
        raise unknown_key()
    return Holder(gateway.runtime_keys.holder(key), "runtime", key.expires_ms)


def _spend(rows: list[SummaryRow]) -> dict[str, Any]:
    row = rows[0] if rows else None
    return {
        "usd": format_usd(row.cost) if row else "0",
        "requests": row.requests if row else 0,
        "prompt_tokens": row.prompt_tokens if row else 0,
        "completion_tokens": row.completion_tokens if row else 0,
    }


def _limits(gateway: Gateway, principal: Principal) -> list[dict[str, Any]]:
    settings = gateway.stages.limiter.settings
    scopes = [("key", principal.key_id), ("tenant", principal.tenant)]
    if principal.user:
        scopes.insert(1, ("user", principal.user))

    def quotas(scope: str, subject: str) -> tuple[Quota, ...]:
        if scope == "key" and principal.quotas is not None:
            return principal.quotas  # its own, made with it
        return getattr(settings, f"per_{scope}").for_name(subject)  # type: ignore[no-any-return]

    return [
        {
            "scope": scope,
            "subject": subject,
            "window": format_window(quota.window),
            "requests": quota.requests,
            "tokens": quota.tokens,
            "shadow": quota.shadow,
        }
        for scope, subject in scopes
        for quota in quotas(scope, subject)
    ]


async def key_info(gateway: Gateway, request: Request) -> dict[str, Any]:
    found = await holder(gateway, request)
    principal = found.principal
    cost = gateway.stages.cost
    today = datetime.now(UTC).date()
    month_start = date(today.year, today.month, 1)
    day_rows = await cost.ledger.summary("key", today, today, only=principal.key_id)
    month_rows = await cost.ledger.summary("key", month_start, today, only=principal.key_id)
    budgets = await cost.guard.status(
        principal.tenant, principal.key_id, principal.user, principal.budget
    )
    expires_at = None
    if found.expires_ms is not None:
        expires_at = datetime.fromtimestamp(found.expires_ms / 1000, UTC).isoformat()
    models = [m.name for m in gateway.args.models if principal.may_use(m.name)]
    return {
        "data": {
            "name": principal.key_id,
            "tenant": principal.tenant,
            "user": principal.user,
            "admin": principal.admin,
            "source": found.source,
            "expires_at": expires_at,
            "models": models,
            "spend": {"today": _spend(day_rows), "month": _spend(month_rows)},
            "budgets": [
                {
                    "scope": b.scope,
                    "subject": b.subject,
                    "period": b.period,
                    "limit_usd": format_usd(b.limit),
                    "spent_usd": format_usd(b.spent),
                    "held_usd": format_usd(b.held),
                    "remaining_usd": format_usd(b.remaining),
                }
                for b in budgets
            ],
            "limits": _limits(gateway, principal),
            "max_parallel_requests": principal.max_parallel
            or gateway.stages.limiter.settings.max_parallel.per_key.for_name(principal.key_id),
        }
    }
