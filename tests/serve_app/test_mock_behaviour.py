from __future__ import annotations

from serve_app.mock_provider import Faults, MockBehaviour, MockConfig


def test_answers_are_deterministic_and_bounded_by_max_tokens() -> None:
    body = {"messages": [{"role": "user", "content": "hi"}]}
    assert MockBehaviour().answer_words(body) == MockBehaviour().answer_words(body)
    assert len(MockBehaviour().answer_words({**body, "max_tokens": 2})) == 2
    other = {"messages": [{"role": "user", "content": "something else entirely"}]}
    assert MockBehaviour().answer_words(other) != MockBehaviour().answer_words(body)


def test_faults_apply_per_model_with_a_wildcard() -> None:
    mock = MockBehaviour(
        MockConfig(faults={"*": Faults(error_rate=1.0), "healthy": Faults(error_rate=0.0)})
    )
    assert mock.decide("any") == "error"
    assert mock.decide("healthy") == "ok"


def test_reset_clears_stats_and_faults() -> None:
    mock = MockBehaviour(MockConfig(faults={"*": Faults(hang_s=5)}))
    mock.record("/v1/chat/completions", "m", b"{}")
    mock.reset()
    assert mock.stats.calls == 0
    assert mock.delay_s("m") == 0
