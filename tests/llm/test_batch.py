"""Several sequences in one batch: the same answers as alone, joining and leaving between steps, one hook
each, prefixes reused from the cache without changing a token."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edged.build import build_model
from edged.llm import Engine, GenerationRequest, Message, SamplingParams
from edged.llm.engine import Batch, Sequence
from edged.store import Recipe

PROMPTS = ("Tomatoes wilt", "Grüße aus München! Ça va très bien", "def square(x):", "Water boils at 100 degrees")


@pytest.fixture(scope="module")
def tiny_gqa(tiny_models: dict[str, Path]) -> Path:
    models_dir = tiny_models["int4"].parent
    recipe = Recipe.load(models_dir / "tiny.toml")
    return build_model(recipe, "int4", models_dir, models_dir.parent / "cache", lambda _: None, graph="gqa")


@pytest.fixture(scope="module")
def engine(tiny_gqa: Path) -> Engine:
    return Engine(tiny_gqa, threads=1, context_tokens=128, prefill_chunk_tokens=8)


def ask(prompt: str, system: str | None = None, **kwargs: object) -> GenerationRequest:
    messages = ((Message("system", system),) if system else ()) + (Message("user", prompt),)
    return GenerationRequest(messages=messages, **kwargs)  # type: ignore[arg-type]


def run(batch: Batch, engine: Engine, requests: list[GenerationRequest], join_every: int = 0) -> list[Sequence]:
    """Runs ``requests`` through ``batch``, each added when a slot is free (and, with ``join_every``, only
    every that many steps), to the end; returns their sequences in request order."""
    waiting = [engine.sequence(r, engine.prompt_ids(r)) for r in requests]
    seqs = list(waiting)
    texts = {id(s): "" for s in seqs}
    steps = 0
    while waiting or batch.running:
        if waiting and batch.free and (join_every == 0 or steps % join_every == 0):
            seq = waiting.pop(0)
            texts[id(seq)] += batch.add(seq)
            continue
        for seq, text in batch.step():
            texts[id(seq)] += text
        steps += 1
    for seq in seqs:
        assert seq.result is not None and seq.result.text == texts[id(seq)], "streamed text is the answer"
    return seqs


def test_a_batch_gives_every_sequence_the_answer_it_gets_alone(engine: Engine) -> None:
    """Four sequences of different lengths decoded in one step each time, joining at different steps and
    leaving at different lengths: each answer is token for token the one it gets alone."""
    requests = [ask(p, max_tokens=12 + 7 * i) for i, p in enumerate(PROMPTS)]
    alone = [engine.complete(r).token_ids for r in requests]
    together = run(Batch(engine, 4), engine, requests, join_every=3)
    assert [s.token_ids for s in together] == [list(a) for a in alone]
    assert [s.result.finish_reason for s in together if s.result] == ["length"] * 4


def test_more_requests_than_slots_reuse_the_slots_that_free_up(engine: Engine) -> None:
    requests = [ask(p, max_tokens=5 + i) for i, p in enumerate(PROMPTS * 2)]
    batch = Batch(engine, 2)
    seqs = run(batch, engine, requests)
    assert {s.slot for s in seqs} == {0, 1}
    assert [len(s.token_ids) for s in seqs] == [5 + i for i in range(len(requests))]
    assert batch.free == 2


def test_batched_logits_match_each_sequences_own(engine: Engine) -> None:
    """The step of a batch computes, row by row, what a step of each sequence alone computes."""
    ids = [engine.tokenizer.encode(p) for p in PROMPTS[:3]]
    session = engine.session
    batch_cache = session.new_cache(64, slots=3)
    for slot, prompt in enumerate(ids):
        session.prefill(prompt, batch_cache, 8, slot=slot)
    together = session.step_batch([5, 6, 7], batch_cache)
    for slot, prompt in enumerate(ids):
        own = session.new_cache(64)
        session.prefill(prompt, own, 8)
        alone = session.step(5 + slot, own)
        np.testing.assert_allclose(together[slot], alone, rtol=0, atol=1e-4 * np.abs(alone).max())
    assert batch_cache.lengths == [len(p) + 1 for p in ids]


def test_a_free_slot_below_a_running_one_is_harmless(engine: Engine) -> None:
    """A sequence in slot 1 decodes right while slot 0 is empty (its row is computed and ignored)."""
    request = ask(PROMPTS[1], max_tokens=10)
    alone = engine.complete(request).token_ids
    batch = Batch(engine, 2)
    blocker, seq = (engine.sequence(r, engine.prompt_ids(r)) for r in (ask(PROMPTS[0], max_tokens=1), request))
    batch.add(blocker)  # one token: done at once, slot 0 freed
    batch.add(engine.sequence(ask(PROMPTS[2], max_tokens=3), engine.prompt_ids(ask(PROMPTS[2], max_tokens=3))))
    batch.add(seq)
    assert seq.slot == 1
    while not seq.finished:
        batch.step()
    assert tuple(seq.token_ids) == alone


def test_cancel_and_deadline_end_one_sequence_within_a_step_and_free_its_slot(engine: Engine) -> None:
    batch = Batch(engine, 3)
    seqs = [engine.sequence(r, engine.prompt_ids(r)) for r in (ask(p, max_tokens=60) for p in PROMPTS[:3])]
    for s in seqs:
        batch.add(s)
    batch.step()
    seqs[1].cancel("cancelled")
    produced = len(seqs[1].token_ids)
    batch.step()
    assert seqs[1].result is not None and seqs[1].result.finish_reason == "cancelled"
    assert len(seqs[1].token_ids) == produced and batch.free == 1
    assert not seqs[0].finished and not seqs[2].finished
    late = ask(PROMPTS[3], max_tokens=60, deadline_s=0.0)
    expired = engine.sequence(late, engine.prompt_ids(late))
    batch.add(expired)
    assert expired.result is not None and expired.result.finish_reason == "deadline" and batch.free == 1
    ended = batch.end_all("thermal")
    assert {s.result.finish_reason for s, _ in ended if s.result} == {"thermal"} and batch.free == 3


class _Only:
    def __init__(self, mask: np.ndarray) -> None:
        self.mask = mask
        self.n = 0

    def allowed(self) -> np.ndarray:
        return self.mask

    def accept(self, token: int) -> None:
        self.n += 1

    @property
    def complete(self) -> bool:
        return self.n >= 6


def test_a_logits_hook_confines_only_its_own_sequence_in_a_batch(engine: Engine) -> None:
    allowed = [engine.tokenizer.token_id(t) for t in ("a", "b")]
    mask = np.zeros(engine.tokenizer.vocab_size, np.bool_)
    mask[allowed] = True
    free = ask(PROMPTS[0], max_tokens=20, sampling=SamplingParams(temperature=1.0, seed=4))
    constrained = ask(PROMPTS[1], max_tokens=20, logits_hook=lambda: _Only(mask))
    alone = engine.complete(free).token_ids
    seqs = run(Batch(engine, 2), engine, [free, constrained])
    assert tuple(seqs[0].token_ids) == alone
    assert len(seqs[1].token_ids) == 6 and set(seqs[1].token_ids) <= set(allowed)
    assert seqs[1].result is not None and seqs[1].result.finish_reason == "stop"


def test_a_cached_prefix_changes_no_token_and_skips_its_prefill(tiny_gqa: Path) -> None:
    """Two questions under one system prompt: the second reuses the first's keys and values for the
    shared part and answers token for token as an engine without the cache does."""
    system = "Water the tomatoes early in the morning. " * 2
    plain = Engine(tiny_gqa, threads=1, context_tokens=256, prefill_chunk_tokens=8)
    cached = Engine(tiny_gqa, threads=1, context_tokens=256, prefill_chunk_tokens=8, prefix_cache_mb=4)
    assert cached.prefix_cache is not None
    for i, question in enumerate(("Tomatoes wilt", "Water boils")):
        request = ask(question, system=system, max_tokens=15)
        expected = plain.complete(request).token_ids
        seq = cached.sequence(request, cached.prompt_ids(request))
        batch = Batch(cached, 2)
        batch.add(seq)
        while not seq.finished:
            batch.step()
        assert tuple(seq.token_ids) == expected
        shared = cached.shared_prefix(request, seq.prompt_ids)
        assert shared > 40
        assert seq.prefix_tokens == (shared if i else 0)
    assert (cached.prefix_cache.hits, cached.prefix_cache.misses, len(cached.prefix_cache)) == (1, 1, 1)


def test_the_prefix_cache_keeps_to_its_budget_dropping_the_least_recent(tiny_gqa: Path) -> None:
    engine = Engine(tiny_gqa, threads=1, context_tokens=256, prefix_cache_mb=0.05)
    cache = engine.prefix_cache
    assert cache is not None
    for system in ("Paris boils " * 8, "Water wilts " * 8, "München tomatoes " * 8):
        engine.complete(ask("Hi", system=system, max_tokens=1))
        request = ask("Hi", system=system, max_tokens=1)
        batch = Batch(engine, 1)
        batch.add(engine.sequence(request, engine.prompt_ids(request)))
    assert 0 < cache.bytes <= cache.budget_bytes
    assert len(cache) < 3
