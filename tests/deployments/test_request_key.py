"""The request key is canonical: same answer-determining request -> same key."""

from __future__ import annotations

import subprocess
import sys
import unicodedata
from pathlib import Path
from typing import Any

import pytest

from deployments.request_key import canonical, canonical_json, request_key

BASE: dict[str, Any] = {
    "model": "gpt-4o-mini",
    "messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Convert 30 C to F"},
    ],
    "temperature": 0,
}


def key(body: dict[str, Any], namespace: str = "t/acme") -> str:
    return request_key(body, namespace=namespace).digest


def test_dict_ordering_does_not_matter() -> None:
    reordered = {"temperature": 0, "messages": BASE["messages"], "model": "gpt-4o-mini"}
    nested = {
        **BASE,
        "response_format": {"type": "json_schema", "json_schema": {"name": "a", "strict": True}},
    }
    nested_reordered = {
        **BASE,
        "response_format": {"json_schema": {"strict": True, "name": "a"}, "type": "json_schema"},
    }
    assert key(BASE) == key(reordered)
    assert key(nested) == key(nested_reordered)


def test_unicode_is_nfc_normalised() -> None:
    composed = unicodedata.normalize("NFC", "Qu'est-ce qu'un café ?")
    decomposed = unicodedata.normalize("NFD", composed)
    assert composed != decomposed
    a = {**BASE, "messages": [{"role": "user", "content": composed}]}
    b = {**BASE, "messages": [{"role": "user", "content": decomposed}]}
    assert key(a) == key(b)


def test_integral_floats_equal_ints() -> None:
    assert key({**BASE, "temperature": 0.0}) == key({**BASE, "temperature": 0})
    assert key({**BASE, "max_tokens": 100.0}) == key({**BASE, "max_tokens": 100})
    assert key({**BASE, "temperature": 0.7}) != key({**BASE, "temperature": 0.70001})


def test_transport_fields_are_ignored() -> None:
    noisy = {
        **BASE,
        "stream": True,
        "stream_options": {"include_usage": True},
        "user": "alice",
        "cache": {"no-store": True},
        "timeout": 30,
    }
    assert key(noisy) == key(BASE)


@pytest.mark.parametrize(
    "change",
    [
        {"model": "gpt-4o"},
        {"temperature": 0.5},
        {"top_p": 0.9},
        {"max_tokens": 10},
        {"seed": 7},
        {"stop": ["\n"]},
        {"n": 2},
        {"presence_penalty": 0.5},
        {"frequency_penalty": 0.5},
        {"logit_bias": {"50256": -100}},
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
        {"tool_choice": "required"},
        {"response_format": {"type": "json_object"}},
        {"messages": [{"role": "user", "content": "Convert 30 F to C"}]},
        {"some_future_param": 1},  # unknown fields might change the answer: kept
    ],
)
def test_answer_fields_change_the_key(change: dict[str, Any]) -> None:
    assert key({**BASE, **change}) != key(BASE)


def test_neutral_values_equal_absence() -> None:
    neutral = {**BASE, "n": 1, "top_p": 1.0, "presence_penalty": 0, "stop": [], "tools": None}
    assert key(neutral) == key(BASE)
    assert key({**BASE, "temperature": 1}) != key(
        {k: v for k, v in BASE.items() if k != "temperature"}
    )


def test_single_text_part_equals_string_content() -> None:
    parts = {
        **BASE,
        "messages": [
            BASE["messages"][0],
            {"role": "user", "content": [{"type": "text", "text": "Convert 30 C to F"}]},
        ],
    }
    assert key(parts) == key(BASE)


def test_namespaces_never_collide() -> None:
    assert key(BASE, "t/acme") != key(BASE, "t/globex")
    assert key(BASE, "t/acme") != key(BASE, "s/acme")


def test_resolved_model_overrides_alias() -> None:
    aliased = {**BASE, "model": "fast"}
    assert request_key(aliased, namespace="t/a", model="gpt-4o-mini").digest == key(BASE, "t/a")


def test_semantic_scope_ignores_only_final_user_text() -> None:
    a = request_key(BASE, namespace="t/acme")
    other_question = {**BASE, "messages": [BASE["messages"][0], {"role": "user", "content": "Hi"}]}
    b = request_key(other_question, namespace="t/acme")
    assert a.scope == b.scope and a.digest != b.digest
    assert (a.final_user_text, b.final_user_text) == ("Convert 30 C to F", "Hi")
    other_system = {
        **BASE,
        "messages": [{"role": "system", "content": "Be verbose."}, BASE["messages"][1]],
    }
    assert request_key(other_system, namespace="t/acme").scope != a.scope
    assert request_key({**BASE, "temperature": 0.2}, namespace="t/acme").scope != a.scope
    assert request_key(BASE, namespace="t/globex").scope != a.scope


def test_no_semantic_text_when_last_message_is_not_user_text() -> None:
    tool_turn = {**BASE, "messages": [*BASE["messages"], {"role": "tool", "content": "42"}]}
    rk = request_key(tool_turn, namespace="t/a")
    assert rk.final_user_text is None and not rk.semantic_eligible


