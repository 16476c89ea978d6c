"""The generation loop on the tiny model: sampling, budgets, stop strings, cancellation, bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edged.errors import InvalidRequest, ModelUnavailable, TooLong
from edged.llm import Engine, GenerationRequest, Message, SamplingParams


@pytest.fixture(scope="module")
def engine(tiny: Path) -> Engine:
    return Engine(tiny, threads=1)


def ask(prompt: str, **kwargs: object) -> GenerationRequest:
    return GenerationRequest(messages=(Message("user", prompt),), **kwargs)  # type: ignore[arg-type]


def test_same_seed_gives_the_same_text_and_another_seed_differs(engine: Engine) -> None:
    def sampled(seed: int) -> str:
        params = SamplingParams(temperature=1.0, top_p=0.95, seed=seed)
        return engine.complete(ask("Tell me about tomatoes", max_tokens=24, sampling=params)).text

    assert sampled(7) == sampled(7)
    assert len({sampled(s) for s in (1, 2, 3)}) > 1, "sampling must depend on the seed"


def test_top_k_1_equals_greedy(engine: Engine) -> None:
    greedy = engine.complete(ask("Water boils at", max_tokens=20))
    top1 = engine.complete(ask("Water boils at", max_tokens=20, sampling=SamplingParams(temperature=1.3, top_k=1)))
    assert top1.token_ids == greedy.token_ids
    assert len(greedy.token_ids) == 20


@pytest.mark.parametrize("max_tokens", [1, 5, 17])
def test_max_tokens_is_honoured_exactly(engine: Engine, max_tokens: int) -> None:
    result = engine.complete(ask("Count", max_tokens=max_tokens))
    assert result.usage.completion_tokens == len(result.token_ids) == max_tokens
    assert result.finish_reason == "length"


def test_stop_string_cuts_before_the_stop_text(engine: Engine) -> None:
    free = engine.complete(ask("Paris", max_tokens=30)).text
    # Stop on a piece from the middle of the free-running answer: the answer must end right before it.
    stop = free[10:13]
    assert stop.strip(), f"need a visible stop string from {free!r}"
    result = engine.complete(ask("Paris", max_tokens=30, stop=(stop,)))
    assert result.finish_reason == "stop"
    assert result.text == free[: free.index(stop)]
    assert stop not in result.text


def test_streamed_deltas_concatenate_to_the_final_text(engine: Engine) -> None:
    generation = engine.generate(ask("München 🍅", max_tokens=25, sampling=SamplingParams(temperature=1, seed=1)))
    deltas = list(generation)
    assert generation.result is not None
    assert "".join(deltas) == generation.result.text
    assert generation.result.timings.total_ms >= generation.result.timings.ttft_ms > 0


def test_cancellation_stops_within_one_token(engine: Engine) -> None:
    generation = engine.generate(ask("Tell me a long story", max_tokens=200))
    produced_at_cancel = None
    for _ in generation:
        if produced_at_cancel is None and len(generation.token_ids) >= 3:
            produced_at_cancel = len(generation.token_ids)
            generation.cancel()
    assert generation.result is not None
    assert generation.result.finish_reason == "cancelled"
    assert produced_at_cancel is not None
    assert generation.result.usage.completion_tokens <= produced_at_cancel + 1


def test_cancel_reason_becomes_the_finish_reason(engine: Engine) -> None:
    generation = engine.generate(ask("Hello", max_tokens=50))
    next(generation)
    generation.cancel("thermal")
    list(generation)
    assert generation.result is not None and generation.result.finish_reason == "thermal"


def test_expired_deadline_ends_before_any_token(engine: Engine) -> None:
    result = engine.complete(ask("Hello", max_tokens=50, deadline_s=0.0))
    assert result.finish_reason == "deadline"
    assert result.usage.completion_tokens == 0


def test_answer_is_clipped_to_the_context_left_after_the_prompt(tiny: Path) -> None:
    small = Engine(tiny, threads=1, context_tokens=40)
    prompt_tokens = len(small.prompt_ids(ask("Hi")))
    result = small.complete(ask("Hi", max_tokens=100))
    assert result.usage.completion_tokens == 40 - prompt_tokens
    assert result.finish_reason == "length"


@pytest.mark.parametrize(
    ("request_", "error", "words"),
    [
        (ask(""), InvalidRequest, "empty"),
        (ask("   \n"), InvalidRequest, "empty"),
        (GenerationRequest(messages=()), InvalidRequest, "no messages"),
        (
            GenerationRequest(messages=(Message("wizard", "hi"),)),
            InvalidRequest,
            "unknown chat role 'wizard'",
        ),
        (ask("bad \udcff bytes"), InvalidRequest, "not valid UTF-8"),
        (ask("hi", stop=("\udc80",)), InvalidRequest, "not valid UTF-8"),
        (ask("hi", max_tokens=0), InvalidRequest, "max_tokens"),
        (ask("hi", stop=tuple("abcdefghi")), InvalidRequest, "at most 8 stop strings"),
        (ask("word " * 400), TooLong, "context budget"),
    ],
)
def test_bad_input_gets_a_specific_error(
    engine: Engine, request_: GenerationRequest, error: type[Exception], words: str
) -> None:
    with pytest.raises(error, match=words):
        engine.generate(request_)


def test_missing_model_says_how_to_build_it(tmp_path: Path) -> None:
    with pytest.raises(ModelUnavailable, match="edged model build"):
        Engine(tmp_path / "nope")


@pytest.mark.parametrize("chunk_tokens", [1, 7, 64])
def test_chunked_prefill_gives_the_same_greedy_answer_as_one_pass(tiny: Path, chunk_tokens: int) -> None:
    """Prefill in chunks (for bounded memory) must not change a single token of a long prompt's answer."""
    request = ask("Tomatoes wilt in hot weather; water them early in the morning. " * 9, max_tokens=40)
    one_pass = Engine(tiny, threads=1, prefill_chunk_tokens=1000)
    chunked = Engine(tiny, threads=1, prefill_chunk_tokens=chunk_tokens)
    prompt_tokens = len(one_pass.prompt_ids(request))
    assert 150 < prompt_tokens < 256 - 40, "the prompt must span many chunks and fit the tiny context"
    expected = one_pass.complete(request)
    result = chunked.complete(request)
    assert len(expected.token_ids) == 40
    assert result.token_ids == expected.token_ids


