"""Sampling as pure functions of the logits, checked from small tables."""

from __future__ import annotations

import numpy as np
import pytest

from edged.errors import InvalidRequest
from edged.llm.sampling import Sampler, SamplingParams, apply_repeat_penalty, candidate_probs

LOGITS = np.array([1.0, 3.0, -2.0, 2.5, 0.0], dtype=np.float32)


def test_repeat_penalty_shrinks_positive_and_grows_negative_logits() -> None:
    out = apply_repeat_penalty(LOGITS, [1, 2, 2], 2.0)
    assert out.tolist() == [1.0, 1.5, -4.0, 2.5, 0.0]
    assert LOGITS[1] == 3.0, "the caller's logits must not be modified"


@pytest.mark.parametrize(
    ("params", "expected_ids"),
    [
        (SamplingParams(temperature=1.0, top_k=2), {1, 3}),
        (SamplingParams(temperature=1.0, top_k=1), {1}),
        (SamplingParams(temperature=1.0, top_p=0.5), {1}),  # token 1 alone holds > 50 %
        (SamplingParams(temperature=1.0, top_p=0.9), {1, 3, 0}),
        (SamplingParams(temperature=1.0), {0, 1, 2, 3, 4}),
    ],
)
def test_candidates_after_top_k_and_top_p(params: SamplingParams, expected_ids: set[int]) -> None:
    ids, probs = candidate_probs(LOGITS, params)
    assert set(ids.tolist()) == expected_ids
    assert probs.sum() == pytest.approx(1.0, abs=1e-6)


def test_top_p_probe_matches_a_full_sort_on_a_large_vocabulary() -> None:
    """The cheap nucleus search over the best 256 tokens must choose exactly what a full sort does."""
    rng = np.random.default_rng(3)
    for scale in (1.0, 8.0):  # flat and peaked distributions: one falls back to the full sort
        logits = (rng.standard_normal(5000) * scale).astype(np.float32)
        ids, _ = candidate_probs(logits, SamplingParams(temperature=1.0, top_p=0.8))
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        order = np.argsort(-probs)
        keep = int(np.searchsorted(np.cumsum(probs[order]), 0.8)) + 1
        assert set(ids.tolist()) == set(order[:keep].tolist())


def test_greedy_and_top_k_1_pick_the_argmax() -> None:
    assert Sampler(SamplingParams())(LOGITS, []) == 1
    assert Sampler(SamplingParams(temperature=1.5, top_k=1, seed=9))(LOGITS, []) == 1


def test_same_seed_same_choices() -> None:
    params = SamplingParams(temperature=1.0, seed=42)
    a, b = Sampler(params), Sampler(params)
    assert [a(LOGITS, []) for _ in range(50)] == [b(LOGITS, []) for _ in range(50)]


@pytest.mark.parametrize(
    "kwargs",
    [{"temperature": -0.1}, {"temperature": 2.5}, {"top_k": -1}, {"top_p": 0.0}, {"repeat_penalty": 0.5}],
)
def test_out_of_range_parameters_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(InvalidRequest):
        SamplingParams(**kwargs)  # type: ignore[arg-type]
