"""Admin and analytics routes (admin key required): keys, limits and budgets
at run time, breakers, the cache, scaling, and cost summaries and
recommendations.

Limits and budgets changed here reach every replica through
``serve_app/runtime_settings.py`` (Serve's ``user_config`` reaches
``reconfigure`` as well).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Any, get_args

import orjson
from pydantic import BaseModel, StrictStr
from starlette.requests import Request
from starlette.responses import Response

from deployments.budget import BudgetSettings
from deployments.counts import parse_count
from deployments.ledger import GroupBy
from deployments.limiter_settings import LimiterSettings
from deployments.recommendations import summary_csv, summary_json
from serve_app import upstream_health
from serve_app.audit import CHANGES, AuditLog
from serve_app.context import Principal
from serve_app.errors import GatewayError, InvalidRequestError, PermissionDeniedError
from serve_app.runtime_keys import KeyChange, KeySpec, RuntimeKey
from serve_app.runtime_settings import KEY_PREFIX, RuntimeSetting
from serve_app.scaling_record import ScalingRecord
from serve_app.schemas import validate_json

if TYPE_CHECKING:
    from serve_app.ingress import Gateway

log = logging.getLogger(__name__)
LIMITS_KEY_PREFIX = KEY_PREFIX + "limits:"
BREAKER_ACTIONS = ("open", "close", "reset", "disable", "metrics_only")
MAX_DAYS = 3660  # how far back recommendations look: ten years


class BreakerName(BaseModel):
    """The body of ``POST /admin/breakers/{action}``."""

    name: StrictStr


def _json(payload: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(payload, default=str), status, media_type="application/json")


def _key_view(key: RuntimeKey) -> dict[str, Any]:
    """A created key as the admin API shows it (never its secret or digest)."""
    expired = key.expired(time.time() * 1000)
    return {**key.as_dict(), "expired": expired, "admin": False, "source": "runtime"}


def _day(value: str | None, default: date, param: str) -> date:
    if not value:
        return default
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise InvalidRequestError(f"'{value}' is not a date (YYYY-MM-DD).", param=param) from None


class Admin:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        stages, args = gateway.stages, gateway.args
        self.limits = RuntimeSetting(
            stages.redis, "limits", args.limits, stages.limiter.reconfigure
        )
        self.budgets = RuntimeSetting(
            stages.redis, "budgets", args.budgets, stages.cost.reconfigure_budgets
        )
        self.audit = AuditLog(stages.redis)

    async def _require_admin(self, request: Request) -> Principal:
        principal = await self.gateway.principal(request)
        if not principal.admin:
            raise PermissionDeniedError("This endpoint needs an admin key.")
        return principal

    def guarded(
        self, handler: Callable[[Request], Awaitable[Response]]
    ) -> Callable[[Request, str], Awaitable[Response]]:
        """Admin only; a call that changes something goes into the audit log."""

        async def run(request: Request, request_id: str) -> Response:
            principal = await self._require_admin(request)
            if request.method not in CHANGES:
                return await handler(request)
            body = await request.body()  # kept by Starlette: the handler reads it again
            status = 500
            try:
                response = await handler(request)
                status = response.status_code
                return response
            except GatewayError as exc:
                status = exc.status_code
                raise
            finally:
                await self.audit.record(
                    key=principal.key_id,
                    method=request.method,
                    path=request.url.path,
                    status=status,
                    request_id=request_id,
                    body=body,
                )

        return run

    async def audit_log(self, request: Request) -> Response:
        """``GET /admin/audit?limit=100``: the latest admin changes, newest first."""
        limit = request.query_params.get("limit", "100")
        count = parse_count(limit)
        if count is None or not 1 <= count <= 1000:
            raise InvalidRequestError("limit must be a whole number from 1 to 1000.", param="limit")
        entries = await self.audit.latest(count)
        return _json({"object": "list", "data": [asdict(e) for e in entries]})

    # -- keys ------------------------------------------------------------

    async def create_key(self, request: Request) -> Response:
        spec = validate_json(KeySpec, await request.body(), "key")
        secret, key = await self.gateway.runtime_keys.create(spec)
        return _json({**_key_view(key), "key": secret}, 201)

    async def list_keys(self, request: Request) -> Response:
        configured = [
            {
                "name": k.name,
                "tenant": k.tenant,
                "user": k.user,
                "models": k.models,
                "admin": k.admin,
                "source": "config",
            }
            for k in self.gateway.args.api_keys
        ]
        created = [_key_view(k) for k in await self.gateway.runtime_keys.listed()]
        return _json({"object": "list", "data": configured + created})

    async def update_key(self, request: Request) -> Response:
        change = validate_json(KeyChange, await request.body(), "key change")
        key = await self.gateway.runtime_keys.update(request.path_params["name"], change)
        return _json(_key_view(key))

    async def rotate_key(self, request: Request) -> Response:
        secret, key = await self.gateway.runtime_keys.rotate(request.path_params["name"])
        return _json({**_key_view(key), "key": secret})

    async def revoke_key(self, request: Request) -> Response:
        name = request.path_params["name"]
        await self.gateway.runtime_keys.revoke(name)
        return _json({"name": name, "revoked": True})

    # -- limits and budgets (serve_app/runtime_settings.py) ---------------

    async def get_limits(self, request: Request) -> Response:
        return _json(self.gateway.stages.limiter.settings.model_dump(mode="json"))

    async def put_limits(self, request: Request) -> Response:
        settings = validate_json(LimiterSettings, await request.body(), "limits")
        await self.limits.put(settings)
        return _json(settings.model_dump(mode="json"))

    async def get_budgets(self, request: Request) -> Response:
        return _json(self.gateway.stages.cost.guard.settings.model_dump(mode="json"))

    async def put_budgets(self, request: Request) -> Response:
        settings = validate_json(BudgetSettings, await request.body(), "budgets")
        await self.budgets.put(settings)
        return _json(settings.model_dump(mode="json"))

    async def reset_limits(self, request: Request) -> Response:
        await self.limits.reset()
        return await self.get_limits(request)

    async def reset_budgets(self, request: Request) -> Response:
        await self.budgets.reset()
        return await self.get_budgets(request)

    def start(self) -> None:
        self.limits.start()
        self.budgets.start()

    async def stop(self) -> None:
        await self.limits.stop()
        await self.budgets.stop()

    # -- breakers --------------------------------------------------------

    async def breakers(self, request: Request) -> Response:
        snapshots = await self.gateway.stages.resilience.breakers()
        return _json([{**s._asdict(), "state": s.state.name} for s in snapshots])

    async def health(self, request: Request) -> Response:
        """``GET /admin/health[?call=true][&timeout_s=10]``: ``serve_app/upstream_health.py``."""
        query = request.query_params
        call = query.get("call", "false").lower()
        if call not in ("true", "false"):
            raise InvalidRequestError("call must be true or false.", param="call")
        try:
            timeout_s = float(query.get("timeout_s", "10"))
        except ValueError:
            timeout_s = -1.0
        if not 0 < timeout_s <= 60:
            raise InvalidRequestError(
                "timeout_s must be a number of seconds up to 60.", param="timeout_s"
            )
        gateway = self.gateway
        report = await upstream_health.check(
            gateway.args, gateway.provider, call=call == "true", timeout_s=timeout_s
        )
        return _json(report)

    async def balance(self, request: Request) -> Response:
        resilience = self.gateway.stages.resilience
        return _json(resilience.balancer.view(resilience.metrics.picks))

    async def breaker_action(self, request: Request) -> Response:
        action = request.path_params["action"]
        if action not in BREAKER_ACTIONS:
            raise InvalidRequestError(f"Unknown action; use one of {BREAKER_ACTIONS}.")
        name = validate_json(BreakerName, await request.body() or b"{}", "breaker action").name
        resilience = self.gateway.stages.resilience
        verbs = {
            "open": resilience.force_open,
            "close": resilience.force_close,
            "reset": resilience.reset,
            "disable": resilience.disable,
            "metrics_only": resilience.metrics_only,
        }
        snapshot = await verbs[action](name)
        return _json({**snapshot._asdict(), "state": snapshot.state.name})

    # -- cache -----------------------------------------------------------

    async def cache_stats(self, request: Request) -> Response:
        stats = await self.gateway.stages.exact.stats(request.query_params.get("namespace"))
        return _json(asdict(stats))

    async def cache_delete(self, request: Request) -> Response:
        namespace = request.query_params.get("namespace")
        if not namespace:
            raise InvalidRequestError("Give ?namespace= (and optionally &key=).", param="namespace")
        exact, key = self.gateway.stages.exact, request.query_params.get("key")
        if key:
            return _json({"deleted": int(await exact.delete(namespace, key))})
        deleted = await exact.delete_namespace(namespace)
        semantic = self.gateway.stages.semantic
        if semantic is not None:
            deleted += int(await semantic.invalidate_namespace(namespace))
        return _json({"deleted": deleted})

    async def cache_flush(self, request: Request) -> Response:
        deleted = await self.gateway.stages.exact.flush()
        semantic = self.gateway.stages.semantic
        if semantic is not None:
            deleted += int(await semantic.invalidate_namespace(None))
        return _json({"deleted": deleted})

    # -- scaling and cost ------------------------------------------------

    async def scaling(self, request: Request) -> Response:
        return _json(await ScalingRecord(self.gateway.stages.redis).report())

    async def cost_summary(self, request: Request) -> Response:
        query = request.query_params
        group_by = query.get("group_by", "model")
        if group_by not in get_args(GroupBy):
            raise InvalidRequestError(
                f"group_by must be one of {get_args(GroupBy)}.", param="group_by"
            )
        form = query.get("format", "json")
        if form not in ("json", "csv"):
            raise InvalidRequestError("format must be json or csv.", param="format")
        today = datetime.now(UTC).date()
        since = _day(query.get("since"), today - timedelta(days=30), "since")
        until = _day(query.get("until"), today, "until")
        if since > until:
            raise InvalidRequestError(f"since ({since}) is after until ({until}).", param="since")
        rows = await self.gateway.stages.cost.summary(group_by, since, until)  # type: ignore[arg-type]
        if form == "csv":
            return Response(summary_csv(rows), media_type="text/csv")
        return _json(
            {"group_by": group_by, "since": since, "until": until, "rows": summary_json(rows)}
        )

    async def cost_recommendations(self, request: Request) -> Response:
        days = parse_count(request.query_params.get("days", "30"))
        if days is None or not 1 <= days <= MAX_DAYS:
            raise InvalidRequestError(
                f"days must be a whole number from 1 to {MAX_DAYS}.", param="days"
            )
        now_ms = int(time.time() * 1000)
        own = {
            k.name: k.budget
            for k in await self.gateway.runtime_keys.listed()
            if k.budget is not None
        }
        found = await self.gateway.stages.cost.recommendations(
            now_ms - days * 86_400_000, now_ms, own
        )
        return _json({"recommendations": [asdict(r) for r in found]})
