"""Scrapes Prometheus text-format endpoints during a run into report time series.

Point it at the gateway's ``/metrics`` and at Ray's metrics export port (each
Ray node serves ``http://<node>:<metrics_export_port>/metrics``). Only families
whose name contains one of ``DEFAULT_FILTERS`` are kept; samples are summed per
metric and per ``deployment`` label (replica counts add up across replicas and
nodes that way), except ``*_state`` gauges, where every replica reports the same
shared state and the maximum is kept.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import httpx

DEFAULT_FILTERS = (
    "ray_serve_deployment_replica_healthy",
    "ray_serve_deployment_queued_queries",
    "ray_serve_num_ongoing_requests",
    "gateway_breaker_state",  # 0 closed, 1 open, 2 half-open (scraped as ray_gateway_...)
    "gateway_breaker_refused_total",
)

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)(\s+\d+)?\s*$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True, slots=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float


def parse_text(text: str) -> list[Sample]:
    """Parses the Prometheus text exposition format (comments and bad lines skipped)."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if match is None:
            continue
        try:
            value = float(match.group(4))
        except ValueError:
            continue
        labels = {k: v.replace('\\"', '"') for k, v in _LABEL.findall(match.group(3) or "")}
        out.append(Sample(match.group(1), labels, value))
    return out


def series_key(sample: Sample) -> str:
    """``name`` or ``name{deployment=X}``; other labels are summed over.

    A breaker state gauge keeps its own identifying labels (provider/upstream/state) so
    several breakers stay distinguishable.
    """
    keep = ["deployment"]
    if "breaker" in sample.name:
        keep += ["breaker", "to_state"]
    labels = ",".join(f"{k}={sample.labels[k]}" for k in keep if k in sample.labels)
    return f"{sample.name}{{{labels}}}" if labels else sample.name


def _is_state(name: str) -> bool:
    # Every replica reports the same shared state: a max, where counts (replicas) add up.
    return name.endswith("_state")


def _merge(into: dict[str, float], key: str, value: float) -> None:
    old = into.get(key)
    if old is None:
        into[key] = value
    else:
        into[key] = max(old, value) if _is_state(key.split("{", 1)[0]) else old + value


def aggregate(samples: Sequence[Sample], filters: Sequence[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for sample in samples:
        if any(f in sample.name for f in filters):
            _merge(out, series_key(sample), sample.value)
    return out


@dataclass
class Scrape:
    """Time series gathered by ``MetricsScraper``: key -> [(epoch t, value)]."""

    series: dict[str, list[tuple[float, float]]] = field(default_factory=lambda: defaultdict(list))
    errors: dict[str, str] = field(default_factory=dict)  # url -> last error
    scrapes: int = 0


class MetricsScraper:
    def __init__(
        self,
        urls: Sequence[str],
        client: httpx.AsyncClient,
        interval_s: float = 2.0,
        filters: Sequence[str] = DEFAULT_FILTERS,
    ) -> None:
        self.urls = list(urls)
        self.interval_s = interval_s
        self.filters = tuple(filters)
        self.result = Scrape()
        self._client = client

    async def scrape_once(self) -> None:
        now = time.time()
        texts = await asyncio.gather(*(self._get(u) for u in self.urls))
        merged: dict[str, float] = {}
        for text in texts:
            if text is not None:
                for key, value in aggregate(parse_text(text), self.filters).items():
                    _merge(merged, key, value)
        for key, value in merged.items():
            self.result.series[key].append((now, value))
        self.result.scrapes += 1

    async def _get(self, url: str) -> str | None:
        try:
            response = await self._client.get(url, timeout=self.interval_s)
            response.raise_for_status()
        except httpx.HTTPError as exc:
            self.result.errors[url] = f"{type(exc).__name__}: {exc}"
            return None
        return response.text

    async def run(self, stop: asyncio.Event) -> Scrape:
        """Scrapes every ``interval_s`` until ``stop`` is set (and once more after)."""
        while not stop.is_set():
            await self.scrape_once()
            try:
                await asyncio.wait_for(stop.wait(), self.interval_s)
            except TimeoutError:
                pass
        await self.scrape_once()
        return self.result
