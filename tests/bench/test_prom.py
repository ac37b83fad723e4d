import asyncio

import httpx

from bench.prom import DEFAULT_FILTERS, MetricsScraper, aggregate, parse_text

EXPOSITION = """\
# HELP ray_serve_deployment_replica_healthy Whether the replica is healthy.
# TYPE ray_serve_deployment_replica_healthy gauge
ray_serve_deployment_replica_healthy{application="gw",deployment="Ingress",replica="a"} 1.0
ray_serve_deployment_replica_healthy{application="gw",deployment="Ingress",replica="b"} 1.0
ray_serve_deployment_replica_healthy{application="gw",deployment="Embedder",replica="c"} 1.0
ray_serve_deployment_queued_queries{deployment="Ingress"} 3 1700000000000
ray_gateway_breaker_state{breaker="mock-gpt",replica="a"} 1
ray_gateway_breaker_state{breaker="mock-gpt",replica="b"} 1
ray_gateway_breaker_state{breaker="backup",replica="a"} 0
process_cpu_seconds_total 12.5
weird line without value
label_with_quote{msg="a \\"quoted\\" word"} 2
"""


def test_parse_text_reads_labels_values_and_skips_junk() -> None:
    samples = parse_text(EXPOSITION)
    assert len(samples) == 9
    assert samples[0].labels == {"application": "gw", "deployment": "Ingress", "replica": "a"}
    assert samples[3].value == 3.0  # the timestamp is not the value
    assert samples[-1].labels["msg"] == 'a "quoted" word'


def test_aggregate_sums_replicas_per_deployment_and_keeps_breaker_labels() -> None:
    agg = aggregate(parse_text(EXPOSITION), DEFAULT_FILTERS)
    assert agg["ray_serve_deployment_replica_healthy{deployment=Ingress}"] == 2.0
    assert agg["ray_serve_deployment_replica_healthy{deployment=Embedder}"] == 1.0
    assert agg["ray_serve_deployment_queued_queries{deployment=Ingress}"] == 3.0
    assert agg["ray_gateway_breaker_state{breaker=mock-gpt}"] == 1.0  # a state: max, not sum
    assert agg["ray_gateway_breaker_state{breaker=backup}"] == 0.0
    assert not any("process_cpu" in k for k in agg)


async def test_scraper_collects_series_from_every_url_and_notes_failures() -> None:
    replicas = iter([1, 3])

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "down":
            return httpx.Response(503)
        value = next(replicas)
        return httpx.Response(
            200, text=f'ray_serve_deployment_replica_healthy{{deployment="I"}} {value}\n'
        )

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        scraper = MetricsScraper(
            ["http://ray/metrics", "http://down/metrics"], client, interval_s=60
        )
        stop = asyncio.Event()
        stop.set()  # one scrape in the loop body is skipped; run() still scrapes once at the end
        await scraper.scrape_once()
        result = await scraper.run(stop)
    values = [v for _, v in result.series["ray_serve_deployment_replica_healthy{deployment=I}"]]
    assert values == [1.0, 3.0]
    assert "http://down/metrics" in result.errors
    assert result.scrapes == 2
