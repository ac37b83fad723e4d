"""Precision and recall of the semantic cache on labelled question pairs.

    python -m bench.cache_eval PAIRS.jsonl [--threshold T]

Each line is ``{"a", "b", "same"}``. Through the gateway's own ``SemanticCache``
(embedder, index, near-miss guard), each ``a`` is stored in a scope of its own
and each ``b`` is looked up there; a hit is right when ``same``. The baseline is
the same cache with the guard off (plain cosine), at the threshold giving the
same recall. ``--threshold`` is a cosine distance, as in the gateway settings.
The last line printed is one JSON object; the curve over thresholds precedes it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

import numpy as np

from deployments.embedder import EmbedderSettings, OnnxEmbedder
from deployments.near_miss_guard import GuardSettings
from deployments.semantic_cache import SemanticCache, SemanticCacheSettings
from deployments.semantic_store import MemorySemanticStore

CURVE = (0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.10, 0.12, 0.15, 0.20)


class MemoEmbedder:
    """Embeds every text once, batched, and serves both caches from the memo."""

    def __init__(self, model: OnnxEmbedder, texts: list[str]) -> None:
        self.dim = model.dim
        self.covers = model.covers
        unique = sorted(set(texts))
        rows = [model.encode(unique[i : i + 64]) for i in range(0, len(unique), 64)]
        self._memo = dict(zip(unique, np.concatenate(rows), strict=True))

    async def embed(self, texts: list[str]) -> np.ndarray:
        return np.stack([self._memo[t] for t in texts])


async def similarities(pairs: list[dict], embedder: MemoEmbedder, guard: bool) -> np.ndarray:
    """For each pair, the similarity at which ``b`` hits ``a`` (-1: never, the guard said no)."""
    settings = SemanticCacheSettings(
        distance_threshold=1.0, ttl_s=None, guard=GuardSettings(enabled=guard)
    )
    cache = SemanticCache(settings, embedder=embedder, store=MemorySemanticStore())
    out = np.full(len(pairs), -1.0)
    for k, pair in enumerate(pairs):
        await cache.store(f"pair-{k}", pair["a"], "eval", b"answer")
        hit = await cache.check(f"pair-{k}", pair["b"], "eval")
        if hit is not None:
            out[k] = hit.similarity
    return out


def precision_recall(sims: np.ndarray, same: np.ndarray, threshold: float) -> tuple[float, float]:
    hits = sims >= 1.0 - threshold - 1e-9
    right = int((hits & same).sum())
    precision = right / int(hits.sum()) if hits.any() else 1.0
    return precision, right / max(int(same.sum()), 1)


def precision_at_recall(sims: np.ndarray, same: np.ndarray, recall: float) -> float:
    order = np.argsort(-sims)
    right = np.cumsum(same[order])
    reached = np.nonzero(right >= recall * same.sum())[0]
    if len(reached) == 0:
        return 0.0
    k = int(reached[0])
    return float(right[k] / (k + 1))


async def main(pairs: list[dict], threshold: float) -> dict[str, float]:
    same = np.array([bool(p["same"]) for p in pairs])
    model = OnnxEmbedder(EmbedderSettings(threads=2))
    embedder = MemoEmbedder(model, [t for p in pairs for t in (p["a"], p["b"])])
    guarded = await similarities(pairs, embedder, guard=True)
    plain = await similarities(pairs, embedder, guard=False)
    print("distance  precision  recall  cosine-precision  cosine-recall")
    for t in CURVE:
        p, r = precision_recall(guarded, same, t)
        p0, r0 = precision_recall(plain, same, t)
        print(f"{t:8.2f}  {p:9.3f}  {r:6.3f}  {p0:16.3f}  {r0:13.3f}")
    precision, recall = precision_recall(guarded, same, threshold)
    result = {
        "pairs": len(pairs),
        "precision": round(precision, 4),
        "recall": round(recall, 4),
        "threshold": threshold,
        "baseline_precision": round(precision_at_recall(plain, same, recall), 4),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pairs", type=Path)
    parser.add_argument(
        "--threshold", type=float, default=SemanticCacheSettings().distance_threshold
    )
    args = parser.parse_args()
    lines = args.pairs.read_text().splitlines()
    asyncio.run(main([json.loads(line) for line in lines if line.strip()], args.threshold))
