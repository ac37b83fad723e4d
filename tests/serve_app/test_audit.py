"""The admin audit log in process (no Ray): each change through the admin API is
kept with who made it and what it got, newest first; reads and secrets are not."""

from __future__ import annotations

import uuid

import orjson
import pytest

from serve_app.ingress import Gateway
from tests.support import LOCAL_KEY, OTHER_KEY, MockServer, auth, gateway_args, in_process

pytestmark = pytest.mark.integration


async def test_admin_changes_are_kept_newest_first_without_secrets(
    mock_server: MockServer, redis_url: str
) -> None:
    gateway = Gateway(gateway_args(mock_server.base_url, redis_url))
    name = f"audited-{uuid.uuid4().hex[:8]}"
    async with in_process(gateway, LOCAL_KEY) as admin:
        made = await admin.post("/admin/keys", json={"name": name, "tenant": "t"})
        assert made.status_code == 201
        await admin.get("/admin/keys")  # a read: not kept
        await admin.patch(f"/admin/keys/{name}", json={"models": ["nope"]})  # refused: kept
        await admin.delete(f"/admin/keys/{name}")
        assert (await admin.get("/admin/audit", headers=auth(OTHER_KEY))).status_code == 403

        answer = await admin.get("/admin/audit", params={"limit": "3"})
        assert answer.status_code == 200, answer.text
        entries = answer.json()["data"]
        assert [(e["method"], e["path"], e["status"]) for e in entries] == [
            ("DELETE", f"/admin/keys/{name}", 200),
            ("PATCH", f"/admin/keys/{name}", 400),
            ("POST", "/admin/keys", 201),
        ]
        assert {e["key"] for e in entries} == {"local"}
        assert entries[2]["body"] == {"name": name, "tenant": "t"}
        assert entries[0]["at_ms"] >= entries[2]["at_ms"] and entries[0]["request_id"]
        assert made.json()["key"] not in orjson.dumps(entries).decode()  # never the secret
        for bad in ("0", "x", "5000"):
            assert (await admin.get("/admin/audit", params={"limit": bad})).status_code == 400
