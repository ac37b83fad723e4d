"""Settings that are global with per-tenant replacements: ``default`` applies to
every tenant without its own entry; a tenant's entry replaces it, and ``null``
means none for that tenant (the prompt guard's rules, the prompt decorator's
messages)."""

from __future__ import annotations

from typing import Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field

T = TypeVar("T")


class PerTenant(BaseModel, Generic[T]):
    model_config = ConfigDict(extra="forbid", frozen=True)

    default: T | None = None
    tenants: dict[str, T | None] = Field(default_factory=dict)

    def for_tenant(self, tenant: str) -> T | None:
        return self.tenants[tenant] if tenant in self.tenants else self.default

    @property
    def enabled(self) -> bool:
        return self.default is not None or any(v is not None for v in self.tenants.values())
