"""Sampling as pure functions of the logits, checked from small tables."""

from __future__ import annotations

import math

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
    ("kwargs", "words"),
    [
        ({"temperature": -0.1}, "temperature must be 0 .greedy. or between 0.01 and 2"),
        ({"temperature": 2.5}, "temperature must be 0 .greedy. or between 0.01 and 2"),
        ({"temperature": 1e-300}, "temperature must be 0 .greedy. or between 0.01 and 2"),  # was NaN probs
        ({"temperature": 0.009}, "temperature must be 0 .greedy. or between 0.01 and 2"),
        ({"temperature": math.nan}, "temperature must be a finite number"),
        ({"temperature": math.inf}, "temperature must be a finite number"),
        ({"temperature": "hot"}, "temperature must be a finite number"),
        ({"top_k": -1}, "top_k must be 0 .off. or a positive integer"),
        ({"top_k": 2.5}, "top_k must be 0 .off. or a positive integer"),
        ({"top_k": True}, "top_k must be 0 .off. or a positive integer"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"top_p": math.nan}, "top_p must be a finite number"),
        ({"top_p": -math.inf}, "top_p must be a finite number"),
        ({"repeat_penalty": 0.5}, "repeat_penalty must be between 1 .off. and 10"),
        ({"repeat_penalty": 10.5}, "repeat_penalty must be between 1 .off. and 10"),
        ({"repeat_penalty": math.nan}, "repeat_penalty must be a finite number"),  # NaN slipped past `< 1`
        ({"repeat_penalty": math.inf}, "repeat_penalty must be a finite number"),
        ({"seed": -1}, r"seed must be an integer from 0 to 2\*\*63 - 1"),
        ({"seed": 2**63}, r"seed must be an integer from 0 to 2\*\*63 - 1"),
        ({"seed": 1.5}, r"seed must be an integer from 0 to 2\*\*63 - 1"),
        ({"seed": False}, r"seed must be an integer from 0 to 2\*\*63 - 1"),
    ],
)
def test_out_of_range_parameters_are_refused_with_the_allowed_range(kwargs: dict[str, object], words: str) -> None:
    """Each of these once reached the sampler and failed as `internal` (NaN probabilities, numpy errors)."""
    with pytest.raises(InvalidRequest, match=words):
        SamplingParams(**kwargs)  # type: ignore[arg-type]


EDGES = [
    SamplingParams(temperature=0.01, seed=0),
    SamplingParams(temperature=2.0, seed=2**63 - 1),
    SamplingParams(temperature=0.01, top_k=10**12, top_p=1e-9, repeat_penalty=10.0, seed=5),
    SamplingParams(temperature=2.0, top_k=1, repeat_penalty=10.0),
    SamplingParams(),
]
EXTREME_LOGITS = [
    np.array([3e38, -3e38, 0.0, 1e-45, 3e38], dtype=np.float32),  # float32's ends: overflow when scaled
    np.array([-np.inf, 5.0, -np.inf, -3e38], dtype=np.float32),  # masked tokens
    np.full(49152, -12.5, dtype=np.float32),  # a flat vocabulary the size of SmolLM2's
]


@pytest.mark.parametrize("params", EDGES)
@pytest.mark.parametrize("logits", EXTREME_LOGITS, ids=["float32-ends", "masked", "flat"])
def test_every_accepted_parameter_set_picks_a_real_token(params: SamplingParams, logits: np.ndarray) -> None:
    """The edges of the accepted ranges on the most hostile finite logits: a valid id, never NaN or an error."""
    sampler = Sampler(params)
    history = [0, 1, 2]
    for _ in range(5):
        token = sampler(logits, history)
        assert 0 <= token < logits.size
        assert np.isfinite(logits[token]), "a masked (-inf) token was chosen"
    if params.temperature > 0:
        _, probs = candidate_probs(logits, params)
        assert np.isfinite(probs).all() and probs.sum() == pytest.approx(1.0)


def test_huge_top_k_is_the_whole_vocabulary() -> None:
    ids, _ = candidate_probs(LOGITS, SamplingParams(temperature=1.0, top_k=10**9))
    assert set(ids.tolist()) == {0, 1, 2, 3, 4}