def test_scoring_a_sequence_in_pieces_matches_one_pass(engine: Engine) -> None:
    """``forward`` on a cache that has to grow (as evaluation uses it) gives the one-pass logits."""
    ids = engine.tokenizer.encode("Water boils at 100 degrees Celsius. " * 4)
    whole = engine.session.forward(ids, engine.session.new_cache())
    cache = engine.session.new_cache(capacity=5)
    pieces = [engine.session.forward(ids[a:b], cache) for a, b in ((0, 5), (5, 6), (6, len(ids)))]
    np.testing.assert_allclose(np.concatenate(pieces), whole, atol=1e-4)
    assert cache.length == len(ids)


class _OnlyTheseTokens:
    """A logits hook allowing a fixed set of token ids, complete after ``length`` tokens."""

    def __init__(self, vocab: int, ids: list[int], length: int) -> None:
        self.mask = np.zeros(vocab, dtype=np.bool_)
        self.mask[ids] = True
        self.length = length
        self.seen: list[int] = []

    def allowed(self) -> np.ndarray:
        return self.mask

    def accept(self, token: int) -> None:
        self.seen.append(token)

    @property
    def complete(self) -> bool:
        return len(self.seen) >= self.length


def test_a_logits_hook_confines_every_token_and_ends_the_answer_when_complete(engine: Engine) -> None:
    vocab = engine.tokenizer.vocab_size
    ids = [engine.tokenizer.token_id(t) for t in ("a", "b", "c")]
    assert all(i is not None for i in ids)
    hooks: list[_OnlyTheseTokens] = []

    def hook() -> _OnlyTheseTokens:
        hooks.append(_OnlyTheseTokens(vocab, [i for i in ids if i is not None], 7))
        return hooks[-1]

    for sampling in (SamplingParams(), SamplingParams(temperature=1.5, seed=3)):
        result = engine.complete(ask("Tell me a long story", max_tokens=50, sampling=sampling, logits_hook=hook))
        assert result.finish_reason == "stop"
        assert len(result.token_ids) == 7
        assert set(result.token_ids) <= set(ids)
        assert list(result.token_ids) == hooks[-1].seen
    assert len(hooks) == 2  # one fresh hook per sequence


def test_a_broken_tokenizer_or_model_is_refused_whichever_fails(tiny: Path, tmp_path: Path) -> None:
    """The tokenizer loads beside the session: a broken tokenizer, a broken model, or both, are each
    refused with model_unavailable naming what failed (the session's error first)."""
    for broken in ("tokenizer.json", "model.onnx", "both"):
        model_dir = tmp_path / broken
        model_dir.mkdir()
        for f in tiny.iterdir():
            if f.is_file():
                (model_dir / f.name).write_bytes(f.read_bytes())
        for name in ("tokenizer.json", "model.onnx") if broken == "both" else (broken,):
            (model_dir / name).write_text("{}")
        with pytest.raises(ModelUnavailable) as refused:
            Engine(model_dir)
        expected = "onnxruntime cannot load" if broken != "tokenizer.json" else "cannot read the tokenizer"
        assert expected in str(refused.value), (broken, refused.value)
