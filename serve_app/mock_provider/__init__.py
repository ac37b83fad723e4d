"""An OpenAI-compatible mock upstream: deterministic answers, latency, faults."""

from serve_app.mock_provider.answers import MockProvider
from serve_app.mock_provider.app import create_app
from serve_app.mock_provider.behaviour import Faults, Latency, MockBehaviour, MockConfig

__all__ = ["Faults", "Latency", "MockBehaviour", "MockConfig", "MockProvider", "create_app"]
