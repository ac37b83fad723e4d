from __future__ import annotations

import pickle

import orjson
import pytest

from serve_app import errors
from serve_app.errors import GatewayError, UpstreamError


def _all_subclasses(cls: type) -> list[type]:
    found = []
    for sub in cls.__subclasses__():
        found.append(sub)
        found.extend(_all_subclasses(sub))
    return found


@pytest.mark.parametrize("cls", [GatewayError, *_all_subclasses(GatewayError)])
def test_every_error_survives_pickling(cls: type[GatewayError]) -> None:
    original = cls("boom", param="p", headers={"retry-after": "2"})
    copy = pickle.loads(pickle.dumps(original))
    assert type(copy) is cls
    assert copy.to_dict() == original.to_dict()
    assert copy.status_code == original.status_code
    assert copy.headers == {"retry-after": "2"}


def test_envelope_has_the_four_fields() -> None:
    body = orjson.loads(errors.ModelNotFoundError("no", param="model").body())
    assert body == {
        "error": {
            "message": "no",
            "type": "invalid_request_error",
            "param": "model",
            "code": "model_not_found",
        }
    }


def test_upstream_envelope_is_passed_on_and_other_bodies_are_wrapped() -> None:
    upstream = b'{"error": {"message": "m", "type": "t", "param": null, "code": "c"}}'
    assert UpstreamError("x", upstream_body=upstream).body() == upstream
    wrapped = orjson.loads(UpstreamError("bad gateway", upstream_body=b"<html>").body())
    assert wrapped["error"]["message"] == "bad gateway"
    copy = pickle.loads(pickle.dumps(UpstreamError("x", status_code=418, upstream_body=upstream)))
    assert copy.upstream_body == upstream and copy.status_code == 418


def test_status_override_keeps_class_defaults_elsewhere() -> None:
    assert errors.InsufficientQuotaError("q", status_code=402).status_code == 402
    assert errors.InsufficientQuotaError("q").status_code == 429
