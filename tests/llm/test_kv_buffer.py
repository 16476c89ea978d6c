"""The shared KV buffer of edged's own graph: written in place, never past the sequence, never past the context."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edged.build import build_model
from edged.llm import Engine, GenerationRequest, Message
from edged.llm.session import Cache, DecoderSession, KVBuffer, Logits
from edged.store import Recipe


@pytest.fixture(scope="module")
def tiny_gqa(tiny_models: dict[str, Path]) -> Path:
    models_dir = tiny_models["int4"].parent
    recipe = Recipe.load(models_dir / "tiny.toml")
    return build_model(recipe, "int4", models_dir, models_dir.parent / "cache", lambda _: None, graph="gqa")


class _Watched(DecoderSession):
    """The real session, which fills every new buffer with NaN and remembers it, so a test can see which
    positions the graph wrote."""

    buffers: list[KVBuffer]

    def new_cache(self, capacity: int = 0, slots: int = 1) -> Cache:
        cache = super().new_cache(capacity, slots)
        assert isinstance(cache, KVBuffer)
        cache.tensors[...] = np.nan
        self.buffers.append(cache)
        return cache

    def step(self, token_id: int, cache: Cache) -> Logits:
        assert isinstance(cache, KVBuffer)
        written = np.isfinite(cache.tensors).all(axis=(0, 1, 2, 4))
        assert written[: cache.length].all() and not written[cache.length :].any(), "written past the sequence"
        return super().step(token_id, cache)


def _watched_engine(model_dir: Path, context_tokens: int) -> tuple[Engine, _Watched]:
    engine = Engine(model_dir, threads=1, context_tokens=context_tokens, prefill_chunk_tokens=5)
    session = _Watched(model_dir / "model.onnx", threads=1)
    session.buffers = []
    engine.session = session
    return engine, session


def test_a_sequence_reaching_the_buffers_end_finishes_with_length(tiny_gqa: Path) -> None:
    """The buffer is sized from context_tokens; the answer stops where the context ends, the last position
    written is the buffer's last, and nothing lands past the sequence at any step."""
    context = 48
    engine, session = _watched_engine(tiny_gqa, context)
    result = engine.complete(GenerationRequest(messages=(Message("user", "Tomatoes"),), max_tokens=500))
    assert result.finish_reason == "length"
    assert result.usage.prompt_tokens + result.usage.completion_tokens == context
    (buffer,) = session.buffers
    assert buffer.capacity == context, "one allocation for the whole request, never grown"
    assert buffer.length == context - 1, "the last chosen token is not fed back"
    written = np.isfinite(buffer.tensors).all(axis=(0, 1, 2, 4))
    assert written[: context - 1].all() and not written[context - 1 :].any()


def test_a_buffer_grows_by_copying_when_a_caller_gives_no_capacity(tiny_gqa: Path) -> None:
    """forward(ids, new_cache()) works on both graphs: the buffer grows, keeping what it held."""
    session = DecoderSession(tiny_gqa / "model.onnx", threads=1)
    ids = list(range(3, 40))
    whole = session.forward(ids, session.new_cache())
    cache = session.new_cache(10)
    first = session.forward(ids[:10], cache)
    rest = session.forward(ids[10:], cache)
    assert cache.length == len(ids) and cache.capacity == len(ids)
    np.testing.assert_allclose(np.concatenate([first, rest]), whole, rtol=0, atol=1e-4 * np.abs(whole).max())


def test_a_cache_belongs_to_its_kind_of_graph(tiny_models: dict[str, Path], tiny_gqa: Path) -> None:
    """A KVBuffer handed to an optimum graph (or the reverse) is refused before onnxruntime reads it."""
    optimum = DecoderSession(tiny_models["int4"] / "model.onnx", threads=1)
    gqa = DecoderSession(tiny_gqa / "model.onnx", threads=1)
    with pytest.raises(TypeError):
        gqa.step(5, optimum.new_cache(4))
    with pytest.raises(TypeError):
        optimum.step(5, gqa.new_cache(4))


def test_two_buffers_in_turn_each_keep_their_own_sequence(tiny_gqa: Path) -> None:
    """The session keeps its KV binding while one buffer is used; switching buffers must rebind, not reuse."""
    session = DecoderSession(tiny_gqa / "model.onnx", threads=1)
    a_ids, b_ids = list(range(3, 20)), list(range(40, 60))
    alone = [session.forward(ids, session.new_cache(len(ids))) for ids in (a_ids, b_ids)]
    a, b = session.new_cache(20), session.new_cache(20)  # the same shape: only their addresses differ
    a_logits = [session.prefill(a_ids[:5], a, 5, shrink=False)]
    b_logits = [session.prefill(b_ids[:5], b, 5, shrink=False)]
    for i in range(5, 17):
        a_logits.append(session.step(a_ids[i], a))
        b_logits.append(session.step(b_ids[i], b))
    for got, want in ((a_logits, alone[0]), (b_logits, alone[1])):
        np.testing.assert_allclose(np.stack(got), want[4:17], rtol=0, atol=1e-4 * np.abs(want).max())
