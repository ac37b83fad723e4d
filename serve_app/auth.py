"""API keys -> principals. Keys are compared by sha256 digest, so the config
(and memory) holds no plaintext key."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

from serve_app.context import Principal
from serve_app.errors import AuthenticationError
from serve_app.settings import ApiKeySettings, hash_key

log = logging.getLogger(__name__)


class KeyRing:
    def __init__(
        self,
        keys: Iterable[ApiKeySettings],
        tenant_models: Mapping[str, frozenset[str] | None] | None = None,
    ) -> None:
        tenant_models = tenant_models or {}
        self._by_digest: dict[str, Principal] = {}
        for key in keys:
            digest = key.digest()
            if digest is None:
                log.warning("api key %r: env var %s is unset; key disabled", key.name, key.key_env)
                continue
            self._by_digest[digest] = Principal(
                key_id=key.name,
                tenant=key.tenant,
                user=key.user,
                admin=key.admin,
                models=None if key.models is None else frozenset(key.models),
                tenant_models=tenant_models.get(key.tenant),
            )

    def authenticate(self, authorization: str | None) -> Principal:
        """A configured key's holder; any other key is refused."""
        found = self.resolve(authorization)
        if isinstance(found, str):
            raise unknown_key()
        return found

    def resolve(self, authorization: str | None) -> Principal | str:
        """A configured key's holder, or the digest of a key that is not configured
        (one created at run time, or none): the caller looks that up."""
        if not authorization:
            raise AuthenticationError(
                "Missing API key: send it as 'Authorization: Bearer <key>'.", code="missing_api_key"
            )
        scheme, _, secret = authorization.partition(" ")
        if scheme.lower() != "bearer" or not secret.strip():
            raise AuthenticationError("Malformed Authorization header: expected 'Bearer <key>'.")
        digest = hash_key(secret.strip())
        return self._by_digest.get(digest) or digest


def unknown_key() -> AuthenticationError:
    return AuthenticationError("Incorrect API key provided.")
