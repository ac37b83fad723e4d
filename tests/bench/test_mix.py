import random
from collections import Counter

import pytest
from pydantic import ValidationError

from bench.mix import MixConfig, RequestMix


def _draw(config: MixConfig, n: int = 4000, seed: int = 1) -> list:
    mix = RequestMix(config, random.Random(seed))
    return [mix.next() for _ in range(n)]


def test_rates_are_respected() -> None:
    specs = _draw(MixConfig(repeat_rate=0.5, paraphrase_rate=0.2, stream_rate=0.25))
    kinds = Counter(s.kind for s in specs)
    assert kinds["repeat"] / len(specs) == pytest.approx(0.5, abs=0.03)
    assert kinds["paraphrase"] / len(specs) == pytest.approx(0.2, abs=0.03)
    assert sum(s.stream for s in specs) / len(specs) == pytest.approx(0.25, abs=0.03)


def test_repeats_are_byte_identical_and_uniques_are_not() -> None:
    specs = _draw(MixConfig(repeat_rate=0.6, paraphrase_rate=0.0, stream_rate=0.0, hot_prompts=3))
    repeats = {s.body["messages"][0]["content"] for s in specs if s.kind == "repeat"}
    uniques = [s.body["messages"][0]["content"] for s in specs if s.kind == "unique"]
    assert len(repeats) == 3
    assert len(set(uniques)) == len(uniques)


def test_paraphrases_differ_from_the_hot_prompt_but_share_its_topic() -> None:
    specs = _draw(MixConfig(repeat_rate=0.5, paraphrase_rate=0.5, hot_prompts=1))
    hot = next(s for s in specs if s.kind == "repeat").body["messages"][0]["content"]
    paraphrases = {s.body["messages"][0]["content"] for s in specs if s.kind == "paraphrase"}
    assert hot not in paraphrases
    assert all("the water cycle" in p for p in paraphrases)
    assert len(paraphrases) > 1


def test_temperature_is_set_so_answers_are_cacheable_unless_omitted() -> None:
    assert _draw(MixConfig(), n=1)[0].body["temperature"] == 0.0
    assert "temperature" not in _draw(MixConfig(temperature=None), n=1)[0].body


def test_streaming_requests_ask_for_usage() -> None:
    spec = next(s for s in _draw(MixConfig(stream_rate=1.0), n=1))
    assert spec.body["stream"] is True
    assert spec.body["stream_options"] == {"include_usage": True}


def test_keys_models_and_end_users_are_spread() -> None:
    config = MixConfig(keys=["a", "b", "c"], models=["m1", "m2"], end_users=4)
    specs = _draw(config, n=600)
    assert {s.key for s in specs} == {"a", "b", "c"}
    assert {s.body["model"] for s in specs} == {"m1", "m2"}
    assert {s.body["user"] for s in specs} == {"user-0", "user-1", "user-2", "user-3"}


def test_prompt_lengths_follow_the_distribution() -> None:
    config = MixConfig(
        repeat_rate=0, paraphrase_rate=0, prompt_words_median=60, prompt_words_max=200
    )
    words = sorted(len(s.body["messages"][0]["content"].split()) for s in _draw(config, n=2000))
    assert words[len(words) // 2] == pytest.approx(60, rel=0.15)
    assert words[-1] <= 200 + 12  # the question itself comes on top of the padding
    assert words[0] < 40 < 90 < words[-1]


def test_same_seed_same_requests() -> None:
    assert _draw(MixConfig(), n=50, seed=7) == _draw(MixConfig(), n=50, seed=7)


def test_rates_above_one_are_rejected() -> None:
    with pytest.raises(ValidationError):
        MixConfig(repeat_rate=0.8, paraphrase_rate=0.3)


def test_responses_requests_send_the_same_prompts_unstored() -> None:
    chat = _draw(MixConfig(stream_rate=0.5), n=50)
    responses = _draw(MixConfig(stream_rate=0.5, api="responses"), n=50)
    for c, r in zip(chat, responses, strict=True):
        assert r.body["input"] == c.body["messages"][0]["content"]
        assert r.body["store"] is False and r.body["max_output_tokens"] == c.body["max_tokens"]
        assert r.stream == c.stream and "stream_options" not in r.body
