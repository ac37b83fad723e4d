from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
from aiohttp import web

from deployments.embedder import (
    ChecksumError,
    EmbedderSettings,
    HttpEmbedder,
    OnnxEmbedder,
    _default_model_path,
    _default_tokenizer_path,
)
from serve_app.errors import ServiceUnavailableError


@pytest.fixture(scope="module")
def onnx() -> OnnxEmbedder:
    return OnnxEmbedder(EmbedderSettings())


async def test_vectors_are_unit_length_and_deterministic(onnx: OnnxEmbedder) -> None:
    texts = ["How do I convert Fahrenheit to Celsius?", "Ünïcödé text, 日本語 too"]
    first = await onnx.embed(texts)
    again = await onnx.embed(texts)
    assert first.shape == (2, 384) and first.dtype == np.float32
    np.testing.assert_array_equal(first, again)
    np.testing.assert_allclose(np.linalg.norm(first, axis=1), 1.0, atol=1e-5)


async def test_batching_and_padding_do_not_change_a_vector(onnx: OnnxEmbedder) -> None:
    short = "What is Python?"
    alone = (await onnx.embed([short]))[0]
    padded = (await onnx.embed([short, "a much longer sentence " * 10]))[0]
    np.testing.assert_allclose(alone, padded, atol=1e-4)


async def test_meaning_drives_similarity(onnx: OnnxEmbedder) -> None:
    a, b, c = await onnx.embed(
        ["How can I learn to cook pasta?", "What is the way to learn cooking pasta?", "Tax law"]
    )
    assert float(a @ b) > 0.8 > float(a @ c)


def test_a_tampered_tokenizer_is_refused(tmp_path: Path) -> None:
    tok = tmp_path / "tokenizer.json"
    shutil.copy(_default_tokenizer_path(), tok)
    with tok.open("a") as f:
        f.write(" ")
    with pytest.raises(ChecksumError):
        OnnxEmbedder(EmbedderSettings(tokenizer_path=str(tok)))


def test_a_model_other_than_the_pinned_one_is_refused(tmp_path: Path) -> None:
    model = tmp_path / "model.onnx"
    shutil.copy(_default_model_path(), model)
    OnnxEmbedder(EmbedderSettings(model_path=str(model)))  # same bytes elsewhere: fine
    with pytest.raises(ChecksumError):
        OnnxEmbedder(EmbedderSettings(model_path=str(model), model_sha256="0" * 64))


@pytest.fixture
async def embeddings_server() -> AsyncIterator[tuple[str, list[dict]]]:
    seen: list[dict] = []

    async def handler(request: web.Request) -> web.Response:
        body = await request.json()
        seen.append({"body": body, "auth": request.headers.get("authorization")})
        if body["input"] == ["fail"]:
            return web.json_response({"error": {"message": "no"}}, status=500)
        # Out of order on purpose: the client must sort by index.
        data = [
            {"index": i, "embedding": [float(len(t)), 0.0, 3.0]}
            for i, t in enumerate(body["input"])
        ]
        return web.json_response({"data": data[::-1]})

    app = web.Application()
    app.router.add_post("/v1/embeddings", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}/v1", seen
    await runner.cleanup()


async def test_http_embedder_normalises_in_input_order(
    embeddings_server: tuple[str, list[dict]], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, seen = embeddings_server
    monkeypatch.setenv("EMB_KEY", "sk-test")
    emb = HttpEmbedder(
        EmbedderSettings(kind="http", base_url=url, model="m", api_key_env="EMB_KEY", dim=3)
    )
    rows = await emb.embed(["abcd", "a"])
    await emb.aclose()
    np.testing.assert_allclose(rows[0], [0.8, 0.0, 0.6], atol=1e-6)
    np.testing.assert_allclose(rows[1], np.array([1.0, 0.0, 3.0]) / np.sqrt(10), atol=1e-6)
    assert seen[0]["body"] == {"model": "m", "input": ["abcd", "a"]}
    assert seen[0]["auth"] == "Bearer sk-test"


async def test_http_embedder_failure_is_a_gateway_error(
    embeddings_server: tuple[str, list[dict]],
) -> None:
    url, _ = embeddings_server
    emb = HttpEmbedder(EmbedderSettings(kind="http", base_url=url, dim=3))
    with pytest.raises(ServiceUnavailableError):
        await emb.embed(["fail"])
    await emb.aclose()
