"""Semantic lookup latency at 10k and 100k entries, query embedding included.

    python -m bench.semantic_bench [--sizes 10000 100000] [--queries 300]

All entries sit in ONE scope (the worst case: every single-turn request to one
model with one system prompt shares a scope). Stored vectors are real MiniLM
embeddings of synthetic questions; past a few thousand they are perturbed copies
(the search cost does not depend on the content, and embedding 100k texts would
take minutes). Each timed call is ``SemanticCache.check``: embed, search, guard,
read the body. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time

import numpy as np

from deployments.embedder import EmbedderSettings, OnnxEmbedder
from deployments.semantic_cache import SemanticCache, SemanticCacheSettings
from deployments.semantic_index import SemanticEntry, entry_id
from deployments.semantic_store import MemorySemanticStore

_VERBS = "convert explain compare install debug optimise translate summarise sort deploy".split()
_THINGS = (
    "a Python dict|a CSV file|Fahrenheit to Celsius|a React app|a SQL query|a Docker image|"
    "a binary tree|an HTTP request|a Kubernetes pod|a regular expression|a git branch|a JSON"
    " schema|a Rust struct|a PDF report|an S3 bucket"
).split("|")
_ASKS = ("How do I {v} {t}?", "What is the best way to {v} {t}?", "Can you {v} {t} for me?")
_REAL = 3_000


def synthetic_texts(n: int, rng: random.Random) -> list[str]:
    texts = []
    for k in range(n):
        ask = rng.choice(_ASKS).format(v=rng.choice(_VERBS), t=rng.choice(_THINGS))
        texts.append(f"{ask} (case {k} in {rng.choice(['prod', 'dev', 'ci'])})")
    return texts


async def fill(
    store: MemorySemanticStore, model: OnnxEmbedder, texts: list[str], seed: int
) -> None:
    real = np.concatenate([model.encode(texts[i : i + 64]) for i in range(0, _REAL, 64)])
    rng = np.random.default_rng(seed)
    for k, text in enumerate(texts):
        vec = real[k % _REAL]
        if k >= _REAL:
            vec = vec + rng.normal(scale=0.05, size=vec.shape).astype(np.float32)
            vec = vec / np.linalg.norm(vec)
        entry = SemanticEntry(entry_id("t", "s", text), "t", "s", text, vec, time.time(), None)
        await store.put(entry, b'{"answer": 1}')


async def measure(size: int, queries: int, model: OnnxEmbedder) -> dict[str, float]:
    rng = random.Random(size)
    texts = synthetic_texts(size, rng)
    store = MemorySemanticStore()
    await fill(store, model, texts, seed=size)
    cache = SemanticCache(SemanticCacheSettings(ttl_s=None), model, store)
    await cache.start()
    asks = [t.replace("How do I", "How can I") for t in rng.sample(texts[:_REAL], queries // 2)]
    asks += synthetic_texts(queries - len(asks), rng)  # mostly misses
    timings = []
    for text in asks:
        start = time.perf_counter()
        await cache.check("s", text, "t")
        timings.append((time.perf_counter() - start) * 1000)
    await cache.stop()
    stats = cache.stats()
    return {
        "entries": size,
        "p50_ms": round(float(np.percentile(timings, 50)), 2),
        "p99_ms": round(float(np.percentile(timings, 99)), 2),
        "hits": stats.hits,
        "lookups": stats.lookups,
    }


async def main(sizes: list[int], queries: int) -> list[dict[str, float]]:
    model = OnnxEmbedder(EmbedderSettings(threads=1))
    results = []
    for size in sizes:
        result = await measure(size, queries, model)
        print(f"{size:>7} entries: p50 {result['p50_ms']} ms, p99 {result['p99_ms']} ms")
        results.append(result)
    print(json.dumps({"semantic_lookup": results}))
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--queries", type=int, default=300)
    args = parser.parse_args()
    asyncio.run(main(args.sizes, args.queries))
