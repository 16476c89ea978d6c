"""Token selection: repeat penalty, temperature, top-k and top-p as pure functions of the logits."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral, Real

import numpy as np
import numpy.typing as npt

from edged.errors import InvalidRequest

Logits = npt.NDArray[np.float32]
Probs = npt.NDArray[np.float64]

# Below 0.01 sampling is argmax in all but name, and logits / temperature overflows float32 (1e-300 became
# 0 and then NaN probabilities); 0 asks for greedy outright.
MIN_TEMPERATURE = 0.01
MAX_TEMPERATURE = 2.0
MAX_REPEAT_PENALTY = 10.0  # llama.cpp's useful range ends near 1.5; past 10 every seen token is simply banned
SEED_LIMIT = 2**63  # seeds are stored and echoed as signed 64-bit integers

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
        for name in ("temperature", "top_p", "repeat_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
                raise InvalidRequest(f"{name} must be a finite number, got {value!r}")
        if not (self.temperature == 0.0 or MIN_TEMPERATURE <= self.temperature <= MAX_TEMPERATURE):
            raise InvalidRequest(
                f"temperature must be 0 (greedy) or between {MIN_TEMPERATURE} and {MAX_TEMPERATURE}, "
                f"got {self.temperature}"
            )
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, Integral) or self.top_k < 0:
            raise InvalidRequest(f"top_k must be 0 (off) or a positive integer, got {self.top_k!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p}")
        if not 1.0 <= self.repeat_penalty <= MAX_REPEAT_PENALTY:
            raise InvalidRequest(
                f"repeat_penalty must be between 1 (off) and {MAX_REPEAT_PENALTY:g}, got {self.repeat_penalty}"
            )
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, Integral) or not 0 <= self.seed < SEED_LIMIT
        ):
            raise InvalidRequest(f"seed must be an integer from 0 to 2**63 - 1, got {self.seed!r}")


def apply_repeat_penalty(logits: Logits, recent: Sequence[int], penalty: float) -> Logits:
    """CTRL-style penalty (as llama.cpp and transformers): shrink the logits of recently seen tokens."""
    if penalty == 1.0 or not recent:
        return logits
    out = logits.copy()
    seen = np.unique(np.asarray(recent, dtype=np.int64))
    values = out[seen].astype(np.float64)
    shrunk = np.where(values > 0, values / penalty, values * penalty)
    limit = np.finfo(np.float32).max  # a huge finite logit times the penalty stays finite; -inf stays masked
    out[seen] = np.where(np.isinf(values), values, np.clip(shrunk, -limit, limit))
    return out


def apply_mask(logits: Logits, allowed: npt.NDArray[np.bool_]) -> Logits:
    """``logits`` with every token outside ``allowed`` (ids past its end included) at -inf."""
    if not allowed.any():
        raise ValueError("the logits hook allows no token at all")
    out = np.full_like(logits, -np.inf)
    n = min(allowed.size, logits.size)
    out[:n] = np.where(allowed[:n], logits[:n], -np.inf)
    return out


def softmax(logits: npt.NDArray[np.floating]) -> Probs:
    """In float64: with a finite max, the sum is at least 1, so no division by zero or NaN."""
    x = logits.astype(np.float64)
    shifted = np.exp(x - x.max())
    probs: Probs = shifted / shifted.sum()
    return probs


def candidate_probs(logits: Logits, params: SamplingParams) -> tuple[npt.NDArray[np.int64], Probs]:
    """Token ids still allowed after temperature, top-k and top-p, with their renormalised probabilities."""
    scaled = logits.astype(np.float64) / params.temperature
    ids: npt.NDArray[np.int64] = np.arange(scaled.size, dtype=np.int64)
    if 0 < params.top_k < scaled.size:
        ids = np.argpartition(scaled, -params.top_k)[-params.top_k :].astype(np.int64)
    probs = softmax(scaled[ids])
    if params.top_p < 1.0:
        ids, probs = _nucleus(ids, probs, params.top_p)
    return ids, probs / probs.sum()


def _nucleus(ids: npt.NDArray[np.int64], probs: Probs, top_p: float) -> tuple[npt.NDArray[np.int64], Probs]:
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

    def __call__(self, logits: Logits, history: Sequence[int], allowed: npt.NDArray[np.bool_] | None = None) -> int:
        """The next token; ``allowed`` (a mask over the first ``allowed.size`` ids) excludes every other one."""
        logits = apply_repeat_penalty(logits, history[-REPEAT_WINDOW:], self.params.repeat_penalty)
        if allowed is not None:
            logits = apply_mask(logits, allowed)
        if self.params.temperature == 0.0:
            return int(np.argmax(logits))
        ids, probs = candidate_probs(logits, self.params)
        return int(ids[self._rng.choice(ids.size, p=probs)])