def test_key_is_stable_across_processes() -> None:
    """Another interpreter (another hash seed) computes the same digest."""
    code = (
        "from deployments.request_key import request_key;"
        "import json,sys;"
        "print(request_key(json.loads(sys.argv[1]), namespace='t/acme').digest)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, canonical_json(BASE).decode()],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "12345", "PATH": ""},
        cwd=str(Path(__file__).resolve().parents[2]),
    )
    assert out.stdout.strip() == key(BASE)


def test_the_memo_gives_the_key_request_key_gives() -> None:
    import orjson

    from deployments.request_key import RequestKeys

    keys = RequestKeys(entries=2)
    bodies = [
        {"model": "m", "messages": [{"role": "user", "content": f"q{i}"}], "temperature": 0}
        for i in range(3)
    ]
    raws = [orjson.dumps(b) for b in bodies]
    for _ in range(2):  # the second round is served by the memo (or re-derived once evicted)
        for body, raw in zip(bodies, raws, strict=True):
            for namespace, model in (("t/a", None), ("t/b", None), ("t/a", "alias-of-m")):
                got = keys.key(body, raw, namespace=namespace, model=model)
                assert got == request_key(body, namespace=namespace, model=model)
    assert len(keys._memo) == 2  # bounded
    big = {"model": "m", "messages": [{"role": "user", "content": "x" * 10_000}]}
    assert keys.key(big, orjson.dumps(big), namespace="t/a") == request_key(big, namespace="t/a")
    assert all(len(key[-1]) < 10_000 for key in keys._memo)  # big bodies are not kept


def test_one_body_sent_to_two_routes_has_two_keys() -> None:
    """A body with both ``messages`` and ``prompt`` asks chat one question and
    ``/v1/completions`` another: their answers must never share an entry, even
    when the memo has seen the same bytes on the other route."""
    import orjson

    from deployments.request_key import RequestKeys

    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "prompt": "hi"}
    chat = request_key(body, namespace="t/a")
    text = request_key(body, namespace="t/a", route="completions")
    assert chat.digest != text.digest
    assert chat.digest == request_key(body, namespace="t/a", route="chat").digest
    assert text.final_user_text is None  # the semantic tier compares chat messages only
    keys, raw = RequestKeys(), orjson.dumps(body)
    assert keys.key(body, raw, namespace="t/a") == chat
    assert keys.key(body, raw, namespace="t/a", route="completions") == text


def test_chat_keys_do_not_change_with_routes() -> None:
    """Chat entries stored before routes entered the key are still found: a chat
    key is the digest of the envelope without a route."""
    import hashlib

    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0}
    envelope = {"v": "v1", "ns": "t/a", "req": body}
    expected = hashlib.sha256(canonical_json(envelope)).hexdigest()
    assert request_key(body, namespace="t/a", route="chat").digest == expected
    assert request_key(body, namespace="t/a", route="embeddings").digest != expected


def test_a_whole_float_past_64_bits_stays_a_float() -> None:
    """1e20 folded to an int could not be written as JSON (orjson stops at 64 bits): a
    cacheable request carrying one failed with a 500."""
    big = {**BASE, "seed": 1e20}
    assert key(big) != key({**BASE, "seed": 1e19})
    assert (
        canonical(1e20) == 1e20
        and canonical(2.0**63) == 2**63
        and canonical(-(2.0**63)) == -(2**63)
    )


def test_a_responses_user_metadata_and_store_are_part_of_its_answer() -> None:
    """A Responses API answer repeats them: two requests differing only there ask for
    two answers (chat's answer does not, so there they are transport)."""
    base = {"model": "m", "input": "hi", "store": False}
    for change in ({"user": "ann"}, {"metadata": {"app": "x"}}, {"store": True}):
        for route, differs in (("responses", True), ("chat", False)):
            one = request_key(base, namespace="t", route=route).digest
            two = request_key({**base, **change}, namespace="t", route=route).digest
            assert (one != two) is differs, (change, route)
    streamed = {**base, "stream": True}
    assert request_key(streamed, namespace="t", route="responses") == request_key(
        base, namespace="t", route="responses"
    )


@pytest.mark.parametrize("route", ["completions", "embeddings", "rerank", "moderations"])
def test_another_routes_messages_field_is_keyed_as_sent(route: str) -> None:
    """Only chat validates ``messages``; elsewhere it is any JSON the client sent, a
    field like the rest (it was iterated: 1 was a TypeError, "ab" keyed as ["a", "b"])."""
    keys = {
        repr(value): request_key(
            {"model": "m", "input": "x", "messages": value}, namespace="t/a", route=route
        )
        for value in (1, True, 1.5, "ab", ["a", "b"], {"a": 1}, None, [])
    }
    digests = {k: key.digest for k, key in keys.items()}
    assert digests["None"] == digests["[]"]  # absent, as before
    assert len(set(digests.values())) == len(digests) - 1
