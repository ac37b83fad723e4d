"""``/v1/responses`` in process (no Ray) against the mock upstream and a real store:
answers and streams billed from the Responses API's usage, stored responses that
only their tenant can continue, read or delete, continuations pinned to the
upstream that holds them, and what is refused."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import orjson
import pytest

from serve_app.ingress import Gateway
from serve_app.mock_provider import Faults, MockBehaviour
from serve_app.responses import passed_query
from tests.support import (
    LOCAL_KEY,
    OTHER_KEY,
    MockServer,
    auth,
    gateway_args,
    in_process,
    quota_key,
    tpm_key,
)

pytestmark = pytest.mark.integration
ROUTE = "/v1/responses"


def _input() -> str:
    return f"Tell me about {uuid.uuid4().hex}"


def _events(response: httpx.Response) -> list[tuple[str, dict[str, Any]]]:
    events = []
    for block in response.text.strip().split("\n\n"):
        kind, data = block.split("\n")
        assert kind.startswith("event: ") and data.startswith("data: "), block
        events.append((kind[7:], orjson.loads(data[6:])))
    return events


def _gateway(mock_server: MockServer, redis_url: str, **overrides: Any) -> Gateway:
    # Two upstream names for the one mock: a response made through one is held there.
    args = gateway_args(mock_server.base_url, redis_url, **overrides)
    upstreams = {**args.upstreams, "mock-b": args.upstreams["mock"]}
    models = [
        *(m.model_dump() for m in args.models),
        {"name": "b-gpt", "upstream": "mock-b"},
        {"name": "fallback-gpt", "upstream": "dead"},
    ]
    resilience = args.resilience.model_dump()
    resilience["fallbacks"] = {
        "fallback-gpt": [
            {"upstream": "dead", "model": "fallback-gpt"},
            {"upstream": "mock", "model": "mock-gpt"},
        ]
    }
    config = {
        **args.model_dump(),
        "upstreams": {k: v.model_dump() for k, v in upstreams.items()},
        "models": models,
        "resilience": resilience,
    }
    return Gateway(type(args).model_validate(config))


async def test_a_response_is_answered_billed_and_streamed_as_typed_events(
    mock_server: MockServer, mock_behaviour: MockBehaviour, redis_url: str
) -> None:
    async with in_process(_gateway(mock_server, redis_url), LOCAL_KEY) as client:
        body = {"model": "mock-gpt", "input": _input(), "max_output_tokens": 6}
        answer = await client.post(ROUTE, json=body)
        assert answer.status_code == 200, answer.text
        response = answer.json()
        assert response["object"] == "response" and response["status"] == "completed"
        assert response["usage"]["output_tokens"] == 6
        assert answer.headers["x-cache"] == "BYPASS"
        assert answer.headers["x-upstream"] == "mock"
        assert float(answer.headers["x-request-cost"]) >= 0
        assert mock_behaviour.stats.by_path == {"/v1/responses": 1}

        streamed = await client.post(ROUTE, json={**body, "stream": True})
        assert streamed.status_code == 200
        assert streamed.headers["content-type"].startswith("text/event-stream")
        events = _events(streamed)
        assert events[0][0] == "response.created" and events[-1][0] == "response.completed"
        final = events[-1][1]["response"]
        text = "".join(e["delta"] for kind, e in events if kind == "response.output_text.delta")
        assert text == final["output"][0]["content"][0]["text"]
        # The gateway's cost in the terminal event's usage, as in chat's usage chunk.
        assert "cost" in final["usage"] and final["usage"]["output_tokens"] == 6

        summary = await client.get("/v1/cost/summary", params={"group_by": "model"})
        assert summary.status_code == 200, summary.text


async def test_the_limiter_counts_a_responses_tokens(
    mock_server: MockServer, mock_behaviour: MockBehaviour, redis_url: str
) -> None:
    # A tpm quota the first answer's reported usage uses up.
    key, overrides = tpm_key(40)
    async with in_process(_gateway(mock_server, redis_url, **overrides), key) as client:
        body = {"model": "mock-gpt", "input": "x" * 80, "max_output_tokens": 8}
        first = await client.post(ROUTE, json=body)
        assert first.status_code == 200, first.text
        used = first.json()["usage"]["total_tokens"]
        assert used > 20
        second = await client.post(ROUTE, json=body)
        assert second.status_code == 429, second.text


@pytest.mark.parametrize("stream", [False, True])
async def test_a_continuation_is_held_for_the_conversation_it_continues(
    mock_server: MockServer, mock_behaviour: MockBehaviour, redis_url: str, stream: bool
) -> None:
    # The upstream reads the earlier conversation again and bills it as input: a
    # continuation's quota reservation (and budget hold) counts it, so one that cannot
    # fit what is left is refused before the upstream is called.
    key, overrides = tpm_key(1000)
    async with in_process(_gateway(mock_server, redis_url, **overrides), key) as client:
        first = {"model": "mock-gpt", "input": "x" * 2400, "max_output_tokens": 8}
        made = await client.post(ROUTE, json={**first, "stream": stream})
        assert made.status_code == 200, made.text
        final = _events(made)[-1][1]["response"] if stream else made.json()
        assert 550 < final["usage"]["total_tokens"] < 700

        calls = mock_behaviour.stats.calls
        follow = {
            "model": "mock-gpt",
            "input": "and then?",
            "max_output_tokens": 8,
            "previous_response_id": final["id"],
        }
        refused = await client.post(ROUTE, json=follow)
        assert refused.status_code == 429, refused.text
        assert mock_behaviour.stats.calls == calls


async def test_only_the_tenant_that_made_a_response_continues_reads_or_deletes_it(
    mock_server: MockServer, mock_behaviour: MockBehaviour, redis_url: str
) -> None:
    async with in_process(_gateway(mock_server, redis_url), LOCAL_KEY) as client:
        first = (await client.post(ROUTE, json={"model": "mock-gpt", "input": _input()})).json()
        follow = {"model": "mock-gpt", "input": "and then?", "previous_response_id": first["id"]}
        second = await client.post(ROUTE, json=follow)
        assert second.status_code == 200, second.text
        assert second.json()["previous_response_id"] == first["id"]

        got = await client.get(f"{ROUTE}/{first['id']}")
        assert got.status_code == 200 and got.json()["id"] == first["id"]
        items = await client.get(f"{ROUTE}/{first['id']}/input_items")
        assert items.status_code == 200 and items.json()["object"] == "list"

        # Another tenant, with the id: as if it did not exist, and no upstream call.
        calls = mock_behaviour.stats.calls
        other = auth(OTHER_KEY)
        stolen = await client.post(ROUTE, json=follow, headers=other)
        assert stolen.status_code == 400
        assert stolen.json()["error"]["code"] == "previous_response_not_found"
        assert (await client.get(f"{ROUTE}/{first['id']}", headers=other)).status_code == 404
        assert (await client.delete(f"{ROUTE}/{first['id']}", headers=other)).status_code == 404
        assert mock_behaviour.stats.calls == calls
        assert first["id"] in mock_behaviour.responses

        deleted = await client.delete(f"{ROUTE}/{first['id']}")
        assert deleted.status_code == 200 and deleted.json()["deleted"] is True
        assert first["id"] not in mock_behaviour.responses
        assert (await client.get(f"{ROUTE}/{first['id']}")).status_code == 404

        # An id the gateway never made (created upstream directly, or made up).
        made_up = await client.post(ROUTE, json={**follow, "previous_response_id": "resp_x"})
        assert made_up.status_code == 400
        assert made_up.json()["error"]["param"] == "previous_response_id"


async def test_reading_a_stored_response_counts_against_the_keys_request_quota(
    mock_server: MockServer, mock_behaviour: MockBehaviour, redis_url: str
) -> None:
    # Each read is an upstream call: past its rpm, a key reads no more.
    key, overrides = quota_key(requests=3)
    async with in_process(_gateway(mock_server, redis_url, **overrides), key) as client:
        made = await client.post(ROUTE, json={"model": "mock-gpt", "input": _input()})
        assert made.status_code == 200, made.text
        path = f"{ROUTE}/{made.json()['id']}"
        read = await client.get(path)
        assert read.status_code == 200, read.text
        assert read.headers["x-ratelimit-remaining-requests"] == "1"
        assert (await client.get(f"{path}/input_items")).status_code == 200
        calls = mock_behaviour.stats.calls
        refused = await client.get(path)
        assert refused.status_code == 429, refused.text
        assert refused.headers["x-ratelimit-remaining-requests"] == "0"
        assert mock_behaviour.stats.calls == calls


async def test_a_continuation_goes_only_to_the_upstream_that_holds_the_response(
    mock_server: MockServer, mock_behaviour: MockBehaviour, redis_url: str
) -> None:
    async with in_process(_gateway(mock_server, redis_url), LOCAL_KEY) as client:
        # The primary upstream is dead: the fallback makes and holds the response.
        made = await client.post(ROUTE, json={"model": "fallback-gpt", "input": _input()})
        assert made.status_code == 200, made.text
        assert made.headers["x-upstream"] == "mock" and made.headers["x-attempts"] == "2"

        follow = {
            "model": "fallback-gpt",
            "input": "more",
            "previous_response_id": made.json()["id"],
        }
        again = await client.post(ROUTE, json=follow)
        assert again.status_code == 200, again.text
        assert again.headers["x-upstream"] == "mock" and again.headers["x-attempts"] == "1"

        # A model served by another upstream cannot continue it.
        elsewhere = await client.post(ROUTE, json={**follow, "model": "b-gpt"})
        assert elsewhere.status_code == 400
        assert "held by an upstream" in elsewhere.json()["error"]["message"]


async def test_an_unstored_response_is_not_recorded(
    mock_server: MockServer, mock_behaviour: MockBehaviour, redis_url: str
) -> None:
    async with in_process(_gateway(mock_server, redis_url), LOCAL_KEY) as client:
        body = {"model": "mock-gpt", "input": _input(), "store": False}
        made = (await client.post(ROUTE, json=body)).json()
        assert (await client.get(f"{ROUTE}/{made['id']}")).status_code == 404


async def test_a_cut_stream_ends_with_an_error_event_and_is_billed_as_an_error(
    mock_server: MockServer, mock_behaviour: MockBehaviour, redis_url: str
) -> None:
    mock_behaviour.config.faults["*"] = Faults(cut_stream_after=2)
    async with in_process(_gateway(mock_server, redis_url), LOCAL_KEY) as client:
        body = {"model": "mock-gpt", "input": _input(), "stream": True}
        cut = await client.post(ROUTE, json=body)
        assert cut.status_code == 200
        events = _events(cut)
        kind, last = events[-1]
        assert kind == "error" and last["type"] == "error"
        assert last["sequence_number"] == events[-2][1]["sequence_number"] + 1
        assert not any(k == "response.completed" for k, _ in events)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "mock-gpt", "input": "x", "background": True}, "background"),
        ({"model": "mock-gpt", "input": 3}, "input"),
        ({"model": "mock-gpt", "input": ["not an item"]}, "input"),
        ({"model": "mock-gpt", "input": "x", "stream": "yes"}, "stream"),
        ({"model": "mock-gpt", "input": "x", "previous_response_id": "../admin"}, None),
        ({"model": "mock-embed", "input": "x"}, "model"),
        ({"model": "mock-gpt", "input": "x", "conversation": "conv_1"}, "conversation"),
        (
            {"model": "mock-gpt", "input": [{"type": "item_reference", "id": "msg_1"}]},
            "input",
        ),
        # The SDK's ItemReference may leave its type out: an id alone is a reference too.
        ({"model": "mock-gpt", "input": [{"id": "msg_1"}]}, "input"),
        ({"model": "mock-gpt", "input": [{"type": None, "id": "msg_1"}]}, "input"),
    ],
)
async def test_bad_requests_get_a_400_and_no_upstream_call(
    mock_server: MockServer,
    mock_behaviour: MockBehaviour,
    redis_url: str,
    body: dict[str, Any],
    param: str | None,
) -> None:
    async with in_process(_gateway(mock_server, redis_url), LOCAL_KEY) as client:
        refused = await client.post(ROUTE, json=body)
        assert refused.status_code == 400, refused.text
        error = refused.json()["error"]
        assert error["type"] == "invalid_request_error"
        if param is not None:
            assert error["param"] == param
        assert mock_behaviour.stats.calls == 0
        assert (
            await client.post(ROUTE, json={"model": "mock-gpt", "input": "ok"})
        ).status_code == 200


async def test_the_prompt_guard_checks_a_responses_input(
    mock_server: MockServer, mock_behaviour: MockBehaviour, redis_url: str
) -> None:
    guard = {"default": {"deny": ["(?i)secret plans"]}}
    gateway = _gateway(mock_server, redis_url, prompt_guard=guard)
    async with in_process(gateway, LOCAL_KEY) as client:
        as_text = await client.post(ROUTE, json={"model": "mock-gpt", "input": "the SECRET plans"})
        items = [{"role": "user", "content": [{"type": "input_text", "text": "secret plans"}]}]
        as_items = await client.post(ROUTE, json={"model": "mock-gpt", "input": items})
        for refused in (as_text, as_items):
            assert refused.status_code == 400
            assert refused.json()["error"]["code"] == "prompt_blocked"
            assert refused.json()["error"]["param"] == "input"
        assert mock_behaviour.stats.calls == 0


async def test_what_the_gateway_keeps_to_itself_and_what_it_passes_on(
    mock_server: MockServer, mock_behaviour: MockBehaviour, redis_url: str
) -> None:
    decorator = {"default": {"prepend": [{"role": "system", "content": "Be kind."}]}}
    gateway = _gateway(mock_server, redis_url, prompt_decorator=decorator)
    async with in_process(gateway, LOCAL_KEY) as client:
        body = {"model": "mock-gpt", "input": _input(), "cache": {"no-store": True}}
        made = await client.post(ROUTE, json=body)
        assert made.status_code == 200, made.text
        sent = orjson.loads(mock_behaviour.last_body)
        assert "cache" not in sent  # the gateway's own control, which OpenAI would refuse
        assert sent["input"] == [
            {"role": "system", "content": "Be kind."},
            {"role": "user", "content": body["input"]},
        ]
        response_id = made.json()["id"]
        items = await client.get(f"{ROUTE}/{response_id}/input_items", params={"limit": "1"})
        assert items.status_code == 200 and items.json()["object"] == "list"

        # The upstream lost it: a DELETE passes on its 404 and the gateway forgets it too.
        del mock_behaviour.responses[response_id]
        gone = await client.delete(f"{ROUTE}/{response_id}")
        assert gone.status_code == 404
        assert await gateway.responses.index.find(response_id) is None


async def test_a_response_on_an_upstream_no_longer_configured_is_not_found(
    mock_server: MockServer, mock_behaviour: MockBehaviour, redis_url: str
) -> None:
    async with in_process(_gateway(mock_server, redis_url), LOCAL_KEY) as client:
        made = (await client.post(ROUTE, json={"model": "b-gpt", "input": _input()})).json()
    trimmed = gateway_args(mock_server.base_url, redis_url)  # no mock-b upstream
    async with in_process(Gateway(trimmed), LOCAL_KEY) as client:
        for method in ("GET", "DELETE"):
            answer = await client.request(method, f"{ROUTE}/{made['id']}")
            assert answer.status_code == 404, answer.text
            assert answer.json()["error"]["code"] == "response_not_found"


def test_a_stored_responses_query_passes_on_pagination_and_includes_only() -> None:
    query = "limit=2&after=msg_1&include[]=file_search_call.results&stream=true&x=%2F.."
    assert passed_query(query) == ("?limit=2&after=msg_1&include%5B%5D=file_search_call.results")
    assert passed_query("stream=true") == ""


async def test_a_stateless_response_is_cached_and_replayed_and_a_stored_one_never(
    mock_server: MockServer, mock_behaviour: MockBehaviour, redis_url: str
) -> None:
    async with in_process(_gateway(mock_server, redis_url), LOCAL_KEY) as client:
        stored = {"model": "mock-gpt", "input": _input(), "temperature": 0}
        answers = [await client.post(ROUTE, json=stored) for _ in range(2)]
        assert [a.headers["x-cache"] for a in answers] == ["BYPASS", "BYPASS"]
        assert answers[0].json()["id"] != answers[1].json()["id"]  # each its own object

        stateless = {**stored, "input": _input(), "store": False, "stream": True}
        live = await client.post(ROUTE, json=stateless)
        assert live.headers["x-cache"] == "MISS"
        live_final = _events(live)[-1][1]["response"]
        replayed = await client.post(ROUTE, json=stateless)
        assert replayed.headers["x-cache"] == "HIT", replayed.text
        events = _events(replayed)
        kinds = [kind for kind, _ in events]
        assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
        final = events[-1][1]["response"]
        text = "".join(e["delta"] for k, e in events if k == "response.output_text.delta")
        assert text == final["output"][0]["content"][0]["text"]
        assert final["id"] == live_final["id"]  # the same answer, as the cache says
        assert final["usage"]["cost"] == "0"  # served from the cache: nothing spent
        whole = await client.post(ROUTE, json={**stateless, "stream": False})
        assert whole.headers["x-cache"] == "HIT" and whole.json()["id"] == final["id"]
        assert mock_behaviour.stats.calls == 3

        sampled = {**stateless, "stream": False, "temperature": 1, "input": _input()}
        assert [(await client.post(ROUTE, json=sampled)).headers["x-cache"] for _ in "ab"] == [
            "BYPASS",
            "BYPASS",
        ]
