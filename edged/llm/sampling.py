"""Token selection: repeat penalty, temperature, top-k and top-p as pure functions of the logits."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from edged.errors import InvalidRequest

Logits = npt.NDArray[np.float32]

# llama.cpp's default window: only the last 64 tokens (prompt included) are penalised.
REPEAT_WINDOW = 64
# top-p first looks for its nucleus among this many best tokens and sorts everything only when
# they do not already hold `top_p` of the probability mass (exact either way, much cheaper usually).
_NUCLEUS_PROBE = 256


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen. ``temperature == 0`` is greedy (argmax)."""

    temperature: float = 0.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    repeat_penalty: float = 1.0  # 1.0: off
    seed: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.temperature <= 2.0:
            raise InvalidRequest(f"temperature must be between 0 and 2, got {self.temperature}")
        if self.top_k < 0:
            raise InvalidRequest(f"top_k must be 0 (off) or a positive integer, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repeat_penalty < 1.0:
            raise InvalidRequest(f"repeat_penalty must be >= 1, got {self.repeat_penalty}")


def apply_repeat_penalty(logits: Logits, recent: Sequence[int], penalty: float) -> Logits:
    """CTRL-style penalty (as llama.cpp and transformers): shrink the logits of recently seen tokens."""
    if penalty == 1.0 or not recent:
        return logits
    out = logits.copy()
    seen = np.unique(np.asarray(recent, dtype=np.int64))
    values = out[seen]
    out[seen] = np.where(values > 0, values / penalty, values * penalty)
    return out


def softmax(logits: Logits) -> Logits:
    shifted = np.exp(logits - logits.max())
    probs: Logits = (shifted / shifted.sum()).astype(np.float32)
    return probs


def candidate_probs(logits: Logits, params: SamplingParams) -> tuple[npt.NDArray[np.int64], Logits]:
    """Token ids still allowed after temperature, top-k and top-p, with their renormalised probabilities."""
    scaled = logits / np.float32(params.temperature)
    ids: npt.NDArray[np.int64] = np.arange(scaled.size, dtype=np.int64)
    if 0 < params.top_k < scaled.size:
        ids = np.argpartition(scaled, -params.top_k)[-params.top_k :].astype(np.int64)
    probs = softmax(scaled[ids])
    if params.top_p < 1.0:
        ids, probs = _nucleus(ids, probs, params.top_p)
    return ids, probs / probs.sum()


def _nucleus(ids: npt.NDArray[np.int64], probs: Logits, top_p: float) -> tuple[npt.NDArray[np.int64], Logits]:
    """Smallest set of most likely tokens whose mass reaches ``top_p``."""
    probe = ids.size
    if ids.size > _NUCLEUS_PROBE:
        best = np.argpartition(probs, -_NUCLEUS_PROBE)[-_NUCLEUS_PROBE:]
        if probs[best].sum() >= top_p:
            ids, probs, probe = ids[best], probs[best], _NUCLEUS_PROBE
    order = np.argsort(-probs, kind="stable")[:probe]
    cumulative = np.cumsum(probs[order])
    keep = int(np.searchsorted(cumulative, top_p)) + 1
    chosen = order[:keep]
    return ids[chosen], probs[chosen]


class Sampler:
    """Chooses tokens for one generation; owns its random generator so a seed reproduces a run."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self._rng = np.random.default_rng(params.seed)

    def __call__(self, logits: Logits, history: Sequence[int]) -> int:
        logits = apply_repeat_penalty(logits, history[-REPEAT_WINDOW:], self.params.repeat_penalty)
        if self.params.temperature == 0.0:
            return int(np.argmax(logits))
        ids, probs = candidate_probs(logits, self.params)
        return int(ids[self._rng.choice(ids.size, p=probs)])
