"""``python -m serve_app.mock_provider --port 9100``: the mock provider standalone."""

from __future__ import annotations

import argparse
import contextlib

from serve_app.mock_provider.answers import MockProvider
from serve_app.mock_provider.behaviour import Latency, MockBehaviour, MockConfig
from serve_app.mock_provider.server import run


def main() -> None:
    parser = argparse.ArgumentParser(description="OpenAI-compatible mock provider")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--jitter-ms", type=float, default=0.0)
    parser.add_argument("--per-token-ms", type=float, default=0.0)
    args = parser.parse_args()
    latency = Latency(
        fixed_ms=args.latency_ms, jitter_ms=args.jitter_ms, per_token_ms=args.per_token_ms
    )
    provider = MockProvider(MockBehaviour(MockConfig(latency=latency)))
    with contextlib.suppress(KeyboardInterrupt):
        run(provider, args.host, args.port)


if __name__ == "__main__":
    main()
